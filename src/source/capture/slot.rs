//! Slot setup at the start of a capture run: reads what the server and
//! `pgferry.snapshot_state` say, lets [`super::slot_plan`] decide, and carries the decision
//! out (resume, create with or without a snapshot, drop and re-create, or stop with an error).

use super::slot_plan::{self, SlotLoss, SlotPlan};
use super::{catalog, lock, Capture, CaptureError};
use crate::config::SnapshotMode;
use crate::lsn::Lsn;
use crate::pg::replication::ReplicationConnection;
use crate::pipeline::progress::Progress;
use crate::source::snapshot::chunk;

impl Capture {
    /// Makes sure the slot exists and its initial snapshot is in Kafka. A slot that was lost
    /// after its snapshot completed is an error, or re-created with a warning (see
    /// [`slot_plan`]).
    pub(super) async fn prepare_slot(
        &mut self,
        repl: &mut ReplicationConnection,
    ) -> Result<(), CaptureError> {
        let source = &self.settings.source;
        let version = catalog::server_version_num(&self.sql)
            .await
            .map_err(CaptureError::sql("reading server_version_num"))?;
        let existing = catalog::slot(&self.sql, version, &self.slot)
            .await
            .map_err(CaptureError::sql("reading pg_replication_slots"))?;
        let recorded = catalog::snapshot_completed(&self.sql, &self.slot)
            .await
            .map_err(CaptureError::sql("reading pgferry.snapshot_state"))?;
        let failover = self.failover_wanted(version);
        let database = source.url.dbname();
        match slot_plan::plan(
            existing.as_ref(),
            recorded,
            database,
            source.snapshot,
            source.on_slot_loss,
        ) {
            SlotPlan::Resume { confirmed } => {
                if failover && existing.as_ref().and_then(|s| s.failover) == Some(false) {
                    repl.simple_query(&slot_plan::enable_failover_command(&self.slot))
                        .await?;
                    tracing::info!(slot = %self.slot, "made the existing slot a failover slot");
                }
                *lock(&self.progress) = Progress::starting_at(confirmed);
                tracing::info!(slot = %self.slot, %confirmed, "resuming from existing slot");
                return Ok(());
            }
            SlotPlan::Mismatch {
                plugin,
                database: found,
            } => {
                return Err(CaptureError::SlotMismatch {
                    slot: self.slot.clone(),
                    detail: format!(
                        "it uses plugin {plugin:?} on database {found:?}; pgferry needs a pgoutput slot on {database:?}. \
                         Drop it or set source.slot to another name"
                    ),
                });
            }
            SlotPlan::Stop(loss) => return Err(self.loss_error(loss, recorded)),
            SlotPlan::Recreate(loss) => {
                let exists = loss.slot_exists();
                let error = self.loss_error(loss, recorded);
                tracing::warn!(
                    slot = %self.slot,
                    snapshot = ?source.snapshot,
                    error = %error,
                    "SLOT LOST: re-creating it because source.on_slot_loss is recreate; changes \
                     between the lost slot's last confirmed position and the new slot are \
                     missing from Kafka unless the new snapshot re-publishes them"
                );
                if exists {
                    catalog::drop_slot(&self.sql, &self.slot)
                        .await
                        .map_err(CaptureError::sql("dropping the invalidated slot"))?;
                }
            }
            SlotPlan::RestartSnapshot => {
                // The snapshot never finished: its rows may be partly in Kafka, but the
                // exported snapshot is gone. Start over with a new slot (snapshot rows are
                // re-sent).
                tracing::warn!(slot = %self.slot, "initial snapshot did not complete; recreating the slot");
                catalog::drop_slot(&self.sql, &self.slot)
                    .await
                    .map_err(CaptureError::sql("dropping the unfinished slot"))?;
            }
            SlotPlan::Create => {}
        }
        self.create_slot(repl, failover).await
    }

    /// Whether to create (or switch) the slot as a failover slot on this server.
    fn failover_wanted(&self, server_version_num: i32) -> bool {
        let wanted = self.settings.source.failover_slot;
        if wanted && server_version_num < slot_plan::FAILOVER_SLOTS_SINCE {
            tracing::info!(
                server_version_num,
                "source.failover_slot has no effect: failover slots need PostgreSQL 17 or later"
            );
        }
        wanted && server_version_num >= slot_plan::FAILOVER_SLOTS_SINCE
    }

    /// The operator-facing error for a lost slot.
    fn loss_error(&self, loss: SlotLoss, recorded: Option<Lsn>) -> CaptureError {
        let reached = loss.reached().or(recorded).unwrap_or_default();
        match loss {
            SlotLoss::Missing { .. } => CaptureError::SlotLost {
                slot: self.slot.clone(),
                reached,
            },
            SlotLoss::Invalidated { reason, .. } => CaptureError::SlotInvalidated {
                slot: self.slot.clone(),
                reason,
                reached,
            },
        }
    }

    /// Creates the slot and sets up its snapshot: chunked (every published table planned in
    /// `pgferry.snapshot_progress`, read beside the stream), exported (published now, inside
    /// the slot's snapshot), or none; then records the slot's snapshot state.
    async fn create_slot(
        &mut self,
        repl: &mut ReplicationConnection,
        failover: bool,
    ) -> Result<(), CaptureError> {
        // A slot created before (lost since): its targets hold rows, which the new snapshot
        // prunes to the source's (where ranges are pruned, see `DriverSettings::prune`).
        let again = catalog::clear_snapshot_state(&self.sql, &self.slot)
            .await
            .map_err(CaptureError::sql("clearing pgferry.snapshot_state"))?;
        let mode = self.settings.source.snapshot;
        let export = mode == SnapshotMode::Exported;
        let created = repl
            .simple_query(&slot_plan::create_slot_command(
                &self.slot, export, failover,
            ))
            .await?;
        let consistent: Lsn = created
            .first("consistent_point")
            .and_then(|s| s.parse().ok())
            .ok_or(CaptureError::MissingField("consistent_point"))?;
        tracing::info!(slot = %self.slot, %consistent, failover, "created replication slot");
        *lock(&self.progress) = Progress::starting_at(consistent);
        if export {
            let name = created
                .first("snapshot_name")
                .ok_or(CaptureError::MissingField("snapshot_name"))?
                .to_owned();
            self.publish_snapshot(&name, consistent).await?;
        }
        let source = &self.settings.source;
        let tables = catalog::published_tables(&self.sql, &source.publication)
            .await
            .map_err(CaptureError::sql("listing published tables"))?;
        if mode == SnapshotMode::Initial {
            for (schema, table) in &tables {
                let Some(target) = chunk::target(&self.sql, &source.publication, schema, table)
                    .await
                    .map_err(CaptureError::sql("describing a snapshot table"))?
                else {
                    continue;
                };
                chunk::plan_table(
                    &self.sql,
                    &self.slot,
                    &target,
                    source.snapshot_readers,
                    source.snapshot_batch_rows,
                    again && self.settings.compact_snapshot_rows,
                )
                .await
                .map_err(CaptureError::sql("planning the initial snapshot"))?;
            }
            tracing::info!(
                tables = tables.len(),
                "initial snapshot planned; its chunks are read beside the stream"
            );
        } else {
            chunk::record_covered(&self.sql, &self.slot, &tables)
                .await
                .map_err(CaptureError::sql("recording the snapshot baseline"))?;
        }
        catalog::mark_snapshot_completed(&self.sql, &self.slot, consistent)
            .await
            .map_err(CaptureError::sql("recording the slot's snapshot state"))
    }
}

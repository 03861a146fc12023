//! Multi-master acknowledgements on the apply side: a peer's `ack` record is stored in
//! `pgferry.peer_acks` in the same target transaction as the rest of the peer's stream up to
//! it (so what this node knows of the peer's acknowledgements never runs ahead of what it
//! has applied from the peer), and the tombstone horizon is enforced in both directions:
//! a node that learns peers went past its missing acknowledgements refuses to go on, and a
//! node that went past a peer's refuses that peer's stream.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::{InFlight, Worker};
use crate::apply::error::ApplyError;
use crate::apply::stream::AckItem;

/// How often a worker reads `pgferry.horizon_bypassed` again.
const HORIZON_RECHECK: Duration = Duration::from_secs(5);

impl Worker {
    /// Stores a peer's acknowledgement; refuses to go on if the peer collected tombstones
    /// this node never acknowledged.
    pub(super) async fn record_ack<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        ack: &AckItem,
    ) -> Result<(), ApplyError> {
        if self.lww.is_none() {
            return Ok(());
        }
        let local = self.settings.local_node.clone();
        if ack.bypassed.contains(&local) {
            self.metrics
                .horizon_refusals
                .with_label_values(&[&local])
                .inc();
            return Err(ApplyError::HorizonPassed {
                node: local.clone(),
                detail: format!(
                    "node {} collected tombstones that this node ({local}) had not acknowledged: \
                     it was away longer than apply.conflict.tombstone_retention, so it may hold rows \
                     deleted elsewhere and its stream may bring them back",
                    self.settings.node
                ),
            });
        }
        pending
            .drain()
            .await
            .map_err(ApplyError::sql("applying changes"))?;
        for (source, lsn) in &ack.applied {
            client
                .execute(
                    "INSERT INTO pgferry.peer_acks (reporter, source, applied_lsn, clock_ahead_us)
                     VALUES ($1, $2, $3::text::pg_lsn,
                             $4::int8 - (extract(epoch FROM clock_timestamp()) * 1000000)::int8)
                     ON CONFLICT (reporter, source) DO UPDATE
                        SET applied_lsn = EXCLUDED.applied_lsn, received_at = now(),
                            clock_ahead_us = EXCLUDED.clock_ahead_us",
                    &[&self.settings.node, source, &lsn.to_string(), &ack.at_us],
                )
                .await
                .map_err(ApplyError::sql("recording a peer's acknowledgement"))?;
        }
        Ok(())
    }

    /// Refuses the stream of a node whose missing acknowledgements this node's tombstone
    /// collection went past (read at most every [`HORIZON_RECHECK`]).
    pub(super) async fn check_horizon<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
    ) -> Result<(), ApplyError> {
        let Some(lww) = &self.lww else {
            return Ok(());
        };
        let bypassed = match lww.horizon_checked {
            Some((at, bypassed)) if at.elapsed() < HORIZON_RECHECK => bypassed,
            _ => {
                pending
                    .drain()
                    .await
                    .map_err(ApplyError::sql("applying changes"))?;
                let bypassed: bool = client
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM pgferry.horizon_bypassed WHERE node = $1)",
                        &[&self.settings.node],
                    )
                    .await
                    .map_err(ApplyError::sql("reading pgferry.horizon_bypassed"))?
                    .get(0);
                if let Some(lww) = &mut self.lww {
                    lww.horizon_checked = Some((Instant::now(), bypassed));
                }
                bypassed
            }
        };
        if !bypassed {
            return Ok(());
        }
        let node = self.settings.node.clone();
        self.metrics
            .horizon_refusals
            .with_label_values(&[&node])
            .inc();
        Err(ApplyError::HorizonPassed {
            node: node.clone(),
            detail: format!(
                "this node ({}) collected tombstones that node {node} had not acknowledged (it was \
                 away longer than apply.conflict.tombstone_retention); its stream is refused, since \
                 its writes may bring deleted rows back",
                self.settings.local_node
            ),
        })
    }
}

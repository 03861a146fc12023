//! Statements sent to the target and not yet answered ([`InFlight`]), and the rule that keeps
//! pipelining from hanging: their answers are read while the worker waits for anything else.
//!
//! tokio-postgres hands each statement's answer to that statement's future through a channel
//! of two messages. An answer that arrives in more pieces (a TCP read can end anywhere in it)
//! while its future is not being polled stops the connection: it reads nothing more until the
//! future takes the pieces. A query the worker then sends and awaits directly (a `PREPARE`, a
//! look at the target's tables, a dead letter) waits forever for an answer queued behind it:
//! the session sits idle, nothing fails. [`InFlight::beside`] runs the worker's work together
//! with a pump that reads every answer as it arrives, in the same task, so no direct query
//! ever waits behind an unread one.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::FutureExt;

use super::PIPELINE_DEPTH;
use crate::apply::error::ApplyError;

/// A statement sent (polled once) whose answer is awaited: the number of rows it changed.
pub(super) type Pending<'a> =
    Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a>>;

/// Statements sent to the target and not yet answered, in send order. Each is polled as soon
/// as it is added, which sends it: the connection stays busy while the worker decodes the next
/// records, instead of alternating send-a-batch / wait-for-all. Clones share the statements:
/// one clone pumps their answers ([`InFlight::beside`]) while the worker sends through another.
#[derive(Default, Clone)]
pub(super) struct InFlight<'a> {
    queues: Arc<Mutex<Queues<'a>>>,
}

#[derive(Default)]
struct Queues<'a> {
    /// The open target transaction's statements.
    open: Answers<'a>,
    /// The previous target transaction's statements, ending with its COMMIT, when the worker
    /// read on without waiting for them (see `Worker::commit_batch`). Kept apart so that an
    /// error of theirs is never taken for one of the open transaction's.
    committing: Answers<'a>,
    /// The task of the pump, woken when a statement is added so it polls it from then on.
    pump: Option<Waker>,
}

impl<'a> InFlight<'a> {
    fn lock(&self) -> MutexGuard<'_, Queues<'a>> {
        // The queues hold no invariant a panic elsewhere could have broken half way.
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many statements of the open transaction are unanswered.
    pub(super) fn len(&self) -> usize {
        self.lock().open.queue.len()
    }

    /// Runs `work` while reading the answers of the statements in flight as they arrive (see
    /// the module documentation); `work` sends through a clone of this.
    pub(super) async fn beside<F: Future>(&self, work: F) -> F::Output {
        let pump = poll_fn(|cx| -> Poll<Infallible> {
            let mut queues = self.lock();
            queues.pump = Some(cx.waker().clone());
            queues.open.poll_answers(cx);
            queues.committing.poll_answers(cx);
            Poll::Pending
        });
        tokio::select! {
            biased;
            out = work => out,
            never = pump => match never {},
        }
    }

    /// Waits for answers while [`PIPELINE_DEPTH`] statements are unanswered, down to half.
    pub(super) async fn throttle(&mut self) -> Result<(), ApplyError> {
        if self.len() >= PIPELINE_DEPTH {
            self.wait_below(PIPELINE_DEPTH / 2)
                .await
                .map_err(ApplyError::sql("applying changes"))?;
        }
        Ok(())
    }

    /// Sends a statement (polls it once) and collects any results already back.
    pub(super) fn send(&mut self, statement: Pending<'a>) {
        let mut queues = self.lock();
        queues.open.queue.push_back(statement);
        queues.open.collect_ready();
        queues.committing.collect_ready();
        // Polled here without a waker of its own: the pump polls it again, with one.
        if let Some(pump) = &queues.pump {
            pump.wake_by_ref();
        }
    }

    /// Waits until fewer than `limit` statements of the open transaction are in flight;
    /// returns the first error among those answered.
    pub(super) async fn wait_below(&mut self, limit: usize) -> Result<(), tokio_postgres::Error> {
        poll_fn(|cx| {
            let mut queues = self.lock();
            // The last transaction's answers come first: read them too, or these would wait
            // behind them.
            queues.committing.poll_answers(cx);
            queues.open.poll_answers(cx);
            if queues.open.queue.len() < limit {
                Poll::Ready(queues.open.take_error())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Waits for every statement of the open transaction; returns the first error.
    pub(super) async fn drain(&mut self) -> Result<(), tokio_postgres::Error> {
        self.wait_below(1).await
    }

    /// Sets the open transaction's statements (its COMMIT sent last) aside, to be answered by
    /// [`InFlight::settle`] while later statements go out.
    pub(super) fn detach(&mut self) {
        let mut queues = self.lock();
        debug_assert!(
            queues.committing.queue.is_empty(),
            "a commit is still unanswered"
        );
        queues.committing = std::mem::take(&mut queues.open);
    }

    /// Waits for the statements set aside by [`InFlight::detach`]; returns the first error.
    pub(super) async fn settle(&mut self) -> Result<(), tokio_postgres::Error> {
        poll_fn(|cx| {
            let mut queues = self.lock();
            queues.committing.poll_answers(cx);
            queues.open.poll_answers(cx);
            if queues.committing.queue.is_empty() {
                Poll::Ready(queues.committing.take_error())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// Statements of one target transaction and the first error among those already answered.
#[derive(Default)]
struct Answers<'a> {
    queue: FuturesOrdered<Pending<'a>>,
    failed: Option<tokio_postgres::Error>,
}

impl Answers<'_> {
    /// Takes the answers already back, polling without a waker.
    fn collect_ready(&mut self) {
        while let Some(Some(result)) = self.queue.next().now_or_never() {
            self.note(result);
        }
    }

    /// Takes the answers already back; `cx` is woken when the next one arrives.
    fn poll_answers(&mut self, cx: &mut Context<'_>) {
        while let Poll::Ready(Some(result)) = self.queue.poll_next_unpin(cx) {
            self.note(result);
        }
    }

    fn note(&mut self, result: Result<u64, tokio_postgres::Error>) {
        if let Err(e) = result {
            self.failed.get_or_insert(e);
        }
    }

    fn take_error(&mut self) -> Result<(), tokio_postgres::Error> {
        self.failed.take().map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::InFlight;
    use std::time::Duration;
    use tokio::sync::{mpsc, oneshot};

    /// A model of tokio-postgres: the "connection" hands a statement's answer over in `pieces`
    /// through a channel of one, and only then answers a later query. The worker's later
    /// query completes only if the pipelined statement's answer is read meanwhile.
    async fn later_query_answers(pieces: usize, pumped: bool) -> bool {
        let (answer, mut answer_rx) = mpsc::channel::<u64>(1);
        let (later, later_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            for piece in 0..pieces as u64 {
                if answer.send(piece).await.is_err() {
                    return;
                }
            }
            drop(answer);
            let _ = later.send(());
        });
        let mut pending = InFlight::default();
        pending.send(Box::pin(async move {
            let mut read = 0;
            while answer_rx.recv().await.is_some() {
                read += 1;
            }
            Ok(read)
        }));
        let work = async {
            tokio::time::timeout(Duration::from_secs(2), later_rx)
                .await
                .is_ok()
        };
        let answered = if pumped {
            pending.clone().beside(work).await
        } else {
            work.await
        };
        answered && pending.drain().await.is_ok() && pending.len() == 0
    }

    #[tokio::test]
    async fn a_query_sent_while_statements_are_in_flight_is_answered() {
        for pieces in [1, 2, 3, 10, 1000] {
            assert!(later_query_answers(pieces, true).await, "{pieces} pieces");
        }
    }

    /// The model shows the hang the pump prevents: without it, an answer in more pieces
    /// than the channel holds stops the later query.
    #[tokio::test]
    async fn without_the_pump_a_long_answer_stops_the_connection() {
        assert!(!later_query_answers(10, false).await);
    }

    /// `settle` waits for the committing transaction's statements only, `drain` for the open
    /// one's.
    #[tokio::test]
    async fn settle_and_drain_wait_for_their_own_transaction() {
        let (go, wait) = oneshot::channel::<()>();
        let mut pending = InFlight::default();
        let pump = pending.clone();
        pump.beside(async {
            pending.send(Box::pin(async { Ok(1) }));
            pending.detach();
            pending.send(Box::pin(async move { Ok(u64::from(wait.await.is_ok())) }));
            assert!(pending.settle().await.is_ok());
            assert_eq!(pending.len(), 1, "the open statement is still unanswered");
            go.send(()).unwrap();
            assert!(pending.drain().await.is_ok());
            assert_eq!(pending.len(), 0);
        })
        .await;
    }
}

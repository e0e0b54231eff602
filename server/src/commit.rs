//! Group commit: writes that arrive at the same time are applied in one transaction.
//!
//! Every worker report (from the unary calls and from `Report`) and every single `StartRun` is
//! queued here; a few committer loops each take whatever is queued (up to a bound), apply it in
//! one transaction and answer each write. While one transaction commits, the next batch
//! gathers, so the number of commits per second stays near what the database can do while the
//! writes per commit grow with the load. An idle server applies a lone write at once: there is
//! no timer window.

use std::{future::Future, sync::Arc};

use tokio::sync::{Mutex, mpsc, oneshot};

use crate::{
    error::{Error, Result},
    store::{Applied, NewRun, Report, Store},
};

/// Most reports in one transaction.
const MAX_BATCH: usize = 1000;
/// A batch takes no more reports once their payloads weigh this much (the first is always
/// taken).
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Reports waiting for a committer before new ones wait to be queued.
const QUEUE: usize = 20_000;

/// A kind of write that can be applied many at once.
pub trait Apply: Clone + Send + Sync + 'static {
    type Op: Send + 'static;
    type Answer: Send + 'static;
    /// Applies `ops` in one transaction: one answer per op, or `Err` when the transaction
    /// failed as a whole and nothing was applied.
    fn apply(&self, ops: &[Self::Op]) -> impl Future<Output = Result<Vec<Result<Self::Answer>>>> + Send;
}

/// Worker reports: see [`Store::apply_reports`].
#[derive(Clone, Debug)]
pub struct Reports(pub Store);

impl Apply for Reports {
    type Op = Report;
    type Answer = Applied;
    async fn apply(&self, ops: &[Report]) -> Result<Vec<Result<Applied>>> {
        self.0.apply_reports(ops).await
    }
}

/// Runs to start, each on its own (one refused run does not refuse the others): see
/// [`Store::start_runs`].
#[derive(Clone, Debug)]
pub struct Starts(pub Store);

impl Apply for Starts {
    type Op = NewRun;
    type Answer = (aiki_proto::v1::Run, bool);
    async fn apply(&self, ops: &[NewRun]) -> Result<Vec<Result<Self::Answer>>> {
        self.0.start_runs(ops, false).await
    }
}

struct Job<A: Apply> {
    op: A::Op,
    bytes: usize,
    reply: oneshot::Sender<Result<A::Answer>>,
}

struct Queue<A: Apply> {
    rx: mpsc::Receiver<Job<A>>,
    /// A job taken from the channel that did not fit the previous batch.
    carry: Option<Job<A>>,
}

/// The queue of writes of one kind and its committer loops.
pub struct Committer<A: Apply> {
    tx: mpsc::Sender<Job<A>>,
}

impl<A: Apply> Clone for Committer<A> {
    fn clone(&self) -> Self {
        Self { tx: self.tx.clone() }
    }
}

impl<A: Apply> std::fmt::Debug for Committer<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer")
            .field("queued", &(QUEUE - self.tx.capacity()))
            .finish()
    }
}

impl<A: Apply> Committer<A> {
    /// Starts `loops` committer loops; they end when every `Committer` is dropped.
    pub fn start(applier: A, loops: usize) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let queue = Arc::new(Mutex::new(Queue { rx, carry: None }));
        for _ in 0..loops.max(1) {
            tokio::spawn(commit_loop(applier.clone(), queue.clone()));
        }
        Self { tx }
    }

    /// Applies `op` (weighing about `bytes`) with whatever other writes are waiting, and
    /// answers once the transaction has committed.
    pub async fn apply(&self, op: A::Op, bytes: usize) -> Result<A::Answer> {
        let (reply, answer) = oneshot::channel();
        // Queued at once while there is room (nearly always): awaiting `send` polls a
        // semaphore future for every write.
        let job = match self.tx.try_send(Job { op, bytes, reply }) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(job)) => Some(job),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(Error::Unavailable("the server is shutting down".into()));
            }
        };
        if let Some(job) = job {
            self.tx
                .send(job)
                .await
                .map_err(|_| Error::Unavailable("the server is shutting down".into()))?;
        }
        answer
            .await
            .map_err(|_| Error::Unavailable("the write was dropped; send it again".into()))?
    }
}

async fn commit_loop<A: Apply>(applier: A, queue: Arc<Mutex<Queue<A>>>) {
    loop {
        let jobs = {
            let mut q = queue.lock().await;
            let first = match q.carry.take() {
                Some(job) => job,
                None => match q.rx.recv().await {
                    Some(job) => job,
                    None => return,
                },
            };
            let mut bytes = first.bytes;
            // Sized for what is waiting rather than grown one doubling at a time.
            let mut jobs = Vec::with_capacity(1 + q.rx.len().min(MAX_BATCH - 1));
            jobs.push(first);
            while jobs.len() < MAX_BATCH {
                let Ok(job) = q.rx.try_recv() else { break };
                if bytes + job.bytes > MAX_BATCH_BYTES {
                    q.carry = Some(job);
                    break;
                }
                bytes += job.bytes;
                jobs.push(job);
            }
            jobs
        };
        let (ops, replies): (Vec<A::Op>, Vec<_>) = jobs.into_iter().map(|j| (j.op, j.reply)).unzip();
        let started = std::time::Instant::now();
        let applied = applier.apply(&ops).await;
        tracing::debug!(
            writes = ops.len(),
            micros = started.elapsed().as_micros() as u64,
            "batch applied"
        );
        match applied {
            Ok(answers) => {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(answer);
                }
            }
            // The database is away (or kept rolling the batch back): every write may be sent
            // again.
            Err(Error::Unavailable(why)) => {
                for reply in replies {
                    let _ = reply.send(Err(Error::Unavailable(why.clone())));
                }
            }
            Err(e) if ops.len() == 1 => {
                if let Some(reply) = replies.into_iter().next() {
                    let _ = reply.send(Err(e));
                }
            }
            // One write the database refuses must not fail the others: apply them one by one.
            Err(e) => {
                tracing::warn!(error = %e, writes = ops.len(), "batch failed; applying its writes one by one");
                for (op, reply) in ops.into_iter().zip(replies) {
                    let answer = applier
                        .apply(std::slice::from_ref(&op))
                        .await
                        .and_then(|mut a| a.pop().unwrap_or_else(|| Err(Error::Internal("no answer".into()))));
                    let _ = reply.send(answer);
                }
            }
        }
    }
}

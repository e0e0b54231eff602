//! Group commit: worker reports that arrive at the same time are applied in one transaction.
//!
//! Every report (from the unary calls and from `Report`) is queued here; a few committer loops
//! each take whatever is queued (up to a bound), apply it with [`Store::apply_reports`] and
//! answer each report. While one transaction commits, the next batch gathers, so the number of
//! commits per second stays near what the database can do while the reports per commit grow
//! with the load. An idle server answers a lone report at once: there is no timer window.

use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

use crate::{
    error::{Error, Result},
    store::{Applied, Report, Store},
};

/// Most reports in one transaction.
const MAX_BATCH: usize = 1000;
/// A batch takes no more reports once their payloads weigh this much (the first is always
/// taken).
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Reports waiting for a committer before new ones wait to be queued.
const QUEUE: usize = 20_000;

struct Job {
    report: Report,
    bytes: usize,
    reply: oneshot::Sender<Result<Applied>>,
}

struct Queue {
    rx: mpsc::Receiver<Job>,
    /// A job taken from the channel that did not fit the previous batch.
    carry: Option<Job>,
}

/// The queue of reports and its committer loops.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer")
            .field("queued", &(QUEUE - self.tx.capacity()))
            .finish()
    }
}

impl Committer {
    /// Starts `loops` committer loops over `store`; they end when every `Committer` is dropped.
    pub fn start(store: Store, loops: usize) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let queue = Arc::new(Mutex::new(Queue { rx, carry: None }));
        for _ in 0..loops.max(1) {
            tokio::spawn(commit_loop(store.clone(), queue.clone()));
        }
        Self { tx }
    }

    /// Applies `report` (weighing about `bytes`) with whatever other reports are waiting, and
    /// answers once the transaction has committed.
    pub async fn apply(&self, report: Report, bytes: usize) -> Result<Applied> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Job { report, bytes, reply })
            .await
            .map_err(|_| Error::Unavailable("the server is shutting down".into()))?;
        answer
            .await
            .map_err(|_| Error::Unavailable("the report was dropped; send it again".into()))?
    }
}

async fn commit_loop(store: Store, queue: Arc<Mutex<Queue>>) {
    loop {
        let mut jobs = Vec::new();
        {
            let mut q = queue.lock().await;
            let first = match q.carry.take() {
                Some(job) => job,
                None => match q.rx.recv().await {
                    Some(job) => job,
                    None => return,
                },
            };
            let mut bytes = first.bytes;
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
        }
        let (reports, replies): (Vec<Report>, Vec<_>) = jobs.into_iter().map(|j| (j.report, j.reply)).unzip();
        match store.apply_reports(&reports).await {
            Ok(answers) => {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(answer);
                }
            }
            // The database is away (or kept rolling the batch back): every report may be sent
            // again.
            Err(Error::Unavailable(why)) => {
                for reply in replies {
                    let _ = reply.send(Err(Error::Unavailable(why.clone())));
                }
            }
            Err(e) if reports.len() == 1 => {
                if let Some(reply) = replies.into_iter().next() {
                    let _ = reply.send(Err(e));
                }
            }
            // One report the database refuses must not fail the others: apply them one by one.
            Err(e) => {
                tracing::warn!(error = %e, reports = reports.len(), "report batch failed; applying its reports one by one");
                for (report, reply) in reports.into_iter().zip(replies) {
                    let answer = store
                        .apply_reports(std::slice::from_ref(&report))
                        .await
                        .and_then(|mut a| a.pop().unwrap_or_else(|| Err(Error::Internal("no answer".into()))));
                    let _ = reply.send(answer);
                }
            }
        }
    }
}

//! Batched worker reports: the reports of every execution a worker runs travel together in
//! `Report` calls, many per call, instead of one call each.
//!
//! [`Reporter::send`] queues a report and waits for its own answer. A background task takes
//! whatever is queued (up to [`MAX_BATCH`] reports or [`MAX_BATCH_BYTES`]) and sends it as one
//! call, with at most [`MAX_IN_FLIGHT`] calls at once; while those are on their way the next
//! batch gathers. A lone report leaves at once: there is no timer window.

use std::sync::Arc;

use aiki::AuthChannel;
use aiki_proto::v1::{
    CompleteRunRequest, CompleteRunResponse, FailRunRequest, FailRunResponse, RecordTaskRequest, RecordTaskResponse,
    ReleaseRunRequest, ReleaseRunResponse, ReportRequest, RunReport, SuspendRunRequest, SuspendRunResponse,
    report_result, run_report, worker_service_client::WorkerServiceClient,
};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tonic::{Code, Status};

/// Most reports in one call (the server's limit).
pub(crate) const MAX_BATCH: usize = 1000;
/// A call takes no more reports once they weigh this much (the first is always taken).
pub(crate) const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Most `Report` calls on their way at once.
pub(crate) const MAX_IN_FLIGHT: usize = 4;

type Answer = Result<report_result::Result, Status>;

struct Pending {
    report: run_report::Report,
    bytes: usize,
    reply: oneshot::Sender<Answer>,
}

/// Sends reports in batches; cheap to clone. The batching task ends when the last clone is
/// dropped.
#[derive(Clone)]
pub(crate) struct Reporter {
    tx: mpsc::UnboundedSender<Pending>,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter").finish_non_exhaustive()
    }
}

impl Reporter {
    /// Starts the batching task (on the current Tokio runtime).
    pub(crate) fn new(client: WorkerServiceClient<AuthChannel>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(batch_loop(client, rx));
        Self { tx }
    }

    /// Sends one report with whatever others are waiting; returns its own answer, or the
    /// status that refused it (as the unary call would have).
    pub(crate) async fn send(&self, report: run_report::Report) -> Answer {
        let bytes = report.encoded_len();
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Pending { report, bytes, reply })
            .map_err(|_| Status::unavailable("the reporter has stopped"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("the report was dropped; send it again"))?
    }

    /// `RecordTask`, batched.
    pub(crate) async fn record_task(&self, req: RecordTaskRequest) -> Result<RecordTaskResponse, Status> {
        match self.send(run_report::Report::RecordTask(req)).await? {
            report_result::Result::RecordTask(r) => Ok(r),
            other => Err(mismatch(&other)),
        }
    }

    /// `CompleteRun`, batched.
    pub(crate) async fn complete_run(&self, req: CompleteRunRequest) -> Result<CompleteRunResponse, Status> {
        match self.send(run_report::Report::CompleteRun(req)).await? {
            report_result::Result::CompleteRun(r) => Ok(r),
            other => Err(mismatch(&other)),
        }
    }

    /// `FailRun`, batched.
    pub(crate) async fn fail_run(&self, req: FailRunRequest) -> Result<FailRunResponse, Status> {
        match self.send(run_report::Report::FailRun(req)).await? {
            report_result::Result::FailRun(r) => Ok(r),
            other => Err(mismatch(&other)),
        }
    }

    /// `ReleaseRun`, batched.
    pub(crate) async fn release_run(&self, req: ReleaseRunRequest) -> Result<ReleaseRunResponse, Status> {
        match self.send(run_report::Report::ReleaseRun(req)).await? {
            report_result::Result::ReleaseRun(r) => Ok(r),
            other => Err(mismatch(&other)),
        }
    }
}

impl Reporter {
    /// `SuspendRun`, batched.
    pub(crate) async fn suspend_run(&self, req: SuspendRunRequest) -> Result<SuspendRunResponse, Status> {
        match self.send(run_report::Report::SuspendRun(req)).await? {
            report_result::Result::SuspendRun(r) => Ok(r),
            other => Err(mismatch(&other)),
        }
    }
}

fn mismatch(got: &report_result::Result) -> Status {
    Status::internal(format!(
        "the server answered a report with an answer of another kind: {got:?}"
    ))
}

async fn batch_loop(client: WorkerServiceClient<AuthChannel>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut carry: Option<Pending> = None;
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let mut bytes = first.bytes;
        // Sized for what is waiting: growing a batch of 1,000 reports one doubling at a time
        // copied each report about twice on the way.
        let mut batch = Vec::with_capacity(1 + rx.len().min(MAX_BATCH - 1));
        batch.push(first);
        while batch.len() < MAX_BATCH {
            let Ok(p) = rx.try_recv() else { break };
            if bytes + p.bytes > MAX_BATCH_BYTES {
                carry = Some(p);
                break;
            }
            bytes += p.bytes;
            batch.push(p);
        }
        let mut client = client.clone();
        tokio::spawn(async move {
            let (reports, replies): (Vec<_>, Vec<_>) = batch
                .into_iter()
                .map(|p| (RunReport { report: Some(p.report) }, p.reply))
                .unzip();
            match client.report(ReportRequest { reports }).await {
                Ok(resp) => {
                    let mut results = resp.into_inner().results.into_iter();
                    for reply in replies {
                        let answer = match results.next().and_then(|r| r.result) {
                            Some(report_result::Result::Error(e)) => Err(Status::new(Code::from(e.code), e.message)),
                            Some(r) => Ok(r),
                            None => Err(Status::internal("the server left a report unanswered")),
                        };
                        let _ = reply.send(answer);
                    }
                }
                Err(status) => {
                    for reply in replies {
                        let _ = reply.send(Err(status.clone()));
                    }
                }
            }
            drop(permit);
        });
    }
}

//! `aiki.v1.WorkerService`: the lease protocol.

use std::sync::Arc;

use aiki_proto::v1::{
    CompleteRunRequest, CompleteRunResponse, FailRunRequest, FailRunResponse, HeartbeatRequest, HeartbeatResponse,
    PollTasksRequest, PollTasksResponse, RecordTaskRequest, RecordTaskResponse, RegisterWorkerRequest,
    RegisterWorkerResponse, ReleaseRunRequest, ReleaseRunResponse, ReportError, ReportRequest, ReportResponse,
    ReportResult, SuspendRunRequest, SuspendRunResponse, report_result, run_report,
    worker_service_server::WorkerService,
};
use prost::Message;
use tonic::{Request, Response, Status};
use tracing::instrument;
use uuid::Uuid;

use super::caller;
use crate::{
    engine::{
        Caller, Engine,
        requests::{Complete, Fail, Heartbeat, MAX_REPORTS, Poll, Record, Register, Release, Suspend},
    },
    error::{Error, Result},
    status::RunStatus,
};

#[derive(Debug, Clone)]
pub struct WorkerSvc(pub Arc<Engine>);

fn ids(ids: Vec<Uuid>) -> Vec<String> {
    ids.iter().map(Uuid::to_string).collect()
}

#[tonic::async_trait]
impl WorkerService for WorkerSvc {
    #[instrument(name = "rpc.RegisterWorker", skip_all, fields(identity = %req.get_ref().identity))]
    async fn register_worker(
        &self,
        req: Request<RegisterWorkerRequest>,
    ) -> Result<Response<RegisterWorkerResponse>, Status> {
        let register = Register::try_from(req.get_ref())?;
        let id = self.0.register(&caller(&req)?, register).await?;
        let c = &self.0.config;
        Ok(Response::new(RegisterWorkerResponse {
            worker_id: id.to_string(),
            lease_ttl: Some(aiki_proto::duration_to_proto(c.lease_ttl)),
            heartbeat_interval: Some(aiki_proto::duration_to_proto(c.heartbeat_interval)),
            max_poll_wait: Some(aiki_proto::duration_to_proto(c.max_poll_wait)),
        }))
    }

    #[instrument(name = "rpc.PollTasks", skip_all, fields(max = req.get_ref().max_runs))]
    async fn poll_tasks(&self, req: Request<PollTasksRequest>) -> Result<Response<PollTasksResponse>, Status> {
        let poll = Poll::try_from(req.get_ref())?;
        let runs = self.0.poll(&caller(&req)?, poll).await?;
        Ok(Response::new(PollTasksResponse { runs }))
    }

    #[instrument(name = "rpc.Heartbeat", skip_all, fields(leases = req.get_ref().leases.len()))]
    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        let beat = Heartbeat::try_from(req.get_ref())?;
        let a = self.0.heartbeat(&caller(&req)?, beat).await?;
        Ok(Response::new(HeartbeatResponse {
            lost_run_ids: ids(a.lost),
            ended_run_ids: ids(a.ended),
            cancel_run_ids: ids(a.cancel),
            pause_run_ids: ids(a.pause),
            lease_expires_at: Some(a.expires.into()),
        }))
    }

    #[instrument(name = "rpc.RecordTask", skip_all)]
    async fn record_task(&self, req: Request<RecordTaskRequest>) -> Result<Response<RecordTaskResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(record(&self.0, &who, req.into_inner()).await?))
    }

    #[instrument(name = "rpc.CompleteRun", skip_all)]
    async fn complete_run(&self, req: Request<CompleteRunRequest>) -> Result<Response<CompleteRunResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(complete(&self.0, &who, req.into_inner()).await?))
    }

    #[instrument(name = "rpc.FailRun", skip_all)]
    async fn fail_run(&self, req: Request<FailRunRequest>) -> Result<Response<FailRunResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(fail(&self.0, &who, req.into_inner()).await?))
    }

    #[instrument(name = "rpc.ReleaseRun", skip_all)]
    async fn release_run(&self, req: Request<ReleaseRunRequest>) -> Result<Response<ReleaseRunResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(release(&self.0, &who, req.into_inner()).await?))
    }

    #[instrument(name = "rpc.SuspendRun", skip_all)]
    async fn suspend_run(&self, req: Request<SuspendRunRequest>) -> Result<Response<SuspendRunResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(suspend(&self.0, &who, req.into_inner()).await?))
    }

    #[instrument(name = "rpc.Report", skip_all, fields(reports = req.get_ref().reports.len()))]
    async fn report(&self, req: Request<ReportRequest>) -> Result<Response<ReportResponse>, Status> {
        let who = caller(&req)?;
        let req = req.into_inner();
        if req.reports.is_empty() || req.reports.len() > MAX_REPORTS {
            return Err(Error::InvalidArgument(format!(
                "a Report call carries 1 to {MAX_REPORTS} reports, got {}",
                req.reports.len()
            ))
            .into());
        }
        let (engine, who) = (&self.0, &who);
        // All reports are queued for the committer at once, so they share its transactions.
        // The other kinds are boxed, so that the future of each report (a completion, nearly
        // always) stays small: join_all moves every one of them.
        let answers = futures::future::join_all(req.reports.into_iter().map(|r| async move {
            let answer = match r.report {
                Some(run_report::Report::CompleteRun(r)) => {
                    complete(engine, who, r).await.map(report_result::Result::CompleteRun)
                }
                Some(run_report::Report::RecordTask(r)) => Box::pin(record(engine, who, r))
                    .await
                    .map(report_result::Result::RecordTask),
                Some(run_report::Report::FailRun(r)) => {
                    Box::pin(fail(engine, who, r)).await.map(report_result::Result::FailRun)
                }
                Some(run_report::Report::ReleaseRun(r)) => Box::pin(release(engine, who, r))
                    .await
                    .map(report_result::Result::ReleaseRun),
                Some(run_report::Report::SuspendRun(r)) => Box::pin(suspend(engine, who, r))
                    .await
                    .map(report_result::Result::SuspendRun),
                None => Err(Error::InvalidArgument(
                    "a report must be one of record_task, complete_run, fail_run, release_run, suspend_run".into(),
                )),
            };
            let result = answer.unwrap_or_else(|e| {
                let status = Status::from(e);
                report_result::Result::Error(ReportError {
                    code: status.code() as i32,
                    message: status.message().to_owned(),
                })
            });
            ReportResult { result: Some(result) }
        }))
        .await;
        Ok(Response::new(ReportResponse { results: answers }))
    }
}

async fn record(engine: &Engine, who: &Caller, req: RecordTaskRequest) -> Result<RecordTaskResponse> {
    let bytes = req.encoded_len();
    let record = Record::try_from(&req)?;
    let task = req.task.unwrap_or_default();
    let (task, recorded) = engine.record(who, record, task, bytes).await?;
    Ok(RecordTaskResponse {
        task: Some(task),
        recorded,
    })
}

async fn complete(engine: &Engine, who: &Caller, req: CompleteRunRequest) -> Result<CompleteRunResponse> {
    let bytes = req.encoded_len();
    engine.complete(who, Complete::try_from(&req)?, bytes).await?;
    Ok(CompleteRunResponse {})
}

async fn fail(engine: &Engine, who: &Caller, req: FailRunRequest) -> Result<FailRunResponse> {
    let bytes = req.encoded_len();
    let run = engine.fail(who, Fail::try_from(&req)?, bytes).await?;
    Ok(FailRunResponse {
        status: run.status,
        retry_at: if RunStatus::from_proto(run.status) == Some(RunStatus::Queued) {
            run.visible_at
        } else {
            None
        },
    })
}

async fn release(engine: &Engine, who: &Caller, req: ReleaseRunRequest) -> Result<ReleaseRunResponse> {
    let bytes = req.encoded_len();
    let run = engine.release(who, Release::try_from(&req)?, bytes).await?;
    Ok(ReleaseRunResponse { status: run.status })
}

async fn suspend(engine: &Engine, who: &Caller, req: SuspendRunRequest) -> Result<SuspendRunResponse> {
    let bytes = req.encoded_len();
    let run = engine.suspend(who, Suspend::try_from(&req)?, bytes).await?;
    Ok(SuspendRunResponse {
        status: run.status,
        wake_at: run.wake_at,
    })
}

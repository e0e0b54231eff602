//! `aiki.v1.WorkflowService`: starting runs and reading them.

use std::{pin::Pin, sync::Arc};

use aiki_proto::v1::{
    CancelRunRequest, GetRunHistoryRequest, GetRunHistoryResponse, GetRunRequest, GetRunResultRequest,
    GetRunResultResponse, HistoryEvent, ListRunsRequest, ListRunsResponse, PauseRunRequest, ResumeRunRequest, Run,
    SendEventRequest, SendEventResponse, StartRunRequest, StartRunResponse, StartRunsRequest, StartRunsResponse,
    WakeRunRequest, WatchRunRequest, workflow_service_server::WorkflowService,
};
use futures::{Stream, StreamExt};
use prost::Message;
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::caller;
use crate::{
    engine::{
        Engine,
        requests::{AwaitResult, ListRuns, RunId, RunSelector, SendEvent, StartRun, WithReason},
        runs::Started,
    },
    error::{Error, Result},
};

/// Most runs in one `StartRuns`.
const MAX_BATCH: usize = 1000;

#[derive(Debug, Clone)]
pub struct WorkflowSvc(pub Arc<Engine>);

fn started(s: Started) -> StartRunResponse {
    StartRunResponse {
        run: Some(s.run),
        created: s.created,
    }
}

#[tonic::async_trait]
impl WorkflowService for WorkflowSvc {
    #[instrument(name = "rpc.StartRun", skip_all, fields(workflow = %req.get_ref().workflow))]
    async fn start_run(&self, req: Request<StartRunRequest>) -> Result<Response<StartRunResponse>, Status> {
        let bytes = req.get_ref().encoded_len();
        let start = StartRun::try_from(req.get_ref())?;
        let s = self.0.start(&caller(&req)?, start, bytes).await?;
        Ok(Response::new(started(s)))
    }

    #[instrument(name = "rpc.StartRuns", skip_all, fields(count = req.get_ref().runs.len()))]
    async fn start_runs(&self, req: Request<StartRunsRequest>) -> Result<Response<StartRunsResponse>, Status> {
        let runs = &req.get_ref().runs;
        if runs.is_empty() || runs.len() > MAX_BATCH {
            return Err(
                Error::InvalidArgument(format!("StartRuns takes 1 to {MAX_BATCH} runs, got {}", runs.len())).into(),
            );
        }
        let starts = runs
            .iter()
            .enumerate()
            .map(|(i, r)| StartRun::try_from(r).map_err(|e| e.within(&format!("runs[{i}]"))))
            .collect::<Result<Vec<_>>>()?;
        let results = self.0.start_many(&caller(&req)?, starts).await?;
        Ok(Response::new(StartRunsResponse {
            results: results.into_iter().map(started).collect(),
        }))
    }

    #[instrument(name = "rpc.GetRun", skip_all)]
    async fn get_run(&self, req: Request<GetRunRequest>) -> Result<Response<Run>, Status> {
        let sel = RunSelector::try_from(req.get_ref())?;
        Ok(Response::new(self.0.get(&caller(&req)?, sel).await?))
    }

    #[instrument(name = "rpc.GetRunResult", skip_all)]
    async fn get_run_result(
        &self,
        req: Request<GetRunResultRequest>,
    ) -> Result<Response<GetRunResultResponse>, Status> {
        let wait = AwaitResult::try_from(req.get_ref())?;
        let (run, done) = self.0.result(&caller(&req)?, wait).await?;
        Ok(Response::new(GetRunResultResponse { run: Some(run), done }))
    }

    #[instrument(name = "rpc.ListRuns", skip_all)]
    async fn list_runs(&self, req: Request<ListRunsRequest>) -> Result<Response<ListRunsResponse>, Status> {
        let list = ListRuns::try_from(req.get_ref())?;
        let page = self.0.list(&caller(&req)?, list).await?;
        Ok(Response::new(ListRunsResponse {
            runs: page.runs,
            next_page_token: page.next_page_token,
        }))
    }

    #[instrument(name = "rpc.CancelRun", skip_all)]
    async fn cancel_run(&self, req: Request<CancelRunRequest>) -> Result<Response<Run>, Status> {
        let cancel = WithReason::try_from(req.get_ref())?;
        Ok(Response::new(self.0.cancel(&caller(&req)?, cancel).await?))
    }

    #[instrument(name = "rpc.PauseRun", skip_all)]
    async fn pause_run(&self, req: Request<PauseRunRequest>) -> Result<Response<Run>, Status> {
        let pause = WithReason::try_from(req.get_ref())?;
        Ok(Response::new(self.0.pause(&caller(&req)?, pause).await?))
    }

    #[instrument(name = "rpc.WakeRun", skip_all)]
    async fn wake_run(&self, req: Request<WakeRunRequest>) -> Result<Response<Run>, Status> {
        let run = RunId::try_from(req.get_ref())?;
        Ok(Response::new(self.0.wake(&caller(&req)?, run).await?))
    }

    #[instrument(name = "rpc.SendEvent", skip_all)]
    async fn send_event(&self, req: Request<SendEventRequest>) -> Result<Response<SendEventResponse>, Status> {
        let event = SendEvent::try_from(req.get_ref())?;
        let sent = self.0.send_event(&caller(&req)?, event).await?;
        Ok(Response::new(SendEventResponse {
            stored: sent.stored,
            delivered: sent.delivered,
            run: Some(sent.run),
        }))
    }

    #[instrument(name = "rpc.ResumeRun", skip_all)]
    async fn resume_run(&self, req: Request<ResumeRunRequest>) -> Result<Response<Run>, Status> {
        let run = RunId::try_from(req.get_ref())?;
        Ok(Response::new(self.0.resume(&caller(&req)?, run).await?))
    }

    #[instrument(name = "rpc.GetRunHistory", skip_all)]
    async fn get_run_history(
        &self,
        req: Request<GetRunHistoryRequest>,
    ) -> Result<Response<GetRunHistoryResponse>, Status> {
        let run = RunId::try_from(req.get_ref())?;
        let (events, more) = self.0.history(&caller(&req)?, run, req.get_ref().after_seq).await?;
        Ok(Response::new(GetRunHistoryResponse { events, more }))
    }

    type WatchRunStream = Pin<Box<dyn Stream<Item = Result<HistoryEvent, Status>> + Send + 'static>>;

    #[instrument(name = "rpc.WatchRun", skip_all)]
    async fn watch_run(&self, req: Request<WatchRunRequest>) -> Result<Response<Self::WatchRunStream>, Status> {
        let run = RunId::try_from(req.get_ref())?;
        let events = self.0.watch(&caller(&req)?, run, req.get_ref().after_seq).await?;
        let stream = events.map(|e| e.map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }
}

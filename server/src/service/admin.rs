//! `aiki.v1.AdminService`: workers and queues, for operators.

use std::sync::Arc;

use aiki_proto::v1::{
    ListQueuesRequest, ListQueuesResponse, ListWorkersRequest, ListWorkersResponse, ListWorkflowsRequest,
    ListWorkflowsResponse, admin_service_server::AdminService,
};
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::caller;
use crate::engine::Engine;

#[derive(Debug, Clone)]
pub struct AdminSvc(pub Arc<Engine>);

#[tonic::async_trait]
impl AdminService for AdminSvc {
    #[instrument(name = "rpc.ListWorkers", skip_all)]
    async fn list_workers(&self, req: Request<ListWorkersRequest>) -> Result<Response<ListWorkersResponse>, Status> {
        let workers = self.0.list_workers(&caller(&req), &req.get_ref().namespace).await?;
        Ok(Response::new(ListWorkersResponse { workers }))
    }

    #[instrument(name = "rpc.ListQueues", skip_all)]
    async fn list_queues(&self, req: Request<ListQueuesRequest>) -> Result<Response<ListQueuesResponse>, Status> {
        let queues = self.0.list_queues(&caller(&req), &req.get_ref().namespace).await?;
        Ok(Response::new(ListQueuesResponse { queues }))
    }

    #[instrument(name = "rpc.ListWorkflows", skip_all)]
    async fn list_workflows(
        &self,
        req: Request<ListWorkflowsRequest>,
    ) -> Result<Response<ListWorkflowsResponse>, Status> {
        let workflows = self.0.list_workflows(&caller(&req), &req.get_ref().namespace).await?;
        Ok(Response::new(ListWorkflowsResponse { workflows }))
    }
}

//! `aiki.v1.AdminService`: workers, queues and API keys, for operators.

use std::sync::Arc;

use aiki_proto::v1::{
    ApiKey, CreateApiKeyRequest, CreateApiKeyResponse, ListApiKeysRequest, ListApiKeysResponse, ListQueuesRequest,
    ListQueuesResponse, ListWorkersRequest, ListWorkersResponse, ListWorkflowsRequest, ListWorkflowsResponse,
    RevokeApiKeyRequest, admin_service_server::AdminService,
};
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::caller;
use crate::engine::{Engine, keys::NewKey};

#[derive(Debug, Clone)]
pub struct AdminSvc(pub Arc<Engine>);

#[tonic::async_trait]
impl AdminService for AdminSvc {
    #[instrument(name = "rpc.ListWorkers", skip_all)]
    async fn list_workers(&self, req: Request<ListWorkersRequest>) -> Result<Response<ListWorkersResponse>, Status> {
        let workers = self.0.list_workers(&caller(&req)?, &req.get_ref().namespace).await?;
        Ok(Response::new(ListWorkersResponse { workers }))
    }

    #[instrument(name = "rpc.ListQueues", skip_all)]
    async fn list_queues(&self, req: Request<ListQueuesRequest>) -> Result<Response<ListQueuesResponse>, Status> {
        let queues = self.0.list_queues(&caller(&req)?, &req.get_ref().namespace).await?;
        Ok(Response::new(ListQueuesResponse { queues }))
    }

    #[instrument(name = "rpc.ListWorkflows", skip_all)]
    async fn list_workflows(
        &self,
        req: Request<ListWorkflowsRequest>,
    ) -> Result<Response<ListWorkflowsResponse>, Status> {
        let workflows = self.0.list_workflows(&caller(&req)?, &req.get_ref().namespace).await?;
        Ok(Response::new(ListWorkflowsResponse { workflows }))
    }

    #[instrument(name = "rpc.CreateApiKey", skip_all)]
    async fn create_api_key(
        &self,
        req: Request<CreateApiKeyRequest>,
    ) -> Result<Response<CreateApiKeyResponse>, Status> {
        let new = NewKey::try_from(req.get_ref())?;
        let (key, secret) = self.0.create_key(&caller(&req)?, new).await?;
        Ok(Response::new(CreateApiKeyResponse { key: Some(key), secret }))
    }

    #[instrument(name = "rpc.ListApiKeys", skip_all)]
    async fn list_api_keys(&self, req: Request<ListApiKeysRequest>) -> Result<Response<ListApiKeysResponse>, Status> {
        let keys = self.0.list_keys(&caller(&req)?, req.get_ref().include_revoked).await?;
        Ok(Response::new(ListApiKeysResponse { keys }))
    }

    #[instrument(name = "rpc.RevokeApiKey", skip_all)]
    async fn revoke_api_key(&self, req: Request<RevokeApiKeyRequest>) -> Result<Response<ApiKey>, Status> {
        Ok(Response::new(
            self.0.revoke_key(&caller(&req)?, &req.get_ref().id).await?,
        ))
    }
}

//! Server reflection (v1 and v1alpha) lists every service, and the health service answers.

use aiki_tests::{TestDb, TestServer};
use futures::StreamExt;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
use tonic_reflection::pb::{v1, v1alpha};

const SERVICES: [&str; 5] = [
    "aiki.v1.AdminService",
    "aiki.v1.WorkerService",
    "aiki.v1.WorkflowService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
];

#[tokio::test]
async fn reflection_lists_every_service() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let channel = server.channel().await;

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::once(req))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) = resp.message_response
    else {
        panic!("unexpected reflection answer {resp:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in SERVICES {
        assert!(names.iter().any(|n| n == s), "{s} missing from {names:?}");
    }

    // The descriptor of a message, as `grpcurl describe` asks for it.
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::FileContainingSymbol(
            "aiki.v1.StartRunRequest".into(),
        )),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::once(req))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    assert!(
        matches!(resp.message_response, Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()),
        "{resp:?}"
    );

    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = alpha
        .server_reflection_info(tokio_stream::once(req))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) = resp.message_response
    else {
        panic!("unexpected v1alpha answer");
    };
    assert!(list.service.iter().any(|s| s.name == "aiki.v1.WorkflowService"));

    let mut health = HealthClient::new(channel);
    let status = health
        .check(HealthCheckRequest {
            service: "aiki.v1.WorkflowService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
}

//! No answer grows without bound: a page of history or of runs holds a bounded number of bytes
//! of payloads, whatever the runs hold, and the pages still give everything, in order.

use std::time::Duration;

use aiki_proto::v1::{FailRunRequest, GetRunHistoryRequest, ListRunsRequest, RetryPolicy, RunError};
use aiki_tests::{RawWorker, TestDb, TestServer, start_req};
use prost::Message;
use serde_json::json;

/// The most a page may hold past its first item: the server's 2 MB budget of payloads, and
/// room for the rest of each message.
const PAGE_BOUND: usize = 3 * 1024 * 1024;

fn megabyte(tag: usize) -> serde_json::Value {
    json!({"tag": tag, "blob": "x".repeat(1024 * 1024)})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_of_large_events_comes_in_bounded_pages() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let mut wf = server.workflows().await;
    let mut req = start_req("flaky", json!({}));
    req.retry_policy = Some(RetryPolicy {
        max_attempts: 6,
        initial_interval: Some(aiki_proto::duration_to_proto(Duration::from_millis(1))),
        ..Default::default()
    });
    let id = aiki_tests::start_id(&mut wf, req).await;
    // Six failures, each with 1 MB of details: each is recorded twice in the history (the
    // retry scheduled, or the run failed), so it holds about 6 MB.
    let w = RawWorker::register(&server, &["default"]).await;
    for attempt in 0..6 {
        let lease = w.poll(1, Duration::from_secs(10)).await.pop().expect("the run again");
        w.client
            .clone()
            .fail_run(FailRunRequest {
                namespace: String::new(),
                run_id: id.clone(),
                lease_token: lease.lease_token,
                error: Some(RunError {
                    r#type: "Flaky".into(),
                    message: "again".into(),
                    details: Some(aiki_proto::json_to_value(&megabyte(attempt))),
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let (mut after, mut pages, mut seqs) = (0, 0, Vec::new());
    loop {
        let page = wf
            .get_run_history(GetRunHistoryRequest {
                namespace: String::new(),
                run_id: id.clone(),
                after_seq: after,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(!page.events.is_empty(), "a page that says more has events");
        assert!(
            page.encoded_len() <= PAGE_BOUND + page.events[0].encoded_len(),
            "page {pages} is {} bytes",
            page.encoded_len()
        );
        seqs.extend(page.events.iter().map(|e| e.seq));
        after = page.events.last().unwrap().seq;
        if !page.more {
            break;
        }
    }
    assert!(pages >= 3, "about 6 MB of events took {pages} pages");
    let mut sorted = seqs.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seqs, sorted, "every event once, in order");
    let all: i64 = db
        .connect()
        .await
        .query_one(
            "SELECT count(*) FROM run_history WHERE run_id = $1",
            &[&uuid::Uuid::parse_str(&id).unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(seqs.len() as i64, all, "the pages together hold the whole history");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_with_large_inputs_are_listed_in_bounded_pages() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let mut wf = server.workflows().await;
    let mut started = Vec::new();
    for i in 0..6 {
        started.push(aiki_tests::start_id(&mut wf, start_req("big", megabyte(i))).await);
    }
    let (mut token, mut listed, mut pages) = (String::new(), Vec::new(), 0);
    loop {
        let page = wf
            .list_runs(ListRunsRequest {
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(
            page.encoded_len() <= PAGE_BOUND + page.runs.first().map_or(0, |r| r.encoded_len()),
            "page {pages} is {} bytes",
            page.encoded_len()
        );
        listed.extend(page.runs.iter().map(|r| r.id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert!(pages >= 3, "6 MB of inputs took {pages} pages");
    started.reverse();
    assert_eq!(listed, started, "every run once, newest first");
}

/// Lists that scan a namespace (here `ListQueues` over 50,000 runs) may hold only a quarter of
/// the pool: a burst of 300 of them leaves reads of single runs and the lease protocol their
/// connections, where it once held every connection for seconds and made other calls fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_lists_leaves_the_pool_to_reads_and_reports() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let mut wf = server.workflows().await;
    for _ in 0..50 {
        let runs = (0..1000).map(|_| start_req("many", json!({}))).collect();
        wf.start_runs(aiki_proto::v1::StartRunsRequest { runs }).await.unwrap();
    }
    let probe = aiki_tests::start_id(&mut wf, start_req("probe", json!({}))).await;
    let admin = aiki_proto::v1::admin_service_client::AdminServiceClient::new(server.channel().await);
    let storm_started = std::time::Instant::now();
    let storm: Vec<_> = (0..300)
        .map(|_| {
            let mut admin = admin.clone();
            tokio::spawn(async move { admin.list_queues(aiki_proto::v1::ListQueuesRequest::default()).await })
        })
        .collect();
    // While the lists run, single reads go through at once, one after another.
    let mut slowest = Duration::ZERO;
    let mut reads = 0;
    while !storm.iter().all(|t| t.is_finished()) {
        let started = std::time::Instant::now();
        wf.get_run(aiki_proto::v1::GetRunRequest {
            namespace: String::new(),
            r#ref: Some(aiki_proto::v1::get_run_request::Ref::RunId(probe.clone())),
        })
        .await
        .expect("a read during the lists");
        slowest = slowest.max(started.elapsed());
        reads += 1;
    }
    let storm_took = storm_started.elapsed();
    // Each list is answered, or refused as too many at once: a clear error to retry later.
    let mut answered = 0;
    for t in storm {
        match t.await.unwrap() {
            Ok(_) => answered += 1,
            Err(e) => assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{}", e.message()),
        }
    }
    eprintln!(
        "{reads} reads during a storm of {storm_took:?}; the slowest took {slowest:?}; {answered} lists answered"
    );
    assert!(answered > 0);
    assert!(
        reads >= 3,
        "the storm lasted long enough to measure: {reads} reads in {storm_took:?}"
    );
    assert!(
        slowest * 4 < storm_took,
        "a read waited {slowest:?} during a storm of {storm_took:?}"
    );
}

//! What clients cannot make the server hold: half-open connections are closed after the
//! handshake timeout, connections past the cap are closed at once, a client that does not read
//! holds a bounded amount of the server's memory and its watch is ended, and the watchers of a
//! run share one reader.

use std::{
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aiki_proto::v1::{
    FailRunRequest, GetRunHistoryRequest, HistoryEvent, RetryPolicy, RunError, WatchRunRequest,
    workflow_service_client::WorkflowServiceClient,
};
use aiki_tests::{RawWorker, TestDb, TestEnv, TestServer, bin, start_req};
use bytes::{Buf, Bytes};
use futures::StreamExt;
use prost::Message;
use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};

/// Waits until the server closes `sock` (EOF or reset), opened at `started`, and answers how
/// long after its opening that was.
async fn closed_within(sock: &mut TcpStream, started: Instant, limit: Duration) -> Duration {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::from_std(started + limit);
    loop {
        match tokio::time::timeout_at(deadline, sock.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            // The server's own preface (SETTINGS), if it got that far: keep reading.
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the server did not close the connection within {limit:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_are_closed_after_the_handshake_timeout() {
    let timeout = Duration::from_secs(1);
    let env = TestEnv::with_config(|c| c.handshake_timeout = timeout).await;
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let opened = Instant::now();
    let mut silent = TcpStream::connect(env.server.addr).await.unwrap();
    let mut half = TcpStream::connect(env.server.addr).await.unwrap();
    half.write_all(&preface[..12]).await.unwrap();
    // The magic, but not the SETTINGS frame that completes the preface.
    let mut magic_only = TcpStream::connect(env.server.addr).await.unwrap();
    magic_only.write_all(preface).await.unwrap();
    for (name, sock) in [
        ("silent", &mut silent),
        ("half", &mut half),
        ("magic only", &mut magic_only),
    ] {
        let took = closed_within(sock, opened, timeout + Duration::from_secs(3)).await;
        assert!(
            took >= timeout - Duration::from_millis(200),
            "the {name} connection was closed after {took:?}, before the handshake timeout"
        );
    }
    // Real clients are served meanwhile and after.
    env.client.queues().await.expect("a real client is served");
}

/// A raw gRPC connection without retries: fails at once when the server closes it.
async fn raw_client(server: &TestServer) -> Result<WorkflowServiceClient<tonic::transport::Channel>, String> {
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut client = WorkflowServiceClient::new(channel);
    served(&mut client).await?;
    Ok(client)
}

async fn served(client: &mut WorkflowServiceClient<tonic::transport::Channel>) -> Result<(), String> {
    client
        .list_runs(aiki_proto::v1::ListRunsRequest::default())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_new_connections_are_closed_until_some_close() {
    let cap = 4;
    let env = TestEnv::with_config(|c| c.max_client_connections = cap).await;
    // Fill the cap (the environment's own client holds one, and the server's start-up probe
    // may still hold another while it closes).
    let mut held = Vec::new();
    let refusal = loop {
        match raw_client(&env.server).await {
            Ok(c) => held.push(c),
            Err(e) => break e,
        }
        assert!(
            held.len() < cap,
            "{} connections were served past a cap of {cap}",
            held.len() + 1
        );
    };
    assert!(
        held.len() >= cap - 2,
        "only {} connections were served under a cap of {cap}",
        held.len()
    );
    eprintln!("connection past the cap: {refusal}");
    // A socket past the cap is closed at once, not after the handshake timeout (10 s).
    let mut sock = TcpStream::connect(env.server.addr).await.unwrap();
    closed_within(&mut sock, Instant::now(), Duration::from_secs(3)).await;
    // The clients inside the cap are still served.
    for c in &mut held {
        served(c).await.expect("a client inside the cap");
    }
    // One closes: a new client is served again.
    held.pop();
    aiki_tests::eventually(Duration::from_secs(10), "a new connection is served", || async {
        raw_client(&env.server).await.is_ok()
    })
    .await;
}

/// `aiki-server` as a process, its log lines collected.
struct ServerProc {
    child: tokio::process::Child,
    addr: String,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl ServerProc {
    async fn start(db: &TestDb, args: &[&str]) -> Self {
        let mut child = tokio::process::Command::new(bin("aiki-server"))
            .args(["--listen", "127.0.0.1:0", "--no-auth"])
            .args(args)
            .env("AIKI_DATABASE_URL", &db.url)
            .env("AIKI_LOG", "info,aiki_server::engine::watch=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn aiki-server");
        let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
        let mut r = BufReader::new(child.stderr.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = r.next_line().await {
                let _ = tx.send(line);
            }
        });
        let addr = loop {
            let line = tokio::time::timeout(Duration::from_secs(30), lines.recv())
                .await
                .expect("aiki-server started")
                .expect("aiki-server is running");
            if let Some(rest) = line.split("addr=").nth(1) {
                break rest.split_whitespace().next().unwrap().to_owned();
            }
        };
        Self { child, addr, lines }
    }

    /// The server's resident memory, in bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id().unwrap())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS");
        kb * 1024
    }
}

/// A gRPC request's body: one message, length-prefixed.
fn grpc_body(m: &impl Message) -> Bytes {
    let mut out = vec![0u8];
    out.extend_from_slice(&(m.encoded_len() as u32).to_be_bytes());
    m.encode(&mut out).unwrap();
    out.into()
}

fn grpc_request(addr: &str, method: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/aiki.v1.WorkflowService/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_holds_bounded_memory_and_its_watch_is_ended() {
    let db = TestDb::new().await;
    let mut server = ServerProc::start(&db, &["--slow-reader-timeout", "3s"]).await;
    let url = format!("http://{}", server.addr);
    let channel = aiki::connect_channel(url.clone()).await.unwrap();
    let mut wf = WorkflowServiceClient::new(channel.clone());
    // A history of about 50 MB: 25 failures with 1 MB of details each, each recorded twice.
    let mut req = start_req("big-history", json!({}));
    req.retry_policy = Some(RetryPolicy {
        max_attempts: 26,
        initial_interval: Some(aiki_proto::duration_to_proto(Duration::from_millis(1))),
        max_interval: Some(aiki_proto::duration_to_proto(Duration::from_millis(1))),
        ..Default::default()
    });
    let id = aiki_tests::start_id(&mut wf, req).await;
    let mut worker = aiki_proto::v1::worker_service_client::WorkerServiceClient::new(channel.clone());
    let worker_id = worker
        .register_worker(aiki_proto::v1::RegisterWorkerRequest {
            identity: "slow-reader-test".into(),
            workflows: vec![aiki_proto::v1::WorkflowRef {
                name: "*".into(),
                version: String::new(),
            }],
            queues: vec!["default".into()],
            slots: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    let raw = RawWorker {
        id: worker_id,
        client: worker,
    };
    for attempt in 0..25 {
        let lease = raw
            .poll(1, Duration::from_secs(10))
            .await
            .pop()
            .unwrap_or_else(|| panic!("the run again for attempt {attempt}"));
        raw.client
            .clone()
            .fail_run(FailRunRequest {
                run_id: id.clone(),
                lease_token: lease.lease_token,
                error: Some(RunError {
                    r#type: "Big".into(),
                    message: "again".into(),
                    details: Some(aiki_proto::json_to_value(
                        &json!({"attempt": attempt, "blob": "x".repeat(1024 * 1024)}),
                    )),
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    drop((raw, wf, channel));
    let baseline = server.rss();

    // One connection that reads nothing: a tiny window, bodies never polled.
    let tcp = TcpStream::connect(&server.addr).await.unwrap();
    let (h2, conn) = h2::client::Builder::new()
        .initial_window_size(1024)
        .initial_connection_window_size(1024)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut h2 = h2.ready().await.unwrap();
    let (streams_each, mut answers) = (20, Vec::new());
    for i in 0..streams_each * 2 {
        let (method, body) = if i % 2 == 0 {
            (
                "WatchRun",
                grpc_body(&WatchRunRequest {
                    run_id: id.clone(),
                    ..Default::default()
                }),
            )
        } else {
            (
                "GetRunHistory",
                grpc_body(&GetRunHistoryRequest {
                    run_id: id.clone(),
                    ..Default::default()
                }),
            )
        };
        h2 = h2.ready().await.unwrap();
        let (answer, mut send) = h2.send_request(grpc_request(&server.addr, method), false).unwrap();
        send.send_data(body, true).unwrap();
        answers.push(answer);
    }
    let mut responses = Vec::new();
    for a in answers {
        responses.push(a.await.expect("response headers"));
    }

    // Every watch is ended for reading too slowly; memory stays bounded meanwhile.
    let bound = 300 * 1024 * 1024;
    let mut peak = server.rss();
    let mut ended = 0;
    let mut lines = std::mem::replace(&mut server.lines, tokio::sync::mpsc::unbounded_channel().1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut sample = tokio::time::interval(Duration::from_millis(100));
    while ended < streams_each {
        tokio::select! {
            line = lines.recv() => {
                if line.expect("the server runs").contains("read too slowly") {
                    ended += 1;
                }
            }
            _ = sample.tick() => peak = peak.max(server.rss()),
            _ = tokio::time::sleep_until(deadline) => panic!("{ended} of {streams_each} watches ended within 60 s"),
        }
    }
    peak = peak.max(server.rss());
    eprintln!(
        "baseline {} MB, peak {} MB with {streams_each} watches and {streams_each} history reads never read",
        baseline >> 20,
        peak >> 20
    );
    assert!(
        peak < baseline + bound,
        "the server grew from {} MB to {} MB for a client that reads nothing",
        baseline >> 20,
        peak >> 20
    );

    // A watch, read now, gives what was buffered, then says it was ended.
    // The other calls go (their buffered data would take the connection's window).
    let mut watch = responses.swap_remove(0).into_body();
    drop(responses);
    let mut data = bytes::BytesMut::new();
    while let Some(chunk) = watch.data().await {
        let chunk = chunk.unwrap();
        let _ = watch.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = watch.trailers().await.unwrap().expect("trailers");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.to_str().unwrap().to_owned()),
        Some((tonic::Code::ResourceExhausted as i32).to_string()),
        "{trailers:?}"
    );
    let mut data = data.freeze();
    let mut events = 0;
    while data.remaining() >= 5 {
        data.advance(1);
        let len = data.get_u32() as usize;
        HistoryEvent::decode(data.split_to(len)).unwrap();
        events += 1;
    }
    assert!(
        events < 50,
        "the ended watch gave {events} events, not the whole history"
    );
}

/// A TCP proxy to PostgreSQL that counts the statements sent through it (their Sync messages).
async fn counting_proxy(to: String) -> (u16, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let syncs = Arc::new(AtomicU64::new(0));
    let count = syncs.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (to, count) = (to.clone(), count.clone());
            tokio::spawn(async move {
                let server = TcpStream::connect(&to).await.unwrap();
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move { tokio::io::copy(&mut sr, &mut cw).await });
                // The frontend's messages: untyped ones (SSL request, start-up) until the
                // start-up message, then a type byte and a length each.
                let mut buf = bytes::BytesMut::new();
                let mut started = false;
                loop {
                    let mut chunk = [0u8; 16 * 1024];
                    let n = match cr.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if sw.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    loop {
                        let head = if started { 5 } else { 8 };
                        if buf.len() < head {
                            break;
                        }
                        let (kind, len) = if started {
                            (
                                buf[0],
                                u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize + 1,
                            )
                        } else {
                            (0, u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize)
                        };
                        if buf.len() < len {
                            break;
                        }
                        if !started && u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) == 196_608 {
                            started = true;
                        }
                        if started && kind == b'S' {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        buf.advance(len);
                    }
                }
            });
        }
    });
    (port, syncs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_of_one_run_share_one_reader() {
    let db = TestDb::new().await;
    let admin: tokio_postgres::Config = aiki_tests::admin_url().parse().unwrap();
    let host = match admin.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    let pg_port = admin.get_ports().first().copied().unwrap_or(5432);
    let (port, statements) = counting_proxy(format!("{host}:{pg_port}")).await;
    let mut url = format!("host=127.0.0.1 port={port} dbname={}", db.name);
    if let Some(u) = admin.get_user() {
        url.push_str(&format!(" user={u}"));
    }
    if let Some(p) = admin.get_password() {
        url.push_str(&format!(" password={}", String::from_utf8_lossy(p)));
    }
    let mut config = aiki_tests::Config::for_test(&url);
    // No reaper work to count during the measurement.
    config.reaper_interval = Duration::from_secs(30);
    let server = TestServer::start_with(config).await;
    let mut wf = server.workflows().await;
    let id = aiki_tests::start_id(&mut wf, start_req("watched", json!({}))).await;
    let watchers = 200;
    let mut streams = Vec::new();
    for _ in 0..watchers {
        let mut s = wf
            .watch_run(WatchRunRequest {
                run_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        // The run's creation: the watcher has read its backlog and follows the run's tail.
        let first = s.next().await.unwrap().unwrap();
        assert_eq!(first.r#type, aiki_proto::v1::EventType::RunCreated as i32);
        streams.push(s);
    }
    let before = statements.load(Ordering::Relaxed);
    let window = Duration::from_secs(3);
    tokio::time::sleep(window).await;
    let during = statements.load(Ordering::Relaxed) - before;
    eprintln!("{watchers} watchers of a queued run: {during} statements in {window:?}");
    // One reader re-reads the run and its history every 500 ms: 12 statements, and a few
    // more for the server's other loops. Each watcher on its own would have made 2,400.
    assert!(
        during <= 30,
        "{during} statements in {window:?} for {watchers} watchers"
    );

    // A change reaches every watcher, and their streams end with the run.
    wf.cancel_run(aiki_proto::v1::CancelRunRequest {
        run_id: id.clone(),
        reason: "seen by all".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let ends = streams.into_iter().map(|mut s| async move {
        let mut last = None;
        while let Some(e) = s.next().await {
            last = Some(e.expect("an event").r#type);
        }
        last
    });
    let lasts = tokio::time::timeout(Duration::from_secs(10), futures::future::join_all(ends))
        .await
        .expect("every watch ends");
    let cancelled = aiki_proto::v1::EventType::RunCancelled as i32;
    assert!(lasts.iter().all(|l| *l == Some(cancelled)), "{lasts:?}");
}

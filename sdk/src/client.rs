//! The client: start runs, read them, wait for their results.

use std::{future::Future, path::Path, time::Duration};

use aiki_proto::v1::{
    self, CancelRunRequest, ConflictPolicy, GetRunHistoryRequest, GetRunRequest, GetRunResultRequest, ListRunsRequest,
    StartRunRequest, StartRunsRequest, WatchRunRequest, admin_service_client::AdminServiceClient, get_run_request,
    workflow_service_client::WorkflowServiceClient,
};
use backon::{ExponentialBuilder, Retryable};
use futures::{Stream, StreamExt};
use serde::{Serialize, de::DeserializeOwned};
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::{
    RunStatus,
    error::{Error, Result, RunError},
};

pub use aiki_proto::v1::{HistoryEvent, Queue, Worker, WorkflowVersion};

/// How a start is deduplicated and scheduled. `Default` is a plain start on queue "default".
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// One run per key, forever: a second start with the key returns the first run.
    pub idempotency_key: Option<String>,
    /// With a key: return the existing run even if its input differs (instead of
    /// `Error::AlreadyExists`).
    pub return_existing: bool,
    /// Queue name; `None` is "default".
    pub queue: Option<String>,
    /// Pin a workflow version.
    pub version: Option<String>,
    /// Higher is leased first; -1000 to 1000.
    pub priority: i32,
    /// Not leased before this delay.
    pub delay: Option<Duration>,
    /// Retry policy of the run (server defaults otherwise).
    pub retry: Option<RetryPolicy>,
    /// Start the run as a child of this run: cancelling the parent cancels it too. Workflow
    /// code starts children with `Context::start_child`, which sets this.
    pub parent_run_id: Option<String>,
    /// Timeouts of the run (none by default).
    pub timeouts: Timeouts,
}

/// A run's timeouts; `None` is no limit. Each one that passes is recorded in the run's history
/// (`timed_out`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// The whole run, from its start: it then ends failed (`ExecutionTimeout`).
    pub execution: Option<Duration>,
    /// One attempt, from its lease: the attempt fails (`AttemptTimeout`), and is retried by
    /// the retry policy.
    pub attempt: Option<Duration>,
    /// Waiting ready in the queue without being leased: the run ends failed
    /// (`ScheduleToStartTimeout`).
    pub schedule_to_start: Option<Duration>,
    /// Between two heartbeats of its worker: the attempt fails (`HeartbeatTimeout`), and is
    /// retried by the retry policy. At least twice the server's heartbeat interval.
    pub heartbeat: Option<Duration>,
}

impl StartOptions {
    /// Options with an idempotency key.
    pub fn key(key: impl Into<String>) -> Self {
        Self {
            idempotency_key: Some(key.into()),
            ..Self::default()
        }
    }
}

/// A run's retry policy; `None` fields take the server's defaults.
#[derive(Debug, Clone, Default)]
pub struct RetryPolicy {
    pub max_attempts: Option<u32>,
    pub initial_interval: Option<Duration>,
    pub max_interval: Option<Duration>,
    pub backoff_coefficient: Option<f64>,
    pub non_retryable_error_types: Vec<String>,
}

impl From<&RetryPolicy> for v1::RetryPolicy {
    fn from(p: &RetryPolicy) -> Self {
        Self {
            max_attempts: p.max_attempts.unwrap_or(0),
            initial_interval: p.initial_interval.map(aiki_proto::duration_to_proto),
            max_interval: p.max_interval.map(aiki_proto::duration_to_proto),
            backoff_coefficient: p.backoff_coefficient.unwrap_or(0.0),
            non_retryable_error_types: p.non_retryable_error_types.clone(),
        }
    }
}

/// A run as the server last described it.
#[derive(Debug, Clone)]
pub struct Run {
    pub id: String,
    pub workflow: String,
    pub version: String,
    pub queue: String,
    pub status: RunStatus,
    pub input: serde_json::Value,
    pub output: Option<serde_json::Value>,
    pub error: Option<RunError>,
    pub idempotency_key: Option<String>,
    pub attempt: u32,
    pub cancel_requested: bool,
    /// A pause was asked while the run was running; it pauses when its worker releases it.
    pub pause_requested: bool,
    /// The run that started this one as its child.
    pub parent_run_id: Option<String>,
    /// The full message, with timestamps and the retry policy.
    pub raw: v1::Run,
}

impl From<v1::Run> for Run {
    fn from(r: v1::Run) -> Self {
        let json = |v: &Option<prost_types::Value>| v.as_ref().and_then(|v| aiki_proto::value_to_json(v).ok());
        Self {
            id: r.id.clone(),
            workflow: r.workflow.clone(),
            version: r.version.clone(),
            queue: r.queue.clone(),
            status: RunStatus::try_from(r.status).unwrap_or(RunStatus::Unspecified),
            input: json(&r.input).unwrap_or(serde_json::Value::Null),
            output: json(&r.output),
            error: r.error.as_ref().map(RunError::from),
            idempotency_key: (!r.idempotency_key.is_empty()).then(|| r.idempotency_key.clone()),
            attempt: r.attempt,
            cancel_requested: r.cancel_requested,
            pause_requested: r.pause_requested,
            parent_run_id: (!r.parent_run_id.is_empty()).then(|| r.parent_run_id.clone()),
            raw: r,
        }
    }
}

/// Filters of [`Client::list`]; `Default` lists everything, newest first.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub workflow: Option<String>,
    pub statuses: Vec<RunStatus>,
    pub queue: Option<String>,
    pub created_after: Option<std::time::SystemTime>,
    pub created_before: Option<std::time::SystemTime>,
    /// 1 to 1000 (default 100).
    pub page_size: u32,
    /// From the previous page.
    pub page_token: Option<String>,
    /// Only the children of this run.
    pub parent_run_id: Option<String>,
}

/// One page of runs.
#[derive(Debug, Clone)]
pub struct RunPage {
    pub runs: Vec<Run>,
    /// `None` on the last page.
    pub next_page_token: Option<String>,
}

/// A handle on a started run.
#[derive(Debug, Clone)]
pub struct RunHandle {
    client: Client,
    /// The run's id.
    pub id: String,
    /// False when the start returned an existing run (same idempotency key).
    pub created: bool,
    /// The run as the start returned it.
    pub run: Run,
}

impl RunHandle {
    /// Waits up to `timeout` for the run to end and returns its output as `T`.
    /// A failed or cancelled run is an error ([`Error::RunFailed`], [`Error::RunCancelled`]).
    pub async fn result<T: DeserializeOwned>(&self, timeout: Duration) -> Result<T> {
        self.client.result(&self.id, timeout).await
    }

    /// The run's current state.
    pub async fn get(&self) -> Result<Run> {
        self.client.get(&self.id).await
    }

    /// Cancels the run.
    pub async fn cancel(&self) -> Result<Run> {
        self.client.cancel(&self.id, "").await
    }
}

/// What [`Client::send_event`] did.
#[derive(Debug, Clone)]
pub struct EventSent {
    /// False when the run had received an event with this event key before.
    pub stored: bool,
    /// True when the run was waiting for this event and was queued again with it.
    pub delivered: bool,
    /// The run as the event left it.
    pub run: Option<Run>,
}

/// A connection to an Aiki server. Cheap to clone; all clones share one HTTP/2 connection,
/// which reconnects by itself when the server comes back.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
    workflows: WorkflowServiceClient<AuthChannel>,
    admin: AdminServiceClient<AuthChannel>,
    namespace: String,
}

/// The API key a connection sends with every request (`authorization: Bearer <key>`), or none.
#[derive(Clone, Default)]
pub struct ApiKey(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        f.write_str(if self.0.is_some() {
            "ApiKey(set)"
        } else {
            "ApiKey(none)"
        })
    }
}

impl ApiKey {
    /// The key `key` (as `aiki keys create` printed it); an empty one is no key.
    pub fn new(key: &str) -> Result<Self> {
        let key = key.trim();
        if key.is_empty() {
            return Ok(Self(None));
        }
        let mut value: MetadataValue<Ascii> = format!("Bearer {key}")
            .parse()
            .map_err(|_| Error::InvalidArgument("an API key must be printable ASCII".into()))?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }

    /// Whether a key is set.
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }
}

impl Interceptor for ApiKey {
    fn call(&mut self, mut req: tonic::Request<()>) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel that sends an API key with every request.
pub type AuthChannel = InterceptedService<Channel, ApiKey>;

fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(8)
        .with_jitter()
}

/// Unavailable, but not for TLS: a certificate refused now is refused on every retry.
fn retryable(e: &Error) -> bool {
    matches!(e, Error::Unavailable(m) if !m.starts_with(crate::error::TLS_PREFIX))
}

impl Client {
    /// Connects to `addr` (e.g. `http://127.0.0.1:7070`). An address where nothing listens (a
    /// refused connection, no route, a name that does not resolve) is an error at once;
    /// a connection that fails on the way (reset, timed out) is tried again for a few seconds.
    /// Once connected, calls retry with backoff while the server is unavailable.
    pub async fn connect(addr: impl Into<String>) -> Result<Self> {
        let channel = connect_channel(addr.into()).await?;
        Ok(Self::from_channel(channel))
    }

    /// [`Client::connect`] with TLS settings, for an `https://` address: the CA to trust
    /// (instead of the system's roots) and a client certificate for servers that ask for one.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), aiki::Error> {
    /// let tls = aiki::TlsOptions::from_files(Some("ca.pem".as_ref()), None, None)?;
    /// let client = aiki::Client::connect_with("https://aiki.internal:7070", &tls).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_with(addr: impl Into<String>, tls: &TlsOptions) -> Result<Self> {
        let channel = connect_channel_with(addr.into(), tls).await?;
        Ok(Self::from_channel(channel))
    }

    /// A client over an existing channel.
    pub fn from_channel(channel: Channel) -> Self {
        Self::with_key(channel, ApiKey::default(), "default".to_owned())
    }

    fn with_key(channel: Channel, key: ApiKey, namespace: String) -> Self {
        Self {
            workflows: WorkflowServiceClient::with_interceptor(channel.clone(), key.clone())
                .max_decoding_message_size(64 * 1024 * 1024),
            admin: AdminServiceClient::with_interceptor(channel.clone(), key),
            channel,
            namespace,
        }
    }

    /// The same client, sending the API key `key` with every request (as `aiki keys create`
    /// printed it). Servers that require keys refuse requests without one (`Unauthenticated`).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), aiki::Error> {
    /// let key = std::env::var("AIKI_API_KEY").unwrap_or_default();
    /// let client = aiki::Client::connect("http://127.0.0.1:7070").await?.with_api_key(&key)?;
    /// # Ok(()) }
    /// ```
    pub fn with_api_key(self, key: &str) -> Result<Self> {
        Ok(self.with_api_key_of(&ApiKey::new(key)?))
    }

    /// [`Client::with_api_key`] with a key already parsed.
    pub fn with_api_key_of(self, key: &ApiKey) -> Self {
        Self::with_key(self.channel, key.clone(), self.namespace)
    }

    /// The same client, working in another namespace.
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    fn start_request<I: Serialize>(&self, workflow: &str, input: &I, opts: &StartOptions) -> Result<StartRunRequest> {
        let input = payload("input", input)?;
        Ok(StartRunRequest {
            namespace: self.namespace.clone(),
            workflow: workflow.to_owned(),
            version: opts.version.clone().unwrap_or_default(),
            input: Some(aiki_proto::json_to_value(&input)),
            queue: opts.queue.clone().unwrap_or_default(),
            idempotency_key: opts.idempotency_key.clone().unwrap_or_default(),
            conflict_policy: if opts.return_existing {
                ConflictPolicy::ReturnExisting
            } else {
                ConflictPolicy::Fail
            } as i32,
            // Makes this call's own retries safe when no idempotency key is given. A UUIDv7:
            // the server makes it the run's id, so that the primary key dedupes the retries
            // (and, time-ordered, grows at its right edge).
            request_id: uuid::Uuid::now_v7().to_string(),
            delay: opts.delay.map(aiki_proto::duration_to_proto),
            priority: opts.priority,
            retry_policy: opts.retry.as_ref().map(Into::into),
            parent_run_id: opts.parent_run_id.clone().unwrap_or_default(),
            execution_timeout: opts.timeouts.execution.map(aiki_proto::duration_to_proto),
            attempt_timeout: opts.timeouts.attempt.map(aiki_proto::duration_to_proto),
            schedule_to_start_timeout: opts.timeouts.schedule_to_start.map(aiki_proto::duration_to_proto),
            heartbeat_timeout: opts.timeouts.heartbeat.map(aiki_proto::duration_to_proto),
        })
    }

    /// Calls the workflow service, retrying with backoff while the server is unavailable
    /// (every call here is safe to repeat: starts carry a request id).
    async fn call<Req, Resp, F, Fut>(&self, req: Req, f: F) -> Result<Resp>
    where
        Req: Clone,
        F: Fn(WorkflowServiceClient<AuthChannel>, Req) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        (|| async {
            f(self.workflows.clone(), req.clone())
                .await
                .map(|r| r.into_inner())
                .map_err(Error::from)
        })
        .retry(backoff())
        .when(retryable)
        .await
    }

    /// A handle from a start's answer; `input` is the one sent (not sent back for new runs).
    fn handle(&self, r: v1::StartRunResponse, input: Option<&prost_types::Value>) -> RunHandle {
        let mut raw = r.run.unwrap_or_default();
        if raw.input.is_none() {
            raw.input = input.cloned();
        }
        let run: Run = raw.into();
        RunHandle {
            client: self.clone(),
            id: run.id.clone(),
            created: r.created,
            run,
        }
    }

    /// Starts a run of `workflow` with `input`. With an idempotency key, a second start with
    /// the same key and input returns the first run (`created == false`).
    pub async fn start_run<I: Serialize>(&self, workflow: &str, input: &I, opts: StartOptions) -> Result<RunHandle> {
        let req = self.start_request(workflow, input, &opts)?;
        let input = req.input.clone();
        let resp = self.call(req, |mut c, r| async move { c.start_run(r).await }).await?;
        Ok(self.handle(resp, input.as_ref()))
    }

    /// Starts many runs in one round trip and one transaction (all or none).
    pub async fn start_runs<I: Serialize>(&self, runs: &[(&str, I, StartOptions)]) -> Result<Vec<RunHandle>> {
        let runs: Vec<StartRunRequest> = runs
            .iter()
            .map(|(w, i, o)| self.start_request(w, i, o))
            .collect::<Result<_>>()?;
        let inputs: Vec<_> = runs.iter().map(|r| r.input.clone()).collect();
        let resp = self
            .call(
                StartRunsRequest { runs },
                |mut c, r| async move { c.start_runs(r).await },
            )
            .await?;
        Ok(resp
            .results
            .into_iter()
            .zip(&inputs)
            .map(|(r, input)| self.handle(r, input.as_ref()))
            .collect())
    }

    async fn get_by(&self, r: get_run_request::Ref) -> Result<Run> {
        let req = GetRunRequest {
            namespace: self.namespace.clone(),
            r#ref: Some(r),
        };
        Ok(self
            .call(req, |mut c, r| async move { c.get_run(r).await })
            .await?
            .into())
    }

    /// A run by id.
    pub async fn get(&self, run_id: &str) -> Result<Run> {
        self.get_by(get_run_request::Ref::RunId(run_id.to_owned())).await
    }

    /// A run by idempotency key.
    pub async fn get_by_key(&self, key: &str) -> Result<Run> {
        self.get_by(get_run_request::Ref::IdempotencyKey(key.to_owned())).await
    }

    /// Waits up to `timeout` for the run to end; `Ok(run)` in any terminal state, or
    /// [`Error::Timeout`]. While the server is unreachable it keeps trying until the timeout.
    pub async fn wait(&self, run_id: &str, timeout: Duration) -> Result<Run> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let req = GetRunResultRequest {
                namespace: self.namespace.clone(),
                run_id: run_id.to_owned(),
                timeout: Some(aiki_proto::duration_to_proto(left.min(Duration::from_secs(60)))),
            };
            let resp = match self.workflows.clone().get_run_result(req).await.map_err(Error::from) {
                Ok(r) => r.into_inner(),
                // The server is away: keep trying until the caller's deadline, not longer.
                Err(Error::Unavailable(m)) => {
                    if left.is_zero() {
                        return Err(Error::Unavailable(m));
                    }
                    tokio::time::sleep(left.min(Duration::from_millis(500))).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if resp.done {
                return Ok(resp.run.unwrap_or_default().into());
            }
            if left.is_zero() {
                return Err(Error::Timeout {
                    run_id: run_id.to_owned(),
                });
            }
        }
    }

    /// Waits up to `timeout` for the run to end and returns its output as `T`.
    pub async fn result<T: DeserializeOwned>(&self, run_id: &str, timeout: Duration) -> Result<T> {
        let run = self.wait(run_id, timeout).await?;
        match run.status {
            RunStatus::Completed => Ok(serde_json::from_value(run.output.unwrap_or(serde_json::Value::Null))?),
            RunStatus::Cancelled => Err(Error::RunCancelled { run_id: run.id }),
            _ => Err(Error::RunFailed {
                run_id: run.id,
                error: run.error.unwrap_or(RunError {
                    kind: String::new(),
                    message: "failed".into(),
                    details: None,
                }),
            }),
        }
    }

    /// Lists runs, newest first.
    pub async fn list(&self, f: &ListFilter) -> Result<RunPage> {
        let req = ListRunsRequest {
            namespace: self.namespace.clone(),
            workflow: f.workflow.clone().unwrap_or_default(),
            statuses: f.statuses.iter().map(|s| *s as i32).collect(),
            queue: f.queue.clone().unwrap_or_default(),
            created_after: f.created_after.map(Into::into),
            created_before: f.created_before.map(Into::into),
            page_size: f.page_size,
            page_token: f.page_token.clone().unwrap_or_default(),
            parent_run_id: f.parent_run_id.clone().unwrap_or_default(),
        };
        let resp = self.call(req, |mut c, r| async move { c.list_runs(r).await }).await?;
        Ok(RunPage {
            runs: resp.runs.into_iter().map(Into::into).collect(),
            next_page_token: (!resp.next_page_token.is_empty()).then_some(resp.next_page_token),
        })
    }

    /// Cancels a run: a queued run ends at once, a running one when its worker hears of it.
    pub async fn cancel(&self, run_id: &str, reason: &str) -> Result<Run> {
        let req = CancelRunRequest {
            namespace: self.namespace.clone(),
            run_id: run_id.to_owned(),
            reason: reason.to_owned(),
        };
        Ok(self
            .call(req, |mut c, r| async move { c.cancel_run(r).await })
            .await?
            .into())
    }

    /// Sends event `name` with `payload` to a run: the run receives it from
    /// `Context::wait_event` (at once if it waits for it; else it is kept until it does).
    /// With an `event_key`, sending the same event again stores nothing (`stored` is false).
    pub async fn send_event<P: Serialize>(
        &self,
        run_id: &str,
        name: &str,
        payload: &P,
        event_key: Option<&str>,
    ) -> Result<EventSent> {
        self.send_event_to(
            v1::send_event_request::Ref::RunId(run_id.to_owned()),
            name,
            payload,
            event_key,
        )
        .await
    }

    /// [`Client::send_event`] to the run started with idempotency key `key`.
    pub async fn send_event_by_key<P: Serialize>(
        &self,
        key: &str,
        name: &str,
        payload: &P,
        event_key: Option<&str>,
    ) -> Result<EventSent> {
        self.send_event_to(
            v1::send_event_request::Ref::IdempotencyKey(key.to_owned()),
            name,
            payload,
            event_key,
        )
        .await
    }

    async fn send_event_to<P: Serialize>(
        &self,
        target: v1::send_event_request::Ref,
        name: &str,
        payload: &P,
        event_key: Option<&str>,
    ) -> Result<EventSent> {
        let req = v1::SendEventRequest {
            namespace: self.namespace.clone(),
            r#ref: Some(target),
            name: name.to_owned(),
            payload: Some(aiki_proto::json_to_value(&self::payload("payload", payload)?)),
            event_key: event_key.unwrap_or_default().to_owned(),
        };
        let resp = self.call(req, |mut c, r| async move { c.send_event(r).await }).await?;
        Ok(EventSent {
            stored: resp.stored,
            delivered: resp.delivered,
            run: resp.run.map(Into::into),
        })
    }

    /// Pauses a run: a queued run at once, a running one when its worker releases it (at its
    /// next heartbeat). A paused run is not leased until [`Client::resume`].
    pub async fn pause(&self, run_id: &str, reason: &str) -> Result<Run> {
        let req = v1::PauseRunRequest {
            namespace: self.namespace.clone(),
            run_id: run_id.to_owned(),
            reason: reason.to_owned(),
        };
        Ok(self
            .call(req, |mut c, r| async move { c.pause_run(r).await })
            .await?
            .into())
    }

    /// Ends a suspended run's sleep now: it is queued again at once.
    pub async fn wake(&self, run_id: &str) -> Result<Run> {
        let req = v1::WakeRunRequest {
            namespace: self.namespace.clone(),
            run_id: run_id.to_owned(),
        };
        Ok(self
            .call(req, |mut c, r| async move { c.wake_run(r).await })
            .await?
            .into())
    }

    /// Resumes a paused run (queued again), or withdraws a pause not yet taken effect.
    pub async fn resume(&self, run_id: &str) -> Result<Run> {
        let req = v1::ResumeRunRequest {
            namespace: self.namespace.clone(),
            run_id: run_id.to_owned(),
        };
        Ok(self
            .call(req, |mut c, r| async move { c.resume_run(r).await })
            .await?
            .into())
    }

    /// A run's whole history, oldest first.
    pub async fn history(&self, run_id: &str) -> Result<Vec<HistoryEvent>> {
        let mut events: Vec<HistoryEvent> = Vec::new();
        loop {
            let req = GetRunHistoryRequest {
                namespace: self.namespace.clone(),
                run_id: run_id.to_owned(),
                after_seq: events.last().map_or(0, |e| e.seq),
            };
            let page = self
                .call(req, |mut c, r| async move { c.get_run_history(r).await })
                .await?;
            events.extend(page.events);
            if !page.more {
                return Ok(events);
            }
        }
    }

    /// A live stream of a run's history events, ending when the run ends.
    pub async fn watch(&self, run_id: &str) -> Result<impl Stream<Item = Result<HistoryEvent>> + use<>> {
        let req = WatchRunRequest {
            namespace: self.namespace.clone(),
            run_id: run_id.to_owned(),
            after_seq: 0,
        };
        let stream = self.workflows.clone().watch_run(req).await?.into_inner();
        Ok(stream.map(|e| e.map_err(Error::from)))
    }

    /// Workers registered in this namespace.
    pub async fn workers(&self) -> Result<Vec<Worker>> {
        let req = v1::ListWorkersRequest {
            namespace: self.namespace.clone(),
        };
        Ok(self.admin.clone().list_workers(req).await?.into_inner().workers)
    }

    /// Queue depths in this namespace.
    pub async fn queues(&self) -> Result<Vec<Queue>> {
        let req = v1::ListQueuesRequest {
            namespace: self.namespace.clone(),
        };
        Ok(self.admin.clone().list_queues(req).await?.into_inner().queues)
    }

    /// Registered workflow versions in this namespace, and the live workers serving each.
    pub async fn workflows(&self) -> Result<Vec<WorkflowVersion>> {
        let req = v1::ListWorkflowsRequest {
            namespace: self.namespace.clone(),
        };
        Ok(self.admin.clone().list_workflows(req).await?.into_inner().workflows)
    }

    /// Makes an API key with `role` ("read", "client", "worker" or "admin") in `namespaces`
    /// (`*`: all); answers it and its secret, which the server shows this once. Needs an
    /// admin key of every namespace named.
    pub async fn create_api_key(
        &self,
        name: &str,
        role: &str,
        namespaces: &[String],
        rate_limit: u32,
    ) -> Result<(v1::ApiKey, String)> {
        let req = v1::CreateApiKeyRequest {
            name: name.to_owned(),
            role: role.to_owned(),
            namespaces: namespaces.to_vec(),
            rate_limit,
        };
        let resp = self.admin.clone().create_api_key(req).await?.into_inner();
        let key = resp
            .key
            .ok_or_else(|| Error::Server(tonic::Status::internal("CreateApiKey answered without the key")))?;
        Ok((key, resp.secret))
    }

    /// The API keys the caller administers (revoked ones too with `include_revoked`).
    pub async fn api_keys(&self, include_revoked: bool) -> Result<Vec<v1::ApiKey>> {
        let req = v1::ListApiKeysRequest { include_revoked };
        Ok(self.admin.clone().list_api_keys(req).await?.into_inner().keys)
    }

    /// Revokes the API key `id`: every server refuses it within a second.
    pub async fn revoke_api_key(&self, id: &str) -> Result<v1::ApiKey> {
        let req = v1::RevokeApiKeyRequest { id: id.to_owned() };
        Ok(self.admin.clone().revoke_api_key(req).await?.into_inner())
    }
}

/// TLS settings of a connection to an `https://` server, each a PEM document. The default
/// trusts the system's root certificates and presents no client certificate.
#[derive(Clone, Default)]
pub struct TlsOptions {
    /// CA certificates the server's certificate must chain to, instead of the system's roots.
    pub ca: Option<Vec<u8>>,
    /// Client certificate (chain), for servers that require one (mutual TLS); needs `key`.
    pub cert: Option<Vec<u8>>,
    /// Private key of `cert`.
    pub key: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        f.debug_struct("TlsOptions")
            .field("ca", &self.ca.is_some())
            .field("cert", &self.cert.is_some())
            .field("key", &self.key.is_some())
            .finish()
    }
}

impl TlsOptions {
    /// Reads the given PEM files; an error names the file that could not be read.
    pub fn from_files(ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>) -> Result<Self> {
        let read = |p: Option<&Path>, what: &str| {
            p.map(|p| {
                std::fs::read(p)
                    .map_err(|e| Error::InvalidArgument(format!("cannot read the TLS {what} {}: {e}", p.display())))
            })
            .transpose()
        };
        Ok(Self {
            ca: read(ca, "CA file")?,
            cert: read(cert, "certificate file")?,
            key: read(key, "key file")?,
        })
    }

    /// Whether any setting is given.
    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none() && self.key.is_none()
    }

    fn client_config(&self) -> Result<ClientTlsConfig> {
        let mut config = ClientTlsConfig::new();
        config = match &self.ca {
            Some(ca) => config.ca_certificate(Certificate::from_pem(ca)),
            None => config.with_native_roots(),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => config = config.identity(Identity::from_pem(cert, key)),
            (None, None) => {}
            _ => {
                return Err(Error::InvalidArgument(
                    "a TLS client certificate needs its key, and a key its certificate".into(),
                ));
            }
        }
        Ok(config)
    }
}

/// Opens a channel to `addr` (see [`Client::connect`] for what is retried). An
/// `https://` address trusts the system's root certificates; see [`connect_channel_with`].
pub async fn connect_channel(addr: String) -> Result<Channel> {
    connect_channel_with(addr, &TlsOptions::default()).await
}

/// Opens a channel to `addr` with TLS settings for an `https://` address (an `http://` one
/// takes none). Nothing listening at the address, no route to it, a host name that does not
/// resolve, and a failed TLS handshake (a certificate that does not verify, a client
/// certificate refused) are `Error::Unavailable` at once; a connection reset or timed out on
/// the way is tried again with backoff for a few seconds.
pub async fn connect_channel_with(addr: String, tls: &TlsOptions) -> Result<Channel> {
    // `host:port`, the form grpcurl takes, means plain HTTP/2; the error says so if it fails.
    let (addr, assumed) = if addr.contains("://") {
        (addr, "")
    } else {
        (
            format!("http://{addr}"),
            " (the address had no scheme, so http:// was assumed: give https://… for TLS)",
        )
    };
    let mut endpoint = Endpoint::from_shared(addr.clone())
        .map_err(|e| Error::InvalidArgument(format!("server address {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    if endpoint.uri().scheme_str() == Some("https") {
        endpoint = endpoint
            .tls_config(tls.client_config()?)
            .map_err(|e| Error::InvalidArgument(format!("TLS settings for {addr}: {}", chain(&e))))?;
    } else if !tls.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "TLS settings were given but the server address {addr} is not https://"
        )));
    }
    // What may pass by itself (a connection reset or closed during the handshake, a timeout)
    // is retried; nothing to connect to (refused, no route, a name that does not resolve) or a
    // certificate refused is an error at once: a retry a moment later meets the same answer.
    // Waiting for a server that is not up yet is the worker runtime's part (`WorkerBuilder::build`).
    (|| async { endpoint.connect().await })
        .retry(backoff())
        .when(|e| !is_tls_failure(e) && unreachable(e).is_none())
        .notify(|e, d| tracing::debug!(error = %e, delay = ?d, "server not reachable yet"))
        .await
        .map_err(|e| {
            if is_tls_failure(&e) {
                Error::Unavailable(format!(
                    "{}the handshake with {addr} failed: {}",
                    crate::error::TLS_PREFIX,
                    chain(&e)
                ))
            } else {
                let hint = match unreachable(&e) {
                    Some(Unreachable::Refused) => ": is a server running there? (`aiki dev` starts one)",
                    Some(Unreachable::Name) => ": is the host name right?",
                    Some(Unreachable::NoRoute) | None => "",
                };
                Error::Unavailable(format!("cannot connect to {addr}: {}{hint}{assumed}", chain(&e)))
            }
        })
}

/// Why there is nothing to connect to at an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unreachable {
    /// Nothing listens on the port.
    Refused,
    /// No route to the host or its network.
    NoRoute,
    /// The host name does not resolve.
    Name,
}

/// Why a connection attempt found nothing to connect to, if that is why it failed.
fn unreachable(e: &(dyn std::error::Error + 'static)) -> Option<Unreachable> {
    use std::io::ErrorKind;
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            match io.kind() {
                ErrorKind::ConnectionRefused => return Some(Unreachable::Refused),
                ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable | ErrorKind::AddrNotAvailable => {
                    return Some(Unreachable::NoRoute);
                }
                _ => {}
            }
        }
        // hyper-util's connector names a failed name lookup so (its error type is private).
        if s.to_string() == "dns error" {
            return Some(Unreachable::Name);
        }
        source = s.source();
    }
    None
}

/// Whether a connection failed in its TLS handshake: retrying would fail the same way.
fn is_tls_failure(e: &tonic::transport::Error) -> bool {
    crate::error::is_tls_failure(e)
}

/// An error and its causes, `: `-separated.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// `value` as the JSON payload `what`, refused here (as the server would refuse it) if it nests
/// deeper than [`aiki_proto::MAX_PAYLOAD_DEPTH`].
fn payload<T: Serialize + ?Sized>(what: &str, value: &T) -> Result<serde_json::Value> {
    let json = serde_json::to_value(value)?;
    aiki_proto::check_depth(what, &json).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    Ok(json)
}

//! API keys: who a caller is (authentication, a tower layer in front of every service but
//! health) and what each role may do (the table [`Role::allows`] that `Engine::authorize`
//! applies to every operation).
//!
//! A key is `aiki_` followed by its id (32 hex digits, public: it names the key in lists and
//! history) and its secret (64 hex digits). The server stores the SHA-256 digest of the
//! secret, never the secret; a request's key is found by its id and its digest compared in
//! constant time. A key holds one role in a set of namespaces (`*`: all of them). Keys are
//! cached for [`REFRESH`]: one statement re-reads every cached key that often, so a revoked
//! key is refused within about that time on every replica.
//!
//! The bootstrap admin key (`admin_key` in the settings) is an admin of every namespace, and
//! is how the first keys are made.

use std::{
    collections::HashMap,
    fmt,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;
use uuid::Uuid;

use crate::{
    engine::{Caller, Op},
    error::{Error, Result},
    store::Store,
};

/// How long a key read from the database is trusted before it is read again.
pub const REFRESH: Duration = Duration::from_millis(500);
/// Most keys cached; past it the cache starts again empty.
const MAX_CACHED: usize = 10_000;
/// How long a request waits for its turn to read its key from the database.
const LOOKUP_WAIT: Duration = Duration::from_secs(2);
/// What every key starts with.
pub const PREFIX: &str = "aiki_";
/// The id of the bootstrap admin key.
pub const BOOTSTRAP_ID: Uuid = Uuid::nil();

/// What a key may do, in the namespaces it is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Reads runs: get, list, history, watch, result.
    Read,
    /// What `read` does, and starts, cancels, pauses, resumes and wakes runs and sends events.
    Client,
    /// Registers workers, polls, heartbeats and reports under its own workers' leases; starts
    /// child runs.
    Worker,
    /// Everything: what every other role does, the admin service and the keys.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Read, Role::Client, Role::Worker, Role::Admin];

    /// The role table: whether this role may do `op`.
    pub fn allows(self, op: Op) -> bool {
        use Op::*;
        match self {
            Role::Admin => true,
            Role::Read => matches!(op, GetRun | ListRuns | GetHistory),
            Role::Client => matches!(
                op,
                GetRun
                    | ListRuns
                    | GetHistory
                    | StartRun
                    | StartChild
                    | CancelRun
                    | PauseRun
                    | ResumeRun
                    | WakeRun
                    | SendEvent
            ),
            Role::Worker => matches!(op, RegisterWorker | PollTasks | Heartbeat | Report | StartChild),
        }
    }

    /// The least role that may do `op`, for error messages.
    pub fn least_for(op: Op) -> Role {
        Role::ALL.into_iter().find(|r| r.allows(op)).unwrap_or(Role::Admin)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Client => "client",
            Role::Worker => "worker",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "unknown role {}: give read, client, worker or admin",
                crate::validate::quote(s)
            ))
        })
    }
}

/// An authenticated key: who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub id: Uuid,
    pub name: String,
    pub role: Role,
    /// The namespaces it may act in; `*` stands for all.
    pub namespaces: Vec<String>,
    /// Requests per second it may make (0: no limit).
    pub rate_limit: u32,
}

impl Key {
    /// Whether the key may act in `namespace`.
    pub fn covers(&self, namespace: &str) -> bool {
        self.namespaces.iter().any(|n| n == "*" || n == namespace)
    }

    /// How messages name the key.
    pub fn label(&self) -> String {
        format!("{:?} ({})", self.name, self.id)
    }
}

/// A new key's text and what the server keeps of it.
#[derive(Debug)]
pub struct NewSecret {
    pub id: Uuid,
    /// The whole key, shown once.
    pub token: String,
    pub digest: Vec<u8>,
}

/// Makes a new key: a random id and a random 256-bit secret.
pub fn new_secret() -> NewSecret {
    let id = Uuid::new_v4();
    let secret: [u8; 32] = rand::random();
    let secret_hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    NewSecret {
        id,
        token: format!("{PREFIX}{}{secret_hex}", id.simple()),
        digest: digest(&secret_hex),
    }
}

/// The SHA-256 digest of a secret. A key's secret has 256 random bits: a fast digest is as
/// safe as a slow one for it (a slow one protects guessable passwords).
pub fn digest(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// A key's id and secret, if `token` has the shape of a key.
pub fn parse(token: &str) -> Option<(Uuid, &str)> {
    let rest = token.strip_prefix(PREFIX)?;
    if rest.len() != 96 || !rest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let id = Uuid::try_parse(&rest[..32]).ok()?;
    Some((id, &rest[32..]))
}

/// A key as stored, for authentication.
#[derive(Debug, Clone)]
pub struct StoredKey {
    pub key: Arc<Key>,
    pub digest: Vec<u8>,
    pub revoked: bool,
}

struct Cached {
    /// `None`: no key has this id.
    key: Option<StoredKey>,
    read_at: Instant,
}

/// The keys this server has read, the bootstrap key, and each key's request budget.
pub struct Keys {
    store: Store,
    /// Whether requests must carry a key at all.
    pub required: bool,
    bootstrap: Option<(Vec<u8>, Arc<Key>)>,
    cache: Mutex<HashMap<Uuid, Cached>>,
    limiter: DefaultKeyedRateLimiter<Uuid>,
    /// The limit of keys that do not set their own (0: none).
    default_rate: u32,
    /// Keys with a limit of their own, by their limit.
    own_limits: Mutex<HashMap<u32, Arc<DefaultKeyedRateLimiter<Uuid>>>>,
    /// Reads of keys not in the cache take one of these: requests with made-up keys (which
    /// no rate limit counts, since they name no key) cannot take the pool from the others.
    lookups: tokio::sync::Semaphore,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("required", &self.required)
            .field("bootstrap", &self.bootstrap.is_some())
            .finish_non_exhaustive()
    }
}

/// A rate limiter of `per_second` requests a second per key, with a burst of as many.
fn limiter(per_second: u32) -> DefaultKeyedRateLimiter<Uuid> {
    let rate = NonZeroU32::new(per_second.max(1)).unwrap_or(NonZeroU32::MIN);
    RateLimiter::keyed(Quota::per_second(rate))
}

impl Keys {
    /// Keys of `store`; `admin_key` is the bootstrap admin key, if any; `default_rate` the
    /// requests per second of a key without a limit of its own (0: none); at most `lookups`
    /// keys are read from the database at once.
    pub fn new(store: Store, required: bool, admin_key: Option<&str>, default_rate: u32, lookups: usize) -> Self {
        Self {
            store,
            required,
            bootstrap: admin_key.map(|k| {
                (
                    digest(k),
                    Arc::new(Key {
                        id: BOOTSTRAP_ID,
                        name: "bootstrap admin".into(),
                        role: Role::Admin,
                        namespaces: vec!["*".into()],
                        rate_limit: 0,
                    }),
                )
            }),
            cache: Mutex::new(HashMap::new()),
            limiter: limiter(default_rate),
            default_rate,
            own_limits: Mutex::new(HashMap::new()),
            lookups: tokio::sync::Semaphore::new(lookups.max(1)),
        }
    }

    /// Who sends a request with this `authorization` header.
    pub async fn authenticate(&self, header: Option<&http::HeaderValue>) -> Result<Caller> {
        if !self.required {
            return Ok(Caller::Anonymous);
        }
        let Some(header) = header else {
            return Err(Error::Unauthenticated(
                "this server requires an API key: send it as the header `authorization: Bearer <key>` \
                 (the CLI and aiki-worker take --api-key or AIKI_API_KEY)"
                    .into(),
            ));
        };
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or_else(|| Error::Unauthenticated("the authorization header must be `Bearer <key>`".into()))?;
        if let Some((digest_of_admin, key)) = &self.bootstrap
            && bool::from(digest(token).ct_eq(digest_of_admin))
        {
            return Ok(Caller::Key(key.clone()));
        }
        let refused = || Error::Unauthenticated("the API key is not valid: it is unknown or malformed".into());
        let (id, secret) = parse(token).ok_or_else(refused)?;
        let stored = self.stored(id).await?.ok_or_else(refused)?;
        if !bool::from(digest(secret).ct_eq(&stored.digest)) {
            return Err(refused());
        }
        if stored.revoked {
            return Err(Error::Unauthenticated(format!(
                "the API key {} was revoked",
                stored.key.label()
            )));
        }
        Ok(Caller::Key(stored.key))
    }

    /// Key `id` from the cache if read within [`REFRESH`], else from the database.
    async fn stored(&self, id: Uuid) -> Result<Option<StoredKey>> {
        if let Some(c) = self.lock().get(&id)
            && c.read_at.elapsed() < REFRESH
        {
            return Ok(c.key.clone());
        }
        let Ok(Ok(_turn)) = tokio::time::timeout(LOOKUP_WAIT, self.lookups.acquire()).await else {
            return Err(Error::Unavailable(
                "too many requests with API keys this server has not seen lately; retry shortly".into(),
            ));
        };
        let key = self.store.api_key(id).await?;
        let mut cache = self.lock();
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(
            id,
            Cached {
                key: key.clone(),
                read_at: Instant::now(),
            },
        );
        Ok(key)
    }

    /// Forgets a key at once on this server (it was revoked through it).
    pub fn forget(&self, id: Uuid) {
        self.lock().remove(&id);
    }

    /// Re-reads every cached key each [`REFRESH`], in one statement, so that requests seldom
    /// wait for the database and a revocation through any replica is seen within that time.
    pub async fn refresh(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(REFRESH / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            let ids: Vec<Uuid> = self.lock().keys().copied().collect();
            if ids.is_empty() {
                continue;
            }
            match self.store.api_keys_by_id(&ids).await {
                Ok(found) => {
                    let now = Instant::now();
                    let mut found: HashMap<Uuid, StoredKey> = found.into_iter().map(|k| (k.key.id, k)).collect();
                    let mut cache = self.lock();
                    for id in ids {
                        cache.insert(
                            id,
                            Cached {
                                key: found.remove(&id),
                                read_at: now,
                            },
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not re-read API keys; requests will read them"),
            }
        }
    }

    /// Counts a request of `caller` against its key's rate; past it, `RESOURCE_EXHAUSTED` with
    /// the delay after which a request may pass.
    pub fn admit(&self, caller: &Caller) -> Result<()> {
        let Caller::Key(key) = caller else {
            return Ok(());
        };
        let limited = match key.rate_limit {
            0 if self.default_rate == 0 => return Ok(()),
            0 => self.limiter.check_key(&key.id),
            own => {
                let limiter = self
                    .own_limits
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(own)
                    .or_insert_with(|| Arc::new(limiter(own)))
                    .clone();
                limiter.check_key(&key.id)
            }
        };
        limited.map_err(|not_until| {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
            let rate = if key.rate_limit == 0 {
                self.default_rate
            } else {
                key.rate_limit
            };
            Error::RateLimited {
                message: format!(
                    "API key {} made more than {rate} requests per second; retry in {} ms",
                    key.label(),
                    wait.as_millis().max(1)
                ),
                retry_after: wait.max(Duration::from_millis(1)),
            }
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Cached>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The tower layer that authenticates every request but health checks, and counts it against
/// its key's rate: the caller goes into the request's extensions, where the services find it
/// (`service::caller`).
#[derive(Debug, Clone)]
pub struct AuthLayer(pub Arc<Keys>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authenticate<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Authenticate {
            keys: self.0.clone(),
            inner,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Authenticate<S> {
    keys: Arc<Keys>,
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for Authenticate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The ready service goes to this call; a clone takes its place for the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let keys = self.keys.clone();
        Box::pin(async move {
            if req.uri().path().starts_with("/grpc.health.v1.Health/") {
                return inner.call(req).await;
            }
            let caller = keys
                .authenticate(req.headers().get(http::header::AUTHORIZATION))
                .await
                .and_then(|caller| keys.admit(&caller).map(|()| caller));
            match caller {
                Ok(caller) => {
                    req.extensions_mut().insert(caller);
                    inner.call(req).await
                }
                Err(e) => Ok(tonic::Status::from(e).into_http()),
            }
        })
    }
}

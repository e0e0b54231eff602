//! Waking waiters without polling the database.
//!
//! Two kinds of waiters exist: `PollTasks` calls waiting for work on a queue, and
//! `GetRunResult`/`WatchRun` calls waiting for a run to change. Both park on a
//! [`tokio::sync::Notify`] kept in a [`WakeMap`].
//!
//! - A write made by this replica wakes its own waiters in-process right after commit.
//! - Every transaction that makes runs ready sends one `NOTIFY aiki_ready` (Postgres folds
//!   identical payloads of one transaction into one); the [`listen`] task of every replica
//!   turns it into a wake of that queue, so pollers on other replicas wake within milliseconds.
//! - A run that becomes visible later (delay, retry backoff) carries its due time in the
//!   payload; the [`Timers`] task wakes the queue's pollers when that time comes.
//! - Run waiters of other replicas are not notified through Postgres (that would cost one
//!   NOTIFY per report); they re-check on a slow period instead (see `service::workflow`).

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, HashSet},
    hash::Hash,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures::StreamExt;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

/// The channel of ready-queue notifications.
pub const READY_CHANNEL: &str = "aiki_ready";

/// Waiters keyed by `K`, each key with one shared [`Notify`].
#[derive(Debug)]
pub struct WakeMap<K> {
    inner: Mutex<HashMap<K, Arc<Notify>>>,
}

impl<K: Hash + Eq + Clone> Default for WakeMap<K> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone> WakeMap<K> {
    /// The notify of `key`, created if needed. Pair with [`Self::release`] for keys that come
    /// and go (runs); queue keys may stay.
    pub fn subscribe(&self, key: &K) -> Arc<Notify> {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key.clone()).or_default().clone()
    }

    /// Drops a subscription, removing the entry when nobody else holds it.
    pub fn release(&self, key: &K, notify: Arc<Notify>) {
        drop(notify);
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(key).is_some_and(|n| Arc::strong_count(n) == 1) {
            map.remove(key);
        }
    }

    /// Wakes every waiter of `key`.
    pub fn wake(&self, key: &K) {
        let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get(key) {
            n.notify_waiters();
        }
    }

    /// Wakes every waiter (after a lost connection, when notifications may have been missed).
    pub fn wake_all(&self) {
        let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for n in map.values() {
            n.notify_waiters();
        }
    }
}

/// A queue, as waiters know it: (namespace, queue).
pub type QueueKey = (String, String);

/// All the wake-up machinery of one server.
#[derive(Debug)]
pub struct Wakers {
    /// Pollers, by queue.
    pub queues: WakeMap<QueueKey>,
    /// Result and history waiters, by run id.
    pub runs: WakeMap<uuid::Uuid>,
    timers: mpsc::UnboundedSender<(Instant, QueueKey)>,
}

impl Wakers {
    /// Creates the wakers and spawns the timer task (it ends with `shutdown`).
    pub fn new(shutdown: CancellationToken) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let wakers = Arc::new(Self {
            queues: WakeMap::default(),
            runs: WakeMap::default(),
            timers: tx,
        });
        tokio::spawn(
            Timers {
                heap: BinaryHeap::new(),
                armed: HashSet::new(),
                epoch: Instant::now(),
            }
            .run(Arc::downgrade(&wakers), rx, shutdown),
        );
        wakers
    }

    /// Wakes the pollers of a queue now, or at `due` if that is in the future.
    pub fn queue_ready(&self, key: QueueKey, due: Option<SystemTime>) {
        match due.and_then(|d| d.duration_since(SystemTime::now()).ok()) {
            Some(wait) if wait > Duration::from_millis(1) => {
                let _ = self.timers.send((Instant::now() + wait, key));
            }
            _ => self.queues.wake(&key),
        }
    }

    /// Handles one `aiki_ready` payload: `namespace \n queue \n due-epoch-ms`.
    fn on_payload(&self, payload: &str) {
        let mut parts = payload.split('\n');
        let (Some(ns), Some(queue)) = (parts.next(), parts.next()) else {
            tracing::warn!(payload, "malformed ready notification");
            return;
        };
        let due = parts
            .next()
            .and_then(|ms| ms.parse::<u64>().ok())
            .filter(|ms| *ms > 0)
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
        self.queue_ready((ns.to_owned(), queue.to_owned()), due);
    }
}

/// The payload of a ready notification for `queue`, due at `due` (or now).
pub fn ready_payload(namespace: &str, queue: &str, due: Option<SystemTime>) -> String {
    let ms = due
        .and_then(|d| d.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{namespace}\n{queue}\n{ms}")
}

struct Timers {
    heap: BinaryHeap<Reverse<(Instant, QueueKey)>>,
    /// What the heap holds, by millisecond of the process clock: timers of one queue due within
    /// the same millisecond are one timer.
    armed: HashSet<(u64, QueueKey)>,
    epoch: Instant,
}

impl Timers {
    fn slot(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    async fn run(
        mut self,
        wakers: std::sync::Weak<Wakers>,
        mut rx: mpsc::UnboundedReceiver<(Instant, QueueKey)>,
        shutdown: CancellationToken,
    ) {
        loop {
            let next = self.heap.peek().map(|Reverse((at, _))| *at);
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                msg = rx.recv() => match msg {
                    Some(entry) => {
                        if self.armed.insert((self.slot(entry.0), entry.1.clone())) {
                            self.heap.push(Reverse(entry));
                        }
                    }
                    None => return,
                },
                _ = sleep => {
                    let Some(w) = wakers.upgrade() else { return };
                    let now = Instant::now();
                    while let Some(Reverse((at, _))) = self.heap.peek() {
                        if *at > now { break; }
                        let Some(Reverse((at, key))) = self.heap.pop() else { break };
                        w.queues.wake(&key);
                        let slot = self.slot(at);
                        self.armed.remove(&(slot, key));
                    }
                }
            }
        }
    }
}

/// Listens on [`READY_CHANNEL`] with a dedicated connection and wakes local pollers; reconnects
/// with backoff when the connection drops, waking everyone since notifications may be lost.
pub async fn listen(pg: tokio_postgres::Config, wakers: Arc<Wakers>, shutdown: CancellationToken) {
    let mut delay = Duration::from_millis(100);
    loop {
        match listen_once(&pg, &wakers, &shutdown).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, "notification listener lost its connection"),
        }
        wakers.queues.wake_all();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn listen_once(pg: &tokio_postgres::Config, wakers: &Wakers, shutdown: &CancellationToken) -> Result<(), String> {
    let (client, mut conn) = pg.connect(tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(msg) = messages.next().await {
            match msg {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    if tx.send(Ok(n.payload().to_owned())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {READY_CHANNEL}"))
        .await
        .map_err(|e| e.to_string())?;
    tracing::debug!("listening for ready notifications");
    // Anything made ready while we were not listening is picked up by this wake.
    wakers.queues.wake_all();
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            msg = rx.recv() => match msg {
                Some(Ok(payload)) => wakers.on_payload(&payload),
                Some(Err(e)) => break Err(e.to_string()),
                None => break Ok(()),
            }
        }
    };
    driver.abort();
    if result.is_ok() && !shutdown.is_cancelled() {
        return Err("the connection closed".to_owned());
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn payload_round_trip_and_timer_wake() {
        let shutdown = CancellationToken::new();
        let w = Wakers::new(shutdown.clone());
        let key = ("default".to_owned(), "q".to_owned());
        let n = w.queues.subscribe(&key);
        let notified = n.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let due = SystemTime::now() + Duration::from_millis(50);
        let started = Instant::now();
        w.on_payload(&ready_payload("default", "q", Some(due)));
        notified.await;
        assert!(
            started.elapsed() >= Duration::from_millis(40),
            "woken before its due time"
        );
        shutdown.cancel();
    }
}

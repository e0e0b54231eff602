//! Waking waiters without polling the database.
//!
//! Two kinds of waiters exist: `PollTasks` calls waiting for work on a queue, and
//! `GetRunResult`/`WatchRun` calls waiting for a run to change. Both park on a
//! [`tokio::sync::Notify`] kept in a [`WakeMap`].
//!
//! - A write made by this replica wakes its own waiters in-process right after commit.
//! - Every transaction that makes runs ready sends one `NOTIFY aiki_ready` (Postgres folds
//!   identical payloads of one transaction into one); the listener (`background::listener`) of every replica
//!   turns it into a wake of that queue, so pollers on other replicas wake within milliseconds.
//! - A run that becomes visible later (delay, retry backoff) carries its delay in the payload,
//!   relative to the writing transaction, so clocks of servers and database need not agree; the
//!   `Timers` task wakes the queue's pollers when that time comes (never before: the local
//!   clock starts after the transaction did).
//! - Run waiters of other replicas are not notified through Postgres (that would cost one
//!   NOTIFY per report); they re-check on a slow period instead (see `service::workflow`).

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, HashSet},
    hash::Hash,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::status::RunStatus;

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

/// Interest in the wake-ups of one key; the entry goes when its last subscription is dropped.
#[derive(Debug)]
pub struct Subscription<'a, K: Hash + Eq + Clone> {
    map: &'a WakeMap<K>,
    key: K,
    notify: Option<Arc<Notify>>,
}

impl<K: Hash + Eq + Clone> Subscription<'_, K> {
    /// The key's notify: arm `notified()` before looking, then await it.
    pub fn notify(&self) -> &Notify {
        self.notify.as_deref().expect("present until drop")
    }
}

impl<K: Hash + Eq + Clone> Drop for Subscription<'_, K> {
    fn drop(&mut self) {
        drop(self.notify.take());
        let mut map = self.map.inner.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&self.key).is_some_and(|n| Arc::strong_count(n) == 1) {
            map.remove(&self.key);
        }
    }
}

impl<K: Hash + Eq + Clone> WakeMap<K> {
    /// Subscribes to the wake-ups of `key`.
    pub fn subscribe(&self, key: &K) -> Subscription<'_, K> {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let notify = map.entry(key.clone()).or_default().clone();
        Subscription {
            map: self,
            key: key.clone(),
            notify: Some(notify),
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

    /// Wakes the pollers of a queue now, or after `delay`.
    pub fn queue_ready(&self, key: QueueKey, delay: Option<Duration>) {
        match delay.filter(|d| !d.is_zero()) {
            // A little late rather than early: an early wake finds nothing and is lost.
            Some(d) => {
                let _ = self.timers.send((Instant::now() + d + TIMER_SLACK, key));
            }
            None => self.queues.wake(&key),
        }
    }

    /// Wakes whoever waits on what a transition did: the run's result and history waiters,
    /// and, if it is queued, its queue's pollers (when it becomes visible). Every transition's
    /// wake-ups go through here.
    pub fn moved(&self, m: &crate::store::Moved) {
        self.runs.wake(&m.id);
        if m.status == RunStatus::Queued {
            self.queue_ready((m.namespace.clone(), m.queue.clone()), m.visible_in);
        }
    }

    /// Handles one `aiki_ready` payload (see [`parse_ready`]).
    pub(crate) fn on_payload(&self, payload: &str) {
        match parse_ready(payload) {
            Some((key, delay)) => self.queue_ready(key, delay),
            None => tracing::warn!(payload, "malformed ready notification"),
        }
    }
}

/// How late timers fire, so that the run is visible when the poller looks.
pub(crate) const TIMER_SLACK: Duration = Duration::from_millis(2);
/// Most timers kept; past this the furthest are dropped, and those runs are found by the
/// next poll that ends its wait (at most one poll wait late).
const MAX_TIMERS: usize = 100_000;

/// A ready notification to send: the runs of `queue` are visible after `delay_ms`. The database
/// builds its payload (`aiki_ready_payload`, the migration `transitions`), for the statements
/// of the store and the child-end trigger alike; [`parse_ready`] reads it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ready {
    pub namespace: String,
    pub queue: String,
    pub delay_ms: i64,
}

impl Ready {
    /// The notification of `queue`'s runs visible after `delay` (rounded up: never early).
    pub fn new(namespace: &str, queue: &str, delay: Duration) -> Self {
        Self {
            namespace: namespace.to_owned(),
            queue: queue.to_owned(),
            delay_ms: i64::try_from(delay.as_nanos().div_ceil(1_000_000)).unwrap_or(i64::MAX),
        }
    }
}

/// The queue and the delay a ready notification's payload names (`namespace \n queue \n
/// delay-ms`); `None` if it is malformed.
pub fn parse_ready(payload: &str) -> Option<(QueueKey, Option<Duration>)> {
    let mut parts = payload.split('\n');
    let (ns, queue) = (parts.next()?, parts.next()?);
    let delay = parts
        .next()
        .and_then(|ms| ms.parse::<u64>().ok())
        .map(Duration::from_millis);
    Some(((ns.to_owned(), queue.to_owned()), delay))
}

struct Timers {
    heap: BinaryHeap<Reverse<(Instant, QueueKey)>>,
    /// What the heap holds, by millisecond of the process clock: timers of one queue due within
    /// the same millisecond are one timer.
    armed: HashSet<(u64, QueueKey)>,
    epoch: Instant,
}

impl Timers {
    /// Keeps the nearest half of the timers.
    fn drop_furthest(&mut self) {
        let mut all = std::mem::take(&mut self.heap).into_sorted_vec();
        // `Reverse` sorts the furthest first.
        let keep = all.split_off(all.len() / 2);
        for Reverse((at, key)) in all {
            let slot = self.slot(at);
            self.armed.remove(&(slot, key));
        }
        tracing::warn!(kept = keep.len(), "too many wake-up timers; dropped the furthest");
        self.heap = keep.into_iter().collect();
    }

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
                            if self.heap.len() > MAX_TIMERS {
                                self.drop_furthest();
                            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn payload_round_trip_and_timer_wake() {
        let shutdown = CancellationToken::new();
        let w = Wakers::new(shutdown.clone());
        let key = ("default".to_owned(), "q".to_owned());
        let n = w.queues.subscribe(&key);
        let notified = n.notify().notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let started = Instant::now();
        w.on_payload("default\nq\n50");
        tokio::time::timeout(Duration::from_secs(5), notified)
            .await
            .expect("the timer fired");
        assert!(
            started.elapsed() >= Duration::from_millis(40),
            "woken before its due time"
        );
        shutdown.cancel();
    }
}

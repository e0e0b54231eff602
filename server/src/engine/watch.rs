//! Watching a run's history as it is written (`WatchRun`), with one reader per run.
//!
//! Each watcher first reads what it asked for on its own (its history from `after_seq`, at
//! its client's pace). Then it follows the run's [`Tail`]: one task per watched run re-reads
//! the run and its new events when the run changes on this server (or every
//! `recheck_interval`, for changes made through other replicas) and publishes them on a
//! `tokio::sync::watch` channel; every watcher of the run takes from it the events it has not
//! sent. N watchers of one run cost one read per change or period, not N. A watcher that falls
//! behind what the tail holds reads the gap on its own again, so none misses an event.
//!
//! The tail's task starts with the run's first watcher and ends with its last (or when the
//! run ends, or the server shuts down). It only reads: each watcher was authorized at its
//! start.
//!
//! A watcher whose client does not take its next event within `slow_reader_timeout` is ended:
//! what it held is freed, and its client gets `RESOURCE_EXHAUSTED` once it reads again.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use aiki_proto::v1::HistoryEvent;
use futures::Stream;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use super::{
    Engine,
    runs::{HISTORY_PAGE, PAGE_BYTES},
};
use crate::{
    error::{Error, Result},
    status::RunStatus,
};

/// What the reader of one run last read: its events after `from`, up to `upto`.
#[derive(Debug)]
pub struct Tail {
    /// The events below hold every event with a seq in `(from, upto]`.
    from: i64,
    upto: i64,
    events: Vec<HistoryEvent>,
    /// The run has ended (or is gone) and `upto` is its last event.
    ended: bool,
    /// The read failed: the watchers end with this.
    error: Option<Error>,
}

type Key = (String, Uuid);

/// The tails of the runs watched on this server.
#[derive(Debug, Default)]
pub struct Tails {
    runs: Mutex<HashMap<Key, watch::Sender<Arc<Tail>>>>,
}

impl Tails {
    /// Follows the tail of `key`, starting its reader at `after` if nobody follows it yet.
    fn follow(&self, engine: &Arc<Engine>, key: &Key, after: i64) -> watch::Receiver<Arc<Tail>> {
        let mut runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = runs.get(key) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(Arc::new(Tail {
            from: after,
            upto: after,
            events: Vec::new(),
            ended: false,
            error: None,
        }));
        runs.insert(key.clone(), tx.clone());
        tokio::spawn(read_tail(engine.clone(), key.clone(), after, tx));
        rx
    }

    /// Forgets `tx`'s run if nobody follows it any more (or `force`); answers whether it did.
    fn forget(&self, key: &Key, tx: &watch::Sender<Arc<Tail>>, force: bool) -> bool {
        let mut runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        if !force && tx.receiver_count() > 0 {
            return false;
        }
        if runs.get(key).is_some_and(|t| t.same_channel(tx)) {
            runs.remove(key);
        }
        true
    }

    /// How many runs have a reader now.
    pub fn len(&self) -> usize {
        self.runs.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The reader of one run's tail: reads on each change (and every `recheck_interval`) and
/// publishes what it read, until the run ends, the server shuts down or nobody follows.
async fn read_tail(engine: Arc<Engine>, key: Key, mut cursor: i64, tx: watch::Sender<Arc<Tail>>) {
    let (ns, id) = (&key.0, key.1);
    let notify = engine.wakers.runs.subscribe(&id);
    loop {
        let notified = notify.notify().notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // The status first: events written before a terminal status are then all visible to
        // the history read that follows.
        let read = async {
            let run = engine.store.get_run(ns, id).await?;
            let (events, more) = engine.store.history(ns, id, cursor, HISTORY_PAGE, PAGE_BYTES).await?;
            Ok::<_, Error>((run, events, more))
        }
        .await;
        let (events, more, ended) = match read {
            Ok((run, events, more)) => {
                let ended =
                    !more && run.is_none_or(|r| RunStatus::from_proto(r.status).is_some_and(RunStatus::is_terminal));
                (events, more, ended)
            }
            Err(e) => {
                tx.send_replace(Arc::new(Tail {
                    from: cursor,
                    upto: cursor,
                    events: Vec::new(),
                    ended: true,
                    error: Some(e),
                }));
                engine.watches.forget(&key, &tx, true);
                return;
            }
        };
        if !events.is_empty() || ended {
            let from = cursor;
            cursor = events.last().map_or(cursor, |e| e.seq);
            tx.send_replace(Arc::new(Tail {
                from,
                upto: cursor,
                events,
                ended,
                error: None,
            }));
        }
        if ended || engine.shutdown.is_cancelled() {
            engine.watches.forget(&key, &tx, true);
            return;
        }
        if more {
            continue;
        }
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        tokio::select! {
            _ = engine.wait_change(notified, far) => {}
            _ = tx.closed() => {}
        }
        if engine.watches.forget(&key, &tx, false) {
            return;
        }
    }
}

/// One watcher's events, ended by an error if its client read too slowly.
#[derive(Debug)]
pub struct Watch {
    events: mpsc::Receiver<Result<HistoryEvent>>,
    dropped: Arc<Mutex<Option<Error>>>,
}

impl Stream for Watch {
    type Item = Result<HistoryEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.events.poll_recv(cx) {
            Poll::Ready(None) => Poll::Ready(self.dropped.lock().unwrap_or_else(|e| e.into_inner()).take().map(Err)),
            other => other,
        }
    }
}

/// Why a watcher stopped early.
enum Stop {
    /// Its client went away, or read too slowly.
    Client,
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Failed(e)
    }
}

/// One watcher: sends its client the events after `after`, in order, each once.
struct Watcher {
    engine: Arc<Engine>,
    key: Key,
    after: i64,
    tx: mpsc::Sender<Result<HistoryEvent>>,
    dropped: Arc<Mutex<Option<Error>>>,
}

impl Watcher {
    /// Sends `e` unless it was sent; fails if the client went away or did not take it within
    /// `slow_reader_timeout`.
    async fn send(&mut self, e: HistoryEvent) -> Result<(), Stop> {
        if e.seq <= self.after {
            return Ok(());
        }
        let seq = e.seq;
        let timeout = self.engine.config.slow_reader_timeout;
        match tokio::time::timeout(timeout, self.tx.send(Ok(e))).await {
            Ok(Ok(())) => {
                self.after = seq;
                Ok(())
            }
            Ok(Err(_)) => Err(Stop::Client),
            Err(_) => {
                tracing::debug!(run = %self.key.1, "a watcher's client read too slowly; ending its watch");
                *self.dropped.lock().unwrap_or_else(|e| e.into_inner()) = Some(Error::ResourceExhausted(format!(
                    "this watch was ended: its client did not take the next event within {timeout:?} \
                     (slow_reader_timeout); watch again from the last seq received"
                )));
                Err(Stop::Client)
            }
        }
    }

    /// Reads and sends the history after `after` on its own, up to what is written now.
    async fn catch_up(&mut self) -> Result<(), Stop> {
        loop {
            let (ns, id) = (&self.key.0, self.key.1);
            let (events, more) = self
                .engine
                .store
                .history(ns, id, self.after, HISTORY_PAGE, PAGE_BYTES)
                .await?;
            for e in events {
                self.send(e).await?;
            }
            if !more {
                return Ok(());
            }
        }
    }

    async fn run(&mut self) -> Result<(), Stop> {
        self.catch_up().await?;
        let mut tail = self.engine.watches.follow(&self.engine, &self.key, self.after);
        loop {
            let now = tail.borrow_and_update().clone();
            if let Some(e) = &now.error {
                return Err(Stop::Failed(e.clone()));
            }
            if self.after < now.from {
                // Behind what the tail holds: read the gap. Whatever the tail held when this
                // read began, the read has it too.
                self.catch_up().await?;
                self.after = self.after.max(now.upto);
                continue;
            }
            for e in &now.events {
                self.send(e.clone()).await?;
            }
            if now.ended {
                return Ok(());
            }
            tokio::select! {
                changed = tail.changed() => {
                    if changed.is_err() && !tail.borrow().ended {
                        // The reader stopped without an end: the server is shutting down.
                        return Ok(());
                    }
                }
                _ = self.tx.closed() => return Err(Stop::Client),
                _ = self.engine.shutdown.cancelled() => return Ok(()),
            }
        }
    }
}

impl Engine {
    /// Streams a run's history after `after_seq` (the caller was authorized and the run found).
    pub(super) fn watch_events(self: &Arc<Self>, namespace: String, id: Uuid, after_seq: i64) -> Watch {
        // One event at a time: a slow client holds up one event here, not a backlog.
        let (tx, rx) = mpsc::channel(1);
        let dropped = Arc::new(Mutex::new(None));
        let mut watcher = Watcher {
            engine: self.clone(),
            key: (namespace, id),
            after: after_seq,
            tx,
            dropped: dropped.clone(),
        };
        tokio::spawn(async move {
            if let Err(Stop::Failed(e)) = watcher.run().await {
                let _ = watcher.tx.send(Err(e)).await;
            }
        });
        Watch { events: rx, dropped }
    }
}

//! The timers of suspended runs: each server wakes the runs whose sleep (or wait's timeout)
//! ends, armed from what it suspended and from the earliest `wake_at` in the database.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    store::Store,
    wake::{TIMER_SLACK, Wakers},
};

/// Most suspended runs woken per statement.
const WAKE_BATCH: i64 = 1000;
/// Most sleep timers kept; the earliest always is, and every firing re-arms from the database.
const MAX_SLEEP_TIMERS: usize = 100_000;

/// Wakes suspended runs when their sleep ends: a timer per suspension made through this server
/// (`deadlines`), and after each firing and at start the earliest wake time in the database,
/// so runs suspended through other servers (or before a restart) wake on time too. The
/// reaper's tick is the last resort (see `reaper.rs`).
pub async fn sleepers(
    store: Store,
    wakers: Arc<Wakers>,
    mut deadlines: mpsc::UnboundedReceiver<Instant>,
    shutdown: CancellationToken,
) {
    let mut heap: BinaryHeap<Reverse<Instant>> = BinaryHeap::new();
    let arm_from_db = |heap: &mut BinaryHeap<Reverse<Instant>>, next: Option<Duration>| {
        if let Some(d) = next {
            heap.push(Reverse(Instant::now() + d + TIMER_SLACK));
        }
    };
    if let Ok(next) = store.next_wake().await {
        arm_from_db(&mut heap, next);
    }
    loop {
        let next = heap.peek().map(|r| r.0);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            at = deadlines.recv() => match at {
                Some(at) if heap.len() < MAX_SLEEP_TIMERS || next.is_some_and(|n| at < n) => {
                    heap.push(Reverse(at + TIMER_SLACK));
                }
                Some(_) => {}
                None => return,
            },
            _ = async { tokio::time::sleep_until(next.unwrap_or_else(Instant::now).into()).await }, if next.is_some() => {
                while heap.peek().is_some_and(|r| r.0 <= Instant::now()) {
                    heap.pop();
                }
                wake_due(&store, &wakers).await;
                if let Ok(next) = store.next_wake().await {
                    arm_from_db(&mut heap, next);
                }
            }
        }
    }
}

/// Wakes every suspended run whose time has come, and the pollers of their queues.
pub async fn wake_due(store: &Store, wakers: &Wakers) {
    loop {
        match store.wake_due(WAKE_BATCH).await {
            Ok(woken) => {
                for w in &woken {
                    tracing::debug!(run_id = %w.id, status = %w.status, "run woke");
                    wakers.moved(w);
                }
                if (woken.len() as i64) < WAKE_BATCH {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "waking suspended runs failed");
                return;
            }
        }
    }
}

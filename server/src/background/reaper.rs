//! The reaper: ends expired leases. One server per database runs it at a time, elected by a
//! session-level advisory lock held on a dedicated connection; if that server dies, its
//! connection closes, the lock is freed and another replica takes over within seconds.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{database::Database, store::Store, wake::Wakers};

/// "aiki" + 2: the reaper's advisory lock key.
const REAPER_LOCK: i64 = 0x6169_6b69_0000_0002;
/// Most leases ended per statement.
const BATCH: i64 = 1000;

/// How often a server that is not the reaper tries again to take the lock: a takeover
/// happens within this pause of the leader's going.
const FOLLOWER_PAUSE: Duration = Duration::from_secs(3);

/// What the reaper needs to know of the server's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How often it looks for expired leases, timeouts and overdue sleepers.
    pub interval: Duration,
    /// A run whose lease expires more often ends `failed`.
    pub max_lease_expirations: u32,
    /// Workers silent for this long (holding no lease) are forgotten.
    pub worker_retention: Duration,
}

/// The reaper's parts.
struct Reaper {
    store: Store,
    wakers: Arc<Wakers>,
    settings: Settings,
}

/// Runs until `shutdown`: becomes the reaper when it can and reaps while it is; a connection
/// that fails is opened again after a second.
pub async fn run(store: Store, wakers: Arc<Wakers>, settings: Settings, pg: Database, shutdown: CancellationToken) {
    let reaper = Reaper {
        store,
        wakers,
        settings,
    };
    loop {
        match lead(&reaper, &pg, &shutdown).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, "reaper connection failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// On one session, tries to take the lock until it holds it (every [`FOLLOWER_PAUSE`]; the
/// session stays open meanwhile, so trying again costs no new connection), then reaps until
/// the server stops (`Ok`) or the connection fails (`Err`).
async fn lead(reaper: &Reaper, pg: &Database, shutdown: &CancellationToken) -> Result<(), String> {
    let (client, conn) = pg.connect().await.map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    loop {
        let got = crate::store::session::try_lock(&client, REAPER_LOCK)
            .await
            .map_err(|e| e.to_string())?;
        if got {
            break;
        }
        tokio::select! {
            _ = shutdown.cancelled() => { conn.abort(); return Ok(()); }
            _ = tokio::time::sleep(FOLLOWER_PAUSE) => {}
        }
    }
    tracing::info!("this server is the reaper");
    let mut last_forget = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(reaper.settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => { conn.abort(); return Ok(()); }
            _ = tick.tick() => {}
        }
        if conn.is_finished() {
            return Err("the lock connection closed".into());
        }
        loop {
            match reaper
                .store
                .expire_leases(BATCH, reaper.settings.max_lease_expirations)
                .await
            {
                Ok(expired) => {
                    for e in &expired {
                        tracing::warn!(run_id = %e.id, status = %e.status, "lease expired");
                        reaper.wakers.moved(e);
                    }
                    if (expired.len() as i64) < BATCH {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reaping failed");
                    break;
                }
            }
        }
        match reaper.store.time_out_runs(BATCH).await {
            Ok(moved) => {
                for m in &moved {
                    tracing::info!(run_id = %m.id, status = %m.status, "run timed out");
                    reaper.wakers.moved(m);
                }
            }
            Err(e) => tracing::warn!(error = %e, "applying timeouts failed"),
        }
        // Sleeping runs whose timer was on a server that went away.
        super::timers::wake_due(&reaper.store, &reaper.wakers).await;
        // Workers gone for good, every half retention (at most a minute) apart.
        let every = (reaper.settings.worker_retention / 2).clamp(reaper.settings.interval, Duration::from_secs(60));
        if last_forget.elapsed() >= every {
            last_forget = tokio::time::Instant::now();
            match reaper
                .store
                .forget_workers(reaper.settings.worker_retention, BATCH)
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(workers = n, "forgot workers not heard from within the retention"),
                Err(e) => tracing::warn!(error = %e, "forgetting gone workers failed"),
            }
        }
    }
}

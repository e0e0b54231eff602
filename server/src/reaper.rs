//! The reaper: ends expired leases. One server per database runs it at a time, elected by a
//! session-level advisory lock held on a dedicated connection; if that server dies, its
//! connection closes, the lock is freed and another replica takes over within seconds.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::service::Shared;

/// "aiki" + 2: the reaper's advisory lock key.
const REAPER_LOCK: i64 = 0x6169_6b69_0000_0002;
/// Most leases ended per statement.
const BATCH: i64 = 1000;

/// Runs until `shutdown`: tries to become the reaper, reaps while it is, retries otherwise.
pub async fn run(shared: Arc<Shared>, pg: tokio_postgres::Config, shutdown: CancellationToken) {
    loop {
        let pause = match lead(&shared, &pg, &shutdown).await {
            // Another server leads: try again now and then (takeover within this pause).
            Ok(()) => Duration::from_secs(3),
            Err(e) => {
                tracing::warn!(error = %e, "reaper connection failed");
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Holds the lock and reaps until the connection fails or the server stops. Returns `Ok` when
/// the lock is held by another server.
async fn lead(shared: &Shared, pg: &tokio_postgres::Config, shutdown: &CancellationToken) -> Result<(), String> {
    let (client, conn) = pg.connect(tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let got = crate::store::session::try_lock(&client, REAPER_LOCK)
        .await
        .map_err(|e| e.to_string())?;
    if !got {
        conn.abort();
        return Ok(());
    }
    tracing::info!("this server is the reaper");
    let mut tick = tokio::time::interval(shared.config.reaper_interval);
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
            match shared
                .store
                .expire_leases(BATCH, shared.config.max_lease_expirations)
                .await
            {
                Ok(expired) => {
                    for e in &expired {
                        tracing::warn!(run_id = %e.id, status = %e.status, "lease expired");
                        shared.wakers.runs.wake(&e.id);
                        if e.status == "queued" {
                            shared.wakers.queue_ready((e.namespace.clone(), e.queue.clone()), None);
                        }
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
        match shared.store.time_out_runs(BATCH).await {
            Ok(moved) => {
                for m in &moved {
                    tracing::info!(run_id = %m.id, status = %m.status, "run timed out");
                    shared.wakers.runs.wake(&m.id);
                    if m.status == "queued" {
                        shared.wakers.queue_ready((m.namespace.clone(), m.queue.clone()), None);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "applying timeouts failed"),
        }
        // Sleeping runs whose timer was on a server that went away.
        crate::wake::wake_due(&shared.store, &shared.wakers).await;
    }
}

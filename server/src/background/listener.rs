//! The listener of ready notifications: one dedicated connection per server that turns every
//! replica's `NOTIFY aiki_ready` into wake-ups of this server's pollers.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{database::Database, store::Store, wake::Wakers};

/// Listens on the channel `aiki_ready` (`store/sql/session/listen_ready.sql`) with a dedicated connection and wakes local pollers. After
/// each (re)connection it wakes every poller and re-arms the timers of delayed runs (a
/// notification may have been missed meanwhile), and it checks the connection every 30 s so a
/// half-open one is noticed. Reconnects with backoff.
pub async fn listen(pg: Database, store: Store, wakers: Arc<Wakers>, shutdown: CancellationToken) {
    let mut delay = Duration::from_millis(100);
    loop {
        match listen_once(&pg, &store, &wakers, &shutdown).await {
            Ok(()) => return,
            Err((connected, e)) => {
                tracing::warn!(error = %e, "notification listener lost its connection");
                if connected {
                    delay = Duration::from_millis(100);
                }
            }
        }
        wakers.queues.wake_all();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Returns `Ok` at shutdown, else the error and whether it had connected.
async fn listen_once(
    pg: &Database,
    store: &Store,
    wakers: &Wakers,
    shutdown: &CancellationToken,
) -> Result<(), (bool, String)> {
    let (client, mut conn) = pg.connect().await.map_err(|e| (false, e.to_string()))?;
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
    let result = async {
        crate::store::session::listen_ready(&client).await.map_err(|e| (false, e.to_string()))?;
        tracing::debug!("listening for ready notifications");
        // Whatever became ready, or was delayed, while we were not listening.
        wakers.queues.wake_all();
        for (ns, queue, delay) in store.next_visible().await.map_err(|e| (true, e.to_string()))? {
            wakers.queue_ready((ns, queue), Some(delay));
        }
        let mut check = tokio::time::interval(Duration::from_secs(30));
        check.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                msg = rx.recv() => match msg {
                    Some(Ok(payload)) => wakers.on_payload(&payload),
                    Some(Err(e)) => return Err((true, e.to_string())),
                    None => return Err((true, "the connection closed".to_owned())),
                },
                _ = check.tick() => {
                    let ping = tokio::time::timeout(Duration::from_secs(10), crate::store::session::ping(&client)).await;
                    if !matches!(ping, Ok(Ok(_))) {
                        return Err((true, "the connection stopped answering".to_owned()));
                    }
                }
            }
        }
    }
    .await;
    driver.abort();
    result
}

//! Leases: claiming ready runs (the hot path of a poll), extending them by heartbeat, and ending
//! the expired ones (the reaper).

use super::*;

impl Store {
    /// Leases up to `max` ready runs of one queue to `worker` for `ttl`, with the task results
    /// recorded so far.
    #[instrument(name = "store.run.claim", skip_all, fields(queue, max))]
    pub async fn claim(
        &self,
        namespace: &str,
        queue: &str,
        max: u32,
        worker: Uuid,
        ttl: Duration,
        served: &Registration,
    ) -> Result<Vec<LeasedRun>> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("leases/claim")).await?;
        let rows = client
            .query(
                &stmt,
                &[
                    &namespace,
                    &queue,
                    &(max as i64),
                    &worker,
                    &ms(ttl),
                    &served.workflows,
                    &served.versions,
                    &served.key,
                ],
            )
            .await?;
        // Only runs leased before can have recorded tasks: `ids` names them.
        let (mut runs, ids) = leased_from_rows(&rows)?;
        if !ids.is_empty() {
            let stmt = client.prepare_cached(sql!("leases/tasks_of_runs")).await?;
            let at: std::collections::HashMap<String, usize> =
                runs.iter().enumerate().map(|(i, l)| (l.run_id.clone(), i)).collect();
            for row in client.query(&stmt, &[&namespace, &ids]).await? {
                let run_id: Uuid = row.get("run_id");
                if let Some(&i) = at.get(&run_id.to_string()) {
                    runs[i].tasks.push(task_from_row(&row)?);
                }
            }
        }
        Ok(runs)
    }

    /// Whether queue `queue` holds a ready run that a worker serving `served` could take; see
    /// `sql/leases/claim_skipped.sql`. Asked by a poll whose claims leased nothing.
    #[instrument(name = "store.queue.ready_left", skip_all, fields(queue))]
    pub async fn ready_left(&self, namespace: &str, queue: &str, served: &Registration) -> Result<bool> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("leases/claim_skipped")).await?;
        let row = client
            .query_one(&stmt, &[&namespace, &queue, &served.workflows, &served.versions])
            .await?;
        Ok(row.get(0))
    }

    /// Extends the leases a worker names; see `sql/leases/heartbeat.sql`.
    #[instrument(name = "store.worker.heartbeat", skip_all, fields(leases = ids.len()))]
    pub async fn heartbeat(
        &self,
        namespace: &str,
        worker: Uuid,
        ids: &[Uuid],
        tokens: &[Uuid],
        ttl: Duration,
    ) -> Result<HeartbeatOutcome> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("leases/heartbeat")).await?;
        let row = client
            .query_one(&stmt, &[&namespace, &worker, &ids, &tokens, &ms(ttl)])
            .await?;
        Ok(HeartbeatOutcome {
            worker_known: row.get("worker_known"),
            held: row.get("held"),
            ended: row.get("ended"),
            cancel: row.get("cancel"),
            pause: row.get("pause"),
            expires: row.get("expires"),
        })
    }

    /// Ends up to `limit` expired leases (see `sql/leases/expire.sql`).
    #[instrument(name = "store.leases.expire", skip_all)]
    pub async fn expire_leases(&self, limit: i64, max_expirations: u32) -> Result<Vec<Moved>> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let stmt = tx.prepare_cached(sql!("leases/expire")).await?;
        let rows = tx.query(&stmt, &[&limit, &(max_expirations as i32)]).await?;
        let expired = moved_runs(&tx, &rows).await?;
        tx.commit().await?;
        Ok(expired)
    }
}

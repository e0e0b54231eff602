//! Queues as operators see them: counts by status, the oldest ready run, and the runs nobody
//! serves.

use super::*;

impl Store {
    /// Depth per state of every queue of a namespace, and which queued runs no worker that
    /// heartbeat within `live` can lease.
    #[instrument(name = "store.queues.list", skip_all)]
    pub async fn list_queues(&self, namespace: &str, live: Duration) -> Result<Vec<Queue>> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("queues/list")).await?;
        let mut queues: Vec<Queue> = client
            .query(&stmt, &[&namespace])
            .await?
            .iter()
            .map(queue_from_row)
            .collect();
        let stmt = client.prepare_cached(sql!("queues/unserved")).await?;
        for row in client.query(&stmt, &[&namespace, &ms(live)]).await? {
            let queue: String = row.get("queue");
            let workflow: String = row.get("workflow");
            let version: String = row.get("version");
            let reason = match (version.as_str(), row.get::<_, bool>("other_versions")) {
                ("", _) => format!("no live worker serves workflow {workflow:?} on queue {queue:?}"),
                (v, true) => format!(
                    "no live worker serves version {v:?} of workflow {workflow:?} on queue {queue:?} \
                     (live workers serve other versions)"
                ),
                (v, false) => {
                    format!("no live worker serves workflow {workflow:?} (version {v:?}) on queue {queue:?}")
                }
            };
            if let Some(q) = queues.iter_mut().find(|q| q.name == queue) {
                q.unserved.push(UnservedRuns {
                    workflow,
                    version,
                    count: row.get::<_, i64>("n").max(0) as u64,
                    reason,
                });
            }
        }
        Ok(queues)
    }
}

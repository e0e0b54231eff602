//! A run's history: the events of `run_events` and those kept on the run's row (see the view
//! `run_history`).

use super::*;

impl Store {
    /// History events of a run after `after_seq`, oldest first, at most `limit`.
    #[instrument(name = "store.run.history", skip_all)]
    pub async fn history(&self, namespace: &str, id: Uuid, after_seq: i64, limit: i64) -> Result<Vec<HistoryEvent>> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("history/list")).await?;
        let rows = client.query(&stmt, &[&namespace, &id, &after_seq, &limit]).await?;
        rows.iter().map(event_from_row).collect()
    }
}

//! A run's history: the events of `run_events` and those kept on the run's row (see the view
//! `run_history`).

use super::*;

impl Store {
    /// History events of a run after `after_seq`, oldest first: at most `limit`, and no more
    /// than fit in `max_bytes` of details (the first always). Answers whether more follow.
    #[instrument(name = "store.run.history", skip_all)]
    pub async fn history(
        &self,
        namespace: &str,
        id: Uuid,
        after_seq: i64,
        limit: i64,
        max_bytes: usize,
    ) -> Result<(Vec<HistoryEvent>, bool)> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("history/list")).await?;
        let rows = client
            .query(&stmt, &[&namespace, &id, &after_seq, &limit, &(max_bytes as i64)])
            .await?;
        let more = page_is_cut(&rows, limit);
        Ok((rows.iter().map(event_from_row).collect::<Result<_>>()?, more))
    }
}

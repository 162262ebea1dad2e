//! Accounting of each request (a simple Query, or an extended batch up to Sync): its
//! latency and count in the shard's statistics, the debug event per request, and the slow
//! query log.

use super::Session;

impl Session {
    /// A request goes to the server now (the first of a pipeline starts the clock).
    pub(super) fn started(&mut self) {
        self.req_start.get_or_insert_with(std::time::Instant::now);
    }

    /// The server answered a request with ReadyForQuery.
    pub(super) fn finished(&mut self, status: u8) {
        self.cancel.set_status(status);
        let stats = &self.db.shards[self.shard].stats;
        if let Some(t) = self.req_start.take() {
            let took = t.elapsed();
            stats.latency.observe(took);
            tracing::debug!(
                shard = self.shard,
                replica = self.reads.on_replica,
                kind = "single shard",
                micros = took.as_micros() as u64,
                "request done"
            );
            if self.slow.is_some_and(|s| took >= s) {
                let text = self.slow_text.take();
                let text = text
                    .as_deref()
                    .map(|t| String::from_utf8_lossy(&t[..t.len().min(500)]).into_owned());
                tracing::warn!(
                    shard = self.shard,
                    replica = self.reads.on_replica,
                    ms = took.as_millis() as u64,
                    statement = text.as_deref().unwrap_or("(extended protocol batch)"),
                    "slow query"
                );
            }
        }
        crate::metrics::inc(&stats.queries);
        if status == b'I' {
            crate::metrics::inc(&stats.transactions);
        }
    }
}

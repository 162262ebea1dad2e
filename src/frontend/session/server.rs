//! The server connection of a session: attaching one (with the client's settings and a
//! deferred BEGIN), giving it back clean, and what happens when it fails.

use super::*;

impl Session {
    /// Attaches a server connection if none is; on failure the client got the error.
    pub(super) async fn attach(&mut self, shard: usize) -> bool {
        if self.backend.is_some() {
            return true;
        }
        let paused = self.ops.as_ref().is_some_and(|o| o.gate.is_paused());
        if paused {
            return Box::pin(self.attach_new(shard, None)).await;
        }
        let picked = self.pick_node(shard);
        // The common case, without a future: an idle connection to the node picked.
        if let Ok((node, read)) = picked
            && let Some(b) = self.db.shards[shard].nodes[node].pool.try_get()
        {
            self.attached_node(shard, node, read);
            self.install(b, shard);
            return true;
        }
        // Boxed: the checkout future is large, and building it in place would make every
        // per-frame future as large (and as costly to move).
        Box::pin(self.attach_new(shard, Some(picked))).await
    }

    /// The statement that gives a server connection this client's session settings.
    pub(super) fn settings_sql(&self) -> String {
        let mut sql = String::from("RESET ALL");
        if !self.settings.is_empty() {
            sql.push_str("; SELECT ");
            let calls: Vec<String> = self
                .settings
                .iter()
                .map(|(k, v)| {
                    format!(
                        "pg_catalog.set_config({}, {}, false)",
                        quote_literal(k),
                        quote_literal(v)
                    )
                })
                .collect();
            sql.push_str(&calls.join(", "));
        }
        sql
    }

    /// Attaches with a checkout that may wait; `picked` is the node already chosen, if any.
    pub(super) async fn attach_new(
        &mut self,
        shard: usize,
        picked: Option<Result<(usize, bool), crate::cluster::NodeError>>,
    ) -> bool {
        if let Some(ops) = &self.ops
            && ops.gate.is_paused()
            && self.multi.parked.is_empty()
        {
            // PAUSE: a new transaction waits for RESUME.
            let gate = ops.gate.clone();
            let _ = self.flush_client().await;
            gate.wait().await;
        }
        let picked = match picked {
            Some(p) => p,
            None => self.pick_node(shard),
        };
        let checkout = match picked {
            Ok((node, read)) => {
                let mut r = exec::checkout(&self.db, shard, node).await;
                self.attached_node(shard, node, read);
                if read && matches!(r, Err(PoolError::Down(_))) {
                    // A node that died since the last check: the read goes to another
                    // that can take it (the primary first) instead of failing.
                    for other in self.db.read_fallbacks(shard, node) {
                        r = exec::checkout(&self.db, shard, other).await;
                        if r.is_ok() {
                            self.attached_node(shard, other, true);
                            break;
                        }
                    }
                }
                r
            }
            Err(e) => Err(PoolError::Down(e.to_string())),
        };
        match checkout {
            Ok(b) => {
                self.install(b, shard);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "no server connection");
                let err = match &e {
                    PoolError::Timeout(..) => PgError::new("53300", e.to_string()),
                    PoolError::Down(m) => PgError::new("08006", format!("server unavailable: {m}")),
                };
                // Counted like the servers' errors: an operator pages on these.
                self.db.shards[shard].stats.error(err.code);
                self.relay.drain_local(&mut self.cout);
                err.write(&mut self.cout);
                false
            }
        }
    }

    /// Makes a checked-out connection the session's: the client's settings and a deferred
    /// BEGIN go first.
    fn install(&mut self, mut b: Pooled, shard: usize) {
        if b.settings != self.settings_fp {
            let sql = self.settings_sql();
            self.relay.push(Pending::Internal);
            protocol::write_query(&mut self.bout, &sql);
            b.settings = self.settings_fp;
        }
        self.replay_sql_prepared();
        if let Some(begin) = self.route.deferred_begin.take() {
            self.relay.push(Pending::Internal);
            protocol::write_query(&mut self.bout, &begin);
            self.multi.begin.get_or_insert_with(|| begin.clone());
            self.route.movable_begin = Some(begin);
        }
        self.cancel.set(Some((&b.addr, b.pid, b.secret)));
        self.backend = Some(b);
        self.shard = shard;
    }

    /// In transaction mode, returns the server connection once the client is between
    /// transactions and nothing is in flight.
    pub(super) async fn maybe_release(&mut self) {
        if self.mode != PoolMode::Transaction
            || self.status != b'I'
            || self.in_batch
            || self.in_copy
            || !self.relay.idle()
            || !self.bout.is_empty()
        {
            return;
        }
        let Some(mut b) = self.backend.take() else {
            return;
        };
        self.cancel.set(None);
        if self.reads.capture_lsn && self.reads.executed {
            // The client has its answer before pgshard asks for the WAL position; in
            // `read_acknowledged_writes` after, so that no other client can have heard
            // of the commit before reads are held to it.
            let shared =
                self.db.config.consistency == crate::config::Consistency::ReadAcknowledgedWrites;
            if !shared && self.flush_client().await.is_err() {
                self.client_eof = true;
            }
            if !Box::pin(self.note_commit_lsn(&mut b)).await {
                b.broken = true;
                return;
            }
        }
        if self.holds_sql_prepared() {
            // Boxed: a future that most releases never create.
            Box::pin(self.release_sql_prepared(&mut b)).await;
        }
        if self.settings_dirty && !b.broken {
            Box::pin(self.release_dirty(b)).await;
        }
    }

    /// Releases a server connection after reading the settings the client changed on it.
    pub(super) async fn release_dirty(&mut self, mut b: Pooled) {
        self.settings_dirty = false;
        {
            match capture_settings(&mut b).await {
                Ok(s) => {
                    self.settings = s;
                    self.settings_fp = fingerprint(&self.settings);
                    b.settings = self.settings_fp;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not read session settings; closing server connection");
                    b.broken = true;
                }
            }
        }
        drop(b);
    }

    /// Lets go of a failed server connection (closed, never reused) and of the other
    /// shards of its transaction; returns how many ReadyForQuery the client is still owed.
    fn drop_failed_backend(&mut self) -> usize {
        self.drop_parked();
        if let Some(mut b) = self.backend.take() {
            b.broken = true;
        }
        self.cancel.set(None);
        let due = self.relay.ready_due();
        self.relay = Relay::default();
        due
    }

    /// The server sent FATAL (already relayed to the client as the error of the request
    /// in progress) and is closing.
    pub(super) fn backend_fatal(&mut self) {
        tracing::warn!("server connection ended with FATAL");
        let due = self.drop_failed_backend();
        if self.mode == PoolMode::Session || due == 0 {
            // As PostgreSQL: after FATAL the connection is over.
            self.client_eof = true;
            return;
        }
        self.status = b'I';
        protocol::write_ready(&mut self.cout, b'I');
        for _ in 1..due {
            PgError::new("08006", "server connection lost (terminated by the server)")
                .write(&mut self.cout);
            protocol::write_ready(&mut self.cout, b'I');
        }
        if self.in_batch {
            self.local_skip = true;
        }
        self.in_batch = false;
        self.in_copy = false;
    }

    /// The server connection failed under this client.
    pub(super) fn backend_lost(&mut self, why: String) {
        tracing::warn!(error = %why, "server connection lost");
        let due = self.drop_failed_backend();
        let message = format!("server connection lost: {why}");
        if self.mode == PoolMode::Session || (due == 0 && !self.in_batch) {
            // Nothing is in flight: an unsolicited ERROR would be taken as the answer to the
            // client's next request. PostgreSQL sends FATAL and closes; so do we. (In
            // session mode the session's state is gone in any case.)
            PgError::fatal("08006", message).write(&mut self.cout);
            self.client_eof = true;
            return;
        }
        PgError::new("08006", message)
            .with_hint("The transaction, if any, was rolled back; retry it.")
            .write(&mut self.cout);
        self.status = b'I';
        for _ in 0..due {
            protocol::write_ready(&mut self.cout, b'I');
        }
        if self.in_batch {
            self.local_skip = true;
        }
        self.in_batch = false;
        self.in_copy = false;
    }

    /// Gives the server connection back clean when the client leaves.
    pub(super) async fn finish(&mut self) {
        for (_, mut b) in std::mem::take(&mut self.multi.parked) {
            super::multi::roll_back(&mut b).await;
        }
        let Some(mut b) = self.backend.take() else {
            return;
        };
        self.cancel.set(None);
        if !self.relay.idle() || self.in_copy || b.broken {
            b.broken = true;
            return;
        }
        // DISCARD ALL also takes the client's SQL-level prepared statements away.
        let discard =
            self.mode == PoolMode::Session || self.settings_dirty || self.holds_sql_prepared();
        let status = self.status;
        let reset = async {
            if status != b'I' {
                b.run_quiet("ROLLBACK").await?;
            }
            if discard {
                b.run_quiet("DISCARD ALL").await?;
                b.prepared.clear();
                b.settings = 0;
            }
            Ok::<_, crate::backend::BackendError>(())
        };
        match tokio::time::timeout(std::time::Duration::from_secs(5), reset).await {
            Ok(Ok(())) => {}
            _ => b.broken = true,
        }
    }
}

/// Reads the settings a session changed, so they can be replayed on another connection.
pub(super) async fn capture_settings(
    b: &mut crate::backend::BackendConn,
) -> Result<Vec<(String, String)>, crate::backend::BackendError> {
    let rows = b
        .query_rows(
            "SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session' ORDER BY name",
        )
        .await?;
    let mut out: Vec<(String, String)> = rows
        .into_iter()
        .filter_map(|mut r| {
            let v = r.pop()??;
            let k = r.pop()??;
            Some((k, v))
        })
        .collect();
    out.sort();
    Ok(out)
}

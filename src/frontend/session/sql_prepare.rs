//! SQL-level `PREPARE` in transaction mode, on a database without sharding rules. A
//! statement a client prepares with `PREPARE` lives in one server session: left on a pooled
//! connection, another client could `EXECUTE` it, or see its own `PREPARE` of the same name
//! fail. So pgshard keeps each client's `PREPARE` texts, runs them on every server
//! connection the client gets (after its settings, before its first statement there), and
//! deallocates them when the client lets go of the connection. Which statements exist is
//! read from the server (`pg_prepared_statements`) at that point, so a `PREPARE` that failed
//! or was deallocated is not kept.

use super::*;

/// A client's SQL-level prepared statements.
#[derive(Default)]
pub(super) struct SqlPrepared {
    /// Name (as the server knows it) → the client's `PREPARE` statement.
    kept: HashMap<String, String>,
    /// `PREPARE` statements sent on the attached connection since it was installed.
    seen: Vec<(String, String)>,
    /// The attached connection may hold some of the client's statements.
    held: bool,
}

impl Session {
    /// Whether pgshard keeps the client's SQL-level prepared statements itself.
    fn keeps_sql_prepared(&self) -> bool {
        self.mode == PoolMode::Transaction && !self.db.router.is_sharded()
    }

    /// The client sends `PREPARE name ...` (`text`, one statement).
    pub(super) fn note_sql_prepare(&mut self, name: String, text: &str) {
        if self.keeps_sql_prepared() {
            self.sql.seen.push((name, text.to_string()));
            self.sql.held = true;
        }
    }

    /// Every `PREPARE` in a Parse's query text.
    pub(super) fn note_sql_prepares_in(&mut self, query: &[u8]) {
        let Ok(sql) = std::str::from_utf8(query) else {
            return;
        };
        for st in router::split_statements(sql) {
            if let StatementKind::Prepare(name) = router::classify(st) {
                self.note_sql_prepare(name, st);
            }
        }
    }

    /// `DEALLOCATE name` of a statement that is not a protocol-level one: the tag to
    /// answer with here, `None` to let the attached server answer, or the error.
    pub(super) fn deallocate_sql(&mut self, name: &str) -> Result<Option<&'static str>, PgError> {
        let kept = self.sql.kept.remove(name).is_some();
        if self.sql.held && self.backend.is_some() {
            // The server holds the statement if it exists: it deallocates, or says why not.
            self.sql.seen.retain(|(n, _)| n != name);
            return Ok(None);
        }
        if kept {
            Ok(Some("DEALLOCATE"))
        } else {
            Err(prepared::missing_statement(name.as_bytes()))
        }
    }

    /// `DISCARD ALL` or `DEALLOCATE ALL` (which the server runs too).
    pub(super) fn forget_sql_prepared(&mut self) {
        self.sql.kept.clear();
        self.sql.seen.clear();
    }

    /// A newly installed server connection gets the client's statements.
    pub(super) fn replay_sql_prepared(&mut self) {
        if self.sql.kept.is_empty() {
            return;
        }
        for text in self.sql.kept.values() {
            // One query each: a failure (a table dropped since) does not stop the others.
            self.relay.push(Pending::Internal);
            protocol::write_query(&mut self.bout, text);
        }
        self.sql.held = true;
    }

    /// Before the connection goes back to the pool: reads which of the client's
    /// statements exist there, keeps those, and deallocates them. A connection that
    /// cannot be cleaned is closed.
    pub(super) async fn release_sql_prepared(&mut self, b: &mut Pooled) {
        self.sql.held = false;
        let seen = std::mem::take(&mut self.sql.seen);
        let rows = match b
            .query_rows("SELECT name FROM pg_catalog.pg_prepared_statements WHERE from_sql")
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "could not read SQL prepared statements; closing server connection");
                b.broken = true;
                return;
            }
        };
        let mut kept = HashMap::new();
        let mut deallocate = String::new();
        for name in rows
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
        {
            deallocate.push_str(&format!("DEALLOCATE {};", crate::sql::quote_ident(&name)));
            let text = seen
                .iter()
                .rev()
                .find(|(n, _)| *n == name)
                .map(|(_, t)| t.clone())
                .or_else(|| self.sql.kept.remove(&name));
            if let Some(t) = text {
                kept.insert(name, t);
            }
        }
        self.sql.kept = kept;
        if !deallocate.is_empty()
            && let Err(e) = b.run_quiet(&deallocate).await
        {
            tracing::warn!(error = %e, "could not deallocate SQL prepared statements; closing server connection");
            b.broken = true;
        }
    }

    /// Whether the attached connection may hold the client's statements.
    pub(super) fn holds_sql_prepared(&self) -> bool {
        self.sql.held
    }
}

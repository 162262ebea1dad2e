//! SQL-level `PREPARE`. A statement a client prepares with `PREPARE` lives in one server
//! session: left on a pooled connection, another client could `EXECUTE` it, or see its own
//! `PREPARE` of the same name fail.
//!
//! In transaction mode on a database without sharding rules, pgshard keeps each client's
//! `PREPARE` texts, runs them on every server connection the client gets (after its
//! settings, before its first statement there), and deallocates them when the client lets
//! go of the connection. Which statements exist is read from the server
//! (`pg_prepared_statements`) at that point, so a `PREPARE` that failed or was deallocated
//! is not kept.
//!
//! On a sharded database (any pooling mode) a prepared statement must run where each
//! `EXECUTE`'s arguments belong, not on the shard that prepared it. The `PREPARE` runs on
//! one server, which checks it as PostgreSQL would and infers its parameter types; pgshard
//! then keeps the statement and its types and deallocates it there at once. An `EXECUTE`
//! becomes the statement with its arguments cast to those types in place of the
//! parameters, routed like any other statement (`router::sql_prepared`).

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
    /// Sharded database: the client's statements, by name.
    routed: HashMap<String, Routed>,
}

impl SqlPrepared {
    /// The attached connection holds none of the client's statements, and none was seen
    /// there.
    fn nothing_held(&mut self) {
        self.held = false;
        self.seen.clear();
    }
}

/// A statement a client prepared on a sharded database.
struct Routed {
    /// The prepared statement: the `PREPARE`'s text after `AS`.
    body: String,
    /// Its parameters' types, as the server names them.
    types: Vec<String>,
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

    /// Whether pgshard keeps the client's statement `name` (sharded database). A Parse of
    /// that name must fail as it would on a server.
    pub(super) fn keeps_routed(&self, name: &[u8]) -> bool {
        !self.sql.routed.is_empty()
            && std::str::from_utf8(name).is_ok_and(|n| self.sql.routed.contains_key(n))
    }

    /// Whether the client has a statement `name` already: SQL-level and protocol-level
    /// statements share one namespace, as on a server.
    fn name_taken(&self, name: &str) -> bool {
        self.keeps_routed(name.as_bytes()) || self.statements.contains_key(name.as_bytes())
    }

    /// Forgets the client's statement `name` if pgshard keeps it (sharded database).
    pub(super) fn forget_routed(&mut self, name: &str) -> bool {
        self.sql.routed.remove(name).is_some()
    }

    /// `DISCARD ALL` or `DEALLOCATE ALL` (which the server runs too).
    pub(super) fn forget_sql_prepared(&mut self) {
        self.sql.kept.clear();
        self.sql.seen.clear();
        self.sql.routed.clear();
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
            .query_rows(
                "SELECT p.name, u.t::text FROM pg_catalog.pg_prepared_statements p \
                 LEFT JOIN LATERAL unnest(p.parameter_types) WITH ORDINALITY AS u(t, i) ON true \
                 WHERE p.from_sql ORDER BY p.name, u.i",
            )
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "could not read SQL prepared statements; closing server connection");
                b.broken = true;
                return;
            }
        };
        // Name and parameter types of each statement (one row per parameter, in order).
        let mut found: Vec<(String, Vec<String>)> = Vec::new();
        for row in rows {
            let mut row = row.into_iter();
            let (Some(Some(name)), ty) = (row.next(), row.next().flatten()) else {
                continue;
            };
            if found.last().is_none_or(|(n, _)| *n != name) {
                found.push((name, Vec::new()));
            }
            if let (Some(t), Some((_, types))) = (ty, found.last_mut()) {
                types.push(t);
            }
        }
        let sharded = self.db.router.is_sharded();
        let mut kept = HashMap::new();
        let mut deallocate = String::new();
        for (name, types) in found {
            deallocate.push_str(&format!("DEALLOCATE {};", crate::sql::quote_ident(&name)));
            let text = seen
                .iter()
                .rev()
                .find(|(n, _)| *n == name)
                .map(|(_, t)| t.clone())
                .or_else(|| self.sql.kept.remove(&name));
            match text {
                Some(t) if sharded => {
                    if let Some(body) = router::sql_prepared::prepared_body(&t) {
                        let body = body.to_string();
                        self.sql.routed.insert(name, Routed { body, types });
                    }
                }
                Some(t) => {
                    kept.insert(name, t);
                }
                None => {}
            }
        }
        if !sharded {
            self.sql.kept = kept;
        }
        if !deallocate.is_empty()
            && let Err(e) = b.run_quiet(&deallocate).await
        {
            tracing::warn!(error = %e, "could not deallocate SQL prepared statements; closing server connection");
            b.broken = true;
        }
    }

    /// `PREPARE name ...` alone in a simple query on a sharded database: it runs on one
    /// server (the attached one, or the home shard's primary), which answers the client;
    /// then pgshard keeps the statement (see the module's comment). A transaction it runs
    /// in can still move to another shard, as after settings.
    pub(super) async fn prepare_routed(
        &mut self,
        frame: Bytes,
        name: String,
    ) -> Result<(), SessionError> {
        if self.backend.is_some() && !self.relay.idle() {
            self.settle().await?;
        }
        if self.name_taken(&name) {
            self.answer_error(prepared::duplicate_statement(name.as_bytes()));
            return Ok(());
        }
        if self.status == b'E' {
            self.answer_error(super::route::aborted());
            return Ok(());
        }
        // The primary: a replica may not have the tables yet.
        self.reads.read_ok = false;
        if !self.use_shard(self.home_shard()).await? {
            protocol::write_ready(&mut self.cout, self.status);
            return Ok(());
        }
        let text = protocol::parse_query(&frame)?.to_string();
        self.sql.seen.push((name, text));
        self.sql.held = true;
        self.started();
        self.relay.push(Pending::Query);
        self.bout.extend_from_slice(&frame);
        self.settle().await?;
        self.keep_sql_prepared().await;
        self.maybe_release().await;
        Ok(())
    }

    /// After a `PREPARE` on a sharded database ran on the attached server: keeps the
    /// statement if it was prepared, and deallocates it there. (A release of the
    /// connection meanwhile did this already.)
    async fn keep_sql_prepared(&mut self) {
        if !self.sql.held {
            return;
        }
        // After an error the PREPARE failed: the server holds nothing, and could not be
        // asked.
        let attached = if self.status == b'E' {
            None
        } else {
            self.backend.take()
        };
        let Some(mut b) = attached else {
            self.sql.nothing_held();
            return;
        };
        self.release_sql_prepared(&mut b).await;
        self.backend = Some(b);
    }

    /// `PREPARE` in a query string of several statements on a sharded database (see
    /// `run_script`): its answer goes to `out`. False when the client got an error and
    /// the session's transaction is gone.
    pub(super) async fn prepare_in_script(
        &mut self,
        name: String,
        st: &str,
        out: &mut BytesMut,
    ) -> Result<bool, SessionError> {
        if self.name_taken(&name) {
            prepared::duplicate_statement(name.as_bytes()).write(out);
            self.status = b'E';
            return Ok(true);
        }
        if !self.enter_shard(self.home_shard()).await? {
            // The client has the error already.
            self.status = b'E';
            return Ok(true);
        }
        self.sql.seen.push((name, st.to_string()));
        self.sql.held = true;
        let Some(frames) = self.run_here(st).await? else {
            self.sql.nothing_held();
            return Ok(false);
        };
        self.keep_sql_prepared().await;
        for f in &frames {
            out.extend_from_slice(f);
        }
        Ok(true)
    }

    /// An `EXECUTE` of a statement the client prepared on a sharded database: the
    /// statement to run in its place, or the error PostgreSQL gives for the call. `None`
    /// when it is not such a call (the server answers it).
    pub(super) fn execute_routed(&self, st: &str) -> Option<Result<String, PgError>> {
        let call = router::sql_prepared::execute_call(st)?;
        let r = self.sql.routed.get(&call.name)?;
        if call.args.len() != r.types.len() {
            return Some(Err(PgError::new(
                "42601",
                format!(
                    "wrong number of parameters for prepared statement \"{}\"",
                    call.name
                ),
            )
            .with_detail(format!(
                "Expected {} parameters but got {}.",
                r.types.len(),
                call.args.len()
            ))));
        }
        Some(Ok(router::sql_prepared::substitute(
            &r.body, &call.args, &r.types,
        )))
    }

    /// Whether the attached connection may hold the client's statements.
    pub(super) fn holds_sql_prepared(&self) -> bool {
        self.sql.held
    }
}

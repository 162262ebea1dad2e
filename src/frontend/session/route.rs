//! Routing inside a session: which shard each statement runs on (extended-protocol
//! batches: extended.rs), switching server connections between transactions, and statements that need
//! several shards. Only used when the database has sharding rules.
//!
//! Extended-protocol messages are held while no server connection is attached, until a
//! message tells where the batch goes (a Bind, with its parameter values), so that the
//! whole batch reaches one server in order and PostgreSQL itself answers every message.

use super::{Session, SessionError};
use crate::config::PoolMode;
use crate::protocol::{self, PgError};
use crate::router::{self, Analysis, Kind, Params, Route, RouteError};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;

/// A merge over shards of a query that calls a user-defined aggregate (`names`, as the
/// monitor read them) is refused: pgshard would take it for a plain function and return
/// each shard's row. Grouped by the shard key, each shard computes it whole.
fn refuse_user_aggregates(a: &mut Analysis, sql: &str, names: &[String]) {
    let Some(Ok(spec)) = &a.merge else {
        return;
    };
    if names.is_empty() || spec.aggregates_whole() {
        return;
    }
    let lower = sql.to_ascii_lowercase();
    let calls = |name: &str| {
        let name = name.to_ascii_lowercase();
        lower.match_indices(&name).any(|(i, _)| {
            let before = lower[..i].chars().next_back();
            let after = lower[i + name.len()..].trim_start();
            !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '"')
                && after.starts_with('(')
        })
    };
    if let Some(name) = names.iter().find(|n| calls(n)) {
        a.merge = Some(Err(format!(
            "{name} is a user-defined aggregate, which pgshard cannot merge across shards; group by the shard key, add a shard key condition or a /* pgshard: shard=N */ hint"
        )));
    }
}

/// Statements analyses kept per session (the analysis is a pure function of the text).
pub(super) const CACHE_LIMIT: usize = 1024;

/// A session's routing state.
#[derive(Default)]
pub(super) struct RouteState {
    cache: HashMap<String, Result<Arc<Analysis>, router::AnalyzeError>>,
    /// The database's `user_aggregates_version` the cached analyses were made with.
    aggregates_version: u64,
    /// `SET pgshard.shard = N`, until `RESET pgshard.shard`.
    pub(super) forced: Option<usize>,
    /// Extended-protocol frames waiting for a routing decision.
    pub(super) held: Vec<Bytes>,
    /// Statement name -> (query, parameter types), to route Binds; "" is the unnamed one.
    pub(super) texts: HashMap<Bytes, (Bytes, Bytes)>,
    /// A BEGIN answered by pgshard, sent to the shard the transaction's first statement
    /// goes to (so that BEGIN does not pin the default shard).
    pub(super) deferred_begin: Option<String>,
    /// The BEGIN of the attached transaction while it has executed nothing but settings
    /// (`SET`, `RESET`, `set_config` selects: replayed where it moves): it can still move
    /// to another shard.
    pub(super) movable_begin: Option<String>,
    /// The last Bind, in a still movable transaction, bound such a setting.
    pub(super) setting_bind: bool,
    /// The batch (up to its Sync) has bound a statement that may write or lock; and
    /// whether it had before the Bind being routed (see `batch.rs`).
    pub(super) batch_writes: bool,
    /// Since the client's last Sync, a server got more of the batch than Parse, Describe
    /// and Close (a statement ran).
    pub(super) batch_ran: bool,
    pub(super) wrote_before_bind: bool,
    /// Set by `decide`: the statement it routed is a plain read (replica-safe).
    pub(super) decided_read: bool,
    /// Portals pgshard holds (merged rows, its own answers), see `portal.rs`.
    pub(super) portals: super::portal::VirtualPortals,
    /// The portal name of the Bind being routed.
    pub(super) bind_portal: bytes::Bytes,
    /// A directory-sharded key `decide` needs read from the directory first: (table
    /// index, key, record a new entry).
    pub(super) lookup: Option<(usize, String, bool)>,
    /// Tables whose generated keys `decide` needs checked on a shard first: (shard, tables).
    pub(super) keys_check: Option<(usize, Vec<usize>)>,
    /// The statement being routed is pgshard's own text (a statement whose subqueries it
    /// evaluated first): its analysis is not kept.
    pub(super) uncached: bool,
    /// A bound COPY over several shards that pgshard runs at Execute.
    pub(super) pending_copy: Option<(String, crate::router::copy::CopyStmt, super::copy::CopyPlan)>,
}

/// Where a statement goes.
pub(super) enum Dest {
    Shard(usize),
    Multi(Vec<usize>, Arc<Analysis>),
}

/// A Bind's parameters for routing: its values (`rest`, the Bind's body after its names)
/// with the types its statement's Parse declared.
pub(super) fn bound_params<'a>(
    types: &[u8],
    rest: &'a [u8],
) -> Result<Params<'a>, protocol::ProtocolError> {
    let (binary, values) = protocol::bind_params(rest)?;
    Ok(Params {
        values,
        binary,
        oids: protocol::parse_oids(types),
    })
}

fn route_err(e: RouteError) -> PgError {
    PgError::new(e.sqlstate(), e.to_string())
}

/// Whether a statement over several shards is a read pgshard can merge.
pub(super) fn mergeable(a: &Analysis) -> bool {
    (a.kind <= Kind::Read || a.locking_read) && a.merge.as_ref().is_some_and(|m| m.is_ok())
}

pub(super) fn cross_shard_txn(from: usize, to: &[usize]) -> PgError {
    PgError::new(
        "0A000",
        format!(
            "this transaction runs on shard {from}; the statement needs shard(s) {to:?}"
        ),
    )
    .with_hint("A transaction joins further shards between statements in transaction pooling mode; not in session mode, and not within one pipelined batch or multi-statement string.")
}

/// Statements that, naming a sharded or reference table, belong on every shard even when
/// the parser cannot read them: maintenance and DDL.
fn broadcast_unparsed(sql: &str) -> bool {
    let first = sql
        .trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    matches!(
        first.as_str(),
        "vacuum"
            | "analyze"
            | "analyse"
            | "reindex"
            | "cluster"
            | "grant"
            | "revoke"
            | "comment"
            | "alter"
            | "create"
            | "drop"
            | "truncate"
            | "security"
    )
}

/// Whether a statement begins or ends a transaction block. (Savepoints in a query
/// string reach every shard of the transaction first: `keep_in_step`.)
fn controls_transaction(st: &str) -> bool {
    matches!(
        router::classify(st),
        router::StatementKind::Begin | router::StatementKind::EndTransaction
    )
}

impl Session {
    /// A query string with transaction control (`COMMIT; SELECT 1`, `SELECT 1; COMMIT`)
    /// in a transaction over several shards: never sent to one of them as it is, which
    /// would end the transaction there only (and the others' work with it). A COMMIT or
    /// ROLLBACK first ends it on every shard, then the rest runs as a query string of
    /// its own; otherwise the statements run one by one (`run_script`: a COMMIT or
    /// ROLLBACK last ends the transaction on every shard; other shapes are refused).
    async fn control_string_over_shards(
        &mut self,
        sql: &str,
        statements: &[&str],
    ) -> Result<(), SessionError> {
        let first = statements[0];
        if router::classify(first) != router::StatementKind::EndTransaction {
            if self.status == b'E' {
                // As in PostgreSQL: the first statement fails, the rest is skipped.
                self.relay.drain_local(&mut self.cout);
                aborted().write(&mut self.cout);
                protocol::write_ready(&mut self.cout, b'E');
                return Ok(());
            }
            return self.run_script(sql).await;
        }
        let ended = self.end_multi(first).await?;
        self.relay.drain_local(&mut self.cout);
        match ended {
            Ok(tag) => {
                protocol::write_complete(&mut self.cout, tag);
                let params = self.ended_params();
                self.cout.extend_from_slice(&params);
            }
            Err(frame) => {
                // The COMMIT failed: as in PostgreSQL, the rest of the string is skipped.
                self.cout.extend_from_slice(&frame);
                protocol::write_ready(&mut self.cout, self.status);
                return Ok(());
            }
        }
        let Some(second) = statements.get(1) else {
            protocol::write_ready(&mut self.cout, self.status);
            return Ok(());
        };
        // (The statements are slices of `sql`.)
        let rest = &sql[second.as_ptr() as usize - sql.as_ptr() as usize..];
        let single = (statements.len() == 2).then(|| router::classify(second));
        let mut frame = bytes::BytesMut::new();
        protocol::write_query(&mut frame, rest);
        Box::pin(self.route_query(frame.freeze(), single)).await
    }
}

/// The error of a statement in an aborted transaction.
pub(super) fn aborted() -> PgError {
    PgError::new(
        "25P02",
        "current transaction is aborted, commands ignored until end of transaction block",
    )
}

/// Whether a statement starts with COPY (after blanks and comments).
pub(super) fn is_copy(sql: &str) -> bool {
    let mut s = sql.trim_start();
    while let Some(rest) = s.strip_prefix("/*") {
        s = rest.split_once("*/").map_or("", |x| x.1).trim_start();
    }
    s.len() >= 4 && s[..4].eq_ignore_ascii_case("copy")
}

/// `SET pgshard.shard = N` / `RESET pgshard.shard`: Some(Some(n)), Some(None), or None if
/// the statement is something else.
fn pgshard_set(sql: &str) -> Option<Result<Option<usize>, String>> {
    pgshard_setting(sql, "shard").map(|v| match v {
        None => Ok(None),
        Some(v) => v.parse::<usize>().map(Some).map_err(|_| v),
    })
}

/// `SET [SESSION] pgshard.<name> = v` (or `TO v`) and `RESET pgshard.<name>`: Some(Some(v))
/// and Some(None); None for any other statement.
pub(super) fn pgshard_setting(sql: &str, name: &str) -> Option<Option<String>> {
    let s = sql.trim().trim_end_matches(';').trim();
    let lower = s.to_ascii_lowercase();
    let key = format!("pgshard.{name}");
    if lower == format!("reset {key}") {
        return Some(None);
    }
    let rest = lower.strip_prefix("set ")?.trim_start();
    let rest = rest.strip_prefix("session ").unwrap_or(rest).trim_start();
    let v = rest.strip_prefix(key.as_str())?.trim_start();
    let v = v
        .strip_prefix('=')
        .or_else(|| v.strip_prefix("to "))?
        .trim()
        .trim_matches('\'');
    Some(Some(v.to_string()))
}

impl RouteState {
    /// Nothing waits for a routing decision or answers from pgshard.
    pub(super) fn idle(&self) -> bool {
        self.held.is_empty()
            && self.deferred_begin.is_none()
            && self.movable_begin.is_none()
            && self.portals.only_held()
            && self.pending_copy.is_none()
    }

    /// After the session moved to a new configuration: analyses depend on the sharding
    /// rules; a forced shard may no longer exist. Statement texts stay (the client's).
    pub(super) fn reset_for(&mut self, db: &crate::cluster::Database) {
        self.cache.clear();
        if self.forced.is_some_and(|s| s >= db.router.shards()) {
            self.forced = None;
        }
    }
}

impl Session {
    /// The statement's analysis (cached by text): refused when only evaluating its
    /// subqueries first would route it (`analysis_evaluating_first`).
    pub(super) fn analysis(&mut self, sql: &str) -> Result<Arc<Analysis>, router::AnalyzeError> {
        let a = self.analysis_evaluating_first(sql)?;
        match a.pre_eval.as_ref().and_then(|p| p.refused.as_ref()) {
            Some(why) => Err(router::AnalyzeError::Unroutable(why.clone())),
            None => Ok(a),
        }
    }

    /// The analysis with the subqueries pgshard can evaluate first (`router::preeval`).
    pub(super) fn analysis_evaluating_first(
        &mut self,
        sql: &str,
    ) -> Result<Arc<Analysis>, router::AnalyzeError> {
        let version = self
            .db
            .user_aggregates_version
            .load(std::sync::atomic::Ordering::Relaxed);
        if version != self.route.aggregates_version {
            // Analyses made before the monitor read new aggregates' names.
            self.route.cache.clear();
            self.route.aggregates_version = version;
        }
        if let Some(a) = self.route.cache.get(sql) {
            return a.clone();
        }
        let a = router::analyze::analyze_evaluating_first(sql, &self.db.router.rules)
            .map(|mut a| {
                refuse_user_aggregates(&mut a, sql, &self.db.user_aggregates.load());
                a
            })
            .map(Arc::new);
        if self.route.uncached {
            return a;
        }
        if self.route.cache.len() >= CACHE_LIMIT {
            self.route.cache.clear();
        }
        self.route.cache.insert(sql.to_string(), a.clone());
        a
    }

    /// The shard statements without a shard key of their own go to.
    pub(super) fn home_shard(&self) -> usize {
        if self.backend.is_some() {
            self.shard
        } else {
            self.route.forced.unwrap_or(self.db.router.default_shard())
        }
    }

    /// Where a statement must run.
    pub(super) fn decide(&mut self, sql: &str, params: &Params<'_>) -> Result<Dest, PgError> {
        self.reads.read_ok = false;
        if let Some(h) = router::hint(sql) {
            let s = h
                .and_then(|s| self.db.router.check_shard(s))
                .map_err(route_err)?;
            self.set_read_ok(sql, None);
            return Ok(Dest::Shard(s));
        }
        if let Some(s) = self.route.forced {
            let a = self.analysis(sql).ok();
            self.set_read_ok(sql, a.as_deref());
            return Ok(Dest::Shard(s));
        }
        let a = match self.analysis(sql) {
            Ok(a) => {
                if a.kind == Kind::Ddl {
                    // A key column's type may change (see `sharding::column`).
                    self.db.ddl_seen();
                }
                a
            }
            Err(router::AnalyzeError::Unroutable(why)) => {
                return Err(PgError::new("0A000", why)
                    .with_hint("Or choose the shard with a /* pgshard: shard=N */ comment."));
            }
            Err(router::AnalyzeError::Parse(parse_error)) => {
                // Never fail a statement only because the parser could not read it: one
                // that names no sharded or reference table runs where the session is. One
                // that does is refused, inside a transaction too: sent to the shard the
                // transaction is on, it would read or write that shard's rows only.
                if !self.db.router.rules.mentioned_in(sql) {
                    self.set_read_ok(sql, None);
                    return Ok(Dest::Shard(self.home_shard()));
                }
                if broadcast_unparsed(sql) {
                    // Maintenance and DDL the parser cannot read (VACUUM ANALYZE t, ...):
                    // every shard, as DDL.
                    let all = Analysis::of(router::Target::All, Kind::Ddl);
                    return Ok(Dest::Multi(
                        (0..self.db.router.shards()).collect(),
                        Arc::new(all),
                    ));
                }
                let head: String = sql.chars().take(80).collect();
                return Err(PgError::new(
                    "0A000",
                    format!("pgshard cannot route this statement ({parse_error}): {head}"),
                )
                .with_hint("Add a /* pgshard: shard=N */ comment, or SET pgshard.shard = N."));
            }
        };
        // Nothing in flight: every zone change sent has been answered (and reported).
        self.zone_pending &= !self.relay.queue.is_empty();
        let changing =
            (self.zone_pending || a.sets_time_zone).then(crate::sharding::Zone::changing);
        let zone = changing.as_ref().unwrap_or(&self.zone);
        let route = match self.db.router.resolve(&a, params, zone) {
            Err(RouteError::Key(crate::sharding::ShardError::DirectoryMiss { table, key })) => {
                let t = self.db.router.rules.table(&table).unwrap_or(0);
                self.route.lookup = Some((t, key, a.inserts_sharded));
                return Err(PgError::new("XX000", "directory lookup pending"));
            }
            r => r.map_err(route_err)?,
        };
        if let Some((t, new)) = &a.key_update {
            let f = &self.db.router.rules.tables[*t];
            let new_shard = match new {
                Some(k) => {
                    // Placed like an inserted row's key: a new value with no shard is
                    // an error, not every shard.
                    let only = Analysis {
                        target: router::Target::Keys(vec![(*t, k.clone())]),
                        inserts_sharded: true,
                        ..(*a).clone()
                    };
                    match self
                        .db
                        .router
                        .resolve(&only, params, zone)
                        .map_err(route_err)?
                    {
                        Route::Shards(v) => v.first().copied(),
                        Route::Default | Route::Any => None,
                    }
                }
                None => None,
            };
            let same = matches!((&route, new_shard), (Route::Shards(v), Some(n)) if v == &[n]);
            if !same {
                return Err(PgError::new(
                    "0A000",
                    format!(
                        "UPDATE of shard key {}.{} could move rows to another shard",
                        f.table, f.column
                    ),
                )
                .with_hint("Delete the row and insert it with its new key instead."));
            }
        }
        self.zone_pending |= a.sets_time_zone;
        self.set_read_ok(sql, Some(&a));
        self.route.decided_read = a.replica_safe;
        // (Empty for all but INSERTs whose keys the shard makes: no allocation.)
        let keyless = a.keyless.clone();
        let dest = match route {
            Route::Default => Dest::Shard(self.home_shard()),
            Route::Any => Dest::Shard(match &self.backend {
                Some(_) => self.shard,
                None => self.db.next_shard(),
            }),
            Route::Shards(v) if v.len() == 1 => Dest::Shard(v[0]),
            Route::Shards(v) if a.one_shard => {
                return Err(PgError::new(
                    "0A000",
                    format!(
                        "this statement needs shards {v:?}, but it can run on one shard only: its tables are joined on other columns than their shard keys, or a subquery in it aggregates, groups or limits rows of one shard"
                    ),
                )
                .with_hint("Join the tables on their shard keys, give the outer query the same shard key as the subquery, or run the parts separately."));
            }
            Route::Shards(v) => Dest::Multi(v, a),
        };
        // Rows whose keys the shard makes: only on a shard seen to make them (a shard
        // without the setup would store them under its table's own default, wherever that
        // key belongs).
        if let Dest::Shard(s) = dest
            && !keyless.is_empty()
        {
            let missing: Vec<usize> = keyless
                .into_iter()
                .filter(|&t| !self.db.keys_ready(t, s))
                .collect();
            if !missing.is_empty() {
                self.route.keys_check = Some((s, missing));
                return Err(PgError::new("XX000", "generated keys check pending"));
            }
        }
        Ok(dest)
    }

    /// `decide`, reading the directory for directory-sharded keys it has not cached (an
    /// INSERT records new keys).
    pub(super) async fn decide_async(
        &mut self,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<Dest, PgError> {
        let mut temporary = Vec::new();
        let result = loop {
            let r = self.decide(sql, params);
            if let Some((shard, tables)) = self.route.keys_check.take() {
                match crate::cluster::keys::verify(&self.db, shard, &tables).await {
                    Ok(()) => continue,
                    Err(e) => break Err(PgError::new(e.sqlstate(), e.to_string())),
                }
            }
            let Some((t, key, record)) = self.route.lookup.take() else {
                break r;
            };
            let f = self.db.router.rules.tables[t].clone();
            match crate::exec::directory::lookup(&self.db, &f, &key, record).await {
                Ok((_, true)) => {}
                Ok((shard, false)) => {
                    // No entry: the key lives where on_new_key puts it; remembered only
                    // for this statement.
                    if let Some(d) = f.directory() {
                        d.put(key.clone(), shard);
                    }
                    temporary.push((t, key));
                }
                Err(e) => {
                    break Err(PgError::new(
                        "58000",
                        format!("directory lookup failed: {e}"),
                    ));
                }
            }
        };
        for (t, key) in temporary {
            if let Some(d) = self.db.router.rules.tables[t].directory() {
                d.forget(&key);
            }
        }
        result
    }

    /// Waits until the attached server has answered everything sent to it.
    pub(super) async fn settle(&mut self) -> Result<(), SessionError> {
        if self.backend.is_some() && self.relay.awaits_flush() {
            // Without it the server would keep those answers until the client's Sync,
            // which comes only after pgshard answers what it is settling for.
            protocol::write_msg(&mut self.bout, b'H', &[]);
        }
        while self.backend.is_some() && !self.relay.idle() {
            self.flush().await?;
            let Some(b) = self.backend.as_mut() else {
                break;
            };
            match b.fill().await {
                Ok(()) => self.handle_backend_frames(),
                Err(e) => self.backend_lost(e.to_string()),
            }
        }
        Ok(())
    }

    /// Answers a `SET`/`RESET` of a pgshard setting, which no server sees.
    fn answer_set(&mut self, set: bool) {
        self.relay.drain_local(&mut self.cout);
        protocol::write_complete(&mut self.cout, if set { "SET" } else { "RESET" });
        protocol::write_ready(&mut self.cout, self.status);
    }

    /// A simple Query on a sharded database.
    /// `single` is the kind of the query's only statement (None for several).
    pub(super) async fn route_query(
        &mut self,
        frame: Bytes,
        single: Option<router::StatementKind>,
    ) -> Result<(), SessionError> {
        use router::StatementKind::{Begin, SessionSetting};
        let sql = protocol::parse_query(&frame)?;
        if self.backend.is_some() && !self.relay.idle() {
            // The previous statement's outcome (an error aborts the transaction on every
            // shard) decides where this one may go: wait for it.
            self.settle().await?;
        }
        if let Some(SessionSetting) = single
            && let Some(set) = super::replica::target_set(sql)
        {
            match set {
                Ok(v) => {
                    self.reads.target = v;
                    self.answer_set(v.is_some());
                }
                Err(v) => self.answer_error(PgError::new(
                    "22023",
                    format!("pgshard.target must be primary or replica, not '{v}'"),
                )),
            }
            return Ok(());
        }
        if let Some(SessionSetting) = single
            && let Some(set) = pgshard_set(sql)
        {
            match set {
                Ok(Some(s)) if s >= self.db.router.shards() => self.answer_error(route_err(
                    RouteError::NoSuchShard(s, self.db.router.shards()),
                )),
                Ok(v) => {
                    self.route.forced = v;
                    self.answer_set(v.is_some());
                }
                Err(v) => self.answer_error(PgError::new(
                    "22023",
                    format!("pgshard.shard must be a shard number, not '{v}'"),
                )),
            }
            return Ok(());
        }
        if self.backend.is_some()
            && self.mode == PoolMode::Transaction
            && self.status == b'I'
            && !self.in_batch
            && single == Some(Begin)
        {
            // A connection kept only for in-flight answers must not pin the transaction.
            self.settle().await?;
            if self.status == b'I' {
                self.detach().await;
            }
        }
        if !self.multi.parked.is_empty() && single == Some(router::StatementKind::EndTransaction) {
            return self.end_multi_query(sql).await;
        }
        if !self.multi.parked.is_empty() {
            let statements = router::split_statements(sql);
            if statements
                .iter()
                .any(|st| super::multi::prepares_transaction(st))
            {
                self.answer_error(super::multi::prepare_transaction_refused());
                return Ok(());
            }
            if single.is_none() && statements.iter().any(|st| controls_transaction(st)) {
                return self.control_string_over_shards(sql, &statements).await;
            }
        }
        if self.backend.is_none()
            && let Some(kind) = &single
            && self.deferred_transaction(sql, kind)
        {
            return Ok(());
        }
        if self.status == b'E'
            && !self.multi.parked.is_empty()
            && !matches!(
                super::replay::savepoint_op(sql),
                Some((super::replay::SavepointOp::RollbackTo, _))
            )
        {
            // Aborted over several shards (some of which may not know it yet): only
            // ROLLBACK (handled above) and ROLLBACK TO SAVEPOINT run, as in PostgreSQL.
            self.relay.drain_local(&mut self.cout);
            aborted().write(&mut self.cout);
            protocol::write_ready(&mut self.cout, b'E');
            return Ok(());
        }
        if matches!(self.status, b'T' | b'E')
            && single.is_some()
            && self.mode == PoolMode::Transaction
            && !self.keep_in_step(sql).await?
        {
            return Ok(());
        }
        if self.status == b'T' && single.is_none() && self.mode == PoolMode::Transaction {
            // Settings and savepoints in a query string reach the other shards of the
            // transaction first (should a statement before them fail, the transaction is
            // aborted everywhere all the same).
            for st in router::split_statements(sql) {
                if !self.keep_in_step(st).await? {
                    return Ok(());
                }
            }
        }
        if single.is_some()
            && self.db.router.is_sharded()
            && self.route.forced.is_none()
            && is_copy(sql)
            && router::hint(sql).is_none()
            && self.copy_routed(&frame, sql).await?
        {
            return Ok(());
        }
        let mut decided = self.decide_async(sql, &Params::default()).await;
        let mut rewritten = None;
        if decided.is_err() && single.is_some() {
            // Refused as written: maybe not once its subqueries are evaluated first.
            use super::preeval::Pre;
            match self.pre_evaluated(sql).await? {
                Pre::AsWritten => {}
                Pre::Rewritten(sql) => rewritten = Some(sql),
                Pre::Failed(out) => {
                    self.pre_evaluation_failed(out);
                    return Ok(());
                }
                Pre::Answered => {
                    // (A lost connection ended the client's with FATAL.)
                    if !self.client_eof {
                        protocol::write_ready(&mut self.cout, self.status);
                    }
                    return Ok(());
                }
            }
        }
        let frame = match &rewritten {
            Some(sql) => {
                let mut f = bytes::BytesMut::new();
                protocol::write_query(&mut f, sql);
                f.freeze()
            }
            None => frame,
        };
        let sql = protocol::parse_query(&frame)?;
        if rewritten.is_some() {
            self.route.uncached = true;
            decided = self.decide_async(sql, &Params::default()).await;
            self.route.uncached = false;
        }
        match decided {
            Err(e) => self.answer_error(e),
            Ok(Dest::Shard(s)) => {
                if self.backend.is_some() && self.shard != s && self.status != b'I' {
                    if !self.move_transaction(s).await? {
                        if !self.can_join() {
                            let e = cross_shard_txn(self.shard, &[s]);
                            self.answer_error(e);
                            return Ok(());
                        }
                        if !self.join_shard(s).await? {
                            protocol::write_ready(&mut self.cout, self.status);
                            return Ok(());
                        }
                    }
                } else if !self.use_shard(s).await? {
                    protocol::write_ready(&mut self.cout, self.status);
                    return Ok(());
                }
                // Settings alone (`BEGIN; SET LOCAL app.tenant = ...`, as multi-tenant
                // applications start) do not pin the transaction: they are replayed
                // where it moves.
                if single.is_none() || !super::replay::is_setting(sql) {
                    self.route.movable_begin = None;
                }
                if single.is_none()
                    && self.status == b'I'
                    && self.mode == PoolMode::Transaction
                    && self.multi.parked.is_empty()
                {
                    self.note_transaction_string(&router::split_statements(sql));
                }
                self.reads.executed = true;
                self.started();
                self.send_query(frame);
            }
            Ok(Dest::Multi(_, a)) if a.statements > 1 => self.run_script(sql).await?,
            Ok(Dest::Multi(shards, a)) => self.run_multi(sql, shards, &a).await?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_aggregates_refuse_merges_but_not_whole_groups() {
        let rules = crate::router::Router::new(
            &crate::config::Config::from_yaml(
                "users: [{ name: a, password: a }]\ndatabases:\n  - name: a\n    server_user: a\n    shards:\n      - { primary: 127.0.0.1:6000 }\n      - { primary: 127.0.0.1:6001 }\n    sharded_tables:\n      - { table: t, column: k, method: hash }\n",
            )
            .unwrap()
            .databases[0],
        )
        .rules;
        let names = vec!["my_agg".to_string()];
        let check = |sql: &str| {
            let mut a = router::analyze::analyze(sql, &rules).unwrap();
            refuse_user_aggregates(&mut a, sql, &names);
            a.merge.unwrap().is_ok()
        };
        assert!(!check("SELECT my_agg(x) FROM t"));
        assert!(!check("SELECT g, public.MY_AGG (x) + 1 FROM t GROUP BY g"));
        assert!(check("SELECT k, my_agg(x) FROM t GROUP BY k"));
        assert!(check("SELECT not_my_agg(x), my_agg FROM t"));
        let mut a = router::analyze::analyze("SELECT my_agg(x) FROM t", &rules).unwrap();
        refuse_user_aggregates(&mut a, "SELECT my_agg(x) FROM t", &[]);
        assert!(a.merge.unwrap().is_ok());
    }

    #[test]
    fn set_pgshard_shard_forms() {
        assert_eq!(pgshard_set("SET pgshard.shard = 1"), Some(Ok(Some(1))));
        assert_eq!(
            pgshard_set("set session pgshard.shard to '0';"),
            Some(Ok(Some(0)))
        );
        assert_eq!(pgshard_set("RESET pgshard.shard"), Some(Ok(None)));
        assert!(matches!(pgshard_set("SET pgshard.shard = x"), Some(Err(_))));
        assert_eq!(pgshard_set("SET search_path = x"), None);
    }
}

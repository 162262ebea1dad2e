//! INSERT into a sharded table without a column list (hand-written SQL, `pg_dump
//! --inserts`, `INSERT INTO archive SELECT * FROM ...`): which value is the shard key
//! depends on the table's columns. pgshard reads them where the INSERT runs, one round
//! trip per statement (two for INSERT ... SELECT, whose SELECT is described to learn how
//! many columns it fills): in the client's transaction when it has begun on a shard (a
//! column added or dropped earlier in it counts), with the session's own settings (its
//! `search_path` finds the table the INSERT means). The INSERT is then carried out as the
//! same statement with those columns listed, so that a column dropped or renamed in
//! between makes PostgreSQL refuse it instead of rows being placed by a stale position.
//! Positions cached from the monitor could not promise that: DDL that does not go through
//! pgshard would go unseen for a while.

use super::insert_select::{failed, step_request};
use super::{Session, SessionError};
use crate::protocol::{self, PgError};
use crate::router::analyze::{InsertVia, Via};
use crate::router::{Params, Route, RouteError};
use crate::sharding::ShardError;
use bytes::BytesMut;
use sqlparser::ast::{Ident, ObjectName, SetExpr, Statement};

impl Session {
    /// `insert_via_steps` for [`Via::Unlisted`]. `implicit`: the transaction is the
    /// statement's own.
    pub(super) async fn insert_unlisted_steps(
        &mut self,
        via: &InsertVia,
        types: &[u8],
        rest: &[u8],
        params: &Params<'_>,
        implicit: bool,
    ) -> Result<Option<Vec<Vec<BytesMut>>>, SessionError> {
        let Statement::Insert(ins) = &via.insert else {
            return failed(self, PgError::new("XX000", "not an INSERT"));
        };
        // 1. The table's columns, as the INSERT would see them. Where the transaction
        //    has not begun on a shard, on their own (it begins where the rows go); where
        //    it can still move, in it, and it stays movable.
        let home = self.home_shard();
        let untouched = self.status == b'T'
            && self.backend.is_none()
            && self.multi.parked.is_empty()
            && self.route.deferred_begin.is_some();
        let movable = self.status == b'T'
            && self.backend.is_some()
            && self.multi.parked.is_empty()
            && self.route.movable_begin.is_some();
        let req = columns_request(&ins.table.to_string());
        let Some(frames) = self.read_first(home, &req, untouched, movable).await? else {
            return Ok(None);
        };
        if self.status == b'E' {
            // The table does not exist: PostgreSQL's own error.
            return Ok(Some(vec![frames]));
        }
        let columns: Vec<String> = frames
            .iter()
            .filter(|f| f[0] == b'D')
            .filter_map(|f| crate::exec::merge::fields(f).first().copied().flatten())
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        // How many columns the rows fill: the widest VALUES row (PostgreSQL refuses rows
        // of unequal widths), or as many as the query makes (its description, from the
        // same server).
        let width = match ins.source.as_deref().map(|s| &*s.body) {
            Some(SetExpr::Values(v)) => v.rows.iter().map(|r| r.content.len()).max().unwrap_or(0),
            _ => {
                let source = ins
                    .source
                    .as_deref()
                    .map(|q| q.to_string())
                    .unwrap_or_default();
                let req = match describe_request(&source, types) {
                    Ok(r) => r,
                    Err(e) => return failed(self, e),
                };
                let Some(frames) = self.read_first(home, &req, untouched, movable).await? else {
                    return Ok(None);
                };
                if self.status == b'E' {
                    return Ok(Some(vec![frames]));
                }
                frames
                    .iter()
                    .find(|f| f[0] == b'T')
                    .map(|t| crate::exec::merge::columns(t).len())
                    .unwrap_or(0)
            }
        };
        if width == 0 {
            return failed(
                self,
                PgError::new(
                    "0A000",
                    format!(
                        "INSERT into sharded table {} fills no columns: pgshard cannot place its rows",
                        ins.table
                    ),
                ),
            );
        }
        if width > columns.len() {
            return failed(
                self,
                PgError::new("42601", "INSERT has more expressions than target columns"),
            );
        }
        // 2. The same INSERT with its columns listed, analysed as if the client had
        //    written it.
        let mut listed = ins.clone();
        listed.columns = columns[..width]
            .iter()
            .map(|c| ObjectName::from(vec![Ident::with_quote('"', c.as_str())]))
            .collect();
        let listed = Statement::Insert(listed);
        let sql = listed.to_string();
        let a = match self.analysis(&sql) {
            Ok(a) => a,
            Err(crate::router::AnalyzeError::Unroutable(why)) => {
                return failed(self, PgError::new("0A000", why));
            }
            Err(crate::router::AnalyzeError::Parse(why)) => {
                return failed(self, PgError::new("XX000", why));
            }
        };
        if let Some(v) = &a.insert_via {
            // Keys a server evaluates or the key's default (the key among the values left
            // out), or rows only their values place: the listed statement's own way.
            return match &v.how {
                Via::Computed(keys) => {
                    self.insert_keys_steps(v, keys, types, rest, params, implicit)
                        .await
                }
                Via::Select => {
                    Box::pin(self.insert_via_steps(v, types, rest, params, implicit)).await
                }
                Via::Unlisted => failed(self, PgError::new("XX000", "unexpected INSERT plan")),
            };
        }
        // 3. Where it runs: each VALUES row on its key's shard, or, as written, on the
        //    shards its analysis routes it to (an INSERT ... SELECT of co-located rows or
        //    of a constant key, rows whose keys the shards make).
        let split = match &a.insert_split {
            Some(split) => {
                match self
                    .placed(|s| s.db.router.split_insert(split, params, &s.zone))
                    .await
                {
                    Ok(split) => Some(split),
                    Err(e) => return failed(self, e),
                }
            }
            None => None,
        };
        let shards: Vec<usize> = match &split {
            Some(split) => split.shards(),
            None => match self
                .placed(|s| s.db.router.resolve(&a, params, &s.zone))
                .await
            {
                Ok(Route::Shards(v)) => v,
                Ok(Route::Default) => vec![home],
                Ok(Route::Any) if self.backend.is_some() => vec![self.shard],
                Ok(Route::Any) => vec![self.db.next_shard()],
                Err(e) => return failed(self, e),
            },
        };
        if !a.keyless.is_empty() {
            // Keys the shards make (`generate_keys`): only on shards set up to make them.
            for &s in &shards {
                if let Err(e) = crate::cluster::keys::verify(&self.db, s, &a.keyless).await {
                    return failed(self, PgError::new(e.sqlstate(), e.to_string()));
                }
            }
        }
        // 4. The transaction begins, or moves, where the first row goes; each shard's
        //    part runs there in it.
        let start = shards.first().copied().unwrap_or(home);
        if movable && start != self.shard && !self.move_transaction(start).await? {
            return Ok(None);
        }
        let texts: Vec<(usize, String)> = match &split {
            Some(split) => split.parts.clone(),
            None => shards.iter().map(|&s| (s, sql.clone())).collect(),
        };
        let mut parts = Vec::with_capacity(texts.len());
        for (s, part) in &texts {
            match step_request(part, types, rest, None) {
                Ok(r) => parts.push((*s, r)),
                Err(e) => return failed(self, e),
            }
        }
        match &split {
            Some(split) => self.run_split(parts, split).await,
            None => self.run_parts(parts).await,
        }
    }

    /// What `route` (a placement of rows) gives, after the directory entries of keys it
    /// has not cached are read (and, for keys with none, recorded, as an INSERT of them
    /// records them).
    async fn placed<T>(
        &mut self,
        route: impl Fn(&Session) -> Result<T, RouteError>,
    ) -> Result<T, PgError> {
        loop {
            let (table, key) = match route(self) {
                Ok(r) => return Ok(r),
                Err(RouteError::Key(ShardError::DirectoryMiss { table, key })) => (table, key),
                Err(e) => return Err(PgError::new(e.sqlstate(), e.to_string())),
            };
            let rules = &self.db.router.rules;
            let Some(t) = rules.table(&table) else {
                return Err(PgError::new("XX000", format!("no sharded table {table}")));
            };
            let f = rules.tables[t].clone();
            crate::exec::directory::lookup(&self.db, &f, &key, true)
                .await
                .map_err(|e| PgError::new("58000", format!("directory lookup failed: {e}")))?;
        }
    }
}

/// The query for a table's columns (not dropped, in order), by its name as the INSERT
/// wrote it (`regclass` resolves it with the session's `search_path`, and fails as the
/// INSERT would for a table that does not exist).
fn columns_request(table: &str) -> BytesMut {
    const SQL: &str = "SELECT a.attname::pg_catalog.text FROM pg_catalog.pg_attribute a \
        WHERE a.attrelid = $1::pg_catalog.regclass AND a.attnum > 0 AND NOT a.attisdropped \
        ORDER BY a.attnum";
    let mut rest = protocol::bind_params_body(&[false], &[Some(table.as_bytes())]);
    rest.extend_from_slice(&0u16.to_be_bytes());
    super::cross::extended_request(SQL.as_bytes(), &[0, 0], &rest)
}

/// Parse and Describe of `query` (its parameters renumbered from `$1`, typed as the
/// client's Parse typed them), for the columns it makes, without running it.
fn describe_request(query: &str, types: &[u8]) -> Result<BytesMut, PgError> {
    let (sql, keep) =
        crate::router::insert::renumber_params(query).map_err(|e| PgError::new("42601", e))?;
    let mut req = BytesMut::new();
    protocol::write_parse(
        &mut req,
        b"",
        sql.as_bytes(),
        &protocol::select_param_types(types, &keep),
    );
    protocol::write_target(&mut req, b'D', b'S', b"");
    protocol::write_msg(&mut req, b'S', &[]);
    Ok(req)
}

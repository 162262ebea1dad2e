//! INSERT ... VALUES whose shard keys a server evaluates (`now()`, `'infinity'`, the
//! column's default; see `router::analyze::ComputedKeys`): one query evaluates them on the
//! session's shard (after one that looks the default up, where needed), each row goes to
//! the shard of its value, and the value replaces the expression in the row.
//!
//! Outside a transaction the evaluation runs on its own, before the implicit transaction
//! of the INSERT begins, so that a row on one shard makes a one-shard transaction. Inside
//! one it runs in the transaction, on the shard the session is on; for the transaction's
//! first statement, on the shard a first evaluation sends the first row to, where the
//! transaction then begins. Either way `now()` is that shard's transaction start, as in
//! every other statement there.

use super::insert_select::{failed, step_request};
use super::{Session, SessionError};
use crate::protocol::{self, PgError};
use crate::router::analyze::{ComputedKeys, InsertVia};
use crate::router::{KeyRef, Params};
use crate::sharding::KeyType;
use bytes::BytesMut;
use sqlparser::ast::{Expr, SetExpr, Statement, Value};

impl Session {
    /// `insert_via_steps` for computed keys. `implicit`: the transaction is the
    /// statement's own.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn insert_keys_steps(
        &mut self,
        via: &InsertVia,
        keys: &ComputedKeys,
        types: &[u8],
        rest: &[u8],
        params: &Params<'_>,
        implicit: bool,
    ) -> Result<Option<Vec<Vec<BytesMut>>>, SessionError> {
        // 1. Evaluate (with the column's default looked up first, where a key is the
        //    default): each key's value in binary (exact, whatever DateStyle or
        //    extra_float_digits), and cast to the key's type in the form the router reads.
        let ty = self.db.router.rules.tables[via.table].ty;
        let evaluated = keys.rows.iter().filter(|r| r.is_none()).count();
        let routed_binary = !matches!(ty, KeyType::Numeric | KeyType::Text);
        let formats: Vec<bool> = (0..evaluated).flat_map(|_| [true, routed_binary]).collect();
        let home = self.home_shard();
        let untouched = self.status == b'T'
            && self.backend.is_none()
            && self.multi.parked.is_empty()
            && self.route.deferred_begin.is_some();
        // The statement's own implicit transaction, which nothing has joined yet.
        let fresh = implicit && untouched;
        let movable = self.status == b'T'
            && self.backend.is_some()
            && self.multi.parked.is_empty()
            && self.route.movable_begin.is_some();
        let with_default;
        // The column's default, where a key is it.
        let mut default_used = None;
        let select_sql = if keys.exprs.iter().any(Option::is_none) {
            let req = default_request(via);
            let Some(frames) = self.read_first(home, &req, untouched, movable).await? else {
                return Ok(None);
            };
            if self.status == b'E' {
                return Ok(Some(vec![frames]));
            }
            let default = match column_default(via, &self.db.router.rules, &frames) {
                Ok(d) => d,
                Err(e) => return failed(self, e),
            };
            let exprs: Vec<String> = keys
                .exprs
                .iter()
                .map(|e| e.clone().unwrap_or_else(|| default.clone()))
                .collect();
            with_default = crate::router::computed::evaluation_sql(ty, &exprs);
            default_used = Some(default);
            &with_default
        } else {
            &via.select_sql
        };
        let req = match step_request(select_sql, types, rest, Some(&formats)) {
            Ok(r) => r,
            Err(e) => return failed(self, e),
        };
        let frames = if fresh {
            // On its own: the transaction begins where the rows go.
            self.evaluate_alone(home, &req).await?
        } else if untouched || movable {
            // The client's transaction has run nothing yet: a first evaluation (on its
            // own, or in the transaction, which can still move) tells where the first row
            // goes; the transaction begins there. Keys that may read the transaction are
            // evaluated again in it, so that `now()` is the transaction's on the rows'
            // shard; others keep their first values (a sequence draws one key per row,
            // as on one server).
            let Some(probe) = self.read_first(home, &req, !movable, movable).await? else {
                return Ok(None);
            };
            if self.status == b'E' {
                return Ok(Some(vec![probe]));
            }
            let start = match self.route_rows(via, keys, &probe, params, routed_binary) {
                Ok((_, _, shards)) => shards.first().copied().unwrap_or(home),
                Err(e) => return failed(self, e),
            };
            if movable && start != self.shard && !self.move_transaction(start).await? {
                return Ok(None);
            }
            // The written expressions were judged at analysis; the default is judged here.
            let independent = keys.independent
                && default_used
                    .as_deref()
                    .is_none_or(|d| crate::router::computed::transaction_independent(&[d]));
            if independent {
                Some(probe)
            } else {
                self.run_request_on(start, &req).await?
            }
        } else {
            self.run_request_on(home, &req).await?
        };
        let Some(frames) = frames else {
            return Ok(None);
        };
        if self.status == b'E' {
            return Ok(Some(vec![frames]));
        }
        // 2. Each row's shard.
        let (oids, values, shard_of_row) =
            match self.route_rows(via, keys, &frames, params, routed_binary) {
                Ok(x) => x,
                Err(e) => return failed(self, e),
            };

        // 3. The rows with each evaluated key as a parameter of its expression's type,
        //    numbered after the client's, split by shard.
        let bad = |e: protocol::ProtocolError| PgError::new("08P01", e.to_string());
        let (client_binary, client_values) = match protocol::bind_params(rest) {
            Ok(p) => p,
            Err(e) => return failed(self, bad(e)),
        };
        let first = client_values.len();
        let mut statement = via.insert.clone();
        if let Statement::Insert(ins) = &mut statement
            && let Some(src) = &mut ins.source
            && let SetExpr::Values(v) = &mut *src.body
        {
            let mut n = first;
            for (row, k) in v.rows.iter_mut().zip(&keys.rows) {
                if k.is_none()
                    && let Some(e) = row.content.get_mut(via.key)
                {
                    n += 1;
                    *e = Expr::value(Value::Placeholder(format!("${n}")));
                }
            }
        }
        let mut all_binary = client_binary;
        let mut all_values = client_values;
        all_binary.extend(std::iter::repeat_n(true, evaluated));
        all_values.extend(values.iter().step_by(2).copied());
        let mut all_oids = protocol::parse_oids(types);
        all_oids.resize(first, 0);
        // A NULL takes the column's type, as a NULL expression would.
        all_oids.extend(
            oids.iter()
                .step_by(2)
                .zip(values.iter().step_by(2))
                .map(|(&oid, v)| if v.is_some() { oid } else { 0 }),
        );
        let all_types = protocol::param_types(&all_oids);
        let all_rest = match protocol::with_params(rest, &all_binary, &all_values) {
            Ok(r) => r,
            Err(e) => return failed(self, bad(e)),
        };
        let split = crate::router::insert::split_rows(&statement, &shard_of_row);
        let mut parts = Vec::new();
        for (s, sql) in &split.parts {
            match step_request(sql, &all_types, &all_rest, None) {
                Ok(r) => parts.push((*s, r)),
                Err(e) => return failed(self, e),
            }
        }
        self.run_split(parts, &split).await
    }

    /// Runs a read before the statement's rows are placed: on its own when the
    /// transaction has not begun on a shard (`alone`), in the transaction where it can
    /// still move (`movable`: it stays movable), else in it on shard `s`.
    pub(super) async fn read_first(
        &mut self,
        s: usize,
        req: &[u8],
        alone: bool,
        movable: bool,
    ) -> Result<Option<Vec<BytesMut>>, SessionError> {
        if alone {
            return self.evaluate_alone(s, req).await;
        }
        if movable {
            let begin = self.route.movable_begin.clone();
            let here = self.shard;
            let frames = self.run_request_on(here, req).await?;
            self.route.movable_begin = begin;
            return Ok(frames);
        }
        self.run_request_on(s, req).await
    }

    /// Runs the keys' evaluation outside any transaction (the statement's own implicit
    /// one, or the client's, has not begun on a shard yet and begins after it).
    async fn evaluate_alone(
        &mut self,
        s: usize,
        req: &[u8],
    ) -> Result<Option<Vec<BytesMut>>, SessionError> {
        let begin = self.route.deferred_begin.take();
        let status = self.status;
        self.status = b'I';
        let frames = self.run_request_on(s, req).await?;
        let error = self.status == b'E';
        self.detach().await;
        self.route.deferred_begin = begin;
        self.status = if error { b'E' } else { status };
        Ok(frames)
    }

    /// From the evaluation's answer: the evaluated columns' types, their values, and each
    /// row's shard (a key as written with the client's parameters, an evaluated one as
    /// its value cast to the key's type).
    #[allow(clippy::type_complexity)]
    fn route_rows<'f>(
        &self,
        via: &InsertVia,
        keys: &ComputedKeys,
        frames: &'f [BytesMut],
        params: &Params<'_>,
        routed_binary: bool,
    ) -> Result<(Vec<u32>, Vec<Option<&'f [u8]>>, Vec<usize>), PgError> {
        let oids: Vec<u32> = frames
            .iter()
            .find(|f| f[0] == b'T')
            .map(|t| crate::exec::merge::columns(t))
            .unwrap_or_default()
            .into_iter()
            .map(|(_, oid)| oid)
            .collect();
        let row = frames
            .iter()
            .find(|f| f[0] == b'D')
            .ok_or_else(|| PgError::new("XX000", "the keys' evaluation returned no row"))?;
        let values = crate::exec::merge::fields(row);
        let evaluated = keys.rows.iter().filter(|r| r.is_none()).count();
        if values.len() != 2 * evaluated || oids.len() != values.len() {
            return Err(PgError::new(
                "XX000",
                "the keys' evaluation returned other columns than asked",
            ));
        }
        let cast = Params {
            values: values.iter().skip(1).step_by(2).copied().collect(),
            binary: vec![routed_binary; evaluated],
            oids: oids.iter().skip(1).step_by(2).copied().collect(),
        };
        let mut shard_of_row = Vec::with_capacity(keys.rows.len());
        let mut next = 0;
        for k in &keys.rows {
            let routed = match k {
                Some(k) => self
                    .db
                    .router
                    .shard_of_row(via.table, k, params, &self.zone),
                None => {
                    next += 1;
                    let k = KeyRef::Param(next - 1, None);
                    self.db
                        .router
                        .shard_of_row(via.table, &k, &cast, &self.zone)
                }
            };
            shard_of_row.push(routed.map_err(|e| PgError::new(e.sqlstate(), e.to_string()))?);
        }
        Ok((oids, values, shard_of_row))
    }
}

/// The query for a key column's default (`pg_get_expr`, printed for the session's
/// `search_path`), identity and generation, by the table's name as the INSERT wrote it.
fn default_request(via: &InsertVia) -> BytesMut {
    const SQL: &str = "SELECT pg_catalog.pg_get_expr(d.adbin, d.adrelid), a.attidentity::pg_catalog.text, \
        a.attgenerated::pg_catalog.text FROM pg_catalog.pg_attribute a \
        LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
        WHERE a.attrelid = $1::pg_catalog.regclass AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped";
    let table = match &via.insert {
        Statement::Insert(ins) => ins.table.to_string(),
        _ => String::new(),
    };
    let column = match &via.insert {
        Statement::Insert(ins) => ins.columns.get(via.key).map(|c| c.to_string()),
        _ => None,
    }
    .unwrap_or_default();
    // The column as PostgreSQL names it: unquoted names fold to lower case.
    let column = match column.strip_prefix('"').and_then(|c| c.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\"\"", "\""),
        None => column.to_lowercase(),
    };
    let mut rest = protocol::bind_params_body(
        &[false, false],
        &[Some(table.as_bytes()), Some(column.as_bytes())],
    );
    rest.extend_from_slice(&0u16.to_be_bytes());
    super::cross::extended_request(SQL.as_bytes(), &[0, 0], &rest)
}

/// The key column's default expression from [`default_request`]'s answer, or why
/// pgshard cannot evaluate it (none, identity, generated).
fn column_default(
    via: &InsertVia,
    rules: &crate::router::Rules,
    frames: &[BytesMut],
) -> Result<String, PgError> {
    let rule = &rules.tables[via.table];
    let Some(row) = frames.iter().find(|f| f[0] == b'D') else {
        return Err(PgError::new(
            "42703",
            format!("the shard key column \"{}\" does not exist", rule.column),
        ));
    };
    let fields = crate::exec::merge::fields(row);
    let text = |i: usize| {
        fields
            .get(i)
            .copied()
            .flatten()
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    let identity = text(1).unwrap_or_default();
    let generated = text(2).unwrap_or_default();
    if !identity.is_empty() || !generated.is_empty() {
        return Err(PgError::new(
            "0A000",
            format!(
                "the shard key {} is an identity or generated column, whose values pgshard cannot evaluate; give the key, or use generate_keys",
                rule.column
            ),
        ));
    }
    // Without a default the key would be NULL, which no shard holds.
    text(0).ok_or_else(|| {
        PgError::new(
            "0A000",
            format!(
                "INSERT into sharded table {} must give its shard key {} (it has no default), or set generate_keys on the table, so that the shards make keys",
                rule.table, rule.column
            ),
        )
    })
}

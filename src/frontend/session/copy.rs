//! COPY on sharded and reference tables. COPY FROM STDIN into a sharded table runs on
//! every shard at once, in one transaction over them (the client's, or an implicit one
//! committed with two-phase commit); each row goes to the shard of its key, passed on as
//! the client sent it, in batches (memory stays bounded whatever the size). Into a
//! reference table every row goes to every shard. COPY ... TO STDOUT over several shards
//! is in `copy_out.rs`; the planning and the participants' bookkeeping here serve both.

use super::copy_out::Joined;
use super::{Session, SessionError};
use crate::config::PoolMode;
use crate::pool::Pooled;
use crate::protocol::{self, PgError};
use crate::router::copy::{CopyStmt, Key, Piece, RowSplitter};
use crate::router::{self, RouteError};
use crate::sql::{quote_ident, quote_literal};
use bytes::{BufMut, BytesMut};
use tokio::io::AsyncReadExt;

/// Rows are sent to a shard once this much is buffered for it.
pub(super) const BATCH: usize = 64 * 1024;

/// How a COPY over several shards runs.
#[derive(Clone)]
pub(super) enum CopyPlan {
    /// Into a sharded table (its rule index) or a reference table (None).
    In(Option<usize>),
    /// Gathered from these shards.
    Out(Vec<usize>),
}

/// Where COPY FROM rows go.
enum Into {
    /// By the key at this position, with this table's shard function.
    Split { table: usize, key: usize },
    /// Every row to every shard (a reference table).
    Every,
}

/// Routes one piece of COPY data into the shards' batches. A directory key that is not
/// cached is put aside with its row (`misses`), for a lookup.
fn route_piece(
    p: Piece<'_>,
    into: &Into,
    rules: &router::Rules,
    n: usize,
    batches: &mut [BytesMut],
    misses: &mut Vec<(Vec<u8>, String)>,
) -> Result<(), RouteError> {
    match p {
        Piece::Header(h) => batches.iter_mut().for_each(|b| b.put_slice(h)),
        Piece::End(trailer) => batches.iter_mut().for_each(|b| b.put_slice(trailer)),
        Piece::Row(r) => match into {
            Into::Every => batches.iter_mut().for_each(|b| b.put_slice(r.bytes)),
            Into::Split { table, .. } => {
                let f = &rules.tables[*table];
                let s = match &r.key {
                    Some(Key::Text(k)) => f.shard_of_text(k, n),
                    Some(Key::Binary(k)) => f.shard_of_binary(k, n),
                    None => f.shard_of(&crate::sharding::Value::Null, n),
                };
                match s {
                    Ok(s) => batches[s].put_slice(r.bytes),
                    Err(crate::sharding::ShardError::DirectoryMiss { key, .. }) => {
                        misses.push((r.bytes.to_vec(), key))
                    }
                    Err(e) => return Err(RouteError::Key(e)),
                }
            }
        },
    }
    Ok(())
}

fn copy_data(out: &mut BytesMut, data: &[u8]) {
    out.put_u8(b'd');
    out.put_i32(4 + data.len() as i32);
    out.put_slice(data);
}

impl Session {
    /// COPY on a sharded database: true when handled here (else it is routed as any
    /// statement).
    pub(super) async fn copy_routed(
        &mut self,
        frame: &bytes::Bytes,
        sql: &str,
    ) -> Result<bool, SessionError> {
        let Some(Ok(cs)) = router::copy::parse_copy(sql) else {
            return Ok(false);
        };
        if !cs.stdio {
            return Ok(false);
        }
        let rules = &self.db.router.rules;
        let n = self.db.shards.len();
        match (&cs.table, &cs.query, cs.from) {
            (Some(t), _, true) if rules.table(t).is_some() => {
                let table = rules.table(t).expect("checked");
                self.copy_in(sql, cs, Some(table), false).await?;
            }
            (Some(t), _, true) if rules.is_reference(t) => {
                self.copy_in(sql, cs, None, false).await?
            }
            (Some(t), _, false) if rules.table(t).is_some() => {
                self.copy_out(sql, (0..n).collect(), Joined::of(&cs), false)
                    .await?
            }
            (Some(t), _, false) if rules.is_reference(t) => {
                // Any shard has all of it.
                let home = self.home_shard();
                self.copy_forward(frame, home).await?;
            }
            (None, Some(q), false) => {
                let a = match router::analyze::analyze(q, rules) {
                    Ok(a) => a,
                    Err(_) if !rules.mentioned_in(q) => return Ok(false),
                    Err(e) => {
                        let why = match e {
                            router::AnalyzeError::Parse(p)
                            | router::AnalyzeError::Unroutable(p) => p,
                        };
                        self.answer_error(PgError::new(
                            "0A000",
                            format!("pgshard cannot route this COPY query: {why}"),
                        ));
                        return Ok(true);
                    }
                };
                let route = match self.db.router.resolve(&a, &router::Params::default()) {
                    Ok(r) => r,
                    Err(e) => {
                        self.answer_error(PgError::new(e.sqlstate(), e.to_string()));
                        return Ok(true);
                    }
                };
                match route {
                    router::Route::Default | router::Route::Any => return Ok(false),
                    router::Route::Shards(v) if v.len() == 1 => {
                        self.copy_forward(frame, v[0]).await?
                    }
                    router::Route::Shards(v) => {
                        let concat = matches!(&a.merge, Some(Ok(m)) if m.is_concatenation());
                        if !concat {
                            self.answer_error(PgError::new(
                                "0A000",
                                "COPY (query) TO STDOUT over several shards only concatenates rows: a query with ORDER BY, LIMIT, DISTINCT or aggregates is not supported there",
                            ).with_hint("Run the query itself (pgshard merges it), or COPY from each shard with a /* pgshard: shard=N */ hint."));
                        } else {
                            self.copy_out(sql, v, Joined::of(&cs), false).await?;
                        }
                    }
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The plan of a bound COPY statement (extended protocol) that needs several shards:
    /// Some((sql, into-table or None for a reference table, or gather shards)).
    pub(super) fn multi_copy(&self, sql: &str) -> Option<(CopyStmt, CopyPlan)> {
        let Some(Ok(cs)) = router::copy::parse_copy(sql) else {
            return None;
        };
        if !cs.stdio {
            return None;
        }
        let rules = &self.db.router.rules;
        let n = self.db.shards.len();
        let plan = match (&cs.table, &cs.query, cs.from) {
            (Some(t), _, true) if rules.table(t).is_some() => CopyPlan::In(rules.table(t)),
            (Some(t), _, true) if rules.is_reference(t) => CopyPlan::In(None),
            (Some(t), _, false) if rules.table(t).is_some() => CopyPlan::Out((0..n).collect()),
            (None, Some(q), false) => {
                let a = router::analyze::analyze(q, rules).ok()?;
                match self
                    .db
                    .router
                    .resolve(&a, &router::Params::default())
                    .ok()?
                {
                    router::Route::Shards(v)
                        if v.len() > 1
                            && matches!(&a.merge, Some(Ok(m)) if m.is_concatenation()) =>
                    {
                        CopyPlan::Out(v)
                    }
                    _ => return None,
                }
            }
            _ => return None,
        };
        Some((cs, plan))
    }

    /// Execute of a bound COPY over several shards (its Bind was answered by pgshard).
    pub(super) async fn execute_copy(
        &mut self,
        sql: &str,
        cs: CopyStmt,
        plan: CopyPlan,
    ) -> Result<(), SessionError> {
        self.settle().await?;
        self.relay.drain_local(&mut self.cout);
        match plan {
            CopyPlan::Out(shards) => self.copy_out(sql, shards, Joined::of(&cs), true).await,
            CopyPlan::In(table) => self.copy_in(sql, cs, table, true).await,
        }
    }

    /// A COPY that one shard answers: forwarded as any statement.
    async fn copy_forward(
        &mut self,
        frame: &bytes::Bytes,
        shard: usize,
    ) -> Result<(), SessionError> {
        if self.backend.is_some() && self.shard != shard && self.status != b'I' {
            if !self.can_join() || !self.join_shard(shard).await? {
                let e = super::route::cross_shard_txn(self.shard, &[shard]);
                self.answer_error(e);
                return Ok(());
            }
        } else if !self.use_shard(shard).await? {
            protocol::write_ready(&mut self.cout, self.status);
            return Ok(());
        }
        self.started();
        self.relay.push(super::Pending::Query);
        self.bout.extend_from_slice(frame);
        Ok(())
    }

    /// Makes every shard of `shards` a participant of the transaction (the client's, or a
    /// new implicit one). False when the client got an error.
    pub(super) async fn enter_shards(&mut self, shards: &[usize]) -> Result<bool, SessionError> {
        for &s in shards {
            if !self.enter_shard(s).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The connection of a participant shard.
    fn participant(&mut self, s: usize) -> Option<&mut Pooled> {
        if self.shard == s && self.backend.is_some() {
            return self.backend.as_mut();
        }
        self.multi
            .parked
            .iter_mut()
            .find(|(p, _)| *p == s)
            .map(|(_, b)| b)
    }

    /// Takes every participant's connection out of the session (to use several at once).
    pub(super) fn take_participants(&mut self) -> Vec<(usize, Pooled)> {
        let mut v = std::mem::take(&mut self.multi.parked);
        if let Some(b) = self.backend.take() {
            v.push((self.shard, b));
        }
        v
    }

    /// Puts back what `take_participants` took (the attached shard stays attached).
    pub(super) fn restore_participants(&mut self, v: Vec<(usize, Pooled)>) {
        for (s, b) in v {
            if s == self.shard && self.backend.is_none() {
                self.backend = Some(b);
            } else {
                self.multi.parked.push((s, b));
            }
        }
    }

    /// Ends the statement: the implicit transaction commits (or rolls back after an
    /// error), and the client gets `out` and ReadyForQuery.
    async fn finish_statement(
        &mut self,
        implicit: bool,
        mut out: BytesMut,
        extended: bool,
    ) -> Result<(), SessionError> {
        if implicit {
            self.end_implicit(&mut out).await?;
        }
        self.relay.drain_local(&mut self.cout);
        self.cout.extend_from_slice(&out);
        if !extended {
            protocol::write_ready(&mut self.cout, self.status);
        }
        Ok(())
    }

    /// COPY FROM STDIN into a sharded table (`table`) or a reference table (None).
    pub(super) async fn copy_in(
        &mut self,
        sql: &str,
        cs: CopyStmt,
        table: Option<usize>,
        extended: bool,
    ) -> Result<(), SessionError> {
        if self.mode != PoolMode::Transaction
            || (self.status != b'I' && !self.can_run_in_transaction())
        {
            let e = PgError::new(
                "0A000",
                "COPY into a sharded or reference table needs transaction pooling mode, outside a failed transaction",
            );
            self.copy_error(e, extended);
            return Ok(());
        }
        let shards: Vec<usize> = (0..self.db.shards.len()).collect();
        let implicit = self.begin_implicit().await?;
        if !self.enter_shards(&shards).await? {
            self.status = b'E';
            return self
                .finish_statement(implicit, BytesMut::new(), extended)
                .await;
        }
        // Where the key is in each row.
        let into = match table {
            None => Into::Every,
            Some(t) => {
                let column = self.db.router.rules.tables[t].column.clone();
                let cols = match &cs.columns {
                    Some(c) => Ok(c.clone()),
                    None => self.table_columns(cs.table.as_deref().unwrap_or("")).await,
                };
                match cols.map(|c| c.iter().position(|x| *x == column)) {
                    Ok(Some(key)) => Into::Split { table: t, key },
                    Ok(None) => {
                        return self.copy_refused(implicit, extended, PgError::new("0A000", format!("COPY into sharded table {} must include its shard key {column}", cs.table.as_deref().unwrap_or("")))).await;
                    }
                    Err(e) => return self.copy_refused(implicit, extended, e).await,
                }
            }
        };
        // Every shard enters COPY IN.
        let mut response = None;
        let mut failure = None;
        let mut in_copy = Vec::new();
        for &s in &shards {
            let b = self.participant(s).expect("entered");
            let mut q = BytesMut::new();
            protocol::write_query(&mut q, sql);
            if let Err(e) = b.send(&q).await {
                self.backend_lost(e.to_string());
                return Ok(());
            }
            loop {
                let f = match b.read_frame().await {
                    Ok(f) => f,
                    Err(e) => {
                        self.backend_lost(e.to_string());
                        return Ok(());
                    }
                };
                match f[0] {
                    b'G' => {
                        response.get_or_insert(f);
                        in_copy.push(s);
                        break;
                    }
                    b'E' => failure = Some(f),
                    b'Z' => break,
                    _ => {}
                }
            }
            if failure.is_some() {
                break;
            }
        }
        if let Some(err) = failure {
            self.copy_abort(&in_copy, "COPY failed on another shard")
                .await?;
            self.status = b'E';
            return self.finish_statement(implicit, err, extended).await;
        }
        self.relay.drain_local(&mut self.cout);
        self.cout
            .extend_from_slice(&response.expect("every shard answered"));
        self.flush_client().await?;
        let max = self.max_message;
        let mut splitter = RowSplitter::new(
            cs,
            match into {
                Into::Split { key, .. } => key,
                Into::Every => 0,
            },
            max,
        );
        let mut batches: Vec<BytesMut> = vec![BytesMut::new(); shards.len()];
        let rules = self.db.router.rules.clone();
        let n = shards.len();
        // Rows, until CopyDone or CopyFail.
        let outcome: Result<(), PgError> = loop {
            let frame = match protocol::frame_len(&self.crbuf, max) {
                Ok(Some(len)) => self.crbuf.split_to(len),
                Ok(None) => match self.reader.read_buf(&mut self.crbuf).await {
                    Ok(0) | Err(_) => {
                        self.client_eof = true;
                        break Err(PgError::new("08006", "client connection lost during COPY"));
                    }
                    Ok(_) => continue,
                },
                Err(e) => break Err(PgError::new("08P01", e.to_string())),
            };
            match frame[0] {
                b'd' | b'c' => {
                    let done = frame[0] == b'c';
                    let mut bad = None;
                    let mut misses = Vec::new();
                    let mut route = |p: Piece<'_>| {
                        if bad.is_none()
                            && let Err(e) =
                                route_piece(p, &into, &rules, n, &mut batches, &mut misses)
                        {
                            bad = Some(e);
                        }
                    };
                    let fed = if done {
                        splitter.finish(&mut route)
                    } else {
                        splitter.feed(protocol::body(&frame), &mut route)
                    };
                    if let Err(e) = fed {
                        break Err(PgError::new("22P04", e));
                    }
                    if let Some(e) = bad {
                        break Err(PgError::new(e.sqlstate(), e.to_string()));
                    }
                    // Directory keys not cached: read (new keys recorded), then routed.
                    if let Err(e) = self.route_misses(&into, misses, &mut batches).await {
                        break Err(e);
                    }
                    let min = if done { 0 } else { BATCH };
                    if let Err(e) = self.send_batches(&mut batches, min).await {
                        break Err(e);
                    }
                    if done {
                        break Ok(());
                    }
                }
                b'f' => {
                    let msg = String::from_utf8_lossy(protocol::body(&frame))
                        .trim_end_matches('\0')
                        .to_string();
                    break Err(PgError::new(
                        "57014",
                        format!("COPY from stdin failed: {msg}"),
                    ));
                }
                // Flush and Sync mean nothing during COPY IN.
                b'H' | b'S' => {}
                other => {
                    break Err(PgError::new(
                        "08P01",
                        format!("unexpected message type 0x{other:02X} during COPY from stdin"),
                    ));
                }
            }
        };
        let out = match outcome {
            Ok(()) => {
                // CopyDone everywhere, then each shard's result.
                let mut results = Vec::with_capacity(n);
                for &s in &shards {
                    let b = self.participant(s).expect("entered");
                    let mut done = BytesMut::new();
                    protocol::write_msg(&mut done, b'c', &[]);
                    let r = match b.send(&done).await {
                        Ok(()) => read_until_ready(b).await,
                        Err(e) => Err(e),
                    };
                    match r {
                        Ok(frames) => results.push(frames),
                        Err(e) => {
                            self.backend_lost(e.to_string());
                            return Ok(());
                        }
                    }
                }
                if results.iter().flatten().any(|f| f[0] == b'E') {
                    self.status = b'E';
                }
                crate::exec::scatter::combine_writes(results, matches!(into, Into::Split { .. }))
            }
            Err(e) => {
                self.copy_abort(&shards, &e.message).await?;
                self.status = b'E';
                let mut f = BytesMut::new();
                e.write(&mut f);
                f
            }
        };
        self.reads.executed = true;
        self.finish_statement(implicit, out, extended).await
    }

    /// Routes rows whose directory key was not cached: the directory is read, and keys it
    /// does not have are recorded (these rows are inserted).
    async fn route_misses(
        &mut self,
        into: &Into,
        misses: Vec<(Vec<u8>, String)>,
        batches: &mut [BytesMut],
    ) -> Result<(), PgError> {
        let Into::Split { table, .. } = into else {
            return Ok(());
        };
        let f = self.db.router.rules.tables[*table].clone();
        for (row, key) in misses {
            let s = match f.directory().and_then(|d| d.get(&key)) {
                Some(s) => s,
                None => {
                    crate::exec::directory::lookup(&self.db, &f, &key, true)
                        .await
                        .map_err(|e| {
                            PgError::new("58000", format!("directory lookup failed: {e}"))
                        })?
                        .0
                }
            };
            batches[s].put_slice(&row);
        }
        Ok(())
    }

    /// Sends each shard's buffered rows when more than `min` bytes are waiting.
    async fn send_batches(&mut self, batches: &mut [BytesMut], min: usize) -> Result<(), PgError> {
        for (s, rows) in batches.iter_mut().enumerate() {
            if rows.is_empty() || rows.len() < min {
                continue;
            }
            let mut f = BytesMut::with_capacity(rows.len() + 5);
            copy_data(&mut f, rows);
            rows.clear();
            let b = self.participant(s).expect("entered");
            if let Err(e) = b.send(&f).await {
                return Err(PgError::new(
                    "08006",
                    format!("shard {s} lost during COPY: {e}"),
                ));
            }
        }
        Ok(())
    }

    /// Takes the shards in COPY IN out of it (CopyFail) and reads their answers.
    async fn copy_abort(&mut self, shards: &[usize], why: &str) -> Result<(), SessionError> {
        for &s in shards {
            let Some(b) = self.participant(s) else {
                continue;
            };
            let mut f = BytesMut::new();
            protocol::write_msg(&mut f, b'f', format!("{why}\0").as_bytes());
            if b.send(&f).await.is_err() || read_until_ready(b).await.is_err() {
                b.broken = true;
            }
        }
        Ok(())
    }

    async fn copy_refused(
        &mut self,
        implicit: bool,
        extended: bool,
        e: PgError,
    ) -> Result<(), SessionError> {
        self.status = b'E';
        let mut f = BytesMut::new();
        e.write(&mut f);
        self.finish_statement(implicit, f, extended).await
    }

    /// An error before the COPY started: as any statement's (simple or extended).
    pub(super) fn copy_error(&mut self, e: PgError, extended: bool) {
        if extended {
            self.local_error(e);
        } else {
            self.answer_error(e);
        }
    }

    /// A table's columns in order, from the attached shard.
    async fn table_columns(&mut self, table: &str) -> Result<Vec<String>, PgError> {
        let b = self.backend.as_mut().expect("entered");
        let sql = format!(
            "SELECT attname FROM pg_catalog.pg_attribute WHERE attrelid = to_regclass({}) AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            quote_literal(&quote_ident(table))
        );
        let rows = b
            .query_rows(&sql)
            .await
            .map_err(|e| PgError::new("08006", e.to_string()))?;
        if rows.is_empty() {
            return Err(PgError::new(
                "42P01",
                format!("relation \"{table}\" does not exist"),
            ));
        }
        Ok(rows
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
            .collect())
    }
}

async fn read_until_ready(b: &mut Pooled) -> Result<Vec<BytesMut>, crate::backend::BackendError> {
    b.read_until_ready().await
}

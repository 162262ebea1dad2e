//! Statements over several shards inside a session: a simple Query merged or broadcast
//! across shards, and a Bind whose merged rows pgshard holds as a portal, answering the
//! client's Describe and Execute itself.

use super::route::cross_shard_txn;
use super::*;
use crate::exec::scatter;
use crate::router::{Analysis, Kind};

/// One shard's part of a split statement in the extended protocol: its query, parameter
/// types and Bind body.
type ShardRequest = (Vec<u8>, Vec<u8>, Vec<u8>);

/// How a statement over several shards runs.
pub(super) enum Multi {
    /// A SELECT whose rows are merged.
    Merge(Box<crate::router::merge::MergeSpec>),
    /// DDL, all or none.
    Ddl,
    /// A write allowed on several shards, all or none; `sum` adds up the row counts (not
    /// for reference tables, whose rows are the same on every shard).
    Write { sum: bool },
    /// An INSERT split per shard (shard, its statement), all or none.
    SplitInsert(Vec<(usize, String)>),
    /// An INSERT ... SELECT whose rows pgshard reads first, then inserts split by key.
    InsertVia(std::sync::Arc<crate::router::analyze::InsertVia>),
    /// EXPLAIN: each shard's plan (ANALYZE of a write runs it on each, all or none).
    Explain,
}

/// Parse, Bind, Describe (portal), Execute and Sync of an unnamed statement.
pub(super) fn extended_request(query: &[u8], types: &[u8], bind_rest: &[u8]) -> bytes::BytesMut {
    let mut req = bytes::BytesMut::new();
    protocol::write_parse(&mut req, b"", query, types);
    protocol::write_bind(&mut req, b"", b"", bind_rest);
    protocol::write_target(&mut req, b'D', b'P', b"");
    protocol::write_msg(&mut req, b'E', &[0, 0, 0, 0, 0]);
    protocol::write_msg(&mut req, b'S', &[]);
    req
}

/// Why a statement over several shards cannot run (in the extended protocol or a
/// transaction).
pub(super) fn multi_shard_error(shards: &[usize], a: &Analysis) -> PgError {
    match (&a.merge, a.kind) {
        (Some(Err(why)), _) => PgError::new("0A000", why.clone()),
        (_, Kind::Write | Kind::Ddl) => PgError::new(
            "0A000",
            format!(
                "this write needs shards {shards:?}, which pgshard runs in the extended protocol only in transaction pooling mode, outside a failed transaction and at the start of a batch"
            ),
        ),
        _ => PgError::new(
            "0A000",
            format!(
                "this statement needs shards {shards:?}, which pgshard does only outside transactions, for single SELECTs"
            ),
        ),
    }
}

/// A Bind's remainder for the shards: a DECLARE's query returns text (its cursor's rows),
/// whatever formats the DECLARE's Bind asked for.
fn cursor_rest(a: &Analysis, rest: &[u8]) -> Vec<u8> {
    if a.cursor.is_some() {
        scatter::with_text_results(rest)
    } else {
        rest.to_vec()
    }
}

/// The merge with the LIMIT and OFFSET parameter values of a Bind (`bind_rest`).
fn bound_spec(
    spec: &crate::router::merge::MergeSpec,
    bind_rest: &[u8],
) -> Result<crate::router::merge::MergeSpec, PgError> {
    if spec.limit_param.is_none() && spec.offset_param.is_none() {
        return Ok(spec.clone());
    }
    let (binary, values) =
        protocol::bind_params(bind_rest).map_err(|e| PgError::new("08P01", e.to_string()))?;
    bound_by(spec, &binary, &values)
}

/// The merge with its LIMIT and OFFSET parameters taken from `values` (each binary or
/// text, as `binary` says).
pub(super) fn bound_by(
    spec: &crate::router::merge::MergeSpec,
    binary: &[bool],
    values: &[Option<&[u8]>],
) -> Result<crate::router::merge::MergeSpec, PgError> {
    spec.bound(|i| {
        let Some(v) = *values.get(i).ok_or("there is no such parameter")? else {
            return Ok(None);
        };
        let n = if binary.get(i).copied().unwrap_or(false) {
            match v.len() {
                2 => i16::from_be_bytes([v[0], v[1]]).into(),
                4 => i32::from_be_bytes(v.try_into().expect("4")).into(),
                8 => i64::from_be_bytes(v.try_into().expect("8")),
                _ => return Err("not an integer".into()),
            }
        } else {
            std::str::from_utf8(v)
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .ok_or("not an integer")?
        };
        Ok(Some(n))
    })
    .map_err(|(code, msg)| PgError::new(code, msg))
}

impl Session {
    /// How a statement over several shards runs, or why it cannot.
    pub(super) fn multi_plan(&self, shards: &[usize], a: &Analysis) -> Result<Multi, PgError> {
        let sharded_writes_allowed =
            self.db.config.cross_shard_writes == crate::config::CrossShardWrites::Allow;
        if a.explain && a.kind >= Kind::Write {
            // EXPLAIN ANALYZE runs the write as written on each shard: only where that is
            // the write itself (not an INSERT whose rows pgshard splits), and as allowed.
            let mut write = a.clone();
            write.explain = false;
            return match self.multi_plan(shards, &write)? {
                Multi::SplitInsert(_) | Multi::InsertVia(_) => Err(PgError::new(
                    "0A000",
                    "EXPLAIN ANALYZE of an INSERT whose rows go to several shards is not supported (explain it without ANALYZE)",
                )),
                _ => Ok(Multi::Explain),
            };
        }
        Ok(match (a.kind, &a.merge) {
            _ if a.explain => Multi::Explain,
            (Kind::Ddl, _) => Multi::Ddl,
            (Kind::Read | Kind::Other, Some(Ok(_)))
                if a.cursor.as_ref().is_some_and(|c| c.binary) =>
            {
                return Err(PgError::new(
                    "0A000",
                    "a BINARY cursor over several shards is not supported (declare it without BINARY)",
                ));
            }
            (Kind::Read | Kind::Other, Some(Ok(spec))) => Multi::Merge(Box::new(spec.clone())),
            (Kind::Read | Kind::Other, Some(Err(why))) => {
                return Err(PgError::new("0A000", why.clone()));
            }
            (Kind::Read | Kind::Other, None) => {
                return Err(PgError::new(
                    "0A000",
                    "this statement over several shards cannot be merged",
                ));
            }
            // Each shard inserts the rows it makes from its own rows.
            (Kind::Write, _) if a.insert_select => Multi::Write { sum: true },
            (Kind::Write, _) if a.insert_via.is_some() => {
                Multi::InsertVia(a.insert_via.clone().expect("checked"))
            }
            (Kind::Write, _) if a.inserts_sharded => match &a.insert_split {
                Some(split) => match self.db.router.split_insert(split, &Default::default()) {
                    Ok(parts) => Multi::SplitInsert(parts),
                    Err(e) => return Err(PgError::new(e.sqlstate(), e.to_string())),
                },
                None => {
                    return Err(PgError::new(
                        "0A000",
                        format!("this INSERT needs shards {shards:?}, and only INSERT ... VALUES can be split over shards"),
                    )
                    .with_hint("Insert the rows of each shard key separately."));
                }
            },
            (Kind::Write, _) if a.writes_reference => Multi::Write { sum: false },
            (Kind::Write, _) if sharded_writes_allowed => Multi::Write { sum: true },
            (Kind::Write, _) => {
                return Err(PgError::new(
                    "0A000",
                    format!("this write needs shards {shards:?}, and cross_shard_writes is deny"),
                )
                .with_hint("Add a shard key condition, or set cross_shard_writes: allow for this database (all or none, with two-phase commit)."));
            }
        })
    }

    /// A statement over several shards (simple protocol, outside a transaction).
    pub(super) async fn run_multi(
        &mut self,
        sql: &str,
        shards: Vec<usize>,
        a: &Analysis,
    ) -> Result<(), SessionError> {
        if self.status != b'I' && !self.can_run_in_transaction() {
            let e = cross_shard_txn(self.home_shard(), &shards);
            self.answer_error(e);
            return Ok(());
        }
        let plan = match self.multi_plan(&shards, a) {
            Ok(p) => p,
            Err(e) => {
                self.answer_error(e);
                return Ok(());
            }
        };
        if let Some(e) = a.cursor.as_ref().and_then(|c| self.cursor_refused(c)) {
            self.answer_error(e);
            return Ok(());
        }
        // Inside a transaction the statement joins every shard it needs; outside one, a
        // write runs in an implicit transaction over them, committed with two-phase commit.
        // Reads outside a transaction need no transaction: they run in parallel below.
        // An INSERT ... SELECT through pgshard reads, then writes: one transaction, whatever
        // the commit protocol.
        let reads = matches!(plan, Multi::Merge(_))
            || (matches!(plan, Multi::Explain) && a.kind <= Kind::Read);
        let transactional = self.status != b'I'
            || (!reads
                && self.db.config.two_phase_commit == crate::config::TwoPhaseCommit::On
                && self.mode == PoolMode::Transaction
                && !scatter::needs_autocommit(sql))
            || matches!(plan, Multi::InsertVia(_)) && self.mode == PoolMode::Transaction;
        if transactional {
            return self.run_multi_tx(sql, shards, plan, a).await;
        }
        self.settle().await?;
        for &s in &shards {
            let st = &self.db.shards[s].stats;
            crate::metrics::inc(match plan {
                Multi::Ddl | Multi::Write { .. } => &st.broadcast,
                _ => &st.cross_shard,
            });
        }
        let prelude = self.settings_sql();
        let nodes = self.read_nodes(&shards);
        let started = std::time::Instant::now();
        let out = match &plan {
            Multi::Merge(spec) => scatter::run_on_shards(
                &self.db,
                &nodes,
                scatter::Request::Simple(a.shard_sql.as_deref().unwrap_or(sql)),
                Some(&prelude),
                self.settings_fp,
            )
            .await
            .and_then(|r| scatter::merge_select(r, spec, &[]))
            .map(|out| match &a.cursor {
                Some(c) => self.declare_cursor(c, out),
                None => out,
            }),
            Multi::SplitInsert(parts) => {
                scatter::run_each_all_or_none(&self.db, parts, Some(&prelude), self.settings_fp)
                    .await
                    .map(|r| scatter::combine_writes(r, true))
            }
            Multi::InsertVia(_) => Err(PgError::new(
                "0A000",
                "INSERT ... SELECT whose rows pgshard must split by key needs transaction pooling mode",
            )),
            Multi::Explain if reads => scatter::run_on_shards(
                &self.db,
                &nodes,
                scatter::Request::Simple(sql),
                Some(&prelude),
                self.settings_fp,
            )
            .await
            .map(|r| scatter::explain_result(r, &shards)),
            Multi::Ddl | Multi::Write { .. } | Multi::Explain => {
                scatter::run_all_or_none(&self.db, &shards, sql, Some(&prelude), self.settings_fp)
                    .await
                    .map(|r| match plan {
                        Multi::Write { sum } => scatter::combine_writes(r, sum),
                        Multi::Explain => scatter::explain_result(r, &shards),
                        _ => scatter::broadcast_result(r),
                    })
            }
        };
        let kind = match plan {
            Multi::Merge(_) => "merge",
            Multi::SplitInsert(_) => "split insert",
            Multi::Ddl => "broadcast ddl",
            Multi::Write { .. } => "broadcast write",
            Multi::InsertVia(_) => "insert select",
            Multi::Explain => "explain",
        };
        self.cross_shard_done(&shards, kind, started.elapsed(), sql);
        self.relay.drain_local(&mut self.cout);
        match out {
            Ok(bytes) => self.cout.extend_from_slice(&bytes),
            Err(e) => {
                self.db.shards[self.home_shard()].stats.error(e.code);
                e.write(&mut self.cout)
            }
        }
        protocol::write_ready(&mut self.cout, self.status);
        Ok(())
    }

    /// Logs a request pgshard ran over several shards (debug; warn when slow).
    pub(super) fn cross_shard_done(
        &self,
        shards: &[usize],
        kind: &str,
        took: std::time::Duration,
        sql: &str,
    ) {
        tracing::debug!(shards = ?shards, kind, micros = took.as_micros() as u64, "request done");
        if self.slow.is_some_and(|s| took >= s) {
            let head: String = sql.chars().take(500).collect();
            tracing::warn!(shards = ?shards, kind, ms = took.as_millis() as u64, statement = %head, "slow query");
        }
    }

    /// A Bind whose statement writes on several shards (DDL, a reference-table write, a
    /// keyless UPDATE/DELETE, a split INSERT without parameters): runs it with the
    /// client's parameters on each shard inside a transaction over them (the client's, or
    /// an implicit one committed with two-phase commit), and holds the combined result as
    /// a portal. A read over several shards inside the client's transaction runs the same
    /// way (`merge_bind_in_transaction`).
    pub(super) async fn write_bind(
        &mut self,
        frame: &Bytes,
        shards: &[usize],
        a: &Analysis,
    ) -> Result<(), SessionError> {
        let b = protocol::parse_bind(frame)?;
        let Some((query, types)) = self.route.texts.get(b.stmt).cloned() else {
            self.local_error(multi_shard_error(shards, a));
            return Ok(());
        };
        let (binary, values) = protocol::bind_params(b.rest)?;
        // A split INSERT's rows go by their keys, parameters included: each shard gets its
        // rows with only their parameters, renumbered.
        let split = match &a.insert_split {
            Some(split) if a.inserts_sharded => {
                let params = crate::router::Params {
                    values: values.clone(),
                    binary: binary.clone(),
                    oids: protocol::parse_oids(&types),
                };
                match self.db.router.split_insert(split, &params) {
                    Ok(parts) => Some(parts),
                    Err(e) => {
                        self.local_error(PgError::new(e.sqlstate(), e.to_string()));
                        return Ok(());
                    }
                }
            }
            _ => None,
        };
        let plan = match split {
            Some(parts) => Multi::SplitInsert(parts),
            None => match self.multi_plan(shards, a) {
                Ok(Multi::Merge(spec)) if self.status == b'T' => {
                    let spec = match bound_spec(&spec, b.rest) {
                        Ok(s) => s,
                        Err(e) => {
                            self.status = b'E';
                            self.local_error(e);
                            return Ok(());
                        }
                    };
                    return self
                        .merge_bind_in_transaction(&spec, &query, &types, b.rest, shards, a)
                        .await;
                }
                Ok(Multi::Merge(_)) => {
                    self.local_error(multi_shard_error(shards, a));
                    return Ok(());
                }
                Ok(Multi::InsertVia(via)) => {
                    let bind_rest = b.rest.to_vec();
                    return self.insert_via_bind(&via, &types, &bind_rest).await;
                }
                Ok(p) => p,
                Err(e) => {
                    self.local_error(e);
                    return Ok(());
                }
            },
        };
        let bind_rest = b.rest.to_vec();
        let mut per_shard: std::collections::HashMap<usize, ShardRequest> =
            std::collections::HashMap::new();
        if let Multi::SplitInsert(parts) = &plan {
            for (s, sql) in parts {
                let (sql, keep) = match crate::router::insert::renumber_params(sql) {
                    Ok(x) => x,
                    Err(e) => {
                        self.local_error(PgError::new(
                            "0A000",
                            format!("cannot split this INSERT: {e}"),
                        ));
                        return Ok(());
                    }
                };
                let rest = protocol::select_bind_params(&bind_rest, &keep)?;
                per_shard.insert(
                    *s,
                    (
                        sql.into_bytes(),
                        protocol::select_param_types(&types, &keep),
                        rest,
                    ),
                );
            }
        }
        if !self.answer_held().await? {
            return Ok(());
        }
        let implicit = self.begin_implicit().await?;
        let mut results = Vec::with_capacity(shards.len());
        let mut description: Option<Bytes> = None;
        for &s in shards {
            let (q, ty, rest): (&[u8], &[u8], &[u8]) = match per_shard.get(&s) {
                Some((q, t, r)) => (q, t, r),
                None => (&query[..], &types[..], &bind_rest[..]),
            };
            let req = extended_request(q, ty, rest);
            let Some(mut frames) = self.run_request_on(s, &req).await? else {
                return Ok(());
            };
            if frames.is_empty() {
                // The shard could not join (the client got that error).
                break;
            }
            // (EXPLAIN's description tells how its rows are combined: kept.)
            if !matches!(plan, Multi::Explain)
                && let Some(i) = frames.iter().position(|f| matches!(f[0], b'T' | b'n'))
            {
                let d = frames.remove(i).freeze();
                description.get_or_insert(d);
            }
            results.push(frames);
            if self.status == b'E' {
                break;
            }
        }
        let out = match &plan {
            Multi::Ddl => scatter::broadcast_result(results),
            Multi::Explain => {
                let mut out = scatter::explain_result(results, shards);
                if out.first() == Some(&b'T') {
                    let n = i32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize + 1;
                    description = Some(out.split_to(n).freeze());
                }
                out
            }
            Multi::Write { sum } => scatter::combine_writes(results, *sum),
            _ => scatter::combine_writes(results, true),
        };
        self.hold_write_result(out, description, implicit).await
    }

    /// Ends a write over several shards begun at a Bind: the implicit transaction it ran
    /// in, if any, then its result held as the portal the client executes (or its error,
    /// skipping the rest of the batch).
    pub(super) async fn hold_write_result(
        &mut self,
        mut out: bytes::BytesMut,
        description: Option<Bytes>,
        implicit: bool,
    ) -> Result<(), SessionError> {
        if implicit {
            self.end_implicit(&mut out).await?;
        }
        if protocol::frames(&out).any(|f| f[0] == b'E') {
            self.bind_failed(out.freeze());
            return Ok(());
        }
        let description = description.unwrap_or_else(|| crate::exec::empty_frame(b'n'));
        self.hold_portal(description, out.freeze());
        Ok(())
    }

    /// A Bind whose statement reads several shards: runs it on each (with the client's
    /// parameters and result formats) and holds the merged rows as a virtual portal.
    pub(super) async fn scatter_bind(
        &mut self,
        frame: &Bytes,
        shards: &[usize],
        a: &Analysis,
    ) -> Result<(), SessionError> {
        let spec = match self.multi_plan(shards, a) {
            Ok(Multi::Merge(spec)) => match bound_spec(&spec, protocol::parse_bind(frame)?.rest) {
                Ok(s) => s,
                Err(e) => {
                    self.local_error(e);
                    return Ok(());
                }
            },
            Ok(_) => {
                self.local_error(multi_shard_error(shards, a));
                return Ok(());
            }
            Err(e) => {
                self.local_error(e);
                return Ok(());
            }
        };
        if let Some(e) = a.cursor.as_ref().and_then(|c| self.cursor_refused(c)) {
            self.local_error(e);
            return Ok(());
        }
        // The merged rows come from fresh connections: the one that answered the held
        // frames goes back.
        let held = self.holding();
        if !self.answer_held().await? {
            return Ok(());
        }
        if held {
            self.detach().await;
        }
        let b = protocol::parse_bind(frame)?;
        let Some((query, types)) = self.route.texts.get(b.stmt).cloned() else {
            self.local_error(multi_shard_error(shards, a));
            return Ok(());
        };
        let prelude = self.settings_sql();
        let bind_rest =
            scatter::with_extra_result_columns(&cursor_rest(a, b.rest), spec.hidden.len());
        for &s in shards {
            crate::metrics::inc(&self.db.shards[s].stats.cross_shard);
        }
        let nodes = self.read_nodes(shards);
        let results = scatter::run_on_shards(
            &self.db,
            &nodes,
            scatter::Request::Extended {
                query: a.shard_sql.as_deref().map_or(&query[..], str::as_bytes),
                types: &types,
                bind_rest: &bind_rest,
            },
            Some(&prelude),
            self.settings_fp,
        )
        .await;
        let formats = scatter::result_formats(&bind_rest);
        let merged = results.and_then(|r| scatter::merge_select(r, &spec, &formats));
        self.hold_merged(merged, a);
        Ok(())
    }

    /// A Bind of a read over several shards inside the client's transaction: every shard
    /// joins the transaction and runs the Bind (with the client's parameters and result
    /// formats) in turn, so the read sees the transaction's own writes; the merged rows
    /// are held as the portal.
    async fn merge_bind_in_transaction(
        &mut self,
        spec: &crate::router::merge::MergeSpec,
        query: &[u8],
        types: &[u8],
        rest: &[u8],
        shards: &[usize],
        a: &Analysis,
    ) -> Result<(), SessionError> {
        if !self.answer_held().await? {
            return Ok(());
        }
        let bind_rest =
            scatter::with_extra_result_columns(&cursor_rest(a, rest), spec.hidden.len());
        let req = extended_request(
            a.shard_sql.as_deref().map_or(query, str::as_bytes),
            types,
            &bind_rest,
        );
        let mut results = Vec::with_capacity(shards.len());
        for &s in shards {
            crate::metrics::inc(&self.db.shards[s].stats.cross_shard);
            let Some(frames) = self.run_request_on(s, &req).await? else {
                return Ok(());
            };
            if frames.is_empty() {
                // The shard could not join (the client got that error).
                return Ok(());
            }
            results.push(frames);
            if self.status == b'E' {
                break;
            }
        }
        let merged = scatter::merge_select(results, spec, &scatter::result_formats(&bind_rest));
        if merged.is_err() {
            // As after any error, the transaction is aborted.
            self.status = b'E';
        }
        self.hold_merged(merged, a);
        Ok(())
    }

    /// Holds the merged rows of a Bind as its portal (of a DECLARE: as its cursor, the
    /// portal answering the DECLARE), or fails the Bind with the merge's or a shard's
    /// error.
    fn hold_merged(&mut self, merged: Result<bytes::BytesMut, PgError>, a: &Analysis) {
        let merged = match (merged, &a.cursor) {
            (Ok(out), Some(c)) => Ok(self.declare_cursor(c, out)),
            (m, _) => m,
        };
        match merged {
            // A shard's error.
            Ok(out) if protocol::frames(&out).any(|f| f[0] == b'E') => {
                self.bind_failed(out.freeze())
            }
            Ok(mut out) => {
                let description = if out.first() == Some(&b'T') {
                    let n = i32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize + 1;
                    out.split_to(n).freeze()
                } else {
                    crate::exec::empty_frame(b'n')
                };
                self.hold_portal(description, out.freeze());
            }
            Err(e) => self.local_error(e),
        }
    }
}

//! A Bind over several shards: its statement runs on each shard with the client's
//! parameters and result formats (inside the client's transaction, whose shards join it,
//! or an implicit one for writes), and the combined result is held as the client's
//! portal, which pgshard then answers (`portal.rs`).

use super::cross::{Multi, extended_request, multi_shard_error};
use super::*;
use crate::exec::scatter;
use crate::router::Analysis;
use crate::router::merge::MergeSpec;

/// One shard's part of a split statement in the extended protocol: its query, parameter
/// types and Bind body.
type ShardRequest = (Vec<u8>, Vec<u8>, Vec<u8>);

/// A Bind's remainder for the shards: a DECLARE's query returns text (its cursor's rows),
/// whatever formats the DECLARE's Bind asked for, and so do the partial aggregates of a
/// query PostgreSQL finishes (they become the final query's text parameters).
/// The parameter types go along: those only a final query uses are NULL text for the
/// shards (`exec::finalize::shard_params`).
fn shard_request(
    a: &Analysis,
    spec: &MergeSpec,
    types: &[u8],
    rest: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), PgError> {
    let (types, rest) = match &spec.finalize {
        Some(fin) => crate::exec::finalize::shard_params(fin, types, rest)?,
        None => (types.to_vec(), rest.to_vec()),
    };
    let rest = if a.cursor.is_some() || spec.finalize.is_some() {
        scatter::with_text_results(&rest)
    } else {
        rest
    };
    Ok((
        types,
        scatter::with_extra_result_columns(&rest, spec.hidden.len()),
    ))
}

/// The result formats of the merged result: the client's, text for a DECLARE's.
fn client_formats(a: &Analysis, rest: &[u8]) -> Vec<bool> {
    if a.cursor.is_some() {
        Vec::new()
    } else {
        scatter::result_formats(rest)
    }
}

/// The merge with the LIMIT and OFFSET parameter values of a Bind (`bind_rest`).
fn bound_spec(
    spec: &crate::router::merge::MergeSpec,
    bind_rest: &[u8],
) -> Result<crate::router::merge::MergeSpec, PgError> {
    if !spec.has_params() {
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

/// The merged (and finished) answer of a Bind's read over several shards, outside a
/// transaction, from the shards' answers: `bind` is the statement's parameter types, the
/// Bind's body after its names, and the shards' result formats.
async fn merged_bound(
    db: &crate::cluster::Database,
    node: (usize, Option<usize>),
    results: Result<Vec<Vec<bytes::BytesMut>>, PgError>,
    spec: &MergeSpec,
    a: &Analysis,
    (types, rest, formats): (&[u8], &[u8], &[bool]),
    settings: (Option<&str>, u64),
) -> Result<bytes::BytesMut, PgError> {
    let results = results?;
    let client = crate::exec::finalize::ClientParams::of(types, rest)?;
    crate::exec::finalize::merged_and_finished(
        db,
        node,
        results,
        spec,
        (formats, &client_formats(a, rest)),
        Some(&client),
        settings,
    )
    .await
}

impl Session {
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
        let Some((query, types)) = self.statement_over(b.stmt, shards, a) else {
            return Ok(());
        };
        self.write_bound(&query, &types, b.rest, shards, a).await
    }

    /// The text and parameter types of the statement a Bind over `shards` binds; None
    /// when pgshard does not know it (the client got the error).
    fn statement_over(
        &mut self,
        stmt: &[u8],
        shards: &[usize],
        a: &Analysis,
    ) -> Option<(Bytes, Bytes)> {
        let known = self.route.texts.get(stmt).cloned();
        if known.is_none() {
            self.local_error(multi_shard_error(shards, a));
        }
        known
    }

    /// [`Session::write_bind`] of a statement (`query`, its parameter `types`) with a
    /// Bind's body after its names (`rest`).
    pub(super) async fn write_bound(
        &mut self,
        query: &[u8],
        types: &[u8],
        rest: &[u8],
        shards: &[usize],
        a: &Analysis,
    ) -> Result<(), SessionError> {
        let (binary, values) = protocol::bind_params(rest)?;
        // A split INSERT's rows go by their keys, parameters included: each shard gets its
        // rows with only their parameters, renumbered.
        let split = match &a.insert_split {
            Some(split) if a.inserts_sharded => {
                let params = crate::router::Params {
                    values: values.clone(),
                    binary: binary.clone(),
                    oids: protocol::parse_oids(types),
                };
                match self.db.router.split_insert(split, &params, &self.zone) {
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
                    let spec = match bound_spec(&spec, rest) {
                        Ok(s) => s,
                        Err(e) => {
                            self.status = b'E';
                            self.local_error(e);
                            return Ok(());
                        }
                    };
                    return self
                        .merge_bind_in_transaction(&spec, query, types, rest, shards, a)
                        .await;
                }
                Ok(Multi::Merge(_)) => {
                    self.local_error(multi_shard_error(shards, a));
                    return Ok(());
                }
                Ok(Multi::InsertVia(via)) => {
                    let bind_rest = rest.to_vec();
                    return self.insert_via_bind(&via, types, &bind_rest).await;
                }
                Ok(p) => p,
                Err(e) => {
                    self.local_error(e);
                    return Ok(());
                }
            },
        };
        let bind_rest = rest.to_vec();
        let mut per_shard: std::collections::HashMap<usize, ShardRequest> =
            std::collections::HashMap::new();
        if let Multi::SplitInsert(split) = &plan {
            for (s, sql) in &split.parts {
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
                        protocol::select_param_types(types, &keep),
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
                None => (query, types, &bind_rest[..]),
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
                    description = Some(super::portal::take_description(&mut out));
                }
                out
            }
            Multi::Write { sum } => scatter::combine_writes(results, *sum),
            Multi::SplitInsert(split) => {
                let results = scatter::in_row_order(results, shards, &split.row_shards);
                scatter::combine_writes(results, true)
            }
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
        if protocol::has_error(&out) {
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
        let Some((query, types)) = self.statement_over(b.stmt, shards, a) else {
            return Ok(());
        };
        self.scatter_bound(&spec, &query, &types, b.rest, shards, a)
            .await
    }

    /// The merged read of [`Session::scatter_bind`], of a statement (`query`, its
    /// parameter `types`) with a Bind's body after its names (`rest`).
    pub(super) async fn scatter_bound(
        &mut self,
        spec: &MergeSpec,
        query: &[u8],
        types: &[u8],
        rest: &[u8],
        shards: &[usize],
        a: &Analysis,
    ) -> Result<(), SessionError> {
        let prelude = self.settings_sql();
        let (shard_types, bind_rest) = match shard_request(a, spec, types, rest) {
            Ok(r) => r,
            Err(e) => {
                self.local_error(e);
                return Ok(());
            }
        };
        for &s in shards {
            crate::metrics::inc(&self.db.shards[s].stats.cross_shard);
        }
        let nodes = self.read_nodes(shards);
        let req = scatter::Request::Extended {
            query: a.shard_sql.as_deref().map_or(query, str::as_bytes),
            types: &shard_types,
            bind_rest: &bind_rest,
        };
        if super::cross::streams(spec, a) {
            let started = std::time::Instant::now();
            if self.stream_bound(&nodes, req, &prelude).await? {
                let sql = String::from_utf8_lossy(query);
                self.cross_shard_done(shards, "stream", started.elapsed(), &sql);
                return Ok(());
            }
        }
        let formats = scatter::result_formats(&bind_rest);
        if super::cross::sorted_streams(spec, a)
            && let Some(describe) = self.take_describe_execute()
        {
            let started = std::time::Instant::now();
            let portal = self.bind_complete();
            let sorted = self
                .stream_sorted(&nodes, req, (&prelude, describe), spec, &formats)
                .await?;
            if let Some(results) = self.streamed_portal(sorted, &portal) {
                let settings = (Some(&prelude[..]), self.settings_fp);
                let bind = (types, rest, &formats[..]);
                let merged =
                    merged_bound(&self.db, nodes[0], Ok(results), spec, a, bind, settings).await;
                self.execute_merged(merged, &portal, describe);
            }
            let sql = String::from_utf8_lossy(query);
            self.cross_shard_done(shards, "sorted", started.elapsed(), &sql);
            return Ok(());
        }
        let results =
            scatter::run_on_shards(&self.db, &nodes, req, Some(&prelude), self.settings_fp).await;
        let settings = (Some(&prelude[..]), self.settings_fp);
        let bind = (types, rest, &formats[..]);
        let merged = merged_bound(&self.db, nodes[0], results, spec, a, bind, settings).await;
        self.hold_merged(merged, a);
        Ok(())
    }

    /// A Bind of a read over several shards inside the client's transaction: every shard
    /// joins the transaction and runs the Bind (with the client's parameters and result
    /// formats) in turn, so the read sees the transaction's own writes; the merged rows
    /// are held as the portal.
    pub(super) async fn merge_bind_in_transaction(
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
        let (shard_types, bind_rest) = match shard_request(a, spec, types, rest) {
            Ok(r) => r,
            Err(e) => {
                self.status = b'E';
                self.local_error(e);
                return Ok(());
            }
        };
        let req = extended_request(
            a.shard_sql.as_deref().map_or(query, str::as_bytes),
            &shard_types,
            &bind_rest,
        );
        if super::cross::streams(spec, a) && self.stream_bound_in_transaction(&req, shards).await? {
            return Ok(());
        }
        if super::cross::sorted_streams(spec, a)
            && let Some(describe) = self.take_describe_execute()
        {
            let portal = self.bind_complete();
            let formats = scatter::result_formats(&bind_rest);
            let sorted = self
                .stream_sorted_in_transaction(&req, shards, describe, spec, &formats)
                .await?;
            let Some(results) = self.streamed_portal(sorted, &portal) else {
                return Ok(());
            };
            let bind = (types, rest, &formats[..]);
            if let Some(merged) = self
                .merged_bound_in_transaction(shards[0], results, spec, a, bind)
                .await?
            {
                self.execute_merged(merged, &portal, describe);
            }
            return Ok(());
        }
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
        let formats = scatter::result_formats(&bind_rest);
        let bind = (types, rest, &formats[..]);
        let Some(merged) = self
            .merged_bound_in_transaction(shards[0], results, spec, a, bind)
            .await?
        else {
            return Ok(());
        };
        if merged.is_err() {
            // As after any error, the transaction is aborted.
            self.status = b'E';
        }
        self.hold_merged(merged, a);
        Ok(())
    }

    /// [`merged_bound`] inside the transaction: merged, and finished on shard `s`'s
    /// participant. None when that connection was lost (the client was told).
    async fn merged_bound_in_transaction(
        &mut self,
        s: usize,
        results: Vec<Vec<bytes::BytesMut>>,
        spec: &MergeSpec,
        a: &Analysis,
        (types, rest, formats): (&[u8], &[u8], &[bool]),
    ) -> Result<Option<Result<bytes::BytesMut, PgError>>, SessionError> {
        let merged = self.merge_in_transaction(s, results, spec, formats).await;
        let client = match crate::exec::finalize::ClientParams::of(types, rest) {
            Ok(c) => c,
            Err(e) => return Ok(Some(Err(e))),
        };
        self.finish_in_transaction(s, spec, merged, &client_formats(a, rest), Some(&client))
            .await
    }

    /// After a sorted read answered the client's Describe and Execute of `portal`
    /// (`stream_sorted`): the portal held exhausted, or the rest of the batch skipped
    /// after an error. The shards' answers when they are to be merged held instead
    /// ([`Session::execute_merged`]).
    fn streamed_portal(
        &mut self,
        sorted: super::sorted_stream::Sorted,
        portal: &[u8],
    ) -> Option<Vec<Vec<bytes::BytesMut>>> {
        use super::sorted_stream::Sorted;
        match sorted {
            Sorted::Streamed(Some(description)) => {
                self.hold_exhausted_portal(portal, description);
            }
            Sorted::Streamed(None) => self.batch_failed(),
            Sorted::Held(results) => return Some(results),
        }
        None
    }

    /// The client's Describe (when `describe`) and Execute of `portal` answered from its
    /// merged rows, after its BindComplete; the portal is then held exhausted. An error
    /// skips the rest of the batch (inside a transaction, which it aborts).
    fn execute_merged(
        &mut self,
        merged: Result<bytes::BytesMut, PgError>,
        portal: &[u8],
        describe: bool,
    ) {
        match merged {
            Ok(out) if protocol::has_error(&out) => {
                self.cout.extend_from_slice(&out);
                self.batch_failed();
            }
            Ok(mut out) => {
                let description = super::portal::take_description(&mut out);
                if describe {
                    self.cout.extend_from_slice(&description);
                }
                self.cout.extend_from_slice(&out);
                self.hold_exhausted_portal(portal, description);
            }
            Err(e) => {
                self.stream_error(e);
                self.batch_failed();
            }
        }
    }

    /// Holds the merged rows of a Bind as its portal (of a DECLARE: as its cursor, the
    /// portal answering the DECLARE), or fails the Bind with the merge's or a shard's
    /// error.
    fn hold_merged(&mut self, merged: Result<bytes::BytesMut, PgError>, a: &Analysis) {
        let merged = merged.map(|out| self.merged_answer(a, out));
        match merged {
            // A shard's error.
            Ok(out) if protocol::has_error(&out) => self.bind_failed(out.freeze()),
            Ok(mut out) => {
                let description = super::portal::take_description(&mut out);
                self.hold_portal(description, out.freeze());
            }
            Err(e) => self.local_error(e),
        }
    }

    /// Finishes a merged result inside the client's transaction: the final query of an
    /// aggregate PostgreSQL finishes runs on shard `s`'s participant. None when that
    /// connection was lost (the client was told).
    /// Merges the results of a read inside the transaction; values pgshard cannot order
    /// itself are ranked on the primary of shard `s`, in the client's settings.
    pub(super) async fn merge_in_transaction(
        &mut self,
        s: usize,
        results: Vec<Vec<bytes::BytesMut>>,
        spec: &MergeSpec,
        formats: &[bool],
    ) -> Result<bytes::BytesMut, PgError> {
        let settings = self.settings_sql();
        let settings = (Some(&settings[..]), self.settings_fp);
        scatter::merge_select(&self.db, (s, None), results, spec, formats, settings).await
    }

    pub(super) async fn finish_in_transaction(
        &mut self,
        s: usize,
        spec: &MergeSpec,
        merged: Result<bytes::BytesMut, PgError>,
        formats: &[bool],
        client: Option<&crate::exec::finalize::ClientParams<'_>>,
    ) -> Result<Option<Result<bytes::BytesMut, PgError>>, SessionError> {
        let (Ok(out), Some(fin)) = (&merged, &spec.finalize) else {
            return Ok(Some(merged));
        };
        if protocol::has_error(out) {
            // A shard's error, as it is.
            return Ok(Some(merged));
        }
        let unknown = crate::exec::finalize::unknown_types(out);
        let mut arrays = Vec::new();
        if !unknown.is_empty() {
            let mut q = bytes::BytesMut::new();
            protocol::write_query(&mut q, &crate::exec::finalize::array_types_sql(&unknown));
            let Some(frames) = self.run_request_on(s, &q).await? else {
                return Ok(None);
            };
            arrays = crate::exec::finalize::array_types(&frames);
        }
        let collations = match crate::exec::order::collations(&self.db, (s, None), out).await {
            Ok(c) => c,
            Err(e) => return Ok(Some(Err(e))),
        };
        let (notices, req) =
            match crate::exec::finalize::request(fin, out, formats, (&arrays, &collations), client)
            {
                Err(e) => return Ok(Some(Err(e))),
                Ok(r) => r,
            };
        req.count(&self.db, s);
        let request = extended_request(&req.query, &req.types, &req.bind_rest);
        let Some(frames) = self.run_request_on(s, &request).await? else {
            return Ok(None);
        };
        Ok(Some(Ok(crate::exec::finalize::answer(
            notices, frames, &req,
        ))))
    }
}

//! Transactions over several shards (transaction pooling mode): a shard joins the
//! transaction the first time a statement needs it (with the same BEGIN, so the same
//! isolation level and read-only mode, and the savepoints and settings made so far: see
//! `replay.rs`); its connection is
//! parked while statements run elsewhere. COMMIT of a transaction that touched one shard
//! is the server's; over several, pgshard runs two-phase commit (or one-phase, when
//! `two_phase_commit: off`). ROLLBACK and savepoints apply on every shard touched.

use super::replay::Replay;
use super::{Pending, Session, SessionError};
use crate::config::{PoolMode, TwoPhaseCommit};
use crate::exec::twophase::{self, CommitError};
use crate::pool::Pooled;
use crate::protocol::{self, PgError};

/// The multi-shard part of a session's transaction.
#[derive(Default)]
pub(super) struct MultiState {
    /// Participants other than the attached connection, with their transaction open.
    pub(super) parked: Vec<(usize, Pooled)>,
    /// The BEGIN that started the transaction (replayed on joining shards).
    pub(super) begin: Option<String>,
    /// Savepoints alive and settings made in the transaction, in order: run on joining
    /// shards right after BEGIN.
    pub(super) replay: Vec<Replay>,
    /// The client's pipelined batch, begun outside a transaction, went to several
    /// shards: it is one transaction over them, committed at the batch's Sync.
    pub(super) batch_commit: bool,
    /// The transaction's backends as the deadlock detector knows them (from the second
    /// shard on).
    pub(super) txn: Option<crate::cluster::deadlock::Registration>,
    /// ParameterStatus messages for the client after the tag of the COMMIT or ROLLBACK
    /// pgshard answered (see [`Session::ended_params`]).
    ended: bytes::BytesMut,
}

/// A statement's frames from one shard, up to ReadyForQuery, and that status.
async fn run_on(
    b: &mut crate::backend::BackendConn,
    sql: &str,
    limit: crate::exec::MergeLimit<'_>,
) -> Result<(Vec<bytes::BytesMut>, u8), crate::backend::BackendError> {
    let mut out = bytes::BytesMut::new();
    protocol::write_query(&mut out, sql);
    send_and_collect(b, &out, limit).await
}

/// Sends a request (a Query, or Parse/Bind/Describe/Execute/Sync) and returns the
/// server's frames up to ReadyForQuery, without ParseComplete and BindComplete, and the
/// transaction status. An answer past `limit` is cancelled and read to its end without
/// being kept: its frames are then a 54000 error, and a transaction block it ran in is
/// aborted, as after any error.
pub(super) async fn send_and_collect(
    b: &mut crate::backend::BackendConn,
    request: &[u8],
    limit: crate::exec::MergeLimit<'_>,
) -> Result<(Vec<bytes::BytesMut>, u8), crate::backend::BackendError> {
    b.send(request).await?;
    let mut frames = Vec::new();
    let mut held = 0usize;
    loop {
        let f = b.read_frame().await?;
        if limit.bytes > 0 && f[0] != b'Z' {
            held += f.len();
            if limit.passed(held) {
                return too_large(b, limit).await;
            }
        }
        match f[0] {
            b'Z' => return Ok((frames, f.get(5).copied().unwrap_or(b'I'))),
            b'1' | b'2' => {}
            // COPY is carried out elsewhere; here it would desynchronize the connection.
            b'G' | b'H' | b'W' => {
                b.broken = true;
                return Err(crate::backend::BackendError::Protocol {
                    addr: b.addr.clone(),
                    source: crate::protocol::ProtocolError::Malformed {
                        what: "backend",
                        detail: "unexpected COPY in a multi-shard statement".into(),
                    },
                });
            }
            _ => frames.push(f),
        }
    }
}

/// `send_and_collect`'s answer past its limit: the statement cancelled and its answer
/// discarded; a transaction block left in progress (the statement ended before the cancel
/// reached it) is made to fail, so that it cannot commit what the client was told failed.
async fn too_large(
    b: &mut crate::backend::BackendConn,
    limit: crate::exec::MergeLimit<'_>,
) -> Result<(Vec<bytes::BytesMut>, u8), crate::backend::BackendError> {
    let mut status = b.discard_answer().await?;
    if status == b'T' {
        let mut out = bytes::BytesMut::new();
        protocol::write_query(
            &mut out,
            "DO $pgshard$BEGIN RAISE EXCEPTION USING ERRCODE = '54000', MESSAGE = 'pgshard: the statement''s answer exceeded max_merge_bytes'; END$pgshard$",
        );
        b.send(&out).await?;
        loop {
            let f = b.read_frame().await?;
            if f[0] == b'Z' {
                status = f.get(5).copied().unwrap_or(b'E');
                break;
            }
        }
    }
    let mut e = bytes::BytesMut::new();
    limit.exceeded().write(&mut e);
    Ok((vec![e], status))
}

impl Session {
    /// Whether a statement for another shard may join the open transaction.
    pub(super) fn can_join(&self) -> bool {
        self.mode == PoolMode::Transaction
            && self.status == b'T'
            && self.backend.is_some()
            && !self.in_batch
            && !self.in_copy
    }

    /// Makes `to` the attached shard of the open transaction: a participant already, or
    /// a new one (BEGIN, savepoints and settings replayed). False when the client got an
    /// error.
    pub(super) async fn join_shard(&mut self, to: usize) -> Result<bool, SessionError> {
        self.settle().await?;
        let Some(current) = self.backend.take() else {
            return Ok(false);
        };
        if self.status != b'T' {
            self.backend = Some(current);
            return Ok(false);
        }
        self.cancel.set(None);
        self.multi.parked.push((self.shard, current));
        if let Some(i) = self.multi.parked.iter().position(|(s, _)| *s == to) {
            let (s, b) = self.multi.parked.swap_remove(i);
            self.cancel.set(Some((&b.addr, b.pid, b.secret)));
            self.backend = Some(b);
            self.shard = s;
            return Ok(true);
        }
        let begin = self
            .multi
            .begin
            .clone()
            .unwrap_or_else(|| "BEGIN".to_string());
        self.route.deferred_begin = Some(begin);
        self.reads.read_ok = false;
        if !self.attach(to).await {
            // The client got the error. As after any error in a transaction, the rest of
            // it fails until ROLLBACK: the shard it was on is told so.
            self.route.deferred_begin = None;
            let (s, b) = self.multi.parked.pop().expect("pushed above");
            self.cancel.set(Some((&b.addr, b.pid, b.secret)));
            self.backend = Some(b);
            self.shard = s;
            self.relay.push(Pending::Internal);
            protocol::write_query(
                &mut self.bout,
                "DO $pgshard$ BEGIN RAISE EXCEPTION 'shard unavailable'; END $pgshard$",
            );
            self.status = b'E';
            return Ok(false);
        }
        self.route.movable_begin = None;
        self.write_replay();
        self.register_participants().await;
        tracing::debug!(shard = to, "shard joined the transaction");
        Ok(true)
    }

    /// Tells the deadlock detectors which backends the transaction holds: it can wait on
    /// one shard while holding locks on another, a cycle no server sees. The backends are
    /// registered in this process and marked on the servers with the transaction's id (for
    /// every pgshard process): the first participant now, the one just joined after its
    /// BEGIN and replay.
    async fn register_participants(&mut self) {
        use crate::cluster::deadlock::{Participant, TRANSACTIONS};
        let participant = |shard: usize, b: &Pooled| Participant {
            shard,
            addr: b.addr.clone(),
            pid: b.pid,
            secret: b.secret,
        };
        let mut parts: Vec<Participant> = self
            .multi
            .parked
            .iter()
            .map(|(s, b)| participant(*s, b))
            .collect();
        if let Some(b) = &self.backend {
            parts.push(participant(self.shard, b));
        }
        let first = self.multi.txn.is_none();
        let r = match self.multi.txn.take() {
            Some(r) => {
                r.update(parts);
                r
            }
            None => TRANSACTIONS.register(parts),
        };
        let tag = r.tag_sql();
        self.multi.txn = Some(r);
        // Marks are for the detectors; without detection they would only cost a round trip.
        if self.db.config.deadlock_detection_ms == 0 {
            return;
        }
        if first {
            for (s, b) in self.multi.parked.iter_mut() {
                // Without the mark, only this process's detector can find cycles through
                // this transaction: not worth failing the statement for.
                if let Err(e) | Ok(Some((_, e))) =
                    b.run_quiet(&tag).await.map_err(|e| e.to_string())
                {
                    tracing::debug!(shard = *s, error = %e, "cannot mark a backend with its transaction");
                }
            }
        }
        self.relay.push(Pending::Internal);
        protocol::write_query(&mut self.bout, &tag);
    }

    /// What a participant answered, before the client sees it: the cancellation of a
    /// deadlock's victim becomes the deadlock error its client must see, and a new
    /// `TimeZone` reported changes how timestamp keys are read.
    fn participant_frames(&mut self, frames: &mut [bytes::BytesMut]) {
        if let Some(r) = &self.multi.txn {
            r.rewrite(frames);
        }
        for f in frames.iter().filter(|f| f[0] == b'S') {
            super::server_frames::saw_parameter(&mut self.zone, f);
        }
    }

    /// Queues the transaction's savepoints and settings, in order, for the connection just
    /// attached (after its BEGIN); their answers are pgshard's.
    pub(super) fn write_replay(&mut self) {
        for step in &self.multi.replay {
            self.relay.push(Pending::Internal);
            step.write(&mut self.bout);
        }
    }

    /// COMMIT / ROLLBACK of a transaction with parked participants, answered by pgshard.
    /// Returns the CommandComplete tag, or the error frame the client gets.
    pub(super) async fn end_multi(
        &mut self,
        sql: &str,
    ) -> Result<Result<&'static str, bytes::BytesMut>, SessionError> {
        self.settle().await?;
        let chained = chains(sql).then(|| {
            self.multi
                .begin
                .clone()
                .unwrap_or_else(|| "BEGIN".to_string())
        });
        let mut parts = std::mem::take(&mut self.multi.parked);
        if let Some(b) = self.backend.take() {
            parts.push((self.shard, b));
        }
        self.cancel.set(None);
        parts.sort_by_key(|(s, _)| *s);
        let rollback = self.status == b'E' || rolls_back(sql);
        let shards: Vec<usize> = parts.iter().map(|(s, _)| *s).collect();
        let set_here = self
            .multi
            .replay
            .iter()
            .any(|r| matches!(r, Replay::Set(_) | Replay::Bound(_)));
        let out = if rollback {
            for (_, b) in parts.iter_mut() {
                roll_back(b).await;
            }
            Ok("ROLLBACK")
        } else {
            // One participant (or none: a string that ran only LISTEN) needs no 2PC.
            let r = match self.db.config.two_phase_commit {
                _ if parts.len() <= 1 => twophase::commit_one_phase(&mut parts).await,
                TwoPhaseCommit::On => twophase::commit(&self.db, &mut parts).await,
                TwoPhaseCommit::Off => twophase::commit_one_phase(&mut parts).await,
            };
            match r {
                Ok(()) => {
                    for &s in &shards {
                        self.wrote_unknown(s);
                    }
                    if set_here {
                        self.settings_after_commit(&mut parts).await;
                    }
                    Ok("COMMIT")
                }
                Err(CommitError::Aborted(frame)) => Err(frame),
                Err(CommitError::Unknown(why)) => {
                    let mut f = bytes::BytesMut::new();
                    PgError::new(
                        "08007",
                        format!("the outcome of this transaction is not known yet ({why}); pgshard's recovery will commit or roll it back on every shard"),
                    )
                    .write(&mut f);
                    Err(f)
                }
            }
        };
        // What ending the transaction changed (a `SET LOCAL` undone), as one server
        // would report it.
        for f in final_parameters(&mut parts) {
            if super::server_frames::parameter_for_client(&mut self.zone, &mut self.app_name, &f) {
                self.multi.ended.extend_from_slice(&f);
            }
        }
        drop(parts);
        self.route
            .portals
            .end_transaction(matches!(out, Ok("COMMIT")));
        self.multi.txn = None;
        self.listen_ext.ended(Some(matches!(out, Ok("COMMIT"))));
        self.status = b'I';
        self.multi.begin = None;
        self.multi.replay.clear();
        // A BEGIN no statement attached (only LISTEN ran) ends with it.
        self.route.deferred_begin = None;
        self.route.movable_begin = None;
        if let Some(begin) = chained.filter(|_| out.is_ok()) {
            // `AND CHAIN`: the next transaction begins at once, alike (on the shard its
            // first statement needs).
            self.route.deferred_begin = Some(begin);
            self.status = b'T';
        }
        tracing::debug!(shards = ?shards, outcome = ?out.as_ref().ok(), "multi-shard transaction ended");
        Ok(out)
    }

    /// After a COMMIT over several shards in which the client changed settings: every
    /// participant has them now; the client keeps them (read from one participant), and
    /// the connections are marked with them so that the next client gets its own.
    async fn settings_after_commit(&mut self, parts: &mut [(usize, Pooled)]) {
        let Some((_, first)) = parts.first_mut() else {
            return;
        };
        match super::server::capture_settings(first).await {
            Ok(s) => {
                self.settings = s;
                self.settings_fp = super::fingerprint(&self.settings);
                self.settings_dirty = false;
                for (_, b) in parts.iter_mut() {
                    b.settings = self.settings_fp;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read session settings; closing server connections");
                for (_, b) in parts.iter_mut() {
                    b.broken = true;
                }
            }
        }
    }

    /// Whether a statement over several shards may run inside the open transaction.
    pub(super) fn can_run_in_transaction(&self) -> bool {
        self.mode == PoolMode::Transaction && self.status == b'T' && !self.in_batch && !self.in_copy
    }

    /// A statement over several shards in a transaction: the client's (every shard joins
    /// it), or an implicit one around this statement alone (committed with two-phase
    /// commit, rolled back on any error). Each shard runs its part in turn.
    pub(super) async fn run_multi_tx(
        &mut self,
        sql: &str,
        shards: Vec<usize>,
        plan: super::cross::Multi,
        a: &crate::router::Analysis,
    ) -> Result<(), SessionError> {
        let implicit = self.begin_implicit().await?;
        let started = std::time::Instant::now();
        if let super::cross::Multi::Merge(spec) = &plan
            && !implicit
            && super::cross::streams(spec, a)
        {
            let sql = a.shard_sql.as_deref().unwrap_or(sql);
            self.stream_in_transaction(sql, &shards).await?;
            self.cross_shard_done(&shards, "stream", started.elapsed(), sql);
            return Ok(());
        }
        if let super::cross::Multi::Merge(spec) = &plan
            && !implicit
            && super::cross::sorted_streams(spec, a)
        {
            use super::sorted_stream::Sorted;
            let mut query = bytes::BytesMut::new();
            protocol::write_query(&mut query, a.shard_sql.as_deref().unwrap_or(sql));
            let out = match self
                .stream_sorted_in_transaction(&query, &shards, true, spec, &[])
                .await?
            {
                Sorted::Streamed(_) => bytes::BytesMut::new(),
                Sorted::Held(results) => {
                    match self
                        .merged_in_transaction(shards[0], results, spec, a)
                        .await?
                    {
                        Some(out) => out,
                        None => return Ok(()),
                    }
                }
            };
            self.cross_shard_done(&shards, "sorted", started.elapsed(), sql);
            self.relay.drain_local(&mut self.cout);
            self.cout.extend_from_slice(&out);
            protocol::write_ready(&mut self.cout, self.status);
            return Ok(());
        }
        let Some(mut out) = self.multi_tx_out(sql, &shards, &plan, a, implicit).await? else {
            return Ok(());
        };
        if implicit {
            self.end_implicit(&mut out).await?;
        }
        self.cross_shard_done(&shards, "transaction", started.elapsed(), sql);
        self.relay.drain_local(&mut self.cout);
        self.cout.extend_from_slice(&out);
        protocol::write_ready(&mut self.cout, self.status);
        Ok(())
    }

    /// Starts an implicit transaction when the session is outside one (true then): the
    /// next attach sends BEGIN.
    pub(super) async fn begin_implicit(&mut self) -> Result<bool, SessionError> {
        if self.status != b'I' {
            return Ok(false);
        }
        // A connection kept only for answers in flight must not take part unbegun.
        self.settle().await?;
        self.detach().await;
        self.route.deferred_begin = Some("BEGIN".to_string());
        self.status = b'T';
        Ok(true)
    }

    /// Runs a statement over several shards inside the current transaction, each shard in
    /// turn (joining it first); its results, combined, for the client. None when a server
    /// connection was lost (the client got that error). `implicit`: the transaction is
    /// this statement's own.
    pub(super) async fn multi_tx_out(
        &mut self,
        sql: &str,
        shards: &[usize],
        plan: &super::cross::Multi,
        a: &crate::router::Analysis,
        implicit: bool,
    ) -> Result<Option<bytes::BytesMut>, SessionError> {
        use super::cross::Multi;
        use crate::exec::scatter;
        if let Multi::InsertVia(via) = plan {
            return self.insert_via_out(via, implicit).await;
        }
        let mut results = Vec::with_capacity(shards.len());
        let mut failed = false;
        for &s in shards {
            if !self.enter_shard(s).await? {
                // The client got the error (a shard unavailable).
                failed = true;
                break;
            }
            let stmt: &str = match plan {
                Multi::SplitInsert(split) => split
                    .parts
                    .iter()
                    .find(|(p, _)| *p == s)
                    .map(|(_, q)| q.as_str())
                    .unwrap_or(sql),
                Multi::Merge(_) => a.shard_sql.as_deref().unwrap_or(sql),
                _ => sql,
            };
            match self.run_here(stmt).await? {
                None => return Ok(None),
                Some(frames) => {
                    let error = frames.iter().any(|f| f[0] == b'E');
                    results.push(frames);
                    if error {
                        break;
                    }
                }
            }
        }
        for &s in shards {
            crate::metrics::inc(&self.db.shards[s].stats.cross_shard);
        }
        if failed {
            self.status = b'E';
            return Ok(Some(bytes::BytesMut::new()));
        }
        Ok(Some(match plan {
            Multi::Merge(spec) => {
                return self
                    .merged_in_transaction(shards[0], results, spec, a)
                    .await;
            }
            Multi::SplitInsert(split) => {
                let results = scatter::in_row_order(results, shards, &split.row_shards);
                scatter::combine_writes(results, true)
            }
            Multi::Write { sum } => scatter::combine_writes(results, *sum),
            Multi::Ddl => scatter::broadcast_result(results),
            Multi::Explain => scatter::explain_result(results, shards),
            Multi::InsertVia(_) => unreachable!("carried out by insert_via_out above"),
        }))
    }

    /// The client's answer from the shards' answers to a read inside the transaction
    /// (a simple Query), merged and finished on shard `s`'s participant; a merge that
    /// fails aborts the transaction, as any error does. None when a server connection was
    /// lost (the client got that error).
    pub(super) async fn merged_in_transaction(
        &mut self,
        s: usize,
        results: Vec<Vec<bytes::BytesMut>>,
        spec: &crate::router::merge::MergeSpec,
        a: &crate::router::Analysis,
    ) -> Result<Option<bytes::BytesMut>, SessionError> {
        let merged = self.merge_in_transaction(s, results, spec, &[]).await;
        let Some(merged) = self
            .finish_in_transaction(s, spec, merged, &[], None)
            .await?
        else {
            return Ok(None);
        };
        Ok(Some(match merged.map(|out| self.merged_answer(a, out)) {
            Ok(f) => f,
            Err(e) => {
                self.fail_attached();
                let mut f = bytes::BytesMut::new();
                e.write(&mut f);
                f
            }
        }))
    }

    /// Makes shard `s` the attached participant of the transaction (attaching with the
    /// pending BEGIN, or joining it). False when the client got an error.
    pub(super) async fn enter_shard(&mut self, s: usize) -> Result<bool, SessionError> {
        let ok = if self.backend.is_none() {
            self.reads.read_ok = false;
            let ok = self.attach(s).await;
            if !ok {
                self.route.deferred_begin = None;
            }
            ok
        } else if self.shard == s {
            true
        } else {
            self.join_shard(s).await?
        };
        if ok {
            self.route.movable_begin = None;
            self.settle().await?;
        }
        Ok(ok)
    }

    /// Runs one statement on the attached connection: its frames up to ReadyForQuery
    /// (the status goes to the session). None when the connection was lost.
    pub(super) async fn run_here(
        &mut self,
        stmt: &str,
    ) -> Result<Option<Vec<bytes::BytesMut>>, SessionError> {
        let db = self.db.clone();
        let limit = crate::exec::MergeLimit::of(&db);
        let Some(b) = self.backend.as_mut() else {
            return Ok(None);
        };
        self.reads.executed = true;
        match run_on(b, stmt, limit).await {
            Ok((mut frames, status)) => {
                self.participant_frames(&mut frames);
                if status == b'E' || frames.iter().any(|f| f[0] == b'E') {
                    self.status = b'E';
                } else {
                    self.status = status;
                }
                Ok(Some(frames))
            }
            Err(e) => {
                self.backend_lost(e.to_string());
                Ok(None)
            }
        }
    }

    /// Runs an extended-protocol request on shard `s`'s participant (joining it): its
    /// frames, without ParseComplete and BindComplete; the session's status follows. None
    /// when the connection was lost (the client got that error).
    pub(super) async fn run_request_on(
        &mut self,
        s: usize,
        req: &[u8],
    ) -> Result<Option<Vec<bytes::BytesMut>>, SessionError> {
        if !self.enter_shard(s).await? {
            // The client got the error.
            self.status = b'E';
            return Ok(Some(Vec::new()));
        }
        let db = self.db.clone();
        let limit = crate::exec::MergeLimit::of(&db);
        let Some(conn) = self.backend.as_mut() else {
            return Ok(None);
        };
        self.reads.executed = true;
        match send_and_collect(conn, req, limit).await {
            Ok((mut frames, status)) => {
                self.participant_frames(&mut frames);
                self.status = if frames.iter().any(|f| f[0] == b'E') {
                    b'E'
                } else {
                    status
                };
                Ok(Some(frames))
            }
            Err(e) => {
                self.backend_lost(e.to_string());
                Ok(None)
            }
        }
    }

    /// Ends the implicit transaction a statement ran in: COMMIT, or ROLLBACK after an
    /// error; a commit that fails puts its error in place of the statement's result.
    pub(super) async fn end_implicit(
        &mut self,
        out: &mut bytes::BytesMut,
    ) -> Result<(), SessionError> {
        let end = if self.status == b'E' {
            "ROLLBACK"
        } else {
            "COMMIT"
        };
        if let Err(frame) = self.end_multi(end).await? {
            *out = frame;
        }
        let params = self.ended_params();
        out.extend_from_slice(&params);
        Ok(())
    }

    /// The ParameterStatus messages of the last [`Session::end_multi`], for the client
    /// after the statement's tag (PostgreSQL reports changes just before ReadyForQuery).
    pub(super) fn ended_params(&mut self) -> bytes::BytesMut {
        self.multi.ended.split()
    }

    /// `end_multi` for a simple Query: the answer and ReadyForQuery.
    pub(super) async fn end_multi_query(&mut self, sql: &str) -> Result<(), SessionError> {
        let r = self.end_multi(sql).await?;
        self.relay.drain_local(&mut self.cout);
        match r {
            Ok(tag) => protocol::write_complete(&mut self.cout, tag),
            Err(frame) => self.cout.extend_from_slice(&frame),
        }
        let params = self.ended_params();
        self.cout.extend_from_slice(&params);
        protocol::write_ready(&mut self.cout, self.status);
        Ok(())
    }

    /// The client left or its connection failed: parked participants are rolled back
    /// (closing them does it).
    pub(super) fn drop_parked(&mut self) {
        for (_, mut b) in std::mem::take(&mut self.multi.parked) {
            b.broken = true;
        }
        self.multi.txn = None;
        self.multi.begin = None;
        self.multi.replay.clear();
    }

    /// A transaction ended on the attached server (ReadyForQuery `I`).
    pub(super) fn transaction_over(&mut self) {
        if !self.multi.parked.is_empty() {
            // Only COMMIT/ROLLBACK end a transaction, and pgshard answers those itself when
            // shards are parked; anything else ending it is a bug: never leave the other
            // shards' work hanging half done.
            tracing::error!("transaction ended on one shard with others parked; rolling them back");
            self.drop_parked();
        }
        self.route.portals.clear();
        self.multi.txn = None;
        self.multi.begin = None;
        self.multi.replay.clear();
    }
}

/// Whether an end-of-transaction statement is a ROLLBACK (or ABORT) rather than a COMMIT;
/// comments before it are skipped, as `classify` skips them.
pub(super) fn rolls_back(end: &str) -> bool {
    let ([first], _) = crate::router::lexer::leading_words::<1>(end);
    first.eq_ignore_ascii_case("rollback") || first.eq_ignore_ascii_case("abort")
}

/// Whether a statement is `PREPARE TRANSACTION`: in a transaction over several shards it
/// would prepare the attached shard's part alone (pgshard commits such transactions with
/// two-phase commit itself), so it is refused there.
pub(super) fn prepares_transaction(st: &str) -> bool {
    let ([first, second], _) = crate::router::lexer::leading_words::<2>(st);
    first.eq_ignore_ascii_case("prepare") && second.eq_ignore_ascii_case("transaction")
}

/// The error for `PREPARE TRANSACTION` in a transaction over several shards.
pub(super) fn prepare_transaction_refused() -> PgError {
    PgError::new(
        "0A000",
        "PREPARE TRANSACTION in a transaction over several shards is not supported: pgshard commits it on every shard with two-phase commit itself",
    )
    .with_hint("COMMIT the transaction; roll it back now.")
}

/// Whether a COMMIT or ROLLBACK starts a new transaction right away (`AND CHAIN`), with
/// the same characteristics as the one it ends.
pub(super) fn chains(end: &str) -> bool {
    let (words, n) = crate::router::lexer::leading_words::<5>(end);
    let words = &words[..n];
    words
        .windows(2)
        .any(|w| w[0].eq_ignore_ascii_case("and") && w[1].eq_ignore_ascii_case("chain"))
}

/// Rolls back a participant's transaction; a connection that did not roll back cleanly is
/// not reused.
pub(super) async fn roll_back(b: &mut Pooled) {
    if !matches!(b.run_quiet("ROLLBACK").await, Ok(None)) {
        b.broken = true;
    }
}

/// The parameters whose values the participants reported to pgshard's own queries (their
/// `reported` frames, taken): the last value of each, which is what the transaction's end
/// left (every participant ends alike). A participant's mark for the deadlock detector
/// (`cluster::deadlock`) is never the client's.
fn final_parameters(parts: &mut [(usize, Pooled)]) -> Vec<bytes::BytesMut> {
    use crate::backend::parameter_name;
    let mut last: Vec<bytes::BytesMut> = Vec::new();
    for (_, b) in parts.iter_mut() {
        for f in b.reported.drain(..) {
            last.retain(|g| parameter_name(g) != parameter_name(&f));
            last.push(f);
        }
    }
    last.retain(|f| {
        let name = parameter_name(f);
        let value = f.get(5 + name.len() + 1..).unwrap_or_default();
        !(name == b"application_name" && value.starts_with(b"pgshard:"))
    });
    last
}

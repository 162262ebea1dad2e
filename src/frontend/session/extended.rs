//! Routing of the extended protocol (Parse, Bind, Describe, Execute, Close, Flush) on a
//! sharded database: a batch's frames wait until its Bind tells where it goes (with its
//! parameter values), so that the whole batch reaches one server in order; transaction
//! control, COPY and COMMIT of multi-shard transactions bound here are answered by
//! pgshard.

use super::cross::multi_shard_error;
use super::route::{CACHE_LIMIT, Dest, aborted, cross_shard_txn, is_copy, mergeable};
use super::{Pending, Session, SessionError};
use crate::config::PoolMode;
use crate::protocol::{self, PgError};
use crate::router::{self, Kind};
use bytes::Bytes;

impl Session {
    /// Parse, Bind, Describe, Close, Execute, Flush on a sharded database.
    pub(super) async fn route_extended(&mut self, frame: Bytes) -> Result<(), SessionError> {
        let tag = frame[0];
        if tag == b'B' {
            self.route.bind_portal = frame.slice_ref(protocol::parse_bind(&frame)?.portal);
            // Whether the batch so far only read decides how it may move (see `batch.rs`).
            // A Bind counts as a write unless `decide_bind` finds a plain read.
            self.route.wrote_before_bind = self.route.batch_writes;
            self.route.batch_writes = true;
        }
        if !self.in_batch && !self.holding() && self.backend.is_some() && !self.relay.idle() {
            // A new batch: the previous one's outcome decides where it may go.
            self.settle().await?;
            // Between transactions the connection goes back: the batch is routed afresh
            // (its frames wait for its Bind), not forwarded to the last batch's shard.
            self.maybe_release().await;
        }
        if (self.route.pending_copy.is_some() || (tag == b'B' && self.db.router.is_sharded()))
            && self.extended_copy(&frame).await?
        {
            return Ok(());
        }
        if tag == b'P' {
            let p = protocol::parse_parse(&frame)?;
            if self.route.texts.len() >= CACHE_LIMIT {
                self.route.texts.clear();
            }
            self.route.texts.insert(
                Bytes::copy_from_slice(p.name),
                (frame.slice_ref(p.query), frame.slice_ref(p.types)),
            );
            // A statement that can never be routed fails at Parse, as statement errors do
            // in PostgreSQL (drivers do not expect them at Bind).
            let sql = std::str::from_utf8(p.query).unwrap_or("");
            let refusal = if self.keeps_routed(p.name) {
                Some(super::prepared::duplicate_statement(p.name))
            } else if self.db.router.is_sharded()
                && matches!(
                    router::classify(sql),
                    router::StatementKind::Prepare(_) | router::StatementKind::Execute(_)
                )
            {
                // pgshard keeps SQL-level prepared statements from simple queries only.
                Some(PgError::new(
                    "0A000",
                    "on a sharded database pgshard runs PREPARE and EXECUTE only as simple queries",
                )
                .with_hint("Send them with the simple query protocol, or prepare with the extended protocol's Parse."))
            } else if self.route.forced.is_none()
                && router::hint(sql).is_none()
                && !is_copy(sql)
                && let Err(router::AnalyzeError::Unroutable(why)) = self.analysis(sql)
                && !self.evaluates_first(sql)
            {
                Some(
                    PgError::new("0A000", why)
                        .with_hint("Or choose the shard with a /* pgshard: shard=N */ comment."),
                )
            } else {
                None
            };
            if let Some(e) = refusal {
                if self.holding() {
                    let home = self.home_shard();
                    if !self.release_held(home).await? {
                        return Ok(());
                    }
                }
                self.local_error(e);
                return Ok(());
            }
        }
        if !self.route.portals.is_empty() {
            if self.answer_from_portal(&frame)? {
                return Ok(());
            }
            // FETCH, MOVE or CLOSE of a cursor pgshard holds.
            if tag == b'B' {
                let b = protocol::parse_bind(&frame)?;
                if let Some((query, _)) = self.route.texts.get(b.stmt).cloned()
                    && self
                        .cursor_bind(std::str::from_utf8(&query).unwrap_or(""), b.rest)
                        .await?
                {
                    return Ok(());
                }
            }
        }
        // In a transaction, a batch's frames wait for its Bind as well: it may need
        // another shard, which then joins the transaction.
        let hold_in_tx = self.can_join() && (self.holding() || matches!(tag, b'P' | b'D' | b'B'));
        if self.backend.is_none() || hold_in_tx {
            match tag {
                b'P' | b'D' => {
                    self.route.held.push(frame);
                    return Ok(());
                }
                b'C' if !self.route.held.is_empty() => {
                    self.route.held.push(frame);
                    return Ok(());
                }
                // Nothing to flush (psycopg sends a Flush after a pipeline's Sync): no
                // server is taken, and no batch begins.
                b'H' if self.route.held.is_empty() && self.backend.is_none() => {
                    return Ok(());
                }
                // Closing a client statement needs no server (transaction mode).
                b'C' if self.mode == PoolMode::Transaction => {
                    return self.forward_extended(&frame).await;
                }
                b'B' => {
                    // Read once: transaction control, the end of a multi-shard transaction
                    // and the statements kept in step all look at it.
                    let one = self.bound_statement(&frame)?;
                    let one = one.as_deref();
                    // A SET keeps the transaction movable (see `route_query`).
                    self.route.setting_bind = one.is_some_and(super::replay::is_setting);
                    if self.transaction_control_bind(one)? || self.multi_end_bind(one).await? {
                        return Ok(());
                    }
                    if self.refuses_prepare_transaction(one) {
                        let home = self.home_shard();
                        if self.release_held(home).await? {
                            self.local_error(super::multi::prepare_transaction_refused());
                        }
                        return Ok(());
                    }
                    if let Some(e) = self.keep_bind_in_step(one, &frame).await? {
                        // A participant failed: the Bind fails; COMMIT will roll back.
                        let home = self.home_shard();
                        if self.release_held(home).await? {
                            self.local_error(e);
                        }
                        return Ok(());
                    }
                    let dest = self.decide_bind(&frame).await?;
                    if dest.is_err() && self.pre_evaluated_bind(&frame).await? {
                        return Ok(());
                    }
                    if let Ok(Dest::Multi(shards, a)) = &dest
                        && self.status == b'I'
                        && mergeable(a)
                    {
                        let (shards, a) = (shards.clone(), a.clone());
                        return self.scatter_bind(&frame, &shards, &a).await;
                    }
                    // Writes, and reads inside a transaction (the shards join it).
                    if let Ok(Dest::Multi(shards, a)) = &dest
                        && (((a.kind >= Kind::Write || a.explain) && self.status == b'I')
                            || self.can_run_in_transaction())
                        && self.mode == PoolMode::Transaction
                    {
                        let (shards, a) = (shards.clone(), a.clone());
                        return self.write_bind(&frame, &shards, &a).await;
                    }
                    let shard = match &dest {
                        Ok(Dest::Shard(s)) => *s,
                        _ => self.home_shard(),
                    };
                    if !self.release_held(shard).await? {
                        return Ok(());
                    }
                    if !matches!(dest, Ok(Dest::Shard(_))) {
                        self.refuse_bind(dest);
                        return Ok(());
                    }
                }
                _ => {
                    let home = self.home_shard();
                    if !self.release_held(home).await? {
                        return Ok(());
                    }
                }
            }
        } else if tag == b'B' {
            if self.status == b'E' && !self.multi.parked.is_empty() {
                // Aborted over several shards: only ROLLBACK and ROLLBACK TO SAVEPOINT run
                // (pgjdbc's autosave sends the latter pipelined with its next statement).
                let one = self.bound_statement(&frame)?;
                if let Some(one) = one.as_deref()
                    && matches!(
                        super::replay::savepoint_op(one),
                        Some((super::replay::SavepointOp::RollbackTo, _))
                    )
                {
                    if let Some(e) = self.keep_in_step_quiet(one).await? {
                        self.local_error(e);
                        return Ok(());
                    }
                    // The rest of the batch runs as after the rollback (should the
                    // attached server fail it, it skips the rest and reports the error).
                    self.status = b'T';
                    return self.forward_extended(&frame).await;
                }
                if !self.multi_end_bind(one.as_deref()).await? {
                    self.local_error(aborted());
                }
                return Ok(());
            }
            // Later in a batch (no shard can join here): the other participants still
            // take the batch's settings and savepoints.
            if self.status == b'T' {
                let one = self.bound_statement(&frame)?;
                if !self.multi.parked.is_empty() && one.as_deref().is_some_and(ends_transaction) {
                    return self.multi_end_in_batch(one.as_deref()).await;
                }
                if self.refuses_prepare_transaction(one.as_deref()) {
                    self.local_error(super::multi::prepare_transaction_refused());
                    return Ok(());
                }
                self.route.setting_bind = one.as_deref().is_some_and(super::replay::is_setting);
                if let Some(e) = self.keep_bind_in_step(one.as_deref(), &frame).await? {
                    self.local_error(e);
                    return Ok(());
                }
            }
            let dest = self.decide_bind(&frame).await?;
            // Inside a transaction block a batch's statements so far can be answered
            // first (an internal Sync ends nothing there); outside one, only a batch that
            // ran nothing yet (its implicit transaction must stay whole).
            if matches!(dest, Ok(Dest::Multi(..)))
                && self.in_batch
                && (!self.route.batch_ran || self.status == b'T')
                && self.settle_batch().await?
            {
                return Ok(());
            }
            match dest {
                Ok(Dest::Shard(s))
                    if s == self.shard
                        && (self.reads.on_replica == self.reads.read_ok
                            || self.status != b'I'
                            || self.in_batch) => {}
                Ok(Dest::Shard(s)) if self.status == b'I' && !self.in_batch => {
                    if !self.use_shard(s).await? {
                        self.local_skip = true;
                        return Ok(());
                    }
                }
                Ok(Dest::Shard(s)) if !self.in_batch && self.route.movable_begin.is_some() => {
                    if !self.move_transaction(s).await? {
                        self.local_skip = true;
                        return Ok(());
                    }
                }
                Ok(Dest::Shard(s)) if self.can_join() => {
                    if !self.join_shard(s).await? {
                        self.local_skip = true;
                        return Ok(());
                    }
                }
                // Later in a pipelined batch (see `batch.rs`).
                Ok(Dest::Shard(s)) if self.can_move_batch() => {
                    if !self.move_batch(s, &frame).await? {
                        self.local_skip = true;
                        return Ok(());
                    }
                }
                Ok(Dest::Multi(shards, a))
                    if self.status == b'I' && !self.in_batch && mergeable(&a) =>
                {
                    self.settle().await?;
                    self.detach().await;
                    return self.scatter_bind(&frame, &shards, &a).await;
                }
                Ok(Dest::Multi(shards, a))
                    if (a.kind >= Kind::Write || mergeable(&a) || a.explain)
                        && !self.in_batch
                        && self.mode == PoolMode::Transaction
                        && (self.status == b'I' || self.can_run_in_transaction()) =>
                {
                    return self.write_bind(&frame, &shards, &a).await;
                }
                refused => {
                    self.refuse_bind(refused);
                    return Ok(());
                }
            }
        }
        self.forward_extended(&frame).await
    }

    /// A Bind over several shards later in a batch: after a batch that only parsed,
    /// described or closed on the attached server (asyncpg describes a new statement, with
    /// a Flush, before it binds it), or inside a transaction block (psycopg's pipeline
    /// mode, pgjdbc's batches), the server answers what it got first; then nothing of the
    /// batch is pending there, and the Bind may run as at the start of a batch, unless the
    /// server failed a statement (then it skips the rest, as PostgreSQL does).
    /// True when the Bind is to be skipped.
    async fn settle_batch(&mut self) -> Result<bool, SessionError> {
        self.settle().await?;
        if self.relay.skipping {
            self.local_skip = true;
            return Ok(true);
        }
        if self.relay.idle() && !self.local_skip {
            self.in_batch = false;
        }
        Ok(false)
    }

    /// The statement a Bind binds, when pgshard knows its text and it is one statement.
    fn bound_statement(&self, frame: &Bytes) -> Result<Option<String>, SessionError> {
        let b = protocol::parse_bind(frame)?;
        let Some((query, _)) = self.route.texts.get(b.stmt) else {
            return Ok(None);
        };
        let sql = std::str::from_utf8(query).unwrap_or("");
        Ok(match router::split_statements(sql)[..] {
            [one] => Some(one.to_string()),
            _ => None,
        })
    }

    /// A Bind of a `SET` or savepoint statement in a transaction: it runs on the other
    /// participants first (see `replay.rs`); the error if one of them failed.
    async fn keep_bind_in_step(
        &mut self,
        one: Option<&str>,
        frame: &[u8],
    ) -> Result<Option<PgError>, SessionError> {
        match one {
            Some(one) if self.status == b'T' && self.mode == PoolMode::Transaction => {
                // A setting runs on the other shards as the client bound it (parameters
                // and their formats included).
                if super::replay::is_setting(one) {
                    let b = protocol::parse_bind(frame)?;
                    if let Some((query, types)) = self.route.texts.get(b.stmt) {
                        let req = super::replay::bound_request(query, types, b.rest);
                        return self
                            .keep_setting_in_step(super::replay::Replay::Bound(req))
                            .await;
                    }
                }
                self.keep_in_step_quiet(one).await
            }
            _ => Ok(None),
        }
    }

    /// BEGIN, COMMIT or ROLLBACK in the extended protocol while no shard is chosen yet
    /// (pgjdbc sends BEGIN this way, pipelined with the first statement): answered here, as
    /// [`Self::deferred_transaction`] does for simple queries. True when answered.
    fn transaction_control_bind(&mut self, one: Option<&str>) -> Result<bool, SessionError> {
        let Some(one) = one else {
            return Ok(false);
        };
        let kind = router::classify(one);
        let deferred = self.route.deferred_begin.is_some();
        let tag = match kind {
            router::StatementKind::Begin if self.status == b'I' && !deferred => "BEGIN",
            router::StatementKind::EndTransaction if deferred => {
                if self.status == b'E' || super::multi::rolls_back(one) {
                    "ROLLBACK"
                } else {
                    "COMMIT"
                }
            }
            _ => return Ok(false),
        };
        let mut complete = bytes::BytesMut::new();
        protocol::write_complete(&mut complete, tag);
        self.answer_control_bind(complete.freeze())?;
        if tag == "BEGIN" {
            self.route.deferred_begin = Some(one.to_string());
            self.status = b'T';
        } else if super::multi::chains(one) {
            // `AND CHAIN` begins the next transaction alike: the BEGIN stays deferred.
            self.status = b'T';
            self.listen_ext.ended(Some(tag == "COMMIT"));
        } else {
            self.route.deferred_begin = None;
            self.status = b'I';
            self.listen_ext.ended(Some(tag == "COMMIT"));
        }
        Ok(true)
    }

    /// Answers a Bind of a transaction-control statement pgshard carries out itself: the
    /// batch's held Parse/Describe/Close as a server would, BindComplete, and `reply` (its
    /// CommandComplete, or an error) at Execute.
    fn answer_control_bind(&mut self, reply: Bytes) -> Result<(), SessionError> {
        // The batch's held Parse/Describe/Close are answered as a server would.
        for f in std::mem::take(&mut self.route.held) {
            let reply = match f[0] {
                b'P' => {
                    let p = protocol::parse_parse(&f)?;
                    if self.mode == PoolMode::Transaction && !p.name.is_empty() {
                        self.statements.insert(
                            Bytes::copy_from_slice(p.name),
                            super::Stmt {
                                global: super::prepared::statement_id(p.query, p.types),
                                query: f.slice_ref(p.query),
                                types: f.slice_ref(p.types),
                                kind_is_setting: false,
                                sql_prepare: false,
                            },
                        );
                    }
                    crate::exec::PARSE_COMPLETE
                }
                b'D' => {
                    let mut r = bytes::BytesMut::new();
                    if protocol::parse_target(&f, "Describe")?.0 == b'S' {
                        protocol::write_msg(&mut r, b't', &[0, 0]);
                    }
                    protocol::write_msg(&mut r, b'n', &[]);
                    r.freeze()
                }
                _ => crate::exec::CLOSE_COMPLETE,
            };
            self.relay.push(Pending::Synth {
                frame: reply,
                undo: None,
            });
        }

        self.hold_portal(crate::exec::empty_frame(b'n'), reply);
        Ok(())
    }

    /// A COPY over several shards in the extended protocol: its Bind and Describe are
    /// answered here, its Execute runs it. True when the frame was handled.
    async fn extended_copy(&mut self, frame: &Bytes) -> Result<bool, SessionError> {
        match frame[0] {
            b'B' => {
                let b = protocol::parse_bind(frame)?;
                let Some((query, _)) = self.route.texts.get(b.stmt).cloned() else {
                    return Ok(false);
                };
                let sql = std::str::from_utf8(&query).unwrap_or("").to_string();
                if !is_copy(&sql) {
                    return Ok(false);
                }
                let Some((cs, plan)) = self.multi_copy(&sql) else {
                    return Ok(false);
                };
                match plan {
                    super::copy::CopyPlan::Merged(shards, a) => {
                        self.merged_copy_bind(frame, &shards, &a).await?;
                        return Ok(true);
                    }
                    super::copy::CopyPlan::Refused(e) => {
                        self.local_error(e);
                        return Ok(true);
                    }
                    _ => {}
                }
                if self.holding() {
                    let home = self.home_shard();
                    if !self.release_held(home).await? {
                        return Ok(true);
                    }
                }
                self.route.pending_copy = Some((sql, cs, plan));
                self.relay.push(Pending::Synth {
                    frame: crate::exec::BIND_COMPLETE,
                    undo: None,
                });
                self.relay.drain_local(&mut self.cout);
                Ok(true)
            }
            b'D' if self.route.pending_copy.is_some() => {
                self.relay.push(Pending::Synth {
                    frame: crate::exec::empty_frame(b'n'),
                    undo: None,
                });
                self.relay.drain_local(&mut self.cout);
                Ok(true)
            }
            b'E' => {
                let Some((sql, cs, plan)) = self.route.pending_copy.take() else {
                    return Ok(false);
                };
                self.execute_copy(&sql, cs, plan).await?;
                Ok(true)
            }
            b'H' => Ok(self.route.pending_copy.is_some()),
            _ => {
                self.route.pending_copy = None;
                Ok(false)
            }
        }
    }

    /// COMMIT or ROLLBACK in the extended protocol while shards are parked: ended by
    /// pgshard on every shard. True when answered.
    async fn multi_end_bind(&mut self, one: Option<&str>) -> Result<bool, SessionError> {
        let Some(one) = one.filter(|_| !self.multi.parked.is_empty()) else {
            return Ok(false);
        };
        if router::classify(one) != router::StatementKind::EndTransaction {
            return Ok(false);
        }
        let reply = match self.end_multi(one).await? {
            Ok(tag) => {
                let mut c = bytes::BytesMut::new();
                protocol::write_complete(&mut c, tag);
                c.extend_from_slice(&self.ended_params());
                c.freeze()
            }
            Err(frame) => frame.freeze(),
        };
        self.answer_control_bind(reply)?;
        Ok(true)
    }

    /// COMMIT or ROLLBACK in a batch of a transaction over several shards, after other
    /// statements of the batch went to the attached shard: that shard's part of the batch
    /// ends first (its answers go to the client), then pgshard ends the transaction on
    /// every shard. Sent on to the attached server, the COMMIT would end the transaction
    /// there only. After an error earlier in the batch it is skipped with the rest of the
    /// batch, as one server would skip it (the transaction stays aborted).
    async fn multi_end_in_batch(&mut self, one: Option<&str>) -> Result<(), SessionError> {
        if self.backend.is_some() {
            self.relay.push(Pending::InternalSync);
            protocol::write_msg(&mut self.bout, b'S', &[]);
            self.settle().await?;
        }
        if self.status != b'T' {
            self.local_skip = true;
            return Ok(());
        }
        if !self.multi_end_bind(one).await? {
            self.local_error(aborted());
        }
        Ok(())
    }

    /// Whether the bound statement is a `PREPARE TRANSACTION` pgshard refuses (in a
    /// transaction over several shards).
    fn refuses_prepare_transaction(&self, one: Option<&str>) -> bool {
        !self.multi.parked.is_empty() && one.is_some_and(super::multi::prepares_transaction)
    }

    /// The error for a Bind that cannot run as routed (skips the batch until Sync).
    fn refuse_bind(&mut self, dest: Result<Dest, PgError>) {
        let e = match dest {
            Ok(Dest::Multi(shards, a)) => multi_shard_error(&shards, &a),
            Ok(Dest::Shard(s)) => cross_shard_txn(self.shard, &[s]),
            Err(e) => e,
        };
        self.local_error(e);
    }

    /// Attaches `shard` and sends the held frames to it. False when attaching failed (the
    /// client got the error and the batch is skipped until Sync).
    pub(super) async fn release_held(&mut self, shard: usize) -> Result<bool, SessionError> {
        if self.backend.is_some() && self.shard != shard && self.can_join() {
            if !self.join_shard(shard).await? {
                self.route.held.clear();
                self.local_skip = true;
                return Ok(false);
            }
            for f in std::mem::take(&mut self.route.held) {
                self.forward_extended(&f).await?;
            }
            return Ok(true);
        }
        if !self.attach(shard).await {
            self.route.held.clear();
            self.local_skip = true;
            return Ok(false);
        }
        for f in std::mem::take(&mut self.route.held) {
            self.forward_extended(&f).await?;
        }
        Ok(true)
    }

    /// A batch of Parse/Describe/Close without Bind may go to a replica when every
    /// statement it parses could (describing needs only the catalog).
    pub(super) fn held_read_ok(&mut self) {
        let texts: Vec<Bytes> = self
            .route
            .held
            .iter()
            .filter(|f| f[0] == b'P')
            .filter_map(|f| protocol::parse_parse(f).ok().map(|p| f.slice_ref(p.query)))
            .collect();
        let mut ok = self.read_free() && self.reads.target != Some(false);
        for t in texts {
            if !ok {
                break;
            }
            let sql = std::str::from_utf8(&t).unwrap_or("");
            let safe = self.analysis(sql).is_ok_and(|a| a.replica_safe);
            ok = router::target_hint(sql)
                .or(self.reads.target)
                .unwrap_or(safe);
        }
        self.reads.read_ok = ok;
    }

    /// Statements the client parsed or described in this batch are answered by a real
    /// server first (ParseComplete, ParameterDescription, RowDescription), before pgshard
    /// answers the batch's Bind itself. False when that failed (the client got the error).
    pub(super) async fn answer_held(&mut self) -> Result<bool, SessionError> {
        if self.holding() {
            let home = self.home_shard();
            if !self.release_held(home).await? {
                return Ok(false);
            }
            self.settle().await?;
        }
        Ok(true)
    }

    /// Whether any frames wait for a routing decision.
    pub(super) fn holding(&self) -> bool {
        !self.route.held.is_empty()
    }

    /// Where a Bind's statement goes, with its parameter values.
    async fn decide_bind(&mut self, frame: &Bytes) -> Result<Result<Dest, PgError>, SessionError> {
        let b = protocol::parse_bind(frame)?;
        let Some((query, types)) = self.route.texts.get(b.stmt).cloned() else {
            return Ok(Ok(Dest::Shard(self.home_shard())));
        };
        let params = super::route::bound_params(&types, b.rest)?;
        let Ok(sql) = std::str::from_utf8(&query) else {
            return Ok(Ok(Dest::Shard(self.home_shard())));
        };
        self.route.decided_read = false;
        let dest = self.decide_async(sql, &params).await;
        self.route.batch_writes = self.route.wrote_before_bind || !self.route.decided_read;
        Ok(dest)
    }
}

/// Whether a statement is COMMIT, END, ROLLBACK or ABORT.
fn ends_transaction(sql: &str) -> bool {
    router::classify(sql) == router::StatementKind::EndTransaction
}

//! A simple Query: the statements pgshard answers or must track itself in transaction
//! pooling mode (LISTEN, DEALLOCATE, DISCARD, settings, cursor commands), then routing or
//! forwarding to the server.

use super::*;

impl Session {
    /// A simple Query from the client.
    pub(super) async fn on_query(&mut self, frame: Bytes) -> Result<(), SessionError> {
        let sql = protocol::parse_query(&frame)?;
        if self.backend.is_some() && !self.relay.idle() && self.may_answer_itself(sql) {
            // The client sent this before the last answer's ReadyForQuery (tokio-postgres
            // sends its next query as soon as it reads an ErrorResponse): an answer pgshard
            // gives itself must follow what the server still owes, and carry the status
            // that leaves. Queries only the server answers stay pipelined.
            self.settle().await?;
            self.maybe_release().await;
        }
        if !self.route.portals.is_empty() {
            // A simple Query ends the unnamed portal, as on a server.
            self.route.portals.remove(b"");
            if self.cursor_query(sql).await? {
                return Ok(());
            }
        }
        if self.slow.is_some() {
            self.slow_text = Some(frame.slice_ref(sql.as_bytes()));
        }
        let mut local_answer: Option<&str> = None;
        let sharded = self.db.router.is_sharded();
        // Sharded database: a PREPARE; an EXECUTE (or, in a query string, a DEALLOCATE)
        // of a statement pgshard keeps.
        let (mut prepare, mut execute) = (None, false);
        // One statement (the common case) without allocating.
        let (one, split);
        let statements: &[&str] = match router::single_statement(sql) {
            Some(t) => {
                one = [t];
                &one
            }
            None => {
                split = router::split_statements(sql);
                &split
            }
        };
        for st in statements {
            match router::classify(st) {
                StatementKind::SessionSetting => self.settings_dirty = true,
                StatementKind::Listen | StatementKind::Unlisten
                    if self.mode == PoolMode::Transaction =>
                {
                    // Several statements run one by one, LISTEN answered here (`run_script`).
                    return if statements.len() == 1 {
                        self.listen_statement(st).await
                    } else {
                        self.run_script(sql).await
                    };
                }
                StatementKind::DropsAllStatements if self.mode == PoolMode::Transaction => {
                    // DISCARD ALL includes UNLISTEN *.
                    if let Some(l) = self.listen.as_mut()
                        && router::lexer::leading_words::<1>(st).0[0]
                            .eq_ignore_ascii_case("discard")
                    {
                        l.unlisten(None);
                    }
                    self.statements.clear();
                    self.forget_sql_prepared();
                    self.unnamed.global = None;
                    self.settings_dirty = true;
                    if let Some(b) = self.backend.as_mut() {
                        b.prepared.clear();
                    }
                }
                StatementKind::DropsAllStatements => self.forget_sql_prepared(),
                // A statement pgshard keeps (no server has it): answered here, or in
                // `run_script` within a query string.
                StatementKind::Deallocate(name)
                    if sharded && self.keeps_routed(name.as_bytes()) =>
                {
                    if statements.len() == 1 {
                        self.forget_routed(&name);
                        local_answer = Some("DEALLOCATE");
                    } else {
                        execute = true;
                    }
                }
                StatementKind::Deallocate(name)
                    if self.mode == PoolMode::Transaction && statements.len() == 1 =>
                {
                    // Protocol-level client names do not exist on the server: answer here.
                    if self.statements.remove(name.as_bytes()).is_some() {
                        local_answer = Some("DEALLOCATE");
                    } else {
                        match self.deallocate_sql(&name) {
                            Ok(tag) => local_answer = tag,
                            Err(e) => {
                                self.answer_error(e);
                                return Ok(());
                            }
                        }
                    }
                }
                StatementKind::Prepare(name) if sharded => prepare = Some(name),
                StatementKind::Prepare(name) => self.note_sql_prepare(name, st),
                StatementKind::Execute(_) if sharded => execute = true,
                _ => {}
            }
        }
        if let Some(tag) = local_answer {
            self.relay.drain_local(&mut self.cout);
            protocol::write_complete(&mut self.cout, tag);
            protocol::write_ready(&mut self.cout, self.status);
            return Ok(());
        }
        if prepare.is_some() || execute {
            match (statements, prepare) {
                (&[_], Some(name)) => return self.prepare_routed(frame, name).await,
                (&[st], None) => match self.execute_routed(st) {
                    Some(Ok(text)) => {
                        let kind = router::classify(&text);
                        let mut frame = BytesMut::with_capacity(text.len() + 6);
                        protocol::write_query(&mut frame, &text);
                        let frame = frame.freeze();
                        return self.route_query(frame, Some(kind)).await;
                    }
                    Some(Err(e)) => {
                        self.answer_error(e);
                        return Ok(());
                    }
                    None => {}
                },
                // One by one, each where it belongs.
                _ => return self.run_script(sql).await,
            }
        }
        if self.routed() {
            // The classification above serves routing too: the hot path parses once.
            let single = match statements {
                [one] => Some(router::classify(one)),
                _ => None,
            };
            return self.route_query(frame, single).await;
        }
        if !self.attach(self.home_shard()).await {
            protocol::write_ready(&mut self.cout, self.status);
            return Ok(());
        }
        self.started();
        self.send_query(frame);
        Ok(())
    }

    /// Whether pgshard may answer `sql` (or a statement in it) itself: routed databases
    /// (refusals, kept statements, virtual portals) and, in transaction pooling mode, the
    /// statements it tracks (DEALLOCATE, LISTEN, UNLISTEN).
    fn may_answer_itself(&self, sql: &str) -> bool {
        self.routed()
            || !self.route.portals.is_empty()
            || (self.mode == PoolMode::Transaction
                && router::split_statements(sql).iter().any(|st| {
                    matches!(
                        router::classify(st),
                        StatementKind::Deallocate(_)
                            | StatementKind::Listen
                            | StatementKind::Unlisten
                    )
                }))
    }

    /// Answers a simple query with an error in the right transaction state: when a server
    /// transaction is open the server raises it, so that its state matches the client's.
    pub(super) fn answer_error(&mut self, e: PgError) {
        self.db.shards[self.home_shard()].stats.error(e.code);
        if self.backend.is_some() && self.status != b'I' {
            let sql = raise_sql(&e);
            self.started();
            self.relay.push(Pending::Query);
            protocol::write_query(&mut self.bout, &sql);
        } else {
            if self.status == b'T' {
                // A transaction pgshard holds back (deferred BEGIN) fails, as on a server.
                self.status = b'E';
            }
            self.relay.drain_local(&mut self.cout);
            e.write(&mut self.cout);
            protocol::write_ready(&mut self.cout, self.status);
        }
    }
}

/// A statement that makes a server raise `e`: its transaction fails as the client's does.
/// Its detail and hint only when it has them (an empty one would show as an empty line).
pub(super) fn raise_sql(e: &PgError) -> String {
    let mut using = format!(
        "ERRCODE = {}, MESSAGE = {}",
        quote_literal(e.code),
        quote_literal(&e.message)
    );
    for (option, text) in [("DETAIL", &e.detail), ("HINT", &e.hint)] {
        if let Some(text) = text {
            using.push_str(&format!(", {option} = {}", quote_literal(text)));
        }
    }
    format!("DO $pgshard$ BEGIN RAISE EXCEPTION USING {using}; END $pgshard$")
}

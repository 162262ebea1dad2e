//! LISTEN/UNLISTEN in transaction pooling mode, answered by pgshard: the session
//! subscribes to its database's listener connections (`frontend::listen`) and delivers
//! the notifications it receives between transactions.

use super::*;

/// LISTEN and UNLISTEN prepared in the extended protocol (transaction mode): statement
/// and portal names -> statement text. pgshard answers their messages itself.
#[derive(Default)]
pub(super) struct ListenStatements {
    stmts: HashMap<Bytes, String>,
    portals: HashMap<Bytes, String>,
    /// LISTEN (true) and UNLISTEN (false) run inside the open transaction block: they take
    /// effect when it commits, as in PostgreSQL (None: UNLISTEN *).
    pending: Vec<(bool, Option<String>)>,
    /// The transaction block with `pending` saw COMMIT's tag (not ROLLBACK's).
    committed: bool,
    /// It committed: `pending` is applied before the client hears of it.
    pub(super) due: bool,
}

impl ListenStatements {
    /// A CommandComplete of the transaction block that has LISTENs pending.
    pub(super) fn saw_tag(&mut self, frame: &[u8]) {
        if self.pending.is_empty() {
            return;
        }
        let tag = frame.get(5..).unwrap_or_default();
        if tag.starts_with(b"COMMIT") {
            self.committed = true;
        } else if tag.starts_with(b"ROLLBACK") {
            self.committed = false;
        }
    }

    /// The transaction block ended, committed or not (with `committed` from its tags when
    /// None).
    pub(super) fn ended(&mut self, committed: Option<bool>) {
        if self.pending.is_empty() {
            return;
        }
        if committed.unwrap_or(self.committed) {
            self.due = true;
        } else {
            self.pending.clear();
        }
        self.committed = false;
    }

    pub(super) fn is_empty(&self) -> bool {
        self.stmts.is_empty() && self.portals.is_empty()
    }

    pub(super) fn forget_unnamed(&mut self) {
        self.stmts.remove(&b""[..]);
    }
}

/// The portal name of an Execute.
fn execute_portal(frame: &[u8]) -> &[u8] {
    let body = frame.get(5..).unwrap_or_default();
    &body[..memchr::memchr(0, body).unwrap_or(body.len())]
}

impl Session {
    /// A simple-query LISTEN or UNLISTEN, the string's only statement, in transaction
    /// pooling mode.
    pub(super) async fn listen_statement(&mut self, st: &str) -> Result<(), SessionError> {
        // Answers in order: whatever the client sent before comes back first.
        self.settle().await?;
        let r = self.apply_listen(st).await;
        match r {
            Ok(tag) => {
                self.relay.drain_local(&mut self.cout);
                protocol::write_complete(&mut self.cout, tag);
                protocol::write_ready(&mut self.cout, self.status);
            }
            Err(e) => self.answer_error(e),
        }
        Ok(())
    }

    /// Subscribes or unsubscribes the session; the command tag.
    pub(super) async fn apply_listen(&mut self, st: &str) -> Result<&'static str, PgError> {
        let verb = if router::classify(st) == StatementKind::Listen {
            "LISTEN"
        } else {
            "UNLISTEN"
        };
        let in_block = self.status != b'I' || self.route.deferred_begin.is_some();
        if self.status == b'E' {
            return Err(PgError::new(
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
            ));
        }
        let Some(channel) = crate::frontend::listen::channel_of(st) else {
            return Err(PgError::new(
                "42601",
                format!(
                    "syntax error in {verb}: a channel name{} is expected",
                    if verb == "UNLISTEN" { " or *" } else { "" }
                ),
            ));
        };
        if verb == "LISTEN" && self.listen.is_none() && self.ops.is_none() {
            return Err(PgError::new("0A000", "LISTEN is not available here"));
        }
        if in_block {
            // As PostgreSQL: it takes effect at COMMIT, and not at all after ROLLBACK.
            self.listen_ext.pending.push((verb == "LISTEN", channel));
            return Ok(verb);
        }
        self.listen_now(verb == "LISTEN", channel).await?;
        Ok(verb)
    }

    /// Subscribes (`listen`) or unsubscribes the session now.
    async fn listen_now(&mut self, listen: bool, channel: Option<String>) -> Result<(), PgError> {
        match channel {
            Some(channel) if listen => {
                if self.listen.is_none() {
                    let Some(ops) = &self.ops else {
                        return Err(PgError::new("0A000", "LISTEN is not available here"));
                    };
                    let sub = ops.server.listeners.subscriber(&ops.server, &ops.database);
                    self.listen = Some(Box::new(sub));
                }
                let sub = self.listen.as_mut().expect("just set");
                sub.listen(&channel).await.map_err(|e| {
                    PgError::new("08006", format!("could not listen on \"{channel}\": {e}"))
                })?;
            }
            channel => {
                if let Some(sub) = self.listen.as_mut() {
                    sub.unlisten(channel.as_deref());
                }
            }
        }
        Ok(())
    }

    /// The LISTEN and UNLISTEN of a transaction block that committed, before the client
    /// hears of the COMMIT: notifications committed after it reach the client. A failure
    /// (the listener connection down) cannot undo the COMMIT: the client gets a warning.
    pub(super) async fn apply_committed_listens(&mut self) {
        self.listen_ext.due = false;
        for (listen, channel) in std::mem::take(&mut self.listen_ext.pending) {
            if let Err(e) = self.listen_now(listen, channel).await {
                tracing::warn!(error = %e.message, "LISTEN at COMMIT failed");
                let mut w = PgError::new(e.code, e.message);
                w.severity = "WARNING";
                w.write_notice(&mut self.cout);
            }
        }
    }

    /// A Parse of LISTEN or UNLISTEN (transaction mode): kept here, never on a server.
    pub(super) fn parse_listen(&mut self, name: &[u8], query: &[u8]) {
        let text = String::from_utf8_lossy(query).trim().to_string();
        if router::split_statements(&text).len() > 1 {
            self.local_error(PgError::new(
                "42601",
                "cannot insert multiple commands into a prepared statement",
            ));
            return;
        }
        if !name.is_empty()
            && (self.statements.contains_key(name) || self.listen_ext.stmts.contains_key(name))
        {
            self.local_error(super::prepared::duplicate_statement(name));
            return;
        }
        self.listen_ext
            .stmts
            .insert(Bytes::copy_from_slice(name), text);
        self.synth(crate::exec::PARSE_COMPLETE);
    }

    fn synth(&mut self, frame: Bytes) {
        self.relay.push(Pending::Synth { frame, undo: None });
        self.relay.drain_local(&mut self.cout);
    }

    /// Bind, Describe, Execute and Close of a LISTEN statement or portal (transaction
    /// mode), answered here; false for other messages (a Bind reusing a LISTEN portal's
    /// name for another statement ends that portal here).
    pub(super) async fn extended_listen(
        &mut self,
        tag: u8,
        frame: &[u8],
    ) -> Result<bool, SessionError> {
        match tag {
            b'B' => {
                let b = protocol::parse_bind(frame)?;
                match self.listen_ext.stmts.get(b.stmt) {
                    Some(text) => {
                        let text = text.clone();
                        self.listen_ext
                            .portals
                            .insert(Bytes::copy_from_slice(b.portal), text);
                        self.synth(crate::exec::BIND_COMPLETE);
                        Ok(true)
                    }
                    None => {
                        self.listen_ext.portals.remove(b.portal);
                        Ok(false)
                    }
                }
            }
            b'D' => {
                let (kind, name) = protocol::parse_target(frame, "Describe")?;
                let known = match kind {
                    b'S' => self.listen_ext.stmts.contains_key(name),
                    _ => self.listen_ext.portals.contains_key(name),
                };
                if !known {
                    return Ok(false);
                }
                let mut out = BytesMut::new();
                if kind == b'S' {
                    // No parameters, no rows.
                    protocol::write_msg(&mut out, b't', &[0, 0]);
                }
                protocol::write_msg(&mut out, b'n', &[]);
                self.synth(out.freeze());
                Ok(true)
            }
            b'C' => {
                let (kind, name) = protocol::parse_target(frame, "Close")?;
                let removed = match kind {
                    b'S' => self.listen_ext.stmts.remove(name).is_some(),
                    _ => self.listen_ext.portals.remove(name).is_some(),
                };
                if removed {
                    self.synth(crate::exec::CLOSE_COMPLETE);
                }
                Ok(removed)
            }
            b'E' => {
                let Some(text) = self.listen_ext.portals.get(execute_portal(frame)).cloned() else {
                    return Ok(false);
                };
                // In order, and only if nothing before it in the batch failed.
                self.settle().await?;
                if self.relay.skipping || self.local_skip {
                    return Ok(true);
                }
                match self.apply_listen(&text).await {
                    Ok(tag) => {
                        let mut out = BytesMut::new();
                        protocol::write_complete(&mut out, tag);
                        self.synth(out.freeze());
                    }
                    Err(e) => self.local_error(e),
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Notifications received so far go to the client if it is between transactions.
    /// An error when more is waiting than `limits.max_message_size`: the client has been
    /// in a transaction while that much arrived (the session ends rather than dropping
    /// notifications or growing without bound).
    pub(super) fn deliver_notifications(&mut self) -> Result<(), PgError> {
        let Some(sub) = self.listen.as_mut() else {
            return Ok(());
        };
        while let Ok(frame) = sub.rx.try_recv() {
            sub.backlog.extend_from_slice(&frame);
        }
        if sub.backlog.len() > self.max_message {
            return Err(PgError::fatal(
                "53200",
                format!(
                    "too many notifications are waiting for the end of this transaction (more than {} bytes, limits.max_message_size)",
                    self.max_message
                ),
            ));
        }
        if sub.backlog.is_empty() || !self.at_transaction_boundary() {
            return Ok(());
        }
        let sub = self.listen.as_mut().expect("checked above");
        self.cout.extend_from_slice(&sub.backlog);
        sub.backlog.clear();
        Ok(())
    }
}

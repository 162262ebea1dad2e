//! LISTEN/UNLISTEN in transaction pooling mode, answered by pgshard: the session
//! subscribes to its database's listener connections (`frontend::listen`) and delivers
//! the notifications it receives between transactions.

use super::*;

impl Session {
    /// A simple-query LISTEN or UNLISTEN (`st`, the string's only statement when
    /// `alone`) in transaction pooling mode.
    pub(super) async fn listen_statement(
        &mut self,
        st: &str,
        alone: bool,
        kind: &StatementKind,
    ) -> Result<(), SessionError> {
        let verb = if *kind == StatementKind::Listen {
            "LISTEN"
        } else {
            "UNLISTEN"
        };
        // Answers in order: whatever the client sent before comes back first.
        self.settle().await?;
        if !alone {
            self.answer_error(
                PgError::new(
                    "0A000",
                    format!("{verb} must be sent on its own in transaction pooling mode"),
                )
                .with_hint("Send it as a query string of its own."),
            );
            return Ok(());
        }
        if self.status != b'I' || self.route.deferred_begin.is_some() {
            self.answer_error(
                PgError::new(
                    "0A000",
                    format!("{verb} inside a transaction block is not supported in transaction pooling mode"),
                )
                .with_hint("Send it outside a transaction (in autocommit mode)."),
            );
            return Ok(());
        }
        let Some(channel) = crate::frontend::listen::channel_of(st) else {
            self.answer_error(PgError::new(
                "42601",
                format!(
                    "syntax error in {verb}: a channel name{} is expected",
                    if verb == "UNLISTEN" { " or *" } else { "" }
                ),
            ));
            return Ok(());
        };
        match channel {
            Some(channel) if verb == "LISTEN" => {
                if self.listen.is_none() {
                    let Some(ops) = &self.ops else {
                        self.answer_error(PgError::new("0A000", "LISTEN is not available here"));
                        return Ok(());
                    };
                    let sub = ops.server.listeners.subscriber(&ops.server, &ops.database);
                    self.listen = Some(Box::new(sub));
                }
                let sub = self.listen.as_mut().expect("just set");
                if let Err(e) = sub.listen(&channel).await {
                    self.answer_error(PgError::new(
                        "08006",
                        format!("could not listen on \"{channel}\": {e}"),
                    ));
                    return Ok(());
                }
            }
            channel => {
                if let Some(sub) = self.listen.as_mut() {
                    sub.unlisten(channel.as_deref());
                }
            }
        }
        self.relay.drain_local(&mut self.cout);
        protocol::write_msg(&mut self.cout, b'C', format!("{verb}\0").as_bytes());
        protocol::write_ready(&mut self.cout, self.status);
        Ok(())
    }

    /// Notifications received so far go to the client if it is between transactions.
    pub(super) fn deliver_notifications(&mut self) {
        let Some(sub) = self.listen.as_mut() else {
            return;
        };
        while let Ok(frame) = sub.rx.try_recv() {
            sub.backlog.extend_from_slice(&frame);
        }
        if sub.backlog.is_empty() || !self.at_transaction_boundary() {
            return;
        }
        let sub = self.listen.as_mut().expect("checked above");
        self.cout.extend_from_slice(&sub.backlog);
        sub.backlog.clear();
    }
}

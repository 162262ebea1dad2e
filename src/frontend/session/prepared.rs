//! Extended-protocol frames for the attached server (an unsharded database), and named
//! prepared statements in transaction mode: a client's statement `s1` becomes the server
//! statement `pgshard_<hash of text and types>`, prepared on a server connection the first
//! time the client uses it there; what the server did not do is undone here.

use super::*;
use crate::exec::CLOSE_COMPLETE;

/// A prepared statement as the client named it (transaction mode).
pub(super) struct Stmt {
    /// Server-side identity: a hash of query text and parameter types.
    pub(super) global: u64,
    pub(super) query: Bytes,
    pub(super) types: Bytes,
    pub(super) kind_is_setting: bool,
    /// A SQL-level `PREPARE`: each execution may leave a statement on the server.
    pub(super) sql_prepare: bool,
}

pub(super) fn statement_id(query: &[u8], types: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    query.hash(&mut h);
    types.hash(&mut h);
    h.finish()
}

/// `pgshard_` and 16 hex digits, without allocating (this is written for every Bind).
pub(super) fn server_name(global: u64) -> [u8; 24] {
    let mut out = *b"pgshard_0000000000000000";
    for (i, d) in out[8..].iter_mut().enumerate() {
        *d = b"0123456789abcdef"[((global >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

pub(super) fn duplicate_statement(name: &[u8]) -> PgError {
    PgError::new(
        "42P05",
        format!(
            "prepared statement \"{}\" already exists",
            String::from_utf8_lossy(name)
        ),
    )
}

pub(super) fn missing_statement(name: &[u8]) -> PgError {
    PgError::new(
        "26000",
        format!(
            "prepared statement \"{}\" does not exist",
            String::from_utf8_lossy(name)
        ),
    )
}

impl Session {
    /// An extended-protocol message for the attached server (attaching the home shard's
    /// when none is).
    pub(super) async fn forward_extended(&mut self, frame: &[u8]) -> Result<(), SessionError> {
        let tag = frame[0];
        if self.backend.is_none() {
            // A Close of a client statement needs no server in transaction mode.
            if tag == b'C' && self.mode == PoolMode::Transaction {
                let (kind, name) = protocol::parse_target(frame, "Close")?;
                if kind == b'S' && !name.is_empty() {
                    self.statements.remove(name);
                    self.cout.extend_from_slice(&CLOSE_COMPLETE);
                    return Ok(());
                }
                if kind == b'S' && self.close_unnamed() {
                    return Ok(());
                }
            }
            if tag == b'H' {
                return Ok(());
            }
            if !self.attach(self.home_shard()).await {
                self.local_skip = true;
                return Ok(());
            }
        }
        // A Flush alone begins no batch (psycopg sends one right after a pipeline's Sync).
        if tag != b'H' {
            self.in_batch = true;
        }
        if !matches!(tag, b'P' | b'D' | b'C' | b'H') {
            self.route.batch_ran = true;
        }
        if self.mode == PoolMode::Session {
            if tag == b'P' {
                let p = protocol::parse_parse(frame)?;
                if classify_bytes(p.query).setting {
                    self.settings_dirty = true;
                }
            }
            self.push_forward(tag, frame);
            return Ok(());
        }
        if tag != b'P' && !self.listen_ext.is_empty() && self.extended_listen(tag, frame).await? {
            return Ok(());
        }
        match tag {
            b'P' => self.tx_parse(frame)?,
            b'B' => {
                let protocol::Bind { portal, stmt, rest } = protocol::parse_bind(frame)?;
                if stmt.is_empty() {
                    if let Some(global) = self.ensure_unnamed() {
                        self.relay.push(Pending::Cached {
                            global,
                            describe: false,
                            retry: self.unnamed.take_retry(),
                        });
                        protocol::write_bind(&mut self.bout, portal, &server_name(global), rest);
                    } else {
                        self.push_forward(tag, frame);
                    }
                } else if let Some(global) = self.ensure_prepared(stmt) {
                    if let Some(s) = self.statements.get(stmt) {
                        self.settings_dirty |= s.kind_is_setting;
                        if s.sql_prepare {
                            let query = s.query.clone();
                            self.note_sql_prepares_in(&query);
                        }
                    }
                    self.relay.push(Pending::Cached {
                        global,
                        describe: false,
                        retry: false,
                    });
                    let name = server_name(global);
                    protocol::write_bind(&mut self.bout, portal, &name, rest);
                } else {
                    self.local_error(missing_statement(stmt));
                }
            }
            b'D' => {
                let (kind, name) = protocol::parse_target(frame, "Describe")?;
                let cached = match (kind, name.is_empty()) {
                    (b'S', false) => Some(self.ensure_prepared(name).ok_or(name)),
                    (b'S', true) => self.ensure_unnamed().map(Ok),
                    _ => None,
                };
                if let Some(cached) = cached {
                    match cached {
                        Ok(global) => {
                            self.relay.push(Pending::Cached {
                                global,
                                describe: true,
                                retry: name.is_empty() && self.unnamed.take_retry(),
                            });
                            let sname = server_name(global);
                            protocol::write_target(&mut self.bout, b'D', b'S', &sname);
                        }
                        Err(name) => self.local_error(missing_statement(name)),
                    }
                } else {
                    self.push_forward(tag, frame);
                }
            }
            b'C' => {
                let (kind, name) = protocol::parse_target(frame, "Close")?;
                if kind == b'S' && !name.is_empty() {
                    // The server keeps its copy for other clients; the client's name goes.
                    self.statements.remove(name);
                    self.relay.push(Pending::Synth {
                        frame: CLOSE_COMPLETE,
                        undo: None,
                    });
                    self.relay.drain_local(&mut self.cout);
                } else if !(kind == b'S' && self.close_unnamed()) {
                    self.push_forward(tag, frame);
                }
            }
            _ => self.push_forward(tag, frame),
        }
        Ok(())
    }

    /// Parse in transaction mode: named statements get a server-side name derived from
    /// their text, and are prepared once per server connection.
    pub(super) fn tx_parse(&mut self, frame: &[u8]) -> Result<(), SessionError> {
        let p = protocol::parse_parse(frame)?;
        let kind = classify_bytes(p.query);
        if kind.listen {
            // pgshard listens for the client: a LISTEN left on a pooled server connection
            // would deliver to nobody, or to the wrong client.
            self.parse_listen(p.name, p.query);
            return Ok(());
        }
        if p.name.is_empty() && !self.listen_ext.is_empty() {
            // The unnamed statement is no longer a LISTEN.
            self.listen_ext.forget_unnamed();
        }
        if kind.sql_prepare {
            self.note_sql_prepares_in(p.query);
        }
        let is_setting = kind.setting;
        if is_setting {
            self.settings_dirty = true;
        }
        if p.name.is_empty() {
            if !is_setting && self.parse_unnamed(p.query, p.types) {
                return Ok(());
            }
            self.push_forward(b'P', frame);
            return Ok(());
        }
        let name = Bytes::copy_from_slice(p.name);
        if self.statements.contains_key(&name) {
            self.local_error(duplicate_statement(&name));
            return Ok(());
        }
        let global = statement_id(p.query, p.types);
        // Copied: once per statement a client names, and the read buffer it came in is
        // then free for the next reads.
        let stmt = Stmt {
            global,
            query: Bytes::copy_from_slice(p.query),
            types: Bytes::copy_from_slice(p.types),
            kind_is_setting: is_setting,
            sql_prepare: kind.sql_prepare,
        };
        let undo = Some(Undo {
            client_name: Some(name.clone()),
            global: None,
            stale: false,
        });
        let backend = self.backend.as_mut().expect("attached");
        if backend.prepared.contains(&global) {
            self.parse_answered_here(undo);
        } else {
            let parse = Pending::Parse {
                swallow: false,
                undo: Some(Undo {
                    client_name: Some(name.clone()),
                    ..Undo::unprepared(global)
                }),
            };
            self.prepare_on_server(global, &stmt.query, &stmt.types, parse);
        }
        self.statements.insert(name, stmt);
        Ok(())
    }

    /// Makes sure the attached server connection holds the client's statement `name`,
    /// injecting a Parse if needed; returns its server-side identity.
    pub(super) fn ensure_prepared(&mut self, name: &[u8]) -> Option<u64> {
        let global = self.statements.get(name)?.global;
        let backend = self.backend.as_mut().expect("attached");
        if !backend.prepared.contains(&global) && !self.relay.skipping {
            // Handles, not copies; only when the connection lacks the statement.
            let stmt = &self.statements[name];
            let (query, types) = (stmt.query.clone(), stmt.types.clone());
            self.prepare_on_server(global, &query, &types, Pending::injected_parse(global));
        }
        Some(global)
    }

    pub(super) fn apply_undo(&mut self) {
        for u in std::mem::take(&mut self.relay.undo) {
            if let Some(n) = u.client_name {
                if n.is_empty() {
                    // The unnamed statement's Parse failed (unless a newer one came since).
                    if self.unnamed.global == u.global {
                        self.unnamed.global = None;
                    }
                } else {
                    self.statements.remove(&n);
                }
            }
            if let (Some(g), Some(b)) = (u.global, self.backend.as_mut()) {
                if u.stale {
                    b.prepared.mark_stale(g);
                } else {
                    b.prepared.remove(&g);
                }
            }
        }
    }
}

/// What the session must know of a statement text it is asked to prepare.
#[derive(Default)]
pub(super) struct ParseKind {
    /// It changes session settings (they are replayed on other servers).
    pub(super) setting: bool,
    /// LISTEN or UNLISTEN.
    pub(super) listen: bool,
    /// A SQL-level `PREPARE`.
    pub(super) sql_prepare: bool,
}

pub(super) fn classify_bytes(q: &[u8]) -> ParseKind {
    let mut out = ParseKind::default();
    let mut note = |st: &str| match router::classify(st) {
        StatementKind::SessionSetting => out.setting = true,
        StatementKind::Listen | StatementKind::Unlisten => out.listen = true,
        StatementKind::Prepare(_) => out.sql_prepare = true,
        _ => {}
    };
    if let Ok(s) = std::str::from_utf8(q) {
        match router::single_statement(s) {
            Some(one) => note(one),
            None => router::split_statements(s).into_iter().for_each(note),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn server_names_are_sixteen_hex_digits() {
        for g in [0u64, 1, 0xdead_beef, u64::MAX, 0x0123_4567_89ab_cdef] {
            assert_eq!(
                super::server_name(g),
                format!("pgshard_{g:016x}").as_bytes()
            );
        }
    }
}

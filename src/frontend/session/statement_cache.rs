//! Statements pgshard prepares on the servers on its own (`pool.statement_cache`,
//! transaction mode): the client's unnamed statement, and simple queries whose constants
//! become parameters. Each becomes `pgshard_<hash>` on a server connection, as statements
//! the client names do (`prepared.rs`), so that PostgreSQL parses it once per server
//! connection and may reuse its plan; the client sees exactly the messages PostgreSQL
//! would have sent it for what it sent.

use super::prepared::{server_name, statement_id};
use super::*;
use crate::exec::{AutoStep, CLOSE_COMPLETE, PARSE_COMPLETE};
use crate::metrics::StatementStats;
use crate::router::literals;
use std::sync::atomic::Ordering::Relaxed;

/// The client's unnamed statement, when pgshard keeps it as a server statement.
#[derive(Default)]
pub(super) struct Unnamed {
    pub(super) global: Option<u64>,
    // Reused buffers: a text is copied only when it differs from the previous one.
    query: Vec<u8>,
    types: Vec<u8>,
    replay: Replay,
    /// The batch's frames from its first use of the statement up to its Sync.
    frames: BytesMut,
    /// The frame being handled is that first use: its request may be retried.
    retry_first: bool,
}

/// A batch that PostgreSQL would have begun by parsing the unnamed statement afresh,
/// where pgshard answered the Parse because the server connection holds the statement.
/// If DDL has changed the statement's result columns since it was prepared, the server
/// refuses the statement's first use ("cached plan must not change result type"), which
/// PostgreSQL would not have: the batch is then sent again, the statement prepared anew.
/// That is safe only when nothing of the batch ran before, so the batch is recorded from
/// that first use (its Bind or Describe right after the Parse) to its Sync, outside a
/// transaction block, and retried only when the client sent nothing after the Sync.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Replay {
    #[default]
    Off,
    /// The Parse was answered here: the next frame decides.
    Armed,
    Recording,
    /// The Sync was recorded: the frames wait for the batch's outcome.
    Sent,
}

/// The largest batch recorded for a retry; a longer one is not retried.
const REPLAY_LIMIT: usize = 1 << 20;

/// A Bind or a Describe of the unnamed statement.
fn uses_unnamed(frame: &[u8]) -> bool {
    match frame[0] {
        b'B' => protocol::parse_bind(frame).is_ok_and(|b| b.stmt.is_empty()),
        b'D' => protocol::parse_target(frame, "Describe")
            .is_ok_and(|(kind, name)| kind == b'S' && name.is_empty()),
        _ => false,
    }
}

impl Unnamed {
    /// Whether client frames are recorded for a retry (see [`Replay`]).
    pub(super) fn watching(&self) -> bool {
        matches!(self.replay, Replay::Armed | Replay::Recording)
    }

    /// A client frame, before it is handled.
    pub(super) fn observe(&mut self, frame: &[u8]) {
        self.retry_first = false;
        match self.replay {
            Replay::Armed if uses_unnamed(frame) => {
                self.replay = Replay::Recording;
                self.retry_first = true;
                self.frames.clear();
                self.frames.extend_from_slice(frame);
            }
            Replay::Recording if self.frames.len() + frame.len() <= REPLAY_LIMIT => {
                self.frames.extend_from_slice(frame);
                if frame[0] == b'S' {
                    self.replay = Replay::Sent;
                }
            }
            _ => self.stop(),
        }
    }

    /// No retry of the batch.
    pub(super) fn stop(&mut self) {
        self.replay = Replay::Off;
        self.retry_first = false;
        self.frames.clear();
    }

    /// Whether the Bind or Describe being handled may be retried.
    pub(super) fn take_retry(&mut self) -> bool {
        std::mem::take(&mut self.retry_first)
    }
}

/// Simple queries run as prepared statements.
#[derive(Default)]
pub(super) struct AutoPrepare {
    /// Statement shapes (texts with parameters) this client sent: true once seen, false
    /// when running one as a prepared statement failed.
    seen: HashMap<u64, bool>,
    text: String,
    found: Vec<literals::Literal>,
    /// The Query being run as a prepared statement, to send as written if that fails.
    retry: Option<(u64, Bytes)>,
}

/// A Parse's parameter types when it gives none (the server infers them; the text casts).
const NO_TYPES: &[u8] = &[0, 0];

/// The shapes a session remembers before it starts over.
const SEEN_LIMIT: usize = 4096;

/// Statements worth keeping prepared: those PostgreSQL can plan (a utility statement
/// prepared on every server connection would only take memory there).
fn cacheable(query: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(query) else {
        return false;
    };
    let w = router::lexer::leading_words::<1>(s).0[0];
    [
        "select", "insert", "update", "delete", "with", "values", "table", "merge",
    ]
    .iter()
    .any(|k| w.eq_ignore_ascii_case(k))
}

impl Session {
    /// Prepares `global` on the attached server connection: first closes what must go
    /// (a stale copy of it, the least recently used statement past the limit), then
    /// queues `parse` and writes the Parse.
    pub(super) fn prepare_on_server(
        &mut self,
        global: u64,
        query: &[u8],
        types: &[u8],
        parse: Pending,
    ) {
        let name = server_name(global);
        if !self.relay.skipping {
            let limit = self.cache.per_connection;
            let backend = self.backend.as_mut().expect("attached");
            let [stale, evicted] = backend.prepared.insert(global, limit);
            let stats = self.statement_stats();
            stats.prepared.fetch_add(1, Relaxed);
            if evicted.is_some() {
                stats.evicted.fetch_add(1, Relaxed);
            }
            for g in [stale, evicted].into_iter().flatten() {
                self.relay.push(Pending::Quiet(g));
                protocol::write_target(&mut self.bout, b'C', b'S', &server_name(g));
            }
        }
        // When the server skips to the Sync, so does the relay (which undoes the Parse).
        self.relay.push(parse);
        protocol::write_parse(&mut self.bout, &name, query, types);
    }

    /// A Parse of the client's unnamed statement, kept as a server statement when
    /// `statement_cache.unnamed` is on; false when it must be forwarded as it is.
    pub(super) fn parse_unnamed(&mut self, query: &[u8], types: &[u8]) -> bool {
        if !self.cache.unnamed || !cacheable(query) {
            self.unnamed.global = None;
            self.unnamed.stop();
            return false;
        }
        self.started();
        let global = statement_id(query, types);
        if self.unnamed.query != query || self.unnamed.types != types {
            self.unnamed.query.clear();
            self.unnamed.query.extend_from_slice(query);
            self.unnamed.types.clear();
            self.unnamed.types.extend_from_slice(types);
        }
        self.unnamed.global = Some(global);
        self.unnamed.stop();
        let backend = self.backend.as_mut().expect("attached");
        if backend.prepared.contains(&global) {
            // Nothing ran in this batch yet, outside a transaction block (see Replay).
            if self.status == b'I' && self.relay.idle() && !self.route.batch_ran && !self.routed() {
                self.unnamed.replay = Replay::Armed;
            }
            self.parse_answered_here(None);
        } else {
            // A failed Parse leaves the client without an unnamed statement.
            let undo = Undo {
                client_name: Some(Bytes::new()),
                ..Undo::unprepared(global)
            };
            self.prepare_unnamed(
                global,
                Pending::Parse {
                    swallow: false,
                    undo: Some(undo),
                },
            );
        }
        true
    }

    /// Counters of the attached shard's server statements.
    fn statement_stats(&self) -> &StatementStats {
        &self.db.shards[self.shard].stats.statements
    }

    /// A Parse of a statement the server connection holds: pgshard answers it.
    pub(super) fn parse_answered_here(&mut self, undo: Option<Undo>) {
        self.statement_stats().reused.fetch_add(1, Relaxed);
        self.synth_only |= self.cout.is_empty();
        self.relay.push(Pending::Synth {
            frame: PARSE_COMPLETE,
            undo,
        });
        self.relay.drain_local(&mut self.cout);
    }

    fn prepare_unnamed(&mut self, global: u64, parse: Pending) {
        let query = std::mem::take(&mut self.unnamed.query);
        let types = std::mem::take(&mut self.unnamed.types);
        self.prepare_on_server(global, &query, &types, parse);
        self.unnamed.query = query;
        self.unnamed.types = types;
    }

    /// The server identity of the client's unnamed statement when pgshard keeps it,
    /// prepared on the attached server connection if it is not yet.
    pub(super) fn ensure_unnamed(&mut self) -> Option<u64> {
        let global = self.unnamed.global?;
        let backend = self.backend.as_mut()?;
        if !backend.prepared.contains(&global) && !self.relay.skipping {
            self.prepare_unnamed(global, Pending::injected_parse(global));
        }
        Some(global)
    }

    /// A Close of the client's unnamed statement that pgshard keeps: answered here (the
    /// server copy stays for other clients). False when the statement is not one of those.
    pub(super) fn close_unnamed(&mut self) -> bool {
        if self.unnamed.global.take().is_none() {
            return false;
        }
        self.relay.push(Pending::Synth {
            frame: CLOSE_COMPLETE,
            undo: None,
        });
        self.relay.drain_local(&mut self.cout);
        true
    }

    /// Sends a simple Query to the attached server: as a prepared statement when
    /// `statement_cache.simple` is on, the session is outside a transaction block, and
    /// this client sent a query of the same shape before (or the server connection holds
    /// it already); as it is otherwise.
    pub(super) fn send_query(&mut self, frame: Bytes) {
        if self.cache.simple
            && self.status == b'I'
            && self.relay.idle()
            && self.send_prepared(&frame)
        {
            return;
        }
        self.relay.push(Pending::Query);
        self.bout.extend_from_slice(&frame);
    }

    fn send_prepared(&mut self, frame: &Bytes) -> bool {
        let Ok(sql) = protocol::parse_query(frame) else {
            return false;
        };
        let Some(one) = router::single_statement(sql) else {
            return false;
        };
        if !literals::parameterize(one, &mut self.auto.text, &mut self.auto.found) {
            return false;
        }
        let global = statement_id(self.auto.text.as_bytes(), NO_TYPES);
        let Some(backend) = self.backend.as_mut() else {
            return false;
        };
        let held = backend.prepared.contains(&global);
        let go = match self.auto.seen.get(&global) {
            Some(&ok) => ok,
            None => {
                if self.auto.seen.len() >= SEEN_LIMIT {
                    self.auto.seen.clear();
                }
                self.auto.seen.insert(global, true);
                held
            }
        };
        if !go {
            return false;
        }
        if held {
            self.statement_stats().reused.fetch_add(1, Relaxed);
        } else {
            let text = std::mem::take(&mut self.auto.text);
            self.prepare_on_server(
                global,
                text.as_bytes(),
                NO_TYPES,
                Pending::Auto(AutoStep::Parse(global)),
            );
            self.auto.text = text;
        }
        self.relay.push(Pending::Auto(AutoStep::Bind(global)));
        let values = self.auto.found.iter().map(|l| {
            let sign: &[u8] = if l.negative { b"-" } else { b"" };
            (sign, l.digits(one))
        });
        protocol::write_text_bind(&mut self.bout, &server_name(global), values);
        self.relay.push(Pending::Auto(AutoStep::Describe));
        protocol::write_target(&mut self.bout, b'D', b'P', b"");
        self.relay.push(Pending::Execute);
        protocol::write_execute(&mut self.bout);
        self.relay.push(Pending::Sync);
        protocol::write_msg(&mut self.bout, b'S', &[]);
        self.auto.retry = Some((global, frame.clone()));
        true
    }

    /// A request failed before anything of it ran ([`Event::Retry`]): sends it again.
    /// False when there is nothing to send again (the client gets the error).
    pub(super) fn retry(&mut self) -> bool {
        if let Some((global, frame)) = self.auto.retry.take() {
            self.statement_stats().retried.fetch_add(1, Relaxed);
            self.retry_query(global, frame);
            return true;
        }
        if self.unnamed.replay != Replay::Sent {
            self.unnamed.stop();
            return false;
        }
        self.statement_stats().retried.fetch_add(1, Relaxed);
        // The batch is handled again as if the client had just sent it, before anything
        // it sent since; its first use of the statement, now stale, prepares it afresh.
        // In a batch meanwhile, so that the server connection stays for it.
        self.unnamed.replay = Replay::Off;
        self.in_batch = true;
        let later = std::mem::replace(&mut self.crbuf, std::mem::take(&mut self.unnamed.frames));
        self.crbuf.extend_from_slice(&later);
        self.unnamed.frames = later;
        self.unnamed.frames.clear();
        true
    }

    /// The prepared form of a simple query failed before it ran: the query goes as the
    /// client wrote it, and this client's queries of that shape go so from now on, unless
    /// the server only refused a plan it had cached (DDL changed the result's columns),
    /// which is prepared afresh at its next use.
    fn retry_query(&mut self, global: u64, frame: Bytes) {
        let stale = self
            .backend
            .as_ref()
            .is_some_and(|b| b.prepared.is_stale(global));
        if !stale {
            self.auto.seen.insert(global, false);
        }
        self.relay.push(Pending::Query);
        self.bout.extend_from_slice(&frame);
    }

    /// The request a retry would repeat is over.
    pub(super) fn query_done(&mut self) {
        self.auto.retry = None;
        if self.unnamed.replay != Replay::Off {
            self.unnamed.stop();
        }
    }
}

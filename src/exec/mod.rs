//! Carrying out a statement on one shard: checkout of a server connection to a node, and the
//! relay that forwards the server's messages to the client as bytes.
//!
//! The relay keeps a queue of the requests sent to the server whose responses have not all
//! arrived ([`Pending`]). That queue is what lets the session insert messages the client did
//! not send (a Parse of a statement this server connection has not seen yet, replayed
//! session settings) and answer some messages itself (a Parse of a statement the server
//! connection already has) while the client still sees exactly the message sequence
//! PostgreSQL would send, including the skip-until-Sync after an error.

use crate::cluster::Database;
use crate::pool::{PoolError, Pooled};
use crate::protocol::{self, PgError};
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;

pub mod copy_text;
mod datetime;
pub mod directory;
pub mod finalize;
pub mod merge;
pub mod numeric;
pub mod order;
pub mod scatter;
pub mod sorted;
pub mod twophase;
mod values;

/// Checks out a server connection to a node of a shard.
pub async fn checkout(db: &Database, shard: usize, node: usize) -> Result<Pooled, PoolError> {
    db.shards[shard].nodes[node].pool.get().await
}

/// How much of one shard's answer pgshard may hold to merge a statement over several
/// shards (the database's `max_merge_bytes`; 0: no limit), and where the answers cut off
/// are counted.
#[derive(Clone, Copy)]
pub struct MergeLimit<'a> {
    pub bytes: usize,
    hits: Option<&'a std::sync::atomic::AtomicU64>,
}

impl<'a> MergeLimit<'a> {
    /// The limit of `db`.
    pub fn of(db: &'a Database) -> Self {
        MergeLimit {
            bytes: db.config.max_merge_bytes,
            hits: Some(&db.merge_limit_hits),
        }
    }

    /// No limit.
    pub const NONE: MergeLimit<'static> = MergeLimit {
        bytes: 0,
        hits: None,
    };

    /// Whether an answer of `held` bytes is past the limit.
    pub fn passed(&self, held: usize) -> bool {
        self.bytes > 0 && held > self.bytes
    }

    /// The client's error for an answer past the limit (counted).
    pub fn exceeded(&self) -> PgError {
        if let Some(h) = self.hits {
            h.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        PgError::new(
            "54000",
            format!(
                "a shard's answer to this statement over several shards exceeds max_merge_bytes ({} bytes), which pgshard holds in memory to merge it",
                self.bytes
            ),
        )
        .with_hint(
            "Add a shard key condition or a LIMIT, select fewer columns, or raise the database's max_merge_bytes.",
        )
    }
}

/// Checks out a server connection to a shard's primary.
pub async fn checkout_primary(db: &Database, shard: usize) -> Result<Pooled, PoolError> {
    let node = db
        .primary(shard)
        .map_err(|e| PoolError::Down(e.to_string()))?;
    checkout(db, shard, node).await
}

/// What to undo in the session's prepared-statement bookkeeping when a Parse did not take
/// effect on the server (it failed, or was skipped after an earlier error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undo {
    /// The client's statement name to forget.
    pub client_name: Option<Bytes>,
    /// The server-side statement the connection does not hold after all.
    pub global: Option<u64>,
    /// The server holds `global` but refused its cached plan: close it before the next
    /// Parse under that name.
    pub stale: bool,
}

impl Undo {
    /// The server connection does not hold `global` after all.
    pub fn unprepared(global: u64) -> Undo {
        Undo {
            client_name: None,
            global: Some(global),
            stale: false,
        }
    }

    /// The server connection holds `global`, but it must be closed before its next Parse.
    pub fn stale(global: u64) -> Undo {
        Undo {
            stale: true,
            ..Undo::unprepared(global)
        }
    }
}

impl Pending {
    /// A Parse of `global` pgshard puts in front of a client's Bind or Describe: the
    /// client expects no ParseComplete.
    pub fn injected_parse(global: u64) -> Pending {
        Pending::Parse {
            swallow: true,
            undo: Some(Undo::unprepared(global)),
        }
    }
}

/// A request sent to the server (or answered locally) whose response is still due.
#[derive(Debug)]
pub enum Pending {
    /// A simple Query (or FunctionCall): everything up to ReadyForQuery.
    Query,
    /// A query pgshard sent itself: its whole response is swallowed.
    Internal,
    Sync,
    /// A Sync pgshard sent itself, ending the part of a client's batch one shard ran
    /// before the batch moved to another: it ends the server's skipping like any Sync,
    /// but its ReadyForQuery is not the client's.
    InternalSync,
    /// A Parse; `swallow` when pgshard injected it and the client expects no ParseComplete.
    Parse {
        swallow: bool,
        undo: Option<Undo>,
    },
    Bind,
    Describe,
    Close,
    Execute,
    /// A response pgshard gives itself (ParseComplete, CloseComplete, CommandComplete...):
    /// the frame to send when its turn comes.
    Synth {
        frame: Bytes,
        undo: Option<Undo>,
    },
    /// An error pgshard raises itself at this point of the stream.
    Error(Box<PgError>),
    /// A Close pgshard sent itself of one of its statements: its CloseComplete is not the
    /// client's. Skipped after an error, it leaves the statement on the server.
    Quiet(u64),
    /// A Bind (or a Describe, `describe`) of a statement pgshard prepared under its own
    /// name: if the server refuses the statement's cached plan (0A000 after DDL changed
    /// its result columns), the statement is closed before its next use. With `retry`
    /// (the first request of a batch that would have parsed the client's unnamed
    /// statement afresh on PostgreSQL) the error is held until the Sync, and the session
    /// sends the batch again ([`Event::Retry`]).
    Cached {
        global: u64,
        describe: bool,
        retry: bool,
    },
    /// A step of a simple query pgshard runs as a prepared statement (see [`AutoStep`]).
    Auto(AutoStep),
}

/// The requests that carry out a client's simple Query as a prepared statement. The
/// client sees only what the Query would have produced: ParseComplete, BindComplete and
/// NoData are not its, and an error of Parse or Bind (nothing has run yet) is held back
/// until the Sync: outside a transaction block the session then sends the Query as the
/// client wrote it ([`Event::Retry`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoStep {
    Parse(u64),
    Bind(u64),
    Describe,
}

/// What a backend frame meant for the session.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    None,
    /// ReadyForQuery with this transaction status reached the client.
    Ready(u8),
    /// The ReadyForQuery of an [`Pending::InternalSync`], with the server's status.
    InternalReady(u8),
    /// The server started COPY FROM STDIN ('G') or ended it.
    CopyIn,
    /// A request pgshard may send again failed before anything of it ran, and the server
    /// is idle with nothing else due: the session sends again a simple query run as a
    /// prepared statement (as the client wrote it) or a batch refused for a stale
    /// statement (which is prepared afresh). The error and the ReadyForQuery were not
    /// passed on ([`Relay::give_up_retry`] passes them).
    Retry,
}

/// The response-side bookkeeping of one client session.
#[derive(Debug, Default)]
pub struct Relay {
    pub queue: VecDeque<Pending>,
    /// The server is discarding messages until the next Sync (after an error).
    pub skipping: bool,
    /// The server failed an extended-protocol request since the last Sync (`skipping`
    /// also follows errors pgshard answers itself).
    pub server_failed: bool,
    /// Undo records produced while handling frames; the session drains them.
    pub undo: Vec<Undo>,
    /// The error of an [`AutoStep`] or a retried [`Pending::Cached`], held until the
    /// Sync's ReadyForQuery.
    held: Option<Bytes>,
    /// What a request that may be retried answered before its outcome was known.
    kept: BytesMut,
    /// The error and ReadyForQuery not passed on at an [`Event::Retry`], for when the
    /// session cannot retry after all.
    unsent: Option<Bytes>,
}

impl Relay {
    /// Queues a request; requests the server will skip are not queued.
    pub fn push(&mut self, p: Pending) {
        if matches!(p, Pending::Sync | Pending::InternalSync) {
            self.server_failed = false;
        }
        if self.skipping {
            match p {
                Pending::Sync | Pending::InternalSync => self.skipping = false,
                Pending::Query | Pending::Internal => {}
                // The server skips these: no response will come.
                Pending::Parse { undo, .. } | Pending::Synth { undo, .. } => {
                    self.undo.extend(undo);
                    return;
                }
                _ => return,
            }
        }
        self.queue.push_back(p);
    }

    /// A Sync answered by pgshard (no server attached): whatever was skipped ends here.
    pub fn sync_local(&mut self) {
        if self.queue.is_empty() {
            self.skipping = false;
        }
    }

    /// Emits responses pgshard answers itself that are now at the front of the queue.
    pub fn drain_local(&mut self, out: &mut BytesMut) {
        while let Some(front) = self.queue.front() {
            match front {
                Pending::Synth { frame, .. } => {
                    out.extend_from_slice(frame);
                    self.queue.pop_front();
                }
                Pending::Error(e) => {
                    e.write(out);
                    self.queue.pop_front();
                    self.skip_to_sync();
                }
                _ => break,
            }
        }
    }

    /// Drops queued requests up to the next Sync: after an error the server skips them.
    fn skip_to_sync(&mut self) {
        while let Some(front) = self.queue.front() {
            match front {
                Pending::Sync | Pending::InternalSync | Pending::Query | Pending::Internal => {
                    break;
                }
                _ => match self.queue.pop_front() {
                    Some(Pending::Parse { undo, .. }) | Some(Pending::Synth { undo, .. }) => {
                        self.undo.extend(undo)
                    }
                    Some(Pending::Quiet(g)) => self.undo.push(Undo::stale(g)),
                    _ => {}
                },
            }
        }
        self.skipping = !self
            .queue
            .iter()
            .any(|p| matches!(p, Pending::Sync | Pending::InternalSync));
    }

    /// Handles one frame from the server, appending what the client must see to `out`.
    pub fn on_frame(&mut self, frame: &[u8], out: &mut BytesMut) -> Event {
        self.drain_local(out);
        let tag = frame[0];
        let internal = matches!(
            self.queue.front(),
            Some(Pending::Internal | Pending::InternalSync)
        );
        // Asynchronous messages can come at any time; they belong to no request.
        if matches!(tag, b'N' | b'A' | b'S') {
            if internal {
                if tag == b'N' {
                    tracing::debug!(
                        "notice on internal query: {:?}",
                        protocol::error_fields(frame)
                    );
                }
            } else {
                out.extend_from_slice(frame);
            }
            return Event::None;
        }
        let Some(front) = self.queue.front_mut() else {
            // Nothing is expected: forward rather than hide what the server said.
            out.extend_from_slice(frame);
            return Event::None;
        };
        let mut event = Event::None;
        let done = match front {
            Pending::Internal => {
                if tag == b'E' {
                    let (code, msg) = protocol::error_fields(frame);
                    if msg != RAISED_MESSAGE {
                        tracing::warn!(%code, %msg, "internal query failed");
                    }
                }
                tag == b'Z'
            }
            Pending::InternalSync => {
                if tag == b'Z' {
                    event = Event::InternalReady(frame.get(5).copied().unwrap_or(b'I'));
                }
                tag == b'Z'
            }
            Pending::Sync if tag == b'Z' && self.held.is_some() => {
                let held = self.held.take().expect("checked");
                let status = frame.get(5).copied().unwrap_or(b'I');
                // A retry must run before anything the client sent after it: only when
                // nothing else went to the server since (a pipelining client).
                if status == b'I' && self.queue.len() == 1 {
                    let mut answer = BytesMut::with_capacity(held.len() + frame.len());
                    answer.extend_from_slice(&held);
                    answer.extend_from_slice(frame);
                    self.unsent = Some(answer.freeze());
                    event = Event::Retry;
                } else {
                    out.extend_from_slice(&held);
                    out.extend_from_slice(frame);
                    event = Event::Ready(status);
                }
                true
            }
            Pending::Query | Pending::Sync => {
                out.extend_from_slice(frame);
                match tag {
                    b'Z' => {
                        event = Event::Ready(frame.get(5).copied().unwrap_or(b'I'));
                        true
                    }
                    b'G' => {
                        event = Event::CopyIn;
                        false
                    }
                    _ => false,
                }
            }
            Pending::Parse { swallow, undo } => {
                if tag == b'E' {
                    // An injected Parse's error is the client's error too: its Bind fails.
                    self.undo.extend(undo.take());
                    out.extend_from_slice(frame);
                } else if !*swallow {
                    out.extend_from_slice(frame);
                }
                true
            }
            Pending::Bind | Pending::Close => {
                out.extend_from_slice(frame);
                true
            }
            Pending::Quiet(_) => {
                if tag == b'E' {
                    out.extend_from_slice(frame);
                }
                true
            }
            Pending::Cached {
                global,
                describe,
                retry,
            } => {
                let (global, describe, retry) = (*global, *describe, *retry);
                let refused = tag == b'E' && refuses_cached_plan(frame);
                if refused {
                    self.undo.push(Undo::stale(global));
                }
                // A Describe of a statement answers ParameterDescription before the
                // server looks at the plan: kept back too, as the retry sends it again.
                let done = !describe || matches!(tag, b'T' | b'n' | b'E');
                if refused && retry && self.hold(frame) {
                    self.kept.clear();
                } else if retry && !done {
                    self.kept.extend_from_slice(frame);
                } else {
                    out.extend_from_slice(&self.kept);
                    self.kept.clear();
                    out.extend_from_slice(frame);
                }
                done
            }
            Pending::Auto(step) => {
                match (*step, tag) {
                    (AutoStep::Parse(g) | AutoStep::Bind(g), b'E') => {
                        // The Parse did not take; a refused cached plan stays on the server.
                        if matches!(step, AutoStep::Parse(_)) {
                            self.undo.push(Undo::unprepared(g));
                        } else if refuses_cached_plan(frame) {
                            self.undo.push(Undo::stale(g));
                        }
                        if !self.hold(frame) {
                            out.extend_from_slice(frame);
                        }
                    }
                    (AutoStep::Describe, b'T' | b'E') => out.extend_from_slice(frame),
                    // ParseComplete, BindComplete, NoData: not the client's.
                    _ => {}
                }
                true
            }
            Pending::Describe => {
                out.extend_from_slice(frame);
                matches!(tag, b'T' | b'n' | b'E')
            }
            Pending::Execute => {
                out.extend_from_slice(frame);
                if tag == b'G' {
                    event = Event::CopyIn;
                    // The server ignores Sync during copy-in; clients that send Bind,
                    // Execute, Sync before knowing the statement is a COPY get no
                    // ReadyForQuery for that Sync.
                    let mut first = true;
                    self.queue.retain(|p| {
                        let keep = first || !matches!(p, Pending::Sync);
                        first = false;
                        keep
                    });
                }
                matches!(tag, b'C' | b'I' | b's' | b'E')
            }
            Pending::Synth { .. } | Pending::Error(_) => unreachable!("drained above"),
        };
        if done {
            let was_extended = !matches!(
                self.queue.pop_front(),
                Some(Pending::Query | Pending::Sync | Pending::Internal | Pending::InternalSync)
            );
            if tag == b'E' && was_extended {
                self.server_failed = true;
                self.skip_to_sync();
            }
            self.drain_local(out);
        }
        event
    }

    /// Holds an error of a request that may be retried until the Sync's ReadyForQuery.
    /// False for a FATAL one, which must go out at once (the server is going away: no
    /// retry, the client must see why).
    fn hold(&mut self, error: &[u8]) -> bool {
        if protocol::is_fatal(error) {
            return false;
        }
        self.held = Some(Bytes::copy_from_slice(error));
        true
    }

    /// After an [`Event::Retry`] the session could not act on: the client gets the error
    /// and the ReadyForQuery after all.
    pub fn give_up_retry(&mut self, out: &mut BytesMut) {
        if let Some(answer) = self.unsent.take() {
            out.extend_from_slice(&answer);
        }
    }

    /// Nothing is due from the server.
    pub fn idle(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether the server may hold answers back: extended-protocol messages went to it
    /// after the last Sync or Query, and it answers those only at a Flush or a Sync.
    pub fn awaits_flush(&self) -> bool {
        self.queue
            .iter()
            .rev()
            .find(|p| !matches!(p, Pending::Synth { .. } | Pending::Error(_)))
            .is_some_and(|p| {
                matches!(
                    p,
                    Pending::Parse { .. }
                        | Pending::Bind
                        | Pending::Describe
                        | Pending::Close
                        | Pending::Execute
                        | Pending::Quiet(_)
                        | Pending::Cached { .. }
                        | Pending::Auto(_)
                )
            })
    }

    /// The number of ReadyForQuery messages the client still expects.
    pub fn ready_due(&self) -> usize {
        self.queue
            .iter()
            .filter(|p| matches!(p, Pending::Query | Pending::Sync))
            .count()
    }
}

/// Whether an ErrorResponse is the server's refusal of a prepared statement's cached plan
/// ("cached plan must not change result type", after DDL changed its result columns).
fn refuses_cached_plan(error: &[u8]) -> bool {
    crate::metrics::sqlstate_of(error) == Some("0A000")
}

/// The message of [`RAISE_FAILED`]'s error.
const RAISED_MESSAGE: &str = "pgshard: the statement failed";

/// An internal query that fails the server's transaction (as the client's failed): after an
/// error pgshard raised itself or one from another shard.
pub const RAISE_FAILED: &str =
    "DO $pgshard$BEGIN RAISE EXCEPTION 'pgshard: the statement failed'; END$pgshard$";

/// ParseComplete, BindComplete and CloseComplete, for answers pgshard gives itself: no
/// allocation per answer.
pub const PARSE_COMPLETE: Bytes = Bytes::from_static(&[b'1', 0, 0, 0, 4]);
pub const BIND_COMPLETE: Bytes = Bytes::from_static(&[b'2', 0, 0, 0, 4]);
pub const CLOSE_COMPLETE: Bytes = Bytes::from_static(&[b'3', 0, 0, 0, 4]);

/// A frame with an empty body (ParseComplete, CloseComplete...).
pub fn empty_frame(tag: u8) -> Bytes {
    let mut b = BytesMut::with_capacity(5);
    protocol::write_msg(&mut b, tag, &[]);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(tag: u8) -> BytesMut {
        let mut b = BytesMut::new();
        if tag == b'Z' {
            protocol::write_ready(&mut b, b'I');
        } else if tag == b'E' {
            PgError::new("42601", "syntax").write(&mut b);
        } else {
            protocol::write_msg(&mut b, tag, &[]);
        }
        b
    }

    fn tags(b: &[u8]) -> String {
        let mut s = String::new();
        let mut i = 0;
        while i < b.len() {
            s.push(b[i] as char);
            let n = i32::from_be_bytes([b[i + 1], b[i + 2], b[i + 3], b[i + 4]]) as usize;
            i += n + 1;
        }
        s
    }

    #[test]
    fn a_skipped_close_of_a_cached_statement_leaves_it_stale() {
        let mut r = Relay::default();
        let mut out = BytesMut::new();
        r.push(Pending::Bind);
        r.push(Pending::Quiet(9));
        r.push(Pending::Sync);
        r.on_frame(&f(b'E'), &mut out);
        assert_eq!(r.undo, vec![Undo::stale(9)]);
    }

    #[test]
    fn a_failed_prepared_form_of_a_query_is_retried_only_when_the_server_is_idle() {
        // The server's status after the Sync, a query the client pipelined behind it.
        for (status, pipelined, retried) in [
            (b'I', false, true),
            (b'T', false, false),
            (b'I', true, false),
        ] {
            let mut r = Relay::default();
            let mut out = BytesMut::new();
            for p in [
                Pending::Auto(AutoStep::Parse(1)),
                Pending::Auto(AutoStep::Bind(1)),
                Pending::Auto(AutoStep::Describe),
                Pending::Execute,
                Pending::Sync,
            ] {
                r.push(p);
            }
            if pipelined {
                // A retry now would run after it: the client would take its answer for
                // the first query's.
                r.push(Pending::Query);
            }
            assert_eq!(r.on_frame(&f(b'E'), &mut out), Event::None);
            assert!(out.is_empty(), "the error is held");
            let mut z = BytesMut::new();
            protocol::write_ready(&mut z, status);
            let e = r.on_frame(&z, &mut out);
            assert_eq!(r.idle(), !pipelined);
            if retried {
                assert_eq!(e, Event::Retry);
                assert!(out.is_empty());
            } else {
                assert_eq!(e, Event::Ready(status));
                assert_eq!(tags(&out), "EZ");
            }
        }
    }

    #[test]
    fn a_refused_first_use_of_a_cached_statement_is_held_for_a_retry() {
        let cached = Pending::Cached {
            global: 5,
            describe: true,
            retry: true,
        };
        let mut refusal = BytesMut::new();
        PgError::new("0A000", "cached plan must not change result type").write(&mut refusal);
        let mut r = Relay::default();
        let mut out = BytesMut::new();
        r.push(cached);
        r.push(Pending::Sync);
        // ParameterDescription comes before the server looks at the plan.
        r.on_frame(&f(b't'), &mut out);
        r.on_frame(&refusal, &mut out);
        assert!(out.is_empty());
        assert_eq!(r.undo, vec![Undo::stale(5)]);
        assert_eq!(r.on_frame(&f(b'Z'), &mut out), Event::Retry);
        assert!(out.is_empty() && r.idle());
        // When the session cannot send the batch again, the client hears the refusal.
        r.give_up_retry(&mut out);
        assert_eq!(tags(&out), "EZ");
        // Answered: what was kept back goes out in its place.
        let mut r = Relay::default();
        let mut out = BytesMut::new();
        r.push(Pending::Cached {
            global: 5,
            describe: true,
            retry: true,
        });
        r.push(Pending::Sync);
        r.on_frame(&f(b't'), &mut out);
        assert!(out.is_empty());
        r.on_frame(&f(b'T'), &mut out);
        assert_eq!(r.on_frame(&f(b'Z'), &mut out), Event::Ready(b'I'));
        assert_eq!(tags(&out), "tTZ");
        assert!(r.undo.is_empty());
    }

    #[test]
    fn synthesized_parse_complete_keeps_its_place() {
        let mut r = Relay::default();
        let mut out = BytesMut::new();
        // Bind (to server), Parse answered locally, Execute, Sync.
        r.push(Pending::Bind);
        r.push(Pending::Synth {
            frame: empty_frame(b'1'),
            undo: None,
        });
        r.push(Pending::Execute);
        r.push(Pending::Sync);
        r.drain_local(&mut out);
        assert_eq!(tags(&out), "");
        for t in [b'2', b'D', b'C', b'Z'] {
            r.on_frame(&f(t), &mut out);
        }
        assert_eq!(tags(&out), "21DCZ");
        assert!(r.idle());
    }

    #[test]
    fn injected_parse_is_swallowed_and_errors_skip_to_sync() {
        let mut r = Relay::default();
        let mut out = BytesMut::new();
        let undo = Undo {
            client_name: Some(Bytes::from_static(b"s1")),
            global: Some(7),
            stale: false,
        };
        r.push(Pending::Parse {
            swallow: true,
            undo: None,
        });
        r.push(Pending::Bind);
        r.push(Pending::Parse {
            swallow: false,
            undo: Some(undo.clone()),
        });
        r.push(Pending::Execute);
        r.push(Pending::Sync);
        r.on_frame(&f(b'1'), &mut out);
        assert_eq!(tags(&out), "");
        r.on_frame(&f(b'E'), &mut out); // the Bind failed: Parse and Execute are skipped
        assert_eq!(r.undo, vec![undo]);
        let ev = r.on_frame(&f(b'Z'), &mut out);
        assert_eq!(ev, Event::Ready(b'I'));
        assert_eq!(tags(&out), "EZ");
        assert!(r.idle() && !r.skipping);
    }

    #[test]
    fn error_without_sync_skips_later_requests_until_sync() {
        let mut r = Relay::default();
        let mut out = BytesMut::new();
        r.push(Pending::Parse {
            swallow: false,
            undo: None,
        });
        r.on_frame(&f(b'E'), &mut out);
        assert!(r.skipping);
        r.push(Pending::Bind); // skipped by the server: not queued
        r.push(Pending::Sync);
        assert!(!r.skipping);
        r.on_frame(&f(b'Z'), &mut out);
        assert_eq!(tags(&out), "EZ");
        assert!(r.idle());
    }

    #[test]
    fn local_error_skips_until_sync() {
        let mut r = Relay::default();
        let mut out = BytesMut::new();
        r.push(Pending::Error(Box::new(PgError::new("26000", "nope"))));
        r.drain_local(&mut out);
        assert!(r.skipping);
        r.push(Pending::Execute);
        r.push(Pending::Sync);
        r.on_frame(&f(b'Z'), &mut out);
        assert_eq!(tags(&out), "EZ");
    }

    #[test]
    fn internal_sync_ends_the_skip_without_telling_the_client() {
        let mut r = Relay::default();
        let mut out = BytesMut::new();
        r.push(Pending::Execute);
        r.on_frame(&f(b'E'), &mut out);
        assert!(r.skipping);
        r.push(Pending::InternalSync);
        assert!(!r.skipping);
        assert_eq!(r.ready_due(), 0);
        assert_eq!(r.on_frame(&f(b'Z'), &mut out), Event::InternalReady(b'I'));
        assert_eq!(tags(&out), "E");
        assert!(r.idle());
    }

    proptest::proptest! {
        /// Any interleaving of requests and server frames keeps the relay consistent: it
        /// never panics and only ever emits whole frames.
        #[test]
        fn relay_never_panics(
            steps in proptest::collection::vec((0u8..13, proptest::prelude::any::<bool>()), 0..60),
        ) {
            let mut r = Relay::default();
            let mut out = BytesMut::new();
            for (k, push) in steps {
                if push {
                    r.push(match k {
                        0 => Pending::Query,
                        1 => Pending::Internal,
                        2 => Pending::Sync,
                        3 => Pending::Parse { swallow: true, undo: None },
                        4 => Pending::Parse { swallow: false, undo: None },
                        5 => Pending::Bind,
                        6 => Pending::Describe,
                        7 => Pending::Close,
                        8 => Pending::Execute,
                        9 => Pending::Synth { frame: empty_frame(b'1'), undo: None },
                        10 => Pending::InternalSync,
                        _ => Pending::Error(Box::new(PgError::new("XX000", "x"))),
                    });
                    r.drain_local(&mut out);
                } else {
                    let tag = b"Z12E3tTnCDGsA"[k as usize];
                    r.on_frame(&f(tag), &mut out);
                }
            }
            let _ = tags(&out); // parses back into whole frames
        }
    }

    #[test]
    fn a_local_sync_ends_a_local_skip() {
        let mut r = Relay::default();
        let mut out = BytesMut::new();
        r.push(Pending::Error(Box::new(PgError::new("0A000", "no"))));
        r.drain_local(&mut out);
        assert!(r.skipping);
        r.sync_local();
        let undo = Undo {
            client_name: Some(Bytes::from_static(b"s2")),
            global: None,
            stale: false,
        };
        r.push(Pending::Parse {
            swallow: false,
            undo: Some(undo),
        });
        assert!(r.undo.is_empty(), "the next batch's Parse is not skipped");
        assert_eq!(r.queue.len(), 1);
    }

    #[test]
    fn internal_queries_are_invisible() {
        let mut r = Relay::default();
        let mut out = BytesMut::new();
        r.push(Pending::Internal);
        r.push(Pending::Query);
        for t in [b'S', b'C', b'Z', b'T', b'D', b'C', b'Z'] {
            r.on_frame(&f(t), &mut out);
        }
        assert_eq!(tags(&out), "TDCZ");
    }
}

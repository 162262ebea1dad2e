//! Savepoints and settings kept in step over the shards of a transaction: each is run on
//! the parked participants when the client issues it, and recorded, in order, for shards
//! that join later (run right after their BEGIN). ROLLBACK TO SAVEPOINT undoes the settings
//! made since, as on a server.

use super::{Session, SessionError};
use crate::protocol::{self, PgError};
use crate::router::lexer::leading_words;

/// What a shard joining the transaction runs after BEGIN.
#[derive(Debug, Clone)]
pub(super) enum Replay {
    Savepoint(String),
    /// A `SET` or `RESET` statement, as the client wrote it.
    Set(String),
    /// A setting bound in the extended protocol (`SELECT set_config($1, $2, true)`):
    /// Parse, Bind (the client's parameters, in their formats), Execute and Sync.
    Bound(bytes::Bytes),
}

impl Replay {
    /// Writes the messages that replay this step on a server; one ReadyForQuery ends
    /// their answer.
    pub(super) fn write(&self, out: &mut bytes::BytesMut) {
        match self {
            Replay::Savepoint(sp) => {
                protocol::write_query(out, &format!("SAVEPOINT {}", crate::sql::quote_ident(sp)))
            }
            Replay::Set(sql) => protocol::write_query(out, sql),
            Replay::Bound(req) => out.extend_from_slice(req),
        }
    }
}

/// A bound setting's replay: the statement parsed and bound unnamed, as the client bound it.
pub(super) fn bound_request(query: &[u8], types: &[u8], bind_rest: &[u8]) -> bytes::Bytes {
    let mut out = bytes::BytesMut::new();
    protocol::write_parse(&mut out, b"", query, types);
    protocol::write_bind(&mut out, b"", b"", bind_rest);
    protocol::write_msg(&mut out, b'E', &[0, 0, 0, 0, 0]);
    protocol::write_msg(&mut out, b'S', &[]);
    out.freeze()
}

/// Whether a statement only changes settings: a `SET`/`RESET`, or a `SELECT` of
/// `set_config(...)` calls alone. Each shard of the transaction must run it.
pub(super) fn is_setting(sql: &str) -> bool {
    sets_parameter(sql) || crate::router::lexer::sets_config_only(sql)
}

/// Whether a statement is a `SET` (of any kind: a parameter, LOCAL, TRANSACTION,
/// CONSTRAINTS, SESSION CHARACTERISTICS) or a `RESET`.
fn sets_parameter(sql: &str) -> bool {
    let ([first], _) = leading_words::<1>(sql);
    first.eq_ignore_ascii_case("set") || first.eq_ignore_ascii_case("reset")
}

/// A savepoint statement: (kind, name).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum SavepointOp {
    Create,
    Release,
    RollbackTo,
}

/// The savepoint statement `sql` is, if any, with the savepoint's name as the server
/// knows it (folded to lower case unless quoted). Comments may come anywhere.
pub(super) fn savepoint_op(sql: &str) -> Option<(SavepointOp, String)> {
    let (words, n) = leading_words::<5>(sql);
    // Keywords compare in lower case; the name keeps its case until `ident` folds it.
    let lower: Vec<String> = words[..n]
        .iter()
        .map(|w| {
            if w.starts_with('"') {
                w.to_string()
            } else {
                w.to_ascii_lowercase()
            }
        })
        .collect();
    let w: Vec<&str> = lower.iter().map(String::as_str).collect();
    let ident = |n: &str| match n.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        Some(q) => q.replace("\"\"", "\""),
        None => n.to_string(),
    };
    let name = |rest: &[&str]| -> Option<String> {
        match rest {
            ["savepoint", n] | [n] => Some(ident(n)),
            _ => None,
        }
    };
    match w.as_slice() {
        ["savepoint", n] => Some((SavepointOp::Create, ident(n))),
        ["release", rest @ ..] => name(rest).map(|n| (SavepointOp::Release, n)),
        ["rollback" | "abort", "to", rest @ ..] => name(rest).map(|n| (SavepointOp::RollbackTo, n)),
        [
            "rollback" | "abort",
            "transaction" | "work",
            "to",
            rest @ ..,
        ] => name(rest).map(|n| (SavepointOp::RollbackTo, n)),
        _ => None,
    }
}

/// Records a savepoint statement in a transaction's replay.
fn note_savepoint(replay: &mut Vec<Replay>, op: SavepointOp, name: String) {
    let at = |r: &[Replay]| {
        r.iter()
            .rposition(|x| matches!(x, Replay::Savepoint(n) if *n == name))
    };
    match op {
        SavepointOp::Create => replay.push(Replay::Savepoint(name)),
        SavepointOp::Release => {
            // The savepoint and those after it go; what was set since stays.
            if let Some(i) = at(replay) {
                let mut k = 0;
                replay.retain(|x| {
                    k += 1;
                    k <= i || matches!(x, Replay::Set(_) | Replay::Bound(_))
                });
            }
        }
        SavepointOp::RollbackTo => {
            // Settings made since are undone, like everything else.
            if let Some(i) = at(replay) {
                replay.truncate(i + 1);
            }
        }
    }
}

impl Session {
    /// A query string that begins a transaction and goes to one shard as it is
    /// (`BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL app.tenant = 't1'`, as
    /// multi-tenant applications start): its BEGIN and the settings and savepoints after
    /// it are recorded as if they had come one by one, so that shards joining the
    /// transaction later begin it alike. (They used to begin with a plain BEGIN and
    /// without the settings.)
    pub(super) fn note_transaction_string(&mut self, statements: &[&str]) {
        use crate::router::StatementKind::{Begin, EndTransaction};
        let Some(at) = statements
            .iter()
            .position(|st| crate::router::classify(st) == Begin)
        else {
            return;
        };
        self.multi.begin = Some(statements[at].trim_end_matches(';').to_string());
        self.multi.replay.clear();
        for st in &statements[at + 1..] {
            if crate::router::classify(st) == EndTransaction {
                // The transaction ends within the string (its ReadyForQuery clears the
                // rest).
                return;
            }
            if is_setting(st) {
                let sql = st.trim().trim_end_matches(';').to_string();
                self.multi.replay.push(Replay::Set(sql));
            } else if let Some((op, name)) = savepoint_op(st) {
                note_savepoint(&mut self.multi.replay, op, name);
            }
        }
    }

    /// Keeps savepoints and settings in step over the shards of the transaction:
    /// recorded for shards that join later, and run on the parked participants now. False
    /// when a participant failed (the client got the error and the transaction is
    /// aborted).
    pub(super) async fn keep_in_step(&mut self, sql: &str) -> Result<bool, SessionError> {
        match self.keep_in_step_quiet(sql).await? {
            None => Ok(true),
            Some(e) => {
                self.status = b'E';
                self.answer_error(e);
                Ok(false)
            }
        }
    }

    /// As [`Session::keep_in_step`], returning the error instead of answering it (the
    /// extended protocol answers it in its batch).
    pub(super) async fn keep_in_step_quiet(
        &mut self,
        sql: &str,
    ) -> Result<Option<PgError>, SessionError> {
        if is_setting(sql) {
            let sql = sql.trim().trim_end_matches(';').to_string();
            return self.keep_setting_in_step(Replay::Set(sql)).await;
        }
        // Most statements in a transaction are none of these: no allocation for them.
        let ([first], _) = leading_words::<1>(sql);
        if !["savepoint", "release", "rollback", "abort"]
            .iter()
            .any(|k| first.eq_ignore_ascii_case(k))
        {
            return Ok(None);
        }
        let Some((op, name)) = savepoint_op(sql) else {
            return Ok(None);
        };
        note_savepoint(&mut self.multi.replay, op, name);
        let mut req = bytes::BytesMut::new();
        protocol::write_query(&mut req, sql);
        self.run_on_parked(&req, "savepoint").await
    }

    /// A setting in a transaction: recorded for shards that join later, and run on the
    /// parked participants now; the error when one of them failed.
    pub(super) async fn keep_setting_in_step(
        &mut self,
        step: Replay,
    ) -> Result<Option<PgError>, SessionError> {
        if self.status != b'T' {
            // It fails where it runs, as the transaction is aborted.
            return Ok(None);
        }
        let mut req = bytes::BytesMut::new();
        step.write(&mut req);
        self.multi.replay.push(step);
        self.run_on_parked(&req, "setting").await
    }

    /// Runs a request (up to its ReadyForQuery) on every parked participant; the error
    /// when one failed.
    async fn run_on_parked(
        &mut self,
        req: &[u8],
        what: &str,
    ) -> Result<Option<PgError>, SessionError> {
        for (s, b) in self.multi.parked.iter_mut() {
            let why =
                match super::multi::send_and_collect(b, req, crate::exec::MergeLimit::NONE).await {
                    Ok((frames, _)) => match frames.iter().find(|f| f[0] == b'E') {
                        None => continue,
                        Some(f) => {
                            let (code, msg) = protocol::error_fields(f);
                            format!("{code}: {msg}")
                        }
                    },
                    Err(e) => {
                        b.broken = true;
                        e.to_string()
                    }
                };
            return Ok(Some(PgError::new(
                "25P02",
                format!("{what} failed on shard {s} of this transaction ({why})"),
            )));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn savepoint_statements() {
        assert_eq!(
            savepoint_op("SAVEPOINT a"),
            Some((SavepointOp::Create, "a".into()))
        );
        assert_eq!(
            savepoint_op("release savepoint a;"),
            Some((SavepointOp::Release, "a".into()))
        );
        assert_eq!(
            savepoint_op("RELEASE a"),
            Some((SavepointOp::Release, "a".into()))
        );
        assert_eq!(
            savepoint_op("ROLLBACK TO SAVEPOINT a"),
            Some((SavepointOp::RollbackTo, "a".into()))
        );
        assert_eq!(
            savepoint_op("rollback work to a"),
            Some((SavepointOp::RollbackTo, "a".into()))
        );
        assert_eq!(savepoint_op("ROLLBACK"), None);
        assert_eq!(savepoint_op("SELECT 1"), None);
        // The server folds unquoted names and keeps quoted ones as written.
        assert_eq!(
            savepoint_op("/* app */ SAVEPOINT Sp1"),
            Some((SavepointOp::Create, "sp1".into()))
        );
        assert_eq!(
            savepoint_op("-- retry\nROLLBACK TO SAVEPOINT \"My \"\"Sp\"\"\";"),
            Some((SavepointOp::RollbackTo, "My \"Sp\"".into()))
        );
    }

    #[test]
    fn settings_after_comments() {
        assert!(sets_parameter("/* sqlcommenter */ SET search_path = x"));
        assert!(sets_parameter("-- c\nreset all"));
        assert!(!sets_parameter("SELECT 'SET x'"));
        assert!(!sets_parameter("/* SET */ SELECT 1"));
    }
}

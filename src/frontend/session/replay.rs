//! Savepoints and settings kept in step over the shards of a transaction: each is run on
//! the parked participants when the client issues it, and recorded, in order, for shards
//! that join later (run right after their BEGIN). ROLLBACK TO SAVEPOINT undoes the settings
//! made since, as on a server.

use super::{Session, SessionError};
use crate::protocol::PgError;
use crate::router::lexer::leading_words;

/// What a shard joining the transaction runs after BEGIN.
#[derive(Debug, Clone)]
pub(super) enum Replay {
    Savepoint(String),
    /// A `SET` or `RESET` statement, as the client wrote it.
    Set(String),
}

/// Whether a statement is a `SET` (of any kind: a parameter, LOCAL, TRANSACTION,
/// CONSTRAINTS, SESSION CHARACTERISTICS) or a `RESET`: each shard of the transaction must
/// run it. (`set_config()` is not followed: it comes inside a query.)
pub(super) fn sets_parameter(sql: &str) -> bool {
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

impl Session {
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
        if sets_parameter(sql) {
            if self.status != b'T' {
                // It fails where it runs, as the transaction is aborted.
                return Ok(None);
            }
            let sql = sql.trim().trim_end_matches(';').to_string();
            self.multi.replay.push(Replay::Set(sql.clone()));
            return self.run_on_parked(&sql, "setting").await;
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
        let at = |r: &[Replay]| {
            r.iter()
                .rposition(|x| matches!(x, Replay::Savepoint(n) if *n == name))
        };
        match op {
            SavepointOp::Create => self.multi.replay.push(Replay::Savepoint(name)),
            SavepointOp::Release => {
                // The savepoint and those after it go; what was set since stays.
                if let Some(i) = at(&self.multi.replay) {
                    let mut k = 0;
                    self.multi.replay.retain(|x| {
                        k += 1;
                        k <= i || matches!(x, Replay::Set(_))
                    });
                }
            }
            SavepointOp::RollbackTo => {
                // Settings made since are undone, like everything else.
                if let Some(i) = at(&self.multi.replay) {
                    self.multi.replay.truncate(i + 1);
                }
            }
        }
        self.run_on_parked(sql, "savepoint").await
    }

    /// Runs a statement on every parked participant; the error when one failed.
    async fn run_on_parked(
        &mut self,
        sql: &str,
        what: &str,
    ) -> Result<Option<PgError>, SessionError> {
        for (s, b) in self.multi.parked.iter_mut() {
            let why = match b.run_quiet(sql).await {
                Ok(None) => continue,
                Ok(Some((code, msg))) => format!("{code}: {msg}"),
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

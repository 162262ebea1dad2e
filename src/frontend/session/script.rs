//! A simple Query string of several statements that need several shards, or that has
//! LISTEN or UNLISTEN (which pgshard answers in transaction pooling mode): each statement
//! is routed on its own, with PostgreSQL's semantics for such strings. The string is one
//! implicit transaction unless it has its own BEGIN (then its COMMIT or ROLLBACK, if any,
//! must end it); after an error the rest of the string is skipped and, in an implicit
//! transaction, what the string did is rolled back on every shard it touched.

use super::route::Dest;
use super::{Session, SessionError};
use crate::config::PoolMode;
use crate::protocol::{self, PgError};
use crate::router::{self, Params, StatementKind};
use bytes::BytesMut;

impl Session {
    pub(super) async fn run_script(&mut self, sql: &str) -> Result<(), SessionError> {
        let statements = router::split_statements(sql);
        let kinds: Vec<StatementKind> = statements.iter().map(|s| router::classify(s)).collect();
        let explicit_begin = kinds.first() == Some(&StatementKind::Begin);
        let explicit_end = kinds.len() > 1 && kinds.last() == Some(&StatementKind::EndTransaction);
        let inner = &kinds[usize::from(explicit_begin)..kinds.len() - usize::from(explicit_end)];
        let control_inside = inner
            .iter()
            .any(|k| matches!(k, StatementKind::Begin | StatementKind::EndTransaction))
            || statements
                .iter()
                .any(|s| super::replay::savepoint_op(s).is_some());
        if self.mode != PoolMode::Transaction
            || self.status == b'E'
            || self.in_batch
            || control_inside
            || (explicit_begin && self.status != b'I')
        {
            self.answer_error(
                PgError::new(
                    "0A000",
                    "pgshard runs this query string's statements one by one (they need several shards, or LISTEN is among them), which it does only in transaction pooling mode, outside a failed transaction, with BEGIN first and COMMIT/ROLLBACK last if at all (no savepoints)",
                )
                .with_hint("Send the statements one by one."),
            );
            return Ok(());
        }
        self.settle().await?;
        let mut out = BytesMut::new();
        let implicit = self.status == b'I' && !explicit_begin;
        if self.status == b'I' {
            self.begin_implicit().await?;
            if explicit_begin {
                self.route.deferred_begin = Some(statements[0].to_string());
                protocol::write_complete(&mut out, "BEGIN");
            }
        }
        let body =
            &statements[usize::from(explicit_begin)..statements.len() - usize::from(explicit_end)];
        let sharded = self.db.router.is_sharded();
        for (&st, kind) in body.iter().zip(&kinds[usize::from(explicit_begin)..]) {
            if let (StatementKind::Prepare(name), true) = (kind, sharded) {
                if !self.prepare_in_script(name.clone(), st, &mut out).await? {
                    return Ok(());
                }
                if self.status == b'E' {
                    break;
                }
                continue;
            }
            if let (StatementKind::Deallocate(name), true) = (kind, sharded)
                && self.forget_routed(name)
            {
                protocol::write_complete(&mut out, "DEALLOCATE");
                continue;
            }
            // An EXECUTE of a statement pgshard keeps: the statement with its arguments.
            let executed;
            let st = match (kind, sharded) {
                (StatementKind::Execute(_), true) => match self.execute_routed(st) {
                    Some(Ok(text)) => {
                        executed = text;
                        executed.as_str()
                    }
                    Some(Err(e)) => {
                        e.write(&mut out);
                        self.status = b'E';
                        break;
                    }
                    None => st,
                },
                _ => st,
            };
            if matches!(kind, StatementKind::Listen | StatementKind::Unlisten) {
                // Pending until the string's transaction commits, as in PostgreSQL.
                match self.apply_listen(st).await {
                    Ok(tag) => protocol::write_complete(&mut out, tag),
                    Err(e) => {
                        e.write(&mut out);
                        self.status = b'E';
                        break;
                    }
                }
                continue;
            }
            if !self.route.portals.is_empty()
                && let Some(answer) = self.cursor_answer(st, true)
            {
                match answer {
                    Ok(frames) => out.extend_from_slice(&frames),
                    Err(e) => {
                        e.write(&mut out);
                        self.status = b'E';
                        break;
                    }
                }
                continue;
            }
            let dest = self.decide_async(st, &Params::default()).await;
            let frames = match dest {
                Err(e) => {
                    e.write(&mut out);
                    self.status = b'E';
                    break;
                }
                Ok(Dest::Shard(s)) => {
                    if !self.enter_shard(s).await? {
                        self.status = b'E';
                        break;
                    }
                    match self.run_here(st).await? {
                        Some(frames) => frames.iter().fold(BytesMut::new(), |mut b, f| {
                            b.extend_from_slice(f);
                            b
                        }),
                        // The client got the error; the session's transaction is gone.
                        None => return Ok(()),
                    }
                }
                Ok(Dest::Multi(shards, a)) => {
                    let plan = match self.multi_plan(&shards, &a) {
                        Ok(p) => p,
                        Err(e) => {
                            e.write(&mut out);
                            self.status = b'E';
                            break;
                        }
                    };
                    match self.multi_tx_out(st, &shards, &plan, &a, false).await? {
                        Some(f) => f,
                        None => return Ok(()),
                    }
                }
            };
            out.extend_from_slice(&frames);
            if self.status == b'E' {
                break;
            }
            // A SET or RESET (asyncpg's pool reset string ends with RESET ALL): on every
            // shard of the string's transaction, and the client's settings read at its
            // commit, so that its next server connection gets them.
            if super::replay::is_setting(st)
                && let Some(e) = self.keep_in_step_quiet(st).await?
            {
                e.write(&mut out);
                self.status = b'E';
                break;
            }
        }
        let failed = self.status == b'E';
        if implicit || (explicit_end && !failed) {
            let end = if failed {
                "ROLLBACK"
            } else if explicit_end {
                statements[statements.len() - 1]
            } else {
                "COMMIT"
            };
            match self.end_multi(end).await? {
                Ok(tag) if explicit_end => protocol::write_complete(&mut out, tag),
                Ok(_) => {}
                Err(frame) => out.extend_from_slice(&frame),
            }
            let params = self.ended_params();
            out.extend_from_slice(&params);
        }
        // An explicit transaction that failed stays open, aborted (as in PostgreSQL).
        self.relay.drain_local(&mut self.cout);
        self.cout.extend_from_slice(&out);
        protocol::write_ready(&mut self.cout, self.status);
        Ok(())
    }
}

//! Reads over several shards whose rows only concatenate (no ORDER BY, LIMIT, DISTINCT or
//! aggregate over them), in the simple protocol outside a transaction: each shard's rows
//! go to the client as they come, shard after shard, as bytes, instead of being held
//! until every shard has answered. Memory stays bounded whatever the table's size
//! (`max_merge_bytes` does not apply), and the first rows reach the client sooner. A
//! shard's error after another shard's rows ends the answer as an error in the middle of
//! a scan does on one server.

use super::{Session, SessionError};
use crate::exec::scatter::{Request, Sent};
use crate::protocol::{self, PgError};

/// Rows written to the client are flushed once this many bytes wait.
const FLUSH_AT: usize = 64 * 1024;

impl Session {
    /// Streams `sql`'s rows from `nodes` to the client, then its tag (not ReadyForQuery).
    pub(super) async fn stream_rows(
        &mut self,
        nodes: &[(usize, Option<usize>)],
        sql: &str,
        prelude: &str,
    ) -> Result<(), SessionError> {
        self.relay.drain_local(&mut self.cout);
        let sent = Sent::start(
            &self.db,
            nodes,
            Request::Simple(sql),
            Some(prelude),
            self.settings_fp,
        )
        .await;
        let mut sent = match sent {
            Ok(s) => s,
            Err(e) => {
                self.stream_error(e);
                return Ok(());
            }
        };
        let mut described = false;
        let mut rows: u64 = 0;
        for i in 0..sent.len() {
            loop {
                let f = match sent.next(i).await {
                    Ok(f) => f,
                    Err(e) => {
                        sent.abandon(i, false).await;
                        self.stream_error(e);
                        return Ok(());
                    }
                };
                match f[0] {
                    b'Z' => break,
                    b'T' if described => {}
                    b'T' => {
                        described = true;
                        self.cout.extend_from_slice(&f);
                    }
                    b'D' => {
                        rows += 1;
                        self.cout.extend_from_slice(&f);
                    }
                    // Each shard's tag: one for the whole answer below.
                    b'C' => {}
                    b'E' => {
                        // This shard's statement failed: the others' are not read.
                        self.cout.extend_from_slice(&f);
                        sent.abandon(i + 1, true).await;
                        // Up to this shard's ReadyForQuery, so that its connection goes
                        // back in step.
                        while let Ok(f) = sent.next(i).await {
                            if f[0] == b'Z' {
                                break;
                            }
                        }
                        return Ok(());
                    }
                    // Notices and the like, as they come.
                    _ => self.cout.extend_from_slice(&f),
                }
                if self.cout.len() >= FLUSH_AT {
                    // (Should the client be gone, dropping `sent` closes the connections
                    // still answering.)
                    self.flush_client().await?;
                }
            }
        }
        if !described {
            self.stream_error(PgError::new("XX000", "no row description from any shard"));
            return Ok(());
        }
        protocol::write_complete(&mut self.cout, &format!("SELECT {rows}"));
        Ok(())
    }

    fn stream_error(&mut self, e: PgError) {
        self.db.shards[self.home_shard()].stats.error(e.code);
        e.write(&mut self.cout);
    }
}

//! COPY ... TO STDOUT of a sharded table (or of a query over several shards that plain
//! concatenation answers): the shards' rows gathered one shard after the other, with the
//! CSV header from the first shard only, and in the binary format one header and one
//! trailer.

use super::copy::BATCH;
use super::{Session, SessionError};
use crate::pool::Pooled;
use crate::protocol::{self, PgError};
use crate::router::copy::{CopyStmt, Format};
use bytes::BytesMut;

/// What each shard's output has that the joined output must have once.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Joined {
    /// Nothing: rows only.
    Rows,
    /// The CSV header line.
    CsvHeader,
    /// The binary format's header and trailer.
    Binary,
}

impl Joined {
    pub(super) fn of(cs: &CopyStmt) -> Joined {
        match cs.format {
            Format::Binary => Joined::Binary,
            Format::Csv if cs.header => Joined::CsvHeader,
            _ => Joined::Rows,
        }
    }
}

impl Session {
    /// COPY ... TO STDOUT gathered from `shards`, one after the other.
    pub(super) async fn copy_out(
        &mut self,
        sql: &str,
        shards: Vec<usize>,
        joined: Joined,
        extended: bool,
    ) -> Result<(), SessionError> {
        let in_tx = self.status != b'I';
        if in_tx && (!self.can_run_in_transaction() || !self.enter_shards(&shards).await?) {
            if self.status == b'T' {
                let e = super::route::cross_shard_txn(self.shard, &shards);
                self.copy_error(e, extended);
            } else if !extended {
                protocol::write_ready(&mut self.cout, self.status);
            }
            return Ok(());
        }
        if !in_tx {
            self.settle().await?;
            self.detach().await;
        }
        let prelude = self.settings_sql();
        // The connections, held locally while rows stream to the client.
        let mut own: Vec<(usize, Pooled)> = if in_tx {
            self.take_participants()
        } else {
            Vec::new()
        };
        let mut total: u64 = 0;
        let mut started = false;
        let mut error = None;
        let mut failed_any = false;
        self.relay.drain_local(&mut self.cout);
        for (i, &s) in shards.iter().enumerate() {
            if !in_tx {
                match crate::exec::checkout_primary(&self.db, s).await {
                    Ok(mut b) => {
                        if b.settings != self.settings_fp {
                            if b.run_quiet(&prelude).await.is_err() {
                                b.broken = true;
                            }
                            b.settings = self.settings_fp;
                        }
                        own.push((s, b));
                    }
                    Err(e) => {
                        error = Some(PgError::new("08006", format!("shard {s} unavailable: {e}")));
                        break;
                    }
                }
            }
            let b: &mut Pooled = if in_tx {
                &mut own.iter_mut().find(|(p, _)| *p == s).expect("entered").1
            } else {
                &mut own.last_mut().expect("pushed").1
            };
            let mut q = BytesMut::new();
            protocol::write_query(&mut q, sql);
            if let Err(e) = b.send(&q).await {
                error = Some(PgError::new("08006", e.to_string()));
                break;
            }
            let mut first_row = true;
            let mut failed = false;
            // Binary: a shard's last CopyData ends with the trailer, which only the last
            // shard's keeps; so each waits for the next (or CopyDone).
            let mut held: Option<Vec<u8>> = None;
            let last = i + 1 == shards.len();
            loop {
                let f = match b.read_frame().await {
                    Ok(f) => f,
                    Err(e) => {
                        error = Some(PgError::new("08006", e.to_string()));
                        failed = true;
                        break;
                    }
                };
                match f[0] {
                    b'H' if !started => {
                        started = true;
                        self.cout.extend_from_slice(&f);
                    }
                    b'c' => {
                        if let Some(mut data) = held.take() {
                            if !last {
                                data.truncate(data.len().saturating_sub(2));
                            }
                            copy_data(&mut self.cout, &data);
                        }
                    }
                    b'H' => {}
                    b'd' if joined == Joined::Binary => {
                        let mut data = protocol::body(&f);
                        if i > 0 && first_row {
                            let n = crate::router::copy::binary_header_len(data).unwrap_or(0);
                            data = &data[n..];
                        }
                        if let Some(prev) = held.replace(data.to_vec()) {
                            copy_data(&mut self.cout, &prev);
                        }
                        first_row = false;
                    }
                    b'd' => {
                        if !(joined == Joined::CsvHeader && i > 0 && first_row) {
                            self.cout.extend_from_slice(&f);
                        }
                        first_row = false;
                    }
                    b'C' => {
                        let t = String::from_utf8_lossy(protocol::body(&f))
                            .trim_end_matches('\0')
                            .to_string();
                        total += t
                            .rsplit(' ')
                            .next()
                            .and_then(|n| n.parse().ok())
                            .unwrap_or(0);
                    }
                    b'E' => {
                        self.cout.extend_from_slice(&f);
                        failed = true;
                    }
                    b'Z' => break,
                    _ => self.cout.extend_from_slice(&f),
                }
                if self.cout.len() >= BATCH {
                    // Streamed: memory stays bounded.
                    self.flush_client().await?;
                }
            }
            if failed {
                failed_any = true;
                if in_tx {
                    self.status = b'E';
                }
                break;
            }
        }
        if in_tx {
            self.restore_participants(own);
        } else {
            drop(own);
        }
        match error {
            Some(e) => {
                if in_tx {
                    self.status = b'E';
                }
                e.write(&mut self.cout);
            }
            None if !failed_any => {
                protocol::write_msg(&mut self.cout, b'c', &[]);
                protocol::write_complete(&mut self.cout, &format!("COPY {total}"));
            }
            None => {}
        }
        if !extended {
            protocol::write_ready(&mut self.cout, self.status);
        }
        Ok(())
    }
}

/// A CopyData message, unless `data` is empty.
fn copy_data(out: &mut BytesMut, data: &[u8]) {
    if !data.is_empty() {
        protocol::write_msg(out, b'd', data);
    }
}

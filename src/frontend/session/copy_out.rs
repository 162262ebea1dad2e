//! COPY ... TO STDOUT of a sharded table (or of a query over several shards that plain
//! concatenation answers): the shards' rows gathered one shard after the other, with the
//! CSV header from the first shard only.

use super::copy::BATCH;
use super::{Session, SessionError};
use crate::pool::Pooled;
use crate::protocol::{self, PgError};
use bytes::BytesMut;

impl Session {
    /// COPY ... TO STDOUT gathered from `shards`, one after the other (`csv_header`: the
    /// header line comes from the first shard only).
    pub(super) async fn copy_out(
        &mut self,
        sql: &str,
        shards: Vec<usize>,
        csv_header: bool,
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
                    b'H' | b'c' => {}
                    b'd' => {
                        if !(csv_header && i > 0 && first_row) {
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
                protocol::write_msg(&mut self.cout, b'C', format!("COPY {total}\0").as_bytes());
            }
            None => {}
        }
        if !extended {
            protocol::write_ready(&mut self.cout, self.status);
        }
        Ok(())
    }
}

//! One connection to a PostgreSQL server: startup, authentication as the configured server
//! user (SCRAM-SHA-256, md5, cleartext or trust), and the per-connection state pgshard keeps
//! (prepared statements it holds, session parameters applied to it).

use crate::net::{ServerAddr, ServerRead, ServerWrite};
use crate::protocol::{self, ProtocolError};
use bytes::{BufMut, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::frontend;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Backend messages are bounded by PostgreSQL itself (1 GiB); this is only a sanity cap.
pub const MAX_BACKEND_MESSAGE: usize = 1 << 30;

/// A failure talking to a server.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("could not connect to server {addr}: {source}")]
    Connect {
        addr: ServerAddr,
        source: std::io::Error,
    },
    #[error("timed out connecting to server {0}")]
    ConnectTimeout(ServerAddr),
    #[error("server {addr} refused the connection: {code} {message}")]
    Refused {
        addr: ServerAddr,
        code: String,
        message: String,
    },
    #[error("server {addr} asked for authentication pgshard cannot do: {what}")]
    UnsupportedAuth { addr: ServerAddr, what: String },
    #[error("server {addr} asked for a password but none is configured for the server user")]
    NoPassword { addr: ServerAddr },
    #[error("protocol error from server {addr}: {source}")]
    Protocol {
        addr: ServerAddr,
        source: ProtocolError,
    },
    #[error("connection to server {addr} lost: {source}")]
    Io {
        addr: ServerAddr,
        source: std::io::Error,
    },
}

/// Where and as whom to connect.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendTarget {
    pub addr: ServerAddr,
    pub database: String,
    pub user: String,
    pub password: Option<String>,
    /// TLS towards the server (None: plain).
    pub tls: Option<std::sync::Arc<crate::net::TlsClient>>,
}

/// A live, authenticated server connection.
pub struct BackendConn {
    pub addr: ServerAddr,
    pub reader: ServerRead,
    pub writer: ServerWrite,
    /// Bytes read from the server and not yet handled.
    pub rbuf: BytesMut,
    /// The server's BackendKeyData, for forwarding cancel requests.
    pub pid: i32,
    pub secret: i32,
    /// ParameterStatus values the server reported at startup.
    pub initial_params: Vec<(String, String)>,
    /// The prepared statements pgshard made on this connection (transaction mode).
    pub prepared: ServerStatements,
    /// Fingerprint of the session settings applied on top of the server defaults.
    pub settings: u64,
    /// The ParameterStatus frames pgshard's own queries ([`BackendConn::run_quiet`])
    /// got since the connection was checked out: changes its client was not told of,
    /// such as a transaction's end on a participant pgshard commits (see
    /// `Session::end_multi`).
    pub reported: Vec<BytesMut>,
    /// Set when the connection's state is unknown: it must not be reused.
    pub broken: bool,
    pub created: Instant,
    /// The pool's epoch when the connection was opened: older connections are not reused
    /// (see `NodePool::invalidate`).
    pub epoch: u64,
}

impl BackendConn {
    /// Opens and authenticates a connection.
    pub async fn connect(
        target: &BackendTarget,
        timeout: Duration,
    ) -> Result<BackendConn, BackendError> {
        match tokio::time::timeout(timeout, Self::connect_inner(target)).await {
            Ok(r) => r,
            Err(_) => Err(BackendError::ConnectTimeout(target.addr.clone())),
        }
    }

    async fn connect_inner(t: &BackendTarget) -> Result<BackendConn, BackendError> {
        let addr = &t.addr;
        let (reader, writer) =
            addr.connect(t.tls.as_deref())
                .await
                .map_err(|source| BackendError::Connect {
                    addr: addr.clone(),
                    source,
                })?;
        let mut c = BackendConn {
            addr: addr.clone(),
            reader,
            writer,
            rbuf: BytesMut::with_capacity(16 * 1024),
            pid: 0,
            secret: 0,
            initial_params: Vec::new(),
            reported: Vec::new(),
            prepared: ServerStatements::default(),
            settings: 0,
            broken: false,
            epoch: 0,
            created: Instant::now(),
        };
        let mut out = BytesMut::new();
        frontend::startup_message(
            [
                ("user", t.user.as_str()),
                ("database", t.database.as_str()),
                ("application_name", "pgshard"),
            ],
            &mut out,
        )
        .map_err(|source| BackendError::Io {
            addr: addr.clone(),
            source,
        })?;
        c.send(&out).await?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let frame = c.read_frame().await?;
            match frame[0] {
                b'R' => {
                    let short = || BackendError::Protocol {
                        addr: addr.clone(),
                        source: ProtocolError::Malformed {
                            what: "Authentication",
                            detail: "too short".into(),
                        },
                    };
                    let code = frame.get(5..9).ok_or_else(short)?;
                    let code = i32::from_be_bytes([code[0], code[1], code[2], code[3]]);
                    let data = &frame[9..];
                    out.clear();
                    match code {
                        0 => continue,
                        3 => {
                            let pw = t
                                .password
                                .as_deref()
                                .ok_or_else(|| BackendError::NoPassword { addr: addr.clone() })?;
                            frontend::password_message(pw.as_bytes(), &mut out).map_err(
                                |source| BackendError::Io {
                                    addr: addr.clone(),
                                    source,
                                },
                            )?;
                        }
                        5 => {
                            let pw = t
                                .password
                                .as_deref()
                                .ok_or_else(|| BackendError::NoPassword { addr: addr.clone() })?;
                            let salt = data.get(..4).ok_or_else(short)?;
                            let salt = [salt[0], salt[1], salt[2], salt[3]];
                            let h = postgres_protocol::authentication::md5_hash(
                                t.user.as_bytes(),
                                pw.as_bytes(),
                                salt,
                            );
                            frontend::password_message(h.as_bytes(), &mut out).map_err(
                                |source| BackendError::Io {
                                    addr: addr.clone(),
                                    source,
                                },
                            )?;
                        }
                        10 => {
                            let pw = t
                                .password
                                .as_deref()
                                .ok_or_else(|| BackendError::NoPassword { addr: addr.clone() })?;
                            let mechs: Vec<&[u8]> =
                                data.split(|&b| b == 0).filter(|m| !m.is_empty()).collect();
                            if !mechs.contains(&SCRAM_SHA_256.as_bytes()) {
                                return Err(BackendError::UnsupportedAuth {
                                    addr: addr.clone(),
                                    what: format!(
                                        "SASL mechanisms {:?}",
                                        mechs
                                            .iter()
                                            .map(|m| String::from_utf8_lossy(m))
                                            .collect::<Vec<_>>()
                                    ),
                                });
                            }
                            let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                            frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut out)
                                .map_err(|source| BackendError::Io {
                                addr: addr.clone(),
                                source,
                            })?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().ok_or_else(|| BackendError::Protocol {
                                addr: addr.clone(),
                                source: ProtocolError::Malformed {
                                    what: "SASLContinue",
                                    detail: "without SASL start".into(),
                                },
                            })?;
                            s.update(data).map_err(|source| BackendError::Io {
                                addr: addr.clone(),
                                source,
                            })?;
                            frontend::sasl_response(s.message(), &mut out).map_err(|source| {
                                BackendError::Io {
                                    addr: addr.clone(),
                                    source,
                                }
                            })?;
                        }
                        12 => {
                            let s = scram.as_mut().ok_or_else(|| BackendError::Protocol {
                                addr: addr.clone(),
                                source: ProtocolError::Malformed {
                                    what: "SASLFinal",
                                    detail: "without SASL start".into(),
                                },
                            })?;
                            s.finish(data).map_err(|source| BackendError::Io {
                                addr: addr.clone(),
                                source,
                            })?;
                            continue;
                        }
                        other => {
                            return Err(BackendError::UnsupportedAuth {
                                addr: addr.clone(),
                                what: format!("authentication request code {other}"),
                            });
                        }
                    }
                    c.send(&out).await?;
                }
                b'S' => {
                    let mut b = protocol::body(&frame);
                    let k = protocol::read_cstr(&mut b, "ParameterStatus");
                    let v = protocol::read_cstr(&mut b, "ParameterStatus");
                    if let (Ok(k), Ok(v)) = (k, v) {
                        c.initial_params.push((k, v));
                    }
                }
                b'K' => {
                    let b = protocol::body(&frame);
                    if b.len() >= 8 {
                        c.pid = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                        c.secret = i32::from_be_bytes([b[4], b[5], b[6], b[7]]);
                    }
                }
                b'Z' => return Ok(c),
                b'E' => {
                    let (code, message) = protocol::error_fields(&frame);
                    return Err(BackendError::Refused {
                        addr: addr.clone(),
                        code,
                        message,
                    });
                }
                _ => {} // NoticeResponse and friends during startup are not interesting
            }
        }
    }

    /// Writes bytes to the server.
    pub async fn send(&mut self, data: &[u8]) -> Result<(), BackendError> {
        self.writer.write_all(data).await.map_err(|source| {
            self.broken = true;
            BackendError::Io {
                addr: self.addr.clone(),
                source,
            }
        })
    }

    /// Reads more bytes from the server into `rbuf`; an EOF is an error.
    pub async fn fill(&mut self) -> Result<(), BackendError> {
        match self.reader.read_buf(&mut self.rbuf).await {
            Ok(0) => {
                self.broken = true;
                Err(BackendError::Io {
                    addr: self.addr.clone(),
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                })
            }
            Ok(_) => Ok(()),
            Err(source) => {
                self.broken = true;
                Err(BackendError::Io {
                    addr: self.addr.clone(),
                    source,
                })
            }
        }
    }

    /// Whether the server closed the connection while it sat idle in the pool (a restart,
    /// `pg_terminate_backend`, `idle_session_timeout`); see `ServerRead::closed_while_idle`.
    pub fn closed_while_idle(&self) -> bool {
        self.reader.closed_while_idle()
    }

    /// The length of the next complete frame in `rbuf`, if any.
    pub fn next_frame_len(&mut self) -> Result<Option<usize>, BackendError> {
        protocol::frame_len(&self.rbuf, MAX_BACKEND_MESSAGE).map_err(|source| {
            self.broken = true;
            BackendError::Protocol {
                addr: self.addr.clone(),
                source,
            }
        })
    }

    /// Reads one whole frame (used outside the hot path: startup, resets).
    pub async fn read_frame(&mut self) -> Result<BytesMut, BackendError> {
        loop {
            if let Some(n) = self.next_frame_len()? {
                return Ok(self.rbuf.split_to(n));
            }
            self.fill().await?;
        }
    }

    /// Keeps a ParameterStatus frame of pgshard's own query (see `reported`): the latest
    /// of each parameter, so that a connection held long (session mode) keeps a few.
    pub fn note_reported(&mut self, f: BytesMut) {
        let name = parameter_name(&f);
        self.reported.retain(|g| parameter_name(g) != name);
        self.reported.push(f);
    }

    /// Runs a simple query whose results nobody needs; returns the server's error, if any,
    /// and the transaction status it ended with. Used for resets and replayed settings.
    pub async fn run_quiet(&mut self, sql: &str) -> Result<Option<(String, String)>, BackendError> {
        let mut out = BytesMut::with_capacity(sql.len() + 8);
        protocol::write_query(&mut out, sql);
        self.send(&out).await?;
        let mut err = None;
        loop {
            let f = self.read_frame().await?;
            match f[0] {
                b'E' => err = Some(protocol::error_fields(&f)),
                b'Z' => return Ok(err),
                b'S' => self.note_reported(f),
                // A COPY started by a reset query would be a bug of ours: give up on the
                // connection rather than guess.
                b'G' | b'H' | b'W' => {
                    self.broken = true;
                    return Err(BackendError::Protocol {
                        addr: self.addr.clone(),
                        source: ProtocolError::Malformed {
                            what: "reset",
                            detail: "unexpected COPY".into(),
                        },
                    });
                }
                _ => {}
            }
        }
    }

    /// Reads the frames of one response, up to (not including) ReadyForQuery.
    pub async fn read_until_ready(&mut self) -> Result<Vec<BytesMut>, BackendError> {
        let mut frames = Vec::new();
        loop {
            let f = self.read_frame().await?;
            if f[0] == b'Z' {
                return Ok(frames);
            }
            frames.push(f);
        }
    }

    /// Runs a simple query and returns its rows as text; used by pgshard's own queries.
    pub async fn query_rows(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, BackendError> {
        let mut out = BytesMut::with_capacity(sql.len() + 8);
        protocol::write_query(&mut out, sql);
        self.send(&out).await?;
        let mut rows = Vec::new();
        let mut err = None;
        loop {
            let f = self.read_frame().await?;
            match f[0] {
                b'D' => {
                    // A malformed row from the server is an error, not a panic.
                    let bad = || BackendError::Protocol {
                        addr: self.addr.clone(),
                        source: ProtocolError::Malformed {
                            what: "DataRow",
                            detail: "truncated".into(),
                        },
                    };
                    let b = protocol::body(&f);
                    let n = b.get(..2).ok_or_else(bad)?;
                    let n = u16::from_be_bytes([n[0], n[1]]) as usize;
                    let mut i = 2;
                    let mut row = Vec::with_capacity(n);
                    for _ in 0..n {
                        let len = b.get(i..i + 4).ok_or_else(bad)?;
                        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
                        i += 4;
                        if len < 0 {
                            row.push(None);
                        } else {
                            let v = b.get(i..i + len as usize).ok_or_else(bad)?;
                            row.push(Some(String::from_utf8_lossy(v).into_owned()));
                            i += len as usize;
                        }
                    }
                    rows.push(row);
                }
                b'E' => err = Some(protocol::error_fields(&f)),
                b'Z' => break,
                _ => {}
            }
        }
        match err {
            None => Ok(rows),
            Some((code, message)) => Err(BackendError::Refused {
                addr: self.addr.clone(),
                code,
                message,
            }),
        }
    }

    /// The statement running here answered with more than pgshard may hold: asks the
    /// server to cancel it and reads the rest of its answer up to ReadyForQuery without
    /// keeping it, so that the connection stays in step (and in the client's
    /// transaction). ReadyForQuery's transaction status.
    pub async fn discard_answer(&mut self) -> Result<u8, BackendError> {
        if let Err(e) = Self::cancel(&self.addr, self.pid, self.secret).await {
            tracing::debug!(error = %e, "cancel request failed; reading the answer to its end");
        }
        loop {
            let f = self.read_frame().await?;
            match f[0] {
                b'Z' => return Ok(f.get(5).copied().unwrap_or(b'I')),
                // Nothing to read to its end: out of step for good.
                b'G' | b'H' | b'W' => {
                    self.broken = true;
                    return Err(BackendError::Protocol {
                        addr: self.addr.clone(),
                        source: ProtocolError::Malformed {
                            what: "backend",
                            detail: "unexpected COPY in an answer being discarded".into(),
                        },
                    });
                }
                _ => {}
            }
        }
    }

    /// Sends a CancelRequest for this connection's running query.
    pub async fn cancel(addr: &ServerAddr, pid: i32, secret: i32) -> std::io::Result<()> {
        // Plain, as libpq: servers take cancel requests without TLS.
        let (mut r, mut w) = addr.connect(None).await?;
        let mut b = BytesMut::with_capacity(16);
        b.put_i32(16);
        b.put_i32(protocol::CANCEL_REQUEST);
        b.put_i32(pid);
        b.put_i32(secret);
        w.write_all(&b).await?;
        // The server closes the connection when it has handled the request.
        let mut sink = [0u8; 1];
        let _ = tokio::time::timeout(Duration::from_secs(5), r.read(&mut sink)).await;
        Ok(())
    }
}

/// The statements pgshard prepared on one server connection, by their global identity
/// (`pgshard_<16 hex digits>` on the server), with the order of their last use: a server
/// connection keeps at most so many, the least recently used going first.
#[derive(Debug, Default)]
pub struct ServerStatements {
    last_use: HashMap<u64, u64>,
    clock: u64,
    /// Statements whose cached plan the server refused ("cached plan must not change
    /// result type", after DDL): the server still holds them under their name, which must
    /// be closed before they are prepared again.
    stale: Vec<u64>,
}

impl ServerStatements {
    /// Whether the server holds `global` (and marks it used).
    pub fn contains(&mut self, global: &u64) -> bool {
        self.clock += 1;
        match self.last_use.get_mut(global) {
            Some(t) => {
                *t = self.clock;
                true
            }
            None => false,
        }
    }

    /// Records that `global` is being prepared. Returns the statements to close first:
    /// a stale copy of `global` itself, and the least recently used one past `limit`.
    pub fn insert(&mut self, global: u64, limit: usize) -> [Option<u64>; 2] {
        self.clock += 1;
        let mut close = [None, None];
        if let Some(i) = self.stale.iter().position(|&g| g == global) {
            self.stale.swap_remove(i);
            close[0] = Some(global);
        }
        if self.last_use.len() >= limit.max(1)
            && let Some((&old, _)) = self.last_use.iter().min_by_key(|(_, t)| **t)
        {
            self.last_use.remove(&old);
            close[1] = Some(old);
        }
        self.last_use.insert(global, self.clock);
        close
    }

    /// The server does not hold `global` after all (its Parse failed or was skipped).
    pub fn remove(&mut self, global: &u64) {
        self.last_use.remove(global);
    }

    /// The server holds `global` but pgshard will not use it as it is (the server refused
    /// its cached plan, or a Close of it was skipped): close it before preparing it again.
    pub fn mark_stale(&mut self, global: u64) {
        self.last_use.remove(&global);
        if !self.stale.contains(&global) {
            self.stale.push(global);
        }
    }

    /// Whether the server refused `global`'s cached plan since it was last prepared.
    pub fn is_stale(&self, global: u64) -> bool {
        self.stale.contains(&global)
    }

    /// The server dropped every prepared statement (DISCARD ALL, DEALLOCATE ALL).
    pub fn clear(&mut self) {
        self.last_use.clear();
        self.stale.clear();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.last_use.len()
    }
}

/// The name a ParameterStatus frame reports.
pub fn parameter_name(f: &[u8]) -> &[u8] {
    let body = f.get(5..).unwrap_or_default();
    body.split(|&c| c == 0).next().unwrap_or_default()
}

#[cfg(test)]
mod statement_tests {
    use super::ServerStatements;

    #[test]
    fn least_recently_used_statement_goes_first() {
        let mut s = ServerStatements::default();
        assert_eq!(s.insert(1, 3), [None, None]);
        s.insert(2, 3);
        s.insert(3, 3);
        assert!(s.contains(&1));
        // 2 is now the least recently used.
        assert_eq!(s.insert(4, 3), [None, Some(2)]);
        assert!(!s.contains(&2));
        assert!(s.contains(&1) && s.contains(&3) && s.contains(&4));
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn a_stale_statement_is_closed_before_it_is_prepared_again() {
        let mut s = ServerStatements::default();
        s.insert(7, 10);
        s.mark_stale(7);
        assert!(!s.contains(&7));
        assert_eq!(s.insert(7, 10), [Some(7), None]);
        assert!(s.contains(&7));
        // Once.
        assert_eq!(s.insert(9, 10), [None, None]);
        s.mark_stale(9);
        s.mark_stale(9);
        assert_eq!(s.insert(9, 10), [Some(9), None]);
        assert_eq!(s.insert(8, 10), [None, None]);
    }
}

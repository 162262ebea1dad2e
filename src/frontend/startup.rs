//! The startup phase of a connection: SSL/GSS negotiation, cancel requests, the
//! StartupMessage, authentication (SCRAM-SHA-256, md5, trust) and the greeting, for
//! clients and for the admin console.

use super::auth::{self, ScramServer};
use super::{ClientReader, ClientWriter, Credential, Server, State};
use crate::protocol::{self, FirstPacket, PgError, ProtocolError};
use bytes::BytesMut;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What servers of the database report at startup (they all report the same), from a
/// pool that has connected once, or else from a first connection to the primary of the
/// default shard or, when that fails, to another node of it.
async fn greeting_params(
    db: &crate::cluster::Database,
) -> Result<Vec<(String, String)>, StartupError> {
    let shard = &db.shards[db.config.default_shard];
    if let Some(p) = shard.nodes.iter().find_map(|n| n.pool.server_params()) {
        return Ok(p.clone());
    }
    let primary = db.primary(db.config.default_shard).unwrap_or(0);
    let order = std::iter::once(primary).chain((0..shard.nodes.len()).filter(|&n| n != primary));
    let mut last = None;
    for n in order {
        let pool = &shard.nodes[n].pool;
        match pool.get().await {
            Ok(_) => return Ok(pool.server_params().cloned().unwrap_or_default()),
            Err(e) => last = Some(e),
        }
    }
    let e = match last {
        Some(e @ crate::pool::PoolError::Timeout(..)) => PgError::fatal("53300", e.to_string()),
        Some(crate::pool::PoolError::Down(m)) => {
            PgError::fatal("08006", format!("server unavailable: {m}"))
        }
        None => PgError::fatal("08006", "server unavailable"),
    };
    shard.stats.error(e.code);
    Err(StartupError::Client(e))
}

impl Server {
    /// The startup phase: SSL/GSS negotiation, cancel requests, StartupMessage, auth and
    /// the greeting up to (not including) BackendKeyData.
    pub(super) async fn startup(
        &self,
        state: &State,
        conn: &mut Conn,
        buf: &mut BytesMut,
        admin: bool,
    ) -> Result<Option<Ready>, StartupError> {
        // Startup packets are small; a huge length is an attack or garbage.
        const MAX_STARTUP: usize = 10_000;
        let mut negotiations = 0;
        let params = loop {
            let pkt = read_packet(conn, buf, |b| protocol::startup_len(b, MAX_STARTUP)).await?;
            match protocol::parse_first_packet(&pkt).map_err(protocol_fatal)? {
                FirstPacket::Ssl | FirstPacket::GssEnc if negotiations < 2 => {
                    negotiations += 1;
                    let is_ssl = matches!(protocol::parse_first_packet(&pkt), Ok(FirstPacket::Ssl));
                    if !buf.is_empty() {
                        // Bytes after an SSLRequest before the answer: a downgrade attempt.
                        return Err(StartupError::Client(PgError::fatal(
                            "08P01",
                            "received unencrypted data after SSL request",
                        )));
                    }
                    match (&state.tls, is_ssl, &*conn) {
                        (Some(acceptor), true, Conn::Plain(_)) => {
                            conn.write_all(b"S").await?;
                            let Conn::Plain(sock) = std::mem::replace(conn, Conn::Closed) else {
                                unreachable!()
                            };
                            let tls = acceptor.accept(sock).await?;
                            *conn = Conn::Tls(Box::new(tls));
                        }
                        _ => conn.write_all(b"N").await?,
                    }
                }
                FirstPacket::Ssl | FirstPacket::GssEnc => {
                    return Err(StartupError::Client(PgError::fatal(
                        "08P01",
                        "too many encryption negotiation requests",
                    )));
                }
                FirstPacket::Cancel { pid, secret } => {
                    if let Some((addr, bpid, bsecret)) = self.cancels.lookup(pid, secret) {
                        tracing::info!(server = %addr, "forwarding cancel request");
                        if let Err(e) =
                            crate::backend::BackendConn::cancel(&addr, bpid, bsecret).await
                        {
                            tracing::warn!(error = %e, "cancel request failed");
                        }
                    }
                    return Ok(None);
                }
                FirstPacket::Startup { params } => break params,
            }
        };
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let user = get("user").ok_or_else(|| {
            StartupError::Client(PgError::fatal(
                "28000",
                "no PostgreSQL user name specified in startup packet",
            ))
        })?;
        let database = get("database")
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| user.clone());
        tracing::Span::current().record("user", user.as_str());
        tracing::Span::current().record("database", database.as_str());
        if get("replication").is_some_and(|r| r != "false" && r != "0" && r != "off") {
            return Err(StartupError::Client(PgError::fatal(
                "0A000",
                "replication connections are not supported by pgshard",
            )));
        }
        let Some(cred) = state.users.get(&user) else {
            return Err(StartupError::Client(PgError::fatal(
                "28000",
                format!("role \"{user}\" does not exist"),
            )));
        };
        if admin {
            let allowed = state
                .config
                .admin
                .as_ref()
                .is_some_and(|a| a.users.contains(&user));
            if !allowed {
                return Err(StartupError::Client(PgError::fatal(
                    "28000",
                    format!("user \"{user}\" is not an admin user (admin.users)"),
                )));
            }
            if database != crate::admin::DATABASE {
                return Err(StartupError::Client(PgError::fatal(
                    "3D000",
                    format!(
                        "the admin console's database is \"{}\", not \"{database}\"",
                        crate::admin::DATABASE
                    ),
                )));
            }
            self.authenticate(conn, buf, &user, cred).await?;
            let mut out = BytesMut::new();
            protocol::write_auth(&mut out, 0, &[]);
            for (k, v) in crate::admin::console::GREETING {
                protocol::write_parameter_status(&mut out, k, v);
            }
            conn.write_all(&out).await?;
            return Ok(Some(Ready {
                db: None,
                settings: Vec::new(),
                user,
                database,
            }));
        }
        let Some(db) = state.topology.databases.get(&database).cloned() else {
            return Err(StartupError::Client(PgError::fatal(
                "3D000",
                format!("database \"{database}\" does not exist"),
            )));
        };
        self.authenticate(conn, buf, &user, cred).await?;

        // The greeting: the servers' parameters, overridden by what the client asked for.
        let server_params = greeting_params(&db).await?;
        let settings = client_settings(&params, &server_params);
        let mut out = BytesMut::new();
        protocol::write_auth(&mut out, 0, &[]);
        for (k, v) in &server_params {
            let v = settings
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(k))
                .map(|(_, v)| v)
                .unwrap_or(v);
            protocol::write_parameter_status(&mut out, k, v);
        }
        conn.write_all(&out).await?;
        Ok(Some(Ready {
            db: Some(db),
            settings,
            user,
            database,
        }))
    }

    async fn authenticate(
        &self,
        conn: &mut Conn,
        buf: &mut BytesMut,
        user: &str,
        cred: &Credential,
    ) -> Result<(), StartupError> {
        let failed = || {
            StartupError::Client(PgError::fatal(
                "28P01",
                format!("password authentication failed for user \"{user}\""),
            ))
        };
        let mut out = BytesMut::new();
        match cred {
            Credential::Trust => Ok(()),
            Credential::Md5(password) => {
                let salt: [u8; 4] = rand::random();
                protocol::write_auth(&mut out, 5, &salt);
                conn.write_all(&out).await?;
                let resp = read_password(conn, buf).await?;
                let expected = auth::md5_expected(user, password, salt);
                let got = resp.strip_suffix(&[0]).unwrap_or(&resp);
                if got == expected.as_bytes() {
                    Ok(())
                } else {
                    Err(failed())
                }
            }
            Credential::Scram(verifier) => {
                protocol::write_auth(&mut out, 10, b"SCRAM-SHA-256\0\0");
                conn.write_all(&out).await?;
                let init = read_password(conn, buf).await?;
                // SASLInitialResponse: mechanism, int32 length, data.
                let mut b = &init[..];
                let mech =
                    protocol::read_cstr(&mut b, "SASLInitialResponse").map_err(protocol_fatal)?;
                if mech != "SCRAM-SHA-256" {
                    return Err(StartupError::Client(PgError::fatal(
                        "28000",
                        format!(
                            "client selected an invalid SASL authentication mechanism {mech:?}"
                        ),
                    )));
                }
                if b.len() < 4 {
                    return Err(protocol_fatal(ProtocolError::Malformed {
                        what: "SASLInitialResponse",
                        detail: "missing length".into(),
                    }));
                }
                let data = &b[4..];
                let (server, first) = ScramServer::start(verifier, data)
                    .map_err(|e| StartupError::Client(PgError::fatal("08P01", e.to_string())))?;
                out.clear();
                protocol::write_auth(&mut out, 11, first.as_bytes());
                conn.write_all(&out).await?;
                let fin = read_password(conn, buf).await?;
                let server_final = match server.finish(&fin) {
                    Ok(f) => f,
                    Err(auth::ScramError::BadProof) => return Err(failed()),
                    Err(e) => {
                        return Err(StartupError::Client(PgError::fatal("08P01", e.to_string())));
                    }
                };
                out.clear();
                protocol::write_auth(&mut out, 12, server_final.as_bytes());
                conn.write_all(&out).await?;
                Ok(())
            }
        }
    }
}

/// The client's session settings: its startup parameters (and `-c` options) that differ
/// from what the servers report by default.
pub(super) fn client_settings(
    params: &[(String, String)],
    server: &[(String, String)],
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut add = |k: &str, v: &str| {
        let same = server
            .iter()
            .any(|(n, sv)| n.eq_ignore_ascii_case(k) && sv == v);
        if !same && !k.is_empty() {
            out.retain(|(n, _)| n != k);
            out.push((k.to_string(), v.to_string()));
        }
    };
    for (k, v) in params {
        match k.as_str() {
            "user" | "database" | "replication" => {}
            "options" => {
                // `-c name=value` or `--name=value`, separated by spaces.
                let mut it = v.split_whitespace();
                while let Some(tok) = it.next() {
                    let kv = if tok == "-c" {
                        it.next()
                    } else {
                        tok.strip_prefix("--").or_else(|| tok.strip_prefix("-c"))
                    };
                    if let Some((n, val)) = kv.and_then(|kv| kv.split_once('=')) {
                        add(&n.replace('-', "_"), val);
                    }
                }
            }
            _ if k.starts_with("_pq_.") => {}
            _ => add(k, v),
        }
    }
    out.sort();
    out
}

/// What startup hands to the session.
pub(super) struct Ready {
    /// None for the admin console.
    pub(super) db: Option<Arc<crate::cluster::Database>>,
    pub(super) settings: Vec<(String, String)>,
    pub(super) user: String,
    pub(super) database: String,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum StartupError {
    #[error("{0}")]
    Client(PgError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn protocol_fatal(e: ProtocolError) -> StartupError {
    match e {
        ProtocolError::Io(e) => StartupError::Io(e),
        ProtocolError::UnsupportedVersion { .. } => {
            StartupError::Client(PgError::fatal("0A000", e.to_string()))
        }
        e => StartupError::Client(PgError::fatal("08P01", e.to_string())),
    }
}

/// Reads one packet whose length `len_of` can tell.
async fn read_packet(
    conn: &mut Conn,
    buf: &mut BytesMut,
    len_of: impl Fn(&[u8]) -> Result<Option<usize>, ProtocolError>,
) -> Result<BytesMut, StartupError> {
    loop {
        if let Some(n) = len_of(buf).map_err(protocol_fatal)? {
            return Ok(buf.split_to(n));
        }
        if conn.read_buf(buf).await? == 0 {
            return Err(StartupError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

/// Reads a PasswordMessage-family ('p') frame and returns its body.
async fn read_password(conn: &mut Conn, buf: &mut BytesMut) -> Result<Vec<u8>, StartupError> {
    let f = read_packet(conn, buf, |b| protocol::frame_len(b, 10_000)).await?;
    if f[0] != b'p' {
        return Err(StartupError::Client(PgError::fatal(
            "08P01",
            format!("expected password response, got message type {}", f[0]),
        )));
    }
    Ok(protocol::body(&f).to_vec())
}

/// A client connection during startup.
pub(super) enum Conn {
    Plain(TcpStream),
    /// pgshard's Unix-domain socket: SSLRequest is answered 'N' there, as PostgreSQL does.
    Unix(tokio::net::UnixStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Closed,
}

impl Conn {
    pub(super) async fn read_buf(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read_buf(buf).await,
            Conn::Unix(s) => s.read_buf(buf).await,
            Conn::Tls(s) => s.read_buf(buf).await,
            Conn::Closed => Ok(0),
        }
    }
    pub(super) async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.write_all(data).await,
            Conn::Unix(s) => s.write_all(data).await,
            Conn::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Conn::Closed => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }
    pub(super) async fn shutdown(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.shutdown().await,
            Conn::Unix(s) => s.shutdown().await,
            Conn::Tls(s) => s.shutdown().await,
            Conn::Closed => Ok(()),
        }
    }
    pub(super) fn split(self) -> (ClientReader, ClientWriter) {
        match self {
            Conn::Plain(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Conn::Unix(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Conn::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (Box::new(r), Box::new(w))
            }
            Conn::Closed => unreachable!("split after close"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_parameters_become_settings() {
        let params = vec![
            ("user".into(), "app".into()),
            ("client_encoding".into(), "UTF8".into()),
            ("application_name".into(), "psql".into()),
            ("options".into(), "-c search_path=a,b --work-mem=8MB".into()),
        ];
        let server = vec![("client_encoding".into(), "UTF8".into())];
        let s = client_settings(&params, &server);
        assert_eq!(
            s,
            vec![
                ("application_name".to_string(), "psql".to_string()),
                ("search_path".to_string(), "a,b".to_string()),
                ("work_mem".to_string(), "8MB".to_string()),
            ]
        );
    }
}

//! Sockets: how pgshard reaches a server (TCP, or the server's Unix-domain socket when both
//! run on one host) and how clients reach pgshard (TCP, and a Unix-domain socket of its own
//! when `unix_socket_dir` is set, as PostgreSQL and PgBouncer offer).
//!
//! A Unix-domain socket skips the TCP/IP stack on both ends of a hop: on a database host,
//! that is most of what a proxy costs the machine per query (see the README's benchmarks).

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UnixListener, UnixStream, tcp, unix};
use tokio_rustls::client::TlsStream;

pub mod tls;
pub use tls::TlsClient;

/// The longest socket path the kernel takes (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Where a PostgreSQL server listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ServerAddr {
    Tcp(SocketAddr),
    /// A socket directory and port, written `dir:port` like `host:port`: the socket is
    /// `dir/.s.PGSQL.port`, the name libpq uses.
    Unix(Arc<UnixAddr>),
}

/// A server's Unix-domain socket: its directory and port.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct UnixAddr {
    pub dir: String,
    pub port: u16,
}

/// `dir/.s.PGSQL.port`, the socket file of a PostgreSQL-compatible server.
pub fn socket_path(dir: &str, port: u16) -> PathBuf {
    Path::new(dir).join(format!(".s.PGSQL.{port}"))
}

/// [`socket_path`], refused when the kernel would not take it.
pub fn check_socket_path(dir: &str, port: u16) -> Result<PathBuf, String> {
    let path = socket_path(dir, port);
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(format!(
            "the socket path {} is longer than the {MAX_SOCKET_PATH} bytes the kernel allows",
            path.display()
        ));
    }
    Ok(path)
}

impl ServerAddr {
    /// Parses `host:port` (numeric, or `localhost`) or `/socket/dir:port`.
    pub fn parse(s: &str) -> Result<ServerAddr, String> {
        if !s.starts_with('/') {
            return crate::config::parse_addr(s)
                .map(ServerAddr::Tcp)
                .map_err(|e| {
                    format!(
                        "{e}, or a Unix socket directory and port (e.g. /var/run/postgresql:5432)"
                    )
                });
        }
        let (dir, port) = s.rsplit_once(':').ok_or_else(|| {
            format!("'{s}' is a socket directory without a port: write it as {s}:5432")
        })?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| format!("'{port}' in '{s}' is not a port number"))?;
        let dir = match dir.trim_end_matches('/') {
            "" => "/",
            d => d,
        };
        check_socket_path(dir, port)?;
        Ok(ServerAddr::Unix(Arc::new(UnixAddr {
            dir: dir.to_string(),
            port,
        })))
    }

    /// The host as libpq and tokio-postgres take it: an IP address or a socket directory.
    pub fn host(&self) -> String {
        match self {
            ServerAddr::Tcp(a) => a.ip().to_string(),
            ServerAddr::Unix(u) => u.dir.clone(),
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            ServerAddr::Tcp(a) => a.port(),
            ServerAddr::Unix(u) => u.port,
        }
    }

    /// Opens a stream to the server, split into its two directions; over TCP with TLS
    /// as `tls` says (never on a Unix-domain socket, as libpq).
    pub async fn connect(&self, tls: Option<&TlsClient>) -> io::Result<(ServerRead, ServerWrite)> {
        match self {
            ServerAddr::Tcp(a) => {
                let mut s = TcpStream::connect(a).await?;
                refuse_self_connection(&s)?;
                // Requests and replies are small and latency-bound.
                let _ = s.set_nodelay(true);
                if let Some(t) = tls.filter(|t| t.mode != crate::config::ServerTlsMode::Disable) {
                    match t.negotiate(s, a.ip()).await? {
                        Ok(tls) => {
                            let fd = std::os::fd::AsRawFd::as_raw_fd(tls.get_ref().0);
                            let (r, w) = tokio::io::split(*tls);
                            return Ok((ServerRead::Tls(r, fd), ServerWrite::Tls(w)));
                        }
                        Err(plain) => s = plain,
                    }
                }
                let (r, w) = s.into_split();
                Ok((ServerRead::Tcp(r), ServerWrite::Tcp(w)))
            }
            ServerAddr::Unix(u) => {
                let (r, w) = UnixStream::connect(socket_path(&u.dir, u.port))
                    .await?
                    .into_split();
                Ok((ServerRead::Unix(r), ServerWrite::Unix(w)))
            }
        }
    }
}

/// Fails when a TCP connection reached itself. With nothing listening on a loopback port
/// in the ephemeral range, the kernel may pick that very port as the connection's source
/// and the handshake completes with itself (TCP simultaneous open): the startup message
/// would come back as the "server's" answer and the connection hang until the connect
/// timeout, where a down server must fail at once.
fn refuse_self_connection(s: &TcpStream) -> io::Result<()> {
    if s.local_addr()? == s.peer_addr()? {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "connection refused (nothing listens there: the connection reached itself)",
        ));
    }
    Ok(())
}

impl std::fmt::Display for ServerAddr {
    /// The form the configuration uses.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerAddr::Tcp(a) => a.fmt(f),
            ServerAddr::Unix(u) => write!(f, "{}:{}", u.dir, u.port),
        }
    }
}

/// The reading half of a server connection.
pub enum ServerRead {
    Tcp(tcp::OwnedReadHalf),
    Unix(unix::OwnedReadHalf),
    /// With the socket's descriptor (open as long as the stream is), to look at it
    /// beneath TLS.
    Tls(ReadHalf<TlsStream<TcpStream>>, std::os::fd::RawFd),
}

/// The writing half of a server connection.
pub enum ServerWrite {
    Tcp(tcp::OwnedWriteHalf),
    Unix(unix::OwnedWriteHalf),
    Tls(WriteHalf<TlsStream<TcpStream>>),
}

impl ServerWrite {
    /// Writes what the socket takes now, without waiting. Not on TLS, where bytes must
    /// go through the session (the pool's close writes its Terminate from a task).
    pub fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        match self {
            ServerWrite::Tcp(w) => w.try_write(data),
            ServerWrite::Unix(w) => w.try_write(data),
            ServerWrite::Tls(_) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl ServerRead {
    /// Whether the peer closed an idle connection: its end of the socket is closed, or it
    /// sent something, which to an idle connection is its farewell (PostgreSQL's FATAL,
    /// TLS's close_notify). Over TCP and Unix sockets tokio answers from the readiness it
    /// last saw, so a socket with nothing to read costs no system call (what it reads is
    /// consumed: the connection is done with); through TLS a non-blocking peek beneath it.
    pub fn closed_while_idle(&self) -> bool {
        let mut probe = [0u8; 1];
        let r = match self {
            ServerRead::Tcp(r) => r.try_read(&mut probe),
            ServerRead::Unix(r) => r.try_read(&mut probe),
            ServerRead::Tls(_, fd) => {
                // SAFETY: `fd` is the stream's own socket, open while `self` is; `probe`
                // is one writable byte.
                let n = unsafe {
                    libc::recv(
                        *fd,
                        probe.as_mut_ptr().cast(),
                        1,
                        libc::MSG_PEEK | libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }
        };
        !matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

impl AsyncRead for ServerRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerRead::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            ServerRead::Unix(r) => Pin::new(r).poll_read(cx, buf),
            ServerRead::Tls(r, _) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerWrite::Tcp(w) => Pin::new(w).poll_write(cx, data),
            ServerWrite::Unix(w) => Pin::new(w).poll_write(cx, data),
            ServerWrite::Tls(w) => Pin::new(w).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerWrite::Tcp(w) => Pin::new(w).poll_flush(cx),
            ServerWrite::Unix(w) => Pin::new(w).poll_flush(cx),
            ServerWrite::Tls(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerWrite::Tcp(w) => Pin::new(w).poll_shutdown(cx),
            ServerWrite::Unix(w) => Pin::new(w).poll_shutdown(cx),
            ServerWrite::Tls(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

/// Where a client connected from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Tcp(SocketAddr),
    /// pgshard's Unix-domain socket.
    Local,
}

impl std::fmt::Display for Peer {
    /// As PostgreSQL logs it (`%h`): the address, or `[local]`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(a) => a.fmt(f),
            Peer::Local => f.write_str("[local]"),
        }
    }
}

/// pgshard's own Unix-domain socket `dir/.s.PGSQL.port`. The socket file is removed when
/// this is dropped.
pub struct LocalListener {
    listener: UnixListener,
    path: PathBuf,
}

impl LocalListener {
    /// Binds `dir/.s.PGSQL.port`, open to every local user as PostgreSQL's default
    /// `unix_socket_permissions` are (authentication still applies). A socket file left by
    /// a process that died is replaced; one that a live server answers on is not.
    pub fn bind(dir: &str, port: u16) -> io::Result<LocalListener> {
        let path = check_socket_path(dir, port).map_err(io::Error::other)?;
        match std::fs::symlink_metadata(&path) {
            Ok(m) if !m.file_type().is_socket() => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            Ok(_) => {
                if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("another server is listening on {}", path.display()),
                    ));
                }
                std::fs::remove_file(&path)?;
            }
            Err(_) => {}
        }
        let std = std::os::unix::net::UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))?;
        std.set_nonblocking(true)?;
        Ok(LocalListener {
            listener: UnixListener::from_std(std)?,
            path,
        })
    }

    pub async fn accept(&self) -> io::Result<UnixStream> {
        self.listener.accept().await.map(|(s, _)| s)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LocalListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_that_reached_itself_is_refused() {
        // Made on purpose: a socket bound to a port connects to that same port.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let own = sock.local_addr().unwrap();
        let s = sock.connect(own).await.unwrap();
        let e = refuse_self_connection(&s).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        // An ordinary connection passes.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        refuse_self_connection(&c).unwrap();
    }

    #[test]
    fn server_addresses_parse_as_tcp_or_socket_directory() {
        assert_eq!(
            ServerAddr::parse("localhost:5433").unwrap(),
            ServerAddr::Tcp("127.0.0.1:5433".parse().unwrap())
        );
        let u = ServerAddr::parse("/var/run/postgresql/:5432").unwrap();
        assert_eq!(u.to_string(), "/var/run/postgresql:5432");
        assert_eq!((u.host().as_str(), u.port()), ("/var/run/postgresql", 5432));
        assert_eq!(
            ServerAddr::parse("/tmp:5432").unwrap(),
            ServerAddr::parse("/tmp:5432").unwrap()
        );
        for (bad, says) in [
            ("/var/run/postgresql", "without a port"),
            ("/tmp:0", "not a port number"),
            ("/tmp:x", "not a port number"),
            ("db.example.com:5432", "Unix socket directory"),
        ] {
            let e = ServerAddr::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let long = format!("/{}:5432", "d".repeat(100));
        assert!(
            ServerAddr::parse(&long)
                .unwrap_err()
                .contains("longer than")
        );
    }

    #[tokio::test]
    async fn local_listener_replaces_a_stale_socket_but_not_a_live_one() {
        let dir = std::env::temp_dir().join(format!("pgshard-net-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.to_str().unwrap();
        // A socket file whose process is gone.
        drop(std::os::unix::net::UnixListener::bind(socket_path(d, 7)).unwrap());
        let l = LocalListener::bind(d, 7).unwrap();
        let e = LocalListener::bind(d, 7).err().expect("in use");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        let path = l.path().to_path_buf();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o777);
        drop(l);
        assert!(!path.exists(), "removed when dropped");
        std::fs::write(socket_path(d, 8), b"not a socket").unwrap();
        assert!(LocalListener::bind(d, 8).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

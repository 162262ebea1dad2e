//! The client side: listener, TLS, startup, authentication, cancel requests; then a
//! [`session::Session`] per client.

pub mod auth;
mod cancel;
pub mod listen;
pub mod ops;
pub mod session;
mod startup;

pub use cancel::{CancelRegistry, CancelSlot};

use crate::cluster::Topology;
use crate::config::{AuthMethod, Config};
use crate::net::{LocalListener, Peer};
use crate::protocol::{self, PgError};
use arc_swap::ArcSwap;
use auth::ScramVerifier;
use bytes::BytesMut;
use startup::{Conn, StartupError};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

/// The reading half of a client connection (plain TCP or TLS).
pub type ClientReader = Box<dyn AsyncRead + Unpin + Send>;
/// The writing half of a client connection.
pub type ClientWriter = Box<dyn AsyncWrite + Unpin + Send>;

/// A user's credentials, prepared at load.
enum Credential {
    Scram(ScramVerifier),
    Md5(String),
    Trust,
}

/// Everything the frontend needs, built from one configuration.
pub struct State {
    pub config: Config,
    pub topology: Topology,
    users: HashMap<String, Credential>,
    tls: Option<TlsAcceptor>,
}

impl State {
    /// Builds the runtime state: pools, SCRAM verifiers, TLS acceptor.
    pub fn new(config: Config) -> anyhow::Result<State> {
        State::build(config, None)
    }

    /// Same, keeping what it can of a running topology (see [`Topology::build_from`]).
    pub fn build(config: Config, old: Option<&Topology>) -> anyhow::Result<State> {
        let users = config
            .users
            .iter()
            .map(|u| {
                let c = match (u.auth, &u.password) {
                    (AuthMethod::Trust, _) => Credential::Trust,
                    (AuthMethod::Md5, Some(p)) => Credential::Md5(p.clone()),
                    (AuthMethod::ScramSha256, Some(p)) if p.starts_with("SCRAM-SHA-256$") => {
                        Credential::Scram(ScramVerifier::parse(p).map_err(anyhow::Error::msg)?)
                    }
                    (AuthMethod::ScramSha256, Some(p)) => {
                        Credential::Scram(ScramVerifier::from_password(p))
                    }
                    (_, None) => unreachable!("validated at load"),
                };
                Ok((u.name.clone(), c))
            })
            .collect::<anyhow::Result<_>>()?;
        let tls = match &config.tls {
            Some(t) => Some(tls_acceptor(&t.cert, &t.key)?),
            None => None,
        };
        let server_tls = crate::net::TlsClient::new(&config.server_tls)
            .map_err(|(key, problem)| anyhow::anyhow!("{key}: {problem}"))?;
        Ok(State {
            topology: Topology::build_from(&config, old, Some(Arc::new(server_tls))),
            config,
            users,
            tls,
        })
    }
}

fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<TlsAcceptor> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| anyhow::anyhow!("tls.cert: cannot read {}: {e}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("tls.cert: {}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("tls.key: cannot read {}: {e}", key.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let cfg = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| anyhow::anyhow!("tls: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// The proxy: a listener and the state it serves from.
pub struct Server {
    pub state: ArcSwap<State>,
    pub cancels: CancelRegistry,
    /// LISTEN in transaction pooling mode: pgshard's listener connections.
    pub listeners: listen::Listeners,
    /// Set on shutdown: the listener stops.
    shutdown: tokio::sync::watch::Sender<bool>,
    sessions: std::sync::atomic::AtomicUsize,
    /// One stop signal per live session (a oneshot: polling it in the session loop costs
    /// atomics only, where a watch would lock per message). Touched at session start/end
    /// and at shutdown, never per message.
    stops: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<()>>>,
    next_session: std::sync::atomic::AtomicU64,
    /// Connected clients (touched at connect and disconnect only).
    clients: Mutex<HashMap<u64, Arc<ops::ClientInfo>>>,
    gates: Mutex<HashMap<String, Arc<ops::PauseGate>>>,
    config_path: Mutex<Option<std::path::PathBuf>>,
    generation: std::sync::atomic::AtomicU64,
    /// When pgshard started (for SHOW VERSION / uptime).
    pub started: std::time::SystemTime,
    /// The bound addresses of the admin console and the metrics endpoint.
    side_addrs: Mutex<(Option<SocketAddr>, Option<SocketAddr>)>,
}

/// Where clients connect.
enum Listener {
    Tcp(TcpListener),
    Local(LocalListener),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<(Conn, Peer)> {
        match self {
            Listener::Tcp(l) => {
                let (sock, peer) = l.accept().await?;
                // Requests and replies are small and latency-bound.
                let _ = sock.set_nodelay(true);
                Ok((Conn::Plain(sock), Peer::Tcp(peer)))
            }
            Listener::Local(l) => Ok((Conn::Unix(l.accept().await?), Peer::Local)),
        }
    }
}

/// pgshard's Unix-domain socket, when `unix_socket_dir` is set: named after the port the
/// TCP listener is bound to.
fn bind_local(config: &Config, port: u16) -> anyhow::Result<Option<LocalListener>> {
    let Some(dir) = &config.unix_socket_dir else {
        return Ok(None);
    };
    let l = LocalListener::bind(dir, port)
        .map_err(|e| anyhow::anyhow!("unix_socket_dir: cannot listen in {dir}: {e}"))?;
    tracing::info!(socket = %l.path().display(), "listening on a Unix-domain socket");
    Ok(Some(l))
}

/// Counts a client session while it lives.
struct SessionGuard<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Server {
    pub fn new(state: State) -> Arc<Server> {
        state.topology.start_monitors();
        Arc::new(Server {
            state: ArcSwap::from_pointee(state),
            cancels: CancelRegistry::default(),
            listeners: listen::Listeners::default(),
            shutdown: tokio::sync::watch::Sender::new(false),
            sessions: std::sync::atomic::AtomicUsize::new(0),
            stops: Mutex::new(HashMap::new()),
            next_session: std::sync::atomic::AtomicU64::new(0),
            clients: Mutex::new(HashMap::new()),
            gates: Mutex::new(HashMap::new()),
            config_path: Mutex::new(None),
            generation: std::sync::atomic::AtomicU64::new(0),
            started: std::time::SystemTime::now(),
            side_addrs: Mutex::new((None, None)),
        })
    }

    /// Starts a graceful shutdown: no new clients; sessions end when their transaction
    /// ends (idle ones at once).
    pub fn shut_down(&self) {
        self.shutdown.send_replace(true);
        for (_, stop) in self.stops.lock().expect("not poisoned").drain() {
            let _ = stop.send(());
        }
    }

    /// The stop signal of a new session; already fired when shutting down.
    fn register_stop(&self) -> (u64, tokio::sync::oneshot::Receiver<()>) {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut stops = self.stops.lock().expect("not poisoned");
        if *self.shutdown.borrow() {
            let _ = tx.send(());
        } else {
            stops.insert(id, tx);
        }
        (id, rx)
    }

    /// Where the admin console and the metrics endpoint listen, when configured.
    pub fn side_addrs(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        *self.side_addrs.lock().expect("not poisoned")
    }

    /// Client sessions alive now.
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Accepts clients until shutdown; then waits for the sessions to end, at most
    /// `limits.shutdown_timeout_ms`.
    /// Clients connect on `listener` and, when given, on pgshard's Unix-domain socket.
    pub async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        local: Option<LocalListener>,
    ) -> std::io::Result<()> {
        let local = local.map(|l| {
            let this = self.clone();
            // The socket file is removed when its loop ends, at shutdown.
            tokio::spawn(async move { this.accept_loop(Listener::Local(l), false).await })
        });
        self.accept_loop(Listener::Tcp(listener), false).await;
        if let Some(l) = local {
            let _ = l.await;
        }
        self.drain().await;
        Ok(())
    }

    /// Accepts admin console clients until shutdown.
    pub async fn run_admin(self: Arc<Self>, listener: TcpListener) {
        self.accept_loop(Listener::Tcp(listener), true).await;
    }

    async fn accept_loop(self: &Arc<Self>, listener: Listener, admin: bool) {
        let mut stop = self.shutdown.subscribe();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => break,
            };
            let (conn, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving the others.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let this = self.clone();
            let span = tracing::info_span!("client", %peer, admin, user = tracing::field::Empty, database = tracing::field::Empty);
            tokio::spawn(
                async move {
                    if let Err(e) = this.handle(conn, peer, admin).await {
                        tracing::info!(error = %e, "client session ended with an error");
                    }
                }
                .instrument(span),
            );
        }
    }

    /// After the listener stopped: waits for the sessions to end, at most
    /// `limits.shutdown_timeout_ms`.
    async fn drain(&self) {
        let timeout = Duration::from_millis(self.state.load().config.limits.shutdown_timeout_ms);
        tracing::info!(
            sessions = self.sessions(),
            "shutting down: waiting for transactions in flight"
        );
        let deadline = tokio::time::Instant::now() + timeout;
        while self.sessions() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.sessions() > 0 {
            tracing::warn!(
                sessions = self.sessions(),
                "shutdown timeout: closing the remaining sessions"
            );
        }
    }

    async fn handle(
        self: Arc<Self>,
        mut conn: Conn,
        peer: Peer,
        admin: bool,
    ) -> anyhow::Result<()> {
        self.sessions.fetch_add(1, Ordering::Relaxed);
        let _counted = SessionGuard(&self.sessions);
        let state = self.state.load_full();
        let startup_timeout = Duration::from_millis(state.config.limits.startup_timeout_ms);
        let mut buf = BytesMut::with_capacity(8 * 1024);
        let started = tokio::time::timeout(
            startup_timeout,
            self.startup(&state, &mut conn, &mut buf, admin),
        )
        .await;
        let ready = match started {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(StartupError::Client(e))) => {
                tracing::info!(code = e.code, message = %e.message, "startup refused");
                let mut out = BytesMut::new();
                e.write(&mut out);
                let _ = conn.write_all(&out).await;
                let _ = conn.shutdown().await;
                return Ok(());
            }
            Ok(Err(StartupError::Io(e))) => return Err(e.into()),
            Err(_) => {
                tracing::info!("startup timed out");
                let mut out = BytesMut::new();
                PgError::fatal("08P01", "canceling authentication due to timeout").write(&mut out);
                let _ = conn.write_all(&out).await;
                let _ = conn.shutdown().await;
                return Ok(());
            }
        };
        let Some(db) = ready.db else {
            drop(state);
            let (reader, writer) = conn.split();
            return crate::admin::console::run(self.clone(), reader, writer, buf).await;
        };
        let (_guard, key, slot) = self.cancels.register();
        let mut out = BytesMut::new();
        protocol::write_backend_key(&mut out, key.0, key.1);
        protocol::write_ready(&mut out, b'I');
        conn.write_all(&out).await?;
        let client_id = self.next_session.fetch_add(1, Ordering::Relaxed);
        self.add_client(
            client_id,
            Arc::new(ops::ClientInfo {
                peer,
                user: ready.user,
                database: ready.database.clone(),
                since: std::time::SystemTime::now(),
                slot: slot.clone(),
            }),
        );
        let (reader, writer) = conn.split();
        let gate = self.gate(&ready.database);
        let mut session = session::Session::new(
            db,
            state.config.pool.mode,
            state.config.limits.max_message_size,
            session::ClientIo {
                reader,
                writer,
                leftover: buf,
            },
            slot.clone(),
            ready.settings,
        );
        let (stop_id, stop) = self.register_stop();
        session.shutdown = Some(stop);
        session.cache = state.config.pool.statement_cache.clone();
        session.slow = Some(state.config.slow_query_ms)
            .filter(|&ms| ms > 0)
            .map(Duration::from_millis);
        session.ops = Some(session::Ops {
            server: self.clone(),
            database: ready.database,
            generation: self.generation(),
            gate,
        });
        drop(state);
        let result = crate::exec::scatter::CANCEL
            .scope(slot, session.run())
            .await;
        self.remove_client(client_id);
        self.stops.lock().expect("not poisoned").remove(&stop_id);
        result?;
        Ok(())
    }
}

/// Binds the listener and serves until the process ends.
///
/// SIGTERM or SIGINT starts a graceful shutdown (see [`Server::run`]); a second one exits
/// at once.
pub async fn serve(config: Config, config_path: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("listen: cannot bind {}: {e}", config.listen))?;
    let local = bind_local(&config, listener.local_addr()?.port())?;
    tracing::info!(listen = %config.listen, "pgshard ready");
    let admin = match &config.admin {
        Some(a) => Some(
            TcpListener::bind(&a.listen)
                .await
                .map_err(|e| anyhow::anyhow!("admin.listen: cannot bind {}: {e}", a.listen))?,
        ),
        None => None,
    };
    let metrics = match &config.metrics {
        Some(m) => Some(
            TcpListener::bind(&m.listen)
                .await
                .map_err(|e| anyhow::anyhow!("metrics.listen: cannot bind {}: {e}", m.listen))?,
        ),
        None => None,
    };
    let server = Server::new(State::new(config)?);
    if let Some(path) = config_path {
        server.set_config_path(path);
    }
    start_side_listeners(&server, admin, metrics);
    let reloads = server.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            match reloads.reload() {
                Ok(m) => tracing::info!(result = %m, "SIGHUP: configuration reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: configuration refused; the running one stays")
                }
            }
        }
    });
    let signals = server.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("signal received: graceful shutdown (a second signal exits at once)");
        signals.shut_down();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::warn!("second signal: exiting now");
        std::process::exit(1);
    });
    server.run(listener, local).await?;
    Ok(())
}

/// Starts the proxy on an already bound listener in the background (tests, demo), with
/// its admin console and metrics endpoint when configured (their ports may be 0: see
/// [`Server::side_addrs`]).
pub fn spawn(config: Config, listener: TcpListener) -> anyhow::Result<Arc<Server>> {
    let bind = |a: &str| -> anyhow::Result<TcpListener> {
        let l = std::net::TcpListener::bind(a)?;
        l.set_nonblocking(true)?;
        Ok(TcpListener::from_std(l)?)
    };
    let admin = config.admin.as_ref().map(|a| bind(&a.listen)).transpose()?;
    let metrics = config
        .metrics
        .as_ref()
        .map(|m| bind(&m.listen))
        .transpose()?;
    let local = bind_local(&config, listener.local_addr()?.port())?;
    let server = Server::new(State::new(config)?);
    start_side_listeners(&server, admin, metrics);
    tokio::spawn(server.clone().run(listener, local));
    Ok(server)
}

fn start_side_listeners(
    server: &Arc<Server>,
    admin: Option<TcpListener>,
    metrics: Option<TcpListener>,
) {
    let mut addrs = server.side_addrs.lock().expect("not poisoned");
    if let Some(l) = admin {
        addrs.0 = l.local_addr().ok();
        tokio::spawn(server.clone().run_admin(l));
    }
    if let Some(l) = metrics {
        addrs.1 = l.local_addr().ok();
        tokio::spawn(crate::admin::http::serve(server.clone(), l));
    }
}

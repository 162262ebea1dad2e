//! One client session after startup: reads the client's messages, attaches a server
//! connection when one is needed, forwards, and relays the server's answers.
//!
//! Both directions are read in one task with `select!`, so asynchronous server messages
//! (NotificationResponse, ParameterStatus, NoticeResponse) reach an idle client at once.
//! Everything read in one go is handled, and what it produced is written with one write per
//! direction: writes are batched until the peer would wait.

mod accounting;
mod batch;
mod copy;
mod copy_in;
mod copy_out;
mod cross;
mod cross_bind;
mod cursor;
mod extended;
mod insert_keys;
mod insert_select;
mod insert_unlisted;
mod io;
mod listen;
mod multi;
mod portal;
mod preeval;
mod prepared;
mod query;
mod replay;
mod replica;
mod route;
mod script;
mod server;
mod server_frames;
mod sorted_stream;
mod sql_prepare;
mod statement_cache;
mod stream;
mod switch;

use prepared::Stmt;

use super::{CancelSlot, ClientReader, ClientWriter};
use crate::cluster::Database;
use crate::config::PoolMode;
use crate::exec::{self, Event, Pending, Relay, Undo};
use crate::pool::{PoolError, Pooled};
use crate::protocol::{self, PgError, ProtocolError};
use crate::router::{self, StatementKind};
use crate::sql::quote_literal;
use bytes::{Buf, Bytes, BytesMut};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Why a session ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("client connection: {0}")]
    ClientIo(std::io::Error),
}

/// The client connection handed over by startup, with bytes already read past it.
pub struct ClientIo {
    pub reader: ClientReader,
    pub writer: ClientWriter,
    pub leftover: BytesMut,
}

/// What a session needs of the server it belongs to: the configuration it may move to
/// (after a reload) and its database's pause gate.
pub struct Ops {
    pub server: Arc<super::Server>,
    /// The client-facing database name.
    pub database: String,
    /// The configuration generation `db` comes from.
    pub generation: u64,
    pub gate: Arc<super::ops::PauseGate>,
}

/// Session state.
pub struct Session {
    pub db: Arc<Database>,
    pub mode: PoolMode,
    pub reader: ClientReader,
    pub writer: ClientWriter,
    pub max_message: usize,
    pub cancel: Arc<CancelSlot>,
    /// Session settings (name, value) the client expects on whatever server it uses.
    pub settings: Vec<(String, String)>,
    settings_fp: u64,
    settings_dirty: bool,
    /// The client's SQL-level prepared statements (transaction mode; any mode on a
    /// sharded database).
    sql: sql_prepare::SqlPrepared,
    crbuf: BytesMut,
    cout: BytesMut,
    bout: BytesMut,
    backend: Option<Pooled>,
    relay: Relay,
    /// Transaction status of the last ReadyForQuery the client saw.
    status: u8,
    /// Extended-protocol messages went to the server since the last Sync.
    in_batch: bool,
    /// A local error happened in an extended-protocol batch: discard until Sync.
    local_skip: bool,
    /// pgshard answered an error of its own in this extended-protocol batch: at the Sync
    /// the transaction fails on the attached server too (see [`Session::fail_batch`]).
    local_failed: bool,
    in_copy: bool,
    statements: HashMap<Bytes, Stmt>,
    client_eof: bool,
    /// The shard of the attached server connection.
    shard: usize,
    /// Becomes true when pgshard shuts down: the session ends at its next transaction
    /// boundary.
    pub shutdown: Option<tokio::sync::oneshot::Receiver<()>>,
    draining: bool,
    /// When the request in flight (a Query, or a batch up to Sync) reached the server.
    req_start: Option<std::time::Instant>,
    route: route::RouteState,
    reads: replica::ReadState,
    multi: multi::MultiState,
    pub ops: Option<Ops>,
    /// `slow_query_ms`: requests slower than this are logged, with their text.
    pub slow: Option<std::time::Duration>,
    slow_text: Option<Bytes>,
    /// LISTEN in transaction pooling mode: the session's channels and notifications.
    listen: Option<Box<crate::frontend::listen::Subscriber>>,
    listen_ext: listen::ListenStatements,
    /// `pool.statement_cache`: what pgshard prepares on the servers on its own.
    pub cache: crate::config::StatementCacheConfig,
    unnamed: statement_cache::Unnamed,
    auto: statement_cache::AutoPrepare,
    /// The session's `TimeZone`, as the servers last reported it: timestamp keys are read
    /// in it.
    zone: crate::sharding::Zone,
    /// A statement that may change the time zone was routed; until nothing is in flight
    /// the zone is not known.
    zone_pending: bool,
    /// The `application_name` the client was last told (see
    /// `server_frames::parameter_for_client`).
    app_name: Vec<u8>,
    /// What waits for the client is only what pgshard answered itself (a ParseComplete
    /// for a statement the server connection holds, named or unnamed), and the server
    /// will answer the rest of the batch: it goes out with that answer, in one write and
    /// one client wakeup.
    synth_only: bool,
}

/// The time zone a new session starts in: the one the client asked for at startup, or the
/// servers' default.
fn time_zone(db: &Database, settings: &[(String, String)]) -> crate::sharding::Zone {
    crate::sharding::Zone::new(greeted(db, settings, "TimeZone"))
}

/// The value of a parameter the client's greeting reported: the one it asked for at
/// startup, or the servers' ("" when unknown).
fn greeted<'a>(db: &'a Database, settings: &'a [(String, String)], name: &str) -> &'a str {
    let shard = &db.shards[db.config.default_shard];
    let defaults = shard.nodes.iter().find_map(|n| n.pool.server_params());
    settings
        .iter()
        .chain(defaults.into_iter().flatten())
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map_or("", |(_, v)| v.as_str())
}

/// Fingerprint of a settings list; 0 means "server defaults".
fn fingerprint(settings: &[(String, String)]) -> u64 {
    if settings.is_empty() {
        return 0;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    settings.hash(&mut h);
    h.finish() | 1
}

impl Session {
    pub fn new(
        db: Arc<Database>,
        mode: PoolMode,
        max_message: usize,
        client: ClientIo,
        cancel: Arc<CancelSlot>,
        mut settings: Vec<(String, String)>,
    ) -> Session {
        let ClientIo {
            reader,
            writer,
            leftover,
        } = client;
        settings.sort();
        let zone = time_zone(&db, &settings);
        let app_name = greeted(&db, &settings, "application_name")
            .as_bytes()
            .to_vec();
        Session {
            zone,
            app_name,
            zone_pending: false,
            db,
            mode,
            reader,
            writer,
            max_message,
            cancel,
            settings_fp: fingerprint(&settings),
            settings,
            settings_dirty: false,
            sql: Default::default(),
            crbuf: leftover,
            cout: BytesMut::with_capacity(16 * 1024),
            bout: BytesMut::with_capacity(16 * 1024),
            backend: None,
            relay: Relay::default(),
            status: b'I',
            in_batch: false,
            local_skip: false,
            local_failed: false,
            in_copy: false,
            statements: HashMap::new(),
            client_eof: false,
            shard: 0,
            shutdown: None,
            draining: false,
            req_start: None,
            route: route::RouteState::default(),
            reads: replica::ReadState::default(),
            multi: multi::MultiState::default(),
            ops: None,
            slow: None,
            slow_text: None,
            listen: None,
            listen_ext: listen::ListenStatements::default(),
            cache: crate::config::StatementCacheConfig::default(),
            unnamed: statement_cache::Unnamed::default(),
            auto: statement_cache::AutoPrepare::default(),
            synth_only: false,
        }
    }

    /// Runs the session until the client leaves.
    pub async fn run(&mut self) -> Result<(), SessionError> {
        let result = self.run_loop().await;
        if let Err(SessionError::Protocol(e)) = &result {
            // As PostgreSQL does: a FATAL error, then the connection closes.
            let mut out = BytesMut::new();
            PgError::fatal("08P01", e.to_string()).write(&mut out);
            let _ = self.writer.write_all(&out).await;
            let _ = self.writer.shutdown().await;
        }
        self.finish().await;
        result
    }

    async fn run_loop(&mut self) -> Result<(), SessionError> {
        loop {
            // Handle what the client already sent (also bytes that came with startup).
            if self.handle_client_frames().await? {
                return Ok(());
            }
            if let Err(e) = self.deliver_notifications() {
                return self.end_with(e).await;
            }
            self.flush().await?;
            if self.client_eof {
                return Ok(());
            }
            if self.draining && self.at_transaction_boundary() {
                // As PostgreSQL's fast shutdown, but only between transactions.
                return self
                    .end_with(PgError::fatal(
                        "57P01",
                        "terminating connection: pgshard is shutting down",
                    ))
                    .await;
            }
            // Shutdown matters only between transactions (sessions drain at the next
            // boundary): not watched while a request is in flight, which spares the
            // per-query wait a third future and its waker.
            let watch_stop = self.at_transaction_boundary();
            let Self {
                reader,
                crbuf,
                backend,
                shutdown,
                draining,
                listen,
                ..
            } = self;
            enum Got {
                Client(std::io::Result<usize>),
                Backend(Result<(), crate::backend::BackendError>),
                Shutdown,
                Notification,
            }
            // Only sessions that LISTEN (transaction mode) wait for notifications.
            let listening = listen.as_ref().is_some_and(|l| !l.is_empty());
            let note = async {
                match listen {
                    Some(l) => l.rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            let stop = async {
                match shutdown {
                    Some(rx) if !*draining && watch_stop => {
                        let _ = rx.await;
                    }
                    _ => std::future::pending::<()>().await,
                }
            };
            let got = match backend {
                Some(b) => {
                    let b: &mut crate::backend::BackendConn = b;
                    tokio::select! {
                        r = reader.read_buf(crbuf) => Got::Client(r),
                        r = b.fill() => Got::Backend(r),
                        _ = stop => Got::Shutdown,
                        Some(frame) = note, if listening => {
                            if let Some(l) = listen.as_mut() {
                                l.backlog.extend_from_slice(&frame);
                            }
                            Got::Notification
                        }
                    }
                }
                None => tokio::select! {
                    r = reader.read_buf(crbuf) => Got::Client(r),
                    _ = stop => Got::Shutdown,
                    Some(frame) = note, if listening => {
                        if let Some(l) = listen.as_mut() {
                            l.backlog.extend_from_slice(&frame);
                        }
                        Got::Notification
                    }
                },
            };
            match got {
                Got::Shutdown => self.draining = true,
                Got::Notification => {}
                Got::Client(Ok(0)) => {
                    self.client_eof = true;
                    return Ok(());
                }
                Got::Client(Ok(_)) => {}
                Got::Client(Err(e)) => return Err(SessionError::ClientIo(e)),
                Got::Backend(Ok(())) => {
                    self.handle_backend_frames();
                    self.maybe_release().await;
                }
                Got::Backend(Err(e)) => self.backend_lost(e.to_string()),
            }
            if let Err(e) = self.deliver_notifications() {
                return self.end_with(e).await;
            }
            self.flush().await?;
            if self.client_eof {
                return Ok(());
            }
        }
    }

    /// Ends the session with a FATAL error, after what the client was already due.
    async fn end_with(&mut self, e: PgError) -> Result<(), SessionError> {
        e.write(&mut self.cout);
        let _ = self.writer.write_all(&self.cout).await;
        self.cout.clear();
        Ok(())
    }

    /// Between transactions, with no server connection: after a reload, the session moves
    /// to the new configuration of its database (one atomic load when nothing changed).
    fn maybe_refresh(&mut self) {
        let Some(ops) = &mut self.ops else { return };
        let current = ops.server.generation();
        if current == ops.generation
            || self.backend.is_some()
            || self.status != b'I'
            || self.in_batch
            || !self.route.idle()
        {
            return;
        }
        ops.generation = current;
        let state = ops.server.state.load();
        let Some(db) = state.topology.databases.get(&ops.database) else {
            // Removed from the configuration: its clients keep the old one until they leave.
            return;
        };
        self.db = db.clone();
        self.route.reset_for(&self.db);
        self.reads.reset();
    }

    /// Whether statements are analyzed and routed (sharding rules, or reads split over
    /// replicas); otherwise everything goes to the default shard's primary unparsed.
    fn routed(&self) -> bool {
        self.db.router.is_sharded() || self.splits_reads()
    }

    /// Between transactions, with nothing in flight.
    fn at_transaction_boundary(&self) -> bool {
        self.status == b'I'
            && self.relay.idle()
            && !self.in_batch
            && !self.in_copy
            && self.route.deferred_begin.is_none()
    }

    /// Handles every complete client frame in the buffer. Returns true on Terminate.
    async fn handle_client_frames(&mut self) -> Result<bool, SessionError> {
        loop {
            let Some(n) = protocol::frame_len(&self.crbuf, self.max_message)? else {
                return Ok(false);
            };
            if self.ops.is_some() {
                // First: a reload can change whether the database is routed.
                self.maybe_refresh();
            }
            if self.unnamed.watching() {
                self.unnamed.observe(&self.crbuf[..n]);
            }
            if self.forwards_in_place(self.crbuf[0]) {
                self.forward_in_place(n).await?;
                continue;
            }
            let frame = self.crbuf.split_to(n).freeze();
            if self.handle_client_frame(frame).await? {
                return Ok(true);
            }
        }
    }

    /// Extended-protocol frames for an unrouted database go to the server straight from
    /// the read buffer: no `Bytes` handle (and its reference count) per frame, which was
    /// an eighth of the extended protocol's user-space instructions.
    fn forwards_in_place(&self, tag: u8) -> bool {
        matches!(tag, b'P' | b'B' | b'D' | b'C' | b'E' | b'H')
            && !self.local_skip
            && self.slow.is_none()
            && !self.routed()
    }

    /// Forwards the first `n` bytes of the read buffer (one frame; see `forwards_in_place`).
    async fn forward_in_place(&mut self, n: usize) -> Result<(), SessionError> {
        // Taken out for the call, which may read more from the client into `crbuf` (while
        // waiting to write): what it reads comes after what is here.
        let mut buf = std::mem::take(&mut self.crbuf);
        let r = self.forward_extended(&buf[..n]).await;
        buf.advance(n);
        let newer = std::mem::replace(&mut self.crbuf, buf);
        if !newer.is_empty() {
            self.crbuf.extend_from_slice(&newer);
        }
        r
    }

    /// One client frame (the caller moved the session to a reloaded configuration first).
    async fn handle_client_frame(&mut self, frame: Bytes) -> Result<bool, SessionError> {
        let tag = frame[0];
        if self.local_skip && tag != b'S' && tag != b'X' {
            return Ok(false);
        }
        match tag {
            b'X' => return Ok(true),
            b'Q' => self.on_query(frame).await?,
            b'F' => {
                self.reads.read_ok = false;
                if self.attach(self.home_shard()).await {
                    self.reads.executed = true;
                    self.started();
                    self.relay.push(Pending::Query);
                    self.bout.extend_from_slice(&frame);
                } else {
                    protocol::write_ready(&mut self.cout, self.status);
                }
            }
            b'P' | b'B' | b'D' | b'C' | b'E' | b'H' => self.on_extended(frame).await?,
            b'S' if self.in_copy => {
                // Ignored by the server in copy-in mode (see Relay::on_frame).
                self.bout.extend_from_slice(&frame);
            }
            b'S' => {
                if std::mem::take(&mut self.local_failed) {
                    self.fail_batch().await?;
                }
                if self.holding() && !self.local_skip {
                    let home = self.home_shard();
                    self.held_read_ok();
                    self.release_held(home).await?;
                }
                self.local_skip = false;
                self.in_batch = false;
                self.route.batch_writes = false;
                self.route.batch_ran = false;
                // Portals end with the implicit transaction; in a transaction block they
                // live on until its end.
                if self.status == b'I' {
                    self.route.portals.clear();
                }
                self.route.pending_copy = None;
                if self.multi.batch_commit {
                    self.end_moved_batch().await?;
                } else if self.backend.is_some() {
                    self.started();
                    self.relay.push(Pending::Sync);
                    self.bout.extend_from_slice(&frame);
                } else {
                    // Answered here: the Sync also ends a skip after a local error.
                    self.relay.drain_local(&mut self.cout);
                    self.relay.sync_local();
                    protocol::write_ready(&mut self.cout, self.status);
                }
            }
            b'd' | b'c' | b'f' => {
                // Copy messages outside COPY are ignored, as PostgreSQL does.
                if self.backend.is_some() {
                    self.bout.extend_from_slice(&frame);
                }
                if tag != b'd' {
                    self.in_copy = false;
                }
            }
            other => {
                return Err(ProtocolError::Malformed {
                    what: "frontend",
                    detail: format!("invalid frontend message type {other}"),
                }
                .into());
            }
        }
        Ok(false)
    }

    /// Parse, Bind, Describe, Close, Execute, Flush.
    async fn on_extended(&mut self, frame: Bytes) -> Result<(), SessionError> {
        if self.slow.is_some()
            && frame[0] == b'P'
            && let Ok(p) = protocol::parse_parse(&frame)
        {
            self.slow_text = Some(frame.slice_ref(p.query));
        }
        if self.routed() {
            self.route_extended(frame).await
        } else {
            self.forward_extended(&frame).await
        }
    }

    /// Marks that the transaction executed something (it can no longer move shards, and
    /// on a primary it may have written).
    fn executed(&mut self, tag: u8) {
        if tag == b'E' {
            if !std::mem::take(&mut self.route.setting_bind) {
                self.route.movable_begin = None;
            }
            self.reads.executed = true;
        }
    }

    fn push_forward(&mut self, tag: u8, frame: &[u8]) {
        self.executed(tag);
        self.started();
        let p = match tag {
            b'P' => Pending::Parse {
                swallow: false,
                undo: None,
            },
            b'B' => Pending::Bind,
            b'D' => Pending::Describe,
            b'C' => Pending::Close,
            b'E' => Pending::Execute,
            _ => {
                // Flush: no response of its own.
                self.bout.extend_from_slice(frame);
                return;
            }
        };
        self.relay.push(p);
        self.bout.extend_from_slice(frame);
    }

    /// An error raised by pgshard inside an extended-protocol batch.
    fn local_error(&mut self, e: PgError) {
        self.db.shards[self.home_shard()].stats.error(e.code);
        self.relay.push(Pending::Error(Box::new(e)));
        self.relay.drain_local(&mut self.cout);
        self.batch_failed();
    }

    /// The client got an error pgshard answered in an extended-protocol batch: whatever
    /// it sent after it, up to the Sync, must not run, and the transaction fails.
    fn batch_failed(&mut self) {
        self.local_skip = true;
        self.local_failed = true;
    }

    /// The Sync of a batch pgshard answered an error in. On a server, an error fails the
    /// transaction: a block becomes failed, and a batch's implicit transaction rolls back
    /// the writes that ran before the error. The attached server has seen no error, and
    /// its ReadyForQuery would report the transaction healthy (and a later COMMIT would
    /// commit): it is made to fail too, unless it failed a statement of its own.
    async fn fail_batch(&mut self) -> Result<(), SessionError> {
        if self.status == b'E' {
            return Ok(());
        }
        if self.backend.is_none() {
            // A transaction block pgshard holds back (deferred BEGIN) fails, as on a server.
            if self.status == b'T' {
                self.status = b'E';
            }
            return Ok(());
        }
        // The server's answers so far tell whether it failed on its own; a simple Query
        // sent while it skips to the Sync would be skipped too.
        self.settle().await?;
        if !self.relay.server_failed {
            self.raise_on_attached();
        }
        Ok(())
    }

    /// Makes the attached server fail the statement it runs next (an internal query,
    /// whose answer the client does not see), so that its transaction fails as the
    /// client's did.
    fn raise_on_attached(&mut self) {
        if self.backend.as_ref().is_some_and(|b| !b.broken) {
            self.relay.push(Pending::Internal);
            protocol::write_query(&mut self.bout, crate::exec::RAISE_FAILED);
        }
    }
}

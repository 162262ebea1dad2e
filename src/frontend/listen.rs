//! LISTEN/NOTIFY in transaction pooling mode. A client's LISTEN cannot stay on a pooled
//! server connection, so pgshard listens for it: per database, one listener connection to
//! each shard's primary LISTENs on every channel some client listens on, and each
//! notification is handed to the sessions listening on its channel, which deliver it when
//! the client is between transactions (as PostgreSQL does). A NOTIFY runs on one shard
//! (where its statement is routed, or where a trigger fires), so each notification arrives
//! once.
//!
//! The listener connections follow failovers and reconnect when they drop; notifications
//! sent while one is down are lost (as they are for a PostgreSQL client whose connection
//! drops).

use super::Server;
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How long a LISTEN waits for the listener connections.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before reconnecting a listener connection.
const RECONNECT: Duration = Duration::from_millis(200);
/// How often a listener checks that its shard's primary (and the configuration) is still
/// the one it is on.
const PRIMARY_CHECK: Duration = Duration::from_millis(500);

/// A session's subscriptions: its notifications arrive on `rx`.
pub struct Subscriber {
    id: u64,
    hub: Arc<Hub>,
    tx: mpsc::UnboundedSender<Bytes>,
    pub rx: mpsc::UnboundedReceiver<Bytes>,
    channels: Vec<String>,
    /// Notifications received while the client was in a transaction or a request was in
    /// flight, delivered at the next transaction boundary.
    pub backlog: BytesMut,
}

impl Subscriber {
    /// Whether the session listens on anything.
    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    /// LISTEN: from now on, notifications on `channel` arrive here.
    pub async fn listen(&mut self, channel: &str) -> Result<(), String> {
        if self.channels.iter().any(|c| c == channel) {
            return Ok(());
        }
        self.hub
            .subscribe(self.id, channel, self.tx.clone())
            .await?;
        self.channels.push(channel.to_string());
        Ok(())
    }

    /// UNLISTEN `channel`, or every channel (`None`, UNLISTEN *).
    pub fn unlisten(&mut self, channel: Option<&str>) {
        let id = self.id;
        self.channels.retain(|c| {
            let drop = channel.is_none_or(|x| x == c);
            if drop {
                self.hub.unsubscribe(id, c);
            }
            !drop
        });
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.unlisten(None);
    }
}

/// The listener connections and subscriptions of one client-facing database.
pub struct Hub {
    database: String,
    server: Weak<Server>,
    /// Channel -> (session id -> where its notifications go).
    subs: Mutex<HashMap<String, HashMap<u64, mpsc::UnboundedSender<Bytes>>>>,
    /// One listener task per shard, started with the first LISTEN.
    shards: Mutex<Vec<ShardListener>>,
    /// Notifications received from the servers.
    notifications: AtomicU64,
}

/// A shard's listener task: its commands, and whether its connection is up (metrics).
struct ShardListener {
    cmds: mpsc::UnboundedSender<Cmd>,
    connected: Arc<AtomicBool>,
}

/// What the metrics show of one database's listeners.
pub struct ListenStats {
    pub database: String,
    /// Channels some client listens on.
    pub channels: usize,
    /// Per started shard listener: connected now.
    pub connected: Vec<bool>,
    pub notifications: u64,
}

enum Cmd {
    Listen(String, oneshot::Sender<Result<(), String>>),
    Unlisten(String),
}

/// The hubs of a pgshard process, by client-facing database name. They outlive reloads:
/// listener connections look the database up again whenever they connect.
#[derive(Default)]
pub struct Listeners {
    hubs: Mutex<HashMap<String, Arc<Hub>>>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Listeners {
    /// A subscriber for a session of `database` (listening on nothing yet).
    pub fn subscriber(&self, server: &Arc<Server>, database: &str) -> Subscriber {
        let hub = self
            .hubs
            .lock()
            .expect("not poisoned")
            .entry(database.to_string())
            .or_insert_with(|| {
                Arc::new(Hub {
                    database: database.to_string(),
                    server: Arc::downgrade(server),
                    subs: Mutex::new(HashMap::new()),
                    shards: Mutex::new(Vec::new()),
                    notifications: AtomicU64::new(0),
                })
            })
            .clone();
        let (tx, rx) = mpsc::unbounded_channel();
        Subscriber {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            hub,
            tx,
            rx,
            channels: Vec::new(),
            backlog: BytesMut::new(),
        }
    }
}

impl Listeners {
    /// Per database with listeners: channels, connections, notifications.
    pub fn stats(&self) -> Vec<ListenStats> {
        let hubs = self.hubs.lock().expect("not poisoned");
        let mut out: Vec<ListenStats> = hubs
            .values()
            .map(|h| ListenStats {
                database: h.database.clone(),
                channels: h.subs.lock().expect("not poisoned").len(),
                connected: h
                    .shards
                    .lock()
                    .expect("not poisoned")
                    .iter()
                    .map(|s| s.connected.load(Ordering::Relaxed))
                    .collect(),
                notifications: h.notifications.load(Ordering::Relaxed),
            })
            .collect();
        out.sort_by(|a, b| a.database.cmp(&b.database));
        out
    }
}

impl Hub {
    async fn subscribe(
        self: &Arc<Self>,
        id: u64,
        channel: &str,
        tx: mpsc::UnboundedSender<Bytes>,
    ) -> Result<(), String> {
        let first = {
            let mut subs = self.subs.lock().expect("not poisoned");
            let entry = subs.entry(channel.to_string()).or_default();
            entry.insert(id, tx);
            entry.len() == 1
        };
        if !first {
            return Ok(());
        }
        // The first listener of a channel: every shard's listener connection LISTENs
        // before the client's LISTEN is answered, so no later NOTIFY is missed.
        let mut acks = Vec::new();
        for shard in self.shard_tasks() {
            let (ack, done) = oneshot::channel();
            if shard.send(Cmd::Listen(channel.to_string(), ack)).is_ok() {
                acks.push(done);
            }
        }
        for done in acks {
            match tokio::time::timeout(LISTEN_TIMEOUT, done).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    self.unsubscribe(id, channel);
                    return Err(e);
                }
                _ => {
                    self.unsubscribe(id, channel);
                    return Err("the listener connection did not answer".into());
                }
            }
        }
        Ok(())
    }

    fn unsubscribe(&self, id: u64, channel: &str) {
        let mut subs = self.subs.lock().expect("not poisoned");
        let Some(entry) = subs.get_mut(channel) else {
            return;
        };
        entry.remove(&id);
        if entry.is_empty() {
            subs.remove(channel);
            for shard in self.shards.lock().expect("not poisoned").iter() {
                let _ = shard.cmds.send(Cmd::Unlisten(channel.to_string()));
            }
        }
    }

    /// The listener tasks, one per shard of the database's current configuration (started
    /// on first use; more are started when a reload added shards).
    fn shard_tasks(self: &Arc<Self>) -> Vec<mpsc::UnboundedSender<Cmd>> {
        let shards = self.server.upgrade().map_or(0, |s| {
            s.state
                .load()
                .topology
                .databases
                .get(&self.database)
                .map_or(0, |d| d.shards.len())
        });
        let mut tasks = self.shards.lock().expect("not poisoned");
        while tasks.len() < shards {
            let (tx, rx) = mpsc::unbounded_channel();
            let connected = Arc::new(AtomicBool::new(false));
            tokio::spawn(listener(self.clone(), tasks.len(), rx, connected.clone()));
            tasks.push(ShardListener {
                cmds: tx,
                connected,
            });
        }
        tasks.iter().map(|t| t.cmds.clone()).collect()
    }

    /// Hands a notification to the sessions listening on its channel.
    fn deliver(&self, n: &tokio_postgres::Notification) {
        self.notifications.fetch_add(1, Ordering::Relaxed);
        let subs = self.subs.lock().expect("not poisoned");
        let Some(entry) = subs.get(n.channel()) else {
            return;
        };
        let mut frame = BytesMut::with_capacity(11 + n.channel().len() + n.payload().len());
        frame.put_u8(b'A');
        frame.put_i32((10 + n.channel().len() + n.payload().len()) as i32);
        frame.put_i32(n.process_id());
        frame.put_slice(n.channel().as_bytes());
        frame.put_u8(0);
        frame.put_slice(n.payload().as_bytes());
        frame.put_u8(0);
        let frame = frame.freeze();
        for tx in entry.values() {
            let _ = tx.send(frame.clone());
        }
    }

    fn channels(&self) -> Vec<String> {
        self.subs
            .lock()
            .expect("not poisoned")
            .keys()
            .cloned()
            .collect()
    }
}

/// One shard's listener connection: connects to the shard's current primary, LISTENs on
/// every channel with subscribers, relays notifications; reconnects when the connection
/// drops or the primary changes. Ends when pgshard (or the hub) is gone.
async fn listener(
    hub: Arc<Hub>,
    shard: usize,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    connected: Arc<AtomicBool>,
) {
    'connect: loop {
        connected.store(false, Ordering::Relaxed);
        let Some(server) = hub.server.upgrade() else {
            return;
        };
        let state = server.state.load_full();
        drop(server);
        let Some(db) = state.topology.databases.get(&hub.database).cloned() else {
            return;
        };
        let target = db
            .primary(shard)
            .ok()
            .map(|p| (p, &db.shards[shard].nodes[p]));
        let conn = match target {
            Some((_, node)) => crate::cluster::Control::as_server_user(&db, node, LISTEN_TIMEOUT)
                .listen_connection("pgshard listener")
                .await
                .map_err(|e| (node.addr.clone(), e)),
            None => Err((String::new(), "no primary".to_string())),
        };
        let (client, mut notes) = match conn {
            Ok(c) => c,
            Err((addr, e)) => {
                tracing::warn!(database = %hub.database, shard, node = %addr, error = %e, "listener connection failed; retrying");
                // While disconnected, LISTENs are answered at once: the channel is
                // listened on when the connection is back.
                let retry = tokio::time::sleep(RECONNECT);
                tokio::pin!(retry);
                loop {
                    tokio::select! {
                        _ = &mut retry => continue 'connect,
                        cmd = cmds.recv() => match cmd {
                            Some(Cmd::Listen(_, ack)) => { let _ = ack.send(Ok(())); }
                            Some(Cmd::Unlisten(_)) => {}
                            None => return,
                        },
                    }
                }
            }
        };
        let primary = target.map(|t| t.0);
        let channels = hub.channels();
        if !channels.is_empty() {
            let sql: String = channels
                .iter()
                .map(|c| format!("LISTEN {};", crate::sql::quote_ident(c)))
                .collect();
            if let Err(e) = client.batch_execute(&sql).await {
                tracing::warn!(database = %hub.database, shard, error = %e, "listener LISTEN failed; reconnecting");
                tokio::time::sleep(RECONNECT).await;
                continue;
            }
        }
        tracing::debug!(database = %hub.database, shard, channels = channels.len(), "listener connected");
        connected.store(true, Ordering::Relaxed);
        let mut check = tokio::time::interval(PRIMARY_CHECK);
        loop {
            tokio::select! {
                n = notes.recv() => match n {
                    Some(n) => hub.deliver(&n),
                    None => break,
                },
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Listen(c, ack)) => {
                        let r = client.batch_execute(&format!("LISTEN {}", crate::sql::quote_ident(&c))).await;
                        let failed = r.is_err();
                        let _ = ack.send(r.map_err(|e| e.to_string()));
                        if failed {
                            break;
                        }
                    }
                    Some(Cmd::Unlisten(c)) => {
                        if client.batch_execute(&format!("UNLISTEN {}", crate::sql::quote_ident(&c))).await.is_err() {
                            break;
                        }
                    }
                    None => return,
                },
                _ = check.tick() => {
                    // A failover moved the primary, or a reload replaced the configuration
                    // (whose nodes may differ): connect again.
                    let reloaded = hub
                        .server
                        .upgrade()
                        .is_none_or(|s| !Arc::ptr_eq(&s.state.load(), &state));
                    if reloaded || db.primary(shard).ok() != primary {
                        break;
                    }
                }
            }
        }
        tracing::info!(database = %hub.database, shard, "listener connection lost or primary changed; reconnecting");
        tokio::time::sleep(RECONNECT).await;
    }
}

/// The channel of `LISTEN channel` / `UNLISTEN channel`: Some(Some(name)); `UNLISTEN *`:
/// Some(None); None when the statement is not one of those, well formed.
pub fn channel_of(stmt: &str) -> Option<Option<String>> {
    let s = stmt.trim().trim_end_matches(';').trim();
    let (kw, rest) = s.split_once(|c: char| c.is_ascii_whitespace())?;
    let rest = rest.trim();
    let unlisten = kw.eq_ignore_ascii_case("unlisten");
    if !unlisten && !kw.eq_ignore_ascii_case("listen") {
        return None;
    }
    if rest == "*" {
        return unlisten.then_some(None);
    }
    if let Some(inner) = rest.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        let name = inner.replace("\"\"", "\"");
        // A lone quote inside would have ended the identifier.
        if name.is_empty() || inner.replace("\"\"", "").contains('"') {
            return None;
        }
        return Some(Some(name));
    }
    let ident = rest
        .chars()
        .all(|c| c.is_alphanumeric() || c == '_' || c == '$')
        && rest
            .chars()
            .next()
            .is_some_and(|c| !c.is_ascii_digit() && c != '$');
    ident.then(|| Some(rest.to_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::channel_of;

    #[test]
    fn channels_are_read_as_postgresql_reads_identifiers() {
        assert_eq!(channel_of("LISTEN Jobs"), Some(Some("jobs".into())));
        assert_eq!(
            channel_of("listen \"Mixed \"\"Case\"\"\";"),
            Some(Some("Mixed \"Case\"".into()))
        );
        assert_eq!(channel_of("UNLISTEN *"), Some(None));
        assert_eq!(channel_of("unlisten q_1"), Some(Some("q_1".into())));
        for bad in [
            "LISTEN *",
            "LISTEN a b",
            "LISTEN 1a",
            "LISTEN \"a\"b\"",
            "LISTEN \"\"",
            "LISTEN",
        ] {
            assert_eq!(channel_of(bad), None, "{bad}");
        }
    }
}

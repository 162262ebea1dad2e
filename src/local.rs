//! Real PostgreSQL servers on this machine, for `pgshard demo` and for tests: primaries made
//! with initdb, streaming replicas made with pg_basebackup, all in one temporary directory,
//! on free loopback ports, stopped by PID.
//!
//! PostgreSQL refuses to run as root; when we are root the servers run as an unprivileged
//! user (`postgres` if it exists, else `nobody`). Servers are stopped when the
//! [`LocalCluster`] is dropped, at process exit (atexit), and — should this process be
//! killed — by the kernel (parent-death signal), so no test run leaves servers behind.

use crate::sql::{quote_ident, quote_literal};
use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

/// A failure starting or driving local servers.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(
        "no PostgreSQL server binaries found (looked for initdb, postgres and pg_basebackup in PATH, \
         `pg_config --bindir` and /usr/lib/postgresql/*/bin). Install them, e.g. on Debian/Ubuntu: \
         `apt-get install -y postgresql`, on Fedora: `dnf install postgresql-server`, on macOS: \
         `brew install postgresql@15`; or put their directory in PATH"
    )]
    NoBinaries,
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("{0}")]
    Other(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Finds a directory holding initdb, postgres and pg_basebackup.
pub fn find_bindir() -> Result<PathBuf, LocalError> {
    let complete = |d: &Path| {
        ["initdb", "postgres", "pg_basebackup"]
            .iter()
            .all(|b| d.join(b).is_file())
    };
    if let Ok(dir) = std::env::var("PGSHARD_PG_BINDIR") {
        let d = PathBuf::from(dir);
        if complete(&d) {
            return Ok(d);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if complete(&d) {
                return Ok(d);
            }
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && complete(&d) {
            return Ok(d);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, d)| complete(d))
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d).ok_or(LocalError::NoBinaries)
}

/// A free TCP port on 127.0.0.1 for a server to listen on (released before use; a
/// collision is retried by callers).
///
/// Taken below the kernel's range of ephemeral ports where there is room: a port from that
/// range can be handed to an outgoing connection (a pooled server connection, a psql)
/// between this check and the server's bind, or while a stopped server is down before its
/// restart on the same port, and the server then cannot listen.
pub fn free_port() -> u16 {
    if let Some((low, high)) = listen_ports() {
        for _ in 0..64 {
            let port = rand::random_range(low..high);
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral loopback port")
}

/// Ports no outgoing connection is given: the 10000 below the ephemeral range, when the
/// range starts above 11024 (as Linux's default, 32768, does).
fn listen_ports() -> Option<(u16, u16)> {
    let range = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let low: u16 = range.split_whitespace().next()?.parse().ok()?;
    (low > 11_024).then(|| (low - 10_000, low))
}

/// The OS user servers run as: ourselves, or an unprivileged one when we are root.
fn run_as() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    for name in ["postgres", "nobody"] {
        let c = std::ffi::CString::new(name).expect("no NUL");
        // SAFETY: getpwnam returns a pointer to static storage or NULL; read at once.
        let pw = unsafe { libc::getpwnam(c.as_ptr()) };
        if !pw.is_null() {
            // SAFETY: non-null result of getpwnam.
            let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
            return Some((uid, gid));
        }
    }
    Some((65534, 65534))
}

// Every server we started, so that process exit stops them even if nobody dropped them.
static LIVE: Mutex<Vec<(u32, PathBuf)>> = Mutex::new(Vec::new());
static ATEXIT: OnceLock<()> = OnceLock::new();

extern "C" fn stop_all_at_exit() {
    let live = std::mem::take(&mut *LIVE.lock().unwrap_or_else(|e| e.into_inner()));
    for (pid, _) in &live {
        // SAFETY: sending a signal to a child we started.
        unsafe { libc::kill(*pid as i32, libc::SIGQUIT) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for (pid, _) in &live {
        while Instant::now() < deadline && unsafe { libc::kill(*pid as i32, 0) } == 0 {
            // Reap it if it is our child; ignore errors for others.
            unsafe { libc::waitpid(*pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for (_, root) in &live {
        let _ = fs::remove_dir_all(root);
    }
}

/// Spawns server processes from one thread that lives as long as the process, because the
/// parent-death signal fires when the *thread* that forked exits, and test threads end
/// long before the servers they started should.
fn spawn_server(cmd: Command) -> std::io::Result<Child> {
    type Req = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Req>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Req>();
        std::thread::Builder::new()
            .name("pgshard-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawning a thread");
        Mutex::new(tx)
    });
    let (rtx, rrx) = mpsc::channel();
    tx.lock()
        .expect("not poisoned")
        .send((cmd, rtx))
        .map_err(|_| std::io::Error::other("spawner thread gone"))?;
    rrx.recv()
        .map_err(|_| std::io::Error::other("spawner thread gone"))?
}

/// What to create.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub shards: usize,
    pub replicas: usize,
    /// Database and owner role created on every primary, with this password (SCRAM).
    pub database: String,
    pub user: String,
    pub password: String,
    /// Extra `postgresql.conf` lines.
    pub extra_conf: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            shards: 2,
            replicas: 1,
            database: "app".into(),
            user: "app".into(),
            password: "app".into(),
            extra_conf: Vec::new(),
        }
    }
}

/// One running server.
pub struct Node {
    pub name: String,
    pub port: u16,
    pub data: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// `127.0.0.1:port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `<socket directory>:port`: the server's Unix-domain socket, as pgshard's
    /// configuration names it (the servers keep their sockets in the cluster's directory).
    pub fn socket_addr(&self) -> String {
        let dir = self
            .data
            .parent()
            .expect("data directories are in the cluster root");
        format!("{}:{}", dir.display(), self.port)
    }

    /// The server's PID (postmaster).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Stops the server: `signal` SIGINT is a fast shutdown, SIGKILL a crash.
    pub fn stop_with(&mut self, signal: i32) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, signal) };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            LIVE.lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|(p, _)| *p != c.id());
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

/// A shard: a primary and its replicas.
pub struct LocalShard {
    pub primary: Node,
    pub replicas: Vec<Node>,
}

/// A set of local servers in one temporary directory.
pub struct LocalCluster {
    pub root: PathBuf,
    pub bindir: PathBuf,
    pub shards: Vec<LocalShard>,
    pub options: ClusterOptions,
    owner: Option<(u32, u32)>,
}

impl LocalCluster {
    /// Creates and starts every server; returns when all accept connections.
    pub fn start(options: ClusterOptions) -> Result<LocalCluster, LocalError> {
        ATEXIT.get_or_init(|| {
            // SAFETY: registering a plain extern "C" function.
            unsafe { libc::atexit(stop_all_at_exit) };
        });
        let bindir = find_bindir()?;
        let root = std::env::temp_dir().join(format!(
            "pgshard-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        fs::create_dir_all(&root)?;
        let owner = run_as();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&root, Some(uid), Some(gid))?;
        }
        let mut cluster = LocalCluster {
            root,
            bindir,
            shards: Vec::new(),
            options: options.clone(),
            owner,
        };
        for s in 0..options.shards {
            let primary = cluster.start_primary(&format!("shard{s}-primary"))?;
            let mut shard = LocalShard {
                primary,
                replicas: Vec::new(),
            };
            for r in 0..options.replicas {
                let rep = cluster.start_replica(&shard.primary, &format!("shard{s}-replica{r}"))?;
                shard.replicas.push(rep);
            }
            cluster.shards.push(shard);
        }
        Ok(cluster)
    }

    fn cmd(&self, bin: &str) -> Command {
        let mut c = Command::new(self.bindir.join(bin));
        c.current_dir(&self.root)
            .env("LC_ALL", "C")
            .env_remove("PGDATA")
            .env_remove("PGHOST")
            .env_remove("PGPORT")
            .stdin(Stdio::null());
        if let Some((uid, gid)) = self.owner {
            c.uid(uid).gid(gid);
        }
        c
    }

    fn run(&self, what: &str, mut c: Command) -> Result<String, LocalError> {
        let out = c.output().map_err(|e| LocalError::Command {
            what: what.into(),
            detail: e.to_string(),
        })?;
        if !out.status.success() {
            return Err(LocalError::Command {
                what: what.into(),
                detail: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn sockdir(&self) -> PathBuf {
        self.root.clone()
    }

    fn start_primary(&self, name: &str) -> Result<Node, LocalError> {
        let data = self.root.join(name);
        let mut c = self.cmd("initdb");
        c.args(["-D"]).arg(&data).args([
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--auth=trust",
            "-N",
        ]);
        self.run("initdb", c)?;
        let mut conf = vec![
            "listen_addresses = '127.0.0.1'".to_string(),
            "max_connections = 300".into(),
            "shared_buffers = 32MB".into(),
            "max_prepared_transactions = 64".into(),
            "wal_level = replica".into(),
            "max_wal_senders = 10".into(),
            "wal_keep_size = '256MB'".into(),
            "hot_standby = on".into(),
            "fsync = off".into(),
            "full_page_writes = off".into(),
            "synchronous_commit = on".into(),
            "log_min_messages = warning".into(),
            "log_line_prefix = '%m [%p] '".into(),
        ];
        conf.extend(self.options.extra_conf.iter().cloned());
        append(&data.join("postgresql.conf"), &conf.join("\n"))?;
        fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             host replication all 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n",
        )?;
        let node = self.launch(name, data)?;
        let o = &self.options;
        let u = quote_ident(&o.user);
        let p = quote_literal(&o.password);
        self.psql(
            node.port,
            "postgres",
            &format!("CREATE ROLE {u} LOGIN PASSWORD {p}"),
        )?;
        let d = quote_ident(&o.database);
        self.psql(
            node.port,
            "postgres",
            &format!("CREATE DATABASE {d} OWNER {u}"),
        )?;
        Ok(node)
    }

    fn start_replica(&self, primary: &Node, name: &str) -> Result<Node, LocalError> {
        let data = self.root.join(name);
        let mut c = self.cmd("pg_basebackup");
        c.args([
            "-h",
            "127.0.0.1",
            "-p",
            &primary.port.to_string(),
            "-U",
            "postgres",
            "-D",
        ])
        .arg(&data)
        .args(["-R", "-X", "stream", "-c", "fast"]);
        self.run("pg_basebackup", c)?;
        self.launch(name, data)
    }

    /// Starts `postgres` on a data directory and waits until it accepts connections.
    fn launch(&self, name: &str, data: PathBuf) -> Result<Node, LocalError> {
        self.launch_on(name, data, None)
    }

    /// A node of a shard: its primary (`None`) or a replica.
    pub fn node_mut(&mut self, shard: usize, replica: Option<usize>) -> &mut Node {
        let sh = &mut self.shards[shard];
        match replica {
            None => &mut sh.primary,
            Some(r) => &mut sh.replicas[r],
        }
    }

    /// Starts a stopped (or crashed) node again on its port and data directory.
    pub fn restart(&mut self, shard: usize, replica: Option<usize>) -> Result<(), LocalError> {
        let (name, data, port) = {
            let node = self.node_mut(shard, replica);
            node.stop_with(libc::SIGINT);
            (node.name.clone(), node.data.clone(), node.port)
        };
        let fresh = self.launch_on(&name, data, Some(port))?;
        *self.node_mut(shard, replica) = fresh;
        Ok(())
    }

    /// Waits until every replica has replayed what its primary had written when called.
    pub fn wait_replicas_caught_up(&self) -> Result<(), LocalError> {
        for sh in &self.shards {
            if sh.replicas.is_empty() {
                continue;
            }
            let lsn = self.psql(sh.primary.port, "postgres", "SELECT pg_current_wal_lsn()")?;
            for r in &sh.replicas {
                let deadline = Instant::now() + Duration::from_secs(30);
                let sql = format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn");
                while self.psql(r.port, "postgres", &sql)? != "t" {
                    if Instant::now() > deadline {
                        return Err(LocalError::Other(format!(
                            "replica {} did not replay up to {lsn} within 30 s",
                            r.name
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        Ok(())
    }

    /// Sets a server parameter with ALTER SYSTEM and reloads the configuration.
    pub fn set_and_reload(&self, node: &Node, name: &str, value: &str) -> Result<(), LocalError> {
        self.psql(
            node.port,
            "postgres",
            &format!("ALTER SYSTEM SET {name} = {}", quote_literal(value)),
        )?;
        self.psql(node.port, "postgres", "SELECT pg_reload_conf()")?;
        Ok(())
    }

    fn launch_on(&self, name: &str, data: PathBuf, fixed: Option<u16>) -> Result<Node, LocalError> {
        let mut last = String::new();
        for _ in 0..3 {
            let port = fixed.unwrap_or_else(free_port);
            let log = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.root.join(format!("{name}.log")))?;
            let mut c = self.cmd("postgres");
            c.arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-k"])
                .arg(self.sockdir())
                .stdout(log.try_clone()?)
                .stderr(log);
            // SAFETY: prctl is async-signal-safe; it runs in the child before exec.
            unsafe {
                c.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let child = spawn_server(c)?;
            let pid = child.id();
            LIVE.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((pid, self.root.clone()));
            let mut node = Node {
                name: name.into(),
                port,
                data: data.clone(),
                child: Some(child),
            };
            match self.wait_ready(&mut node) {
                Ok(()) => return Ok(node),
                Err(e) => {
                    last = e.to_string();
                    node.stop_with(libc::SIGKILL);
                }
            }
        }
        Err(LocalError::Other(format!(
            "server {name} did not start: {last}; see {}",
            self.root.join(format!("{name}.log")).display()
        )))
    }

    fn wait_ready(&self, node: &mut Node) -> Result<(), LocalError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(c) = node.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                node.child = None;
                return Err(LocalError::Other(format!("exited with {status}")));
            }
            if self.psql(node.port, "postgres", "SELECT 1").is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LocalError::Other("not ready after 60 s".into()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs SQL as the superuser with psql and returns its unaligned output.
    pub fn psql(&self, port: u16, db: &str, sql: &str) -> Result<String, LocalError> {
        let mut c = self.cmd("psql");
        if !self.bindir.join("psql").is_file() {
            c = Command::new("psql");
            c.current_dir(&self.root);
        }
        c.args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
        ])
        .args([
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            db,
            "-c",
            sql,
        ]);
        self.run("psql", c).map(|s| s.trim().to_string())
    }

    /// The pgshard configuration serving this cluster.
    pub fn config_yaml(&self, listen: &str, pool_mode: &str, pool_size: u32) -> String {
        let o = &self.options;
        let mut s = format!(
            "# Written by pgshard for the local cluster in {root}\n\
             listen: {listen}\n\
             users:\n  - {{ name: {u}, password: {p} }}\n\
             pool: {{ mode: {pool_mode}, size: {pool_size}, checkout_timeout_ms: 5000 }}\n\
             databases:\n  - name: {d}\n    server_user: {u}\n    server_password: {p}\n    shards:\n",
            root = self.root.display(),
            u = o.user,
            p = o.password,
            d = o.database,
        );
        for sh in &self.shards {
            let reps: Vec<String> = sh.replicas.iter().map(Node::addr).collect();
            s.push_str(&format!(
                "      - {{ primary: {}, replicas: [{}] }}\n",
                sh.primary.addr(),
                reps.join(", ")
            ));
        }
        s.push_str("    default_shard: 0\n");
        s
    }

    /// Stops every server (replicas first) and removes the directory.
    pub fn stop(&mut self) {
        for sh in &mut self.shards {
            for r in &mut sh.replicas {
                r.stop_with(libc::SIGINT);
            }
            sh.primary.stop_with(libc::SIGINT);
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn append(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new().append(true).open(path)?;
    writeln!(f, "\n# pgshard local cluster\n{text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_listen_outside_the_ephemeral_range() {
        let Some((low, high)) = listen_ports() else {
            return; // A kernel range with no room below it: any free port will do.
        };
        for _ in 0..20 {
            let port = free_port();
            assert!((low..high).contains(&port), "{port} not in {low}..{high}");
            TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
        }
    }
}

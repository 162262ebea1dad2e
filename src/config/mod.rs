//! The YAML configuration: schema, defaults and validation.
//!
//! Validation happens once, at load, and every message names the key it is about
//! (`databases[0].shards[1].primary: ...`) so that an operator can fix the file without
//! reading our source.

use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

mod net;
mod replication;
mod validate;
pub use net::{AdminConfig, MetricsConfig, ServerTlsConfig, ServerTlsMode, TlsConfig, parse_addr};
pub use replication::{Consistency, DEFAULT_MAX_LAG_MS, FailoverConfig, LoadBalance, ReadFrom};

/// A configuration problem, naming the key and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// The whole file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address clients connect to.
    #[serde(default = "net::default_listen")]
    pub listen: String,
    /// A directory where pgshard also listens on a Unix-domain socket, `.s.PGSQL.<port of
    /// listen>` as PostgreSQL names it (`psql -h <dir> -p <port>`).
    #[serde(default)]
    pub unix_socket_dir: Option<String>,
    /// TLS towards the servers (default: `prefer`, as libpq).
    #[serde(default)]
    pub server_tls: ServerTlsConfig,
    /// TLS for client connections; without it SSLRequest is answered 'N'.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Users that may connect to pgshard.
    pub users: Vec<UserConfig>,
    /// Pool settings shared by every pool.
    #[serde(default)]
    pub pool: PoolConfig,
    /// Limits that protect pgshard from misbehaving clients.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The logical databases clients can name in their connection string.
    pub databases: Vec<DatabaseConfig>,
    /// The admin console (`psql -p <port> -U admin pgshard`).
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// The Prometheus endpoint (`GET /metrics`).
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// Statements slower than this are logged (with their shard and duration); 0: off.
    #[serde(default)]
    pub slow_query_ms: u64,
}

/// How a user proves who they are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    /// SCRAM-SHA-256, as PostgreSQL's default.
    #[default]
    #[serde(alias = "scram")]
    ScramSha256,
    Md5,
    Trust,
}

/// One user allowed to connect to pgshard.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// Plain password; for SCRAM a stored verifier (`SCRAM-SHA-256$...`) may be given instead.
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub auth: AuthMethod,
}

/// Pooling mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A client keeps its server connection for its whole session.
    Session,
    /// A client holds a server connection only for a transaction (or one statement).
    #[default]
    Transaction,
}

/// Pool settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    pub mode: PoolMode,
    /// Maximum server connections per (node, database, user).
    pub size: u32,
    /// Idle server connections kept open per pool.
    pub min_idle: u32,
    /// How long a client waits for a server connection before getting SQLSTATE 53300.
    pub checkout_timeout_ms: u64,
    /// Idle connections beyond `min_idle` are closed after this long (0: never).
    pub idle_timeout_ms: u64,
    /// Connections are replaced after this long, whatever their use (0: never); one in use
    /// is closed when it is returned.
    pub max_lifetime_ms: u64,
    /// Time allowed to open one server connection (TCP + startup + auth).
    pub connect_timeout_ms: u64,
    /// Server-side prepared statements pgshard makes on its own (transaction mode).
    pub statement_cache: StatementCacheConfig,
}

/// Which statements pgshard prepares on the servers without being asked (transaction
/// mode), so that PostgreSQL parses and plans each distinct statement once per server
/// connection instead of once per execution. Both change how PostgreSQL plans: a prepared
/// statement may switch to a generic plan after five executions (`plan_cache_mode`),
/// which is why they are off by default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatementCacheConfig {
    /// Unnamed statements (a Parse with an empty name, as libpq's PQexecParams, pgbench
    /// -M extended, node-postgres and psycopg send) become named server statements.
    pub unnamed: bool,
    /// A simple-protocol query seen again by the same client, whose integer and decimal
    /// constants after a comparison operator (`aid = 42`) become typed parameters, runs
    /// as a prepared statement. Only outside transaction blocks, where a statement the
    /// server cannot prepare that way falls back to the query as sent.
    pub simple: bool,
    /// Most statements pgshard keeps prepared on one server connection; the least
    /// recently used one is closed past this.
    pub per_connection: usize,
}

impl Default for StatementCacheConfig {
    fn default() -> Self {
        StatementCacheConfig {
            unnamed: false,
            simple: false,
            per_connection: 500,
        }
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Transaction,
            size: 20,
            min_idle: 0,
            checkout_timeout_ms: 5000,
            idle_timeout_ms: 600_000,
            max_lifetime_ms: 3_600_000,
            connect_timeout_ms: 5000,
            statement_cache: StatementCacheConfig::default(),
        }
    }
}

/// Protection limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest message a client may send, in bytes.
    pub max_message_size: usize,
    /// A client must finish startup and authentication within this time.
    pub startup_timeout_ms: u64,
    /// On SIGTERM/SIGINT, transactions in flight get this long to finish.
    pub shutdown_timeout_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_size: 64 * 1024 * 1024,
            startup_timeout_ms: 10_000,
            shutdown_timeout_ms: 30_000,
        }
    }
}

/// A shard: one primary and zero or more streaming replicas.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    pub primary: String,
    #[serde(default)]
    pub replicas: Vec<String>,
    /// Read weights: the primary's, then one per replica (default: all equal).
    #[serde(default)]
    pub weights: Option<Vec<u32>>,
}

/// A logical database.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// The name clients use.
    pub name: String,
    /// The database on the servers (default: `name`).
    #[serde(default)]
    pub server_database: Option<String>,
    /// Credentials pgshard uses towards the servers.
    pub server_user: String,
    #[serde(default)]
    pub server_password: Option<String>,
    pub shards: Vec<ShardConfig>,
    #[serde(default)]
    pub default_shard: usize,
    /// Tables with a full copy on every shard.
    #[serde(default)]
    pub reference_tables: Vec<String>,
    /// Tables split across shards by a key column.
    #[serde(default)]
    pub sharded_tables: Vec<ShardedTableConfig>,
    /// Whether an UPDATE/DELETE without a usable shard key may run on every shard.
    #[serde(default)]
    pub cross_shard_writes: CrossShardWrites,
    /// Which nodes take reads (default: the primary only).
    #[serde(default)]
    pub read_from: ReadFrom,
    #[serde(default)]
    pub load_balance: LoadBalance,
    #[serde(default)]
    pub consistency: Consistency,
    /// Replicas further behind than this get no reads (default 1000 ms).
    #[serde(default)]
    pub max_replica_lag_ms: Option<u64>,
    #[serde(default)]
    pub max_replica_lag_bytes: Option<u64>,
    /// Functions (besides nextval, setval, pg_advisory_lock* ...) that write: a SELECT
    /// calling one goes to the primary.
    #[serde(default)]
    pub writing_functions: Vec<String>,
    /// Health checks and automatic failover.
    #[serde(default)]
    pub failover: FailoverConfig,
    /// How a transaction that wrote on several shards commits.
    #[serde(default)]
    pub two_phase_commit: TwoPhaseCommit,
    /// A prepared transaction with no recorded decision older than this is rolled back by
    /// recovery (its coordinator died before deciding).
    #[serde(default = "default_in_doubt_ms")]
    pub two_phase_timeout_ms: u64,
    /// How often pgshard looks for transactions waiting for each other across shards (a
    /// deadlock no server sees); 0 turns the detector off.
    #[serde(default = "default_deadlock_ms")]
    pub deadlock_detection_ms: u64,
    /// The most bytes of one shard's answer pgshard holds in memory to merge a statement
    /// over several shards (rows it orders, groups, gathers or returns from a write over
    /// several shards); past it the statement is cancelled on that shard and fails with
    /// 54000 instead of the process running out of memory. 0: no limit.
    #[serde(default = "default_max_merge_bytes")]
    pub max_merge_bytes: usize,
    /// The most rows a subquery pgshard evaluates before its statement may return (they
    /// become constants in the statement's text); past it the statement fails with 54000.
    /// 0: no limit.
    #[serde(default = "default_max_subquery_rows")]
    pub max_subquery_rows: usize,
}

fn default_max_subquery_rows() -> usize {
    100_000
}

fn default_deadlock_ms() -> u64 {
    1000
}

fn default_max_merge_bytes() -> usize {
    256 * 1024 * 1024
}

fn default_in_doubt_ms() -> u64 {
    60_000
}

/// `two_phase_commit: on | off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TwoPhaseCommit {
    /// PREPARE TRANSACTION everywhere, the decision recorded, then COMMIT PREPARED.
    #[default]
    On,
    /// COMMIT shard by shard: a failure in between leaves some shards committed.
    Off,
}

/// Policy for writes that need every shard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CrossShardWrites {
    /// Refused with 0A000 (the default: usually a missing WHERE on the key).
    #[default]
    Deny,
    /// Run on every shard, all or none as one-phase commit allows.
    Allow,
}

/// How a table's rows are spread over shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardMethod {
    /// PostgreSQL's hash partitioning of the key among the shards.
    Hash,
    /// `[from, to)` ranges of the key.
    Range,
    /// Lists of key values.
    List,
    /// A key -> shard lookup table kept in PostgreSQL.
    Directory,
}

/// One sharded table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardedTableConfig {
    pub table: String,
    pub column: String,
    pub method: ShardMethod,
    /// The key column's type: bigint/integer/smallint, numeric, text/varchar, date,
    /// timestamp/timestamptz, uuid, with the column's modifier where it has one
    /// (`numeric(10,2)`, `timestamptz(0)`, `varchar(20)`), which rounds the keys written.
    /// Default: bigint for hash; for range and list inferred from the bounds (integers,
    /// numbers, dates/timestamps, else text).
    #[serde(default, rename = "type")]
    pub key_type: Option<String>,
    #[serde(default)]
    pub ranges: Vec<RangeConfig>,
    #[serde(default)]
    pub lists: Vec<ListConfig>,
    /// Where keys outside every range/list go; without it they are an error.
    #[serde(default)]
    pub default_shard: Option<usize>,
    /// For `method: directory`: where the key -> shard table is and how new keys get a
    /// shard.
    #[serde(default)]
    pub directory: Option<DirectoryConfig>,
    /// The shards make the key of a row an INSERT leaves it out of (hash-sharded integer
    /// keys): pgshard sends such an INSERT to one shard, whose column default
    /// `pgshard.next_key(...)` (installed by `pgshard keys --apply`) draws a key that
    /// hashes to that shard.
    #[serde(default)]
    pub generate_keys: bool,
}

/// A directory-sharded table's lookup table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryConfig {
    /// The lookup table (created by pgshard if missing); one table can serve several
    /// sharded tables.
    #[serde(default = "default_directory_table")]
    pub table: String,
    /// How a key not in the directory gets its shard when first inserted.
    #[serde(default)]
    pub on_new_key: NewKey,
    /// The shard whose primary holds the lookup table (default: the database's
    /// default_shard).
    #[serde(default)]
    pub shard: Option<usize>,
    /// Keys kept in memory per sharded table.
    #[serde(default = "default_directory_cache")]
    pub cache_size: usize,
}

fn default_directory_table() -> String {
    "pgshard_directory".into()
}

fn default_directory_cache() -> usize {
    100_000
}

/// `on_new_key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NewKey {
    /// PostgreSQL's hash partitioning of the key.
    #[default]
    Hash,
}

/// `[from, to)`; a missing end is open.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeConfig {
    #[serde(default)]
    pub from: Option<yaml_serde::Value>,
    #[serde(default)]
    pub to: Option<yaml_serde::Value>,
    pub shard: usize,
}

/// Values that go to one shard.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListConfig {
    pub values: Vec<yaml_serde::Value>,
    pub shard: usize,
}

impl ShardedTableConfig {
    /// The key type, declared or inferred.
    pub fn key_type(&self) -> crate::sharding::KeyType {
        use crate::sharding::KeyType;
        if let Some((t, _)) = self
            .key_type
            .as_deref()
            .and_then(crate::sharding::column::declared)
        {
            return t;
        }
        if matches!(self.method, ShardMethod::Hash | ShardMethod::Directory) {
            return KeyType::Int;
        }
        let values: Vec<&yaml_serde::Value> = self
            .ranges
            .iter()
            .flat_map(|r| r.from.iter().chain(r.to.iter()))
            .chain(self.lists.iter().flat_map(|l| l.values.iter()))
            .collect();
        let all = |f: &dyn Fn(&yaml_serde::Value) -> bool| {
            !values.is_empty() && values.iter().all(|v| f(v))
        };
        let text = |v: &yaml_serde::Value| match v {
            yaml_serde::Value::String(s) => Some(s.clone()),
            yaml_serde::Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        if all(&|v| v.as_i64().is_some()) {
            KeyType::Int
        } else if all(&|v| text(v).is_some_and(|t| crate::sharding::time::parse(&t).is_ok())) {
            KeyType::Timestamp
        } else if all(&|v| {
            text(v).is_some_and(|t| crate::sharding::value::Decimal::parse(t.trim()).is_ok())
        }) {
            KeyType::Numeric
        } else {
            KeyType::Text
        }
    }
}

impl DatabaseConfig {
    /// The database name on the servers.
    pub fn server_database(&self) -> &str {
        self.server_database.as_deref().unwrap_or(&self.name)
    }
}

impl Config {
    /// Reads, parses and validates a YAML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Config::from_yaml_unchecked(&text)?;
        // Relative certificate paths are relative to the config file, not the cwd.
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(t) = cfg.tls.as_mut() {
            t.cert = base.join(&t.cert);
            t.key = base.join(&t.key);
        }
        let s = &mut cfg.server_tls;
        for p in [&mut s.ca, &mut s.cert, &mut s.key].into_iter().flatten() {
            *p = base.join(&*p);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses and validates YAML text.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let cfg = Config::from_yaml_unchecked(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn from_yaml_unchecked(text: &str) -> Result<Config, ConfigError> {
        yaml_serde::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// The user entry for a name.
    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }

    /// The database entry for a client-facing name.
    pub fn database(&self, name: &str) -> Option<&DatabaseConfig> {
        self.databases.iter().find(|d| d.name == name)
    }

    /// A human-readable description of the topology, for `pgshard check`.
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "listen: {}", self.listen);
        let _ = writeln!(s, "server tls: {}", self.server_tls.mode);
        if let (Some(dir), Ok(a)) = (&self.unix_socket_dir, parse_addr(&self.listen)) {
            let path = crate::net::socket_path(dir, a.port());
            let _ = writeln!(s, "unix socket: {}", path.display());
        }
        let _ = writeln!(
            s,
            "tls: {}",
            self.tls
                .as_ref()
                .map(|t| format!("cert {} key {}", t.cert.display(), t.key.display()))
                .unwrap_or_else(|| "off".into())
        );
        let _ = writeln!(
            s,
            "pool: mode {:?}, size {}, min_idle {}, checkout timeout {} ms",
            self.pool.mode, self.pool.size, self.pool.min_idle, self.pool.checkout_timeout_ms
        );
        let users: Vec<String> = self
            .users
            .iter()
            .map(|u| format!("{} ({:?})", u.name, u.auth))
            .collect();
        let _ = writeln!(s, "users: {}", users.join(", "));
        for d in &self.databases {
            let _ = writeln!(
                s,
                "database {} -> server database {} as {}, {} shard(s), default shard {}",
                d.name,
                d.server_database(),
                d.server_user,
                d.shards.len(),
                d.default_shard
            );
            for (i, sh) in d.shards.iter().enumerate() {
                let reps = if sh.replicas.is_empty() {
                    "no replicas".to_string()
                } else {
                    format!("replicas {}", sh.replicas.join(", "))
                };
                let _ = writeln!(s, "  shard {i}: primary {}, {reps}", sh.primary);
            }
            for t in &d.sharded_tables {
                let _ = writeln!(
                    s,
                    "  sharded table {} by {} ({:?}, {}){}",
                    t.table,
                    t.column,
                    t.method,
                    t.key_type().name(),
                    if t.generate_keys {
                        ", keys generated by the shards"
                    } else {
                        ""
                    }
                );
            }
            if !d.reference_tables.is_empty() {
                let _ = writeln!(s, "  reference tables: {}", d.reference_tables.join(", "));
            }
            let f = &d.failover;
            let _ = writeln!(
                s,
                "  reads: {:?} ({:?}, {:?}, max lag {} ms); failover {} (check every {} ms, down after {} failures)",
                d.read_from,
                d.load_balance,
                d.consistency,
                d.max_replica_lag_ms.unwrap_or(DEFAULT_MAX_LAG_MS),
                if f.enabled { "on" } else { "off" },
                f.check_interval_ms,
                f.failures_before_down
            );
        }
        if let Some(a) = &self.admin {
            let _ = writeln!(
                s,
                "admin console: {} (users {})",
                a.listen,
                a.users.join(", ")
            );
        }
        if let Some(m) = &self.metrics {
            let _ = writeln!(s, "metrics: http://{}/metrics", m.listen);
        }
        s
    }
}

#[cfg(test)]
mod tests;

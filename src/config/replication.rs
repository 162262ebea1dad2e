//! Per-database settings for replicas and failover: where reads go, how replicas are
//! balanced, what consistency reads get, and when a primary is replaced.

use super::{ConfigError, DatabaseConfig, invalid};
use serde::{Deserialize, Serialize};

/// Which nodes take reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadFrom {
    /// Everything goes to the primary (replicas are only failover candidates).
    #[default]
    Primary,
    /// Reads go to healthy replicas; the primary only when no replica qualifies.
    Replicas,
    /// Reads are balanced over the primary and the healthy replicas.
    Any,
}

/// How reads are spread over the eligible nodes of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalance {
    #[default]
    RoundRobin,
    Random,
    /// The node with the fewest transactions in flight through this pgshard.
    LeastOutstanding,
}

/// What reads on replicas guarantee a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// A client's reads see its own committed writes, and never go back in time.
    #[default]
    ReadYourWrites,
    /// Reads go to any replica within the lag bounds.
    Eventual,
    /// Every read sees every commit this pgshard process acknowledged before the read
    /// began, whichever client made it (and never goes back in time): read-your-writes
    /// across an application's pooled connections. Commits are acknowledged only once
    /// their WAL position is known, and reads go to the primary until a replica is
    /// known to have replayed them.
    ReadAcknowledgedWrites,
}

/// Health checks and automatic failover.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// Whether pgshard promotes a replica when a primary is down (checks run regardless).
    pub enabled: bool,
    pub check_interval_ms: u64,
    /// A check that takes longer than this fails.
    pub check_timeout_ms: u64,
    /// Consecutive failed checks before a node is down.
    pub failures_before_down: u32,
    /// The role health checks and promotions use (pg_promote and ALTER SYSTEM need a
    /// superuser, or grants on them); default: the database's `server_user`.
    pub user: Option<String>,
    pub password: Option<String>,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            enabled: true,
            check_interval_ms: 500,
            check_timeout_ms: 1000,
            failures_before_down: 3,
            user: None,
            password: None,
        }
    }
}

/// Default lag bound when none is configured.
pub const DEFAULT_MAX_LAG_MS: u64 = 1000;

/// Checks the replica and failover keys of a database entry.
pub(super) fn validate(d: &DatabaseConfig, key: &str) -> Result<(), ConfigError> {
    let f = &d.failover;
    if f.check_interval_ms == 0 {
        return Err(invalid(
            format!("{key}.failover.check_interval_ms"),
            "must be positive",
        ));
    }
    if f.check_timeout_ms == 0 {
        return Err(invalid(
            format!("{key}.failover.check_timeout_ms"),
            "must be positive",
        ));
    }
    if f.failures_before_down == 0 {
        return Err(invalid(
            format!("{key}.failover.failures_before_down"),
            "must be at least 1",
        ));
    }
    for (i, w) in d.writing_functions.iter().enumerate() {
        if w.is_empty()
            || !w
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '.')
        {
            return Err(invalid(
                format!("{key}.writing_functions[{i}]"),
                format!("'{w}' is not a function name"),
            ));
        }
    }
    for (s, shard) in d.shards.iter().enumerate() {
        let (replicas, Some(w)) = (shard.replicas.len(), &shard.weights) else {
            continue;
        };
        let wkey = format!("{key}.shards[{s}].weights");
        if w.len() != replicas + 1 {
            return Err(invalid(
                wkey,
                format!(
                    "needs {} numbers: the primary's weight, then one per replica",
                    replicas + 1
                ),
            ));
        }
        if w.iter().all(|&x| x == 0) {
            return Err(invalid(wkey, "at least one weight must be positive"));
        }
    }
    Ok(())
}

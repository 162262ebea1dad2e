//! The topology pgshard routes over: per database, its shards and their nodes' pools.
//!
//! Built once from a validated [`Config`] and shared read-only (health checks, lag and
//! failover will swap a new snapshot in, never lock the per-message path).

use crate::backend::BackendTarget;
use crate::config::{Config, DatabaseConfig, parse_addr};
use crate::pool::NodePool;
use crate::router::Router;
use std::collections::HashMap;
use std::sync::Arc;

/// One shard's pools.
pub struct Shard {
    pub primary: NodePool,
    pub replicas: Vec<NodePool>,
}

/// A logical database: its routing rules and its shards.
pub struct Database {
    pub config: DatabaseConfig,
    pub router: Router,
    pub shards: Vec<Shard>,
}

/// All databases, by client-facing name.
pub struct Topology {
    pub databases: HashMap<String, Arc<Database>>,
}

impl Topology {
    /// Builds pools for every node; pools of the same (node, database, user) are shared
    /// between logical databases.
    pub fn build(cfg: &Config) -> Topology {
        let mut pools: HashMap<BackendTarget, NodePool> = HashMap::new();
        let mut pool_for = |addr: &str, d: &DatabaseConfig| {
            let target = BackendTarget {
                addr: parse_addr(addr).expect("validated at load"),
                database: d.server_database().to_string(),
                user: d.server_user.clone(),
                password: d.server_password.clone(),
            };
            pools
                .entry(target.clone())
                .or_insert_with(|| NodePool::new(target, &cfg.pool))
                .clone()
        };
        let databases = cfg
            .databases
            .iter()
            .map(|d| {
                let shards = d
                    .shards
                    .iter()
                    .map(|s| Shard {
                        primary: pool_for(&s.primary, d),
                        replicas: s.replicas.iter().map(|r| pool_for(r, d)).collect(),
                    })
                    .collect();
                let db = Database {
                    config: d.clone(),
                    router: Router::new(d),
                    shards,
                };
                (d.name.clone(), Arc::new(db))
            })
            .collect();
        Topology { databases }
    }
}

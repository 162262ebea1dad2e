//! pgshard: a PostgreSQL-wire-compatible sharding proxy.
//!
//! See README.md (ARCHITECTURE) for how a query travels through these modules.

pub mod admin;
pub mod backend;
pub mod cluster;
pub mod config;
pub mod exec;
pub mod frontend;
pub mod local;
pub mod metrics;
pub mod net;
pub mod pool;
pub mod protocol;
pub mod router;
pub mod sharding;
pub mod sql;

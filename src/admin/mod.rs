//! Operating pgshard: the admin console (PostgreSQL protocol, `psql -d pgshard`) and the
//! Prometheus endpoint.

pub mod console;
pub mod http;
pub mod metrics;
mod nodes;

/// The database name admin clients connect to.
pub const DATABASE: &str = "pgshard";

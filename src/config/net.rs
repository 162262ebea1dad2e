//! Where pgshard listens and how it speaks TLS: the admin console's and the metrics
//! endpoint's addresses, TLS for clients, TLS towards the servers, and the address syntax.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// The admin console.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: String,
    /// Users (from `users`) allowed in; they connect to the database `pgshard`.
    pub users: Vec<String>,
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub listen: String,
}

pub(super) fn default_listen() -> String {
    "127.0.0.1:6432".into()
}

/// Certificate and key (PEM files) for TLS towards clients.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// TLS towards the servers, with libpq's `sslmode` semantics. Not used on Unix-domain
/// sockets (as libpq).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    #[serde(default)]
    pub mode: ServerTlsMode,
    /// CA certificates (PEM) server certificates must chain to: for `verify-ca` and
    /// `verify-full`, and for `require` when given (as libpq with a root certificate).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// A client certificate chain and its key (PEM), for servers that authenticate pgshard
    /// by certificate.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// libpq's `sslmode` values pgshard implements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTlsMode {
    /// Plain connections.
    Disable,
    /// TLS when the server offers it, without checking its certificate.
    #[default]
    Prefer,
    /// TLS or no connection; the certificate is checked against `ca` when given.
    Require,
    /// TLS, with a certificate issued under `ca`.
    VerifyCa,
    /// As `verify-ca`, and the certificate names the node's address.
    VerifyFull,
}

impl std::fmt::Display for ServerTlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ServerTlsMode::Disable => "disable",
            ServerTlsMode::Prefer => "prefer",
            ServerTlsMode::Require => "require",
            ServerTlsMode::VerifyCa => "verify-ca",
            ServerTlsMode::VerifyFull => "verify-full",
        })
    }
}

/// Parses `host:port`; only numeric addresses and `localhost` are accepted, so that the
/// configuration never depends on DNS.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let t = s.replace("localhost:", "127.0.0.1:");
    t.parse::<SocketAddr>()
        .map_err(|_| format!("'{s}' is not an address of the form host:port (e.g. 127.0.0.1:5432)"))
}

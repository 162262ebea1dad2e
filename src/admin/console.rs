//! The admin console: `psql -h 127.0.0.1 -p <admin port> -U admin pgshard`. Commands are
//! answered as PostgreSQL result sets (text columns), so psql shows tables.

use crate::frontend::{ClientReader, ClientWriter, Server};
use crate::protocol::{self, PgError};
use bytes::{BufMut, BytesMut};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// ParameterStatus sent at startup (what psql and drivers look for).
pub const GREETING: &[(&str, &str)] = &[
    ("server_version", "15.0 (pgshard admin console)"),
    ("server_encoding", "UTF8"),
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, MDY"),
    ("integer_datetimes", "on"),
    ("standard_conforming_strings", "on"),
];

const COMMANDS: &str = "SHOW SHARDS | SERVERS | POOLS | CLIENTS | STATS | TABLES | CONFIG | VERSION, \
     RELOAD, PAUSE [db], RESUME [db], FAILOVER [db] <shard> [TO <node>], SWITCHOVER [db] <shard> [TO <node>], BAN <node>, UNBAN <node>";

/// A result set.
struct Table {
    columns: &'static [&'static str],
    rows: Vec<Vec<String>>,
}

impl Table {
    fn write(&self, out: &mut BytesMut) {
        let mut body = BytesMut::new();
        body.put_i16(self.columns.len() as i16);
        for c in self.columns {
            body.put_slice(c.as_bytes());
            body.put_u8(0);
            body.put_i32(0); // table oid
            body.put_i16(0); // column number
            body.put_i32(25); // text
            body.put_i16(-1);
            body.put_i32(-1);
            body.put_i16(0); // text format
        }
        protocol::write_msg(out, b'T', &body);
        for r in &self.rows {
            body.clear();
            body.put_i16(r.len() as i16);
            for v in r {
                body.put_i32(v.len() as i32);
                body.put_slice(v.as_bytes());
            }
            protocol::write_msg(out, b'D', &body);
        }
        complete(out, &format!("SHOW {}", self.rows.len()));
    }
}

fn complete(out: &mut BytesMut, tag: &str) {
    protocol::write_complete(out, tag);
}

/// Serves one admin client until it leaves.
pub async fn run(
    server: Arc<Server>,
    mut reader: ClientReader,
    mut writer: ClientWriter,
    mut buf: BytesMut,
) -> anyhow::Result<()> {
    let max = server.state.load().config.limits.max_message_size;
    let mut out = BytesMut::new();
    protocol::write_ready(&mut out, b'I');
    let mut skipping = false;
    loop {
        while let Some(n) = protocol::frame_len(&buf, max)? {
            let frame = buf.split_to(n);
            match frame[0] {
                b'X' => return Ok(()),
                b'Q' => {
                    let sql = protocol::parse_query(&frame)?;
                    for cmd in sql.split(';').map(str::trim).filter(|c| !c.is_empty()) {
                        if let Err(e) = execute(&server, cmd, &mut out).await {
                            e.write(&mut out);
                            break;
                        }
                    }
                    if sql.trim().trim_matches(';').trim().is_empty() {
                        protocol::write_msg(&mut out, b'I', &[]);
                    }
                    protocol::write_ready(&mut out, b'I');
                }
                b'S' => {
                    skipping = false;
                    protocol::write_ready(&mut out, b'I');
                }
                _ if skipping => {}
                _ => {
                    skipping = true;
                    PgError::new(
                        "0A000",
                        "the admin console speaks the simple query protocol only",
                    )
                    .write(&mut out);
                }
            }
        }
        if !out.is_empty() {
            writer.write_all(&out).await?;
            out.clear();
        }
        if reader.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

async fn execute(server: &Arc<Server>, cmd: &str, out: &mut BytesMut) -> Result<(), PgError> {
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let up: Vec<&str> = upper.iter().map(String::as_str).collect();
    match up.as_slice() {
        ["SHOW", what] => {
            let t = match *what {
                "SHARDS" => shards(server),
                "SERVERS" => servers(server),
                "POOLS" => pools(server),
                "CLIENTS" => clients(server),
                "STATS" => stats(server),
                "TABLES" => tables(server),
                "CONFIG" => config(server),
                "VERSION" => Table {
                    columns: &["version"],
                    rows: vec![vec![format!("pgshard {}", env!("CARGO_PKG_VERSION"))]],
                },
                _ => return Err(unknown(cmd)),
            };
            t.write(out);
        }
        ["RELOAD"] => {
            let msg = server
                .reload()
                .map_err(|e| PgError::new("F0000", format!("configuration refused: {e}")))?;
            PgError::new("00000", msg).write_notice(out);
            complete(out, "RELOAD");
        }
        ["PAUSE"] | ["PAUSE", _] => {
            let db = words.get(1).copied();
            let done = server
                .pause(db, Duration::from_secs(60))
                .await
                .map_err(|e| PgError::new("3D000", e))?;
            if !done {
                PgError::new(
                    "00000",
                    "paused; some transactions were still running after 60 s",
                )
                .write_notice(out);
            }
            complete(out, "PAUSE");
        }
        ["RESUME"] | ["RESUME", _] => {
            server
                .resume(words.get(1).copied())
                .map_err(|e| PgError::new("3D000", e))?;
            complete(out, "RESUME");
        }
        ["FAILOVER", ..] => {
            let msg = super::nodes::failover(server, &words[1..]).await?;
            PgError::new("00000", msg).write_notice(out);
            complete(out, "FAILOVER");
        }
        ["SWITCHOVER", ..] => {
            let msg = super::nodes::switchover(server, &words[1..]).await?;
            PgError::new("00000", msg).write_notice(out);
            complete(out, "SWITCHOVER");
        }
        ["BAN", _] | ["UNBAN", _] => {
            super::nodes::ban(server, words[1], up[0] == "BAN")?;
            complete(out, up[0]);
        }
        _ => return Err(unknown(cmd)),
    }
    Ok(())
}

fn unknown(cmd: &str) -> PgError {
    PgError::new("42601", format!("unknown admin command: {cmd}"))
        .with_hint(format!("Valid commands: {COMMANDS}."))
}

fn role_of(v: &crate::cluster::ShardView, n: usize) -> &'static str {
    match v.nodes[n].in_recovery {
        _ if v.primary == Some(n) => "primary",
        _ if v.nodes[n].fenced => "fenced",
        Some(true) => "replica",
        Some(false) => "primary (not used)",
        None => "unknown",
    }
}

fn health_of(st: &crate::cluster::NodeState) -> &'static str {
    match (st.up, st.failures) {
        (false, _) => "down",
        (true, 0) if st.checked_at.is_some() => "up",
        (true, 0) => "unchecked",
        (true, _) => "failing",
    }
}

pub(super) fn dbs(server: &Server) -> Vec<(String, Arc<crate::cluster::Database>)> {
    let state = server.state.load();
    let mut v: Vec<_> = state
        .topology
        .databases
        .iter()
        .map(|(n, d)| (n.clone(), d.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn shards(server: &Server) -> Table {
    let mut rows = Vec::new();
    for (name, db) in dbs(server) {
        for (s, shard) in db.shards.iter().enumerate() {
            let v = shard.view();
            let primary = v
                .primary
                .map(|p| shard.nodes[p].addr.clone())
                .unwrap_or_default();
            let replicas: Vec<String> = (0..shard.nodes.len())
                .filter(|&n| Some(n) != v.primary)
                .map(|n| format!("{} ({})", shard.nodes[n].addr, health_of(&v.nodes[n])))
                .collect();
            let state = if v.primary.is_none() {
                "no primary"
            } else if v.nodes.iter().any(|n| !n.up || n.fenced) {
                "degraded"
            } else {
                "ok"
            };
            rows.push(vec![
                name.clone(),
                s.to_string(),
                primary,
                replicas.join(", "),
                state.into(),
            ]);
        }
    }
    Table {
        columns: &["database", "shard", "primary", "replicas", "state"],
        rows,
    }
}

fn servers(server: &Server) -> Table {
    let mut rows = Vec::new();
    for (name, db) in dbs(server) {
        for (s, shard) in db.shards.iter().enumerate() {
            let v = shard.view();
            for (n, node) in shard.nodes.iter().enumerate() {
                let st = &v.nodes[n];
                let ps = node.pool.state();
                let replica = v.primary != Some(n) && st.in_recovery == Some(true);
                rows.push(vec![
                    name.clone(),
                    s.to_string(),
                    node.addr.clone(),
                    role_of(&v, n).into(),
                    health_of(st).into(),
                    st.timeline.to_string(),
                    format!("{:X}/{:X}", st.lsn >> 32, st.lsn & 0xffff_ffff),
                    if replica {
                        st.lag_bytes.to_string()
                    } else {
                        String::new()
                    },
                    if replica {
                        st.lag_ms.to_string()
                    } else {
                        String::new()
                    },
                    st.fenced.to_string(),
                    node.is_banned().to_string(),
                    ps.connections
                        .saturating_sub(ps.idle_connections)
                        .to_string(),
                    ps.idle_connections.to_string(),
                    st.last_error.clone().unwrap_or_default(),
                ]);
            }
        }
    }
    Table {
        columns: &[
            "database",
            "shard",
            "node",
            "role",
            "health",
            "timeline",
            "lsn",
            "lag_bytes",
            "lag_ms",
            "fenced",
            "banned",
            "pool_in_use",
            "pool_idle",
            "last_error",
        ],
        rows,
    }
}

fn pools(server: &Server) -> Table {
    let mut rows = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (_, db) in dbs(server) {
        for shard in &db.shards {
            for node in &shard.nodes {
                let p = &node.pool;
                if !seen.insert((
                    p.target.addr.clone(),
                    p.target.database.clone(),
                    p.target.user.clone(),
                )) {
                    continue;
                }
                let ps = p.state();
                let q = |x: f64| {
                    p.stats()
                        .checkout
                        .quantile(x)
                        .map(|v| format!("{:.3}", v * 1000.0))
                        .unwrap_or_default()
                };
                rows.push(vec![
                    node.addr.clone(),
                    p.target.database.clone(),
                    p.target.user.clone(),
                    p.config().size.to_string(),
                    ps.connections
                        .saturating_sub(ps.idle_connections)
                        .to_string(),
                    ps.idle_connections.to_string(),
                    p.stats()
                        .waiting
                        .load(std::sync::atomic::Ordering::Relaxed)
                        .to_string(),
                    q(0.99),
                ]);
            }
        }
    }
    Table {
        columns: &[
            "node",
            "server_database",
            "user",
            "size",
            "in_use",
            "idle",
            "waiting",
            "checkout_p99_ms",
        ],
        rows,
    }
}

fn clients(server: &Server) -> Table {
    let rows = server
        .clients()
        .iter()
        .map(|c| {
            let srv = c.slot.get();
            let state = match (c.slot.status(), srv.is_some()) {
                (b'T', _) => "in transaction",
                (b'E', _) => "failed transaction",
                (_, true) => "active",
                _ => "idle",
            };
            let since = c
                .since
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs().to_string())
                .unwrap_or_default();
            vec![
                c.peer.to_string(),
                c.user.clone(),
                c.database.clone(),
                state.into(),
                srv.map(|(a, pid, _)| format!("{a} (pid {pid})"))
                    .unwrap_or_default(),
                (c.slot.status() != b'I').to_string(),
                since,
            ]
        })
        .collect();
    Table {
        columns: &[
            "address",
            "user",
            "database",
            "state",
            "server",
            "in_transaction",
            "connected_since",
        ],
        rows,
    }
}

fn stats(server: &Server) -> Table {
    use std::sync::atomic::Ordering::Relaxed;
    let mut rows = Vec::new();
    for (name, db) in dbs(server) {
        for (s, shard) in db.shards.iter().enumerate() {
            let st = &shard.stats;
            let ms = |q: f64| {
                st.latency
                    .quantile(q)
                    .map(|v| format!("{:.3}", v * 1000.0))
                    .unwrap_or_default()
            };
            let errors: u64 = st.errors().values().sum();
            rows.push(vec![
                name.clone(),
                s.to_string(),
                st.queries.load(Relaxed).to_string(),
                st.transactions.load(Relaxed).to_string(),
                errors.to_string(),
                ms(0.5),
                ms(0.99),
                st.cross_shard.load(Relaxed).to_string(),
                st.broadcast.load(Relaxed).to_string(),
            ]);
        }
    }
    Table {
        columns: &[
            "database",
            "shard",
            "queries",
            "transactions",
            "errors",
            "latency_p50_ms",
            "latency_p99_ms",
            "cross_shard",
            "broadcast",
        ],
        rows,
    }
}

/// The sharded tables, with their key columns' types as the servers have them.
fn tables(server: &Server) -> Table {
    use crate::sharding::column::Observed;
    let mut rows = Vec::new();
    for (name, db) in dbs(server) {
        for f in &db.router.rules.tables {
            let (server_type, state) = match f.key.observed() {
                Observed::Unknown => (String::new(), "not read yet"),
                Observed::Missing => (String::new(), "no such column"),
                Observed::Type { name, matches } => {
                    (name, if matches { "ok" } else { "type differs" })
                }
            };
            rows.push(vec![
                name.clone(),
                f.table.clone(),
                f.column.clone(),
                f.method().into(),
                f.ty.name().into(),
                server_type,
                state.into(),
            ]);
        }
    }
    Table {
        columns: &[
            "database",
            "table",
            "column",
            "method",
            "key_type",
            "server_type",
            "state",
        ],
        rows,
    }
}

/// The running configuration as key/value rows, secrets masked.
fn config(server: &Server) -> Table {
    let state = server.state.load();
    let value = yaml_serde::to_value(&state.config).unwrap_or(yaml_serde::Value::Null);
    let mut rows = Vec::new();
    flatten("", &value, &mut rows);
    Table {
        columns: &["key", "value"],
        rows,
    }
}

fn flatten(prefix: &str, v: &yaml_serde::Value, rows: &mut Vec<Vec<String>>) {
    use yaml_serde::Value;
    match v {
        Value::Mapping(m) => {
            for (k, v) in m {
                let k = k.as_str().unwrap_or("?");
                let key = if prefix.is_empty() {
                    k.to_string()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, rows);
            }
        }
        Value::Sequence(s) => {
            for (i, v) in s.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, rows);
            }
        }
        Value::Null => {}
        other => {
            let text = if prefix.ends_with("password") {
                "********".to_string()
            } else {
                match other {
                    Value::String(s) => s.clone(),
                    Value::Bool(b) => b.to_string(),
                    Value::Number(n) => n.to_string(),
                    _ => yaml_serde::to_string(other)
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                }
            };
            rows.push(vec![prefix.to_string(), text]);
        }
    }
}

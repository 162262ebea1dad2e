//! Admin console commands that change which node serves what: FAILOVER, SWITCHOVER,
//! BAN and UNBAN.

use super::console::dbs;
use crate::frontend::Server;
use crate::protocol::PgError;
use std::sync::Arc;
use std::time::Duration;

/// What `FAILOVER`/`SWITCHOVER [db] <shard> [TO <node>]` names: the database (its name
/// and topology), the shard, and the node (by address or index) if given.
type ShardTarget = (String, Arc<crate::cluster::Database>, usize, Option<usize>);

fn shard_target(server: &Arc<Server>, cmd: &str, args: &[&str]) -> Result<ShardTarget, PgError> {
    let usage = || {
        PgError::new(
            "42601",
            format!("usage: {cmd} [database] <shard> [TO <node address or index>]"),
        )
    };
    let all = dbs(server);
    let ((name, db), rest) = match args.first().map(|a| a.parse::<usize>()) {
        Some(Ok(_)) => match all.as_slice() {
            [one] => (one.clone(), args),
            _ => {
                return Err(PgError::new(
                    "42601",
                    format!("several databases: name one ({cmd} <database> <shard>)"),
                ));
            }
        },
        Some(Err(_)) => {
            let name = args[0];
            let found = all
                .iter()
                .find(|(n, _)| n == name)
                .cloned()
                .ok_or_else(|| {
                    PgError::new("3D000", format!("database \"{name}\" does not exist"))
                })?;
            (found, &args[1..])
        }
        None => return Err(usage()),
    };
    let shard: usize = rest
        .first()
        .and_then(|s| s.parse().ok())
        .ok_or_else(usage)?;
    if shard >= db.shards.len() {
        return Err(PgError::new(
            "22023",
            format!("shard {shard} does not exist"),
        ));
    }
    let to = match rest.get(1..) {
        Some([]) | None => None,
        Some([kw, node]) if kw.eq_ignore_ascii_case("to") => Some(
            db.shards[shard]
                .nodes
                .iter()
                .position(|n| n.addr == *node)
                .or_else(|| node.parse().ok())
                .ok_or_else(|| {
                    PgError::new("22023", format!("shard {shard} has no node {node}"))
                })?,
        ),
        _ => return Err(usage()),
    };
    Ok((name, db, shard, to))
}

/// `FAILOVER [db] <shard> [TO <node>]`: promotes a replica, whatever the primary's state.
pub(super) async fn failover(server: &Arc<Server>, args: &[&str]) -> Result<String, PgError> {
    let (_, db, shard, to) = shard_target(server, "FAILOVER", args)?;
    let n = db
        .failover(shard, to)
        .await
        .map_err(|e| PgError::new("55000", e.to_string()))?;
    Ok(format!(
        "shard {shard}: {} is the primary",
        db.shards[shard].nodes[n].addr
    ))
}

/// `SWITCHOVER [db] <shard> [TO <node>]`: a planned switchover with the primary running
/// (see `cluster/switchover.rs`); the database's clients wait meanwhile (PAUSE/RESUME).
pub(super) async fn switchover(server: &Arc<Server>, args: &[&str]) -> Result<String, PgError> {
    let (name, db, shard, to) = shard_target(server, "SWITCHOVER", args)?;
    let within = Duration::from_secs(30);
    let drained = server
        .pause(Some(&name), within)
        .await
        .map_err(|e| PgError::new("3D000", e))?;
    let r = if drained {
        db.switchover(shard, to, within)
            .await
            .map_err(|e| PgError::new("55000", e.to_string()))
    } else {
        Err(PgError::new(
            "55000",
            format!("switchover refused: transactions still running after {within:?}"),
        ))
    };
    let _ = server.resume(Some(&name));
    let n = r?;
    Ok(format!(
        "shard {shard}: {} is the primary; the old primary is read-only and fenced until it rejoins as a replica",
        db.shards[shard].nodes[n].addr
    ))
}

/// `BAN <node>` / `UNBAN <node>`: by address, in every database that has the node.
pub(super) fn ban(server: &Server, addr: &str, banned: bool) -> Result<(), PgError> {
    let mut found = false;
    for (_, db) in dbs(server) {
        for (s, shard) in db.shards.iter().enumerate() {
            for (n, node) in shard.nodes.iter().enumerate() {
                if node.addr != addr {
                    continue;
                }
                if banned && shard.view().primary == Some(n) {
                    return Err(PgError::new(
                        "55000",
                        format!("{addr} is the primary of shard {s}: FAILOVER first"),
                    ));
                }
                node.banned
                    .store(banned, std::sync::atomic::Ordering::Relaxed);
                found = true;
            }
        }
    }
    if !found {
        return Err(PgError::new(
            "22023",
            format!("no node {addr} in the configuration"),
        ));
    }
    Ok(())
}

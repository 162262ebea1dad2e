//! Installs and checks, on every shard primary, what makes the shards generate the keys of
//! `generate_keys` tables (the SQL is in `sharding::keys`). Used by `pgshard keys` and
//! `pgshard check`.

use super::{Control, Database};
use crate::sharding::keys;
use std::time::Duration;

/// Setup statements may wait for locks on busy tables.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// What was found or done on one shard.
#[derive(Debug)]
pub struct ShardReport {
    pub shard: usize,
    /// The primary, as configured.
    pub primary: String,
    /// Per table: Ok, or what is wrong.
    pub tables: Vec<(String, Result<(), String>)>,
}

impl ShardReport {
    pub fn ok(&self) -> bool {
        self.tables.iter().all(|(_, r)| r.is_ok())
    }
}

/// The tables whose keys the shards generate.
fn generating(db: &Database) -> impl Iterator<Item = &crate::sharding::ShardFn> {
    db.router.rules.tables.iter().filter(|t| t.generate_keys)
}

fn control(db: &Database, shard: usize, timeout: Duration) -> Result<(Control, String), String> {
    let p = db.primary(shard).map_err(|e| e.to_string())?;
    let node = &db.shards[shard].nodes[p];
    Ok((
        Control::as_server_user(db, node, timeout),
        node.addr.clone(),
    ))
}

/// Whether `shard` makes the keys of table `t`: Ok(Ok(())), Ok(Err(what is wrong)), or
/// Err when the shard could not be asked.
async fn table_keys(
    c: &mut Control,
    t: &crate::sharding::ShardFn,
    shard: usize,
    shards: usize,
) -> Result<Result<(), String>, String> {
    let rows = c.query(&keys::default_query(t)).await?;
    Ok(match rows.first().map(|r| r[0].as_deref()) {
        None => Err("no such table or column".to_string()),
        Some(Some(d)) if keys::is_default_for(d, shard, shards) => Ok(()),
        Some(Some(d)) => Err(format!(
            "its default is {d}, not pgshard.next_key(.., {shard}, {shards})"
        )),
        Some(None) => Err("it has no default".to_string()),
    })
}

/// Whether every shard's default and constraint are in place for each generating table.
pub async fn check(db: &Database) -> Vec<ShardReport> {
    let shards = db.shards.len();
    let mut out = Vec::new();
    for s in 0..shards {
        let (mut c, primary) = match control(db, s, CHECK_TIMEOUT) {
            Ok(x) => x,
            Err(e) => {
                out.push(ShardReport {
                    shard: s,
                    primary: String::new(),
                    tables: vec![(String::new(), Err(e))],
                });
                continue;
            }
        };
        let mut tables = Vec::new();
        for t in generating(db) {
            let name = format!("{}.{}", t.table, t.column);
            let r = table_keys(&mut c, t, s, shards).await.and_then(|r| r);
            tables.push((name, r));
        }
        out.push(ShardReport {
            shard: s,
            primary,
            tables,
        });
    }
    out
}

/// Why a shard's generated keys could not be confirmed.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The shard's primary did not answer.
    #[error("shard {0}: {1}")]
    Unreachable(usize, String),
    #[error("{0}")]
    NotReady(String),
}

impl KeysError {
    /// The SQLSTATE a client gets.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            KeysError::Unreachable(..) => "08006",
            KeysError::NotReady(_) => "0A000",
        }
    }
}

/// Checks that `shard` generates the keys of `tables` (indexes of sharded tables), and
/// remembers it; an error saying what is missing otherwise.
pub async fn verify(db: &Database, shard: usize, tables: &[usize]) -> Result<(), KeysError> {
    let shards = db.shards.len();
    let unreachable = |e: String| KeysError::Unreachable(shard, e);
    let (mut c, _) = control(db, shard, CHECK_TIMEOUT).map_err(unreachable)?;
    for &t in tables {
        if db.keys_ready(t, shard) {
            continue;
        }
        let f = &db.router.rules.tables[t];
        match table_keys(&mut c, f, shard, shards)
            .await
            .map_err(unreachable)?
        {
            Ok(()) => db.set_keys_ready(t, shard),
            Err(why) => {
                return Err(KeysError::NotReady(format!(
                    "shard {shard} does not generate the keys of {}.{} ({why}); run `pgshard keys --config FILE --apply`",
                    f.table, f.column
                )));
            }
        }
    }
    Ok(())
}

/// Installs the functions, sequences, defaults and constraints on every shard primary (each
/// shard in one transaction; running it again is harmless).
pub async fn apply(db: &Database) -> Vec<ShardReport> {
    let shards = db.shards.len();
    let tables: Vec<_> = generating(db).cloned().collect();
    let mut out = Vec::new();
    for s in 0..shards {
        let Some(sql) = keys::shard_sql(&tables, s, shards) else {
            break;
        };
        let (result, primary) = match control(db, s, SETUP_TIMEOUT) {
            Ok((mut c, primary)) => (c.query(&sql).await.map(|_| ()), primary),
            Err(e) => (Err(e), String::new()),
        };
        out.push(ShardReport {
            shard: s,
            primary,
            tables: tables
                .iter()
                .map(|t| (format!("{}.{}", t.table, t.column), result.clone()))
                .collect(),
        });
    }
    out
}

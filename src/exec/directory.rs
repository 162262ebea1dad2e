//! Directory sharding's PostgreSQL side: the lookup table `(tbl, key) -> shard` on the
//! directory's shard primary, created if missing. A key's entry is read when it is not
//! cached; an INSERT of a key with no entry records one, chosen with `on_new_key`, with
//! `INSERT ... ON CONFLICT DO NOTHING` and a read back, so that concurrent routers agree.
//! A key with no entry lives where `on_new_key` puts it.

use crate::cluster::Database;
use crate::sharding::ShardFn;
use crate::sql::quote_literal;

/// The shard of `key` in `f`'s directory, cached when the directory has an entry (with
/// `record`, one is made for a key that has none).
pub async fn lookup(
    db: &Database,
    f: &ShardFn,
    key: &str,
    record: bool,
) -> Result<(usize, bool), String> {
    let dir = f.directory().ok_or("not a directory-sharded table")?;
    let n = db.shards.len();
    let node = dir.shard.unwrap_or(db.config.default_shard);
    let mut c = crate::exec::checkout_primary(db, node)
        .await
        .map_err(|e| format!("directory on shard {node}: {e}"))?;
    let table = format!("public.{}", dir.table);
    let create = format!(
        "CREATE TABLE IF NOT EXISTS {table} (tbl text NOT NULL, key text NOT NULL, shard int NOT NULL, PRIMARY KEY (tbl, key))"
    );
    if !dir.ready.load(std::sync::atomic::Ordering::Relaxed) {
        match c.run_quiet(&create).await.map_err(|e| e.to_string())? {
            // Two creators at once: the loser fails on a catalog unique index.
            None => {}
            Some((code, _)) if ["23505", "42P07", "42710"].contains(&code.as_str()) => {}
            Some((code, msg)) => return Err(format!("creating {table}: {code}: {msg}")),
        }
        dir.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let select = format!(
        "SELECT shard FROM {table} WHERE tbl = {} AND key = {}",
        quote_literal(&f.table),
        quote_literal(key)
    );
    let read = |rows: Vec<Vec<Option<String>>>| -> Option<usize> {
        rows.first()?.first()?.as_deref()?.parse().ok()
    };
    if let Some(s) = read(c.query_rows(&select).await.map_err(|e| e.to_string())?) {
        if s >= n {
            return Err(format!(
                "the directory puts {} key {key} on shard {s}, which does not exist",
                f.table
            ));
        }
        dir.put(key.to_string(), s);
        return Ok((s, true));
    }
    let new = f.hash_shard(key, n).map_err(|e| e.to_string())?;
    if !record {
        return Ok((new, false));
    }
    let insert = format!(
        "INSERT INTO {table} (tbl, key, shard) VALUES ({}, {}, {new}) ON CONFLICT DO NOTHING",
        quote_literal(&f.table),
        quote_literal(key)
    );
    if let Some((code, msg)) = c.run_quiet(&insert).await.map_err(|e| e.to_string())? {
        return Err(format!(
            "recording {} key {key} in {table}: {code}: {msg}",
            f.table
        ));
    }
    // Another router may have recorded it first: its entry stands.
    let s = read(c.query_rows(&select).await.map_err(|e| e.to_string())?)
        .ok_or("the directory entry vanished after it was recorded")?;
    dir.put(key.to_string(), s);
    Ok((s, true))
}

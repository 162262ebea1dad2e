//! What routing needs from the servers' catalogs, read by the database's monitor from the
//! default shard's primary (the shards share their schema): the names of user-defined
//! aggregates, and the types of the sharded tables' key columns.

use super::Database;
use super::health::Control;
use crate::sharding::column::Observed;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// The monitor connection to the default shard's primary.
fn default_primary<'c>(db: &Database, controls: &'c mut [Vec<Control>]) -> Option<&'c mut Control> {
    let s = db.config.default_shard;
    let p = db.shards.get(s).and_then(|sh| sh.view().primary)?;
    controls.get_mut(s).and_then(|c| c.get_mut(p))
}

/// Rounds of reading after DDL went through pgshard (see `Database::catalog_rounds`).
const ROUNDS_AFTER_DDL: u8 = 3;

impl Database {
    /// DDL went through pgshard: the monitor reads the catalogs in its next rounds.
    pub fn ddl_seen(&self) {
        self.catalog_rounds
            .store(ROUNDS_AFTER_DDL, Ordering::Relaxed);
    }
}

/// Whether this round reads the catalogs out of turn: after DDL, or while a sharded
/// table's key column has not been found (a table not created yet: a key written before
/// its column's modifier is known is placed as written).
pub(super) fn due(db: &Database) -> bool {
    let after_ddl = db
        .catalog_rounds
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok();
    after_ddl
        || db
            .router
            .rules
            .tables
            .iter()
            .any(|f| matches!(f.key.observed(), Observed::Unknown | Observed::Missing))
}

/// Reads everything; on failure what was read last stays.
pub(super) async fn read(db: &Database, controls: &mut [Vec<Control>]) {
    let Some(c) = default_primary(db, controls) else {
        return;
    };
    read_user_aggregates(db, c).await;
    read_key_columns(db, c).await;
}

/// The names of user-defined aggregates.
async fn read_user_aggregates(db: &Database, c: &mut Control) {
    match c
        .query("SELECT DISTINCT proname::text FROM pg_catalog.pg_proc WHERE prokind = 'a' AND pronamespace <> 'pg_catalog'::pg_catalog.regnamespace")
        .await
    {
        Ok(rows) => {
            let mut names: Vec<String> = rows
                .into_iter()
                .filter_map(|r| r.into_iter().next().flatten())
                .collect();
            names.sort();
            if **db.user_aggregates.load() != names {
                db.user_aggregates.store(Arc::new(names));
                db.user_aggregates_version
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(e) => tracing::debug!(error = %e, "could not read the user-defined aggregates"),
    }
}

/// The query for the key columns of `tables` ((table, column) as configured): per table
/// in order, the base type's name (through a domain), its modifier, and the column's type
/// as PostgreSQL writes it; NULLs where there is no such column.
fn key_columns_sql(tables: &[(&str, &str)]) -> String {
    use crate::sql::quote_literal;
    let keys: Vec<String> = tables
        .iter()
        .enumerate()
        .map(|(i, (t, c))| format!("({i}, {}, {})", quote_literal(t), quote_literal(c)))
        .collect();
    format!(
        "SELECT (CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END)::pg_catalog.regtype::pg_catalog.text, \
         (CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END)::pg_catalog.text, \
         pg_catalog.format_type(a.atttypid, a.atttypmod) \
         FROM (VALUES {}) AS k(i, tbl, col) \
         LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = pg_catalog.to_regclass(k.tbl) \
         AND a.attname = k.col AND a.attnum > 0 AND NOT a.attisdropped \
         LEFT JOIN pg_catalog.pg_type t ON t.oid = a.atttypid ORDER BY k.i",
        keys.join(", ")
    )
}

/// The sharded tables' key columns: their modifiers round the keys written (see
/// `sharding::column`); a column of another type than the configured one is reported.
async fn read_key_columns(db: &Database, c: &mut Control) {
    let tables = &db.router.rules.tables;
    if tables.is_empty() {
        return;
    }
    let names: Vec<(&str, &str)> = tables
        .iter()
        .map(|f| (f.table.as_str(), f.column.as_str()))
        .collect();
    let rows = match c.query(&key_columns_sql(&names)).await {
        Ok(rows) if rows.len() == tables.len() => rows,
        Ok(_) => return,
        Err(e) => {
            tracing::debug!(error = %e, "could not read the shard keys' column types");
            return;
        }
    };
    for (f, row) in tables.iter().zip(rows) {
        let found = match row.as_slice() {
            [Some(base), Some(typmod), Some(name)] => typmod
                .parse()
                .ok()
                .map(|m| (base.as_str(), m, name.as_str())),
            _ => None,
        };
        let Some(seen) = f.key.observe(f.ty, found) else {
            continue;
        };
        let (db_name, table, column) = (&db.config.name, &f.table, &f.column);
        match seen {
            Observed::Type {
                name,
                matches: true,
            } => tracing::info!(
                database = %db_name, %table, %column, r#type = %name,
                "shard key column read from the servers; keys written are placed as it stores them"
            ),
            Observed::Type {
                name,
                matches: false,
            } => tracing::warn!(
                database = %db_name, %table, %column, r#type = %name,
                configured = f.ty.name(),
                "shard key column has another type on the servers than pgshard reads its keys as: set the table's `type` in the configuration (keys read as another type can place rows where reads of them never look)"
            ),
            Observed::Missing => tracing::info!(
                database = %db_name, %table, %column,
                "sharded table's key column not found on the default shard's primary (not created yet, or not on the monitor user's search_path)"
            ),
            Observed::Unknown => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn ddl_makes_the_next_rounds_read() {
        let db = crate::cluster::test_database(1, "");
        assert!(!super::due(&db));
        db.ddl_seen();
        for _ in 0..super::ROUNDS_AFTER_DDL {
            assert!(super::due(&db));
        }
        assert!(!super::due(&db));
    }

    #[test]
    fn the_key_columns_query_quotes_names() {
        let sql = super::key_columns_sql(&[("events", "created_at"), ("o'neil", "id")]);
        assert!(
            sql.contains("(0, 'events', 'created_at'), (1, 'o''neil', 'id')"),
            "{sql}"
        );
    }
}

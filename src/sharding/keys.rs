//! Keys the shards generate. An INSERT into a `generate_keys` table that leaves out the
//! key goes to one shard, whose column default draws the key from a sequence of its own,
//! skipping values until one hashes to that shard (PgDog's "sharded sequences" work the
//! same way). Two shards can never draw the same key: each value hashes to one shard only.
//! A CHECK constraint on each shard refuses rows whose key hashes elsewhere, so a missing
//! or wrong default fails loudly instead of misplacing rows.
//!
//! This module writes the SQL; `cluster::keys` runs and verifies it on the primaries.

use super::ShardFn;
use super::hash::{HASH_COMBINE, HASH_PARTITION_SEED};
use crate::sql::{quote_ident, quote_literal};

/// The functions every shard needs, in schema `pgshard`. `key_shard` is `partition_of`
/// (PostgreSQL's hash partitioning) for integer keys, written in SQL.
pub fn functions_sql() -> String {
    let seed = HASH_PARTITION_SEED as i64;
    let combine = (1u128 << 64) + HASH_COMBINE as u128;
    let modulus = 1u128 << 64;
    format!(
        "CREATE SCHEMA IF NOT EXISTS pgshard;
CREATE OR REPLACE FUNCTION pgshard.key_shard(key bigint, shards int) RETURNS int
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT ((hashint8extended(key, {seed})::numeric + {combine}) % {modulus} % shards)::int $$;
CREATE OR REPLACE FUNCTION pgshard.next_key(seq regclass, shard int, shards int) RETURNS bigint
LANGUAGE plpgsql VOLATILE STRICT
AS $$
DECLARE
  k bigint;
BEGIN
  LOOP
    k := nextval(seq);
    IF pgshard.key_shard(k, shards) = shard THEN
      RETURN k;
    END IF;
  END LOOP;
END
$$;
"
    )
}

/// The sequence a table's keys come from (one per shard, same name everywhere).
pub fn sequence(t: &ShardFn) -> String {
    format!("{}_{}_pgshard_seq", t.table, t.column)
}

/// The name of the CHECK constraint that keeps a shard's keys its own.
pub fn constraint(t: &ShardFn) -> String {
    format!("{}_{}_pgshard_shard", t.table, t.column)
}

/// The column default on `shard` of `shards`.
pub fn default_expr(t: &ShardFn, shard: usize, shards: usize) -> String {
    format!(
        "pgshard.next_key({}::regclass, {shard}, {shards})",
        quote_literal(&quote_ident(&sequence(t)))
    )
}

/// Whether a column default, as `pg_get_expr` prints it, draws keys for `shard` of
/// `shards`.
pub fn is_default_for(expr: &str, shard: usize, shards: usize) -> bool {
    expr.starts_with("pgshard.next_key(") && expr.ends_with(&format!(", {shard}, {shards})"))
}

/// What makes one table's keys on one shard: its sequence (started past the keys already
/// there), the column default and the CHECK constraint (NOT VALID: rows already there are
/// not scanned). Runs again safely.
pub fn table_sql(t: &ShardFn, shard: usize, shards: usize) -> String {
    let (table, column, seq) = (
        quote_ident(&t.table),
        quote_ident(&t.column),
        quote_ident(&sequence(t)),
    );
    let check = quote_ident(&constraint(t));
    let seq_lit = quote_literal(&seq);
    format!(
        "CREATE SEQUENCE IF NOT EXISTS {seq} OWNED BY {table}.{column};
SELECT setval({seq_lit}, m) FROM (SELECT max({column}) AS m FROM {table}) x
  WHERE m > (SELECT last_value FROM {seq});
ALTER TABLE {table} ALTER COLUMN {column} SET DEFAULT {default};
ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {check};
ALTER TABLE {table} ADD CONSTRAINT {check} CHECK (pgshard.key_shard({column}, {shards}) = {shard}) NOT VALID;
",
        default = default_expr(t, shard, shards),
    )
}

/// Everything one shard needs for the tables whose keys the shards generate, in one
/// transaction; None when no table does.
pub fn shard_sql(tables: &[ShardFn], shard: usize, shards: usize) -> Option<String> {
    let mut out = String::from("BEGIN;\n");
    out.push_str(&functions_sql());
    let mut any = false;
    for t in tables.iter().filter(|t| t.generate_keys) {
        out.push_str(&table_sql(t, shard, shards));
        any = true;
    }
    out.push_str("COMMIT;\n");
    any.then_some(out)
}

/// The query that reads a table's key default on a shard: one row, the default's text
/// (NULL without a default); no row without the table or column.
pub fn default_query(t: &ShardFn) -> String {
    format!(
        "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a
           LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE a.attrelid = to_regclass({}) AND a.attname = {} AND NOT a.attisdropped",
        quote_literal(&quote_ident(&t.table)),
        quote_literal(&t.column)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ShardedTableConfig;

    fn table(name: &str) -> ShardFn {
        let cfg: ShardedTableConfig = yaml_serde::from_str(&format!(
            "{{ table: {name}, column: id, method: hash, generate_keys: true }}"
        ))
        .unwrap();
        ShardFn::new(&cfg, 2, "t").unwrap()
    }

    #[test]
    fn names_are_quoted() {
        let sql = table_sql(&table("Odd\"Name"), 1, 2);
        assert!(
            sql.contains(r#"ALTER TABLE "odd""name" ALTER COLUMN "id""#),
            "{sql}"
        );
        assert!(
            sql.contains(r#"pgshard.next_key('"odd""name_id_pgshard_seq"'::regclass, 1, 2)"#),
            "{sql}"
        );
        assert!(is_default_for(
            "pgshard.next_key('users_id_pgshard_seq'::regclass, 1, 2)",
            1,
            2
        ));
        assert!(!is_default_for(
            "pgshard.next_key('users_id_pgshard_seq'::regclass, 1, 3)",
            1,
            2
        ));
        assert!(!is_default_for("nextval('users_id_seq'::regclass)", 1, 2));
    }

    #[test]
    fn only_generating_tables_get_sql() {
        let cfg: ShardedTableConfig =
            yaml_serde::from_str("{ table: plain, column: id, method: hash }").unwrap();
        let plain = ShardFn::new(&cfg, 2, "t").unwrap();
        assert_eq!(shard_sql(std::slice::from_ref(&plain), 0, 2), None);
        let sql = shard_sql(&[plain, table("users")], 0, 2).unwrap();
        assert!(sql.starts_with("BEGIN;") && sql.ends_with("COMMIT;\n"));
        assert!(sql.contains("\"users_id_pgshard_seq\"") && !sql.contains("plain"));
    }

    #[test]
    fn only_hashed_integer_keys_are_generated() {
        for (yaml, want) in [
            (
                "{ table: t, column: id, method: hash, type: text, generate_keys: true }",
                "hashed by text",
            ),
            (
                "{ table: t, column: id, method: range, ranges: [ { from: 1, shard: 0 } ], generate_keys: true }",
                "ranged by",
            ),
        ] {
            let cfg: ShardedTableConfig = yaml_serde::from_str(yaml).unwrap();
            let e = ShardFn::new(&cfg, 2, "sharded_tables[0]").unwrap_err();
            assert!(e.starts_with("sharded_tables[0].generate_keys:"), "{e}");
            assert!(e.contains(want), "{e}");
        }
    }
}

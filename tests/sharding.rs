//! Shard functions checked against a real PostgreSQL.

mod common;

use common::*;
use pgshard::sharding::hash::{HashKey, partition_of};

/// For each type and modulus: a table `PARTITION BY HASH (k)` with `MODULUS n` partitions,
/// thousands of keys, and for every row the partition PostgreSQL chose (`tableoid`) must be
/// the one `partition_of` computes.
#[tokio::test]
async fn hash_matches_postgres_partitioning_for_every_row() {
    let c = connect_direct().await;
    for (ty, expr) in [
        ("int8", "g * 7919 - 5000000"),
        ("int4", "(g * 104729) % 2000000000 - 1000000000"),
        ("int2", "(g % 65536) - 32768"),
        ("text", "md5(g::text) || repeat('x', g % 30)"),
        ("varchar", "'user-' || g"),
        ("uuid", "md5(g::text)::uuid"),
    ] {
        for n in [2u64, 3, 7] {
            let t = format!("hp_{ty}_{n}");
            let mut ddl = format!(
                "DROP TABLE IF EXISTS {t}; CREATE TABLE {t} (k {ty}) PARTITION BY HASH (k);"
            );
            for r in 0..n {
                ddl.push_str(&format!(
                    "CREATE TABLE {t}_{r} PARTITION OF {t} FOR VALUES WITH (MODULUS {n}, REMAINDER {r});"
                ));
            }
            let rows = if ty == "int2" { 3000 } else { 4000 };
            ddl.push_str(&format!(
                "INSERT INTO {t} SELECT ({expr})::{ty} FROM generate_series(1, {rows}) g;"
            ));
            c.batch_execute(&ddl).await.unwrap();
            let rows = c
                .query(
                    &format!("SELECT k::text, tableoid::regclass::text FROM {t}"),
                    &[],
                )
                .await
                .unwrap();
            assert!(rows.len() >= 3000);
            for row in rows {
                let k: String = row.get(0);
                let part: String = row.get(1);
                let want: u64 = part.rsplit('_').next().unwrap().parse().unwrap();
                let uuid_bytes;
                let key = match ty {
                    "text" | "varchar" => HashKey::Text(k.as_bytes()),
                    "uuid" => {
                        let hex: String = k.chars().filter(|c| *c != '-').collect();
                        let mut b = [0u8; 16];
                        for i in 0..16 {
                            b[i] = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
                        }
                        uuid_bytes = b;
                        HashKey::Uuid(uuid_bytes)
                    }
                    _ => HashKey::Int(k.parse().unwrap()),
                };
                assert_eq!(partition_of(&key, n), want, "{ty} key {k} modulus {n}");
            }
            c.batch_execute(&format!("DROP TABLE {t}")).await.unwrap();
        }
    }
}

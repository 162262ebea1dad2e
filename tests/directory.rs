//! Directory sharding: a key's shard comes from a lookup table in PostgreSQL (created by
//! pgshard), new keys are recorded at INSERT (hash of the key), and two pgshard processes
//! inserting the same new keys at once agree on their shards.

mod common;

use common::*;
use pgshard::sharding::hash::{HashKey, partition_of};
use std::net::SocketAddr;

const RULES: &str = "    sharded_tables:
      - table: tenants
        column: id
        method: directory
        directory: { table: tenant_dir }
";

fn proxy() -> SocketAddr {
    start_proxy_yaml(&(cluster2().config_yaml("127.0.0.1:0", "transaction", 8) + RULES))
}

fn ports() -> [u16; 2] {
    let c = cluster2();
    [c.shards[0].primary.port, c.shards[1].primary.port]
}

/// The table, created once through pgshard.
async fn schema(addr: SocketAddr) {
    static ONCE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    ONCE.get_or_init(|| async {
        connect(addr)
            .await
            .batch_execute("CREATE TABLE tenants (id bigint PRIMARY KEY, name text)")
            .await
            .unwrap();
    })
    .await;
}

async fn entry(key: i64) -> Option<i32> {
    let d = connect_server(ports()[0], "app").await;
    d.query_opt(
        "SELECT shard FROM tenant_dir WHERE tbl = 'tenants' AND key = $1",
        &[&key.to_string()],
    )
    .await
    .unwrap()
    .map(|r| r.get(0))
}

async fn shard_holding(id: i64) -> Vec<usize> {
    let mut on = Vec::new();
    for (s, p) in ports().into_iter().enumerate() {
        let n: i64 = connect_server(p, "app")
            .await
            .query_one("SELECT count(*) FROM tenants WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            on.push(s);
        }
    }
    on
}

#[tokio::test]
async fn keys_go_where_the_directory_says() {
    let a = proxy();
    let c = connect(a).await;
    schema(a).await;
    // New keys: recorded with their hash shard; rows there.
    c.execute(
        "INSERT INTO tenants (id, name) VALUES ($1, 'one')",
        &[&1i64],
    )
    .await
    .unwrap();
    c.batch_execute("INSERT INTO tenants (id, name) VALUES (2, 'two'), (3, 'three'), (4, 'four')")
        .await
        .unwrap();
    for id in 1..=4i64 {
        let want = partition_of(&HashKey::Int(id), 2) as usize;
        assert_eq!(entry(id).await, Some(want as i32), "entry of {id}");
        assert_eq!(shard_holding(id).await, vec![want], "rows of {id}");
    }
    // A key the directory assigns elsewhere than its hash goes there.
    let moved = 500i64;
    let other = 1 - partition_of(&HashKey::Int(moved), 2) as i32;
    connect_server(ports()[0], "app")
        .await
        .execute(
            "INSERT INTO tenant_dir VALUES ('tenants', $1, $2)",
            &[&moved.to_string(), &other],
        )
        .await
        .unwrap();
    c.execute(
        "INSERT INTO tenants (id, name) VALUES ($1, 'moved')",
        &[&moved],
    )
    .await
    .unwrap();
    assert_eq!(shard_holding(moved).await, vec![other as usize]);
    let name: String = c
        .query_one("SELECT name FROM tenants WHERE id = $1", &[&moved])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "moved");
    // Without a column list (the key found among the table's columns): new keys are
    // recorded, a key the directory assigns elsewhere goes there.
    let moved_too = 501i64;
    let elsewhere = 1 - partition_of(&HashKey::Int(moved_too), 2) as i32;
    connect_server(ports()[0], "app")
        .await
        .execute(
            "INSERT INTO tenant_dir VALUES ('tenants', $1, $2)",
            &[&moved_too.to_string(), &elsewhere],
        )
        .await
        .unwrap();
    c.batch_execute("INSERT INTO tenants VALUES (5, 'five'), (6, 'six'), (501, 'moved too')")
        .await
        .unwrap();
    for id in [5i64, 6] {
        let want = partition_of(&HashKey::Int(id), 2) as usize;
        assert_eq!(entry(id).await, Some(want as i32), "entry of {id}");
        assert_eq!(shard_holding(id).await, vec![want], "rows of {id}");
    }
    assert_eq!(shard_holding(moved_too).await, vec![elsewhere as usize]);
    // Unknown keys read nothing, without an error and without an entry.
    assert!(
        c.query_opt("SELECT * FROM tenants WHERE id = 999", &[])
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(entry(999).await, None);
    // A fresh pgshard (empty cache) reads the directory.
    let fresh = connect(proxy()).await;
    let n: i64 = fresh
        .query_one(
            "SELECT count(*) FROM tenants WHERE id IN (1, 2, 3, 4, 5, 6, 500, 501)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 8);
    let name: String = fresh
        .query_one("SELECT name FROM tenants WHERE id = $1", &[&moved])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "moved");
}

#[tokio::test]
async fn two_routers_inserting_the_same_new_keys_agree() {
    let (a, b) = (proxy(), proxy());
    schema(a).await;
    // The same new keys from both at once: each key gets one entry, and its row (the one
    // that won the primary key) is on that entry's shard.
    let mut tasks = Vec::new();
    for addr in [a, b] {
        tasks.push(tokio::spawn(async move {
            let c = connect(addr).await;
            for id in 10_000..10_100i64 {
                let _ = c
                    .execute(
                        "INSERT INTO tenants (id, name) VALUES ($1, 'x') ON CONFLICT DO NOTHING",
                        &[&id],
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for id in 10_000..10_100i64 {
        let e = entry(id).await.expect("recorded") as usize;
        assert_eq!(shard_holding(id).await, vec![e], "key {id}");
    }
}

#[tokio::test]
async fn copy_into_a_directory_sharded_table_records_new_keys() {
    use futures_util::SinkExt;
    let a = proxy();
    schema(a).await;
    let c = connect(a).await;
    let sink = c
        .copy_in::<_, bytes::Bytes>("COPY tenants (id, name) FROM STDIN")
        .await
        .unwrap();
    let mut sink = Box::pin(sink);
    let mut data = String::new();
    for id in 20_000..20_050i64 {
        data.push_str(&format!("{id}\tcopied\n"));
    }
    sink.send(bytes::Bytes::from(data)).await.unwrap();
    assert_eq!(sink.as_mut().finish().await.unwrap(), 50);
    for id in 20_000..20_050i64 {
        let e = entry(id).await.expect("recorded") as usize;
        assert_eq!(e, partition_of(&HashKey::Int(id), 2) as usize);
        assert_eq!(shard_holding(id).await, vec![e], "key {id}");
    }
}

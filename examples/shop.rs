//! A small shop on pgshard with tokio-postgres: creates a sharded schema (customers by id,
//! their orders co-located by customer id), writes and reads customers with their orders,
//! runs a cross-shard report and a transaction over two shards.
//!
//!   cargo run -- demo                 # in another terminal
//!   cargo run --example shop          # PGSHARD_URL overrides the connection string

use tokio_postgres::NoTls;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("PGSHARD_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=6432 user=app password=app dbname=app".into());
    let (mut db, conn) = tokio_postgres::connect(&url, NoTls).await?;
    tokio::spawn(conn);

    // DDL goes to every shard.
    db.batch_execute(
        "CREATE TABLE IF NOT EXISTS shop_customers (id bigint PRIMARY KEY, name text NOT NULL, credit numeric(10,2) NOT NULL DEFAULT 100);
         CREATE TABLE IF NOT EXISTS shop_orders (id bigint NOT NULL, customer_id bigint NOT NULL, amount numeric(10,2) NOT NULL);",
    )
    .await?;

    // Ids of this run (so that runs do not collide).
    let base: i64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64
        % 1_000_000_000
        * 100;
    let add_customer = db
        .prepare("INSERT INTO shop_customers (id, name) VALUES ($1, $2)")
        .await?;
    let add_order = db
        .prepare("INSERT INTO shop_orders (id, customer_id, amount) VALUES ($1, $2, ($3::text)::numeric)")
        .await?;
    for i in 1..=20i64 {
        let id = base + i;
        // Each row goes to its customer's shard.
        db.execute(&add_customer, &[&id, &format!("customer {i}")])
            .await?;
        for k in 0..3i64 {
            db.execute(
                &add_order,
                &[&(id * 10 + k), &id, &format!("{}.50", 10 + k)],
            )
            .await?;
        }
    }

    // One customer with its orders: a join of co-located tables, on one shard.
    let me = base + 7;
    let rows = db
        .query(
            "SELECT c.name, o.id, o.amount::text FROM shop_customers c JOIN shop_orders o ON o.customer_id = c.id
             WHERE c.id = $1 ORDER BY o.id",
            &[&me],
        )
        .await?;
    println!("customer {me} has {} orders", rows.len());
    assert_eq!(rows.len(), 3);

    // A report over every shard, merged by pgshard.
    // (simple protocol: its results are text, and numeric needs no extra crate)
    let report = db
        .simple_query(&format!(
            "SELECT count(*), sum(amount) FROM shop_orders WHERE customer_id > {base} AND customer_id <= {}",
            base + 20
        ))
        .await?;
    let Some(row) = report.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
        _ => None,
    }) else {
        return Err("the report returned no row".into());
    };
    let orders: i64 = row.get(0).unwrap_or("0").parse()?;
    let total = row.get(1).unwrap_or("").to_string();
    println!("report: {orders} orders, total {total}");
    assert_eq!((orders, total.as_str()), (60, "690.00"));

    // Move credit between two customers (most likely on two shards): all or nothing.
    let (from, to) = (base + 1, base + 2);
    let tx = db.transaction().await?;
    tx.execute(
        "UPDATE shop_customers SET credit = credit - 25 WHERE id = $1",
        &[&from],
    )
    .await?;
    tx.execute(
        "UPDATE shop_customers SET credit = credit + 25 WHERE id = $1",
        &[&to],
    )
    .await?;
    tx.commit().await?;
    let credit = |id: i64| {
        let db = &db;
        async move {
            let r = db
                .query_one(
                    "SELECT credit::text FROM shop_customers WHERE id = $1",
                    &[&id],
                )
                .await?;
            Ok::<String, tokio_postgres::Error>(r.get(0))
        }
    };
    let (a, b) = (credit(from).await?, credit(to).await?);
    println!("transfer: {from} has {a}, {to} has {b}");
    assert_eq!((a.as_str(), b.as_str()), ("75.00", "125.00"));
    println!("shop example OK");
    Ok(())
}

//! The `pgshard` command: `serve`, `check` and `demo`.

use clap::{Parser, Subcommand, ValueEnum};
use pgshard::config::Config;
use pgshard::local::{ClusterOptions, LocalCluster};
use std::path::PathBuf;
use std::process::ExitCode;

/// A PostgreSQL-wire-compatible sharding proxy.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy with a configuration file.
    Serve {
        /// The YAML configuration.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file and print the topology it describes.
    Check {
        /// The YAML configuration.
        #[arg(long, short)]
        config: PathBuf,
        /// Only validate the file: do not connect to the primaries to check the settings
        /// pgshard relies on (max_prepared_transactions for two-phase commit).
        #[arg(long)]
        offline: bool,
    },
    /// Check, install (--apply) or print (--sql) on every shard primary what makes the
    /// shards generate the keys of tables with `generate_keys: true`: the `pgshard` schema's
    /// functions, a sequence per table, the key column's default and a CHECK constraint
    /// that refuses rows whose key belongs to another shard.
    Keys {
        /// The YAML configuration.
        #[arg(long, short)]
        config: PathBuf,
        /// Install (or reinstall) everything, then check it.
        #[arg(long, conflicts_with = "sql")]
        apply: bool,
        /// Only print each shard's SQL, to review or run by hand.
        #[arg(long)]
        sql: bool,
    },
    /// Start a local sharded, replicated cluster of real PostgreSQL servers behind pgshard.
    Demo {
        /// Number of shards.
        #[arg(long, default_value_t = 2)]
        shards: usize,
        /// Streaming replicas per shard.
        #[arg(long, default_value_t = 1)]
        replicas: usize,
        /// Where pgshard listens.
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: String,
        /// Pool mode: transaction or session.
        #[arg(long, default_value = "transaction")]
        pool_mode: String,
        /// Server connections per pool.
        #[arg(long, default_value_t = 20)]
        pool_size: u32,
        /// Also write the configuration used to this file.
        #[arg(long)]
        write_config: Option<PathBuf>,
    },
}

/// Logs to stderr, filtered by `PGSHARD_LOG` (default `info`).
///
/// Plain `target=level` directives use `Targets`, which decides per callsite once; only a
/// spec with span or field directives (`[...]`) gets `EnvFilter`, whose span bookkeeping
/// takes a shared `RwLock` every time a client session's span is entered or exited: on
/// every poll of every session, across worker threads.
fn init_logs(format: LogFormat) {
    use tracing_subscriber::prelude::*;
    let raw = std::env::var("PGSHARD_LOG").unwrap_or_default();
    let spec = match raw.trim() {
        "" => "info",
        s => s,
    };
    let parsed = if spec.contains('[') {
        tracing_subscriber::EnvFilter::try_new(spec)
            .map(|f| (None, Some(f)))
            .map_err(|e| e.to_string())
    } else {
        spec.parse::<tracing_subscriber::filter::Targets>()
            .map(|t| (Some(t), None))
            .map_err(|e| e.to_string())
    };
    let (targets, env) = parsed.unwrap_or_else(|e| {
        eprintln!("pgshard: PGSHARD_LOG={spec:?} is not a valid filter ({e}); using info");
        let info = tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO);
        (Some(info), None)
    });
    let text = matches!(format, LogFormat::Text)
        .then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    let json = matches!(format, LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    tracing_subscriber::registry()
        .with(targets)
        .with(env)
        .with(text)
        .with(json)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    let result = match cli.command {
        Cmd::Check { config, offline } => match Config::load(&config) {
            Ok(c) => {
                print!("{}", c.describe());
                let online = if offline {
                    Ok(())
                } else {
                    runtime().block_on(check_servers(c))
                };
                online.map(|()| println!("configuration OK"))
            }
            Err(e) => Err(anyhow::anyhow!("{}: {e}", config.display())),
        },
        Cmd::Keys { config, apply, sql } => match Config::load(&config) {
            Ok(c) if sql => {
                print_keys_sql(&c);
                Ok(())
            }
            Ok(c) => runtime().block_on(keys(c, apply)),
            Err(e) => Err(anyhow::anyhow!("{}: {e}", config.display())),
        },
        Cmd::Serve { config } => Config::load(&config)
            .map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))
            .and_then(|c| runtime().block_on(pgshard::frontend::serve(c, Some(config.clone())))),
        Cmd::Demo {
            shards,
            replicas,
            listen,
            pool_mode,
            pool_size,
            write_config,
        } => demo(
            shards,
            replicas,
            &listen,
            &pool_mode,
            pool_size,
            write_config,
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgshard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime")
}

fn demo(
    shards: usize,
    replicas: usize,
    listen: &str,
    pool_mode: &str,
    pool_size: u32,
    write_config: Option<PathBuf>,
) -> anyhow::Result<()> {
    if shards == 0 {
        anyhow::bail!("--shards must be at least 1");
    }
    // Fail on a busy port before spending seconds on initdb.
    let listener = std::net::TcpListener::bind(listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    eprintln!("pgshard demo: starting {shards} shard(s) x (1 primary + {replicas} replica(s)) ...");
    let mut cluster = LocalCluster::start(ClusterOptions {
        shards,
        replicas,
        ..ClusterOptions::default()
    })?;
    let mut yaml = cluster.config_yaml(listen, pool_mode, pool_size);
    if replicas > 0 {
        // Reads on the replicas, failover by the local superuser (trusted on loopback).
        yaml.push_str("    read_from: replicas\n    failover: { user: postgres }\n");
    }
    if shards >= 2 {
        yaml.push_str(DEMO_RULES);
    }
    let path = cluster.root.join("pgshard.yaml");
    std::fs::write(&path, &yaml)?;
    if let Some(p) = &write_config {
        std::fs::write(p, &yaml)?;
    }
    let config = Config::from_yaml(&yaml)?;
    for (i, sh) in cluster.shards.iter().enumerate() {
        let reps: Vec<String> = sh.replicas.iter().map(|r| r.addr()).collect();
        eprintln!(
            "  shard {i}: primary {} (pid {}), replicas [{}]",
            sh.primary.addr(),
            sh.primary.pid().unwrap_or(0),
            reps.join(", ")
        );
    }
    let rt = runtime();
    let result = rt.block_on(async {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let server = pgshard::frontend::spawn(config, listener)?;
        server.set_config_path(path.clone());
        if shards >= 2 {
            load_demo_data(listen, shards, &server).await?;
        }
        // So that the first reads, served by replicas, see the example data.
        cluster.wait_replicas_caught_up()?;
        println!("config: {}", path.display());
        println!("pgshard is ready. Connect with:");
        println!("  psql \"postgres://app:app@{listen}/app\"");
        if shards >= 2 {
            println!("Try: SELECT * FROM users WHERE id = 42;   (one shard, on a replica)");
            println!(
                "     INSERT INTO users (name) VALUES ('you') RETURNING id;   (the shard makes the id)"
            );
            println!("     SELECT region, count(*) FROM accounts GROUP BY region ORDER BY region;");
            println!(
                "     SELECT id, name FROM users ORDER BY name LIMIT 5;   (all shards, merged)"
            );
        }
        println!("Press Ctrl-C to stop pgshard and every server it started.");
        tokio::signal::ctrl_c().await?;
        eprintln!("pgshard demo: stopping ...");
        Ok::<_, anyhow::Error>(())
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    cluster.stop();
    eprintln!("pgshard demo: stopped; removed {}", cluster.root.display());
    result
}

/// Each shard's key setup SQL, per database.
fn print_keys_sql(c: &Config) {
    for d in &c.databases {
        let router = pgshard::router::Router::new(d);
        for s in 0..d.shards.len() {
            if let Some(sql) =
                pgshard::sharding::keys::shard_sql(&router.rules.tables, s, d.shards.len())
            {
                println!(
                    "-- database {} shard {s} (primary {})",
                    d.name, d.shards[s].primary
                );
                println!("{sql}");
            }
        }
    }
}

/// `pgshard keys`: installs (with `apply`) and checks the generated keys of every database;
/// an error when a shard is not ready.
async fn keys(c: Config, apply: bool) -> anyhow::Result<()> {
    let state = pgshard::frontend::State::new(c)?;
    let mut ready = true;
    let mut any = false;
    for (name, db) in &state.topology.databases {
        if !db.router.rules.tables.iter().any(|t| t.generate_keys) {
            continue;
        }
        any = true;
        if apply {
            for r in pgshard::cluster::keys::apply(db).await {
                if let Some((_, Err(e))) = r.tables.first() {
                    anyhow::bail!("database {name} shard {} ({}): {e}", r.shard, r.primary);
                }
                println!("database {name} shard {}: installed", r.shard);
            }
        }
        for line in key_report(name, db).await {
            ready &= !line.starts_with("  NOT READY");
            println!("{line}");
        }
    }
    if !any {
        println!("no sharded table has generate_keys: true");
    }
    if !ready {
        anyhow::bail!("some shards do not generate keys yet; run `pgshard keys --apply`");
    }
    Ok(())
}

/// `check` online: the primaries' settings, and whether the shards generate the keys of
/// `generate_keys` tables.
async fn check_servers(c: Config) -> anyhow::Result<()> {
    let state = pgshard::frontend::State::new(c)?;
    probe_primaries(&state).await;
    let mut header = false;
    for (name, db) in &state.topology.databases {
        if !db.router.rules.tables.iter().any(|t| t.generate_keys) {
            continue;
        }
        if !header {
            println!("generated keys:");
            header = true;
        }
        for line in key_report(name, db).await {
            println!("{line}");
        }
    }
    Ok(())
}

/// One line per shard and generating table: ready, or what is wrong.
async fn key_report(name: &str, db: &pgshard::cluster::Database) -> Vec<String> {
    let mut out = Vec::new();
    for r in pgshard::cluster::keys::check(db).await {
        for (table, res) in &r.tables {
            out.push(match res {
                Ok(()) => format!("  database {name} shard {} {table}: keys ready", r.shard),
                Err(e) => format!(
                    "  NOT READY database {name} shard {} ({}) {table}: {e}",
                    r.shard, r.primary
                ),
            });
        }
    }
    out
}

/// Connects to every primary (all at once, 2 s each; over TLS or a Unix socket as the
/// pools would) and reports what two-phase commit needs: `max_prepared_transactions > 0`
/// where it is on.
async fn probe_primaries(state: &pgshard::frontend::State) {
    let mut tasks = Vec::new();
    for db in state.topology.databases.values() {
        let two_phase = db.config.two_phase_commit == pgshard::config::TwoPhaseCommit::On
            && db.shards.len() > 1;
        for (s, shard) in db.shards.iter().enumerate() {
            let node = &shard.nodes[0];
            let label = format!(
                "database {} shard {s} primary {}",
                db.config.name, node.addr
            );
            let mut control = pgshard::cluster::Control::as_server_user(
                db,
                node,
                std::time::Duration::from_secs(2),
            );
            tasks.push(tokio::spawn(async move {
                let probe = control
                    .query("SELECT current_setting('max_prepared_transactions')")
                    .await;
                match probe.map(|rows| rows.first().and_then(|r| r[0].clone())) {
                    Ok(Some(n)) if n == "0" && two_phase => format!(
                        "  ERROR {label}: max_prepared_transactions is 0: transactions over several shards will fail to commit (set it above 0 and restart the server, or two_phase_commit: off)"
                    ),
                    Ok(n) => format!(
                        "  {label}: reachable, max_prepared_transactions = {}",
                        n.unwrap_or_default()
                    ),
                    Err(e) => format!("  {label}: not reachable now ({e})"),
                }
            }));
        }
    }
    if !tasks.is_empty() {
        println!("servers:");
    }
    for t in tasks {
        if let Ok(line) = t.await {
            println!("{line}");
        }
    }
}

/// The demo's sharding rules: users by id (hash), orders co-located by user id, accounts by
/// region (list: geographic sharding), countries as a reference table.
const DEMO_RULES: &str = "    reference_tables: [countries]
    sharded_tables:
      - { table: users, column: id, method: hash, generate_keys: true }
      - { table: orders, column: user_id, method: hash }
      - { table: shop_customers, column: id, method: hash }   # used by examples/
      - { table: shop_orders, column: customer_id, method: hash }
      - table: accounts
        column: region
        method: list
        type: text
        lists: [ { values: [eu, uk], shard: 0 }, { values: [us, ca], shard: 1 } ]
        default_shard: 0
";

/// Creates the example tables through pgshard (DDL goes to every shard) and loads a little
/// data (each row to its shard; the reference table to every shard by hint).
async fn load_demo_data(
    listen: &str,
    shards: usize,
    server: &pgshard::frontend::Server,
) -> anyhow::Result<()> {
    let (host, port) = listen.rsplit_once(':').unwrap_or(("127.0.0.1", "6432"));
    let (c, conn) = tokio_postgres::connect(
        &format!("host={host} port={port} user=app password=app dbname=app"),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(conn);
    c.batch_execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, country text);
         CREATE TABLE orders (id bigint, user_id bigint NOT NULL, total numeric(10,2), created_at timestamptz DEFAULT now());
         CREATE INDEX ON orders (user_id);
         CREATE TABLE accounts (id bigint, region text NOT NULL, balance numeric(12,2));
         CREATE TABLE countries (code text PRIMARY KEY, name text);",
    )
    .await?;

    for s in 0..shards {
        c.batch_execute(&format!(
            "/* pgshard: shard={s} */ INSERT INTO countries VALUES
             ('fr', 'France'), ('gb', 'United Kingdom'), ('us', 'United States'), ('ca', 'Canada')"
        ))
        .await?;
    }
    let names = [
        "ada", "grace", "edsger", "barbara", "ken", "dennis", "frances", "donald",
    ];
    let countries = ["fr", "gb", "us", "ca"];
    for id in 1..=100i64 {
        let name = format!("{}{id}", names[id as usize % names.len()]);
        let country = countries[id as usize % countries.len()];
        c.execute(
            "INSERT INTO users (id, name, country) VALUES ($1, $2, $3)",
            &[&id, &name, &country],
        )
        .await?;
        for k in 0..(id % 3) {
            c.execute(
                "INSERT INTO orders (id, user_id, total) VALUES ($1, $2, ($3::int * 7 + 5)::numeric)",
                &[&(id * 10 + k), &id, &((id + k) as i32)],
            )
            .await?;
        }
    }
    for (id, region) in ["eu", "uk", "us", "ca", "eu", "us"].iter().enumerate() {
        c.execute(
            "INSERT INTO accounts (id, region, balance) VALUES ($1, $2, 100)",
            &[&(id as i64), region],
        )
        .await?;
    }
    // From now on users' ids may be left out: the shards make them (`generate_keys`),
    // past the ids loaded above.
    let state = server.state.load();
    if let Some(db) = state.topology.databases.get("app") {
        for r in pgshard::cluster::keys::apply(db).await {
            if let Some((table, Err(e))) = r.tables.first() {
                anyhow::bail!("generated keys for {table} on shard {}: {e}", r.shard);
            }
        }
    }
    Ok(())
}

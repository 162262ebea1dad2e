//! Loading and validating configurations: defaults, and errors that name the key.

use super::*;

const BASE: &str = r#"
users: [{ name: app, password: app }]
databases:
  - name: app
    server_user: app
    server_password: app
    shards:
      - { primary: 127.0.0.1:5433, replicas: [127.0.0.1:5434] }
"#;

#[test]
fn minimal_config_loads_with_defaults() {
    let c = Config::from_yaml(BASE).unwrap();
    assert_eq!(c.listen, "127.0.0.1:6432");
    assert_eq!(c.pool.mode, PoolMode::Transaction);
    assert_eq!(c.limits.max_message_size, 64 << 20);
    assert_eq!(c.databases[0].server_database(), "app");
    assert!(c.describe().contains("shard 0: primary 127.0.0.1:5433"));
}

fn err(text: &str) -> String {
    Config::from_yaml(text).unwrap_err().to_string()
}

#[test]
fn errors_name_the_key() {
    let e = err(&BASE.replace("127.0.0.1:5434", "nowhere"));
    assert!(e.starts_with("databases[0].shards[0].replicas[0]:"), "{e}");
    let e = err(&format!("{BASE}    default_shard: 3\n"));
    assert!(e.starts_with("databases[0].default_shard:"), "{e}");
    let e = err(&BASE.replace("127.0.0.1:5434", "127.0.0.1:5433"));
    assert!(e.contains("used by another node"), "{e}");
    let e = err(&format!("{BASE}    deadlock_detection_ms: 5\n"));
    assert_eq!(
        e,
        "databases[0].deadlock_detection_ms: must be 0 (off) or at least 100"
    );
    let e = err(&format!("{BASE}pool: {{ size: 0 }}\n"));
    assert!(e.starts_with("pool.size:"), "{e}");
    let e = err(&BASE.replace("{ name: app, password: app }", "{ name: app }"));
    assert!(e.starts_with("users[0].password:"), "{e}");
    let e = err(&format!("{BASE}bogus: 1\n"));
    assert!(e.contains("unknown field `bogus`"), "{e}");
    let e = err(&BASE.replace("password: app }", "password: 'SCRAM-SHA-256$x' }"));
    assert!(e.contains("bad SCRAM verifier"), "{e}");
    let e = err(&BASE.replace("127.0.0.1:5434", "/var/run/postgresql"));
    assert!(e.starts_with("databases[0].shards[0].replicas[0]:"), "{e}");
    assert!(e.contains("without a port"), "{e}");
    let e = err(&format!("unix_socket_dir: tmp\n{BASE}"));
    assert!(e.starts_with("unix_socket_dir:"), "{e}");
    let e = err(&format!("unix_socket_dir: /nonexistent/dir\n{BASE}"));
    assert!(e.contains("not a directory"), "{e}");
    let e = err(&format!("server_tls: {{ mode: verify-full }}\n{BASE}"));
    assert_eq!(e, "server_tls.ca: required with mode verify-full");
    let e = err(&format!(
        "server_tls: {{ mode: require, ca: /nonexistent.crt }}\n{BASE}"
    ));
    assert!(
        e.starts_with("server_tls.ca: cannot read /nonexistent.crt"),
        "{e}"
    );
    let e = err(&format!("server_tls: {{ cert: /etc/hostname }}\n{BASE}"));
    assert!(e.starts_with("server_tls.key:"), "{e}");
    let e = err(&format!("server_tls: {{ mode: verify }}\n{BASE}"));
    assert!(e.contains("unknown variant `verify`"), "{e}");
    // Key types with the column's modifier; one PostgreSQL has not is refused.
    let shards = BASE.replace(
        "      - { primary: 127.0.0.1:5433, replicas: [127.0.0.1:5434] }\n",
        "      - { primary: 127.0.0.1:5433 }\n      - { primary: 127.0.0.1:5435 }\n",
    );
    let ranged = |ty: &str| {
        format!(
            "{shards}    sharded_tables:\n      - {{ table: t, column: k, method: range, type: '{ty}', ranges: [{{ to: 5, shard: 0 }}, {{ from: 5, shard: 1 }}] }}\n"
        )
    };
    for ty in [
        "numeric(10,1)",
        "numeric(4)",
        "timestamptz(0)",
        "timestamp(3) with time zone",
    ] {
        let yaml = ranged(ty)
            .replace("to: 5", "to: '2026-01-01'")
            .replace("from: 5", "from: '2026-01-01'");
        let yaml = if ty.starts_with("numeric") {
            ranged(ty)
        } else {
            yaml
        };
        Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("{ty}: {e}"));
    }
    for ty in ["text(3)", "numeric(0,1)", "timestamptz(7)"] {
        let e = err(&ranged(ty));
        assert!(
            e.starts_with("databases[0].sharded_tables[0].type: unknown type"),
            "{e}"
        );
    }
}

#[test]
fn servers_on_unix_sockets() {
    let c = Config::from_yaml(&format!(
        "unix_socket_dir: /tmp\n{}",
        BASE.replace("127.0.0.1:5434", "/tmp:5434")
    ))
    .unwrap();
    assert_eq!(c.databases[0].shards[0].replicas[0], "/tmp:5434");
    let d = c.describe();
    assert!(d.contains("unix socket: /tmp/.s.PGSQL.6432"), "{d}");
    assert!(d.contains("/tmp:5434"), "{d}");
}

#[test]
fn example_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/pgshard.example.yaml");
    let c = Config::load(&path).unwrap();
    assert_eq!(c.databases[0].shards.len(), 2);
    assert_eq!(c.users.len(), 4);
    assert_eq!(c.admin.as_ref().unwrap().users, ["admin"]);
    let d = c.describe();
    assert!(
        d.contains("sharded table events by created_at (Range, timestamptz)"),
        "{d}"
    );
    assert!(d.contains("reference tables: countries"), "{d}");
}

#[test]
fn trust_users_need_no_password() {
    let c = Config::from_yaml(
        &BASE.replace("{ name: app, password: app }", "{ name: app, auth: trust }"),
    )
    .unwrap();
    assert_eq!(c.users[0].auth, AuthMethod::Trust);
}

//! No Docker engine runs on our machines: the Docker files are checked for what can be
//! checked without one. The compose file parses, has 2 shards x (primary + replica) of the
//! official image and pgshard in front, and the configuration it mounts passes
//! `pgshard check` and names the nodes at the addresses compose gives them.

use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn compose_file_and_its_config_agree() {
    let text = std::fs::read_to_string(root().join("docker/compose.yaml")).unwrap();
    let mut compose: yaml_serde::Value = yaml_serde::from_str(&text).unwrap();
    compose.apply_merge().unwrap();
    let services = compose["services"].as_mapping().expect("services");
    for s in 0..2 {
        for role in ["primary", "replica"] {
            let name = format!("shard{s}-{role}");
            let svc = &compose["services"][name.as_str()];
            assert_eq!(svc["image"].as_str(), Some("postgres:15"), "{name}");
        }
        let replica = &compose["services"][format!("shard{s}-replica").as_str()];
        let entry = yaml_serde::to_string(&replica["entrypoint"]).unwrap();
        assert!(
            entry.contains("pg_basebackup") && entry.contains(" -R "),
            "{entry}"
        );
    }
    let pgshard = &compose["services"]["pgshard"];
    assert_eq!(
        pgshard["build"]["dockerfile"].as_str(),
        Some("docker/Dockerfile")
    );
    assert!(services.len() == 5, "{services:?}");

    // The mounted configuration.
    let mount = pgshard["volumes"][0].as_str().unwrap();
    let (src, dst) = mount.split_once(':').unwrap();
    assert!(dst.starts_with("/etc/pgshard/pgshard.yaml"));
    let config = root().join("docker").join(src);
    let out = Command::new(env!("CARGO_BIN_EXE_pgshard"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("2 shard(s)"), "{report}");

    // Every node address in the configuration is a service's static address.
    let cfg = pgshard::config::Config::load(&config).unwrap();
    let ip_of = |svc: &str| {
        compose["services"][svc]["networks"]["pg"]["ipv4_address"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for (s, shard) in cfg.databases[0].shards.iter().enumerate() {
        assert_eq!(
            shard.primary,
            format!("{}:5432", ip_of(&format!("shard{s}-primary")))
        );
        assert_eq!(
            shard.replicas,
            vec![format!("{}:5432", ip_of(&format!("shard{s}-replica")))]
        );
    }
    // The replicas copy from the primary of their own shard.
    for s in 0..2 {
        let env = &compose["services"][format!("shard{s}-replica").as_str()]["environment"];
        assert_eq!(
            env["PRIMARY"].as_str().unwrap(),
            ip_of(&format!("shard{s}-primary"))
        );
    }
}

#[test]
fn dockerfile_builds_in_one_stage_and_runs_unprivileged_in_another() {
    let text = std::fs::read_to_string(root().join("docker/Dockerfile")).unwrap();
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "multi-stage: {froms:?}");
    assert!(froms[0].contains(" AS build"));
    assert!(text.contains("cargo build --release --locked"));
    assert!(text.contains("COPY --from=build"));
    let user = text
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert_ne!(user.trim(), "root");
    assert!(text.contains("serve"), "runs pgshard serve");
}

//! The client examples in examples/ run against `pgshard demo`: the Rust one
//! (tokio-postgres) and the Python one (psycopg 3).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        // Ctrl-C: the demo stops its servers and removes its directory.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let _ = self.0.wait();
    }
}

fn demo(port: u16) -> Demo {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgshard"))
        .args(["demo", "--shards", "2", "--replicas", "1", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut line = String::new();
    loop {
        assert!(Instant::now() < deadline, "demo did not get ready");
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "demo exited");
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    // Keep draining its stdout so that it never blocks on a full pipe.
    std::thread::spawn(move || for _ in out.lines() {});
    Demo(child)
}

/// target/debug/examples/shop, built by `cargo test --all-targets` (or built here).
fn rust_example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/shop");
    if !path.exists() {
        let ok = Command::new(env!("CARGO"))
            .args(["build", "--example", "shop"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap()
            .success();
        assert!(ok, "cargo build --example shop");
    }
    path
}

fn run(cmd: &mut Command, url: &str) -> String {
    let out = cmd.env("PGSHARD_URL", url).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?}: {text}");
    text
}

#[test]
fn examples_run_against_the_demo() {
    let port = pgshard::local::free_port();
    let _demo = demo(port);
    let url = format!("host=127.0.0.1 port={port} user=app password=app dbname=app");
    let out = run(&mut Command::new(rust_example()), &url);
    assert!(out.contains("report: 60 orders, total 690.00"), "{out}");
    assert!(out.contains("shop example OK"), "{out}");

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/shop.py");
    let has_psycopg = Command::new("python3")
        .args(["-c", "import psycopg"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_psycopg,
        "the Python example needs psycopg 3: pip install 'psycopg[binary]' (scripts/test installs it)"
    );
    let out = run(Command::new("python3").arg(&script), &url);
    assert!(out.contains("report: 60 orders, total 690.00"), "{out}");
    assert!(out.contains("shop example OK"), "{out}");
}

//! Schemathesis (PyPI) against a live faafo, driven by its own `/openapi.json`: over a
//! thousand generated requests, valid and not, in its coverage, fuzzing and stateful
//! phases. Every answer must be documented (status, content type, headers, body schema)
//! and none a server error. Once against `faafo up` as a user runs it, once against
//! `faafo api` with the worker token so that the worker protocol is exercised past its
//! authentication. `FAAFO_SCHEMATHESIS` names the `st` program (test.sh installs it into
//! target/schemathesis-venv); else `st` from the PATH.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn schemathesis() -> String {
    std::env::var("FAAFO_SCHEMATHESIS").unwrap_or_else(|_| "st".into())
}

/// Runs schemathesis against `base`, with `extra` arguments, in `workdir` (where it keeps
/// its cache); fails the test with its report unless every generated case passed.
fn run_schemathesis(base: &str, workdir: &Path, extra: &[&str]) {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis/schemathesis.toml");
    let program = schemathesis();
    let output = Command::new(&program)
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("{base}/openapi.json"))
        .args(["--max-examples", "30", "--workers", "2", "--max-failures", "20"])
        .args(["--output-truncate", "false", "--request-timeout", "10"])
        // A fixed seed: the same cases every run, so a failure reproduces.
        .args(["--seed", "20261124"])
        .args(extra)
        .env("NO_COLOR", "1")
        .current_dir(workdir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {program} ({e}): install Schemathesis (`python3 -m venv V && V/bin/pip install schemathesis`) and set FAAFO_SCHEMATHESIS=V/bin/st, or run ./test.sh"
            )
        });
    let report = String::from_utf8_lossy(&output.stdout);
    let summary = report
        .lines()
        .skip_while(|line| !line.starts_with("Test cases:"))
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_owned();
    println!("schemathesis against {base} {extra:?}: {summary}");
    assert!(
        output.status.success()
            && summary.contains(" passed")
            && !summary.contains("found")
            && !summary.contains("errored"),
        "schemathesis found problems:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn schemathesis_finds_nothing_against_faafo_up() {
    let dir = tempfile::tempdir().unwrap();
    let up = spawn_up(dir.path(), "up", 1);
    run_schemathesis(up.url(), dir.path(), &[]);
}

#[test]
fn schemathesis_finds_nothing_in_the_worker_protocol() {
    let dir = tempfile::tempdir().unwrap();
    // Lease requests with long waits would each hold a test case for 30 s.
    let api = spawn_api(dir.path(), "api", &["--max-lease-wait-ms", "200"]);
    let token = format!("Authorization: Bearer {TOKEN}");
    run_schemathesis(api.url(), dir.path(), &["--header", &token]);
}

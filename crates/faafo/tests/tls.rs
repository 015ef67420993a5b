//! HTTPS between faafo's processes, with certificates the test makes (a CA and a server
//! certificate for 127.0.0.1): an API and a gateway serving HTTPS, the gateway and a
//! worker trusting the CA with --ca-cert, and the CLI through it all; a client that does
//! not trust the certificate gets a clear error at once.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use faafo_testkit::TestCa;

/// Writes `ca.pem`, `server.pem` and `server.key` into `dir`: a CA, and a certificate it
/// signed for 127.0.0.1 and localhost.
fn make_certificates(dir: &Path) {
    let ca = TestCa::new("faafo test CA");
    let (certificate, key) = ca.issue(&["127.0.0.1", "localhost"]);
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), certificate).unwrap();
    std::fs::write(dir.join("server.key"), key).unwrap();
}

fn faafo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_faafo"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("faafo runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_tiers_speak_https_and_an_untrusted_certificate_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let (ca, cert, key) = (path("ca.pem"), path("server.pem"), path("server.key"));
    let tls = ["--tls-cert", cert.as_str(), "--tls-key", key.as_str()];

    let database = format!("sqlite://{}", path("faafo.db"));
    let images = format!("file://{}", path("images"));
    let api = spawn_api_with(dir.path(), "api", &database, &images, &tls);
    assert!(api.url().starts_with("https://127.0.0.1:"), "{}", api.url());
    let mut gateway_args = vec!["--ca-cert", ca.as_str(), "gateway", "--bind", "127.0.0.1:0"];
    gateway_args.extend(tls);
    gateway_args.extend(["--backend", api.url()]);
    let gateway = Process::spawn_server(dir.path(), "gateway", &gateway_args);
    assert!(gateway.url().starts_with("https://"), "{}", gateway.url());
    let _worker = Process::spawn(
        dir.path(),
        "worker",
        &[
            "--ca-cert",
            &ca,
            "--endpoint-url",
            gateway.url(),
            "worker",
            "--worker-token",
            TOKEN,
        ],
    );

    // Through the gateway over HTTPS, to the API over HTTPS, rendered by a worker that
    // reached them over HTTPS.
    let created = faafo(&[
        "--ca-cert",
        &ca,
        "--endpoint-url",
        gateway.url(),
        "create",
        "--width",
        "64",
        "--height",
        "48",
        "--wait",
    ]);
    assert!(
        created.status.success(),
        "{}\n{}\ngateway log:\n{}\nworker log:\n{}",
        text(&created.stdout),
        text(&created.stderr),
        gateway.log_text(),
        _worker.log_text()
    );
    assert!(
        text(&created.stdout).contains("64 x 48 pixels"),
        "{}",
        text(&created.stdout)
    );

    // Without the CA: refused at once, saying what to do.
    let started = Instant::now();
    let refused = faafo(&["--endpoint-url", gateway.url(), "list"]);
    let waited = started.elapsed();
    assert!(!refused.status.success());
    let message = text(&refused.stderr);
    assert!(
        message.contains("not trusted") && message.contains("--ca-cert"),
        "{message}"
    );
    assert!(
        waited < Duration::from_secs(20),
        "an untrusted certificate is not retried for the whole timeout ({waited:?})"
    );

    // Plain HTTP to an HTTPS port gets no answer; the server goes on serving.
    let plain = api.url().replacen("https://", "http://", 1);
    let answer = faafo(&["--timeout", "2", "--endpoint-url", &plain, "list"]);
    assert!(!answer.status.success());
    let listed = faafo(&["--ca-cert", &ca, "--endpoint-url", api.url(), "list"]);
    assert!(listed.status.success(), "{}", text(&listed.stderr));

    // A certificate file that is not one is a clear error at start.
    let bad = faafo(&[
        "api",
        "--bind",
        "127.0.0.1:0",
        "--database-url",
        &database,
        "--object-store",
        &images,
        "--worker-token",
        TOKEN,
        "--tls-cert",
        &key,
        "--tls-key",
        &key,
    ]);
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("certificate"),
        "{}",
        text(&bad.stderr)
    );
}

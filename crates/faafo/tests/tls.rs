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

#[test]
fn faafo_up_serves_https_and_its_own_workers_need_no_certificate_for_loopback() {
    let dir = tempfile::tempdir().unwrap();
    // A certificate for a name the workers never use: they come in on loopback.
    let ca = TestCa::new("faafo test CA");
    let (certificate, key) = ca.issue(&["127.0.0.1"]);
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    std::fs::write(path("ca.pem"), ca.pem()).unwrap();
    std::fs::write(path("server.pem"), certificate).unwrap();
    std::fs::write(path("server.key"), key).unwrap();
    let data = path("data");
    let up = Process::spawn_server(
        dir.path(),
        "up",
        &[
            "up",
            "--bind",
            "127.0.0.1:0",
            "--data-dir",
            &data,
            "--workers",
            "1",
            "--tls-cert",
            &path("server.pem"),
            "--tls-key",
            &path("server.key"),
        ],
    );
    assert!(up.url().starts_with("https://127.0.0.1:"), "{}", up.url());
    let created = faafo(&[
        "--ca-cert",
        &path("ca.pem"),
        "--endpoint-url",
        up.url(),
        "create",
        "--width",
        "64",
        "--height",
        "48",
        "--wait",
    ]);
    assert!(
        created.status.success(),
        "{}\n{}\nlog:\n{}",
        text(&created.stdout),
        text(&created.stderr),
        up.log_text()
    );
    // --wait returns once every fractal is done: the in-process workers rendered them.
    assert!(
        text(&created.stdout).contains("64 x 48 pixels"),
        "{}",
        text(&created.stdout)
    );
    // The instance lists itself under its HTTPS address, not the workers' way in.
    let endpoints = faafo(&[
        "--ca-cert",
        &path("ca.pem"),
        "--endpoint-url",
        up.url(),
        "--json",
        "status",
    ]);
    assert!(endpoints.status.success(), "{}", text(&endpoints.stderr));
    let status = text(&endpoints.stdout);
    assert!(status.contains(up.url()), "{status}");
}

/// `faafo cluster up` with TLS everywhere, PostgreSQL included: gateways and APIs serve
/// HTTPS, workers and gateways verify them with --ca-cert, and the APIs reach Patroni's
/// PostgreSQL with sslmode=verify-full, which takes nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_speaks_tls_between_all_its_members() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let (ca, cert, key) = (path("ca.pem"), path("server.pem"), path("server.key"));
    let data = path("data");

    // A certificate that does not name --host is refused before anything starts.
    let stranger = TestCa::new("faafo test CA");
    let (elsewhere, elsewhere_key) = stranger.issue(&["10.9.8.7"]);
    std::fs::write(path("elsewhere.pem"), elsewhere).unwrap();
    std::fs::write(path("elsewhere.key"), elsewhere_key).unwrap();
    std::fs::write(path("stranger.pem"), stranger.pem()).unwrap();
    let refused = faafo(&[
        "--ca-cert",
        &path("stranger.pem"),
        "cluster",
        "up",
        "--data-dir",
        &path("refused"),
        "--tls-cert",
        &path("elsewhere.pem"),
        "--tls-key",
        &path("elsewhere.key"),
    ]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("does not name 127.0.0.1"),
        "{}",
        text(&refused.stderr)
    );

    let cluster = spawn_cluster(
        dir.path(),
        1,
        2,
        1,
        &[
            "--ca-cert",
            &ca,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--postgres-nodes",
            "2",
            "--etcd-port",
            "0",
            "--postgres-port",
            "0",
        ],
    );
    assert!(cluster.url().starts_with("https://"), "{}", cluster.url());
    let created = faafo(&[
        "--ca-cert",
        &ca,
        "--endpoint-url",
        cluster.url(),
        "create",
        "--width",
        "64",
        "--height",
        "48",
        "--wait",
    ]);
    assert!(
        created.status.success(),
        "{}\n{}",
        text(&created.stdout),
        text(&created.stderr)
    );
    let status = run_faafo(&["--json", "cluster", "status", "--data-dir", &data]).await;
    let members: Vec<serde_json::Value> = serde_json::from_str(&status).unwrap();
    for member in &members {
        if matches!(member["role"].as_str(), Some("api" | "gateway")) {
            let url = member["url"].as_str().unwrap_or_default();
            assert!(url.starts_with("https://"), "{member}");
        }
    }

    // Every connection to PostgreSQL (faafo's and the replica's) is encrypted: asked of
    // the leader over its local socket, which alone takes plain connections.
    let postgres_dirs: Vec<_> = std::fs::read_dir(Path::new(&data).join("cluster"))
        .unwrap()
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|dir| dir.join("patroni.yml").exists())
        .collect();
    let mut checked = 0;
    for member in postgres_dirs {
        let socket_dir = member.to_str().unwrap().to_owned();
        let port = std::fs::read_to_string(member.join("data/postmaster.pid"))
            .ok()
            .and_then(|pid| pid.lines().nth(3).map(str::to_owned));
        let Some(port) = port else { continue };
        let url = format!("host={socket_dir} port={port} user=postgres dbname=postgres");
        let Ok((client, connection)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await
        else {
            continue;
        };
        tokio::spawn(connection);
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
                 FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                 WHERE a.client_addr IS NOT NULL",
                &[],
            )
            .await
            .unwrap();
        let (encrypted, plain): (i64, i64) = (row.get(0), row.get(1));
        assert_eq!(
            plain, 0,
            "{plain} TCP connection(s) in plain text on {socket_dir}"
        );
        checked += encrypted;
    }
    assert!(checked > 0, "no encrypted connection was seen");
    drop(cluster);
}

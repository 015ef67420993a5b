//! TLS to PostgreSQL as libpq's `sslmode` and `sslrootcert` ask for it, against a real
//! server that serves a certificate from the test's CA.

use faafo_core::wire::CreateFractal;
use faafo_core::{FractalSpec, Limits, error_chain};
use faafo_store::{NewFractal, PostgresOptions, PostgresStore, Store, StoreError, Wakeups};
use faafo_testkit::{PostgresServer, TestCa};
use uuid::Uuid;

/// A server whose certificate names only `names`, and the CA's PEM in a file.
struct Setup {
    server: PostgresServer,
    ca_file: tempfile::NamedTempFile,
    ca_pem: String,
}

fn setup(names: &[&str]) -> Setup {
    let ca = TestCa::new("faafo test PostgreSQL CA");
    let (certificate, key) = ca.issue(names);
    let server = PostgresServer::start_with_tls(&certificate, &key);
    let ca_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca_file.path(), ca.pem()).unwrap();
    Setup {
        server,
        ca_file,
        ca_pem: ca.pem().to_owned(),
    }
}

impl Setup {
    /// The URL of a fresh database, with `parameters` appended.
    async fn url(&self, parameters: &str) -> String {
        format!("{}?{parameters}", self.server.create_database().await)
    }

    fn ca_path(&self) -> String {
        self.ca_file.path().display().to_string()
    }
}

async fn open(url: &str, ca_pem: Option<&str>) -> Result<PostgresStore, StoreError> {
    let mut options = PostgresOptions::new(Wakeups::ListenNotify);
    options.ca_pem = ca_pem.map(|pem| pem.as_bytes().to_vec());
    PostgresStore::connect_with(url, options).await
}

/// The store works, and every connection it opened (pools and LISTEN) is encrypted.
async fn assert_serves_over_tls(store: &PostgresStore, server: &PostgresServer) {
    let (encrypted, plain) = serve_and_count_connections(store, server).await;
    assert!(encrypted >= 1, "no faafo connection is encrypted");
    assert_eq!(plain, 0, "{plain} faafo connection(s) in plain text");
}

/// Makes and reads a fractal; then faafo's connections to `server`: (encrypted, plain).
async fn serve_and_count_connections(store: &PostgresStore, server: &PostgresServer) -> (i64, i64) {
    let request = CreateFractal {
        uuid: None,
        width: 16,
        height: 8,
        iterations: 32,
        xa: -2.0,
        xb: 2.0,
        ya: -1.0,
        yb: 1.0,
        cx: Some(-0.8),
        cy: Some(0.156),
    };
    let uuid = Uuid::new_v4();
    store
        .create(NewFractal {
            uuid,
            spec: FractalSpec::parse(&request, &Limits::default(), 0).unwrap(),
            max_attempts: 3,
            client: "ip:127.0.0.1".into(),
            max_queued_work: None,
        })
        .await
        .unwrap();
    assert!(store.get(uuid).await.unwrap().is_some());

    let (client, connection) =
        tokio_postgres::connect(&server.url("postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.application_name = 'faafo'",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_checks_the_chain_and_the_name() {
    let setup = setup(&["127.0.0.1"]);
    let url = setup
        .url(&format!(
            "sslmode=verify-full&sslrootcert={}",
            setup.ca_path()
        ))
        .await;
    let store = open(&url, None).await.unwrap();
    assert_serves_over_tls(&store, &setup.server).await;

    // Without sslrootcert, the roots are the system's plus the caller's (--ca-cert).
    let url = setup.url("sslmode=verify-full").await;
    let store = open(&url, Some(&setup.ca_pem)).await.unwrap();
    assert_serves_over_tls(&store, &setup.server).await;
    let refused = open(&url, None).await.unwrap_err();
    assert!(
        error_chain(&refused).contains("UnknownIssuer"),
        "{}",
        error_chain(&refused)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_for_another_name_passes_verify_ca_only() {
    let setup = setup(&["db.example.org"]);
    let roots = format!("sslrootcert={}", setup.ca_path());
    let full = setup.url(&format!("sslmode=verify-full&{roots}")).await;
    let refused = open(&full, None).await.unwrap_err();
    assert!(
        error_chain(&refused).contains("not valid for name"),
        "{}",
        error_chain(&refused)
    );

    let ca_only = setup.url(&format!("sslmode=verify-ca&{roots}")).await;
    let store = open(&ca_only, None).await.unwrap();
    assert_serves_over_tls(&store, &setup.server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn require_encrypts_and_checks_roots_only_when_named() {
    let setup = setup(&["db.example.org"]);
    // libpq's `require`: encrypted, the certificate not checked.
    let url = setup.url("sslmode=require").await;
    let store = open(&url, None).await.unwrap();
    assert_serves_over_tls(&store, &setup.server).await;

    // With a root file, `require` checks the chain (libpq does the same).
    let stranger = TestCa::new("another CA");
    let other_roots = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(other_roots.path(), stranger.pem()).unwrap();
    let url = setup
        .url(&format!(
            "sslmode=require&sslrootcert={}",
            other_roots.path().display()
        ))
        .await;
    let refused = open(&url, None).await.unwrap_err();
    assert!(
        error_chain(&refused).contains("UnknownIssuer"),
        "{}",
        error_chain(&refused)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_root_file_is_a_clear_error() {
    let error = open(
        "postgres://u@127.0.0.1:1/db?sslmode=verify-full&sslrootcert=/nowhere/ca.pem",
        None,
    )
    .await
    .unwrap_err();
    assert!(matches!(error, StoreError::InvalidUrl(_)), "{error:?}");
    assert!(
        error_chain(&error).contains("sslrootcert /nowhere/ca.pem: "),
        "{}",
        error_chain(&error)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_sslmode_the_connections_stay_plain() {
    let setup = setup(&["127.0.0.1"]);
    for parameters in ["connect_timeout=5", "sslmode=prefer", "sslmode=disable"] {
        let url = setup.url(parameters).await;
        let store = open(&url, Some(&setup.ca_pem)).await.unwrap();
        let (encrypted, plain) = serve_and_count_connections(&store, &setup.server).await;
        assert_eq!(encrypted, 0, "{parameters}");
        assert!(plain >= 1, "{parameters}");
    }
    // Nor does a URL without parameters (tokio-postgres reads it alone).
    let url = setup.server.create_database().await;
    open(&url, None).await.unwrap();
}

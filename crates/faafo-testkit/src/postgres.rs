//! A PostgreSQL server of its own for a test, from `/usr/lib/postgresql/*/bin`.
//!
//! The data directory is copied from a template made once by `initdb` (guarded by a file
//! lock, since tests run in parallel processes). PostgreSQL refuses to run as root, so when
//! the tests run as root the server runs as the `postgres` user.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running PostgreSQL server; stopped and deleted when dropped.
#[derive(Debug)]
pub struct PostgresServer {
    root: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    /// Serves TLS with `server.crt` and `server.key` in `root` as well as plain TCP.
    tls: bool,
}

/// Where the PostgreSQL binaries are: `FAAFO_PG_BIN`, or the newest Debian install.
fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("FAAFO_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .expect(
            "PostgreSQL must be installed (/usr/lib/postgresql/VERSION/bin), or set FAAFO_PG_BIN",
        )
        .filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("postgres").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("no PostgreSQL server binaries under /usr/lib/postgresql")
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A command that runs as the `postgres` user when we are root (the process itself
/// switches user, so signals reach the server and not a wrapper).
fn as_server_user(program: &Path) -> Command {
    let mut command = Command::new(program);
    if running_as_root() {
        let (uid, gid) = server_user_ids();
        std::os::unix::process::CommandExt::uid(&mut command, uid);
        std::os::unix::process::CommandExt::gid(&mut command, gid);
        // HOME of root is not readable by postgres; some tools look there.
        command.env("HOME", "/tmp");
    }
    command
}

/// The uid and gid of the `postgres` user.
fn server_user_ids() -> (u32, u32) {
    let name = std::ffi::CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam returns a pointer to static storage or null; read at once.
    let user = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !user.is_null(),
        "running as root needs a `postgres` user to run PostgreSQL"
    );
    // SAFETY: checked non-null above.
    unsafe { ((*user).pw_uid, (*user).pw_gid) }
}

fn open_to_everyone(path: &Path) {
    fs::set_permissions(path, fs::Permissions::from_mode(0o777)).expect("chmod");
}

/// The `initdb`-made data directory every test copies, made once per machine and version.
fn template() -> PathBuf {
    let base = std::env::temp_dir().join("faafo-test-postgres");
    fs::create_dir_all(&base).expect("template base");
    open_to_everyone(&base);
    let bin = bin_dir();
    let version = bin
        .parent()
        .and_then(Path::file_name)
        .map(|v| v.to_string_lossy().into_owned())
        .unwrap_or_default();
    let template = base.join(format!("template-{version}"));
    let ready = template.join("PG_VERSION");
    let lock = File::create(base.join(format!("template-{version}.lock"))).expect("lock file");
    // SAFETY: flock on a file descriptor we own.
    assert_eq!(
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) },
        0,
        "flock"
    );
    if !ready.exists() {
        let _ = fs::remove_dir_all(&template);
        let status = as_server_user(&bin.join("initdb"))
            .args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--no-sync",
                "--pgdata",
            ])
            .arg(&template)
            .stdout(Stdio::null())
            .status()
            .expect("initdb runs");
        assert!(status.success(), "initdb failed");
    }
    template
}

impl PostgresServer {
    /// Starts a fresh server on a free port.
    pub fn start() -> PostgresServer {
        Self::start_with(None)
    }

    /// Starts a fresh server that also accepts TLS, with this certificate and key (PEM).
    pub fn start_with_tls(certificate: &str, key: &str) -> PostgresServer {
        Self::start_with(Some((certificate, key)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> PostgresServer {
        let template = template();
        let root = tempfile::Builder::new()
            .prefix("faafo-pg-")
            .tempdir()
            .expect("temp dir");
        open_to_everyone(root.path());
        let data = root.path().join("data");
        let status = as_server_user(Path::new("/bin/cp"))
            .arg("-a")
            .arg(&template)
            .arg(&data)
            .status()
            .expect("cp runs");
        assert!(status.success(), "copying the template cluster failed");
        if let Some((certificate, key)) = tls {
            // PostgreSQL reads a key only if its owner alone can read it.
            for (name, text) in [("server.crt", certificate), ("server.key", key)] {
                let path = root.path().join(name);
                fs::write(&path, text).expect("writing the server's certificate");
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
                if running_as_root() {
                    let (uid, gid) = server_user_ids();
                    std::os::unix::fs::chown(&path, Some(uid), Some(gid)).expect("chown");
                }
            }
        }
        let mut server = PostgresServer {
            root,
            port: crate::free_port(),
            child: None,
            tls: tls.is_some(),
        };
        server.resume();
        server
    }

    fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for `database`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates an empty database and returns its URL.
    pub async fn create_database(&self) -> String {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "faafo_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let (client, connection) =
            tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
                .await
                .expect("connect to postgres");
        let driver = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        drop(client);
        let _ = driver.await;
        self.url(&name)
    }

    /// Stops the server (fast shutdown: connections are cut), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and data.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = File::create(self.root.path().join("postgres.log")).expect("log file");
        let mut command = as_server_user(&bin_dir().join("postgres"));
        if self.tls {
            let file = |name: &str| self.root.path().join(name).display().to_string();
            command.args(["-c", "ssl=on"]);
            command.args(["-c", &format!("ssl_cert_file={}", file("server.crt"))]);
            command.args(["-c", &format!("ssl_key_file={}", file("server.key"))]);
        }
        let child = command
            .arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.root.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
            ])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("postgres starts");
        self.child = Some(child);
        self.wait_until_accepting();
    }

    fn wait_until_accepting(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(bin_dir().join("pg_isready"))
                .args([
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                ])
                .status()
                .is_ok_and(|status| status.success());
            if ready {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("postgres exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not accept connections: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.root.path().join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
        // The data belongs to the postgres user; remove it as that user.
        let _ = as_server_user(Path::new("/bin/rm"))
            .arg("-rf")
            .arg(self.data_dir())
            .status();
    }
}

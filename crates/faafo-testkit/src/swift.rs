//! A throwaway OpenStack Swift cluster for a test: storage nodes with 3 replicas, an
//! rsync daemon, and one proxy serving S3 (s3api, tempauth's `test:tester` / `testing`),
//! on free loopback ports, from Debian's packages. The configurations are those
//! `faafo cluster --swift-nodes` uses. Stopped and deleted when dropped.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use faafo_cluster::members::swift::{self, StorageNode, SwiftLayout};

/// A running Swift cluster.
#[derive(Debug)]
pub struct SwiftCluster {
    _root: tempfile::TempDir,
    layout: SwiftLayout,
    nodes: Vec<StorageNode>,
    /// Each node's processes (servers, replicators, updaters); empty while it is down.
    running: Vec<Vec<Child>>,
    proxy: Option<Child>,
    proxy_address: SocketAddr,
    rsync: Child,
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

impl SwiftCluster {
    /// Starts `nodes` storage nodes (4 keep every listing right while one is down) and a
    /// proxy, and waits until all of them answer.
    pub fn start(nodes: u32) -> SwiftCluster {
        assert!(
            std::path::Path::new("/usr/bin/swift-proxy-server").exists(),
            "OpenStack Swift is not installed: apt-get install --no-install-recommends \
             swift swift-proxy swift-object swift-container swift-account rsync (./test.sh does)"
        );
        let root = tempfile::Builder::new()
            .prefix("faafo-swift")
            .tempdir()
            .expect("temporary directory");
        let layout = SwiftLayout {
            root: root.path().to_owned(),
        };
        let nodes: Vec<StorageNode> = (1..=nodes)
            .map(|i| StorageNode {
                name: format!("swift-{i}"),
                zone: i,
                account: loopback(crate::free_port()),
                container: loopback(crate::free_port()),
                object: loopback(crate::free_port()),
            })
            .collect();
        let proxy_address = loopback(crate::free_port());
        let rsync_address = loopback(crate::free_port());
        swift::write_configs(
            &layout,
            &nodes,
            &[("proxy".into(), proxy_address)],
            rsync_address,
            &format!("{:x}", std::process::id()),
        )
        .expect("Swift configuration");
        swift::build_rings(&layout, &nodes).expect("Swift rings");
        let rsync = Command::new("rsync")
            .args(["--daemon", "--no-detach", "--config"])
            .arg(layout.rsync_config())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rsync starts (apt-get install rsync)");
        let mut cluster = SwiftCluster {
            _root: root,
            layout,
            running: nodes.iter().map(|_| Vec::new()).collect(),
            nodes,
            proxy: None,
            proxy_address,
            rsync,
        };
        for index in 0..cluster.nodes.len() {
            cluster.start_node(index);
        }
        cluster.start_proxy();
        cluster
    }

    fn spawn(&self, program: &str, config: &std::path::Path, log: &str) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.layout.root.join(format!("{log}.log")))
            .expect("log file");
        Command::new(program)
            .arg(config)
            .arg("-v")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{program} starts: {e}"))
    }

    /// Starts node `index` (0-based) and waits until its servers answer.
    pub fn start_node(&mut self, index: usize) {
        assert!(self.running[index].is_empty(), "node {index} is running");
        let node = self.nodes[index].clone();
        self.running[index] = swift::node_programs(&self.layout, &node.name)
            .into_iter()
            .map(|(program, config)| self.spawn(&program, &config, &node.name))
            .collect();
        let addresses = [node.account, node.container, node.object];
        self.wait_until("the storage node", &addresses);
    }

    /// SIGKILLs every process of node `index`, as if its host died.
    pub fn kill_node(&mut self, index: usize) {
        for mut child in self.running[index].drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn start_proxy(&mut self) {
        assert!(self.proxy.is_none(), "the proxy is running");
        let config = self.layout.proxy_config("proxy");
        self.proxy = Some(self.spawn("swift-proxy-server", &config, "proxy"));
        self.wait_until("the proxy", &[self.proxy_address]);
    }

    pub fn kill_proxy(&mut self) {
        if let Some(mut proxy) = self.proxy.take() {
            let _ = proxy.kill();
            let _ = proxy.wait();
        }
    }

    fn wait_until(&self, what: &str, addresses: &[SocketAddr]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("HTTP client");
        loop {
            let all = runtime.block_on(async {
                for address in addresses {
                    if !swift::healthy(&http, *address).await {
                        return false;
                    }
                }
                true
            });
            if all {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not answer within 60 s; logs in {}:\n{}",
                self.layout.root.display(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines of every log, for failure messages.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        for entry in std::fs::read_dir(&self.layout.root)
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                let content = std::fs::read_to_string(&path).unwrap_or_default();
                let lines: Vec<&str> = content.lines().collect();
                text.push_str(&format!("--- {}\n", path.display()));
                text.push_str(&lines[lines.len().saturating_sub(20)..].join("\n"));
                text.push('\n');
            }
        }
        text
    }

    /// The S3 endpoint: `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.proxy_address)
    }

    /// `--object-store` for `bucket` on this cluster.
    pub fn object_store_url(&self, bucket: &str) -> String {
        swift::object_store_url(bucket, self.proxy_address)
    }

    /// The environment that gives S3 clients this cluster's credentials.
    pub fn credentials() -> [(&'static str, &'static str); 2] {
        [
            ("AWS_ACCESS_KEY_ID", swift::ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", swift::SECRET_KEY),
        ]
    }
}

impl Drop for SwiftCluster {
    fn drop(&mut self) {
        self.kill_proxy();
        for index in 0..self.running.len() {
            self.kill_node(index);
        }
        let _ = self.rsync.kill();
        let _ = self.rsync.wait();
    }
}

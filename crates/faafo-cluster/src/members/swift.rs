//! OpenStack Swift, the object store of the tutorial faafo comes from, serving S3 through
//! its s3api middleware: storage nodes (each an account, a container and an object server
//! with their replicators and updaters), one rsync daemon for the container and account
//! replicators, and proxies. Objects keep 3 replicas; with 4 nodes or more, a node can die
//! and every read, write and listing still succeeds (a handoff node takes its share).
//!
//! The configurations are pure functions of the addresses, so the supervisor and the
//! test kit start the same cluster.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Copies of every object (and of every container and account database).
pub const REPLICAS: u32 = 3;
/// The S3 credentials tempauth gives the proxies: access key `test:tester`, secret
/// `testing`. The cluster is on loopback or a private network; put Keystone or a proper
/// user list in front of anything else.
pub const ACCESS_KEY: &str = "test:tester";
pub const SECRET_KEY: &str = "testing";
pub const REGION: &str = "us-east-1";
/// The bucket `faafo cluster` keeps the images in.
pub const BUCKET: &str = "faafo";

/// Storage nodes of a cluster: 4 keep every listing right while one is down.
pub const ADVISED_NODES: u32 = 4;

/// The three servers of a storage node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Account,
    Container,
    Object,
}

impl Server {
    pub const ALL: [Server; 3] = [Server::Account, Server::Container, Server::Object];

    pub fn as_str(self) -> &'static str {
        match self {
            Server::Account => "account",
            Server::Container => "container",
            Server::Object => "object",
        }
    }
}

/// One storage node's addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageNode {
    pub name: String,
    /// Zone of the node in the rings: each node its own, so replicas go to different nodes.
    pub zone: u32,
    pub account: SocketAddr,
    pub container: SocketAddr,
    pub object: SocketAddr,
}

impl StorageNode {
    pub fn address(&self, server: Server) -> SocketAddr {
        match server {
            Server::Account => self.account,
            Server::Container => self.container,
            Server::Object => self.object,
        }
    }
}

/// Where a Swift cluster's files live: `ROOT/etc` (swift.conf and the rings) and a
/// directory per node and per proxy.
#[derive(Debug, Clone)]
pub struct SwiftLayout {
    pub root: PathBuf,
}

impl SwiftLayout {
    pub fn swift_dir(&self) -> PathBuf {
        self.root.join("etc")
    }

    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.root.join(node)
    }

    /// The node's devices directory (`devices` in its configurations); its one device
    /// is `d1`.
    pub fn devices(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("srv")
    }

    pub fn server_config(&self, node: &str, server: Server) -> PathBuf {
        self.node_dir(node)
            .join(format!("{}-server.conf", server.as_str()))
    }

    pub fn proxy_config(&self, proxy: &str) -> PathBuf {
        self.root.join(format!("{proxy}.conf"))
    }

    pub fn rsync_config(&self) -> PathBuf {
        self.root.join("rsyncd.conf")
    }
}

/// `swift.conf`: the hash that places objects, and the one storage policy.
pub fn swift_conf(hash_suffix: &str) -> String {
    format!(
        "[swift-hash]\n\
         swift_hash_path_suffix = {hash_suffix}\n\
         swift_hash_path_prefix = faafo\n\
         \n\
         [storage-policy:0]\n\
         name = Policy-0\n\
         default = yes\n"
    )
}

/// The rsync module a node's container or account databases are pushed to.
fn rsync_module(server: Server, port: u16) -> String {
    format!("{}_{port}", server.as_str())
}

/// A storage node's server configuration, with its replicator and updater sections
/// (run as daemons of their own with the same file).
pub fn server_conf(
    layout: &SwiftLayout,
    node: &StorageNode,
    server: Server,
    rsync: SocketAddr,
    user: &str,
) -> String {
    let name = server.as_str();
    let address = node.address(server);
    let mut text = format!(
        "[DEFAULT]\n\
         bind_ip = {ip}\n\
         bind_port = {port}\n\
         devices = {devices}\n\
         mount_check = false\n\
         workers = 0\n\
         swift_dir = {swift_dir}\n\
         user = {user}\n\
         log_name = {node}-{name}\n\
         \n\
         [pipeline:main]\n\
         pipeline = healthcheck {name}-server\n\
         \n\
         [filter:healthcheck]\n\
         use = egg:swift#healthcheck\n\
         \n\
         [app:{name}-server]\n\
         use = egg:swift#{name}\n\
         \n",
        ip = address.ip(),
        port = address.port(),
        devices = layout.devices(&node.name).display(),
        swift_dir = layout.swift_dir().display(),
        node = node.name,
    );
    match server {
        // Objects are replicated over the object servers' own HTTP port (ssync): no rsync.
        Server::Object => text.push_str(
            "[object-replicator]\n\
             sync_method = ssync\n\
             interval = 15\n\
             \n\
             [object-updater]\n\
             interval = 15\n\
             \n\
             [object-auditor]\n",
        ),
        Server::Container | Server::Account => {
            // rsync URLs name the cluster's one daemon and a module per node and server.
            text.push_str(&format!(
                "[{name}-replicator]\n\
                 interval = 15\n\
                 rsync_module = rsync://{{replication_ip}}:{rsync_port}/{name}_{{replication_port}}\n\
                 \n",
                rsync_port = rsync.port(),
            ));
            if server == Server::Container {
                text.push_str("[container-updater]\ninterval = 15\n\n[container-sync]\n\n");
            }
            text.push_str(&format!("[{name}-auditor]\n"));
        }
    }
    text
}

/// The programs a storage node runs, each with its configuration: the three servers,
/// then the replicators and updaters that heal the cluster when a node returns.
pub fn node_programs(layout: &SwiftLayout, node: &str) -> Vec<(String, PathBuf)> {
    let config = |server| layout.server_config(node, server);
    vec![
        ("swift-account-server".into(), config(Server::Account)),
        ("swift-container-server".into(), config(Server::Container)),
        ("swift-object-server".into(), config(Server::Object)),
        ("swift-account-replicator".into(), config(Server::Account)),
        (
            "swift-container-replicator".into(),
            config(Server::Container),
        ),
        ("swift-object-replicator".into(), config(Server::Object)),
        ("swift-container-updater".into(), config(Server::Container)),
        ("swift-object-updater".into(), config(Server::Object)),
    ]
}

/// A proxy: S3 (s3api) with tempauth's user, and Swift's own API. A node that failed is
/// skipped for `error_suppression_interval` (60 s by default); nodes here come back within
/// seconds, and with the default a second node dying within a minute of the first would
/// leave two of three replicas skipped, so it is 5 s.
pub fn proxy_conf(layout: &SwiftLayout, name: &str, bind: SocketAddr, user: &str) -> String {
    format!(
        "[DEFAULT]\n\
         bind_ip = {ip}\n\
         bind_port = {port}\n\
         workers = 0\n\
         swift_dir = {swift_dir}\n\
         user = {user}\n\
         log_name = {name}\n\
         \n\
         [pipeline:main]\n\
         pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats s3api tempauth copy slo dlo versioned_writes proxy-logging proxy-server\n\
         \n\
         [app:proxy-server]\n\
         use = egg:swift#proxy\n\
         account_autocreate = true\n\
         error_suppression_interval = 5\n\
         \n\
         [filter:s3api]\n\
         use = egg:swift#s3api\n\
         location = {REGION}\n\
         \n\
         [filter:tempauth]\n\
         use = egg:swift#tempauth\n\
         user_test_tester = {SECRET_KEY} .admin\n\
         \n\
         [filter:catch_errors]\n\
         use = egg:swift#catch_errors\n\
         \n\
         [filter:gatekeeper]\n\
         use = egg:swift#gatekeeper\n\
         \n\
         [filter:healthcheck]\n\
         use = egg:swift#healthcheck\n\
         \n\
         [filter:proxy-logging]\n\
         use = egg:swift#proxy_logging\n\
         \n\
         [filter:cache]\n\
         use = egg:swift#memcache\n\
         \n\
         [filter:listing_formats]\n\
         use = egg:swift#listing_formats\n\
         \n\
         [filter:copy]\n\
         use = egg:swift#copy\n\
         \n\
         [filter:slo]\n\
         use = egg:swift#slo\n\
         \n\
         [filter:dlo]\n\
         use = egg:swift#dlo\n\
         \n\
         [filter:versioned_writes]\n\
         use = egg:swift#versioned_writes\n",
        ip = bind.ip(),
        port = bind.port(),
        swift_dir = layout.swift_dir().display(),
    )
}

/// The rsync daemon: a module per node and database server.
pub fn rsyncd_conf(layout: &SwiftLayout, nodes: &[StorageNode], bind: SocketAddr) -> String {
    let mut text = format!(
        "address = {ip}\n\
         port = {port}\n\
         use chroot = no\n\
         max connections = 16\n\
         lock file = {lock}\n\
         pid file = {pid}\n\
         \n",
        ip = bind.ip(),
        port = bind.port(),
        lock = layout.root.join("rsyncd.lock").display(),
        pid = layout.root.join("rsyncd.pid").display(),
    );
    for node in nodes {
        for server in [Server::Account, Server::Container] {
            text.push_str(&format!(
                "[{module}]\n\
                 path = {devices}\n\
                 read only = false\n\
                 lock file = {lock}\n\
                 \n",
                module = rsync_module(server, node.address(server).port()),
                devices = layout.devices(&node.name).display(),
                lock = layout
                    .root
                    .join(format!(
                        "{}.lock",
                        rsync_module(server, node.address(server).port())
                    ))
                    .display(),
            ));
        }
    }
    text
}

/// The `swift-ring-builder` runs that make the three rings: every node's device, three
/// replicas, 2^8 partitions. `rebalance` exits 1 on a mere warning: accept 0 and 1.
pub fn ring_commands(layout: &SwiftLayout, nodes: &[StorageNode]) -> Vec<Vec<String>> {
    let mut commands = Vec::new();
    for server in Server::ALL {
        let builder = layout
            .swift_dir()
            .join(format!("{}.builder", server.as_str()))
            .display()
            .to_string();
        commands.push(vec![
            builder.clone(),
            "create".into(),
            "8".into(),
            REPLICAS.to_string(),
            "0".into(),
        ]);
        for node in nodes {
            let address = node.address(server);
            commands.push(vec![
                builder.clone(),
                "add".into(),
                format!("r1z{}-{}:{}/d1", node.zone, address.ip(), address.port()),
                "100".into(),
            ]);
        }
        commands.push(vec![builder, "rebalance".into()]);
    }
    commands
}

/// Whether the rings in `swift_dir` were made for exactly these nodes (they are made
/// once; a cluster started again on the same data reuses them).
pub fn rings_exist(layout: &SwiftLayout) -> bool {
    Server::ALL.iter().all(|server| {
        layout
            .swift_dir()
            .join(format!("{}.ring.gz", server.as_str()))
            .exists()
    })
}

/// Makes a node's device directory.
pub fn prepare_node(layout: &SwiftLayout, node: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(layout.devices(node).join("d1"))
}

/// Writes every configuration file of the cluster.
pub fn write_configs(
    layout: &SwiftLayout,
    nodes: &[StorageNode],
    proxies: &[(String, SocketAddr)],
    rsync: SocketAddr,
    hash_suffix: &str,
) -> std::io::Result<()> {
    std::fs::create_dir_all(layout.swift_dir())?;
    std::fs::write(
        layout.swift_dir().join("swift.conf"),
        swift_conf(hash_suffix),
    )?;
    let user = current_user();
    for node in nodes {
        prepare_node(layout, &node.name)?;
        for server in Server::ALL {
            std::fs::write(
                layout.server_config(&node.name, server),
                server_conf(layout, node, server, rsync, &user),
            )?;
        }
    }
    for (name, bind) in proxies {
        std::fs::write(
            layout.proxy_config(name),
            proxy_conf(layout, name, *bind, &user),
        )?;
    }
    std::fs::write(layout.rsync_config(), rsyncd_conf(layout, nodes, rsync))?;
    Ok(())
}

/// Runs `swift-ring-builder` for every ring, unless the rings are already there.
pub fn build_rings(layout: &SwiftLayout, nodes: &[StorageNode]) -> anyhow::Result<()> {
    if rings_exist(layout) {
        return Ok(());
    }
    for arguments in ring_commands(layout, nodes) {
        let output = std::process::Command::new("swift-ring-builder")
            .args(&arguments)
            .output()
            .map_err(|e| {
                anyhow::anyhow!("running swift-ring-builder: {e} (apt-get install swift)")
            })?;
        if !matches!(output.status.code(), Some(0 | 1)) {
            anyhow::bail!(
                "swift-ring-builder {} failed: {}{}",
                arguments.join(" "),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    Ok(())
}

/// A storage node's health: every one of its servers answers.
pub async fn node_health(http: &reqwest::Client, node: &StorageNode) -> super::Health {
    for server in Server::ALL {
        if !healthy(http, node.address(server)).await {
            return super::Health::not(format!(
                "down: its {} server does not answer",
                server.as_str()
            ));
        }
    }
    super::Health::ready("healthy")
}

/// Whether a Swift server at `address` answers its health check.
pub async fn healthy(http: &reqwest::Client, address: SocketAddr) -> bool {
    matches!(
        http.get(format!("http://{address}/healthcheck")).send().await,
        Ok(r) if r.status().is_success()
    )
}

/// What `faafo api --object-store` is given for a bucket behind `proxy`.
pub fn object_store_url(bucket: &str, proxy: SocketAddr) -> String {
    format!("s3://{bucket}?endpoint=http://{proxy}&region={REGION}")
}

/// The user Swift's daemons run as: whoever starts them (run as root, they would switch
/// to a `swift` user, which cannot write the directories made for them here).
pub fn current_user() -> String {
    // SAFETY: getpwuid returns a pointer to static storage or null; read at once.
    unsafe {
        let entry = libc::getpwuid(libc::geteuid());
        if entry.is_null() {
            return "root".into();
        }
        std::ffi::CStr::from_ptr((*entry).pw_name)
            .to_string_lossy()
            .into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes() -> Vec<StorageNode> {
        (1..=4u16)
            .map(|i| StorageNode {
                name: format!("swift-{i}"),
                zone: u32::from(i),
                account: format!("127.0.0.1:{}", 9600 + i).parse().unwrap(),
                container: format!("127.0.0.1:{}", 9610 + i).parse().unwrap(),
                object: format!("127.0.0.1:{}", 9620 + i).parse().unwrap(),
            })
            .collect()
    }

    fn layout() -> SwiftLayout {
        SwiftLayout {
            root: "/data/cluster/swift".into(),
        }
    }

    #[test]
    fn configurations() {
        let rsync: SocketAddr = "127.0.0.1:9690".parse().unwrap();
        let nodes = nodes();
        let mut all = String::new();
        for server in Server::ALL {
            all.push_str(&format!("### {}\n", server.as_str()));
            all.push_str(&server_conf(&layout(), &nodes[1], server, rsync, "faafo"));
        }
        all.push_str("### proxy\n");
        all.push_str(&proxy_conf(
            &layout(),
            "swift-proxy-1",
            "127.0.0.1:9700".parse().unwrap(),
            "faafo",
        ));
        all.push_str("### rsyncd\n");
        all.push_str(&rsyncd_conf(&layout(), &nodes[..1], rsync));
        insta::assert_snapshot!(all);
    }

    #[test]
    fn rings_hold_every_node_in_its_own_zone() {
        let commands = ring_commands(&layout(), &nodes());
        assert_eq!(commands.len(), 3 * (1 + 4 + 1));
        let adds: Vec<&str> = commands
            .iter()
            .filter(|c| c[1] == "add")
            .map(|c| c[2].as_str())
            .collect();
        assert!(adds.contains(&"r1z3-127.0.0.1:9623/d1"), "{adds:?}");
        assert_eq!(commands[0][2..], ["8", "3", "0"]);
    }
}

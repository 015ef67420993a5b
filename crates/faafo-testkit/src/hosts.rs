//! Several hosts on one machine, for the failures only several hosts have: a host gone at
//! once, a host cut off while its processes keep running. Each host is a Linux network
//! namespace with one interface, joined by a veth pair to a bridge; the hosts get private
//! addresses the test makes for itself (`10.77.X.1`, `.2`, ...), and the test process
//! itself is on the bridge (`10.77.X.254`), as the clients' network. Nothing else is
//! ever a target. Needs root (CAP_NET_ADMIN); [`Hosts::create`] says why when it cannot.
//! Dropping the hosts kills every process in them and removes the namespaces and links.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// One host: a network namespace with one address.
#[derive(Debug, Clone)]
pub struct Host {
    /// `host-1`, `host-2`, ...
    pub name: String,
    pub address: Ipv4Addr,
    namespace: String,
    /// The bridge end of its veth pair: down means the host is cut off.
    link: String,
}

impl Host {
    /// A command that runs `program` inside this host's namespace (the same process, as
    /// `ip netns exec` execs it, so its pid is the program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.namespace])
            .arg(program);
        command
    }

    /// The pids of every process in the host.
    pub fn pids(&self) -> Vec<i32> {
        let output = Command::new("ip")
            .args(["netns", "pids", &self.namespace])
            .output();
        output
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|pid| pid.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Runs `work` on a thread of its own inside the host's network namespace, so that
    /// the sockets it opens are the host's: what a program on the host would see.
    pub fn within<T: Send>(&self, work: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.namespace);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let namespace =
                        std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                    // SAFETY: setns(2) on a descriptor we own; it moves this thread only.
                    let entered = unsafe {
                        libc::setns(
                            std::os::fd::AsRawFd::as_raw_fd(&namespace),
                            libc::CLONE_NEWNET,
                        )
                    };
                    assert_eq!(
                        entered,
                        0,
                        "setns into {path}: {}",
                        std::io::Error::last_os_error()
                    );
                    work()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Kills every process of the host at once, as when it loses power. Returns how many.
    pub fn crash(&self) -> usize {
        let pids = self.pids();
        for &pid in &pids {
            // SAFETY: a plain kill(2) of a process in the test's own namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        pids.len()
    }
}

/// The hosts of one test, and the bridge between them.
#[derive(Debug)]
pub struct Hosts {
    pub hosts: Vec<Host>,
    bridge: String,
    /// The address of the test process on the bridge.
    pub outside: Ipv4Addr,
}

impl Hosts {
    /// Makes `count` hosts on a new bridge, or says why it cannot (not root, no `ip`).
    pub fn create(count: u8) -> Result<Hosts, String> {
        // Interface names have at most 15 bytes; the process id keeps concurrent test
        // binaries apart, and picks the subnet.
        let id = std::process::id();
        let tag = format!("{:x}", id & 0xffff);
        let subnet = 16 + (id % 200) as u8;
        let bridge = format!("fbr{tag}");
        let outside = Ipv4Addr::new(10, 77, subnet, 254);
        let hosts: Vec<Host> = (1..=count)
            .map(|i| Host {
                name: format!("host-{i}"),
                address: Ipv4Addr::new(10, 77, subnet, i),
                namespace: format!("faafo-{tag}-{i}"),
                link: format!("f{tag}h{i}"),
            })
            .collect();
        let made = Hosts {
            hosts,
            bridge,
            outside,
        };
        // Leftovers of an earlier run with the same process id.
        made.remove();
        ip(&["link", "add", &made.bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{outside}/24"), "dev", &made.bridge])?;
        ip(&["link", "set", &made.bridge, "up"])?;
        for host in &made.hosts {
            let ns = host.namespace.as_str();
            ip(&["netns", "add", ns])?;
            ip(&[
                "link", "add", &host.link, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ])?;
            ip(&["link", "set", &host.link, "master", &made.bridge, "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", host.address),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(made)
    }

    pub fn get(&self, index: usize) -> &Host {
        &self.hosts[index]
    }

    /// Cuts the host off from the others and from the clients; its processes keep running.
    pub fn isolate(&self, index: usize) {
        ip(&["link", "set", &self.hosts[index].link, "down"]).expect("link down");
    }

    /// Joins a cut-off host again.
    pub fn heal(&self, index: usize) {
        ip(&["link", "set", &self.hosts[index].link, "up"]).expect("link up");
    }

    fn remove(&self) {
        for host in &self.hosts {
            host.crash();
            let _ = ip(&["netns", "delete", &host.namespace]);
            let _ = ip(&["link", "delete", &host.link]);
        }
        let _ = ip(&["link", "delete", &self.bridge]);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.remove();
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip (apt-get install iproute2): {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

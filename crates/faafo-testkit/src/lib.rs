//! Real infrastructure for tests: a throwaway PostgreSQL cluster started from the
//! installed binaries, a throwaway OpenStack Swift cluster serving S3, a TCP proxy that
//! can cut every connection through it, hosts made of network namespaces, and a
//! certificate authority.

mod hosts;
mod postgres;
mod proxy;
mod swift;
mod tls;

pub use hosts::{Host, Hosts};
pub use postgres::PostgresServer;
pub use proxy::TcpProxy;
pub use swift::SwiftCluster;
pub use tls::TestCa;

/// A free TCP port on loopback (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

//! etcd members: the consensus store Patroni keeps its leader key in. Three members, so
//! one can die and the other two still form a majority.

use std::net::SocketAddr;
use std::path::Path;

use super::Health;

/// How many etcd members a cluster with PostgreSQL runs.
pub const MEMBERS: u32 = 3;

/// One member's addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub client: SocketAddr,
    pub peer: SocketAddr,
}

/// The command line of the etcd member `me` of `peers`, with its data in `data_dir`.
/// Heartbeat and election timeouts are etcd's own advice for a local network. Pre-vote
/// (etcd 3.5's default, off in Debian 12's 3.4): a member cut off from the others keeps
/// calling elections it cannot win, and without pre-vote each one raises its term; when
/// it is back, that term deposes the working leader and etcd has none for seconds, at
/// times longer than Patroni's retry_timeout: Patroni's leader then demotes itself, a
/// second failover for nothing (the multi-host test saw both).
pub fn arguments(me: &Peer, peers: &[Peer], data_dir: &Path) -> Vec<String> {
    let initial_cluster: Vec<String> = peers
        .iter()
        .map(|p| format!("{}=http://{}", p.name, p.peer))
        .collect();
    vec![
        format!("--name={}", me.name),
        format!("--data-dir={}", data_dir.display()),
        format!("--listen-client-urls=http://{}", me.client),
        format!("--advertise-client-urls=http://{}", me.client),
        format!("--listen-peer-urls=http://{}", me.peer),
        format!("--initial-advertise-peer-urls=http://{}", me.peer),
        format!("--initial-cluster={}", initial_cluster.join(",")),
        // Ignored once the data directory exists: a restart rejoins the same cluster.
        "--initial-cluster-state=new".into(),
        "--initial-cluster-token=faafo".into(),
        "--heartbeat-interval=100".into(),
        "--election-timeout=1000".into(),
        "--pre-vote=true".into(),
    ]
}

/// `GET /health` on the client port: healthy when the member sees a leader.
pub async fn health(http: &reqwest::Client, client: SocketAddr) -> Health {
    #[derive(serde::Deserialize)]
    struct Answer {
        health: String,
    }
    match http.get(format!("http://{client}/health")).send().await {
        Ok(response) => match response.json::<Answer>().await {
            Ok(answer) if answer.health == "true" => Health::ready("healthy"),
            Ok(_) => Health::not("unhealthy (no leader)"),
            Err(_) => Health::not("unhealthy (bad answer)"),
        },
        Err(_) => Health::not("no answer"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line() {
        let peers: Vec<Peer> = (1..=3)
            .map(|i| Peer {
                name: format!("etcd-{i}"),
                client: format!("127.0.0.1:{}", 9300 + i).parse().unwrap(),
                peer: format!("127.0.0.1:{}", 9400 + i).parse().unwrap(),
            })
            .collect();
        let arguments = arguments(&peers[1], &peers, Path::new("/data/cluster/etcd-2"));
        insta::assert_snapshot!(arguments.join("\n"));
    }
}

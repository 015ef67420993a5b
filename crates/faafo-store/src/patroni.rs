//! The fence for a PostgreSQL cluster run by Patroni: writes go only to the leader that
//! Patroni elected, and only while its election is known to hold.
//!
//! A multi-host URL with `target_session_attrs=read-write` is not a fence: a primary whose
//! Patroni has died still says read-write, and once another member is promoted its commits
//! hang until its Patroni returns, resets synchronous replication and lets them "succeed"
//! just before pg_rewind throws them away. So the leader is found the way Patroni defines
//! it: `GET /primary` on a member's REST API answers 200 only while that member holds the
//! leader key (Patroni's own answer is timed by the key's ttl).
//!
//! Every [`POLL_INTERVAL`] each endpoint is asked. An answer of 200 *confirms* the leader
//! from the moment the request was sent. A confirmation is trusted for [`FENCE_WINDOW`],
//! shorter than the time Patroni takes to hand the leader key to another member (its
//! ttl, less the loop and retry time the old leader may have spent since its last renewal),
//! so by the time a new leader can be promoted, this process has stopped using the old one:
//! its pools are closed and the operations in flight on them answer "unavailable" (a 503
//! the client retries), never success.

use std::collections::HashMap;
use std::time::Duration;

use faafo_core::node::DatabaseMemberView;
use serde::Deserialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often every Patroni endpoint is asked who leads.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How long one confirmation of the leader is trusted. The old leader's key cannot pass
/// to another member sooner than ttl - loop_wait - retry_timeout after it last answered
/// 200: 16 s with the timings `faafo cluster` gives Patroni (ttl 20 s, loop_wait 1 s,
/// retry_timeout 3 s). 4 s leaves that margin to a stalled process, and an API cut off
/// from the members stops taking writes, and says so with 503, within 4 s.
pub const FENCE_WINDOW: Duration = Duration::from_secs(4);
/// Patroni's REST API can take over a second to answer while PostgreSQL recovers.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Who leads, as far as this process may act on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leader {
    /// No leader is confirmed: nothing may be written. Says why.
    Unknown(String),
    /// The PostgreSQL server of the confirmed leader. `term` changes whenever the leader
    /// changes or is confirmed again after a gap, so connections from an earlier term are
    /// never reused.
    Confirmed {
        member: String,
        host: String,
        port: u16,
        term: u64,
    },
}

impl Leader {
    pub fn term(&self) -> Option<u64> {
        match self {
            Leader::Unknown(_) => None,
            Leader::Confirmed { term, .. } => Some(*term),
        }
    }
}

/// Follows the Patroni leader in the background; stops when dropped.
#[derive(Debug)]
pub struct PatroniFence {
    leader: watch::Receiver<Leader>,
    stop: CancellationToken,
    http: reqwest::Client,
    endpoints: Vec<String>,
}

impl Drop for PatroniFence {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl PatroniFence {
    /// Starts following the cluster whose members' REST APIs are `endpoints`
    /// (`http://host:8008`).
    pub fn start(endpoints: Vec<String>) -> Result<PatroniFence, String> {
        if endpoints.is_empty() {
            return Err("no Patroni REST endpoints given".into());
        }
        let mut normalized = Vec::new();
        for endpoint in endpoints {
            let endpoint = endpoint.trim().trim_end_matches('/').to_owned();
            let url = reqwest::Url::parse(&endpoint)
                .map_err(|e| format!("Patroni endpoint {endpoint:?} is not a URL: {e}"))?;
            if url.scheme() != "http" && url.scheme() != "https" {
                return Err(format!(
                    "Patroni endpoint {endpoint:?} must be http:// or https://"
                ));
            }
            normalized.push(endpoint);
        }
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| e.to_string())?;
        let (sender, leader) = watch::channel(Leader::Unknown(
            "the Patroni leader has not been confirmed yet".into(),
        ));
        let stop = CancellationToken::new();
        tokio::spawn(warn_of_old_members(http.clone(), normalized.clone()));
        tokio::spawn(follow(
            http.clone(),
            normalized.clone(),
            sender,
            stop.clone(),
        ));
        Ok(PatroniFence {
            leader,
            stop,
            http,
            endpoints: normalized,
        })
    }

    pub fn current(&self) -> Leader {
        self.leader.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Leader> {
        self.leader.clone()
    }

    /// The members as the first Patroni that answers lists them (`GET /cluster`).
    pub async fn members(&self) -> Vec<DatabaseMemberView> {
        for endpoint in &self.endpoints {
            let Ok(view) = cluster_view(&self.http, endpoint).await else {
                continue;
            };
            return view
                .members
                .into_iter()
                .map(|m| DatabaseMemberView {
                    address: m.host.map(|host| match m.port {
                        Some(port) => format!("{host}:{port}"),
                        None => host,
                    }),
                    lag_bytes: m.lag.as_ref().and_then(serde_json::Value::as_u64),
                    name: m.name,
                    role: m.role,
                    state: m.state,
                })
                .collect();
        }
        Vec::new()
    }

    /// Waits until a leader is confirmed, or `limit` passes.
    pub async fn confirmed(&self, limit: Duration) -> Leader {
        let mut leader = self.subscribe();
        let _ = tokio::time::timeout(limit, leader.wait_for(|l| l.term().is_some())).await;
        self.current()
    }
}

/// Resolves when `leader` no longer has `term`: the leader changed or lost its
/// confirmation.
pub async fn term_ended(mut leader: watch::Receiver<Leader>, term: u64) {
    if leader.wait_for(|l| l.term() != Some(term)).await.is_err() {
        // The fence is gone (the store is being dropped): treat it as ended.
    }
}

#[derive(Debug, Deserialize)]
struct ClusterView {
    members: Vec<ClusterMember>,
}

#[derive(Debug, Deserialize)]
struct ClusterMember {
    name: String,
    #[serde(default)]
    role: String,
    #[serde(default)]
    state: String,
    api_url: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    /// Bytes behind the leader, or "unknown".
    lag: Option<serde_json::Value>,
}

async fn cluster_view(http: &reqwest::Client, endpoint: &str) -> Result<ClusterView, String> {
    http.get(format!("{endpoint}/cluster"))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| format!("{endpoint}/cluster: {e}"))?
        .json()
        .await
        .map_err(|e| format!("{endpoint}/cluster: {e}"))
}

/// The PostgreSQL address behind one REST endpoint, learned from `GET /cluster`.
#[derive(Debug, Clone)]
struct Server {
    member: String,
    host: String,
    port: u16,
}

/// The first Patroni release known not to lose acknowledged writes in a failover, with
/// the bugs of the releases before it:
/// - Before 3.0.3, an old leader whose etcd session had expired (a host cut off and back,
///   or a stalled loop) put the leader key back unconditionally and promoted its own stale
///   data, throwing away what the new leader had acknowledged (upstream commit d98d6d0b).
/// - Before 3.1.2, a primary started again by a new Patroni process ("starting primary
///   after failure") ran with `synchronous_standby_names` at `*` (or empty) while the
///   `/sync` key still named the standby from before. Patroni saw no change to make and
///   left it so; PostgreSQL let another standby, or none, confirm commits, and a failover
///   then promoted the standby `/sync` named, without them (upstream commit c855b0bf).
///   With 3.0.4, the Patroni failover test once lost an acknowledged create when a
///   leader restarted this way was killed.
pub const SAFE_VERSION: [u32; 3] = [3, 1, 2];

/// A short reason to give with a refusal or a warning about a Patroni older than
/// [`SAFE_VERSION`].
pub const UNSAFE_VERSION_REASON: &str = "it can lose acknowledged writes in a failover (a stale \
     leader taking its key back, fixed in 3.0.3; a failover to a standby that was not \
     synchronous after a primary restarted, fixed in 3.1.2)";

/// Whether the Patroni `version` ("3.0.2") is older than [`SAFE_VERSION`]; `None` when it
/// cannot be read.
pub fn loses_acknowledged_writes(version: &str) -> Option<bool> {
    let parts: Vec<u32> = version
        .trim()
        .split('.')
        .map_while(|part| part.parse().ok())
        .collect();
    (parts.len() >= 2).then(|| parts.as_slice() < SAFE_VERSION.as_slice())
}

/// Asks each member once for its Patroni version (`GET /patroni`) and warns about any
/// older than [`SAFE_VERSION`]: the fence cannot make up for a leader election that
/// promotes stale data.
async fn warn_of_old_members(http: reqwest::Client, endpoints: Vec<String>) {
    #[derive(Deserialize)]
    struct Status {
        patroni: Version,
    }
    #[derive(Deserialize)]
    struct Version {
        version: String,
    }
    for endpoint in endpoints {
        let answer = http.get(format!("{endpoint}/patroni")).send().await;
        let Ok(status) = answer else { continue };
        let Ok(status) = status.json::<Status>().await else {
            continue;
        };
        let version = status.patroni.version;
        if loses_acknowledged_writes(&version) == Some(true) {
            tracing::warn!(%endpoint, %version, "upgrade this Patroni: {UNSAFE_VERSION_REASON}");
        }
    }
}

async fn follow(
    http: reqwest::Client,
    endpoints: Vec<String>,
    leader: watch::Sender<Leader>,
    stop: CancellationToken,
) {
    let mut servers: HashMap<String, Server> = HashMap::new();
    let mut confirmed_until: Option<Instant> = None;
    let mut next_term = 1u64;
    loop {
        let sent = Instant::now();
        // A round never outlives the current confirmation: expiry is acted on in time.
        // Otherwise it ends a little after the requests' own time limit, so that their
        // reasons (refused, timed out) are what is reported.
        let round_end = sent + REQUEST_TIMEOUT + Duration::from_millis(250);
        let round_deadline = confirmed_until.map_or(round_end, |until| until.min(round_end));
        let round = tokio::time::timeout_at(
            round_deadline,
            ask_every_endpoint(&http, &endpoints, &mut servers),
        );
        let outcome = tokio::select! {
            outcome = round => outcome.unwrap_or_else(|_| Err("Patroni did not answer in time".into())),
            _ = stop.cancelled() => return,
        };
        match outcome {
            Ok(server) => {
                confirmed_until = Some(sent + FENCE_WINDOW);
                let same = matches!(&*leader.borrow(), Leader::Confirmed { member, host, port, .. }
                    if *member == server.member && *host == server.host && *port == server.port);
                if !same {
                    tracing::info!(member = %server.member, host = %server.host, port = server.port, "Patroni leader confirmed");
                    leader.send_replace(Leader::Confirmed {
                        member: server.member,
                        host: server.host,
                        port: server.port,
                        term: next_term,
                    });
                    next_term += 1;
                }
            }
            Err(reason) => {
                let expired = confirmed_until.is_none_or(|until| Instant::now() >= until);
                if expired {
                    let reason = format!("no PostgreSQL leader: {reason}");
                    if leader.borrow().term().is_some() {
                        tracing::warn!(%reason, "Patroni leader no longer confirmed; writes stop");
                    }
                    if *leader.borrow() != Leader::Unknown(reason.clone()) {
                        leader.send_replace(Leader::Unknown(reason));
                    }
                    confirmed_until = None;
                }
            }
        }
        let mut wake = sent + POLL_INTERVAL;
        if let Some(until) = confirmed_until {
            wake = wake.min(until);
        }
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Asks every endpoint `GET /primary` at once; the first to answer 200 leads (Patroni
/// answers so only while it holds the leader key). An endpoint that hangs (a frozen
/// host) holds up nobody: the others' answers are taken as they come. Each request runs
/// to its end in a task of its own (bounded by its timeout) even after the round is
/// decided, so that Patroni is never left writing to a closed socket (it logs a
/// traceback for each).
async fn ask_every_endpoint(
    http: &reqwest::Client,
    endpoints: &[String],
    servers: &mut HashMap<String, Server>,
) -> Result<Server, String> {
    use futures::StreamExt;
    let mut answers: futures::stream::FuturesUnordered<_> = endpoints
        .iter()
        .map(|endpoint| {
            let (http, endpoint) = (http.clone(), endpoint.clone());
            tokio::spawn(async move {
                let answer = match http.get(format!("{endpoint}/primary")).send().await {
                    Ok(response) => {
                        let status = response.status();
                        let _ = response.bytes().await;
                        Ok(status)
                    }
                    Err(error) => Err(error),
                };
                (endpoint, answer)
            })
        })
        .collect();
    let mut why = Vec::new();
    while let Some(joined) = answers.next().await {
        let Ok((endpoint, answer)) = joined else {
            continue;
        };
        let endpoint = &endpoint;
        match answer {
            Ok(status) if status == reqwest::StatusCode::OK => {
                if let Some(server) = servers.get(endpoint) {
                    return Ok(server.clone());
                }
                let server = server_behind(http, endpoint).await?;
                servers.insert(endpoint.clone(), server.clone());
                return Ok(server);
            }
            Ok(status) => why.push(format!("{endpoint} is not the leader ({status})")),
            Err(error) if error.is_timeout() => why.push(format!("{endpoint} timed out")),
            Err(error) if error.is_connect() => why.push(format!("{endpoint} refused")),
            Err(error) => why.push(format!("{endpoint}: {error}")),
        }
    }
    why.sort();
    Err(why.join("; "))
}

/// The PostgreSQL server that the member behind `endpoint` runs, from `GET /cluster`.
async fn server_behind(http: &reqwest::Client, endpoint: &str) -> Result<Server, String> {
    let view = cluster_view(http, endpoint).await?;
    let authority = |url: &str| {
        reqwest::Url::parse(url)
            .ok()
            .map(|u| (u.host_str().map(str::to_owned), u.port_or_known_default()))
    };
    let wanted = authority(endpoint);
    let member = view
        .members
        .into_iter()
        .find(|m| m.api_url.as_deref().and_then(authority) == wanted)
        .ok_or_else(|| format!("{endpoint}/cluster does not list the member at {endpoint}"))?;
    match (member.host, member.port) {
        (Some(host), Some(port)) => Ok(Server {
            member: member.name,
            host,
            port,
        }),
        _ => Err(format!(
            "{endpoint}/cluster gives no PostgreSQL address for {}",
            member.name
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patroni_before_3_1_2_is_known_to_lose_writes() {
        for unsafe_version in ["2.1.9", "3.0.2", "3.0.4", "3.1.1", "3.1"] {
            assert_eq!(
                loses_acknowledged_writes(unsafe_version),
                Some(true),
                "{unsafe_version}"
            );
        }
        for safe_version in ["3.1.2", "3.3.11", "4.0.4", "4.1.5", "10.0"] {
            assert_eq!(
                loses_acknowledged_writes(safe_version),
                Some(false),
                "{safe_version}"
            );
        }
        assert_eq!(loses_acknowledged_writes("unknown"), None);
    }

    #[tokio::test]
    async fn endpoints_must_be_http_urls() {
        assert!(PatroniFence::start(vec![]).is_err());
        let error = PatroniFence::start(vec!["127.0.0.1:8008".into()]).unwrap_err();
        assert!(error.contains("127.0.0.1:8008"), "{error}");
        let error = PatroniFence::start(vec!["ftp://127.0.0.1:8008".into()]).unwrap_err();
        assert!(error.contains("http://"), "{error}");
    }

    #[tokio::test]
    async fn nobody_answering_is_no_leader_with_the_reason() {
        // Nothing listens on port 9 of this loopback address.
        let fence = PatroniFence::start(vec!["http://127.0.0.1:9/".into()]).unwrap();
        let mut leader = fence.subscribe();
        let reason = tokio::time::timeout(
            Duration::from_secs(10),
            leader.wait_for(|l| matches!(l, Leader::Unknown(r) if r.contains("refused"))),
        )
        .await
        .expect("the reason is given")
        .unwrap()
        .clone();
        assert!(
            matches!(&reason, Leader::Unknown(r) if r.contains("http://127.0.0.1:9 refused")),
            "{reason:?}"
        );
    }
}

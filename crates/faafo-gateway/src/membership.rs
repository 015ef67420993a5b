//! The gateway in the deployment's membership: it announces itself through its backends
//! (so clients discover it in `/v1/endpoints`), and it follows the API instances the
//! membership lists, so instances added or removed need no gateway restart.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use faafo_core::node::{Endpoints, HEARTBEAT_INTERVAL, VERSION};
use faafo_core::{NodeBeat, NodeRole};

use crate::proxy::Gateway;

/// Heartbeats this gateway into the membership until shutdown, then says goodbye.
pub(crate) async fn announce(gateway: Arc<Gateway>, address: String, token: String) {
    loop {
        let beat = NodeBeat {
            id: address.clone(),
            role: NodeRole::Gateway,
            address: Some(address.clone()),
            version: VERSION.to_owned(),
            load: gateway.metrics.requests.get(),
        };
        // Until a beat gets through (no backend is up yet at start), try again soon.
        let pause = match member_call(&gateway, "/v1/nodes/heartbeat", &beat, &token).await {
            Ok(()) => HEARTBEAT_INTERVAL,
            Err(error) => {
                tracing::debug!(%error, "heartbeat not recorded");
                HEARTBEAT_INTERVAL / 8
            }
        };
        tokio::select! {
            _ = gateway.shutdown.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
    }
    let goodbye = serde_json::json!({ "id": address });
    if let Err(error) = member_call(&gateway, "/v1/nodes/leave", &goodbye, &token).await {
        tracing::debug!(%error, "goodbye not recorded");
    }
}

/// Sends one membership call to an up backend.
async fn member_call(
    gateway: &Gateway,
    path: &str,
    body: &impl serde::Serialize,
    token: &str,
) -> Result<(), String> {
    let backend = gateway.pick(&[]).ok_or("no backend is up")?;
    let response = gateway
        .http
        .post(format!("{}{path}", backend.url))
        .bearer_auth(token)
        .json(body)
        .timeout(gateway.config.check_timeout)
        .send()
        .await
        .map_err(|e| format!("{}: {e}", backend.url))?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("{} answered {}", backend.url, response.status()))
    }
}

/// Makes the backend list follow the API instances the membership lists as up, asking
/// an up backend every `interval`. An empty or failed answer changes nothing, so a
/// membership that cannot be read never empties the gateway.
pub(crate) async fn follow(gateway: Arc<Gateway>, interval: Duration) {
    loop {
        tokio::select! {
            _ = gateway.shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let Some(backend) = gateway.pick(&[]) else {
            continue;
        };
        let answer = gateway
            .http
            .get(format!("{}/v1/endpoints", backend.url))
            .timeout(gateway.config.check_timeout)
            .send()
            .await;
        let listed = match answer {
            Ok(response) if response.status().is_success() => response.json::<Endpoints>().await,
            Ok(response) => {
                tracing::debug!(backend = %backend.url, status = %response.status(), "no endpoint list");
                continue;
            }
            Err(error) => Err(error),
        };
        match listed {
            Ok(endpoints) if !endpoints.apis.is_empty() => reconcile(&gateway, &endpoints.apis),
            Ok(_) => {}
            Err(error) => tracing::debug!(backend = %backend.url, %error, "no endpoint list"),
        }
    }
}

fn reconcile(gateway: &Arc<Gateway>, apis: &[String]) {
    let listed: BTreeSet<String> = apis
        .iter()
        .map(|url| url.trim_end_matches('/').to_owned())
        .collect();
    for backend in gateway.backends() {
        if !listed.contains(&backend.url) && gateway.remove_backend(&backend.url) {
            tracing::info!(backend = %backend.url, "backend left the membership; removed");
        }
    }
    for url in &listed {
        if let Err(error) = gateway.add_backend(url) {
            tracing::warn!(%error, "the membership lists an unusable API address");
        }
    }
}

//! Membership: this instance's own heartbeat, and the routes through which gateways and
//! workers announce themselves and clients discover endpoints.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use faafo_core::node::{
    ClusterStatus, DOWN_AFTER, Endpoints, HEARTBEAT_INTERVAL, Liveness, NodeView, QueueView,
    VERSION,
};
use faafo_core::wire::ErrorBody;
use faafo_core::{FractalState, NodeBeat, NodeRole};
use faafo_store::NodeRecord;
use serde::Deserialize;

use crate::routes::authorize_member;
use crate::{ApiError, AppState, json};

/// Heartbeats this instance into the membership until shutdown, then says goodbye at
/// once, so that discovery stops handing out its address while it drains.
pub async fn announce(state: Arc<AppState>, address: String) {
    loop {
        let beat = NodeBeat {
            id: address.clone(),
            role: NodeRole::Api,
            address: Some(address.clone()),
            version: VERSION.to_owned(),
            load: state.metrics.served(),
        };
        if let Err(error) = state.store.node_heartbeat(&beat).await {
            tracing::warn!(%error, "cannot record this instance's heartbeat");
        }
        tokio::select! {
            _ = state.shutdown.cancelled() => break,
            _ = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
        }
    }
    if let Err(error) = state.store.node_left(&address).await {
        tracing::warn!(%error, "cannot record this instance's goodbye");
    }
}

/// `POST /v1/nodes/heartbeat`: a gateway or worker is alive.
#[utoipa::path(post, path = "/v1/nodes/heartbeat", tag = "membership",
    summary = "A node says it is alive",
    request_body = NodeBeat,
    security(("worker_token" = [])),
    responses(
        (status = 204, description = "Recorded"),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 401, description = "Missing or wrong worker token", body = ErrorBody),
        (status = 422, description = "A wrong field", body = ErrorBody),
        (status = 503, description = "The store is unavailable; retry", body = ErrorBody),
    ))]
pub async fn heartbeat(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    authorize_member(&state, &headers)?;
    let beat: NodeBeat = json::read_json(body).await?;
    beat.validate().map_err(|message| ApiError::Invalid {
        message,
        field: None,
    })?;
    if beat.role == NodeRole::Api {
        return Err(ApiError::invalid(
            "role",
            "API instances record their own heartbeats; use role gateway or worker",
        ));
    }
    state.store.node_heartbeat(&beat).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Leave {
    id: String,
}

/// `POST /v1/nodes/leave`: a gateway or worker is shutting down cleanly.
#[utoipa::path(post, path = "/v1/nodes/leave", tag = "membership",
    summary = "A node says it is leaving",
    request_body = Leave,
    security(("worker_token" = [])),
    responses(
        (status = 204, description = "Recorded"),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 401, description = "Missing or wrong worker token", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 422, description = "A wrong field", body = ErrorBody),
        (status = 503, description = "The store is unavailable; retry", body = ErrorBody),
    ))]
pub async fn leave(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    authorize_member(&state, &headers)?;
    let leave: Leave = json::read_json(body).await?;
    if state.store.node_left(&leave.id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("no node {:?}", leave.id)))
    }
}

fn liveness(node: &NodeRecord) -> Liveness {
    if node.left {
        Liveness::Left
    } else if node.since_heard > DOWN_AFTER {
        Liveness::Down
    } else {
        Liveness::Up
    }
}

/// `GET /v1/nodes`: every node the store remembers, and the queue.
#[utoipa::path(get, path = "/v1/nodes", tag = "membership",
    summary = "Every node and the queue",
    responses(
        (status = 200, body = ClusterStatus),
        (status = 503, description = "The store is unavailable; retry", body = ErrorBody),
    ))]
pub async fn status(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    Ok(Json(cluster_status(&state).await?).into_response())
}

/// Every node, the queue and the database's members, as `/v1/nodes` and `/status` show them.
pub(crate) async fn cluster_status(state: &AppState) -> Result<ClusterStatus, ApiError> {
    let (nodes, stats, database) = tokio::join!(
        state.store.nodes(),
        state.store.stats(),
        state.store.database_members()
    );
    let (nodes, stats) = (nodes?, stats?);
    let mut nodes: Vec<NodeView> = nodes
        .iter()
        .map(|node| NodeView {
            id: node.beat.id.clone(),
            role: node.beat.role,
            address: node.beat.address.clone(),
            version: node.beat.version.clone(),
            load: node.beat.load,
            state: liveness(node),
            last_seen_s: node.since_heard.as_secs_f64(),
        })
        .collect();
    nodes.sort_by(|a, b| (a.role, &a.id).cmp(&(b.role, &b.id)));
    let queue = QueueView {
        queued: stats.count(FractalState::Queued),
        running: stats.count(FractalState::Running),
        done: stats.count(FractalState::Done),
        failed: stats.count(FractalState::Failed),
        oldest_queued_age_s: stats.oldest_queued_age.map(|age| age.as_secs_f64()),
    };
    Ok(ClusterStatus {
        nodes,
        queue,
        database,
    })
}

/// `GET /v1/endpoints`: the addresses of live gateways and API instances.
#[utoipa::path(get, path = "/v1/endpoints", tag = "membership",
    summary = "Where clients may send requests: the live gateways and API instances",
    responses(
        (status = 200, body = Endpoints),
        (status = 503, description = "The store is unavailable; retry", body = ErrorBody),
    ))]
pub async fn endpoints(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let mut endpoints = Endpoints::default();
    for node in state.store.nodes().await? {
        let (Liveness::Up, Some(address)) = (liveness(&node), node.beat.address) else {
            continue;
        };
        match node.beat.role {
            NodeRole::Gateway => endpoints.gateways.push(address),
            NodeRole::Api => endpoints.apis.push(address),
            NodeRole::Worker => {}
        }
    }
    Ok(Json(endpoints).into_response())
}

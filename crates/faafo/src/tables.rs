//! The CLI's tables, in the shape the original faafo printed (prettytable): pure
//! functions of the API's answers, so they can be snapshot-tested.

use faafo_core::node::{ClusterStatus, Liveness};
use faafo_core::wire::FractalView;
use faafo_core::{FractalState, NodeRole};

/// A bordered, left-aligned text table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let rule: String = widths
        .iter()
        .map(|w| format!("+{}", "-".repeat(w + 2)))
        .collect::<String>()
        + "+\n";
    let line = |cells: &mut dyn Iterator<Item = &str>| -> String {
        widths
            .iter()
            .zip(cells)
            .map(|(w, cell)| format!("| {cell:<w$} "))
            .collect::<String>()
            + "|\n"
    };
    let mut out = rule.clone();
    out += &line(&mut headers.iter().copied());
    out += &rule;
    for row in rows {
        out += &line(&mut row.iter().map(String::as_str));
    }
    out += &rule;
    out
}

/// `faafo list`: the seed's `UUID | Dimensions | Filesize`, with a `State` column when
/// some fractal is not done yet.
pub fn fractal_list(fractals: &[FractalView]) -> String {
    let with_state = fractals.iter().any(|f| f.state != FractalState::Done);
    let mut headers = vec!["UUID", "Dimensions", "Filesize"];
    if with_state {
        headers.push("State");
    }
    let rows: Vec<Vec<String>> = fractals
        .iter()
        .map(|f| {
            let mut row = vec![
                f.uuid.to_string(),
                dimensions(f),
                f.size.map_or_else(|| "-".to_owned(), bytes),
            ];
            if with_state {
                row.push(f.state.to_string());
            }
            row
        })
        .collect();
    table(&headers, &rows)
}

/// `faafo show`: the seed's `Parameter | Value` table, then faafo's own fields.
pub fn fractal_details(f: &FractalView) -> String {
    let or_dash = |value: Option<String>| value.unwrap_or_else(|| "-".to_owned());
    let mut rows = vec![
        ("uuid", f.uuid.to_string()),
        (
            "duration",
            or_dash(f.duration.map(|d| format!("{d:.6} seconds"))),
        ),
        ("dimensions", dimensions(f)),
        ("iterations", f.iterations.to_string()),
        ("xa", number(f.xa)),
        ("xb", number(f.xb)),
        ("ya", number(f.ya)),
        ("yb", number(f.yb)),
        ("size", or_dash(f.size.map(bytes))),
        ("checksum", or_dash(f.checksum.clone())),
        ("generated_by", or_dash(f.generated_by.clone())),
        ("cx", number(f.cx)),
        ("cy", number(f.cy)),
        ("state", f.state.to_string()),
        ("attempts", f.attempts.to_string()),
    ];
    if let Some(error) = &f.error {
        rows.push(("error", error.clone()));
    }
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|(k, v)| vec![k.to_owned(), v])
        .collect();
    table(&["Parameter", "Value"], &rows)
}

/// `faafo status`: the queue on one line, then one row per node, like `nodetool status`.
pub fn cluster_status(status: &ClusterStatus) -> String {
    let queue = &status.queue;
    let oldest = queue
        .oldest_queued_age_s
        .map_or_else(String::new, |age| format!("; oldest queued {age:.1} s"));
    let mut out = format!(
        "Queue: {} queued, {} running, {} done, {} failed{oldest}\n",
        queue.queued, queue.running, queue.done, queue.failed
    );
    let rows: Vec<Vec<String>> = status
        .nodes
        .iter()
        .map(|node| {
            let state = match node.state {
                Liveness::Up => "UP",
                Liveness::Down => "DOWN",
                Liveness::Left => "LEFT",
            };
            let load = match node.role {
                NodeRole::Worker => format!("{} tasks", node.load),
                NodeRole::Gateway | NodeRole::Api => format!("{} requests", node.load),
            };
            vec![
                state.to_owned(),
                node.role.to_string(),
                node.address.clone().unwrap_or_else(|| node.id.clone()),
                load,
                node.version.clone(),
                format!("{:.1} s ago", node.last_seen_s),
            ]
        })
        .collect();
    out += &table(
        &["State", "Role", "Node", "Load", "Version", "Last seen"],
        &rows,
    );
    if !status.database.is_empty() {
        let rows: Vec<Vec<String>> = status
            .database
            .iter()
            .map(|member| {
                vec![
                    member.state.to_uppercase(),
                    member.role.clone(),
                    member.name.clone(),
                    member.address.clone().unwrap_or_else(|| "-".into()),
                    member
                        .lag_bytes
                        .map_or_else(|| "-".into(), |lag| format!("{lag} B")),
                ]
            })
            .collect();
        out += "Database (Patroni):\n";
        out += &table(&["State", "Role", "Member", "Address", "Lag"], &rows);
    }
    out
}

fn dimensions(f: &FractalView) -> String {
    format!("{} x {} pixels", f.width, f.height)
}

fn bytes(size: u64) -> String {
    format!("{size} bytes")
}

/// Floats as Python prints them: the shortest text that reads back the same, with `.0` on
/// whole numbers.
fn number(value: f64) -> String {
    format!("{value:?}")
}

/// `faafo cluster status`: every member of the supervised topology.
pub fn cluster_members(members: &[faafo_cluster::MemberStatus]) -> String {
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                m.state.clone(),
                m.pid.map_or_else(|| "-".into(), |pid| pid.to_string()),
                m.uptime_s
                    .map_or_else(|| "-".into(), |s| format!("{s:.0} s")),
                m.restarts.to_string(),
                m.url.clone().unwrap_or_else(|| "-".into()),
                m.health.clone(),
                // The first line: a long error is in the member's log.
                m.last_exit
                    .as_deref()
                    .and_then(|e| e.lines().next())
                    .unwrap_or("-")
                    .to_owned(),
            ]
        })
        .collect();
    table(
        &[
            "Name",
            "State",
            "PID",
            "Uptime",
            "Restarts",
            "Address",
            "Health",
            "Last exit",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use faafo_core::wire::FractalView;
    use uuid::Uuid;

    use super::*;

    fn done(uuid: &str, width: u32, height: u32, size: u64) -> FractalView {
        FractalView {
            uuid: Uuid::parse_str(uuid).unwrap(),
            width,
            height,
            iterations: 168,
            xa: -2.61217,
            xb: 3.98459,
            ya: -1.89725,
            yb: 2.36849,
            checksum: Some(
                "d2025a9cf60faca1aada854d4cac900041c6fa762460f86ab39f42ccfe305ffe".into(),
            ),
            size: Some(size),
            duration: Some(1.67141),
            generated_by: Some("app-worker-2".into()),
            url: Some(format!("/fractal/{uuid}")),
            cx: -0.8,
            cy: 0.156,
            state: FractalState::Done,
            attempts: 1,
            created_at: "2026-11-23T16:40:39.562Z".into(),
            finished_at: Some("2026-11-23T16:40:41.233Z".into()),
            error: None,
        }
    }

    fn queued(uuid: &str) -> FractalView {
        FractalView {
            checksum: None,
            size: None,
            duration: None,
            generated_by: None,
            url: None,
            state: FractalState::Queued,
            attempts: 0,
            finished_at: None,
            ..done(uuid, 9999, 9999, 0)
        }
    }

    fn seed_list() -> Vec<FractalView> {
        vec![
            done("410bca6e-baa7-4d82-9ec0-78e409db7ade", 295, 738, 26283),
            done("66054419-f721-492f-8964-a5c9291d0524", 904, 860, 78666),
            done("d123e9c1-3934-4ffd-8b09-0032ca2b6564", 952, 382, 34239),
            done("f51af10a-084d-4314-876a-6d0b9ea9e735", 877, 708, 93679),
        ]
    }

    #[test]
    fn list_of_done_fractals_is_the_seed_table() {
        insta::assert_snapshot!(fractal_list(&seed_list()));
    }

    #[test]
    fn list_with_pending_fractals_has_a_state_column() {
        let mut fractals = seed_list();
        fractals.push(queued("0b7a4a7e-3f0c-4f43-9d0e-6a1f8b2a9c11"));
        insta::assert_snapshot!(fractal_list(&fractals));
    }

    #[test]
    fn empty_list() {
        insta::assert_snapshot!(fractal_list(&[]));
    }

    #[test]
    fn show_is_the_seed_table_plus_state() {
        insta::assert_snapshot!(fractal_details(&done(
            "d123e9c1-3934-4ffd-8b09-0032ca2b6564",
            952,
            382,
            34239
        )));
    }

    #[test]
    fn show_of_a_failed_fractal_has_the_error() {
        let failed = FractalView {
            state: FractalState::Failed,
            attempts: 5,
            error: Some(
                "gave up after 5 attempts: the lease of worker w1 expired without a result".into(),
            ),
            ..queued("0b7a4a7e-3f0c-4f43-9d0e-6a1f8b2a9c11")
        };
        insta::assert_snapshot!(fractal_details(&failed));
    }

    #[test]
    fn status_lists_the_queue_and_every_node() {
        use faafo_core::node::{NodeView, QueueView};
        let node = |role, address: Option<&str>, id: &str, state, load, last_seen_s| NodeView {
            id: id.into(),
            role,
            address: address.map(str::to_owned),
            version: "0.1.0".into(),
            load,
            state,
            last_seen_s,
        };
        let status = ClusterStatus {
            nodes: vec![
                node(
                    NodeRole::Api,
                    Some("http://127.0.0.1:9210"),
                    "http://127.0.0.1:9210",
                    Liveness::Up,
                    1520,
                    0.4,
                ),
                node(
                    NodeRole::Api,
                    Some("http://127.0.0.1:9211"),
                    "http://127.0.0.1:9211",
                    Liveness::Down,
                    733,
                    9.25,
                ),
                node(
                    NodeRole::Gateway,
                    Some("http://127.0.0.1:9100"),
                    "http://127.0.0.1:9100",
                    Liveness::Up,
                    2210,
                    1.0,
                ),
                node(NodeRole::Worker, None, "worker-1", Liveness::Left, 17, 31.0),
            ],
            queue: QueueView {
                queued: 3,
                running: 1,
                done: 40,
                failed: 0,
                oldest_queued_age_s: Some(1.25),
            },
            database: vec![
                faafo_core::node::DatabaseMemberView {
                    name: "postgres-1".into(),
                    role: "leader".into(),
                    state: "running".into(),
                    address: Some("127.0.0.1:9330".into()),
                    lag_bytes: None,
                },
                faafo_core::node::DatabaseMemberView {
                    name: "postgres-2".into(),
                    role: "sync_standby".into(),
                    state: "streaming".into(),
                    address: Some("127.0.0.1:9331".into()),
                    lag_bytes: Some(0),
                },
            ],
        };
        insta::assert_snapshot!(cluster_status(&status));
    }

    #[test]
    fn json_output_is_the_api_shape() {
        insta::assert_snapshot!(serde_json::to_string_pretty(&seed_list()[..1]).unwrap());
    }
}

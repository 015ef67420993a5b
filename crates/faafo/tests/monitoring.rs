//! `deploy/monitoring` speaks of metrics faafo serves: every `faafo_*` name its alerting
//! rules and its dashboard use is served by a live API, gateway or probe. (The rules'
//! logic is tested by `promtool test rules` in .ci/run.)

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;

/// Every metric name (samples' names, `_bucket` and the like included) on a page.
fn served_names(page: &str) -> impl Iterator<Item = String> + '_ {
    page.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| line.split(['{', ' ']).next().unwrap_or_default().to_owned())
}

/// Every `faafo_...` word in a file.
fn named_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("faafo_") {
        let word: String = rest[start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[start + word.len()..];
        names.insert(word);
    }
    names
}

#[tokio::test]
async fn the_rules_and_the_dashboard_use_only_metrics_faafo_serves() {
    let dir = tempfile::tempdir().unwrap();
    let up = spawn_up(dir.path(), "up", 1);
    let gateway = Process::spawn_server(
        dir.path(),
        "gateway",
        &["gateway", "--bind", "127.0.0.1:0", "--backend", up.url()],
    );
    let probe = Process::spawn_server(
        dir.path(),
        "probe",
        &[
            "--endpoint-url",
            gateway.url(),
            "probe",
            "--interval",
            "0.2",
            "--bind",
            "127.0.0.1:0",
        ],
    );
    let scrape = |url: String| async move {
        reqwest::get(format!("{url}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()
    };
    // Once a probe has gone through the gateway, every series has a sample.
    let probe_page = wait_for("a successful probe", Duration::from_secs(30), || async {
        let page = scrape(probe.url().to_owned()).await?;
        (sample(&page, "faafo_probe_success") == Some(1.0)).then_some(page)
    })
    .await;
    let mut served: BTreeSet<String> = served_names(&probe_page).collect();
    for url in [up.url(), gateway.url()] {
        let page = scrape(url.to_owned()).await.expect("a metrics page");
        served.extend(served_names(&page));
    }

    let monitoring = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/monitoring");
    let mut checked = 0;
    for file in ["faafo-alerts.yml", "faafo-dashboard.json"] {
        let text = std::fs::read_to_string(format!("{monitoring}/{file}")).unwrap();
        if file.ends_with(".json") {
            let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
            let panels = dashboard["panels"].as_array().expect("a Grafana dashboard");
            assert!(
                panels
                    .iter()
                    .all(|panel| panel["targets"][0]["expr"].is_string()),
                "every panel has a query"
            );
        }
        let used = named_in(&text);
        assert!(used.len() >= 5, "{file} names only {used:?}");
        let unknown: Vec<_> = used.difference(&served).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics faafo does not serve: {unknown:?}\nserved: {served:?}"
        );
        checked += used.len();
    }
    println!("{checked} metric names in the rules and the dashboard, all served");
}

//! The members' configuration (`cluster up --config FILE`): one TOML file with a table
//! per role (`[api]`, `[gateway]`, `[worker]`), each holding what that role's own
//! `--config` file would. The supervisor writes each table to a file of its own, which
//! the members are started with; `cluster reload` (or SIGHUP to the supervisor) checks
//! the file again and, when every table is valid, rewrites them and has the members
//! re-read theirs.

use std::path::Path;

use anyhow::{Context, bail};

use crate::members::Kind;

/// The roles a cluster configuration file sets up, with their table names: those whose
/// processes reload on SIGHUP.
pub const ROLES: [(Kind, &str); 3] = [
    (Kind::Api, "api"),
    (Kind::Gateway, "gateway"),
    (Kind::Worker, "worker"),
];

/// The table name of `kind`, when a configuration file sets it up.
pub fn table_of(kind: Kind) -> Option<&'static str> {
    ROLES
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, name)| *name)
}

/// The file of each role in [`ROLES`] order: its table of `source` as TOML (empty when
/// the file has no such table).
pub fn split(source: &Path) -> anyhow::Result<Vec<(Kind, String)>> {
    let text =
        std::fs::read_to_string(source).with_context(|| format!("reading {}", source.display()))?;
    split_text(&text).with_context(|| format!("in {}", source.display()))
}

fn split_text(text: &str) -> anyhow::Result<Vec<(Kind, String)>> {
    let table: toml::Table = text.parse().context("not valid TOML")?;
    let mut roles: Vec<(Kind, String)> = ROLES.iter().map(|(k, _)| (*k, String::new())).collect();
    for (key, value) in table {
        let Some(slot) = roles
            .iter_mut()
            .find(|(kind, _)| table_of(*kind) == Some(&key))
        else {
            bail!(
                "{key:?} is not a table of this file: it holds [api], [gateway] and [worker] \
                 tables (the cluster's own settings are flags of `faafo cluster up`)"
            );
        };
        let toml::Value::Table(settings) = value else {
            bail!("{key} must be a table: [{key}] followed by its settings");
        };
        slot.1 = toml::to_string(&settings).context("writing the table back")?;
    }
    Ok(roles)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_gets_its_table() {
        let roles = split_text(
            "[api]\nmax-width = 2000\nlog-level = \"debug\"\n[worker]\nlog-level = \"warn\"\n",
        )
        .unwrap();
        assert_eq!(roles.len(), 3);
        assert_eq!(roles[0].0, Kind::Api);
        let api: toml::Table = roles[0].1.parse().unwrap();
        assert_eq!(api["max-width"].as_integer(), Some(2000));
        assert_eq!(roles[1], (Kind::Gateway, String::new()));
        assert!(roles[2].1.contains("warn"));
    }

    #[test]
    fn anything_but_role_tables_is_refused() {
        let error = split_text("max-width = 2000\n").unwrap_err();
        assert!(
            format!("{error:#}").contains("[api], [gateway] and [worker]"),
            "{error:#}"
        );
        let error = split_text("api = 3\n").unwrap_err();
        assert!(
            format!("{error:#}").contains("must be a table"),
            "{error:#}"
        );
        let error = split_text("[api\n").unwrap_err();
        assert!(format!("{error:#}").contains("not valid TOML"), "{error:#}");
    }
}

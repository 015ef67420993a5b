//! `--config FILE` and `--print-config` for the long-running roles.
//!
//! A configuration file is TOML whose keys are the role's long flag names
//! (`max-width = 2000`, `backend = ["http://a:8080", "http://b:8080"]`). It sits under
//! flags and `FAAFO_*` variables: a setting the command line or the environment gives is
//! left alone. The file's values are handed to clap as if they were flags, so they are
//! checked by the same parsers and bounds, and a mistake names the file and the key.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::Path;

use anyhow::{Context, anyhow, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, Command, CommandFactory, FromArgMatches};

use crate::cli::{CLIENT_FLAGS, Cli};

/// The subcommands that take `--config`.
pub const ROLES: [&str; 5] = ["api", "gateway", "worker", "up", "probe"];

/// Parses the command line, with the role's configuration file under it; with
/// `--print-config`, prints the effective configuration and exits.
pub fn parse() -> Cli {
    let argv: Vec<OsString> = std::env::args_os().collect();
    match parse_from(argv) {
        Ok(Parsed::Run(cli)) => *cli,
        Ok(Parsed::Printed) => std::process::exit(0),
        Err(Failure::Clap(error)) => error.exit(),
        Err(Failure::Config(error)) => {
            eprintln!("faafo: {error:#}");
            std::process::exit(2);
        }
    }
}

pub enum Parsed {
    Run(Box<Cli>),
    /// `--print-config` printed the configuration.
    Printed,
}

pub enum Failure {
    /// Wrong flags: clap prints its message (and `--help` its help).
    Clap(clap::Error),
    /// The configuration file cannot be used.
    Config(anyhow::Error),
}

pub fn parse_from(argv: Vec<OsString>) -> Result<Parsed, Failure> {
    let command = Cli::command();
    // A first look, to find the role and its file: what is missing may be in the file.
    // (Help and version are clap's to show, from the strict definition.)
    let asks_help = argv
        .iter()
        .any(|arg| matches!(arg.to_str(), Some("-h" | "--help" | "-V" | "--version")));
    let mut lenient = command.clone();
    if !asks_help {
        for role in ROLES {
            lenient = lenient.mut_subcommand(role, |sub| sub.mut_args(|arg| arg.required(false)));
        }
    }
    let matches = lenient.try_get_matches_from(&argv).map_err(Failure::Clap)?;
    let Some((role, role_matches)) = matches
        .subcommand()
        .filter(|(name, _)| ROLES.contains(name))
    else {
        let matches = command.try_get_matches_from(&argv).map_err(Failure::Clap)?;
        return cli(&matches).map(|cli| Parsed::Run(Box::new(cli)));
    };
    let mut from_file = BTreeSet::new();
    let mut argv = argv;
    if let Some(path) = role_matches.get_one::<std::path::PathBuf>("config") {
        let role_command = command
            .find_subcommand(role)
            .expect("the role is a subcommand");
        let flags = flags_from_file(
            path,
            role,
            role_command,
            &command,
            role_matches,
            &mut from_file,
        )
        .map_err(Failure::Config)?;
        // After the subcommand's name, where its flags (and the global ones) are read.
        let at = argv
            .iter()
            .position(|arg| arg.to_str() == Some(role))
            .expect("the role is on the command line")
            + 1;
        argv.splice(at..at, flags);
    }
    let matches = command
        .clone()
        .try_get_matches_from(&argv)
        .map_err(|error| {
            // The file's values went through clap's own checks: say where they came from.
            if from_file.is_empty() {
                Failure::Clap(error)
            } else {
                let file = role_matches
                    .get_one::<std::path::PathBuf>("config")
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                let rendered = error.render().to_string();
                let what: Vec<&str> = rendered
                    .trim()
                    .trim_start_matches("error: ")
                    .lines()
                    .filter(|line| !line.starts_with("For more information"))
                    .collect();
                Failure::Config(anyhow!(
                    "with the settings of {file}: {}",
                    what.join("\n").trim()
                ))
            }
        })?;
    let (_, role_matches) = matches.subcommand().expect("a role");
    if role_matches.get_flag("print_config") {
        let role_command = command.find_subcommand(role).expect("a role");
        print!(
            "{}",
            effective(role_command, &command, role_matches, &from_file)
        );
        return Ok(Parsed::Printed);
    }
    cli(&matches).map(|cli| Parsed::Run(Box::new(cli)))
}

fn cli(matches: &ArgMatches) -> Result<Cli, Failure> {
    Cli::from_arg_matches(matches).map_err(Failure::Clap)
}

/// The flags a configuration file adds: those of its settings that neither the command
/// line nor the environment gives.
fn flags_from_file(
    path: &Path,
    role: &str,
    role_command: &Command,
    top: &Command,
    role_matches: &ArgMatches,
    from_file: &mut BTreeSet<String>,
) -> anyhow::Result<Vec<OsString>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the configuration file {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", path.display()))?;
    let mut flags = Vec::new();
    for (key, value) in table {
        let Some(arg) = settable(role_command, top, &key) else {
            bail!(
                "{}: `{key}` is not a setting of faafo {role} (the keys are its long flag names: {})",
                path.display(),
                setting_names(role_command, top).join(", ")
            );
        };
        let id = arg.get_id().as_str();
        let given = role_matches.try_contains_id(id).unwrap_or(false)
            && matches!(
                role_matches.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            );
        if given {
            continue;
        }
        let flag = format!("--{key}");
        let mut push = |value: String| flags.push(OsString::from(format!("{flag}={value}")));
        match value {
            toml::Value::Boolean(true) if !arg.get_action().takes_values() => {
                flags.push(OsString::from(&flag))
            }
            toml::Value::Boolean(false) if !arg.get_action().takes_values() => {}
            toml::Value::Array(items) => {
                for item in items {
                    push(scalar(path, &key, item)?);
                }
            }
            other => push(scalar(path, &key, other)?),
        }
        from_file.insert(key);
    }
    Ok(flags)
}

fn scalar(path: &Path, key: &str, value: toml::Value) -> anyhow::Result<String> {
    Ok(match value {
        toml::Value::String(text) => text,
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(x) => x.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => bail!(
            "{}: `{key}` must be a string, a number, a boolean or a list of them, not {}",
            path.display(),
            other.type_str()
        ),
    })
}

/// The flags of a role a file may set: its own and the global ones it uses, never
/// `--config` itself, `--print-config` or help.
fn settings<'a>(role: &'a Command, top: &'a Command) -> impl Iterator<Item = &'a clap::Arg> {
    let name = role.get_name();
    let globals = top.get_arguments().filter(move |arg| {
        arg.is_global_set()
            && CLIENT_FLAGS
                .iter()
                .find(|(flag, _)| arg.get_id() == *flag)
                .is_none_or(|(_, users)| users.contains(&name))
    });
    role.get_arguments().chain(globals).filter(|arg| {
        !matches!(
            arg.get_id().as_str(),
            "config" | "print_config" | "help" | "version"
        )
    })
}

/// The flag named `key` that a file may set.
fn settable<'a>(role: &'a Command, top: &'a Command, key: &str) -> Option<&'a clap::Arg> {
    settings(role, top).find(|arg| arg.get_long() == Some(key))
}

fn setting_names(role: &Command, top: &Command) -> Vec<String> {
    settings(role, top)
        .filter_map(|arg| arg.get_long().map(str::to_owned))
        .collect()
}

/// Secrets are named, never shown.
fn is_secret(arg: &clap::Arg) -> bool {
    arg.is_hide_env_values_set()
}

/// The effective configuration as TOML, each setting with where it came from.
fn effective(
    role: &Command,
    top: &Command,
    role_matches: &ArgMatches,
    from_file: &BTreeSet<String>,
) -> String {
    let mut out = String::from(
        "# The effective configuration: usable as a --config file. Secrets are hidden.\n",
    );
    // The role's matches hold the global flags it uses too.
    let args = settings(role, top).map(|arg| (arg, role_matches));
    for (arg, matches) in args {
        let id = arg.get_id().as_str();
        let Some(long) = arg.get_long() else { continue };
        let source = if from_file.contains(long) {
            "the configuration file"
        } else {
            match matches.value_source(id) {
                Some(ValueSource::CommandLine) => "the command line",
                Some(ValueSource::EnvVariable) => "the environment",
                Some(ValueSource::DefaultValue) => "the default",
                _ => "",
            }
        };
        let values: Vec<String> = matches
            .get_raw(id)
            .map(|raw| raw.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let line = if !arg.get_action().takes_values() {
            format!("{long} = {}", matches.get_flag(id))
        } else if values.is_empty() {
            format!("# {long} =")
        } else if is_secret(arg) {
            format!("{long} = \"(hidden)\"")
        } else if values.len() == 1
            && arg.get_num_args().is_none_or(|n| n.max_values() <= 1)
            && arg.get_value_delimiter().is_none()
        {
            format!("{long} = {}", toml_value(&values[0]))
        } else {
            let items: Vec<String> = values.iter().map(|v| toml_value(v)).collect();
            format!("{long} = [{}]", items.join(", "))
        };
        if source.is_empty() {
            out.push_str(&format!("{line:<60} # not set\n"));
        } else {
            out.push_str(&format!("{line:<60} # from {source}\n"));
        }
    }
    out
}

/// A number stays a number; anything else is a TOML string.
fn toml_value(text: &str) -> String {
    if text.parse::<f64>().is_ok_and(f64::is_finite) {
        text.to_owned()
    } else {
        toml::Value::String(text.to_owned()).to_string()
    }
}

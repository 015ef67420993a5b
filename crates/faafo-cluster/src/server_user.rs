//! PostgreSQL refuses to run as root, so when the supervisor is root, Patroni (and the
//! PostgreSQL it starts) run as the `postgres` user that Debian's packages create.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::Context;

/// The uid and gid of the `postgres` user.
fn postgres_user() -> anyhow::Result<(u32, u32)> {
    let name = std::ffi::CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam returns a pointer to static storage or null; read at once.
    let user = unsafe { libc::getpwnam(name.as_ptr()) };
    anyhow::ensure!(
        !user.is_null(),
        "running as root needs a `postgres` user to run PostgreSQL (apt-get install postgresql creates it)"
    );
    // SAFETY: checked non-null above.
    Ok(unsafe { ((*user).pw_uid, (*user).pw_gid) })
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// When we are root: makes `command` run as `postgres`, after [`hand_to_server_user`].
pub fn run_as_server_user(command: &mut tokio::process::Command, dir: &Path) -> anyhow::Result<()> {
    if let Some((uid, gid)) = hand_to_server_user(dir)? {
        command.uid(uid).gid(gid);
    }
    Ok(())
}

/// When we are root: gives `dir` and what is in it at the top level to the `postgres`
/// user, lets it through every directory above `dir` (search permission only: nothing
/// above can be listed or read by it that was not already), and returns its uid and gid
/// for the process that is to run as it. `None` when we are not root.
pub fn hand_to_server_user(dir: &Path) -> anyhow::Result<Option<(u32, u32)>> {
    if !running_as_root() {
        return Ok(None);
    }
    let (uid, gid) = postgres_user()?;
    let chown = |path: &Path| {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .with_context(|| format!("giving {} to the postgres user", path.display()))
    };
    chown(dir)?;
    for entry in std::fs::read_dir(dir)? {
        chown(&entry?.path())?;
    }
    for parent in dir.ancestors().skip(1) {
        let mode = std::fs::metadata(parent)?.permissions().mode();
        if mode & 0o001 == 0 {
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(mode | 0o011))
                .with_context(|| {
                    format!("letting the postgres user through {}", parent.display())
                })?;
        }
    }
    Ok(Some((uid, gid)))
}

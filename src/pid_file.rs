//! `server.pid_file`: the pid of the process that serves, written once it
//! holds the listeners (after a hand-over, the new process) and removed at
//! exit only by the process it names, so an old process leaving after an
//! upgrade never deletes its successor's file.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The path used with `--daemon` when `server.pid_file` is not set (Pingora
/// needs one to daemonise).
pub const DAEMON_DEFAULT: &str = "/tmp/tollgate.pid";

/// The pid file this process answers for: written here in the foreground
/// (with `--daemon` Pingora writes it after the fork). A file that cannot be
/// written stops the start, except after a hand-over, when the old process
/// has already given its sockets away.
pub fn claim(
    configured: Option<&str>,
    daemon: bool,
    upgrade: bool,
) -> anyhow::Result<Option<PathBuf>> {
    if daemon {
        return Ok(Some(PathBuf::from(configured.unwrap_or(DAEMON_DEFAULT))));
    }
    let Some(path) = configured.map(PathBuf::from) else {
        return Ok(None);
    };
    match write(&path, std::process::id()) {
        Ok(()) => {}
        Err(e) if !upgrade => {
            anyhow::bail!("server.pid_file: cannot write {}: {e}", path.display())
        }
        Err(e) => log::error!("server.pid_file: cannot write {}: {e}", path.display()),
    }
    Ok(Some(path))
}

/// Writes `pid` through a temporary file and a rename, so a reader (systemd,
/// a script) never sees the file empty or half written.
pub fn write(path: &Path, pid: u32) -> std::io::Result<()> {
    let tmp = sibling(path, ".tmp");
    let mut file = std::fs::File::create(&tmp)?;
    writeln!(file, "{pid}")?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Removes `path` (and Pingora's `<path>.old`, left by a daemon upgrade) if
/// it holds `pid`; a file naming another process is left alone.
pub fn remove_if_ours(path: &Path, pid: u32) {
    for file in [path.to_path_buf(), sibling(path, ".old")] {
        let ours = std::fs::read_to_string(&file)
            .is_ok_and(|text| text.trim().parse::<u32>().ok() == Some(pid));
        if ours {
            if let Err(e) = std::fs::remove_file(&file) {
                log::warn!("cannot remove the pid file {}: {e}", file.display());
            }
        }
    }
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_named_process_removes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.pid");
        write(&path, 41).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "41\n");
        remove_if_ours(&path, 40);
        assert!(path.exists());
        remove_if_ours(&path, 41);
        assert!(!path.exists());
        assert!(!sibling(&path, ".tmp").exists());
    }
}

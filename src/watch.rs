//! `server.watch_config`: a change of the config file, or of a certificate
//! or key it names, reloads the config exactly as `SIGHUP` does — this
//! service sends the process a `SIGHUP`, so there is one reload path.
//!
//! Kubernetes updates a mounted ConfigMap by writing a new timestamped
//! directory, pointing the `..data` symlink at it and deleting the old one;
//! the file itself is never written. So the directories are watched (the
//! file's own and its resolved target's), not the file, and what decides a
//! reload is whether the files as reached through their paths now are other
//! files or other contents (device, inode, size, modification time) than at
//! the last look. Events are debounced; a check every second backs them up
//! (a watch is lost when its directory is deleted).

use crate::config::Config;
use crate::state::SharedState;
use async_trait::async_trait;
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Quiet time after the last event before looking: one swap is several events.
const QUIET: Duration = Duration::from_millis(200);
/// A steady stream of events still gets a look this often.
const MAX_WAIT: Duration = Duration::from_secs(2);
/// The check that needs no event.
const POLL: Duration = Duration::from_secs(1);

pub struct ConfigWatcher {
    /// The config path as given on the command line (absolute, symlinks kept).
    pub path: PathBuf,
    pub state: SharedState,
}

/// What a file is now, as reached through its path (`None`: not there).
type Look = Vec<(PathBuf, Option<(u64, u64, u64, i64, i64)>)>;

fn look(files: &[PathBuf]) -> Look {
    files
        .iter()
        .map(|f| {
            let seen = std::fs::metadata(f)
                .ok()
                .map(|m| (m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec()));
            (f.clone(), seen)
        })
        .collect()
}

impl ConfigWatcher {
    /// The config file and every certificate and key file it names.
    fn files(&self, config: &Config) -> Vec<PathBuf> {
        let mut files = vec![self.path.clone()];
        for listener in &config.server.tls {
            for c in &listener.certificates {
                files.push(c.cert_file.clone());
                files.push(c.key_file.clone());
            }
        }
        files
    }
}

/// The directories whose entries lead to `files`: each path's own directory
/// and, for a symlink, its resolved target's.
fn directories(files: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let parent = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    for f in files {
        let mut candidates = vec![parent(f)];
        if let Ok(target) = f.canonicalize() {
            candidates.push(parent(&target));
        }
        for d in candidates {
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    dirs
}

struct Watch {
    watcher: RecommendedWatcher,
    dirs: Vec<PathBuf>,
}

impl Watch {
    fn new(events: mpsc::UnboundedSender<()>) -> notify::Result<Watch> {
        let watcher = notify::recommended_watcher(move |_event: notify::Result<notify::Event>| {
            let _ = events.send(());
        })?;
        Ok(Watch {
            watcher,
            dirs: Vec::new(),
        })
    }

    fn set(&mut self, dirs: Vec<PathBuf>) {
        for d in &self.dirs {
            if !dirs.contains(d) {
                // Gone with its directory already, often: nothing to undo.
                let _ = self.watcher.unwatch(d);
            }
        }
        for d in &dirs {
            if !self.dirs.contains(d) {
                if let Err(e) = self.watcher.watch(d, RecursiveMode::NonRecursive) {
                    log::debug!("cannot watch {}: {e}; checked every second", d.display());
                }
            }
        }
        self.dirs = dirs;
    }
}

/// Waits until events stop for [`QUIET`] (at most [`MAX_WAIT`]).
async fn settle(events: &mut mpsc::UnboundedReceiver<()>) {
    let start = Instant::now();
    while start.elapsed() < MAX_WAIT {
        match tokio::time::timeout(QUIET, events.recv()).await {
            Ok(Some(())) => continue,
            _ => return,
        }
    }
}

/// The reload itself is the SIGHUP handler's (`reload.rs`).
fn reload_as_on_sighup() {
    #[cfg(target_os = "linux")]
    if let Err(e) =
        nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGHUP)
    {
        log::error!("server.watch_config: cannot signal a reload: {e}");
    }
}

#[async_trait]
impl BackgroundService for ConfigWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (sender, mut events) = mpsc::unbounded_channel();
        let mut watch: Option<Watch> = None;
        let mut files: Vec<PathBuf> = Vec::new();
        let mut last: Look = Vec::new();
        loop {
            let state = self.state.load_full();
            if state.config.server.watch_config {
                let now = self.files(&state.config);
                if watch.is_none() || now != files {
                    // Just switched on, or a reload named other files: this
                    // is the state that was loaded, nothing to reload.
                    if watch.is_none() {
                        log::info!(
                            "watching {} for changes (server.watch_config)",
                            self.path.display()
                        );
                    }
                    last = look(&now);
                    files = now;
                }
                if watch.is_none() {
                    watch = Watch::new(sender.clone())
                        .map_err(|e| {
                            log::warn!(
                                "server.watch_config: no file events ({e}); checking every second"
                            )
                        })
                        .ok();
                }
                if let Some(w) = watch.as_mut() {
                    w.set(directories(&files));
                }
            } else if watch.take().is_some() {
                files.clear();
            }
            let event = tokio::select! {
                got = events.recv() => got.is_some(),
                _ = tokio::time::sleep(POLL) => false,
                _ = shutdown.changed() => return,
            };
            if files.is_empty() {
                continue;
            }
            if event {
                settle(&mut events).await;
            }
            let now = look(&files);
            if now != last {
                last = now;
                log::info!(
                    "{} or a certificate it names changed: reloading (server.watch_config)",
                    self.path.display()
                );
                reload_as_on_sighup();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_swap_is_a_change_and_its_target_directory_is_watched() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("..2026_a")).unwrap();
        std::fs::write(root.join("..2026_a/tollgate.yaml"), "a").unwrap();
        std::os::unix::fs::symlink("..2026_a", root.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/tollgate.yaml", root.join("tollgate.yaml")).unwrap();
        let files = vec![root.join("tollgate.yaml")];
        let before = look(&files);
        let dirs = directories(&files);
        assert_eq!(dirs[0], root);
        assert!(dirs[1].ends_with("..2026_a"), "{dirs:?}");

        std::fs::create_dir(root.join("..2026_b")).unwrap();
        std::fs::write(root.join("..2026_b/tollgate.yaml"), "a").unwrap();
        std::os::unix::fs::symlink("..2026_b", root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        std::fs::remove_dir_all(root.join("..2026_a")).unwrap();
        // Same contents, other file: a change.
        assert_ne!(look(&files), before);
        assert_eq!(look(&files), look(&files));
    }
}

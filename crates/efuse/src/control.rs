//! The control socket: a Unix socket per mount through which `efuse stats`
//! and `efuse top` read the daemon's counters.
//!
//! Protocol: the client sends one line (`stats`, `top` or `pid`), the daemon answers
//! with one JSON document or line and closes.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The directory holding control sockets and daemon logs.
pub fn runtime_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/efuse");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("efuse"),
        _ => PathBuf::from(format!("/tmp/efuse-{uid}")),
    }
}

/// FNV-1a: a stable short name for a mount point path.
fn path_key(mountpoint: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in mountpoint.as_os_str().as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Control socket of the mount at `mountpoint` (an absolute path, see
/// [`crate::mount::absolute_mountpoint`]).
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    runtime_dir().join(format!("{}.sock", path_key(mountpoint)))
}

/// Log file of the background daemon serving `mountpoint`.
pub fn log_path(mountpoint: &Path) -> PathBuf {
    runtime_dir().join(format!("{}.log", path_key(mountpoint)))
}

/// Creates the runtime directory (mode 0700).
pub fn ensure_runtime_dir() -> io::Result<PathBuf> {
    let dir = runtime_dir();
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(dir)
}

/// A running control socket; removes the socket file when dropped.
pub struct ControlServer {
    path: PathBuf,
}

impl ControlServer {
    /// Binds the socket and serves it on a thread of its own. `stats` is
    /// called for every `stats` request and returns the JSON to send.
    pub fn start<S>(mountpoint: &Path, stats: S) -> io::Result<ControlServer>
    where
        S: Fn() -> String + Send + 'static,
    {
        Self::start_with(mountpoint, stats, |_| None)
    }

    /// As [`ControlServer::start`], and `other` answers the commands besides
    /// `stats` and `pid` (None: unknown command), e.g. `top`.
    pub fn start_with<S, O>(mountpoint: &Path, stats: S, other: O) -> io::Result<ControlServer>
    where
        S: Fn() -> String + Send + 'static,
        O: Fn(&str) -> Option<String> + Send + 'static,
    {
        ensure_runtime_dir()?;
        let path = socket_path(mountpoint);
        // A socket left by a daemon that died: nobody answers on it.
        if path.exists() {
            if UnixStream::connect(&path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another daemon serves {} ({})", mountpoint.display(), path.display()),
                ));
            }
            let _ = std::fs::remove_file(&path);
        }
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        std::thread::Builder::new().name("efuse-control".into()).spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut line = String::new();
                if BufReader::new(&conn).take(256).read_line(&mut line).is_err() {
                    continue;
                }
                let answer = match line.trim() {
                    "stats" => stats(),
                    "pid" => std::process::id().to_string(),
                    cmd => other(cmd).unwrap_or_else(|| format!("{{\"error\": \"unknown command {cmd:?}\"}}")),
                };
                let _ = conn.write_all(answer.as_bytes());
            }
        })?;
        Ok(ControlServer { path })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends `command` to the daemon of `mountpoint` and returns its answer.
pub fn query(mountpoint: &Path, command: &str) -> io::Result<String> {
    let path = socket_path(mountpoint);
    let mut s = UnixStream::connect(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("no efuse daemon answers for {} ({e})", mountpoint.display())))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("{command}\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_distinct() {
        assert_eq!(path_key(Path::new("/mnt/a")), path_key(Path::new("/mnt/a")));
        assert_ne!(path_key(Path::new("/mnt/a")), path_key(Path::new("/mnt/b")));
        assert!(socket_path(Path::new("/x")).to_string_lossy().ends_with(".sock"));
    }
}

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

/// The directories that may hold this user's control sockets and daemon
/// logs, in the order a daemon picks them.
///
/// Root: `/run/efuse`. Anyone else: `$XDG_RUNTIME_DIR/efuse`, then
/// `/run/user/<uid>/efuse` (the same directory, for a shell that lacks the
/// variable: `su`, `runuser`, `setpriv`, cron), then `/tmp/efuse-<uid>`. A
/// base directory counts only when it is a real directory owned by this
/// user, as the XDG runtime directory must be. Clients look in all of them,
/// so a shell that sees a different environment than the one that mounted
/// still finds the daemon.
pub fn runtime_dirs() -> Vec<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return vec![PathBuf::from("/run/efuse")];
    }
    let owned_dir = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        p.is_absolute() && std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_dir() && m.uid() == uid)
    };
    let mut dirs = Vec::new();
    if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        if owned_dir(&xdg) {
            dirs.push(xdg.join("efuse"));
        }
    }
    let run_user = PathBuf::from(format!("/run/user/{uid}"));
    if owned_dir(&run_user) && !dirs.contains(&run_user.join("efuse")) {
        dirs.push(run_user.join("efuse"));
    }
    dirs.push(PathBuf::from(format!("/tmp/efuse-{uid}")));
    dirs
}

/// Where a daemon of another user `uid` may keep its sockets, as far as
/// root can tell without that user's environment.
fn runtime_dirs_of(uid: u32) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    [format!("/run/user/{uid}/efuse"), format!("/tmp/efuse-{uid}")]
        .into_iter()
        .map(PathBuf::from)
        .filter(|d| std::fs::symlink_metadata(d).is_ok_and(|m| m.file_type().is_dir() && m.uid() == uid))
        .collect()
}

/// The directory this process keeps its sockets and logs in (the first of
/// [`runtime_dirs`]); see [`ensure_runtime_dir`] to create it.
pub fn runtime_dir() -> PathBuf {
    runtime_dirs().swap_remove(0)
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
/// [`crate::mount::absolute_mountpoint`]), where this process would bind it.
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    runtime_dir().join(format!("{}.sock", path_key(mountpoint)))
}

/// Every place a daemon of this user may have bound the control socket of
/// `mountpoint` (see [`runtime_dirs`]). For root also the usual places of
/// the user the mount belongs to, so root reaches (and politely unmounts)
/// a regular user's live daemon instead of taking it for dead.
pub fn socket_paths(mountpoint: &Path) -> Vec<PathBuf> {
    let mut dirs = runtime_dirs();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        if let Some(owner) = crate::mount::find_mount(mountpoint).and_then(|m| m.user_id).filter(|u| *u != 0) {
            dirs.extend(runtime_dirs_of(owner));
        }
    }
    dirs.into_iter().map(|d| d.join(format!("{}.sock", path_key(mountpoint)))).collect()
}

/// Log file of the background daemon serving `mountpoint`.
pub fn log_path(mountpoint: &Path) -> PathBuf {
    runtime_dir().join(format!("{}.log", path_key(mountpoint)))
}

/// Creates the runtime directory (mode 0700) and makes sure it is private:
/// a real directory (not a symbolic link), owned by this user, with no
/// access for anyone else. `/tmp/efuse-<uid>` is a name any user could
/// have taken first; then this fails and says so, rather than putting the
/// control socket and log where someone else controls them.
pub fn ensure_runtime_dir() -> io::Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dir = runtime_dir();
    // Only the last component is ours to create: the base directory is
    // /run, the XDG runtime directory or /tmp, which must exist already.
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound && dir.starts_with("/run") => {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?
        }
        Err(e) => return Err(io::Error::new(e.kind(), format!("creating {}: {e}", dir.display()))),
    }
    let meta = std::fs::symlink_metadata(&dir)?;
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if !meta.file_type().is_dir() || meta.uid() != uid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a directory owned by uid {uid} (owner {}); remove it or set XDG_RUNTIME_DIR to a private directory",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    // Root's directory may be 0711: other users reach the bypass sockets
    // in it (by name; they cannot list it), never the 0600 control sockets.
    let mode = meta.mode() & 0o777;
    if mode != 0o700 && !(uid == 0 && mode == 0o711) {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    }
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

/// Connects to the control socket of `mountpoint`, wherever this user's
/// daemon bound it.
fn connect(mountpoint: &Path) -> io::Result<UnixStream> {
    let mut last = None;
    for path in socket_paths(mountpoint) {
        match UnixStream::connect(&path) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(format!("{}: {e}", path.display())),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no efuse daemon answers for {} ({})", mountpoint.display(), last.unwrap_or_default()),
    ))
}

/// Removes control sockets of `mountpoint` nobody answers on (a daemon that
/// died leaves its socket behind).
pub fn remove_stale_sockets(mountpoint: &Path) {
    for path in socket_paths(mountpoint) {
        if path.exists() && UnixStream::connect(&path).is_err() {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Sends `command` to the daemon of `mountpoint` and returns its answer.
pub fn query(mountpoint: &Path, command: &str) -> io::Result<String> {
    let mut s = connect(mountpoint)?;
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

    #[test]
    fn the_socket_is_looked_for_where_it_is_bound() {
        let mp = Path::new("/mnt/a");
        let all = socket_paths(mp);
        assert_eq!(all.first(), Some(&socket_path(mp)));
        // Whatever the environment, a regular user's list ends in the fixed
        // per-user fallback, so every shell of that user shares one place.
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        let last = runtime_dirs().pop().unwrap();
        if uid == 0 {
            assert_eq!(last, PathBuf::from("/run/efuse"));
        } else {
            assert_eq!(last, PathBuf::from(format!("/tmp/efuse-{uid}")));
        }
    }
}

//! The mounts this process can bypass: found at the first path call
//! (/proc/self/mountinfo: every FUSE mount whose daemon's bypass socket
//! exists, limited by EFUSE_BYPASS_MOUNTS), connected at first use. A mount
//! whose daemon cannot be reached is used through the kernel.

use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use efuse_bypass::client::Client;

use crate::log::{blog, Show};
use crate::mountinfo::{self, MountLine};

/// Connection states of a bypass mount.
const UNTRIED: u32 = 0;
const CONNECTED: u32 = 1;
const FAILED: u32 = 2;

/// A mount that has a bypass socket.
pub struct Bypass {
    pub socket: PathBuf,
    pub uid: u32,
    state: AtomicU32,
    /// Path calls on the mount so far while not connected (see
    /// `Config::after`).
    asked: AtomicU32,
    /// The connection; set once, then only replaced by a credential change
    /// (the old one is disowned and kept: calls in flight may still use it).
    client: AtomicPtr<Client>,
    connecting: Mutex<()>,
}

/// Every mount of the process (bypassed or not: a path under a mount nested
/// in an efuse mount belongs to the nested one).
pub struct Mounts {
    pub lines: Vec<MountLine>,
    pub bypass: Vec<Option<Bypass>>,
    /// The mounts a path under a bypass mount may be on: the bypass mounts
    /// and the mounts inside them (indices into `lines`). The longest of
    /// them that holds a path is the longest of all mounts for every path
    /// under a bypass mount; other paths are the kernel's either way.
    pub relevant: Vec<usize>,
    /// Their mount points, in the same order.
    pub relevant_points: Vec<Vec<u8>>,
}

static MOUNTS: OnceLock<Mounts> = OnceLock::new();

/// The mounts (discovered on first use).
pub fn get() -> &'static Mounts {
    MOUNTS.get_or_init(discover)
}

/// The bypass socket of a FUSE mount, if its daemon offers one in a runtime
/// directory owned by the daemon's uid.
fn socket_of(m: &MountLine) -> Result<(PathBuf, u32), &'static str> {
    let uid = m.user_id.ok_or("no user_id= in the mount options")?;
    let name = efuse_bypass::socket_name(&m.point);
    for dir in efuse_bypass::runtime_dirs_of(uid) {
        let Ok(meta) = std::fs::metadata(&dir) else { continue };
        use std::os::unix::fs::MetadataExt;
        if !meta.is_dir() || meta.uid() != uid {
            continue;
        }
        let sock = dir.join(&name);
        if std::fs::symlink_metadata(&sock).is_ok() {
            return Ok((sock, uid));
        }
    }
    Err("no bypass socket (the daemon does not offer the bypass)")
}

fn discover() -> Mounts {
    let text = std::fs::read("/proc/self/mountinfo").unwrap_or_default();
    let lines = mountinfo::parse(&text);
    let wanted = crate::config::get().mounts.as_ref();
    let mut bypass = Vec::with_capacity(lines.len());
    for m in &lines {
        let mut b = None;
        if m.is_fuse() && wanted.is_none_or(|w| w.contains(&m.point)) {
            match socket_of(m) {
                Ok((socket, uid)) => {
                    blog!("mount {}: bypass socket {}", Show(&m.point), Show(socket.as_os_str().as_bytes()));
                    b = Some(Bypass {
                        socket,
                        uid,
                        state: AtomicU32::new(UNTRIED),
                        asked: AtomicU32::new(0),
                        client: AtomicPtr::new(std::ptr::null_mut()),
                        connecting: Mutex::new(()),
                    });
                }
                Err(why) => blog!("mount {}: through the kernel: {why}", Show(&m.point)),
            }
        }
        bypass.push(b);
    }
    if let Some(w) = wanted {
        for p in w {
            if !lines.iter().any(|m| m.point == *p && m.is_fuse()) {
                blog!("EFUSE_BYPASS_MOUNTS names {}, which is not a FUSE mount", Show(p));
            }
        }
    }
    let points: Vec<&[u8]> = lines.iter().map(|m| &m.point[..]).collect();
    let flags: Vec<bool> = bypass.iter().map(|b| b.is_some()).collect();
    let relevant = relevant(&points, &flags);
    let relevant_points = relevant.iter().map(|&i| points[i].to_vec()).collect();
    Mounts { lines, bypass, relevant, relevant_points }
}

/// The indices of the mounts at `points` that are bypassed (`bypassed[i]`)
/// or lie inside a bypassed one (see `Mounts::relevant`).
fn relevant(points: &[&[u8]], bypassed: &[bool]) -> Vec<usize> {
    let roots: Vec<&[u8]> = points.iter().zip(bypassed).filter(|(_, b)| **b).map(|(p, _)| *p).collect();
    (0..points.len())
        .filter(|&i| roots.iter().any(|r| crate::paths::longest_prefix(&[r], points[i]).is_some()))
        .collect()
}

impl Mounts {
    /// Does any mount offer the bypass? (No: every call goes to the kernel.)
    pub fn any(&self) -> bool {
        self.bypass.iter().any(|b| b.is_some())
    }

    /// The connection of mount `i`, connecting on first use; None: use the
    /// kernel for this mount.
    pub fn client(&self, i: usize) -> Option<&Client> {
        let b = self.bypass.get(i)?.as_ref()?;
        match b.state.load(Ordering::Acquire) {
            CONNECTED => {
                let p = b.client.load(Ordering::Acquire);
                // SAFETY: a published client is never freed (see `Bypass::client`).
                return (!p.is_null()).then(|| unsafe { &*p });
            }
            FAILED => return None,
            _ => {}
        }
        if STOPPED.load(Ordering::Acquire) {
            return None;
        }
        // The first calls go through the kernel: a process that does little
        // on the mount never pays for a connection. (With the mounts named,
        // `early_call` counted them before the mount table was read.)
        let cfg = crate::config::get();
        let after = if cfg.mounts.is_some() { 0 } else { cfg.after };
        if after > 0 && b.asked.load(Ordering::Relaxed) < after && b.asked.fetch_add(1, Ordering::Relaxed) < after {
            return None;
        }
        let _l = b.connecting.lock().unwrap_or_else(|e| e.into_inner());
        if b.state.load(Ordering::Acquire) == UNTRIED {
            let dev = self.lines[i].dev;
            match Client::connect(&b.socket, b.uid, dev) {
                Ok(c) => {
                    blog!("mount {}: connected (max_io {})", Show(&self.lines[i].point), c.welcome().max_io);
                    crate::creds::take();
                    // A child forked from now on shares the connection: the
                    // fork handlers must run (they keep it from keeping handles).
                    crate::serve::ensure_atfork();
                    b.client.store(Box::into_raw(Box::new(c)), Ordering::Release);
                    b.state.store(CONNECTED, Ordering::Release);
                }
                Err(e) => {
                    blog!("mount {}: through the kernel: connecting failed: {e}", Show(&self.lines[i].point));
                    b.state.store(FAILED, Ordering::Release);
                }
            }
        }
        drop(_l);
        self.client(i)
    }

    /// st_dev of mount `i`.
    pub fn dev(&self, i: usize) -> u64 {
        self.lines[i].dev
    }

    /// After a credential change: this process gives up every connection
    /// (the daemon judged it by the old credentials) and connects again at
    /// next use, so the daemon learns the new ones. Only this process's
    /// access goes: a forked parent that shares a connection keeps it.
    pub fn disown_connections(&self) {
        for b in self.bypass.iter().flatten() {
            let _l = b.connecting.lock().unwrap_or_else(|e| e.into_inner());
            let p = b.client.swap(std::ptr::null_mut(), Ordering::AcqRel);
            if !p.is_null() {
                // SAFETY: p is a live leaked client; its memory stays (calls
                // in flight may still hold it), only its use ends.
                unsafe { (*p).disown() };
            }
            if b.state.load(Ordering::Acquire) == CONNECTED {
                b.state.store(UNTRIED, Ordering::Release);
            }
        }
    }
}

/// False once the process changed its root or mount namespace (chroot,
/// unshare, setns, mount, umount): the table read from mountinfo no longer
/// says which paths are on which mount, so path calls go to the kernel for
/// the rest of the process (a new program after exec reads its own table).
/// Descriptors already served stay served: they do not depend on paths.
static PATHS_VALID: AtomicBool = AtomicBool::new(true);

/// May path calls be classified with the mount table? One atomic load.
pub fn paths_valid() -> bool {
    PATHS_VALID.load(Ordering::Relaxed)
}

/// The process's view of paths changed (see [`paths_valid`]).
pub fn paths_changed() {
    PATHS_VALID.store(false, Ordering::Relaxed);
    // The directories of direct reads were given for the old root and
    // mount namespace (see `efuse_bypass::client::Client::drop_direct`).
    // (Not by a vfork child: the clients are its parent's.)
    if let Some(m) = discovered().filter(|_| crate::serve::owns_memory()) {
        for c in m.clients() {
            c.drop_direct();
        }
    }
}

/// Set when the daemon could no longer judge this process's requests as
/// the kernel does (a thread's own file-system ids or capabilities): no new
/// connection, and path calls go to the kernel, for the rest of the process.
static STOPPED: AtomicBool = AtomicBool::new(false);

/// Stops serving this process: path calls go to the kernel and no mount is
/// connected again (the caller converted the served descriptors and
/// disowns the connections).
pub fn stop_serving() {
    STOPPED.store(true, Ordering::Release);
    paths_changed();
}

/// Whether `fd` is one of the library's own descriptors: a connection to
/// a daemon, or a kept handle's (see `kept`).
pub fn is_library_fd(fd: i32) -> bool {
    discovered().is_some_and(|m| m.clients().any(|c| c.owns_fd(fd)))
        || crate::kept::owns_fd(fd)
        || crate::direct::owns_fd(fd)
}

/// The program wants number `fd` for itself (dup2, dup3): a socket of the
/// library there moves away first.
pub fn make_room(fd: i32) {
    if let Some(m) = discovered() {
        for c in m.clients().filter(|c| c.owns_fd(fd)) {
            c.relocate(fd);
        }
    }
    crate::kept::make_room(fd);
    crate::direct::make_room(fd);
}

/// The library's own descriptors in `first..=last`, sorted.
pub fn library_fds_in(first: u32, last: u32) -> Vec<u32> {
    let mut v: Vec<u32> =
        discovered().map(|m| m.clients().flat_map(|c| c.fds()).map(|fd| fd as u32).collect()).unwrap_or_default();
    v.extend(crate::kept::fds_in(first, last));
    v.extend(crate::direct::fds_in(first, last));
    v.retain(|fd| (first..=last).contains(fd));
    v.sort_unstable();
    v
}

impl Mounts {
    /// The connections made so far.
    fn clients(&self) -> impl Iterator<Item = &Client> {
        self.bypass.iter().flatten().filter_map(|b| {
            let p = b.client.load(Ordering::Acquire);
            // SAFETY: a published client is never freed (see `Bypass::client`).
            (!p.is_null()).then(|| unsafe { &*p })
        })
    }
}

/// Path calls under the named mounts (EFUSE_BYPASS_MOUNTS) before the
/// mount table was read.
static EARLY: AtomicU32 = AtomicU32::new(0);

/// One more path call under a named mount before the mount table was read:
/// true once there were more than EFUSE_BYPASS_AFTER (read the table and
/// connect now), false while they go through the kernel.
pub fn early_call() -> bool {
    let after = crate::config::get().after;
    after == 0 || EARLY.fetch_add(1, Ordering::Relaxed) >= after
}

/// Mounts if they were already discovered (never discovers).
pub fn discovered() -> Option<&'static Mounts> {
    MOUNTS.get()
}

#[cfg(test)]
mod tests {
    use super::relevant;
    use crate::paths::longest_prefix;

    #[test]
    fn a_mount_inside_a_bypassed_one_still_takes_its_paths() {
        let points: [&[u8]; 5] = [b"/", b"/mnt/e", b"/mnt/e/sub", b"/other", b"/mnt/elsewhere"];
        let r = relevant(&points, &[false, true, false, false, false]);
        assert_eq!(r, vec![1, 2]);
        let rp: Vec<&[u8]> = r.iter().map(|&i| points[i]).collect();
        // Under the nested mount: it is the longest, and it is no bypass mount.
        assert_eq!(longest_prefix(&rp, b"/mnt/e/sub/x").map(|(k, _)| r[k]), Some(2));
        assert_eq!(longest_prefix(&rp, b"/mnt/e/x").map(|(k, _)| r[k]), Some(1));
        assert_eq!(longest_prefix(&rp, b"/mnt/elsewhere/x"), None);
        assert_eq!(longest_prefix(&rp, b"/other/x"), None);
    }
}

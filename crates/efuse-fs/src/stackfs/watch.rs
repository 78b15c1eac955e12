//! The backing-directory watcher: what keeps `--cache auto` exact.
//!
//! With long TTLs the kernel answers lookups, stats, reads and listings from
//! its caches. Changes made through the mount update those caches as they
//! happen; changes made to the backing directory by anyone else must be
//! told to the kernel. This module watches the backing tree and turns each
//! change into a notification, sent from its own thread (never from a
//! request handler, where the kernel may hold the locks the notification
//! needs):
//!
//! | change behind the mount                | notification                                     |
//! |----------------------------------------|--------------------------------------------------|
//! | name created, removed, renamed in dir D | `inval_entry(D, name)` (positive or negative) and `inval_inode(D)` (attributes, cached listing) |
//! | attributes or data of node N changed    | `inval_inode(N, 0, 0)`: attributes and page cache |
//! | events lost (queue overflow)            | `inc_epoch` (every cached name, positive or negative, is stale) and `inval_inode` of every node |
//!
//! Two ways to watch, chosen at start:
//!
//! - **fanotify** (CAP_SYS_ADMIN): one mark on the whole backing file system
//!   (and on each further file system met below the backing directory),
//!   reporting file handles, which map to nodes through the inode table.
//!   Events of inodes stackfs does not know are dropped, and so are events
//!   caused by the daemon itself (event pid == ours), as those came through
//!   the mount. The queue is unlimited, so no event is lost.
//! - **inotify** otherwise: a watch per directory node, added when the
//!   directory is looked up (before the reply, so nothing below it is cached
//!   unwatched) and removed when it is forgotten. Events name the child; the
//!   watcher stats it to find its node. The daemon's own changes cannot be
//!   told apart, so they cost an extra (harmless) invalidation. A file
//!   changed through a hard link in a directory stackfs never looked up is
//!   not seen.
//!
//! When events were lost (inotify's queue overflowed: `IN_Q_OVERFLOW`;
//! fanotify's queue is unlimited, but `FAN_Q_OVERFLOW` is handled the same),
//! the watcher resynchronises the kernel at once: `FUSE_NOTIFY_INC_EPOCH`
//! (Linux 6.16+) makes every name the kernel cached so far stale, and
//! `inval_inode` of every node drops cached attributes and pages; the caches
//! stay exact from then on. Where the kernel has no `INC_EPOCH`, the watcher
//! is degraded instead (below), and names cached before the loss may stay
//! stale until their TTL ends.
//!
//! When a watch cannot be added (inotify's watch limit, a file system that
//! refuses a mark), the watcher is *degraded*: from then on stackfs answers
//! with short TTLs (1 s) and without keeping the page cache, so nothing it
//! says after that depends on a watch it does not have.
//!
//! Not seen by either: writes through a shared mmap of the backing file (no
//! events exist for them).
//!
//! `EFUSE_STACKFS_WATCH=inotify` in the daemon's environment skips fanotify
//! (to test the inotify path as root).

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, OsStr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use efuse::{Connection, Errno};

use super::inodes::InodeTable;
use super::sys;

const FAN_EVENTS: u64 = libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_MOVED_FROM
    | libc::FAN_MOVED_TO
    | libc::FAN_ATTRIB
    | libc::FAN_MODIFY
    | libc::FAN_CLOSE_WRITE
    | libc::FAN_DELETE_SELF
    | libc::FAN_MOVE_SELF
    | libc::FAN_ONDIR
    | libc::FAN_EVENT_ON_CHILD;
const FAN_DIRENT: u64 = libc::FAN_CREATE | libc::FAN_DELETE | libc::FAN_MOVED_FROM | libc::FAN_MOVED_TO;
const FAN_OBJECT: u64 = libc::FAN_ATTRIB
    | libc::FAN_MODIFY
    | libc::FAN_CLOSE_WRITE
    | libc::FAN_DELETE_SELF
    | libc::FAN_MOVE_SELF
    | FAN_DIRENT;

const IN_EVENTS: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_MODIFY
    | libc::IN_CLOSE_WRITE
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR
    | libc::IN_EXCL_UNLINK;
const IN_DIRENT: u32 = libc::IN_CREATE | libc::IN_DELETE | libc::IN_MOVED_FROM | libc::IN_MOVED_TO;
const IN_CHILD: u32 = libc::IN_ATTRIB | libc::IN_MODIFY | libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO;

/// `struct fanotify_event_metadata`: event_len u32, vers u8, reserved u8,
/// metadata_len u16, mask u64, fd i32, pid i32.
const FAN_META_LEN: usize = 24;
/// `struct inotify_event` without its name: wd, mask, cookie, len.
const IN_EVENT_LEN: usize = 16;
/// Environment variable that forces inotify (see the module documentation).
const WATCH_ENV: &str = "EFUSE_STACKFS_WATCH";
/// Bytes read from the watch descriptor at once.
const EVENT_BUFFER: usize = 64 * 1024;
/// How long the watcher lets events gather before it reads them.
const COALESCE: std::time::Duration = std::time::Duration::from_millis(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WatchKind {
    Fanotify,
    Inotify,
}

#[derive(Default)]
struct Dirs {
    by_node: HashMap<u64, i32>,
    by_wd: HashMap<i32, u64>,
}

struct Shared {
    kind: WatchKind,
    fd: OwnedFd,
    stop: OwnedFd,
    inodes: Arc<InodeTable>,
    conn: Connection,
    own_pid: i32,
    root_dev: u64,
    /// inotify: the watch of each directory node.
    dirs: Mutex<Dirs>,
    /// fanotify: the file systems (st_dev) marked.
    marked: Mutex<HashSet<u64>>,
    degraded: AtomicBool,
    stopped: AtomicBool,
}

/// See the module documentation.
pub(super) struct Watcher {
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Watcher {
    /// Starts watching below `root` (the backing directory, node
    /// [`super::inodes::ROOT_ID`], on device `root_dev`): fanotify where
    /// permitted, inotify otherwise. Err says why neither works.
    pub(super) fn start(
        inodes: Arc<InodeTable>,
        conn: Connection,
        root: &OwnedFd,
        root_dev: u64,
    ) -> Result<Watcher, String> {
        let stop = sys::eventfd().map_err(|e| format!("eventfd: {e}"))?;
        let fanotify = match std::env::var(WATCH_ENV).as_deref() {
            Ok("inotify") => Err(format!("{WATCH_ENV}=inotify")),
            _ => Self::fanotify(&inodes, root),
        };
        let (kind, fd, root_wd, why_not_fanotify) = match fanotify {
            Ok(fd) => (WatchKind::Fanotify, fd, None, None),
            Err(why) => {
                let fd = sys::inotify_init().map_err(|e| format!("{why}; inotify: {e}"))?;
                let wd = sys::inotify_add_watch(fd.as_fd(), root.as_fd(), IN_EVENTS)
                    .map_err(|e| format!("{why}; inotify watch on the backing directory: {e}"))?;
                (WatchKind::Inotify, fd, Some(wd), Some(why))
            }
        };
        let mut dirs = Dirs::default();
        if let Some(wd) = root_wd {
            dirs.by_node.insert(super::inodes::ROOT_ID, wd);
            dirs.by_wd.insert(wd, super::inodes::ROOT_ID);
        }
        let shared = Arc::new(Shared {
            kind,
            fd,
            stop,
            inodes,
            conn,
            own_pid: sys::getpid(),
            root_dev,
            dirs: Mutex::new(dirs),
            marked: Mutex::new(HashSet::from([root_dev])),
            degraded: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
        });
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("stackfs-watch".into())
            .spawn(move || thread_shared.run())
            .map_err(|e| format!("watcher thread: {e}"))?;
        match why_not_fanotify {
            None => tracing::info!("stackfs: caches kept exact by fanotify on the backing file system"),
            Some(why) => tracing::info!("stackfs: caches kept exact by inotify (fanotify: {why})"),
        }
        Ok(Watcher { shared })
    }

    fn fanotify(inodes: &InodeTable, root: &OwnedFd) -> Result<OwnedFd, String> {
        if !inodes.track_handles() {
            return Err("no file handles (needs CAP_DAC_READ_SEARCH and export support)".into());
        }
        let base = libc::FAN_CLASS_NOTIF | libc::FAN_UNLIMITED_QUEUE;
        let event_flags = (libc::O_RDONLY | libc::O_LARGEFILE) as u32;
        let fd = sys::fanotify_init(base | libc::FAN_REPORT_DFID_NAME_TARGET, event_flags)
            .or_else(|_| sys::fanotify_init(base | libc::FAN_REPORT_DFID_NAME | libc::FAN_REPORT_FID, event_flags))
            .map_err(|e| format!("fanotify_init: {e}"))?;
        sys::fanotify_mark(fd.as_fd(), libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM, FAN_EVENTS, root.as_fd())
            .map_err(|e| format!("fanotify_mark: {e}"))?;
        Ok(fd)
    }

    pub(super) fn kind(&self) -> WatchKind {
        self.shared.kind
    }

    /// A watch could not be added: the caches can no longer be kept exact.
    pub(super) fn degraded(&self) -> bool {
        self.shared.degraded.load(Ordering::Relaxed)
    }

    /// Directory node `node` (descriptor `fd`, on device `dev`) is about to
    /// be shown to the kernel: make sure changes in it are seen.
    pub(super) fn watch_dir(&self, node: u64, fd: &OwnedFd, dev: u64) {
        let sh = &self.shared;
        match sh.kind {
            WatchKind::Fanotify => {
                if dev == sh.root_dev {
                    return;
                }
                let mut marked = lock(&sh.marked);
                if marked.contains(&dev) {
                    return;
                }
                let flags = libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM;
                match sys::fanotify_mark(sh.fd.as_fd(), flags, FAN_EVENTS, fd.as_fd()) {
                    Ok(()) => {
                        marked.insert(dev);
                    }
                    Err(e) => sh.degrade(&format!("fanotify mark on a file system below the backing directory: {e}")),
                }
            }
            WatchKind::Inotify => {
                let mut dirs = lock(&sh.dirs);
                if dirs.by_node.contains_key(&node) {
                    return;
                }
                match sys::inotify_add_watch(sh.fd.as_fd(), fd.as_fd(), IN_EVENTS) {
                    Ok(wd) => {
                        // One inode, one wd: a recycled inode number's old node loses it.
                        if let Some(old) = dirs.by_wd.insert(wd, node) {
                            dirs.by_node.remove(&old);
                        }
                        dirs.by_node.insert(node, wd);
                    }
                    Err(e) => {
                        drop(dirs);
                        let hint = if e == Errno::ENOSPC { " (raise fs.inotify.max_user_watches)" } else { "" };
                        sh.degrade(&format!("inotify watch: {e}{hint}"))
                    }
                }
            }
        }
    }

    /// Node `node` was forgotten: drop its watch.
    pub(super) fn forgotten(&self, node: u64) {
        let sh = &self.shared;
        if sh.kind != WatchKind::Inotify {
            return;
        }
        let mut dirs = lock(&sh.dirs);
        if let Some(wd) = dirs.by_node.remove(&node) {
            if dirs.by_wd.get(&wd) == Some(&node) {
                dirs.by_wd.remove(&wd);
                sys::inotify_rm_watch(sh.fd.as_fd(), wd);
            }
        }
    }

    /// Stops the watcher thread (at unmount).
    pub(super) fn stop(&self) {
        if !self.shared.stopped.swap(true, Ordering::Relaxed) {
            sys::eventfd_signal(self.shared.stop.as_fd());
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop()
    }
}

/// Notifications gathered from one read of events, sent together (and
/// without duplicates) once no lock is held.
#[derive(Default)]
struct Invalidations {
    entries: Vec<(u64, Vec<u8>)>,
    inodes: Vec<u64>,
    everything: bool,
    /// A directory moved; the known ones that moved, to check at once.
    moved: bool,
    moved_dirs: Vec<u64>,
}

impl Invalidations {
    fn dir_moved(&mut self, node: Option<u64>) {
        self.moved = true;
        self.moved_dirs.extend(node);
    }

    fn entry(&mut self, parent: u64, name: &[u8]) {
        if !name.is_empty() {
            self.entries.push((parent, name.to_vec()));
        }
    }

    fn send(&mut self, sh: &Shared) {
        if std::mem::take(&mut self.moved) {
            // Every directory is checked again before names are resolved in
            // it; a known one that moved out of the tree is cut off now, and
            // the names the kernel cached below it with it.
            sh.inodes.dir_moved();
            let mut left = false;
            for d in self.moved_dirs.drain(..) {
                if let Ok(fd) = sh.inodes.fd(d) {
                    left |= !sh.inodes.still_inside(d, &fd, true);
                }
            }
            if left {
                tracing::info!(
                    "stackfs: a directory left the backing tree; it is no longer reachable through the mount"
                );
                match sh.conn.inc_epoch() {
                    Ok(true) => {}
                    Ok(false) => sh.degrade("the kernel has no FUSE_NOTIFY_INC_EPOCH to drop names cached below a directory that left the backing tree"),
                    Err(e) => sh.degrade(&format!("FUSE_NOTIFY_INC_EPOCH failed: {e}")),
                }
            }
        }
        if self.everything {
            self.everything = false;
            self.inodes = sh.inodes.all_ids();
            match sh.conn.inc_epoch() {
                Ok(true) => tracing::warn!(
                    "stackfs: change events were lost; every cached name, attribute and page is \
                     dropped (FUSE_NOTIFY_INC_EPOCH) and caching goes on exact"
                ),
                Ok(false) => sh.degrade(
                    "change events were lost and the kernel has no FUSE_NOTIFY_INC_EPOCH to drop cached names",
                ),
                Err(e) => sh.degrade(&format!("change events were lost and FUSE_NOTIFY_INC_EPOCH failed: {e}")),
            }
        }
        self.entries.sort_unstable();
        self.entries.dedup();
        self.inodes.sort_unstable();
        self.inodes.dedup();
        for (parent, name) in self.entries.drain(..) {
            if let Err(e) = sh.conn.inval_entry(parent, OsStr::from_bytes(&name)) {
                tracing::debug!(parent, "inval_entry: {e}");
            }
        }
        for ino in self.inodes.drain(..) {
            if let Err(e) = sh.conn.inval_inode(ino, 0, 0) {
                tracing::debug!(ino, "inval_inode: {e}");
            }
        }
    }
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_ne_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[i..i + 8]);
    u64::from_ne_bytes(x)
}

/// The bytes before the first NUL.
fn until_nul(b: &[u8]) -> &[u8] {
    &b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())]
}

impl Shared {
    fn degrade(&self, why: &str) {
        if !self.degraded.swap(true, Ordering::Relaxed) {
            tracing::warn!("stackfs: {why}; caches fall back to 1 s TTLs from now on");
        }
    }

    fn run(&self) {
        let mut buf = vec![0u8; EVENT_BUFFER];
        let mut work = Invalidations::default();
        loop {
            match sys::poll2(self.fd.as_fd(), self.stop.as_fd()) {
                Ok((_, true)) => return,
                Ok((false, false)) => continue,
                Ok((true, false)) => {}
                Err(e) => {
                    self.degrade(&format!("watcher stopped: poll: {e}"));
                    return;
                }
            }
            // Let a burst gather before reading it: a program writing
            // through the mount (passthrough writes are reported as the
            // program's, not ours) would otherwise wake this thread, and
            // invalidate the same inode, once per write. Bounds the wake-ups
            // to COALESCE^-1 per second and adds at most COALESCE to how
            // soon a change made behind the mount's back is seen.
            std::thread::sleep(COALESCE);
            let n = match sys::read(self.fd.as_fd(), &mut buf) {
                Ok(n) => n,
                Err(e) if e == Errno::EAGAIN => continue,
                Err(e) => {
                    self.degrade(&format!("watcher stopped: read: {e}"));
                    return;
                }
            };
            match self.kind {
                WatchKind::Fanotify => self.fanotify_events(&buf[..n], &mut work),
                WatchKind::Inotify => self.inotify_events(&buf[..n], &mut work),
            }
            work.send(self);
        }
    }

    fn fanotify_events(&self, buf: &[u8], work: &mut Invalidations) {
        let mut off = 0;
        while off + FAN_META_LEN <= buf.len() {
            let event_len = u32_at(buf, off) as usize;
            let vers = buf[off + 4];
            let meta_len = u16_at(buf, off + 6) as usize;
            let mask = u64_at(buf, off + 8);
            let fd = u32_at(buf, off + 16) as i32;
            let pid = u32_at(buf, off + 20) as i32;
            if event_len < FAN_META_LEN || off + event_len > buf.len() || meta_len > event_len {
                break;
            }
            if vers != libc::FANOTIFY_METADATA_VERSION {
                self.degrade(&format!("fanotify metadata version {vers} not understood"));
                return;
            }
            if fd >= 0 {
                // Not in FID mode: never happens, but a descriptor must not leak.
                // SAFETY: the kernel handed us this descriptor with the event.
                drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
            }
            if mask & libc::FAN_Q_OVERFLOW != 0 {
                work.everything = true;
            } else if pid != self.own_pid {
                self.fanotify_event(mask, &buf[off + meta_len..off + event_len], work);
            }
            off += event_len;
        }
    }

    fn fanotify_event(&self, mask: u64, info: &[u8], work: &mut Invalidations) {
        let (mut dir, mut name, mut object) = (None, &[][..], None);
        let mut r = 0;
        while r + 4 <= info.len() {
            let info_type = info[r];
            let len = u16_at(info, r + 2) as usize;
            if len < 4 || r + len > info.len() {
                break;
            }
            let rec = &info[r..r + len];
            r += len;
            let is_fid = matches!(
                info_type,
                libc::FAN_EVENT_INFO_TYPE_FID | libc::FAN_EVENT_INFO_TYPE_DFID_NAME | libc::FAN_EVENT_INFO_TYPE_DFID
            );
            // header (4), fsid (8), file_handle: handle_bytes (4), handle_type (4), bytes.
            if !is_fid || rec.len() < 20 {
                continue;
            }
            let handle_bytes = u32_at(rec, 12) as usize;
            let handle_type = u32_at(rec, 16) as i32;
            let Some(bytes) = rec.get(20..20 + handle_bytes) else { continue };
            let mut key = [0u8; sys::HANDLE_KEY_MAX];
            let node = self.inodes.node_by_handle(sys::handle_key(handle_type, bytes, &mut key));
            match info_type {
                libc::FAN_EVENT_INFO_TYPE_FID => object = node,
                libc::FAN_EVENT_INFO_TYPE_DFID => dir = node,
                _ => {
                    dir = node;
                    name = until_nul(&rec[20 + handle_bytes..]);
                }
            }
        }
        if mask & FAN_DIRENT != 0 {
            if let Some(d) = dir {
                work.entry(d, name);
                work.inodes.push(d);
            }
        }
        if mask & libc::FAN_ONDIR != 0 && mask & (libc::FAN_MOVED_FROM | libc::FAN_MOVE_SELF) != 0 {
            work.dir_moved(object.filter(|_| mask & libc::FAN_MOVE_SELF != 0));
        }
        if mask & FAN_OBJECT != 0 {
            if let Some(o) = object {
                work.inodes.push(o);
            }
        }
    }

    fn inotify_events(&self, buf: &[u8], work: &mut Invalidations) {
        let mut off = 0;
        while off + IN_EVENT_LEN <= buf.len() {
            let wd = u32_at(buf, off) as i32;
            let mask = u32_at(buf, off + 4);
            let len = u32_at(buf, off + 12) as usize;
            let Some(name) = buf.get(off + IN_EVENT_LEN..off + IN_EVENT_LEN + len) else { break };
            let name = until_nul(name);
            off += IN_EVENT_LEN + len;
            if mask & libc::IN_Q_OVERFLOW != 0 {
                work.everything = true;
                continue;
            }
            let dir = {
                let mut dirs = lock(&self.dirs);
                let dir = dirs.by_wd.get(&wd).copied();
                if mask & libc::IN_IGNORED != 0 {
                    // The directory is gone (or we removed the watch).
                    if let Some(d) = dirs.by_wd.remove(&wd) {
                        dirs.by_node.remove(&d);
                    }
                }
                dir
            };
            if mask & libc::IN_ISDIR != 0 && mask & libc::IN_MOVED_FROM != 0 {
                work.dir_moved(None);
            }
            let Some(dir) = dir else { continue };
            if name.is_empty() {
                // The directory itself changed.
                if mask & (libc::IN_ATTRIB | libc::IN_MODIFY) != 0 {
                    work.inodes.push(dir);
                }
                if mask & libc::IN_MOVE_SELF != 0 {
                    work.dir_moved(Some(dir));
                }
                continue;
            }
            if mask & IN_DIRENT != 0 {
                work.entry(dir, name);
                work.inodes.push(dir);
            }
            if mask & IN_CHILD != 0 {
                if let Some(child) = self.child_node(dir, name) {
                    work.inodes.push(child);
                }
            }
        }
    }

    /// The node of `name` in directory node `dir`, if stackfs knows it.
    fn child_node(&self, dir: u64, name: &[u8]) -> Option<u64> {
        let mut buf = [0u8; 256];
        if name.len() >= buf.len() {
            return None;
        }
        buf[..name.len()].copy_from_slice(name);
        let cname = CStr::from_bytes_until_nul(&buf).ok()?;
        let dir_fd = self.inodes.fd(dir).ok()?;
        let fd = sys::open_path_at(dir_fd.as_fd(), cname).ok()?;
        let st = sys::statx(fd.as_fd()).ok()?;
        self.inodes.node_by_key(sys::statx_key(&st))
    }
}

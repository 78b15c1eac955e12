//! Direct reads: read-only opens served from the file system's own files,
//! with no request to the daemon (the user-space counterpart of FUSE
//! passthrough).
//!
//! A file system may name a directory that holds its regular files under
//! the same paths, with the same contents and permissions (stackfs: its
//! backing directory); the daemon passes an O_PATH descriptor of it at
//! connection ([`efuse_bypass::welcome::DIRECT_READS`]). A read-only open
//! of a file the metadata table knows is then served by the library alone:
//! it opens the same path below that directory with the program's own
//! credentials (so the kernel checks the permissions, as it checks them on
//! the mount), without following symbolic links or leaving the directory's
//! file system, and keeps the result only if it is the inode the table
//! names. The program gets an O_PATH descriptor of the file through the
//! mount, as for every served open; reads are `pread`s of the backing
//! descriptor: the file's bytes as they are now, whoever wrote them.
//!
//! The backing descriptor is the process's own (close-on-exec, above the
//! numbers programs use) and belongs to the open file's entry; a forked
//! child inherits it with the entry. Each process counts its descriptors
//! of each entry and closes its backing descriptor when its last one goes.
//! Readers count themselves so that a close racing a read (another thread,
//! a signal handler) never leaves a read on a closed or reused number: the
//! last reader closes what a closer could not.
//!
//! An open the library cannot serve this way (write access, O_TRUNC, a
//! symbolic link on the way, another file system below, a file the table
//! does not know) goes to the daemon as before. After a direct file's last
//! close, the next open of the same unchanged file goes to the daemon, so
//! that a file opened again and again gets a kept handle (see `kept`),
//! cheaper still.

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

use crate::files::{MAX_FDS, MAX_FILES};

/// The backing descriptors of this process, one bit per number: the close
/// of every descriptor asks whether it is one (see `mounts::is_library_fd`).
static OWNED: [AtomicU64; MAX_FDS / 64] = [const { AtomicU64::new(0) }; MAX_FDS / 64];

fn mark(fd: i32) {
    if let Some(w) = usize::try_from(fd).ok().and_then(|f| OWNED.get(f / 64)) {
        if w.fetch_or(1 << (fd % 64), Ordering::AcqRel) & 1 << (fd % 64) == 0 {
            HELD.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// Whether this process may open one more direct read: fewer than
/// [`MAX_DIRECT`] backing descriptors held, and entry `idx` free of the
/// readers and leftovers of an earlier use (a read racing the close of the
/// file that used the entry before).
pub fn may_attach(idx: u32) -> bool {
    let l = &LOCAL[idx as usize];
    room()
        && l.users.load(Ordering::Acquire) == 0
        && l.orphan.load(Ordering::Acquire) < 0
        && l.fd.load(Ordering::Acquire) < 0
}

/// Room for one more? (Checked before the work of an open; `may_attach`
/// checks again with the entry.)
pub fn room() -> bool {
    HELD.load(Ordering::Acquire) < MAX_DIRECT
}

/// In a forked child (one thread): reads counted by the parent's other
/// threads never finish here, and what they left to close is the child's
/// to close.
pub fn forget_readers_in_child() {
    // No backing descriptor and no reader (the usual case: a shell's
    // fork), nothing to do.
    if HELD.load(Ordering::Acquire) == 0 && READING.load(Ordering::Acquire) == 0 {
        return;
    }
    READING.store(0, Ordering::Release);
    for l in &LOCAL {
        l.users.store(0, Ordering::Release);
        let o = l.orphan.swap(-1, Ordering::AcqRel);
        if o >= 0 {
            close_own(o);
        }
    }
}

fn unmark(fd: i32) {
    if let Some(w) = usize::try_from(fd).ok().and_then(|f| OWNED.get(f / 64)) {
        if w.fetch_and(!(1 << (fd % 64)), Ordering::AcqRel) & 1 << (fd % 64) != 0 {
            HELD.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Closes backing descriptor `fd` (no longer reachable from `LOCAL`).
fn close_own(fd: i32) {
    unmark(fd);
    // SAFETY: the library's own descriptor, closed once.
    unsafe { crate::real::close()(fd) };
}

/// A process's backing descriptor of one open-file entry.
struct Local {
    /// The descriptor, -1 none.
    fd: AtomicI32,
    /// Reads using `fd` now.
    users: AtomicU32,
    /// A descriptor to close once `users` drops to 0 (a closer met readers).
    orphan: AtomicI32,
}

/// Backing descriptors a process holds at most: each is a number the
/// program cannot have (it counts against RLIMIT_NOFILE), so their number
/// is bounded, as the kept handles' is; beyond, opens go to the daemon.
pub const MAX_DIRECT: u32 = 16;
static HELD: AtomicU32 = AtomicU32::new(0);

static LOCAL: [Local; MAX_FILES] =
    [const { Local { fd: AtomicI32::new(-1), users: AtomicU32::new(0), orphan: AtomicI32::new(-1) } }; MAX_FILES];

/// Nodes whose direct open was closed lately (mount << 48 ^ node, 0 none):
/// their next open goes to the daemon, for a kept handle.
const RECENT: usize = 8;
static CLOSED: [AtomicU64; RECENT] = [const { AtomicU64::new(0) }; RECENT];
static NEXT: AtomicU32 = AtomicU32::new(0);

fn key(mount: u32, nodeid: u64) -> u64 {
    ((mount as u64) << 48) ^ nodeid | 1 << 63
}

/// Was a direct open of this node closed lately? Forgets it if so.
pub fn closed_lately(mount: u32, nodeid: u64) -> bool {
    let k = key(mount, nodeid);
    CLOSED.iter().any(|s| s.compare_exchange(k, 0, Ordering::AcqRel, Ordering::Relaxed).is_ok())
}

fn note_closed(mount: u32, nodeid: u64) {
    let i = NEXT.fetch_add(1, Ordering::Relaxed) as usize % RECENT;
    CLOSED[i].store(key(mount, nodeid), Ordering::Release);
}

/// Opens `rest` (a path below the mount's root) read-only below `dir`, as
/// the program (its credentials), and checks it is inode `ino`: the new
/// descriptor (close-on-exec, at a high number), or None.
pub fn open_backing(dir: i32, rest: &[u8], flags: i32, ino: u64) -> Option<i32> {
    if rest.is_empty() || rest.len() >= libc::PATH_MAX as usize {
        return None;
    }
    let mut p = [0u8; libc::PATH_MAX as usize];
    p[..rest.len()].copy_from_slice(rest);
    // struct open_how: flags, mode, resolve (u64 each).
    let how: [u64; 3] = [
        (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY | (flags & libc::O_NOATIME)) as u64,
        0,
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV,
    ];
    // SAFETY: a NUL-terminated path and a valid open_how.
    let fd =
        unsafe { libc::syscall(libc::SYS_openat2, dir, p.as_ptr(), how.as_ptr(), std::mem::size_of_val(&how)) } as i32;
    if fd < 0 {
        return None;
    }
    let sx = crate::serve::statx_of(fd, libc::STATX_INO | libc::STATX_TYPE);
    if !sx.is_some_and(|sx| sx.stx_ino == ino && sx.stx_mode as u32 & libc::S_IFMT == libc::S_IFREG) {
        // SAFETY: our own descriptor.
        unsafe { crate::real::close()(fd) };
        return None;
    }
    Some(fd)
}

/// Moves `fd` (the library's) above the numbers programs use.
pub fn move_high(fd: i32) -> Option<i32> {
    // SAFETY: duplicates our own descriptor; the old one is closed after.
    let high = unsafe { crate::real::fcntl()(fd, libc::F_DUPFD_CLOEXEC, crate::kept::high_floor() as usize) };
    // SAFETY: our own descriptor.
    unsafe { crate::real::close()(fd) };
    (high >= 0).then_some(high)
}

/// Gives entry `idx` this process's backing descriptor `fd`.
pub fn attach(idx: u32, fd: i32) {
    let l = &LOCAL[idx as usize];
    mark(fd);
    let old = l.fd.swap(fd, Ordering::AcqRel);
    if old >= 0 {
        retire(l, old);
    }
}

/// Runs `f` with this process's backing descriptor of entry `idx`; None
/// if it has none.
pub fn with_fd<R>(idx: u32, f: impl FnOnce(i32) -> R) -> Option<R> {
    let l = &LOCAL[idx as usize];
    READING.fetch_add(1, Ordering::SeqCst);
    l.users.fetch_add(1, Ordering::SeqCst);
    let fd = l.fd.load(Ordering::SeqCst);
    let r = (fd >= 0).then(|| f(fd));
    if l.users.fetch_sub(1, Ordering::SeqCst) == 1 {
        let o = l.orphan.swap(-1, Ordering::AcqRel);
        if o >= 0 {
            // A descriptor of ours that its closer left to us.
            close_own(o);
        }
    }
    READING.fetch_sub(1, Ordering::SeqCst);
    r
}

/// Threads inside [`with_fd`] now, over all entries (a forked child
/// inherits the counts of threads it does not have).
static READING: AtomicU32 = AtomicU32::new(0);

/// Closes `fd`, once no read uses it (or leaves it to the last reader).
fn retire(l: &Local, fd: i32) {
    if l.users.load(Ordering::SeqCst) == 0 {
        // Taken out of `fd` by the caller: no new reader sees it.
        close_own(fd);
        return;
    }
    let prev = l.orphan.swap(fd, Ordering::AcqRel);
    if prev >= 0 {
        // An older orphan: the readers that used it have left (a reader
        // loads `fd` only after counting itself).
        close_own(prev);
    }
    // The readers may all have left between the check and the swap.
    if l.users.load(Ordering::SeqCst) == 0 {
        let o = l.orphan.swap(-1, Ordering::AcqRel);
        if o >= 0 {
            close_own(o);
        }
    }
}

/// This process has no descriptor of entry `idx` left (its last one was
/// closed, converted or replaced): closes its backing descriptor and
/// remembers the node (see [`closed_lately`]).
pub fn detach(idx: u32, mount: u32, nodeid: u64) {
    let l = &LOCAL[idx as usize];
    let fd = l.fd.swap(-1, Ordering::AcqRel);
    if fd >= 0 {
        retire(l, fd);
        note_closed(mount, nodeid);
    }
}

/// Whether `fd` is a backing descriptor of this process.
pub fn owns_fd(fd: i32) -> bool {
    usize::try_from(fd)
        .ok()
        .and_then(|f| OWNED.get(f / 64))
        .is_some_and(|w| w.load(Ordering::Acquire) & 1 << (fd % 64) != 0)
}

/// The backing descriptors in `first..=last`.
pub fn fds_in(first: u32, last: u32) -> impl Iterator<Item = u32> {
    let last = last.min(MAX_FDS as u32 - 1);
    OWNED.iter().enumerate().filter(|(_, w)| w.load(Ordering::Acquire) != 0).flat_map(move |(i, w)| {
        let bits = w.load(Ordering::Acquire);
        (0..64u32)
            .filter(move |b| bits & 1 << b != 0)
            .map(move |b| i as u32 * 64 + b)
            .filter(move |fd| (first..=last).contains(fd))
    })
}

/// The program wants number `fd` (dup2 onto it): a backing descriptor
/// there moves to another number first.
pub fn make_room(fd: i32) {
    if fd < 0 || !crate::serve::owns_memory() {
        return;
    }
    for l in &LOCAL {
        if l.fd.load(Ordering::Acquire) == fd {
            // SAFETY: duplicates the library's own descriptor.
            let new = unsafe { crate::real::fcntl()(fd, libc::F_DUPFD_CLOEXEC, crate::kept::high_floor() as usize) };
            if new < 0 {
                continue;
            }
            mark(new);
            if l.fd.compare_exchange(fd, new, Ordering::AcqRel, Ordering::Acquire).is_err() {
                // The duplicate nobody took.
                close_own(new);
                continue;
            }
            unmark(fd);
            // Reads that loaded the old number finish before the program
            // replaces it.
            wait_for_readers(l);
        }
        if l.orphan.load(Ordering::Acquire) == fd {
            wait_for_readers(l);
            if l.orphan.compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                // The program's dup2 replaces (closes) it.
                unmark(fd);
            }
        }
    }
}

/// Waits (a bounded time: a signal handler may interrupt a read on its own
/// thread) for the reads that use `l`'s descriptors to finish.
fn wait_for_readers(l: &Local) {
    for _ in 0..10_000 {
        if l.users.load(Ordering::SeqCst) == 0 {
            return;
        }
        std::thread::yield_now();
    }
}

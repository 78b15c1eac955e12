//! Read-only handles kept after their last close, so that opening the same
//! file again costs no request to the daemon: the round trip the kernel
//! path cannot avoid (every open(2) of a FUSE file is an OPEN request).
//!
//! When the last descriptor of a read-only open file is closed, the
//! library keeps the daemon's handle, an O_PATH descriptor of the file
//! (close-on-exec, above the numbers programs use) and the bytes the open
//! read ahead ([`crate::prefetch`]), tied to the file's entry in the
//! metadata table as it was when the daemon checked the open. A later open
//! of the same file with the same flags takes them back if that entry is
//! unchanged: the daemon rewrites or clears an entry before it answers any
//! change to its file (data, size, mode, owner, times, links) from any
//! source, so an unchanged entry means the daemon would allow the open
//! again and the kept bytes are the file's bytes. The new descriptor is a
//! duplicate of the kept O_PATH descriptor, on the lowest free number as
//! an open would give. Otherwise the handle is released and the open goes
//! to the daemon as usual.
//!
//! What a file system sees: one OPEN and one RELEASE for a run of opens of
//! an unchanged file by one process, as the kernel sends one READ for a
//! run of reads its page cache answers. A process keeps at most
//! [`SLOTS`] handles; they are released when the file changes, when the
//! process changes credentials, execs, or exits (the daemon closes a
//! client's handles when its connection ends).
//!
//! Slots are process-private (a forked child starts with none: the parent's
//! stay the parent's) and taken with compare-and-swap, so threads and
//! signal handlers never wait for each other here: a busy slot is skipped.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use efuse_bypass::client::Client;
use efuse_bypass::wire::PREFETCH_MAX;

use crate::files::{self, OpenFile, Released};

/// Kept handles per process.
pub const SLOTS: usize = 8;
/// How long a handle stays kept without being taken again: its O_PATH
/// descriptor holds the file (and the mount busy, as an open file does).
pub const IDLE_NS: u64 = 2_000_000_000;

/// Set in a forked child: it keeps no handles (it shares its parent's
/// connection, and a child that `_exit`s would never give them back).
static OFF: AtomicBool = AtomicBool::new(false);

/// Whether this process may keep and take handles: the connection's file
/// system allows it and the process is no forked child. (A vfork child,
/// which borrows its parent's memory, never keeps one: the closes that
/// keep check that the memory is their process's own, see `serve::close`;
/// checking here too would cost a system call per open.)
fn enabled(c: &Client) -> bool {
    c.welcome().flags & efuse_bypass::welcome::KEEP_OPENS != 0 && !OFF.load(Ordering::Relaxed)
}

fn addr(c: &Client) -> usize {
    c as *const Client as usize
}

/// Slot states.
const FREE: u32 = 0;
/// Kept, no open file uses it.
const IDLE: u32 = 1;
/// An open file uses the handle (the file's `kept` token names the slot).
const USED: u32 = 2;
/// One thread is changing the slot.
const BUSY: u32 = 3;

struct Slot {
    state: AtomicU32,
    mount: AtomicU32,
    flags: AtomicU32,
    /// Table entry and its sequence number when the daemon checked the open.
    entry: AtomicU32,
    seq: AtomicU32,
    nodeid: AtomicU64,
    fh: AtomicU64,
    /// The token of the open file using it (USED) or last using it, and
    /// that file's index.
    token: AtomicU64,
    idx: AtomicU32,
    /// The kept O_PATH descriptor, -1 none.
    opath: AtomicI32,
    /// The connection the handle belongs to (a `Client` address; clients
    /// are never freed): a handle is taken again, and released, only on it.
    client: AtomicUsize,
    /// Reads copying `data` now: the slot is not refilled meanwhile.
    readers: AtomicU32,
    /// When it went idle (CLOCK_MONOTONIC ns): an idle handle is released
    /// after [`IDLE_NS`].
    idle_since: AtomicU64,
    /// Bytes of the file from offset 0 (`len` of them; `eof`: the file ends
    /// there), written only while BUSY, read while USED.
    len: AtomicU32,
    eof: AtomicU32,
    data: std::cell::UnsafeCell<[u8; PREFETCH_MAX]>,
}

// SAFETY: `data` is written only by the thread that holds the slot BUSY and
// read only while the slot is USED by the reader's open file.
unsafe impl Sync for Slot {}

static KEPT: [Slot; SLOTS] = [const {
    Slot {
        state: AtomicU32::new(FREE),
        mount: AtomicU32::new(0),
        flags: AtomicU32::new(0),
        entry: AtomicU32::new(0),
        seq: AtomicU32::new(0),
        nodeid: AtomicU64::new(0),
        fh: AtomicU64::new(0),
        token: AtomicU64::new(0),
        idx: AtomicU32::new(0),
        opath: AtomicI32::new(-1),
        client: AtomicUsize::new(0),
        readers: AtomicU32::new(0),
        idle_since: AtomicU64::new(0),
        len: AtomicU32::new(0),
        eof: AtomicU32::new(0),
        data: std::cell::UnsafeCell::new([0; PREFETCH_MAX]),
    }
}; SLOTS];

/// Tokens: this process's id, a counter, the slot.
static COUNTER: AtomicU64 = AtomicU64::new(0);

fn new_token(slot: usize) -> u64 {
    let pid = match crate::serve::owner() {
        0 => crate::serve::pid(),
        p => p,
    } as u64
        & 0xffff_ffff;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed) & 0xff_ffff;
    (pid << 32) | (n << 8) | slot as u64
}

fn slot_of(token: u64) -> Option<&'static Slot> {
    if token == 0 {
        return None;
    }
    KEPT.get((token & 0xff) as usize)
}

/// The slot an open file uses, if it is still this process's to use.
fn used_by(f: &OpenFile) -> Option<&'static Slot> {
    let token = f.kept.load(Ordering::Acquire);
    let s = slot_of(token)?;
    (s.state.load(Ordering::Acquire) == USED && s.token.load(Ordering::Acquire) == token).then_some(s)
}

/// What an open found: a kept handle now used by a new open file.
pub struct Taken {
    pub idx: u32,
    pub fd: i32,
    pub fh: u64,
}

/// An open of node `nodeid` (found in table entry `entry` at `seq`) on
/// mount `mount` with open-file flags `flags` (O_RDONLY and modifiers):
/// takes a kept handle if one is there and the entry is unchanged since
/// it was kept. The new descriptor is a duplicate of the kept one (with
/// FD_CLOEXEC if `cloexec`) on the lowest free number; None: open as usual
/// (a kept handle that no longer holds was released).
pub fn take(c: &Client, mount: u32, nodeid: u64, flags: u32, entry: u32, seq: u32, cloexec: bool) -> Option<Taken> {
    if !enabled(c) {
        return None;
    }
    for s in &KEPT {
        if s.state.load(Ordering::Acquire) != IDLE
            || s.nodeid.load(Ordering::Relaxed) != nodeid
            || s.mount.load(Ordering::Relaxed) != mount
            || s.flags.load(Ordering::Relaxed) != flags
        {
            continue;
        }
        if s.state.compare_exchange(IDLE, BUSY, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            continue;
        }
        // Fields re-read under BUSY: they may have changed before the CAS.
        if s.nodeid.load(Ordering::Relaxed) != nodeid
            || s.mount.load(Ordering::Relaxed) != mount
            || s.flags.load(Ordering::Relaxed) != flags
            || s.client.load(Ordering::Relaxed) != addr(c)
        {
            s.state.store(IDLE, Ordering::Release);
            continue;
        }
        let same = s.entry.load(Ordering::Relaxed) == entry && s.seq.load(Ordering::Relaxed) == seq;
        if !same || !c.table().is_some_and(|t| t.unchanged(entry, nodeid, seq)) {
            release(s);
            return None;
        }
        let cmd = if cloexec { libc::F_DUPFD_CLOEXEC } else { libc::F_DUPFD };
        // SAFETY: duplicates the library's own descriptor.
        let fd = unsafe { crate::real::fcntl()(s.opath.load(Ordering::Relaxed), cmd, 0) };
        if !(3..files::MAX_FDS as i32).contains(&fd) {
            // 0-2 (a standard stream was closed) or no descriptor: the open
            // goes the usual way, which gives these to the kernel.
            if fd >= 0 {
                // SAFETY: the duplicate just made.
                unsafe { crate::real::close()(fd) };
            }
            s.state.store(IDLE, Ordering::Release);
            return None;
        }
        let fh = s.fh.load(Ordering::Relaxed);
        let Some(idx) = files::alloc(mount, nodeid, fh, flags) else {
            // SAFETY: the duplicate just made.
            unsafe { crate::real::close()(fd) };
            s.state.store(IDLE, Ordering::Release);
            return None;
        };
        let token = new_token(index(s));
        let f = files::file(idx);
        f.entry.store(entry, Ordering::Relaxed);
        f.seq.store(seq, Ordering::Relaxed);
        f.kept.store(token, Ordering::Release);
        s.token.store(token, Ordering::Release);
        s.idx.store(idx, Ordering::Relaxed);
        s.state.store(USED, Ordering::Release);
        return Some(Taken { idx, fd, fh });
    }
    None
}

fn index(s: &Slot) -> usize {
    (s as *const Slot as usize - KEPT.as_ptr() as usize) / std::mem::size_of::<Slot>()
}

/// Releases the handle of a slot held BUSY and frees it.
fn release(s: &Slot) {
    close_opath(s);
    if let Some(c) = client_at(s.client.swap(0, Ordering::AcqRel)) {
        crate::ops::release(
            c,
            s.nodeid.load(Ordering::Relaxed),
            s.fh.load(Ordering::Relaxed),
            s.flags.load(Ordering::Relaxed),
            true,
        );
    }
    s.len.store(0, Ordering::Relaxed);
    s.state.store(FREE, Ordering::Release);
}

/// Releases the idle handles kept longer than [`IDLE_NS`] or whose file
/// changed (its entry was rewritten or cleared). Runs at each close that
/// may keep a handle, so a process that goes on working holds none for
/// long; one that stops holds them until it exits.
fn sweep() {
    let now = efuse_bypass::table::now_ns();
    for s in &KEPT {
        if s.state.load(Ordering::Acquire) != IDLE {
            continue;
        }
        let old = now.saturating_sub(s.idle_since.load(Ordering::Relaxed)) >= IDLE_NS;
        let stale = client_at(s.client.load(Ordering::Relaxed)).is_some_and(|c| {
            !c.table().is_some_and(|t| {
                t.unchanged(
                    s.entry.load(Ordering::Relaxed),
                    s.nodeid.load(Ordering::Relaxed),
                    s.seq.load(Ordering::Relaxed),
                )
            })
        });
        if (old || stale) && s.state.compare_exchange(IDLE, BUSY, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            release(s);
        }
    }
}

/// Serves a read at `off` of open file `f` from the bytes kept with its
/// handle, if they cover it and the file's entry is unchanged.
pub fn read(c: &Client, f: &OpenFile, off: u64, buf: &mut [u8]) -> Option<usize> {
    let token = f.kept.load(Ordering::Acquire);
    let s = slot_of(token)?;
    // Counted before the check that the slot is this file's: a refill
    // (`free_slot`) either sees the count or comes after the check fails.
    s.readers.fetch_add(1, Ordering::SeqCst);
    let n = read_counted(c, f, s, token, off, buf);
    s.readers.fetch_sub(1, Ordering::SeqCst);
    n
}

fn read_counted(c: &Client, f: &OpenFile, s: &Slot, token: u64, off: u64, buf: &mut [u8]) -> Option<usize> {
    if s.state.load(Ordering::SeqCst) != USED || s.token.load(Ordering::SeqCst) != token {
        return None;
    }
    let (nodeid, entry, seq) =
        (f.nodeid.load(Ordering::Relaxed), f.entry.load(Ordering::Relaxed), f.seq.load(Ordering::Relaxed));
    // SAFETY: the slot is USED by this open file: nobody writes `data`.
    let held: &[u8; PREFETCH_MAX] = unsafe { &*s.data.get() };
    let (len, eof) = (s.len.load(Ordering::Acquire) as usize, s.eof.load(Ordering::Relaxed) != 0);
    crate::prefetch::serve_from(held, len, eof, off, buf, || c.table().is_some_and(|t| t.unchanged(entry, nodeid, seq)))
}

/// Whether an open file may keep its handle after its last close: opened
/// read-only at a known table entry, flags unchanged since.
pub fn keepable(r: &Released) -> bool {
    r.open_flags as i32 & libc::O_ACCMODE == libc::O_RDONLY && r.flags == r.open_flags && r.seq != 0 && !r.direct
}

/// The last descriptor of open file `r` (index `idx`) is closed. `opath`:
/// an O_PATH duplicate made before the close (see [`spare_fd`]; taken here
/// either way). True: the handle is kept (the caller releases nothing).
pub fn keep(c: &Client, idx: u32, r: &Released, opath: Option<i32>) -> bool {
    let unchanged = c.table().is_some_and(|t| t.unchanged(r.entry, r.nodeid, r.seq));
    if let Some(s) = slot_of(r.kept) {
        if s.token.load(Ordering::Acquire) == r.kept
            && s.state.compare_exchange(USED, BUSY, Ordering::AcqRel, Ordering::Relaxed).is_ok()
        {
            close_fd(opath);
            if s.token.load(Ordering::Acquire) != r.kept {
                s.state.store(USED, Ordering::Release);
                return false;
            }
            if unchanged && enabled(c) {
                s.idle_since.store(efuse_bypass::table::now_ns(), Ordering::Relaxed);
                s.state.store(IDLE, Ordering::Release);
            } else {
                // The file changed: the handle goes.
                release(s);
            }
            return true;
        }
    }
    sweep();
    let Some(fd) = opath.filter(|_| unchanged && keepable(r) && enabled(c)) else {
        close_fd(opath);
        return false;
    };
    let Some(s) = free_slot() else {
        close_fd(Some(fd));
        return false;
    };
    s.mount.store(r.mount, Ordering::Relaxed);
    s.flags.store(r.open_flags, Ordering::Relaxed);
    s.nodeid.store(r.nodeid, Ordering::Relaxed);
    s.fh.store(r.fh, Ordering::Relaxed);
    s.entry.store(r.entry, Ordering::Relaxed);
    s.seq.store(r.seq, Ordering::Relaxed);
    s.token.store(0, Ordering::Relaxed);
    s.client.store(addr(c), Ordering::Relaxed);
    s.opath.store(fd, Ordering::Release);
    // SAFETY: the slot is BUSY: this thread alone uses `data`.
    let held: &mut [u8; PREFETCH_MAX] = unsafe { &mut *s.data.get() };
    // The bytes outlive the open only where the file system lets the
    // kernel's page cache do the same (FOPEN_KEEP_CACHE): otherwise a
    // change it cannot report (behind the mount, unwatched) would be missed.
    let bytes = if r.keep_cache { crate::prefetch::take_for(idx, r.nodeid, r.fh, held) } else { None };
    let (len, eof) = bytes.unwrap_or((0, false));
    s.len.store(len as u32, Ordering::Relaxed);
    s.eof.store(eof as u32, Ordering::Relaxed);
    s.idle_since.store(efuse_bypass::table::now_ns(), Ordering::Relaxed);
    s.state.store(IDLE, Ordering::Release);
    true
}

/// Before the close of `fd`, the last descriptor of open file `idx` in all
/// likelihood: an O_PATH duplicate of it (close-on-exec, high) to keep
/// with the handle, if the file may keep it and does not already use a
/// kept handle (which has its own descriptor).
pub fn spare_fd(idx: u32, fd: i32) -> Option<i32> {
    let f = files::file(idx);
    let r = files::released_of(f);
    if !keepable(&r) || f.refs.load(Ordering::Acquire) != 1 || used_by(f).is_some() {
        return None;
    }
    // SAFETY: duplicates the program's descriptor, which the library serves.
    let d = unsafe { crate::real::fcntl()(fd, libc::F_DUPFD_CLOEXEC, high_floor() as usize) };
    (d >= 0).then_some(d)
}

/// [`efuse_bypass::client::high_fd_floor`], asked once.
pub fn high_floor() -> i32 {
    static FLOOR: AtomicI32 = AtomicI32::new(0);
    match FLOOR.load(Ordering::Relaxed) {
        0 => {
            let f = efuse_bypass::client::high_fd_floor();
            FLOOR.store(f, Ordering::Relaxed);
            f
        }
        f => f,
    }
}

fn close_fd(fd: Option<i32>) {
    if let Some(fd) = fd {
        // SAFETY: the library's own descriptor, given to it.
        unsafe { crate::real::close()(fd) };
    }
}

/// Closes slot `s`'s kept descriptor, if it has one.
fn close_opath(s: &Slot) {
    let fd = s.opath.swap(-1, Ordering::AcqRel);
    close_fd((fd >= 0).then_some(fd));
}

/// The client at address `a` (a slot's `client`), None for 0.
fn client_at(a: usize) -> Option<&'static Client> {
    // SAFETY: a slot holds only addresses of published clients, which are
    // never freed (see `mounts::Bypass::client`); a disowned one fails its
    // calls.
    (a != 0).then(|| unsafe { &*(a as *const Client) })
}

/// A slot to fill, held BUSY: a free one, else the first idle one (its
/// handle released), else one whose open file is gone without this
/// process seeing its last close (a forked child closed it).
fn free_slot() -> Option<&'static Slot> {
    // A slot a read still copies from is not refilled (SeqCst against the
    // reader's count-then-check; see `read`).
    let unread = |s: &Slot| {
        if s.readers.load(Ordering::SeqCst) == 0 {
            return true;
        }
        s.state.store(FREE, Ordering::Release);
        false
    };
    for s in &KEPT {
        if s.state.compare_exchange(FREE, BUSY, Ordering::SeqCst, Ordering::Relaxed).is_ok() && unread(s) {
            return Some(s);
        }
    }
    for s in &KEPT {
        if s.state.load(Ordering::Acquire) == USED {
            let f = files::file(s.idx.load(Ordering::Relaxed));
            let token = s.token.load(Ordering::Acquire);
            let gone = f.refs.load(Ordering::Acquire) == 0 || f.kept.load(Ordering::Acquire) != token;
            if gone && s.state.compare_exchange(USED, BUSY, Ordering::SeqCst, Ordering::Relaxed).is_ok() {
                // Another process closed the file last and dealt with the
                // handle; only this process's descriptor goes.
                close_opath(s);
                s.token.store(0, Ordering::Relaxed);
                s.client.store(0, Ordering::Relaxed);
                if unread(s) {
                    return Some(s);
                }
            }
        }
    }
    for s in &KEPT {
        if s.state.compare_exchange(IDLE, BUSY, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            release(s);
            if s.state.compare_exchange(FREE, BUSY, Ordering::SeqCst, Ordering::Relaxed).is_ok() && unread(s) {
                return Some(s);
            }
        }
    }
    None
}

/// Whether `fd` is a kept O_PATH descriptor (the library's, not the
/// program's).
pub fn owns_fd(fd: i32) -> bool {
    fd >= 0 && KEPT.iter().any(|s| s.opath.load(Ordering::Acquire) == fd)
}

/// The kept descriptors in `first..=last`.
pub fn fds_in(first: u32, last: u32) -> impl Iterator<Item = u32> {
    KEPT.iter().filter_map(move |s| {
        let fd = s.opath.load(Ordering::Acquire);
        (fd >= 0 && (first..=last).contains(&(fd as u32))).then_some(fd as u32)
    })
}

/// The program wants number `fd` (dup2 onto it): a kept descriptor there
/// moves to another number first.
pub fn make_room(fd: i32) {
    if !crate::serve::owns_memory() {
        // A vfork child's descriptors are its own; the slots its parent's.
        return;
    }
    for s in &KEPT {
        if s.opath.load(Ordering::Acquire) == fd {
            // SAFETY: duplicates the library's own descriptor.
            let new = unsafe {
                crate::real::fcntl()(fd, libc::F_DUPFD_CLOEXEC, efuse_bypass::client::high_fd_floor() as usize)
            };
            if new >= 0 && s.opath.compare_exchange(fd, new, Ordering::AcqRel, Ordering::Acquire).is_err() {
                // SAFETY: the duplicate nobody took.
                unsafe { crate::real::close()(new) };
            }
        }
    }
}

/// Releases every idle kept handle of this process (before an exec or a
/// credential change): a later open asks the daemon again.
pub fn release_all() {
    for s in &KEPT {
        if s.state.compare_exchange(IDLE, BUSY, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            release(s);
        }
    }
}

/// In a forked child: the kept handles are the parent's. The child's copies
/// of their descriptors are closed and every slot is forgotten.
pub fn forget_in_child() {
    OFF.store(true, Ordering::Relaxed);
    COUNTER.store(0, Ordering::Relaxed);
    for s in &KEPT {
        // (The child's copy of the parent's kept descriptor.)
        close_opath(s);
        s.len.store(0, Ordering::Relaxed);
        s.token.store(0, Ordering::Relaxed);
        s.client.store(0, Ordering::Relaxed);
        s.state.store(FREE, Ordering::Release);
    }
}

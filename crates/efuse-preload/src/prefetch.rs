//! The first bytes of the file a thread opened last, read by the daemon
//! with the open ([`efuse_bypass::wire::OPEN_PREFETCH`]), so that reading a
//! small file whole costs the open's request and no other.
//!
//! The bytes may be given out only while the file's entry in the metadata
//! table is unchanged since the library found the file there before the
//! open: the daemon clears or rewrites the entry before it answers any
//! change to the file (from this client, another one, the kernel mount, or
//! stackfs's watcher), so an unchanged entry means no change completed
//! since the bytes were read.
//!
//! Per thread, for the last open only; a signal handler that reads while
//! the interrupted code is in here goes to the daemon instead.

use std::cell::{Cell, UnsafeCell};

use efuse_bypass::client::Client;
use efuse_bypass::wire::PREFETCH_MAX;

struct Prefetch {
    busy: Cell<bool>,
    /// Open-file index (see `files`), nodeid and the daemon's handle it
    /// belongs to; `valid` false: nothing held.
    valid: Cell<bool>,
    idx: Cell<u32>,
    nodeid: Cell<u64>,
    fh: Cell<u64>,
    /// The node's table entry and its sequence number when found.
    entry: Cell<u32>,
    seq: Cell<u32>,
    len: Cell<usize>,
    /// The read returned fewer bytes than asked: the file ends at `len`.
    eof: Cell<bool>,
    /// Allocated at the thread's first stash (not in the thread-local
    /// block itself: 16 KiB of it would be zeroed for every thread of every
    /// program the library is loaded into), freed with the thread.
    data: UnsafeCell<Option<Box<[u8; PREFETCH_MAX]>>>,
}

thread_local! {
    static PF: Prefetch = const {
        Prefetch {
            busy: Cell::new(false),
            valid: Cell::new(false),
            idx: Cell::new(0),
            nodeid: Cell::new(0),
            fh: Cell::new(0),
            entry: Cell::new(0),
            seq: Cell::new(0),
            len: Cell::new(0),
            eof: Cell::new(false),
            data: UnsafeCell::new(None),
        }
    };
}

/// Runs `f` on this thread's prefetch unless a call on this thread is in
/// it already (a signal handler): then None.
fn with<R>(f: impl FnOnce(&Prefetch) -> R) -> Option<R> {
    PF.try_with(|p| {
        if p.busy.replace(true) {
            return None;
        }
        let r = f(p);
        p.busy.set(false);
        Some(r)
    })
    .ok()
    .flatten()
}

/// Keeps `data` (the bytes an OPEN read) for the file the thread is
/// opening: node `nodeid`, found in table entry `entry` at `seq`. Not yet
/// usable: [`bind`] says which open file it belongs to.
pub fn stash(nodeid: u64, entry: u32, seq: u32, data: &[u8], asked: usize) {
    with(|p| {
        let n = data.len().min(PREFETCH_MAX);
        // SAFETY: `busy` keeps every other use of `data` out meanwhile.
        let slot = unsafe { &mut *p.data.get() };
        let held = slot.get_or_insert_with(|| Box::new([0; PREFETCH_MAX]));
        held[..n].copy_from_slice(&data[..n]);
        p.valid.set(false);
        p.nodeid.set(nodeid);
        p.entry.set(entry);
        p.seq.set(seq);
        p.len.set(n);
        p.eof.set(data.len() < asked);
        p.idx.set(u32::MAX);
    });
}

/// The stashed bytes belong to open file `idx` with handle `fh`.
pub fn bind(idx: u32, nodeid: u64, fh: u64) {
    with(|p| {
        if p.nodeid.get() == nodeid && p.idx.get() == u32::MAX {
            p.idx.set(idx);
            p.fh.set(fh);
            p.valid.set(true);
        }
    });
}

/// Moves what is held for open file `idx` (node `nodeid`, handle `fh`,
/// closed) into `out`: Some((bytes, the file ends there)), None if nothing
/// is held for it. (Called with the table entry known unchanged.)
pub fn take_for(idx: u32, nodeid: u64, fh: u64, out: &mut [u8; PREFETCH_MAX]) -> Option<(usize, bool)> {
    with(|p| {
        if !p.valid.get() || p.idx.get() != idx || p.nodeid.get() != nodeid || p.fh.get() != fh {
            return None;
        }
        p.valid.set(false);
        let n = p.len.get();
        // SAFETY: `busy` keeps every other use of `data` out meanwhile.
        let held = (unsafe { &*p.data.get() }).as_deref()?;
        out[..n].copy_from_slice(&held[..n]);
        Some((n, p.eof.get()))
    })
    .flatten()
}

/// Forgets what is held for open file `idx` (closed).
pub fn forget(idx: u32) {
    with(|p| {
        if p.idx.get() == idx {
            p.valid.set(false);
        }
    });
}

/// Serves a read of `buf.len()` bytes at `off` of open file `idx` (node
/// `nodeid`, handle `fh`) from the held bytes, if they cover it and the
/// file's table entry is unchanged. Some(bytes read) or None (ask the daemon).
pub fn read(c: &Client, idx: u32, nodeid: u64, fh: u64, off: u64, buf: &mut [u8]) -> Option<usize> {
    with(|p| {
        if !p.valid.get() || p.idx.get() != idx || p.nodeid.get() != nodeid || p.fh.get() != fh {
            return None;
        }
        // SAFETY: `busy` keeps every other use of `data` out meanwhile.
        let held = (unsafe { &*p.data.get() }).as_deref()?;
        serve_from(held, p.len.get(), p.eof.get(), off, buf, || {
            let fresh = c.table().is_some_and(|t| t.unchanged(p.entry.get(), nodeid, p.seq.get()));
            if !fresh {
                p.valid.set(false);
            }
            fresh
        })
    })
    .flatten()
}

/// A read of `buf.len()` bytes at `off` from `held`, the first `len` bytes
/// of a file (`eof`: the file ends there), if they cover it and `fresh()`
/// says they are still the file's. Some(bytes read) or None.
pub fn serve_from(
    held: &[u8; PREFETCH_MAX],
    len: usize,
    eof: bool,
    off: u64,
    buf: &mut [u8],
    fresh: impl FnOnce() -> bool,
) -> Option<usize> {
    let end = off.checked_add(buf.len() as u64)?;
    if (end > len as u64 && !eof) || !fresh() {
        return None;
    }
    let from = off.min(len as u64) as usize;
    let to = end.min(len as u64) as usize;
    buf[..to - from].copy_from_slice(&held[from..to]);
    Some(to - from)
}

//! A lock manager for file systems that implement POSIX record locks and BSD
//! `flock` themselves (GETLK, SETLK, SETLKW).
//!
//! Semantics are POSIX's: locks belong to an owner (the kernel's lock owner id
//! for record locks, the open file for flock), a new lock replaces the owner's
//! locks in its range, read locks share and write locks exclude. A SETLKW that
//! must wait never holds a transport worker: it waits on a thread of its own and
//! answers from there, so the unlock that frees it can still be served. The
//! waiter gives up with EINTR when the kernel interrupts the request.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::reply::ReplyEmpty;
use crate::types::{Errno, FileLock, RequestContext};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    owner: u64,
    start: u64,
    end: u64,
    typ: i32,
    pid: u32,
}

impl Held {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }
}

#[derive(Default)]
struct Inner {
    by_inode: Mutex<HashMap<u64, Vec<Held>>>,
    changed: Condvar,
}

/// Locks of every inode of one file system. Cheap to clone (shared).
#[derive(Default, Clone)]
pub struct LockTable {
    inner: Arc<Inner>,
}

/// How often a waiting SETLKW re-checks for an interrupt.
const WAIT_SLICE: Duration = Duration::from_millis(50);

fn conflicts(held: &[Held], owner: u64, lock: &FileLock) -> Option<Held> {
    held.iter()
        .find(|h| {
            h.owner != owner
                && h.overlaps(lock.start, lock.end)
                && (h.typ == libc::F_WRLCK || lock.typ == libc::F_WRLCK)
        })
        .copied()
}

/// Removes `owner`'s locks in `[start, end]`, splitting those that straddle it.
fn unlock_range(held: &mut Vec<Held>, owner: u64, start: u64, end: u64) {
    let mut i = 0;
    while i < held.len() {
        let h = held[i];
        if h.owner != owner || !h.overlaps(start, end) {
            i += 1;
            continue;
        }
        held.swap_remove(i);
        if h.start < start {
            held.push(Held { end: start - 1, ..h });
        }
        if h.end > end {
            held.push(Held { start: end + 1, ..h });
        }
    }
}

impl LockTable {
    fn table(&self) -> MutexGuard<'_, HashMap<u64, Vec<Held>>> {
        // A poisoned lock table still holds consistent data (no panics mid-update).
        self.inner.by_inode.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first lock that conflicts with `lock`, or `lock` with type `F_UNLCK`.
    pub fn getlk(&self, ino: u64, owner: u64, lock: &FileLock) -> FileLock {
        let t = self.table();
        match t.get(&ino).and_then(|held| conflicts(held, owner, lock)) {
            Some(h) => FileLock { start: h.start, end: h.end, typ: h.typ, pid: h.pid },
            None => FileLock { typ: libc::F_UNLCK, ..*lock },
        }
    }

    /// Tries once; Err(EAGAIN) on conflict.
    fn try_set(&self, ino: u64, owner: u64, lock: &FileLock) -> Result<(), Errno> {
        if lock.start > lock.end {
            return Err(Errno::EINVAL);
        }
        let mut t = self.table();
        if lock.typ == libc::F_UNLCK {
            if let Some(held) = t.get_mut(&ino) {
                unlock_range(held, owner, lock.start, lock.end);
                if held.is_empty() {
                    t.remove(&ino);
                }
            }
            drop(t);
            self.inner.changed.notify_all();
            return Ok(());
        }
        if lock.typ != libc::F_RDLCK && lock.typ != libc::F_WRLCK {
            return Err(Errno::EINVAL);
        }
        let held = t.entry(ino).or_default();
        if conflicts(held, owner, lock).is_some() {
            return Err(Errno::EAGAIN);
        }
        unlock_range(held, owner, lock.start, lock.end);
        held.push(Held { owner, start: lock.start, end: lock.end, typ: lock.typ, pid: lock.pid });
        drop(t);
        // A write lock turned read lock may let waiters in.
        self.inner.changed.notify_all();
        Ok(())
    }

    /// SETLK / SETLKW. Without `sleep`, a conflict answers EAGAIN. With it, the
    /// request waits on its own thread until the lock is free or interrupted.
    pub fn setlk(
        &self,
        ctx: &RequestContext<'_>,
        ino: u64,
        owner: u64,
        lock: &FileLock,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        match self.try_set(ino, owner, lock) {
            Ok(()) => reply.ok(),
            Err(e) if e == Errno::EAGAIN && sleep => {
                let table = self.clone();
                let token = ctx.interrupt_token();
                let lock = *lock;
                let spawned = std::thread::Builder::new().name("efuse-lockwait".into()).spawn(move || {
                    let mut guard = table.table();
                    loop {
                        drop(guard);
                        match table.try_set(ino, owner, &lock) {
                            Ok(()) => return reply.ok(),
                            Err(e) if e != Errno::EAGAIN => return reply.error(e),
                            Err(_) => {}
                        }
                        if token.is_interrupted() {
                            return reply.error(Errno::EINTR);
                        }
                        guard = table.table();
                        let (g, _) =
                            table.inner.changed.wait_timeout(guard, WAIT_SLICE).unwrap_or_else(|p| p.into_inner());
                        guard = g;
                    }
                });
                if let Err(e) = spawned {
                    tracing::warn!("cannot start a lock waiter: {e}");
                    // The reply moved into the closure that failed to start is
                    // dropped with it, which answers EIO.
                }
            }
            Err(e) => reply.error(e),
        }
    }

    /// Drops every lock `owner` holds on `ino` (close of the owner's last
    /// descriptor: FLUSH for record locks, RELEASE for flock).
    pub fn release_owner(&self, ino: u64, owner: u64) {
        let mut t = self.table();
        if let Some(held) = t.get_mut(&ino) {
            let before = held.len();
            held.retain(|h| h.owner != owner);
            let changed = held.len() != before;
            if held.is_empty() {
                t.remove(&ino);
            }
            drop(t);
            if changed {
                self.inner.changed.notify_all();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lk(start: u64, end: u64, typ: i32) -> FileLock {
        FileLock { start, end, typ, pid: 1 }
    }

    #[test]
    fn read_locks_share_write_locks_exclude() {
        let t = LockTable::default();
        t.try_set(1, 10, &lk(0, 99, libc::F_RDLCK)).unwrap();
        t.try_set(1, 20, &lk(50, 60, libc::F_RDLCK)).unwrap();
        assert_eq!(t.try_set(1, 30, &lk(55, 55, libc::F_WRLCK)), Err(Errno::EAGAIN));
        assert_eq!(t.getlk(1, 30, &lk(55, 55, libc::F_WRLCK)).typ, libc::F_RDLCK);
        // Other inodes are independent; own locks never conflict.
        t.try_set(2, 30, &lk(55, 55, libc::F_WRLCK)).unwrap();
        t.try_set(1, 10, &lk(0, 10, libc::F_WRLCK)).unwrap();
        assert_eq!(t.getlk(1, 30, &lk(100, 200, libc::F_WRLCK)).typ, libc::F_UNLCK);
    }

    #[test]
    fn unlock_splits_ranges() {
        let t = LockTable::default();
        t.try_set(1, 10, &lk(0, 99, libc::F_WRLCK)).unwrap();
        t.try_set(1, 10, &lk(40, 59, libc::F_UNLCK)).unwrap();
        assert_eq!(t.getlk(1, 20, &lk(45, 50, libc::F_WRLCK)).typ, libc::F_UNLCK);
        let c = t.getlk(1, 20, &lk(0, 200, libc::F_WRLCK));
        assert_eq!(c.typ, libc::F_WRLCK);
        assert_eq!(
            t.getlk(1, 20, &lk(60, 60, libc::F_RDLCK)),
            FileLock { start: 60, end: 99, typ: libc::F_WRLCK, pid: 1 }
        );
        t.release_owner(1, 10);
        assert_eq!(t.getlk(1, 20, &lk(0, u64::MAX, libc::F_WRLCK)).typ, libc::F_UNLCK);
    }

    #[test]
    fn bad_ranges_and_types() {
        let t = LockTable::default();
        assert_eq!(t.try_set(1, 1, &lk(10, 5, libc::F_RDLCK)), Err(Errno::EINVAL));
        assert_eq!(t.try_set(1, 1, &lk(0, 5, 99)), Err(Errno::EINVAL));
    }
}

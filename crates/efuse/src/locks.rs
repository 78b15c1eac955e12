//! A lock manager for file systems that implement POSIX record locks and BSD
//! `flock` themselves (GETLK, SETLK, SETLKW).
//!
//! Semantics are Linux's: locks belong to an owner (the kernel's lock owner
//! id for record locks, the open file for flock), a new lock replaces the
//! owner's locks in its range and merges with the owner's adjacent locks of
//! the same type, read locks share and write locks exclude.
//!
//! A SETLKW that must wait holds no thread at all: it joins its inode's queue
//! of waiters, and whoever changes that inode's locks (an unlock, a close, a
//! downgrade) grants the waiters that no longer conflict, in arrival order,
//! and answers them. An INTERRUPT of a waiting request removes it and
//! answers EINTR ([`RequestContext::on_interrupt`]). For record locks a
//! SETLKW that would wait for an owner who (through a chain of waits) waits
//! for it answers EDEADLK instead, as POSIX requires; flock has no deadlock
//! detection, as on Linux.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

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

/// A SETLKW waiting for its lock.
struct Waiter {
    id: u64,
    owner: u64,
    lock: FileLock,
    reply: ReplyEmpty,
}

#[derive(Default)]
struct State {
    held: HashMap<u64, Vec<Held>>,
    waiting: HashMap<u64, VecDeque<Waiter>>,
    next_waiter: u64,
}

struct Inner {
    state: Mutex<State>,
    /// Record locks: detect deadlocks between waiting owners.
    posix: bool,
}

/// Locks of every inode of one file system, of one kind (record locks or
/// flock). Cheap to clone (shared).
#[derive(Clone)]
pub struct LockTable {
    inner: Arc<Inner>,
}

impl Default for LockTable {
    /// A table of POSIX record locks.
    fn default() -> Self {
        LockTable::posix()
    }
}

/// Most waits followed when looking for a deadlock; a longer chain is
/// treated as none (Linux stops after a bounded walk too).
const MAX_DEADLOCK_STEPS: usize = 1024;

fn conflicts<'a>(held: &'a [Held], owner: u64, lock: &'a FileLock) -> impl Iterator<Item = &'a Held> + 'a {
    held.iter().filter(move |h| {
        h.owner != owner && h.overlaps(lock.start, lock.end) && (h.typ == libc::F_WRLCK || lock.typ == libc::F_WRLCK)
    })
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

/// Adds `new` (whose range the owner no longer holds) and merges it with
/// the owner's touching locks of the same type.
fn insert_merged(held: &mut Vec<Held>, mut new: Held) {
    let mut i = 0;
    while i < held.len() {
        let h = held[i];
        let touches = h.end.checked_add(1) == Some(new.start) || new.end.checked_add(1) == Some(h.start);
        if h.owner == new.owner && h.typ == new.typ && touches {
            new.start = new.start.min(h.start);
            new.end = new.end.max(h.end);
            held.swap_remove(i);
            continue;
        }
        i += 1;
    }
    held.push(new);
}

impl State {
    /// Converts `owner`'s flock lock on `ino` as Linux does before it checks
    /// for conflicts: a lock of the same type is kept (Ok(true): nothing to
    /// do), one of the other type dropped (a conversion is not atomic, so two
    /// shared holders upgrading at once do not wait on each other). Returns
    /// Ok(false) when the request must still be applied; `dropped` tells
    /// whether a lock went (waiters may get in).
    fn flock_convert(&mut self, ino: u64, owner: u64, lock: &FileLock, dropped: &mut bool) -> bool {
        let Some(held) = self.held.get_mut(&ino) else { return false };
        if held.iter().any(|h| h.owner == owner && h.typ == lock.typ) {
            return true;
        }
        let before = held.len();
        held.retain(|h| h.owner != owner);
        *dropped = held.len() != before;
        if held.is_empty() {
            self.held.remove(&ino);
        }
        false
    }

    /// Applies `lock` for `owner` if nothing conflicts; Err(EAGAIN) otherwise.
    fn try_set(&mut self, ino: u64, owner: u64, lock: &FileLock) -> Result<(), Errno> {
        if lock.typ == libc::F_UNLCK {
            if let Some(held) = self.held.get_mut(&ino) {
                unlock_range(held, owner, lock.start, lock.end);
                if held.is_empty() {
                    self.held.remove(&ino);
                }
            }
            return Ok(());
        }
        let held = self.held.entry(ino).or_default();
        if conflicts(held, owner, lock).next().is_some() {
            if held.is_empty() {
                self.held.remove(&ino);
            }
            return Err(Errno::EAGAIN);
        }
        unlock_range(held, owner, lock.start, lock.end);
        insert_merged(held, Held { owner, start: lock.start, end: lock.end, typ: lock.typ, pid: lock.pid });
        Ok(())
    }

    /// Owners holding locks on `ino` that conflict with `lock` of `owner`.
    fn blockers(&self, ino: u64, owner: u64, lock: &FileLock) -> Vec<u64> {
        self.held.get(&ino).map(|h| conflicts(h, owner, lock).map(|h| h.owner).collect()).unwrap_or_default()
    }

    /// Whether `owner` waiting for `lock` on `ino` would close a cycle of
    /// owners each waiting for the next.
    fn deadlocks(&self, ino: u64, owner: u64, lock: &FileLock) -> bool {
        let mut todo = self.blockers(ino, owner, lock);
        let mut seen = HashSet::new();
        let mut steps = 0;
        while let Some(blocker) = todo.pop() {
            if blocker == owner {
                return true;
            }
            steps += 1;
            if !seen.insert(blocker) || steps > MAX_DEADLOCK_STEPS {
                continue;
            }
            for (&wino, queue) in &self.waiting {
                for w in queue.iter().filter(|w| w.owner == blocker) {
                    todo.extend(self.blockers(wino, w.owner, &w.lock));
                }
            }
        }
        false
    }

    /// Grants, in arrival order, the waiters of `ino` that no longer conflict;
    /// returns their replies, to be answered outside the lock.
    fn grant_waiters(&mut self, ino: u64) -> Vec<ReplyEmpty> {
        let mut granted = Vec::new();
        let Some(mut queue) = self.waiting.remove(&ino) else { return granted };
        let mut still = VecDeque::with_capacity(queue.len());
        while let Some(w) = queue.pop_front() {
            match self.try_set(ino, w.owner, &w.lock) {
                Ok(()) => granted.push(w.reply),
                Err(_) => still.push_back(w),
            }
        }
        if !still.is_empty() {
            self.waiting.insert(ino, still);
        }
        granted
    }
}

impl LockTable {
    /// A table of POSIX record locks (SETLKW detects deadlocks).
    pub fn posix() -> LockTable {
        LockTable::with_kind(true)
    }

    /// A table of BSD flock locks (whole-file; no deadlock detection).
    pub fn flock() -> LockTable {
        LockTable::with_kind(false)
    }

    fn with_kind(posix: bool) -> LockTable {
        LockTable { inner: Arc::new(Inner { state: Mutex::new(State::default()), posix }) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock table still holds consistent data (no panics mid-update).
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first lock that conflicts with `lock`, or `lock` with type `F_UNLCK`.
    pub fn getlk(&self, ino: u64, owner: u64, lock: &FileLock) -> FileLock {
        let st = self.state();
        match st.held.get(&ino).and_then(|held| conflicts(held, owner, lock).next()) {
            Some(h) => FileLock { start: h.start, end: h.end, typ: h.typ, pid: h.pid },
            None => FileLock { typ: libc::F_UNLCK, ..*lock },
        }
    }

    /// SETLK / SETLKW. Without `sleep`, a conflict answers EAGAIN. With it,
    /// the request waits (holding no thread) until the lock is granted, the
    /// request is interrupted (EINTR), or waiting would deadlock (EDEADLK).
    pub fn setlk(
        &self,
        ctx: &RequestContext<'_>,
        ino: u64,
        owner: u64,
        lock: &FileLock,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        if lock.start > lock.end || !matches!(lock.typ, libc::F_RDLCK | libc::F_WRLCK | libc::F_UNLCK) {
            return reply.error(Errno::EINVAL);
        }
        let mut st = self.state();
        let mut dropped = false;
        if !self.inner.posix && lock.typ != libc::F_UNLCK && st.flock_convert(ino, owner, lock, &mut dropped) {
            drop(st);
            return reply.ok();
        }
        match st.try_set(ino, owner, lock) {
            Ok(()) => {
                // An unlock or a downgrade may let waiters in.
                let granted = st.grant_waiters(ino);
                drop(st);
                reply.ok();
                granted.into_iter().for_each(ReplyEmpty::ok);
            }
            Err(e) if e == Errno::EAGAIN && sleep => {
                if self.inner.posix && st.deadlocks(ino, owner, lock) {
                    drop(st);
                    return reply.error(Errno::EDEADLK);
                }
                // A flock conversion dropped the old lock: others may get in first.
                let granted = if dropped { st.grant_waiters(ino) } else { Vec::new() };
                let id = st.next_waiter;
                st.next_waiter += 1;
                st.waiting.entry(ino).or_default().push_back(Waiter { id, owner, lock: *lock, reply });
                drop(st);
                granted.into_iter().for_each(ReplyEmpty::ok);
                let table = self.clone();
                if let Err(cancel) = ctx.on_interrupt(move || table.cancel(ino, id)) {
                    cancel();
                }
            }
            Err(e) => {
                let granted = if dropped { st.grant_waiters(ino) } else { Vec::new() };
                drop(st);
                reply.error(e);
                granted.into_iter().for_each(ReplyEmpty::ok);
            }
        }
    }

    /// Gives up waiter `id` of `ino` (interrupted): answers EINTR, unless it
    /// was granted meanwhile.
    fn cancel(&self, ino: u64, id: u64) {
        let mut st = self.state();
        let Some(queue) = st.waiting.get_mut(&ino) else { return };
        let Some(pos) = queue.iter().position(|w| w.id == id) else { return };
        let w = queue.remove(pos);
        if queue.is_empty() {
            st.waiting.remove(&ino);
        }
        drop(st);
        if let Some(w) = w {
            w.reply.error(Errno::EINTR);
        }
    }

    /// Drops every lock `owner` holds on `ino` (close of the owner's last
    /// descriptor: FLUSH for record locks, RELEASE for flock), and grants
    /// the waiters that frees.
    pub fn release_owner(&self, ino: u64, owner: u64) {
        let mut st = self.state();
        let Some(held) = st.held.get_mut(&ino) else { return };
        let before = held.len();
        held.retain(|h| h.owner != owner);
        let changed = held.len() != before;
        if held.is_empty() {
            st.held.remove(&ino);
        }
        if !changed {
            return;
        }
        let granted = st.grant_waiters(ino);
        drop(st);
        granted.into_iter().for_each(ReplyEmpty::ok);
    }

    /// Requests waiting in this table now.
    pub fn waiting(&self) -> usize {
        self.state().waiting.values().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::{MemorySink, ReplySink, Responder};
    use crate::session::Interrupts;
    use efuse_abi::Opcode;

    fn lk(start: u64, end: u64, typ: i32) -> FileLock {
        FileLock { start, end, typ, pid: 1 }
    }

    /// Sets a lock directly (tests of the range logic).
    fn set(t: &LockTable, ino: u64, owner: u64, lock: &FileLock) -> Result<(), Errno> {
        t.state().try_set(ino, owner, lock)
    }

    struct Requests {
        interrupts: Arc<Interrupts>,
        mem: Arc<MemorySink>,
        sink: Arc<dyn ReplySink>,
    }

    impl Requests {
        fn new() -> Requests {
            let shared = Arc::new(crate::session::SessionShared::default());
            let mem = Arc::new(MemorySink::for_session(shared.clone()));
            Requests { interrupts: shared.interrupts.clone(), sink: mem.clone(), mem }
        }

        /// Sends SETLK(W) `unique` of `owner`; the reply lands in the sink.
        fn setlk(&self, t: &LockTable, unique: u64, owner: u64, lock: FileLock, sleep: bool) {
            self.interrupts.begin(unique);
            let ctx = RequestContext {
                unique,
                uid: 0,
                gid: 0,
                pid: 1,
                umask: 0,
                kill_suidgid: false,
                interrupts: &self.interrupts,
            };
            let reply = ReplyEmpty::new(Responder::new(unique, Opcode::Setlkw, self.sink.clone()));
            t.setlk(&ctx, 1, owner, &lock, sleep, reply);
        }

        /// The error of request `unique`'s reply, None while unanswered.
        fn answer(&self, unique: u64) -> Option<i32> {
            self.mem.replies.lock().unwrap().iter().find(|r| r.1 == unique).map(|r| r.2)
        }
    }

    #[test]
    fn read_locks_share_write_locks_exclude() {
        let t = LockTable::default();
        set(&t, 1, 10, &lk(0, 99, libc::F_RDLCK)).unwrap();
        set(&t, 1, 20, &lk(50, 60, libc::F_RDLCK)).unwrap();
        assert_eq!(set(&t, 1, 30, &lk(55, 55, libc::F_WRLCK)), Err(Errno::EAGAIN));
        assert_eq!(t.getlk(1, 30, &lk(55, 55, libc::F_WRLCK)).typ, libc::F_RDLCK);
        // Other inodes are independent; own locks never conflict.
        set(&t, 2, 30, &lk(55, 55, libc::F_WRLCK)).unwrap();
        set(&t, 1, 10, &lk(0, 10, libc::F_WRLCK)).unwrap();
        assert_eq!(t.getlk(1, 30, &lk(100, 200, libc::F_WRLCK)).typ, libc::F_UNLCK);
    }

    #[test]
    fn unlock_splits_ranges() {
        let t = LockTable::default();
        set(&t, 1, 10, &lk(0, 99, libc::F_WRLCK)).unwrap();
        set(&t, 1, 10, &lk(40, 59, libc::F_UNLCK)).unwrap();
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
    fn adjacent_locks_merge() {
        let t = LockTable::default();
        set(&t, 1, 10, &lk(0, 9, libc::F_WRLCK)).unwrap();
        set(&t, 1, 10, &lk(10, 19, libc::F_WRLCK)).unwrap();
        set(&t, 1, 10, &lk(30, 39, libc::F_WRLCK)).unwrap();
        assert_eq!(
            t.getlk(1, 20, &lk(5, 5, libc::F_RDLCK)),
            FileLock { start: 0, end: 19, typ: libc::F_WRLCK, pid: 1 }
        );
        set(&t, 1, 10, &lk(20, 29, libc::F_WRLCK)).unwrap();
        assert_eq!(t.getlk(1, 20, &lk(0, 0, libc::F_RDLCK)).end, 39);
        // A different type does not merge.
        set(&t, 1, 10, &lk(40, 49, libc::F_RDLCK)).unwrap();
        assert_eq!(t.getlk(1, 20, &lk(0, 0, libc::F_RDLCK)).end, 39);
    }

    #[test]
    fn bad_ranges_and_types() {
        let r = Requests::new();
        let t = LockTable::default();
        r.setlk(&t, 2, 1, lk(10, 5, libc::F_RDLCK), false);
        r.setlk(&t, 4, 1, lk(0, 5, 99), false);
        assert_eq!((r.answer(2), r.answer(4)), (Some(-libc::EINVAL), Some(-libc::EINVAL)));
    }

    /// A waiter holds no thread; the unlock grants it, in arrival order.
    #[test]
    fn waiters_are_granted_by_the_unlock() {
        let r = Requests::new();
        let t = LockTable::default();
        r.setlk(&t, 2, 10, lk(0, 99, libc::F_WRLCK), false);
        r.setlk(&t, 4, 20, lk(0, 0, libc::F_WRLCK), true);
        r.setlk(&t, 6, 30, lk(50, 50, libc::F_RDLCK), true);
        assert_eq!((r.answer(4), r.answer(6), t.waiting()), (None, None, 2));
        // Unlocking 40..99 frees the read lock's range only.
        r.setlk(&t, 8, 10, lk(40, 99, libc::F_UNLCK), false);
        assert_eq!((r.answer(4), r.answer(6), t.waiting()), (None, Some(0), 1));
        t.release_owner(1, 10);
        assert_eq!((r.answer(4), t.waiting()), (Some(0), 0));
        assert_eq!(t.getlk(1, 99, &lk(0, 0, libc::F_RDLCK)).typ, libc::F_WRLCK);
        assert_eq!(r.interrupts.in_flight(), 0);
    }

    /// An interrupted waiter answers EINTR and leaves the queue.
    #[test]
    fn interrupted_waiter_answers_eintr() {
        let r = Requests::new();
        let t = LockTable::default();
        r.setlk(&t, 2, 10, lk(0, 0, libc::F_WRLCK), false);
        r.setlk(&t, 4, 20, lk(0, 0, libc::F_WRLCK), true);
        assert_eq!(t.waiting(), 1);
        r.interrupts.interrupt(4, 5, &r.sink);
        assert_eq!((r.answer(4), t.waiting()), (Some(-libc::EINTR), 0));
        // The unlock then has nobody to grant.
        t.release_owner(1, 10);
        assert_eq!(r.interrupts.in_flight(), 0);
    }

    /// Two owners each waiting for the other's lock: the second SETLKW
    /// answers EDEADLK (record locks), while flock just waits.
    #[test]
    fn deadlocks_are_refused() {
        let r = Requests::new();
        let t = LockTable::posix();
        r.setlk(&t, 2, 10, lk(0, 0, libc::F_WRLCK), false);
        r.setlk(&t, 4, 20, lk(1, 1, libc::F_WRLCK), false);
        r.setlk(&t, 6, 10, lk(1, 1, libc::F_WRLCK), true);
        assert_eq!(r.answer(6), None);
        r.setlk(&t, 8, 20, lk(0, 0, libc::F_WRLCK), true);
        assert_eq!(r.answer(8), Some(-libc::EDEADLK));
        // A three-owner cycle too.
        r.setlk(&t, 10, 30, lk(2, 2, libc::F_WRLCK), false);
        r.setlk(&t, 12, 20, lk(2, 2, libc::F_WRLCK), true);
        assert_eq!(r.answer(12), None);
        r.setlk(&t, 14, 30, lk(0, 0, libc::F_WRLCK), true);
        assert_eq!(r.answer(14), Some(-libc::EDEADLK));

        let f = LockTable::flock();
        r.setlk(&f, 20, 10, lk(0, u64::MAX, libc::F_WRLCK), false);
        r.setlk(&f, 22, 20, lk(0, u64::MAX, libc::F_WRLCK), true);
        assert_eq!(r.answer(22), None);
        assert_eq!(f.waiting(), 1);
    }

    /// Two shared flock holders upgrading at once: as on Linux, a conversion
    /// first drops the old lock, so one gets the exclusive lock and the other
    /// waits for it (no deadlock).
    #[test]
    fn flock_upgrades_do_not_deadlock() {
        let r = Requests::new();
        let f = LockTable::flock();
        let whole = |typ| lk(0, u64::MAX, typ);
        r.setlk(&f, 2, 10, whole(libc::F_RDLCK), false);
        r.setlk(&f, 4, 20, whole(libc::F_RDLCK), false);
        r.setlk(&f, 6, 10, whole(libc::F_WRLCK), true);
        assert_eq!(r.answer(6), None, "10 waits for 20's shared lock");
        r.setlk(&f, 8, 20, whole(libc::F_WRLCK), true);
        // 10's conversion dropped its shared lock and 20's drops its own:
        // nothing is held any more, so 20 gets the exclusive lock at once
        // (as on Linux, where the woken waiter retries later) and 10 waits.
        assert_eq!(r.answer(8), Some(0));
        assert_eq!(r.answer(6), None);
        // Asking again for the lock one holds changes nothing.
        r.setlk(&f, 12, 20, whole(libc::F_WRLCK), false);
        assert_eq!(r.answer(12), Some(0));
        r.setlk(&f, 16, 20, whole(libc::F_UNLCK), false);
        assert_eq!(r.answer(6), Some(0));
        // Without sleep, a conflict answers at once.
        r.setlk(&f, 14, 30, whole(libc::F_RDLCK), false);
        assert_eq!(r.answer(14), Some(-libc::EAGAIN));
    }
}

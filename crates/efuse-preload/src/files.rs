//! Which descriptors the library serves, and their open files.
//!
//! The descriptor table is a fixed lock-free array (descriptor -> open-file
//! index + 1; 0 = not ours), private to the process like the kernel's: one
//! atomic load tells an interposed call whether a descriptor is ours, so
//! the calls on every other descriptor cost next to nothing.
//!
//! The open files live in a MAP_SHARED anonymous mapping, mapped once at
//! first use and inherited by fork: a parent and its child share offsets
//! and reference counts exactly as they share a kernel open file
//! description. Each entry has a lock for its offset (the kernel
//! serializes f_pos of regular files) that records its owner's thread id,
//! so a signal handler that interrupts its own thread inside a call does
//! not wait for itself.

use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};

/// Descriptors at or above this go to the kernel.
pub const MAX_FDS: usize = 65536;
/// Open files the library serves at a time (beyond: opens go to the kernel).
pub const MAX_FILES: usize = 4096;

static FDS: [AtomicU32; MAX_FDS] = [const { AtomicU32::new(0) }; MAX_FDS];
/// This process's descriptors of each open file (private: a forked child
/// starts with its parent's counts, as with its descriptors).
static MINE: [AtomicU32; MAX_FILES] = [const { AtomicU32::new(0) }; MAX_FILES];

/// One open file served by the bypass (shared with forked children).
#[repr(C, align(64))]
pub struct OpenFile {
    /// Descriptors (in all processes) that refer to it; 0 = free entry.
    pub refs: AtomicU32,
    /// Thread id of the holder of the offset lock, 0 when free.
    pub lock: AtomicU32,
    /// Open flags (O_ACCMODE, O_NONBLOCK ...).
    pub flags: AtomicU32,
    /// Index of the mount in `mounts::Mounts`.
    pub mount: AtomicU32,
    pub nodeid: AtomicU64,
    /// The daemon's handle.
    pub fh: AtomicU64,
    pub offset: AtomicU64,
    /// The flags it was opened with (`flags` changes with F_SETFL).
    pub open_flags: AtomicU32,
    /// The node's metadata-table entry and its sequence number when the
    /// daemon checked the open (seq 0: not known).
    pub entry: AtomicU32,
    pub seq: AtomicU32,
    /// The kept handle it uses (see `kept`), 0 none.
    pub kept: AtomicU64,
    /// Threads waiting for the offset lock (an unlock wakes only if any).
    pub waiters: AtomicU32,
    /// 1: the file system let the data be cached across opens
    /// (FOPEN_KEEP_CACHE in the OPEN reply), as the kernel's page cache.
    pub keep_cache: AtomicU32,
    /// 1: a direct read (see `direct`): no daemon handle, reads from the
    /// process's backing descriptor.
    pub direct: AtomicU32,
}

static TABLE: AtomicPtr<OpenFile> = AtomicPtr::new(std::ptr::null_mut());

fn table() -> Option<&'static [OpenFile]> {
    let mut p = TABLE.load(Ordering::Acquire);
    if p.is_null() {
        let len = MAX_FILES * std::mem::size_of::<OpenFile>();
        // SAFETY: a fresh anonymous shared mapping; zeroed memory is a valid
        // table of free entries (all atomics).
        let m = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if m == libc::MAP_FAILED {
            return None;
        }
        match TABLE.compare_exchange(std::ptr::null_mut(), m.cast(), Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => p = m.cast(),
            Err(cur) => {
                // SAFETY: our own mapping, never published.
                unsafe { libc::munmap(m, len) };
                p = cur;
            }
        }
    }
    // SAFETY: the mapping holds MAX_FILES entries and is never unmapped.
    Some(unsafe { std::slice::from_raw_parts(p, MAX_FILES) })
}

/// The open file of entry `idx` (valid index from [`get`]).
pub fn file(idx: u32) -> &'static OpenFile {
    let t = table().expect("the table exists once an index was handed out");
    &t[idx as usize]
}

/// The index of open file `f` (an entry of the table).
pub fn index_of(f: &OpenFile) -> u32 {
    let base = TABLE.load(Ordering::Acquire) as usize;
    ((f as *const OpenFile as usize - base) / std::mem::size_of::<OpenFile>()) as u32
}

/// The open-file index of `fd` if the library serves it. One load.
#[inline]
pub fn get(fd: i32) -> Option<u32> {
    let v = FDS.get(usize::try_from(fd).ok()?)?.load(Ordering::Acquire);
    (v != 0).then(|| v - 1)
}

/// Takes a free entry for a new open file (refs 1). None: table full.
pub fn alloc(mount: u32, nodeid: u64, fh: u64, flags: u32) -> Option<u32> {
    let t = table()?;
    for (i, f) in t.iter().enumerate() {
        if f.refs.load(Ordering::Relaxed) == 0
            && f.refs.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed).is_ok()
        {
            f.lock.store(0, Ordering::Relaxed);
            f.waiters.store(0, Ordering::Relaxed);
            f.flags.store(flags, Ordering::Relaxed);
            f.open_flags.store(flags, Ordering::Relaxed);
            f.entry.store(0, Ordering::Relaxed);
            f.seq.store(0, Ordering::Relaxed);
            f.kept.store(0, Ordering::Relaxed);
            f.keep_cache.store(0, Ordering::Relaxed);
            f.direct.store(0, Ordering::Relaxed);
            f.mount.store(mount, Ordering::Relaxed);
            f.nodeid.store(nodeid, Ordering::Relaxed);
            f.fh.store(fh, Ordering::Relaxed);
            f.offset.store(0, Ordering::Release);
            return Some(i as u32);
        }
    }
    None
}

/// Records that `fd` refers to open file `idx` (whose reference the caller
/// already holds). False if `fd` is too large to track.
pub fn bind(fd: i32, idx: u32) -> bool {
    match usize::try_from(fd).ok().and_then(|f| FDS.get(f)) {
        Some(slot) => {
            let old = slot.swap(idx + 1, Ordering::AcqRel);
            if let Some(m) = old.checked_sub(1).and_then(|o| MINE.get(o as usize)) {
                let _ = m.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1));
            }
            if let Some(m) = MINE.get(idx as usize) {
                m.fetch_add(1, Ordering::AcqRel);
            }
            true
        }
        None => false,
    }
}

/// How many of this process's descriptors refer to open file `idx`.
pub fn mine(idx: u32) -> u32 {
    MINE.get(idx as usize).map_or(0, |m| m.load(Ordering::Acquire))
}

/// Forgets `fd`; returns the index it referred to (its reference is now
/// the caller's to drop).
pub fn unbind(fd: i32) -> Option<u32> {
    let slot = FDS.get(usize::try_from(fd).ok()?)?;
    let v = slot.swap(0, Ordering::AcqRel);
    let idx = v.checked_sub(1)?;
    if let Some(m) = MINE.get(idx as usize) {
        let _ = m.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1));
    }
    Some(idx)
}

/// Adds a reference to open file `idx` (dup, fork).
pub fn add_ref(idx: u32) {
    file(idx).refs.fetch_add(1, Ordering::AcqRel);
}

/// What the last reference to an open file leaves to release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    pub mount: u32,
    pub nodeid: u64,
    pub fh: u64,
    pub flags: u32,
    pub open_flags: u32,
    pub entry: u32,
    pub seq: u32,
    pub kept: u64,
    pub keep_cache: bool,
    pub direct: bool,
}

/// The fields of open file `f` that outlive its last reference.
pub fn released_of(f: &OpenFile) -> Released {
    Released {
        mount: f.mount.load(Ordering::Relaxed),
        nodeid: f.nodeid.load(Ordering::Relaxed),
        fh: f.fh.load(Ordering::Relaxed),
        flags: f.flags.load(Ordering::Relaxed),
        open_flags: f.open_flags.load(Ordering::Relaxed),
        entry: f.entry.load(Ordering::Relaxed),
        seq: f.seq.load(Ordering::Relaxed),
        kept: f.kept.load(Ordering::Acquire),
        keep_cache: f.keep_cache.load(Ordering::Relaxed) != 0,
        direct: f.direct.load(Ordering::Relaxed) != 0,
    }
}

/// Drops a reference; Some when it was the last one (the caller releases
/// the handle and forgets the node). The fields are read before the drop:
/// once refs is 0 the entry may be reused at once.
pub fn drop_ref(idx: u32) -> Option<Released> {
    let f = file(idx);
    let r = released_of(f);
    (f.refs.fetch_sub(1, Ordering::AcqRel) == 1).then_some(r)
}

/// Every descriptor the library serves, with its index (fork, exec,
/// credential changes).
pub fn each(mut f: impl FnMut(i32, u32)) {
    if TABLE.load(Ordering::Acquire).is_null() {
        return;
    }
    for (fd, slot) in FDS.iter().enumerate() {
        let v = slot.load(Ordering::Acquire);
        if v != 0 {
            f(fd as i32, v - 1);
        }
    }
}

/// The offset lock of an open file, held.
pub struct OffsetLock<'a> {
    f: &'a OpenFile,
    /// False when this thread already held it (a signal handler re-entered):
    /// the outer holder unlocks.
    owned: bool,
}

impl Drop for OffsetLock<'_> {
    fn drop(&mut self) {
        if self.owned {
            // SeqCst against the waiter's count-then-wait: either this sees
            // the waiter, or the waiter's futex_wait sees the lock changed.
            self.f.lock.store(0, Ordering::SeqCst);
            if self.f.waiters.load(Ordering::SeqCst) != 0 {
                efuse_bypass::futex_wake(&self.f.lock, i32::MAX);
            }
        }
    }
}

impl OpenFile {
    /// Takes the offset lock. A holder that died (a process killed in the
    /// middle of a call) is detected and its lock taken over.
    pub fn lock_offset(&self) -> OffsetLock<'_> {
        let me = crate::guard::tid();
        let mut spins = 0u32;
        loop {
            let cur = self.lock.load(Ordering::Acquire);
            if cur == me {
                return OffsetLock { f: self, owned: false };
            }
            if cur == 0 {
                if self.lock.compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                    return OffsetLock { f: self, owned: true };
                }
                continue;
            }
            spins += 1;
            if spins < 200 {
                std::hint::spin_loop();
                continue;
            }
            // SAFETY: kill with signal 0 only checks that the thread exists.
            if unsafe { libc::kill(cur as i32, 0) } != 0 && crate::guard::errno() == libc::ESRCH {
                let _ = self.lock.compare_exchange(cur, 0, Ordering::AcqRel, Ordering::Relaxed);
                continue;
            }
            self.waiters.fetch_add(1, Ordering::SeqCst);
            efuse_bypass::futex_wait(&self.lock, cur, Some(std::time::Duration::from_millis(50)));
            self.waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dup_and_close_share_one_open_file_until_the_last_reference() {
        let idx = alloc(3, 77, 5, libc::O_RDWR as u32).expect("entry");
        assert!(bind(1000, idx));
        add_ref(idx);
        assert!(bind(1001, idx));
        assert_eq!(get(1000), Some(idx));
        assert_eq!(get(1001), Some(idx));
        assert_eq!(get(1002), None);
        assert_eq!(get(-1), None);
        assert_eq!(get(MAX_FDS as i32), None);
        assert!(!bind(MAX_FDS as i32, idx));
        file(idx).offset.store(42, Ordering::Relaxed);
        assert_eq!(unbind(1000), Some(idx));
        assert_eq!(drop_ref(idx), None);
        assert_eq!(get(1000), None);
        assert_eq!(file(idx).offset.load(Ordering::Relaxed), 42);
        assert_eq!(unbind(1001), Some(idx));
        let r = drop_ref(idx).expect("last reference");
        let rw = libc::O_RDWR as u32;
        let want = Released {
            mount: 3,
            nodeid: 77,
            fh: 5,
            flags: rw,
            open_flags: rw,
            entry: 0,
            seq: 0,
            kept: 0,
            keep_cache: false,
            direct: false,
        };
        assert_eq!(r, want);
        assert_eq!(unbind(1001), None);
    }

    #[test]
    fn the_offset_lock_is_reentrant_for_its_thread_and_exclusive_otherwise() {
        let idx = alloc(0, 1, 1, 0).expect("entry");
        let f = file(idx);
        let outer = f.lock_offset();
        {
            let inner = f.lock_offset();
            assert!(!inner.owned);
        }
        assert_ne!(f.lock.load(Ordering::Relaxed), 0, "the inner guard does not unlock");
        let other = std::thread::spawn(move || {
            let _l = file(idx).lock_offset();
            file(idx).offset.fetch_add(1, Ordering::Relaxed);
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(f.offset.load(Ordering::Relaxed), 0, "the other thread waits");
        drop(outer);
        other.join().expect("thread");
        assert_eq!(f.offset.load(Ordering::Relaxed), 1);
        assert!(drop_ref(idx).is_some());
    }

    #[test]
    fn a_forked_child_shares_offsets() {
        let idx = alloc(0, 1, 1, 0).expect("entry");
        // SAFETY: the child only touches the shared table and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            file(idx).offset.store(4096, Ordering::Release);
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(file(idx).offset.load(Ordering::Acquire), 4096);
        assert!(drop_ref(idx).is_some());
    }
}

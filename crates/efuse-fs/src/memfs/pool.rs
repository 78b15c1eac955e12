//! The block pool: how many data blocks memfs may still hand out.
//!
//! Blocks themselves come from the allocator; the pool only accounts for
//! them, so that a file system of `capacity` bytes never holds more than
//! `capacity` bytes of file data and a write that cannot be stored fails with
//! ENOSPC instead of exhausting the daemon's memory.
//!
//! Freed blocks go back to the allocator, which keeps them (glibc keeps
//! small chunks in its arenas, and can only shrink a heap from its top), so
//! a memfs that held 300 MB of since-deleted files would keep 300 MB of
//! resident memory forever. A helper thread asks the allocator to return
//! its free pages to the system (`malloc_trim`), off the request path: at
//! once when [`TRIM_EVERY`] bytes were given back, and otherwise once a
//! second while at least [`TRIM_LEAST`] were.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Bytes given back that call for a trim at once.
const TRIM_EVERY: u64 = 32 << 20;
/// Bytes given back that call for a trim within a second.
const TRIM_LEAST: u64 = 1 << 20;

#[derive(Debug)]
pub(crate) struct BlockPool {
    block_size: u32,
    total: u64,
    free: AtomicU64,
    /// Blocks given back since the last trim.
    given: Arc<AtomicU64>,
    /// Wakes the trimming thread, started on first need.
    trimmer: OnceLock<Mutex<Sender<()>>>,
}

impl BlockPool {
    pub(crate) fn new(capacity: u64, block_size: u32) -> BlockPool {
        let total = capacity / u64::from(block_size);
        BlockPool {
            block_size,
            total,
            free: AtomicU64::new(total),
            given: Arc::new(AtomicU64::new(0)),
            trimmer: OnceLock::new(),
        }
    }

    pub(crate) fn block_size(&self) -> u32 {
        self.block_size
    }

    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    pub(crate) fn free(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }

    /// Takes up to `want` blocks; returns how many were taken (maybe fewer, maybe 0).
    pub(crate) fn take_up_to(&self, want: u64) -> u64 {
        let mut cur = self.free.load(Ordering::Relaxed);
        loop {
            let got = cur.min(want);
            if got == 0 {
                return 0;
            }
            match self.free.compare_exchange_weak(cur, cur - got, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return got,
                Err(now) => cur = now,
            }
        }
    }

    /// Takes exactly `want` blocks or none.
    pub(crate) fn take_exact(&self, want: u64) -> bool {
        if want == 0 {
            return true;
        }
        let mut cur = self.free.load(Ordering::Relaxed);
        loop {
            if cur < want {
                return false;
            }
            match self.free.compare_exchange_weak(cur, cur - want, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Returns blocks to the pool (their memory is freed by the caller,
    /// right after).
    pub(crate) fn give(&self, n: u64) {
        if n == 0 {
            return;
        }
        self.free.fetch_add(n, Ordering::AcqRel);
        let given = self.given.fetch_add(n, Ordering::AcqRel) + n;
        let tx = self.trimmer.get_or_init(|| {
            let (tx, rx) = mpsc::channel();
            let (given, least) = (self.given.clone(), (TRIM_LEAST / u64::from(self.block_size)).max(1));
            let spawned =
                std::thread::Builder::new().name("memfs-trim".into()).spawn(move || trim_loop(rx, &given, least));
            if let Err(e) = spawned {
                tracing::debug!("memfs: no trimming thread ({e}); freed memory stays with the allocator");
            }
            Mutex::new(tx)
        });
        if given >= (TRIM_EVERY / u64::from(self.block_size)).max(1) {
            let _ = tx.lock().unwrap_or_else(|p| p.into_inner()).send(());
        }
    }
}

/// Trims when asked (once per burst: a file removal gives many blocks back,
/// and the caller frees them just after) and each second while at least
/// `least` blocks were given back; ends with the pool.
fn trim_loop(rx: Receiver<()>, given: &AtomicU64, least: u64) {
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(()) => {
                std::thread::sleep(Duration::from_millis(100));
                while rx.try_recv().is_ok() {}
            }
            Err(RecvTimeoutError::Timeout) if given.load(Ordering::Acquire) >= least => {}
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        }
        given.store(0, Ordering::Release);
        release_free_memory();
    }
}

#[cfg(target_env = "gnu")]
fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe { libc::malloc_trim(0) };
}

#[cfg(not(target_env = "gnu"))]
fn release_free_memory() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounting() {
        let p = BlockPool::new(10 * 4096 + 100, 4096);
        assert_eq!(p.total(), 10);
        assert_eq!(p.take_up_to(4), 4);
        assert!(!p.take_exact(7));
        assert!(p.take_exact(6));
        assert_eq!(p.take_up_to(1), 0);
        p.give(3);
        assert_eq!(p.take_up_to(5), 3);
        p.give(10);
        assert_eq!(p.free(), 10);
    }

    #[test]
    fn giving_back_starts_the_trimmer_which_trims_and_resets() {
        let p = BlockPool::new(1 << 30, 4096);
        let blocks = TRIM_EVERY / 4096;
        assert_eq!(p.take_up_to(2 * blocks), 2 * blocks);
        assert!(p.trimmer.get().is_none(), "nothing given back: no thread");
        p.give(blocks);
        assert!(p.trimmer.get().is_some());
        // The trim asked for runs within a moment and resets the count.
        let start = std::time::Instant::now();
        while p.given.load(Ordering::Acquire) != 0 && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(p.given.load(Ordering::Acquire), 0);
        // A trickle is trimmed within a second or so.
        p.give(TRIM_LEAST / 4096);
        let start = std::time::Instant::now();
        while p.given.load(Ordering::Acquire) != 0 && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(p.given.load(Ordering::Acquire), 0);
        assert_eq!(p.free(), p.total() - blocks + TRIM_LEAST / 4096);
    }
}

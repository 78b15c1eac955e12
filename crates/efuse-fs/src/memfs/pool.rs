//! The block pool: how many data blocks memfs may still hand out.
//!
//! Blocks themselves come from the allocator; the pool only accounts for
//! them, so that a file system of `capacity` bytes never holds more than
//! `capacity` bytes of file data and a write that cannot be stored fails with
//! ENOSPC instead of exhausting the daemon's memory.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
pub(crate) struct BlockPool {
    block_size: u32,
    total: u64,
    free: AtomicU64,
}

impl BlockPool {
    pub(crate) fn new(capacity: u64, block_size: u32) -> BlockPool {
        let total = capacity / u64::from(block_size);
        BlockPool { block_size, total, free: AtomicU64::new(total) }
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

    /// Returns blocks to the pool.
    pub(crate) fn give(&self, n: u64) {
        if n > 0 {
            self.free.fetch_add(n, Ordering::AcqRel);
        }
    }
}

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
}

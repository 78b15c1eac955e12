//! The contents of a regular file: a sparse map of fixed-size blocks.
//!
//! A block exists only where data was written or space was allocated, so
//! holes cost nothing and SEEK_DATA / SEEK_HOLE read the map directly. Every
//! block is taken from the [`BlockPool`] before it is allocated and given
//! back when it is freed (on truncate, hole punching, or when the file goes).
//!
//! Invariant: bytes at or past `size` inside an allocated block are zero, so
//! growing a file never uncovers old data.

use std::collections::BTreeMap;
use std::sync::Arc;

use efuse::Errno;

use super::pool::BlockPool;

/// Largest file size: what `off_t` can address.
pub(crate) const MAX_FILE_SIZE: u64 = i64::MAX as u64;

pub(crate) struct FileData {
    size: u64,
    blocks: BTreeMap<u64, Box<[u8]>>,
    pool: Arc<BlockPool>,
}

impl Drop for FileData {
    fn drop(&mut self) {
        self.pool.give(self.blocks.len() as u64);
    }
}

impl FileData {
    pub(crate) fn new(pool: Arc<BlockPool>) -> FileData {
        FileData { size: 0, blocks: BTreeMap::new(), pool }
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn allocated_blocks(&self) -> u64 {
        self.blocks.len() as u64
    }

    pub(crate) fn block_size(&self) -> u32 {
        self.pool.block_size()
    }

    /// Grows the size to `size` if smaller (a hole).
    pub(crate) fn extend_to(&mut self, size: u64) -> Result<(), Errno> {
        if size > self.size {
            self.truncate(size)?;
        }
        Ok(())
    }

    fn bs(&self) -> u64 {
        u64::from(self.pool.block_size())
    }

    fn new_block(&self) -> Box<[u8]> {
        vec![0u8; self.bs() as usize].into_boxed_slice()
    }

    /// Appends to `out` the bytes of `[offset, offset + len)` that lie before
    /// EOF; holes read as zeros.
    pub(crate) fn read_into(&self, offset: u64, len: u64, out: &mut Vec<u8>) {
        if offset >= self.size {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        let bs = self.bs();
        let mut pos = offset;
        while pos < end {
            let idx = pos / bs;
            let within = (pos % bs) as usize;
            let n = ((bs - pos % bs).min(end - pos)) as usize;
            match self.blocks.get(&idx) {
                Some(b) => out.extend_from_slice(&b[within..within + n]),
                None => out.resize(out.len() + n, 0),
            }
            pos += n as u64;
        }
    }

    /// Writes `data` at `offset`. Blocks are reserved from the pool before
    /// anything is copied; when the pool runs dry the write stops at the first
    /// block that cannot be stored (a short write), and fails with ENOSPC if
    /// not even the first byte fits.
    pub(crate) fn write(&mut self, offset: u64, data: &[u8]) -> Result<usize, Errno> {
        if data.is_empty() {
            return Ok(0);
        }
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
        if end > MAX_FILE_SIZE {
            return Err(Errno::EFBIG);
        }
        let bs = self.bs();
        let (first, last) = (offset / bs, (end - 1) / bs);
        let missing = (first..=last).filter(|i| !self.blocks.contains_key(i)).count() as u64;
        let got = self.pool.take_up_to(missing);
        let mut end = end;
        if got < missing {
            // The (got+1)-th missing block is where the pool ran dry.
            let dry = (first..=last).filter(|i| !self.blocks.contains_key(i)).nth(got as usize);
            if let Some(idx) = dry {
                end = end.min(idx * bs);
            }
            if end <= offset {
                self.pool.give(got);
                return Err(Errno::ENOSPC);
            }
        }
        let mut pos = offset;
        while pos < end {
            let idx = pos / bs;
            let within = (pos % bs) as usize;
            let n = ((bs - pos % bs).min(end - pos)) as usize;
            let src = &data[(pos - offset) as usize..(pos - offset) as usize + n];
            if !self.blocks.contains_key(&idx) {
                let b = self.new_block();
                self.blocks.insert(idx, b);
            }
            if let Some(b) = self.blocks.get_mut(&idx) {
                b[within..within + n].copy_from_slice(src);
            }
            pos += n as u64;
        }
        self.size = self.size.max(end);
        Ok((end - offset) as usize)
    }

    /// Sets the size: shrinking frees whole blocks past EOF and zeroes the
    /// tail of the last one; growing leaves a hole.
    pub(crate) fn truncate(&mut self, new_size: u64) -> Result<(), Errno> {
        if new_size > MAX_FILE_SIZE {
            return Err(Errno::EFBIG);
        }
        if new_size < self.size {
            let bs = self.bs();
            let keep = new_size.div_ceil(bs);
            let dropped = self.blocks.split_off(&keep);
            self.pool.give(dropped.len() as u64);
            let tail = (new_size % bs) as usize;
            if tail != 0 {
                if let Some(b) = self.blocks.get_mut(&(new_size / bs)) {
                    b[tail..].fill(0);
                }
            }
        }
        self.size = new_size;
        Ok(())
    }

    /// fallocate mode 0 (and KEEP_SIZE): allocates every block of the range,
    /// all or nothing.
    pub(crate) fn allocate(&mut self, offset: u64, len: u64, keep_size: bool) -> Result<(), Errno> {
        if len == 0 {
            return Err(Errno::EINVAL);
        }
        let end = offset.checked_add(len).ok_or(Errno::EFBIG)?;
        if end > MAX_FILE_SIZE {
            return Err(Errno::EFBIG);
        }
        let bs = self.bs();
        let (first, last) = (offset / bs, (end - 1) / bs);
        // Count before walking the range: it may span far more blocks than exist.
        let present = self.blocks.range(first..=last).count() as u64;
        let missing = (last - first + 1) - present;
        if missing > self.pool.free() || !self.pool.take_exact(missing) {
            return Err(Errno::ENOSPC);
        }
        for idx in first..=last {
            if !self.blocks.contains_key(&idx) {
                let b = self.new_block();
                self.blocks.insert(idx, b);
            }
        }
        if !keep_size {
            self.size = self.size.max(end);
        }
        Ok(())
    }

    /// FALLOC_FL_PUNCH_HOLE: zeroes the range, freeing the blocks it covers
    /// whole. The size does not change.
    pub(crate) fn punch_hole(&mut self, offset: u64, len: u64) -> Result<(), Errno> {
        if len == 0 {
            return Err(Errno::EINVAL);
        }
        let end = offset.saturating_add(len);
        let bs = self.bs();
        let whole_first = offset.div_ceil(bs);
        let whole_end = end / bs; // exclusive
        let mut freed = 0u64;
        if whole_first < whole_end {
            let doomed: Vec<u64> = self.blocks.range(whole_first..whole_end).map(|(&i, _)| i).collect();
            for i in doomed {
                self.blocks.remove(&i);
                freed += 1;
            }
        }
        self.pool.give(freed);
        // The partial blocks at either edge are zeroed in place.
        for idx in [offset / bs, end.saturating_sub(1) / bs] {
            if let Some(b) = self.blocks.get_mut(&idx) {
                let bstart = idx * bs;
                let from = offset.max(bstart) - bstart;
                let to = end.min(bstart + bs) - bstart;
                if from < to {
                    b[from as usize..to as usize].fill(0);
                }
            }
        }
        Ok(())
    }

    /// SEEK_DATA: the first offset at or after `offset` inside an allocated block.
    pub(crate) fn seek_data(&self, offset: u64) -> Result<u64, Errno> {
        if offset >= self.size {
            return Err(Errno::ENXIO);
        }
        let bs = self.bs();
        match self.blocks.range(offset / bs..).next() {
            Some((&idx, _)) => {
                let pos = offset.max(idx * bs);
                if pos < self.size {
                    Ok(pos)
                } else {
                    Err(Errno::ENXIO)
                }
            }
            None => Err(Errno::ENXIO),
        }
    }

    /// SEEK_HOLE: the first offset at or after `offset` in a hole; EOF counts
    /// as a hole.
    pub(crate) fn seek_hole(&self, offset: u64) -> Result<u64, Errno> {
        if offset >= self.size {
            return Err(Errno::ENXIO);
        }
        let bs = self.bs();
        let mut idx = offset / bs;
        for (&i, _) in self.blocks.range(idx..) {
            if i != idx {
                break;
            }
            idx += 1;
        }
        Ok(offset.max(idx.saturating_mul(bs)).min(self.size))
    }

    /// Whether `[offset, offset + len)` has no allocated block.
    pub(crate) fn is_hole(&self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let bs = self.bs();
        let last = (offset.saturating_add(len) - 1) / bs;
        self.blocks.range(offset / bs..=last).next().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(blocks: u64) -> (FileData, Arc<BlockPool>) {
        let pool = Arc::new(BlockPool::new(blocks * 4096, 4096));
        (FileData::new(pool.clone()), pool)
    }

    fn read(f: &FileData, off: u64, len: u64) -> Vec<u8> {
        let mut v = Vec::new();
        f.read_into(off, len, &mut v);
        v
    }

    #[test]
    fn sparse_write_and_read() {
        let (mut f, pool) = file(10);
        assert_eq!(f.write(3 * 4096 + 10, b"hello").unwrap(), 5);
        assert_eq!(f.size(), 3 * 4096 + 15);
        assert_eq!(f.allocated_blocks(), 1);
        assert_eq!(pool.free(), 9);
        let all = read(&f, 0, 1 << 20);
        assert_eq!(all.len() as u64, f.size());
        assert!(all[..3 * 4096 + 10].iter().all(|&b| b == 0));
        assert_eq!(&all[3 * 4096 + 10..], b"hello");
        // Straddling a block boundary takes two blocks.
        f.write(4096 - 2, b"abcd").unwrap();
        assert_eq!(f.allocated_blocks(), 3);
        assert_eq!(read(&f, 4094, 4), b"abcd");
        assert!(read(&f, f.size(), 10).is_empty());
        drop(f);
        assert_eq!(pool.free(), 10);
    }

    #[test]
    fn enospc_short_write() {
        let (mut f, pool) = file(2);
        let data = vec![7u8; 3 * 4096];
        // Offset 100: the first two blocks fit, the third does not.
        assert_eq!(f.write(100, &data).unwrap(), 2 * 4096 - 100);
        assert_eq!(f.size(), 2 * 4096);
        assert_eq!(pool.free(), 0);
        assert_eq!(f.write(2 * 4096, b"x"), Err(Errno::ENOSPC));
        assert_eq!(f.size(), 2 * 4096);
        // Rewriting allocated blocks needs no space.
        assert_eq!(f.write(0, &data[..4096]).unwrap(), 4096);
        assert_eq!(f.allocate(0, 3 * 4096, false), Err(Errno::ENOSPC));
        f.truncate(4096).unwrap();
        assert_eq!(pool.free(), 1);
        assert_eq!(f.write(5 * 4096, b"y").unwrap(), 1);
        assert_eq!(pool.free(), 0);
    }

    #[test]
    fn truncate_zero_fills() {
        let (mut f, pool) = file(10);
        f.write(0, &[1u8; 8192]).unwrap();
        f.truncate(100).unwrap();
        assert_eq!(f.allocated_blocks(), 1);
        assert_eq!(pool.free(), 9);
        f.truncate(8192).unwrap();
        let v = read(&f, 0, 8192);
        assert!(v[..100].iter().all(|&b| b == 1));
        assert!(v[100..].iter().all(|&b| b == 0));
        assert_eq!(f.allocated_blocks(), 1);
        assert_eq!(f.truncate(MAX_FILE_SIZE + 1), Err(Errno::EFBIG));
        assert_eq!(f.allocate(0, MAX_FILE_SIZE, false), Err(Errno::ENOSPC));
        assert_eq!(f.write(MAX_FILE_SIZE, b"x"), Err(Errno::EFBIG));
    }

    #[test]
    fn seek_data_and_hole() {
        let (mut f, _pool) = file(10);
        f.write(4096, &[1u8; 4096]).unwrap(); // block 1
        f.write(3 * 4096, &[1u8; 10]).unwrap(); // block 3
        f.truncate(5 * 4096).unwrap();
        assert_eq!(f.seek_data(0), Ok(4096));
        assert_eq!(f.seek_data(5000), Ok(5000));
        assert_eq!(f.seek_data(8192), Ok(3 * 4096));
        assert_eq!(f.seek_data(4 * 4096), Err(Errno::ENXIO));
        assert_eq!(f.seek_hole(0), Ok(0));
        assert_eq!(f.seek_hole(4096), Ok(8192));
        assert_eq!(f.seek_hole(3 * 4096 + 5), Ok(4 * 4096));
        assert_eq!(f.seek_hole(5 * 4096), Err(Errno::ENXIO));
        assert_eq!(f.seek_data(5 * 4096 + 1), Err(Errno::ENXIO));
        // EOF inside the last data block is the implicit hole.
        f.truncate(3 * 4096 + 10).unwrap();
        assert_eq!(f.seek_hole(3 * 4096), Ok(3 * 4096 + 10));
    }

    #[test]
    fn fallocate_and_punch() {
        let (mut f, pool) = file(10);
        f.allocate(0, 3 * 4096, true).unwrap();
        assert_eq!(f.size(), 0);
        assert_eq!(pool.free(), 7);
        f.allocate(0, 100, false).unwrap();
        assert_eq!(f.size(), 100);
        assert_eq!(pool.free(), 7);
        f.write(0, &[9u8; 3 * 4096]).unwrap();
        f.punch_hole(100, 2 * 4096).unwrap();
        assert_eq!(f.size(), 3 * 4096);
        // Block 1 was covered whole; blocks 0 and 2 are zeroed in part.
        assert_eq!(f.allocated_blocks(), 2);
        assert_eq!(pool.free(), 8);
        let v = read(&f, 0, 3 * 4096);
        assert!(v[..100].iter().all(|&b| b == 9));
        assert!(v[100..2 * 4096 + 100].iter().all(|&b| b == 0));
        assert!(v[2 * 4096 + 100..].iter().all(|&b| b == 9));
        assert!(f.is_hole(4096, 4096));
        assert!(!f.is_hole(4000, 200));
        assert_eq!(f.seek_hole(0), Ok(4096));
    }
}

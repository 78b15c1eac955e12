//! Page-aligned byte buffers.
//!
//! Direct I/O (`O_DIRECT`) on a backing file needs the memory it reads into
//! or writes from aligned to what the backing device asks (`stx_dio_mem_align`
//! from `statx(STATX_DIOALIGN)`: at most a page on Linux). So the buffers
//! request data travels in are page-aligned: the io_uring transport's ring
//! buffers, the `/dev/fuse` request buffers (laid out so a WRITE's data
//! starts on a page) and a file system's own read and bounce buffers.

use std::io;
use std::ptr::NonNull;

/// Alignment of every [`AlignedBuf`]: a page, which covers any direct-I/O
/// memory alignment Linux reports.
pub const ALIGN: usize = 4096;

/// A zeroed, page-aligned heap buffer of fixed length.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: an AlignedBuf owns plain memory; access goes through `&`/`&mut`
// (the slices) or through raw pointers whose users say why they are sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above; `&AlignedBuf` hands out only shared slices and pointers.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (at least one), page-aligned.
    pub fn new(len: usize) -> io::Result<AlignedBuf> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), ALIGN)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(AlignedBuf { ptr, layout })
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    /// Never: a buffer has at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The first byte, for memory the kernel reads or writes through a
    /// registered pointer (ring buffers).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` initialised (zeroed) bytes owned by self, borrowed shared.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, borrowed exclusively through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len()).finish()
    }
}

/// Whether `data` starts on an address aligned to `align` (a power of two).
pub fn is_aligned(data: &[u8], align: usize) -> bool {
    data.as_ptr() as usize & (align.max(1) - 1) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_page_aligned_and_zeroed() {
        for len in [0, 1, 80, 4095, 4096, 1 << 20] {
            let mut b = AlignedBuf::new(len).unwrap();
            assert!(is_aligned(b.as_slice(), ALIGN), "{len}");
            assert_eq!(b.len(), len.max(1));
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.as_mut_slice()[0] = 7;
            assert_eq!(b.as_slice()[0], 7);
        }
        assert!(!is_aligned(&AlignedBuf::new(64).unwrap().as_slice()[1..], 2));
    }
}

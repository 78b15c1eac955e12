//! Open files and directories: the `fh` the kernel hands back on every
//! READ, WRITE, READDIR, ... names one of these. Each is a real descriptor,
//! one per open, closed on RELEASE / RELEASEDIR.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use efuse::Errno;

use super::fileio::{NodeIo, OpenPath};
use super::sys;

/// An open regular file (or anything else opened for I/O).
pub(super) struct OpenFile {
    pub(super) fd: OwnedFd,
    /// The inode's I/O state (regular files), and the path this open was given.
    pub(super) io: Option<(Arc<NodeIo>, OpenPath)>,
}

/// An open directory and its position in the listing.
pub(super) struct OpenDir {
    pub(super) fd: OwnedFd,
    pub(super) stream: Mutex<DirStream>,
}

/// Handles by `fh`, read-mostly: lookups share the lock.
pub(super) struct HandleTable<T> {
    map: RwLock<HashMap<u64, Arc<T>>>,
}

impl<T> Default for HandleTable<T> {
    fn default() -> Self {
        HandleTable { map: RwLock::default() }
    }
}

/// Source of `fh` numbers, shared by files and directories; 0 is never used.
#[derive(Debug)]
pub(super) struct FhCounter(AtomicU64);

impl Default for FhCounter {
    fn default() -> Self {
        FhCounter(AtomicU64::new(1))
    }
}

impl FhCounter {
    pub(super) fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

impl<T> HandleTable<T> {
    pub(super) fn insert(&self, fh: u64, value: T) {
        self.map.write().unwrap_or_else(|p| p.into_inner()).insert(fh, Arc::new(value));
    }

    /// The handle; EBADF for an `fh` we never gave out or already released.
    pub(super) fn get(&self, fh: u64) -> Result<Arc<T>, Errno> {
        self.map.read().unwrap_or_else(|p| p.into_inner()).get(&fh).cloned().ok_or(Errno::EBADF)
    }

    pub(super) fn remove(&self, fh: u64) -> Option<Arc<T>> {
        self.map.write().unwrap_or_else(|p| p.into_inner()).remove(&fh)
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// A directory listing read with getdents64, resumable at any cookie.
///
/// Entries read but not yet sent stay in `buf`, so a READDIR that filled the
/// kernel's buffer continues where it stopped without a seek.
#[derive(Default)]
pub(super) struct DirStream {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Cookie of the position after the last consumed entry (0 = start).
    offset: u64,
}

/// One `linux_dirent64`, located in the stream's buffer.
#[derive(Debug, Clone, Copy)]
pub(super) struct RawDirent {
    pub(super) ino: u64,
    /// Cookie to resume after this entry.
    pub(super) off: u64,
    /// `DT_*` type.
    pub(super) dtype: u8,
    name_at: usize,
    name_len: usize,
    reclen: usize,
}

impl RawDirent {
    /// The type as `S_IFMT` bits (DT_x << 12 is S_IFx), 0 when unknown.
    pub(super) fn kind(&self) -> u32 {
        (self.dtype as u32) << 12
    }
}

const DIRENT_BUFFER: usize = 32 * 1024;
/// d_ino (8) + d_off (8) + d_reclen (2) + d_type (1).
const DIRENT_HEADER: usize = 19;

impl DirStream {
    /// Positions the stream at cookie `offset` unless it is already there.
    pub(super) fn seek(&mut self, fd: &OwnedFd, offset: u64) -> Result<(), Errno> {
        if offset == self.offset {
            return Ok(());
        }
        sys::lseek(fd.as_fd(), offset, libc::SEEK_SET)?;
        self.start = 0;
        self.end = 0;
        self.offset = offset;
        Ok(())
    }

    /// The next entry without consuming it; None at the end of the directory.
    pub(super) fn peek(&mut self, fd: &OwnedFd) -> Result<Option<RawDirent>, Errno> {
        if self.start >= self.end {
            if self.buf.len() < DIRENT_BUFFER {
                self.buf.resize(DIRENT_BUFFER, 0);
            }
            let n = sys::getdents64(fd.as_fd(), &mut self.buf)?;
            self.start = 0;
            self.end = n.min(self.buf.len());
            if n == 0 {
                return Ok(None);
            }
        }
        let rec = &self.buf[self.start..self.end];
        if rec.len() < DIRENT_HEADER {
            return Err(Errno::EIO);
        }
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&rec[i..i + 8]);
            u64::from_ne_bytes(b)
        };
        let ino = u64_at(0);
        let off = u64_at(8);
        let reclen = u16::from_ne_bytes([rec[16], rec[17]]) as usize;
        let dtype = rec[18];
        if reclen < DIRENT_HEADER || reclen > rec.len() {
            return Err(Errno::EIO);
        }
        let name_area = &rec[DIRENT_HEADER..reclen];
        let name_len = name_area.iter().position(|&b| b == 0).unwrap_or(name_area.len());
        Ok(Some(RawDirent { ino, off, dtype, name_at: self.start + DIRENT_HEADER, name_len, reclen }))
    }

    pub(super) fn name(&self, e: &RawDirent) -> &[u8] {
        self.buf.get(e.name_at..e.name_at + e.name_len).unwrap_or(&[])
    }

    /// Steps past `e`, which `peek` just returned.
    pub(super) fn consume(&mut self, e: &RawDirent) {
        self.start += e.reclen;
        self.offset = e.off;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn stream_lists_and_resumes_at_cookies() {
        let d = std::env::temp_dir().join(format!("stackfs-dirstream-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..2000 {
            std::fs::write(d.join(format!("file-with-a-longish-name-{i}")), b"").unwrap();
        }
        let p = CString::new(d.as_os_str().as_bytes()).unwrap();
        let cwd = unsafe { std::os::fd::BorrowedFd::borrow_raw(libc::AT_FDCWD) };
        let fd = sys::openat(cwd, &p, libc::O_RDONLY | libc::O_DIRECTORY, 0).unwrap();
        let mut s = DirStream::default();
        let mut all = Vec::new();
        while let Some(e) = s.peek(&fd).unwrap() {
            all.push((s.name(&e).to_vec(), e.off));
            s.consume(&e);
        }
        assert_eq!(all.len(), 2002);
        // Resume after entry 1000 from a fresh position, as a later READDIR would.
        let mut s2 = DirStream::default();
        let fd2 = sys::openat(cwd, &p, libc::O_RDONLY | libc::O_DIRECTORY, 0).unwrap();
        s2.seek(&fd2, all[999].1).unwrap();
        let e = s2.peek(&fd2).unwrap().unwrap();
        assert_eq!(s2.name(&e), &all[1000].0[..]);
        std::fs::remove_dir_all(&d).unwrap();
    }
}

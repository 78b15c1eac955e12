//! The daemon's own messages to the kernel, outside any request: cache
//! invalidations (FUSE_NOTIFY_*) and backing files for passthrough
//! (FUSE_DEV_IOC_BACKING_OPEN / CLOSE).
//!
//! A [`Connection`] is handed to the file system at INIT
//! ([`crate::InitInfo::connection`]). Notifications must not be sent from a
//! request handler about the objects that request is working on (the kernel
//! may hold the locks the notification needs); send them from a thread of
//! your own, as stackfs's backing-directory watcher does.

use std::ffi::OsStr;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use efuse_abi::consts::{ioctl, notify};
use efuse_abi::structs as abi;
use zerocopy::IntoBytes;

/// A backing file registered with the kernel for passthrough I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackingId(pub(crate) i32);

impl BackingId {
    pub fn raw(self) -> i32 {
        self.0
    }
}

/// A handle on the FUSE connection for messages the daemon starts.
#[derive(Clone, Debug)]
pub struct Connection {
    fd: Arc<OwnedFd>,
    /// Told of every invalidation sent, as of a change the session answered.
    changes: Option<Arc<crate::changes::Changes>>,
}

impl Connection {
    pub(crate) fn new(fd: Arc<OwnedFd>) -> Connection {
        Connection { fd, changes: None }
    }

    /// This connection, telling `changes` of every invalidation it sends.
    pub(crate) fn telling(self, changes: Arc<crate::changes::Changes>) -> Connection {
        Connection { changes: Some(changes), ..self }
    }

    fn tell(&self, c: crate::changes::Change) {
        if let Some(ch) = &self.changes {
            ch.tell(&[c]);
        }
    }

    fn send_notify(&self, code: i32, parts: &[&[u8]]) -> io::Result<bool> {
        let len = std::mem::size_of::<abi::OutHeader>() + parts.iter().map(|p| p.len()).sum::<usize>();
        let header = abi::OutHeader { len: len as u32, error: code, unique: 0 };
        let mut iov = [IoSlice::new(&[]); 5];
        iov[0] = IoSlice::new(header.as_bytes());
        for (slot, p) in iov[1..].iter_mut().zip(parts) {
            *slot = IoSlice::new(p);
        }
        let n = 1 + parts.len().min(4);
        // SAFETY: IoSlice is ABI-compatible with iovec; every slice is live.
        let rc = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr().cast(), n as libc::c_int) };
        if rc >= 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // The kernel has nothing cached for it: nothing to invalidate.
            Some(libc::ENOENT) => Ok(false),
            _ => Err(e),
        }
    }

    /// Drops the kernel's cached name `name` in directory `parent` (positive or
    /// negative). Ok(false) when the kernel had nothing cached.
    pub fn inval_entry(&self, parent: u64, name: &OsStr) -> io::Result<bool> {
        let name = name.as_bytes();
        self.tell(crate::changes::Change::Name { parent, name: name.into() });
        let out = abi::NotifyInvalEntryOut { parent, namelen: name.len() as u32, flags: 0 };
        self.send_notify(notify::INVAL_ENTRY, &[out.as_bytes(), name, b"\0"])
    }

    /// Drops the kernel's cached attributes of `ino` and its cached data in
    /// `[off, off + len)` (`len` 0: to the end; `off` negative: attributes only).
    pub fn inval_inode(&self, ino: u64, off: i64, len: i64) -> io::Result<bool> {
        self.tell(crate::changes::Change::Node { nodeid: ino });
        let out = abi::NotifyInvalInodeOut { ino, off, len };
        self.send_notify(notify::INVAL_INODE, &[out.as_bytes()])
    }

    /// Tells the kernel `name` in `parent` (node `child`) is gone: the dentry is
    /// dropped and, if it pointed to `child`, the inode's link is accounted for.
    pub fn delete(&self, parent: u64, child: u64, name: &OsStr) -> io::Result<bool> {
        let name = name.as_bytes();
        self.tell(crate::changes::Change::Name { parent, name: name.into() });
        self.tell(crate::changes::Change::Node { nodeid: child });
        let out = abi::NotifyDeleteOut { parent, child, namelen: name.len() as u32, padding: 0 };
        self.send_notify(notify::DELETE, &[out.as_bytes(), name, b"\0"])
    }

    /// Makes every name the kernel cached so far stale at once
    /// (FUSE_NOTIFY_INC_EPOCH, Linux 6.16+): for when changes may have been
    /// missed. Ok(false) where the kernel does not know the message.
    pub fn inc_epoch(&self) -> io::Result<bool> {
        self.tell(crate::changes::Change::All);
        match self.send_notify(notify::INC_EPOCH, &[]) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
            other => other,
        }
    }

    /// Registers `file` (an open regular file, not O_PATH) as a backing file
    /// for passthrough. The kernel keeps its own reference: `file` may be
    /// closed afterwards. Needs CAP_SYS_ADMIN.
    pub fn backing_open(&self, file: BorrowedFd<'_>) -> io::Result<BackingId> {
        let map = abi::BackingMap { fd: file.as_raw_fd(), flags: 0, padding: 0 };
        // SAFETY: the ioctl reads one fuse_backing_map from a live pointer.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), ioctl::DEV_IOC_BACKING_OPEN as _, &map) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(BackingId(rc))
    }

    /// Drops a backing file id; files opened with it keep working.
    pub fn backing_close(&self, id: BackingId) -> io::Result<()> {
        let raw: u32 = id.0 as u32;
        // SAFETY: the ioctl reads one u32 from a live pointer.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), ioctl::DEV_IOC_BACKING_CLOSE as _, &raw) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

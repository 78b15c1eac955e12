//! Per-inode I/O state of a regular file: which data path each open gets
//! (passthrough, cached, direct), the passthrough backing file shared by its
//! opens, and how the descriptor that serves `fh` 0 when the mount runs
//! without OPEN (stateless opens) is opened.
//!
//! The kernel requires every passthrough open of an inode to name the same
//! backing file, and refuses (EIO) any non-passthrough open while one is
//! live. So the backing id is per inode and reference-counted over its live
//! passthrough opens; while it lives, every new open is a passthrough open
//! with that id, whatever the policy would otherwise say. The kernel keeps
//! its own reference to the backing file, so a passthrough open needs no
//! descriptor of the daemon once its id is registered.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use efuse::policy::{DataPath, InodeIo, PathPolicy};
use efuse::{BackingId, Connection, Errno};

use super::handles::{FdCache, FdKey};
use super::sys;

/// The path an open was answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OpenPath {
    Passthrough(BackingId),
    Cached,
    Direct,
}

impl OpenPath {
    fn data_path(self) -> DataPath {
        match self {
            OpenPath::Passthrough(_) => DataPath::Passthrough,
            OpenPath::Cached => DataPath::Cached,
            OpenPath::Direct => DataPath::Direct,
        }
    }
}

/// Registering backing files for passthrough: the connection, and whether
/// the kernel has refused once (then stackfs stops trying).
pub(super) struct Passthrough {
    pub(super) conn: Connection,
    refused: AtomicBool,
}

impl Passthrough {
    pub(super) fn new(conn: Connection) -> Passthrough {
        Passthrough { conn, refused: AtomicBool::new(false) }
    }

    pub(super) fn usable(&self) -> bool {
        !self.refused.load(Ordering::Relaxed)
    }

    fn open(&self, file: &OwnedFd) -> Option<BackingId> {
        match self.conn.backing_open(file.as_fd()) {
            Ok(id) => Some(id),
            Err(e) => {
                if !self.refused.swap(true, Ordering::Relaxed) {
                    tracing::warn!("stackfs: passthrough off: the kernel refused a backing file ({e}); reads and writes go through the daemon");
                }
                None
            }
        }
    }

    pub(super) fn close(&self, id: BackingId) {
        if let Err(e) = self.conn.backing_close(id) {
            tracing::debug!(id = id.raw(), "backing_close: {e}");
        }
    }
}

#[derive(Default)]
struct IoState {
    io: InodeIo,
    /// The inode's backing file while passthrough opens of it are live.
    backing: Option<BackingId>,
    backing_refs: u32,
    /// The access mode (`O_RDWR`, `O_RDONLY` or `O_WRONLY`) of the
    /// descriptors serving `fh` 0, once one was opened; they live in the
    /// [`FdCache`] under [`FdKey::Stateless`] and, with O_DIRECT, under
    /// [`FdKey::StatelessDirect`].
    stateless: Option<i32>,
}

/// See the module documentation.
#[derive(Default)]
pub(super) struct NodeIo {
    state: Mutex<IoState>,
}

impl NodeIo {
    fn lock(&self) -> MutexGuard<'_, IoState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Chooses the path for a new open of this inode through `file` (the
    /// descriptor just opened), registering a backing file if passthrough
    /// is chosen and none is live. `size` is the file's size, `app_direct`
    /// whether the caller opened with O_DIRECT, `writable` whether for
    /// writing. Returns the path and, for a cached open, whether it may keep
    /// the page cache as far as this inode's history goes.
    pub(super) fn open(
        &self,
        policy: &PathPolicy,
        passthrough: Option<&Passthrough>,
        file: &OwnedFd,
        size: u64,
        app_direct: bool,
        writable: bool,
    ) -> (OpenPath, bool) {
        let mut s = self.lock();
        let path = match s.backing {
            // The kernel takes nothing but passthrough with this backing file now.
            Some(id) => OpenPath::Passthrough(id),
            None => {
                let granted = passthrough.is_some_and(|p| p.usable());
                let p = PathPolicy { passthrough_granted: policy.passthrough_granted && granted, ..*policy };
                let flags =
                    if writable { libc::O_RDWR } else { libc::O_RDONLY } | if app_direct { libc::O_DIRECT } else { 0 };
                match p.choose_open(&s.io, size, true, flags) {
                    DataPath::Passthrough => match passthrough.and_then(|p| p.open(file)) {
                        Some(id) => {
                            s.backing = Some(id);
                            OpenPath::Passthrough(id)
                        }
                        None => {
                            let p = PathPolicy { passthrough_granted: false, ..p };
                            match p.choose(&s.io, size, true, app_direct) {
                                DataPath::Direct => OpenPath::Direct,
                                _ => OpenPath::Cached,
                            }
                        }
                    },
                    DataPath::Cached => OpenPath::Cached,
                    DataPath::Direct => OpenPath::Direct,
                }
            }
        };
        if let OpenPath::Passthrough(_) = path {
            s.backing_refs += 1;
        }
        s.io.opened(path.data_path(), writable);
        let keep = path == OpenPath::Cached && s.io.keep_cache();
        (path, keep)
    }

    /// An open answered with `path` was released (or its reply never
    /// reached the kernel). Returns the backing id to close when it was the
    /// inode's last passthrough open.
    pub(super) fn released(&self, path: OpenPath) -> Option<BackingId> {
        let mut s = self.lock();
        s.io.released(path.data_path());
        if let OpenPath::Passthrough(_) = path {
            s.backing_refs = s.backing_refs.saturating_sub(1);
            if s.backing_refs == 0 {
                return s.backing.take();
            }
        }
        None
    }

    /// Records a READ served by the daemon, for the pattern the policy reads.
    pub(super) fn observe_read(&self, offset: u64, len: u32) {
        self.lock().io.observe_read(offset, len)
    }

    /// Records a WRITE served by the daemon (a direct one leaves cached pages stale).
    pub(super) fn observe_write(&self) {
        self.lock().io.observe_write()
    }

    /// The descriptor serving `fh` 0 of node `ino`, opened on first use
    /// from the inode's `O_PATH` descriptor `ifd`: read-write when possible,
    /// else read-only or write-only, reopened when a request needs the other
    /// direction, and cached in `cache` like any open's. `direct`: for a
    /// request that asks for O_DIRECT (a descriptor of its own).
    pub(super) fn stateless_fd(
        &self,
        cache: &FdCache,
        ino: u64,
        ifd: &OwnedFd,
        write: bool,
        direct: bool,
    ) -> Result<Arc<OwnedFd>, Errno> {
        let need = if write { libc::O_WRONLY } else { libc::O_RDONLY };
        let (key, odirect) =
            if direct { (FdKey::StatelessDirect(ino), libc::O_DIRECT) } else { (FdKey::Stateless(ino), 0) };
        let mut s = self.lock();
        if let Some(mode) = s.stateless {
            if mode == libc::O_RDWR || mode == need {
                let reopen = || sys::reopen(ifd.as_fd(), mode | odirect);
                return Ok(cache.get_or_open(key, reopen, || true)?.fd);
            }
        }
        // Checked here, once per descriptor opened, not on every request.
        super::regular_file(ifd.as_fd())?;
        let opened = match sys::reopen(ifd.as_fd(), libc::O_RDWR | odirect) {
            Ok(fd) => (fd, libc::O_RDWR),
            Err(e) if e == Errno::EACCES || e == Errno::EROFS || e == Errno::EPERM || e.raw() == libc::ETXTBSY => {
                (sys::reopen(ifd.as_fd(), need | odirect)?, need)
            }
            Err(e) => return Err(e),
        };
        if s.stateless.is_some_and(|mode| mode != opened.1) {
            // The twin (O_DIRECT the other way round) has the old access
            // mode, which the recorded one no longer describes.
            let twin = if direct { FdKey::Stateless(ino) } else { FdKey::StatelessDirect(ino) };
            cache.remove_one(twin);
        }
        s.stateless = Some(opened.1);
        Ok(cache.insert(key, opened.0).fd)
    }

    /// Whether passthrough opens of this inode are live (the kernel then
    /// holds its backing file).
    pub(super) fn passthrough_live(&self) -> bool {
        self.lock().backing.is_some()
    }

    /// Whether `fh` 0 was ever served for this inode (stateless opens): the
    /// kernel may then hold it open without the daemon knowing.
    pub(super) fn served_stateless(&self) -> bool {
        self.lock().stateless.is_some()
    }
}

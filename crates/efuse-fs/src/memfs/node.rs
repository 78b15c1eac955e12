//! One inode of memfs and the locks around it.
//!
//! Lock order (the reason no two threads can wait on each other):
//! - `Node::inner` locks are taken parent before child (lookup, rmdir,
//!   readdirplus, rename's replaced directory). Only a rename between two
//!   directories locks two directories that are not parent and child; it
//!   holds the file system's rename mutex, so there is only ever one such
//!   rename, and it locks an ancestor before its descendant, unrelated
//!   directories in node-id order. Two regular files (copy_file_range) are
//!   locked in node-id order; nothing else ever holds a file's lock while
//!   waiting for another lock.
//! - `Node::counts` and the inode table shards are leaves: nothing else is
//!   locked while one of them is held.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use efuse::{Errno, Timespec};

use super::data::FileData;
use super::dir::Directory;

/// Reference counts that decide when an inode is freed: when it has no name
/// (`nlink` 0), the kernel holds no lookup and no handle is open.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub(crate) nlink: u32,
    pub(crate) lookups: u64,
    pub(crate) opens: u64,
    /// An O_TMPFILE file that may still be given a name with link().
    pub(crate) linkable: bool,
    /// Removed from the table; must not be counted again.
    pub(crate) freed: bool,
}

impl Counts {
    pub(crate) fn unused(&self) -> bool {
        self.nlink == 0 && self.lookups == 0 && self.opens == 0
    }
}

pub(crate) enum Content {
    File(FileData),
    Dir(Directory),
    Symlink(Box<[u8]>),
    /// FIFOs, sockets and device nodes: nothing but attributes.
    Special,
}

pub(crate) struct Inode {
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) rdev: u32,
    pub(crate) atime: Timespec,
    pub(crate) mtime: Timespec,
    pub(crate) ctime: Timespec,
    pub(crate) btime: Timespec,
    pub(crate) xattrs: BTreeMap<Box<[u8]>, Box<[u8]>>,
    pub(crate) content: Content,
}

impl Inode {
    pub(crate) fn dir(&self) -> Result<&Directory, Errno> {
        match &self.content {
            Content::Dir(d) => Ok(d),
            _ => Err(Errno::ENOTDIR),
        }
    }

    pub(crate) fn dir_mut(&mut self) -> Result<&mut Directory, Errno> {
        match &mut self.content {
            Content::Dir(d) => Ok(d),
            _ => Err(Errno::ENOTDIR),
        }
    }

    /// A directory that may receive new entries.
    pub(crate) fn live_dir_mut(&mut self) -> Result<&mut Directory, Errno> {
        let d = self.dir_mut()?;
        if d.unlinked {
            return Err(Errno::ENOENT);
        }
        Ok(d)
    }

    pub(crate) fn file(&self) -> Result<&FileData, Errno> {
        match &self.content {
            Content::File(f) => Ok(f),
            Content::Dir(_) => Err(Errno::EISDIR),
            _ => Err(Errno::EINVAL),
        }
    }

    pub(crate) fn file_mut(&mut self) -> Result<&mut FileData, Errno> {
        match &mut self.content {
            Content::File(f) => Ok(f),
            Content::Dir(_) => Err(Errno::EISDIR),
            _ => Err(Errno::EINVAL),
        }
    }

    /// mtime and ctime, for a change of contents.
    pub(crate) fn touch_modified(&mut self, now: Timespec) {
        self.mtime = now;
        self.ctime = now;
    }
}

pub(crate) struct Node {
    pub(crate) ino: u64,
    /// File type bits (`S_IFREG`, ...); never changes.
    pub(crate) kind: u32,
    /// For a directory, the node id of its parent (".."); changed only by a
    /// rename between directories, under the rename mutex.
    pub(crate) parent: AtomicU64,
    pub(crate) counts: Mutex<Counts>,
    pub(crate) inner: RwLock<Inode>,
}

impl Node {
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, Inode> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, Inode> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

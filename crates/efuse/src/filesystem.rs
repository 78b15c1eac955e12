//! The one trait a file system author implements.
//!
//! It is inode based, like libfuse's low-level API: the kernel names files by
//! node id (`ino` here; 1 is the root), and every method receives the request
//! context and a reply object that must be answered exactly once. Methods take
//! `&self` and may run on several worker threads at once, so the implementation
//! is `Send + Sync` and does its own locking. Every method defaults to ENOSYS,
//! which the kernel remembers for the optional ones (it stops sending them).

use std::ffi::OsStr;

use crate::reply::*;
use crate::types::*;

/// What INIT settled, for a file system that wants to know.
#[derive(Debug, Clone)]
pub struct InitInfo {
    /// Negotiated protocol minor version (major is 7).
    pub minor: u32,
    /// Largest WRITE the kernel will send.
    pub max_write: u32,
    /// Largest READ the kernel will ask for.
    pub max_read: u32,
    /// The negotiated `efuse_abi::consts::init` flags.
    pub flags: u64,
    /// For notifications and passthrough backing files (None without a kernel, in tests).
    pub connection: Option<crate::connection::Connection>,
}

impl InitInfo {
    /// FUSE passthrough is on: OPEN may answer with a backing file.
    pub fn passthrough(&self) -> bool {
        self.flags & efuse_abi::consts::init::PASSTHROUGH != 0
    }

    /// The kernel's writeback cache is on (excludes passthrough).
    pub fn writeback_cache(&self) -> bool {
        self.flags & efuse_abi::consts::init::WRITEBACK_CACHE != 0
    }

    /// Stateless opens: the session answers OPEN with ENOSYS. Once the
    /// kernel has seen that answer it sends no RELEASE, also not for files
    /// opened by CREATE or TMPFILE, so a file system must keep no per-open
    /// state for those either: answer them with `fh` 0 (a RELEASE may still
    /// come for the ones created before the kernel's first OPEN).
    pub fn stateless_opens(&self) -> bool {
        self.flags & efuse_abi::consts::init::NO_OPEN_SUPPORT != 0
    }
}

#[allow(unused_variables)]
pub trait Filesystem: Send + Sync + 'static {
    /// What this file system implements beyond the basics; see [`Capabilities`].
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// Direct reads for bypass clients (the user-space counterpart of
    /// passthrough): an O_PATH descriptor of a directory that holds this
    /// file system's regular files under the same paths, with the same
    /// contents, inode numbers, owners and modes, on one file system (a
    /// pass-through file system's backing directory). A bypass client then
    /// opens a file it may read there itself, with its own credentials,
    /// and reads it with no request; it does so only when the mount's rule
    /// (the mode bits) and the directory's file system both allow the open,
    /// and only for a file the metadata table names with that inode number.
    /// The daemon hands the directory only to clients that could reach it
    /// anyway: as privileged as the daemon (same uid and gid, its groups
    /// and capabilities), in its root directory and mount namespace, on a
    /// mount that is not read-only; a program can use the descriptor for
    /// anything its credentials allow below and above the directory, not
    /// only as the library does. Asked once per such connection. None (the
    /// default): every read goes through the daemon.
    fn direct_reads(&self) -> Option<std::os::fd::OwnedFd> {
        None
    }

    /// Called once, before the INIT reply. An error fails the mount.
    fn init(&self, info: &InitInfo) -> Result<(), Errno> {
        Ok(())
    }

    /// Called once at unmount (DESTROY) or when the session ends.
    fn destroy(&self) {}

    /// The kernel refused a reply (the request was gone: the connection was
    /// aborted, or the request interrupted), so what the reply granted never
    /// reached it. The default takes it back as the kernel would have:
    /// FORGET for a lookup, RELEASE (RELEASEDIR) for an open handle, both for
    /// CREATE. Override to learn of it; `ctx` belongs to no request.
    fn refused(&self, ctx: &RequestContext<'_>, grant: &Refused) {
        match grant {
            Refused::Lookup { nodeid } => self.forget(*nodeid, 1),
            Refused::Lookups(ids) => {
                for chunk in ids.chunks(64) {
                    let mut nodes = [(0u64, 0u64); 64];
                    for (slot, &id) in nodes.iter_mut().zip(chunk) {
                        *slot = (id, 1);
                    }
                    self.batch_forget(&nodes[..chunk.len()]);
                }
            }
            Refused::Open { ino, fh, flags, dir: false } => {
                self.release(ctx, *ino, *fh, *flags, None, ReplyEmpty::nowhere(efuse_abi::Opcode::Release))
            }
            Refused::Open { ino, fh, flags, dir: true } => {
                self.releasedir(ctx, *ino, *fh, *flags, ReplyEmpty::nowhere(efuse_abi::Opcode::Releasedir))
            }
            Refused::Create { nodeid, fh, flags } => {
                self.release(ctx, *nodeid, *fh, *flags, None, ReplyEmpty::nowhere(efuse_abi::Opcode::Release));
                self.forget(*nodeid, 1);
            }
        }
    }

    /// What the file system holds now (inodes, data, descriptors), for
    /// `efuse stats`; called from the control socket's thread, so cheap
    /// and lock-friendly. The default says nothing.
    fn usage(&self) -> crate::stats::FsUsage {
        crate::stats::FsUsage::default()
    }

    /// Looks up `name` in directory `parent`; the reply adds one to the lookup count.
    fn lookup(&self, ctx: &RequestContext<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::ENOSYS)
    }

    /// The kernel dropped `nlookup` references to `ino`. No reply.
    fn forget(&self, ino: u64, nlookup: u64) {}

    /// Several forgets at once. No reply.
    fn batch_forget(&self, nodes: &[(u64, u64)]) {
        for &(ino, n) in nodes {
            self.forget(ino, n);
        }
    }

    fn getattr(&self, ctx: &RequestContext<'_>, ino: u64, fh: Option<u64>, reply: ReplyAttr) {
        reply.error(Errno::ENOSYS)
    }

    /// STATX (stat with birth time). The default answers from `getattr`;
    /// override to report `btime`.
    fn statx(&self, ctx: &RequestContext<'_>, ino: u64, fh: Option<u64>, flags: u32, mask: u32, reply: ReplyStatx) {
        self.getattr(ctx, ino, fh, reply.into_attr())
    }

    fn setattr(&self, ctx: &RequestContext<'_>, ino: u64, attr: &SetAttr, reply: ReplyAttr) {
        reply.error(Errno::ENOSYS)
    }

    fn readlink(&self, ctx: &RequestContext<'_>, ino: u64, reply: ReplyData) {
        reply.error(Errno::ENOSYS)
    }

    /// Creates a non-directory, non-symlink node; `mode` has the type bits.
    fn mknod(&self, ctx: &RequestContext<'_>, parent: u64, name: &OsStr, mode: u32, rdev: u32, reply: ReplyEntry) {
        reply.error(Errno::ENOSYS)
    }

    fn mkdir(&self, ctx: &RequestContext<'_>, parent: u64, name: &OsStr, mode: u32, reply: ReplyEntry) {
        reply.error(Errno::ENOSYS)
    }

    fn unlink(&self, ctx: &RequestContext<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS)
    }

    fn rmdir(&self, ctx: &RequestContext<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS)
    }

    fn symlink(&self, ctx: &RequestContext<'_>, parent: u64, name: &OsStr, target: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::ENOSYS)
    }

    /// RENAME and RENAME2; `flags` is `RENAME_NOREPLACE`, `RENAME_EXCHANGE`,
    /// `RENAME_WHITEOUT` or 0.
    fn rename(
        &self,
        ctx: &RequestContext<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS)
    }

    /// Creates a hard link to `ino` named `newname` in `newparent`.
    fn link(&self, ctx: &RequestContext<'_>, ino: u64, newparent: u64, newname: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::ENOSYS)
    }

    /// Opens a file; `flags` are the `open(2)` flags. Answer with a handle.
    fn open(&self, ctx: &RequestContext<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        reply.error(Errno::ENOSYS)
    }

    /// Reads up to `size` bytes at `offset`. `flags` are the open file's
    /// `open(2)` flags as the kernel has them now (`fcntl(F_SETFL)` may have
    /// changed O_DIRECT since the open); READs that fill the kernel's page
    /// cache carry them too.
    fn read(&self, ctx: &RequestContext<'_>, ino: u64, fh: u64, offset: u64, size: u32, flags: i32, reply: ReplyData) {
        reply.error(Errno::ENOSYS)
    }

    /// `write_flags` are `efuse_abi::consts::write::*`; `flags` the open
    /// file's `open(2)` flags as for [`read`](Self::read) (0 on a write-back
    /// of cached pages).
    fn write(
        &self,
        ctx: &RequestContext<'_>,
        ino: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
        write_flags: u32,
        flags: i32,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::ENOSYS)
    }

    /// Called on each close(2) of a descriptor; `lock_owner` identifies the
    /// closing process's POSIX locks, which must be released.
    fn flush(&self, ctx: &RequestContext<'_>, ino: u64, fh: u64, lock_owner: u64, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS)
    }

    /// The last reference to an open file is gone. `flock_owner` is set when
    /// the file's BSD locks must be released.
    fn release(
        &self,
        ctx: &RequestContext<'_>,
        ino: u64,
        fh: u64,
        flags: i32,
        flock_owner: Option<u64>,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn fsync(&self, ctx: &RequestContext<'_>, ino: u64, fh: u64, datasync: bool, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS)
    }

    fn opendir(&self, ctx: &RequestContext<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        reply.opened(0, 0)
    }

    /// Lists entries from cookie `offset` on (0 = start).
    fn readdir(&self, ctx: &RequestContext<'_>, ino: u64, fh: u64, offset: u64, reply: ReplyDirectory) {
        reply.error(Errno::ENOSYS)
    }

    /// Lists entries with attributes; see [`ReplyDirectoryPlus`] on lookup counts.
    fn readdirplus(&self, ctx: &RequestContext<'_>, ino: u64, fh: u64, offset: u64, reply: ReplyDirectoryPlus) {
        reply.error(Errno::ENOSYS)
    }

    fn releasedir(&self, ctx: &RequestContext<'_>, ino: u64, fh: u64, flags: i32, reply: ReplyEmpty) {
        reply.ok()
    }

    fn fsyncdir(&self, ctx: &RequestContext<'_>, ino: u64, fh: u64, datasync: bool, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS)
    }

    fn statfs(&self, ctx: &RequestContext<'_>, ino: u64, reply: ReplyStatfs) {
        reply.statfs(&Statfs { bsize: 512, namelen: 255, frsize: 512, ..Default::default() })
    }

    /// `flags` are `XATTR_CREATE` / `XATTR_REPLACE`.
    fn setxattr(&self, ctx: &RequestContext<'_>, ino: u64, name: &OsStr, value: &[u8], flags: i32, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS)
    }

    /// With `size` 0 answer the size needed; else the value, or ERANGE if larger than `size`.
    fn getxattr(&self, ctx: &RequestContext<'_>, ino: u64, name: &OsStr, size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS)
    }

    /// NUL-separated names; `size` as for `getxattr`.
    fn listxattr(&self, ctx: &RequestContext<'_>, ino: u64, size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS)
    }

    fn removexattr(&self, ctx: &RequestContext<'_>, ino: u64, name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS)
    }

    /// `mask` is `R_OK | W_OK | X_OK` or `F_OK`. Not sent with `default_permissions`.
    fn access(&self, ctx: &RequestContext<'_>, ino: u64, mask: i32, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS)
    }

    /// Creates and opens a regular file. ENOSYS makes the kernel fall back to MKNOD + OPEN.
    fn create(&self, ctx: &RequestContext<'_>, parent: u64, name: &OsStr, mode: u32, flags: i32, reply: ReplyCreate) {
        reply.error(Errno::ENOSYS)
    }

    /// Tests for a conflicting POSIX lock.
    fn getlk(&self, ctx: &RequestContext<'_>, ino: u64, fh: u64, owner: u64, lock: &FileLock, reply: ReplyLock) {
        reply.error(Errno::ENOSYS)
    }

    /// Takes or releases a lock; `flock` for BSD locks, `sleep` to wait (SETLKW).
    fn setlk(
        &self,
        ctx: &RequestContext<'_>,
        ino: u64,
        fh: u64,
        owner: u64,
        lock: &FileLock,
        flock: bool,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS)
    }

    fn bmap(&self, ctx: &RequestContext<'_>, ino: u64, blocksize: u32, idx: u64, reply: ReplyBmap) {
        reply.error(Errno::ENOSYS)
    }

    /// `mode` is the `fallocate(2)` mode.
    fn fallocate(
        &self,
        ctx: &RequestContext<'_>,
        ino: u64,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS)
    }

    /// SEEK_DATA / SEEK_HOLE (the kernel handles the other whences itself).
    fn lseek(&self, ctx: &RequestContext<'_>, ino: u64, fh: u64, offset: u64, whence: i32, reply: ReplyLseek) {
        reply.error(Errno::ENOSYS)
    }

    fn copy_file_range(
        &self,
        ctx: &RequestContext<'_>,
        ino_in: u64,
        fh_in: u64,
        offset_in: u64,
        ino_out: u64,
        fh_out: u64,
        offset_out: u64,
        len: u64,
        flags: u32,
        reply: ReplyCopy,
    ) {
        reply.error(Errno::ENOSYS)
    }

    /// O_TMPFILE: an unnamed file in `parent`.
    fn tmpfile(&self, ctx: &RequestContext<'_>, parent: u64, mode: u32, flags: i32, reply: ReplyCreate) {
        reply.error(Errno::ENOSYS)
    }

    fn syncfs(&self, ctx: &RequestContext<'_>, ino: u64, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS)
    }
}

//! memfs as an efuse [`Filesystem`]: each method calls the matching
//! operation of [`MemFs`] and answers once, after every lock is released.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use efuse::abi::consts::fopen;
use efuse::policy::DataPath;

use efuse::{
    Capabilities, Errno, FileLock, Filesystem, InitInfo, ReplyAttr, ReplyCopy, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLock, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    RequestContext, SetAttr,
};

use super::{with_out_buffer, Caller, MemFs, NewKind};

fn caller(ctx: &RequestContext<'_>) -> Caller {
    ctx.caller()
}

fn empty(r: Result<(), Errno>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn entry(r: Result<efuse::Entry, Errno>, reply: ReplyEntry) {
    match r {
        Ok(e) => reply.entry(&e),
        Err(e) => reply.error(e),
    }
}

/// Answers GETXATTR / LISTXATTR from `data`: its size when asked with size 0.
fn xattr(r: Result<(), Errno>, data: &[u8], size: u32, reply: ReplyXattr) {
    match r {
        Err(e) => reply.error(e),
        Ok(()) if size == 0 => reply.size(data.len().min(u32::MAX as usize) as u32),
        Ok(()) if data.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(()) => reply.data(data),
    }
}

/// File handles carry the data path chosen at open in their low two bits, so
/// RELEASE can account for it without a table.
fn handle_with_path(counter: u64, path: DataPath) -> u64 {
    let code = match path {
        DataPath::Cached => 0,
        DataPath::Direct => 1,
        DataPath::Passthrough => 2,
    };
    (counter << 2) | code
}

fn path_of_handle(fh: u64) -> DataPath {
    match fh & 3 {
        1 => DataPath::Direct,
        2 => DataPath::Passthrough,
        _ => DataPath::Cached,
    }
}

impl MemFs {
    /// Answers CREATE and TMPFILE for the new (or existing) regular file `e`,
    /// opened (counted) by the caller.
    fn reply_created(&self, e: &efuse::Entry, flags: i32, reply: ReplyCreate) {
        if self.stateless_opens.load(std::sync::atomic::Ordering::Relaxed) {
            // No RELEASE will come (the kernel learnt that OPEN is not
            // implemented): count no open and keep no state; fh 0 tells
            // RELEASE, when one comes all the same, that nothing was counted.
            MemFs::release(self, e.nodeid);
            let keep = if self.cache().keep_cache { fopen::KEEP_CACHE } else { 0 };
            return reply.created(e, 0, keep);
        }
        let (fh, open_flags) = self.choose_path(e.nodeid, self.next_handle(), flags);
        reply.created(e, fh, open_flags)
    }

    /// Chooses cached or direct I/O for a new open of `ino` (memfs has no
    /// backing file, so never passthrough) and returns the handle and
    /// `FOPEN_*` flags to answer with.
    fn choose_path(&self, ino: u64, counter: u64, flags: i32) -> (u64, u32) {
        let size = MemFs::getattr(self, ino).map(|a| a.size).unwrap_or(0);
        let mut shard = self.io_shard(ino);
        let io = shard.entry(ino).or_default();
        let path = self.paths().choose_open(io, size, false, flags);
        io.opened(path, flags & libc::O_ACCMODE != libc::O_RDONLY);
        let open_flags = match path {
            DataPath::Direct => fopen::DIRECT_IO,
            _ if self.cache().keep_cache && io.keep_cache() => fopen::KEEP_CACHE,
            _ => 0,
        };
        (handle_with_path(counter, path), open_flags)
    }
}

/// A whole-file lock, as flock(2) takes.
fn whole_file(lock: &FileLock) -> FileLock {
    FileLock { start: 0, end: u64::MAX, ..*lock }
}

impl Filesystem for MemFs {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            posix_locks: true,
            flock_locks: true,
            atomic_o_trunc: true,
            readdirplus: true,
            cache_symlinks: true,
            // memfs clears suid/sgid and file capabilities on write, truncate
            // and chown itself, so the kernel need not ask before each write.
            handle_killpriv_v2: true,
            // READ and WRITE name the inode, not the open: no per-open state.
            stateless_open: true,
            // READDIR names the inode and a cookie. Without OPENDIR the
            // kernel caches every listing: only when listings may be cached
            // (changes all pass through the mount, which keeps them right).
            stateless_opendir: self.cache().cache_dir,
            // Writes may come from the kernel's writeback cache with any fh;
            // memfs ignores fh and takes size and times as the kernel sets them.
            writeback_cache: true,
            // Nothing happens on close but releasing daemon-kept POSIX locks.
            flush_only_unlocks: true,
            // Every change passes through the daemon; an open keeps nothing.
            reusable_opens: true,
            ..Default::default()
        }
    }

    fn init(&self, info: &InitInfo) -> Result<(), Errno> {
        self.stateless_opens.store(info.stateless_opens(), std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn usage(&self) -> efuse::stats::FsUsage {
        efuse::stats::FsUsage {
            inodes: Some(self.inode_count()),
            data_bytes: Some(self.data_bytes()),
            descriptors: None,
        }
    }

    fn lookup(&self, _ctx: &RequestContext<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        match MemFs::lookup(self, parent, name) {
            Ok(e) => reply.entry(&e),
            // A negative entry lets the kernel cache the miss; memfs changes
            // only through this mount, which invalidates it.
            Err(e) if e == Errno::ENOENT && !self.cache().negative_ttl.is_zero() && self.getattr(parent).is_ok() => {
                reply.entry(&efuse::Entry {
                    nodeid: 0,
                    generation: 0,
                    attr: Default::default(),
                    entry_ttl: self.cache().negative_ttl,
                    attr_ttl: Duration::ZERO,
                })
            }
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, ino: u64, nlookup: u64) {
        MemFs::forget(self, ino, nlookup)
    }

    fn getattr(&self, _ctx: &RequestContext<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match MemFs::getattr(self, ino) {
            Ok(a) => reply.attr(&a, self.cache().attr_ttl),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(&self, ctx: &RequestContext<'_>, ino: u64, attr: &SetAttr, reply: ReplyAttr) {
        match MemFs::setattr(self, ino, attr, &ctx.caller()) {
            Ok(a) => reply.attr(&a, self.cache().attr_ttl),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _ctx: &RequestContext<'_>, ino: u64, reply: ReplyData) {
        with_out_buffer(|buf| match MemFs::readlink(self, ino, buf) {
            Ok(()) => reply.data(buf),
            Err(e) => reply.error(e),
        })
    }

    fn mknod(&self, ctx: &RequestContext<'_>, parent: u64, name: &OsStr, mode: u32, rdev: u32, reply: ReplyEntry) {
        entry(self.create_node(caller(ctx), parent, Some(name), mode, NewKind::Node { rdev }, false), reply)
    }

    fn mkdir(&self, ctx: &RequestContext<'_>, parent: u64, name: &OsStr, mode: u32, reply: ReplyEntry) {
        entry(self.create_node(caller(ctx), parent, Some(name), mode, NewKind::Dir, false), reply)
    }

    fn unlink(&self, _ctx: &RequestContext<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        empty(MemFs::unlink(self, parent, name), reply)
    }

    fn rmdir(&self, _ctx: &RequestContext<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        empty(MemFs::rmdir(self, parent, name), reply)
    }

    fn symlink(&self, ctx: &RequestContext<'_>, parent: u64, name: &OsStr, target: &OsStr, reply: ReplyEntry) {
        let kind = NewKind::Symlink(target.as_bytes());
        entry(self.create_node(caller(ctx), parent, Some(name), 0o777, kind, false), reply)
    }

    fn rename(
        &self,
        _ctx: &RequestContext<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        empty(MemFs::rename(self, parent, name, newparent, newname, flags), reply)
    }

    fn link(&self, _ctx: &RequestContext<'_>, ino: u64, newparent: u64, newname: &OsStr, reply: ReplyEntry) {
        entry(MemFs::link(self, ino, newparent, newname), reply)
    }

    fn open(&self, ctx: &RequestContext<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        match MemFs::open(self, ino, flags, false, ctx.kill_suidgid.then(|| ctx.caller())) {
            Ok(fh) => {
                let (fh, open_flags) = self.choose_path(ino, fh, flags);
                reply.opened(fh, open_flags)
            }
            Err(e) => reply.error(e),
        }
    }

    /// O_DIRECT (in `flags`) asks nothing more of memfs: the kernel already
    /// sends such reads here instead of through its page cache, and memfs's
    /// memory is its device (see the module documentation).
    fn read(
        &self,
        _ctx: &RequestContext<'_>,
        ino: u64,
        _fh: u64,
        offset: u64,
        size: u32,
        _flags: i32,
        reply: ReplyData,
    ) {
        if self.paths().adaptive {
            if let Some(io) = self.io_shard(ino).get_mut(&ino) {
                io.observe_read(offset, size);
            }
        }
        with_out_buffer(|buf| match MemFs::read(self, ino, offset, size, buf) {
            Ok(()) => reply.data(buf),
            Err(e) => reply.error(e),
        })
    }

    fn write(
        &self,
        ctx: &RequestContext<'_>,
        ino: u64,
        _fh: u64,
        offset: u64,
        data: &[u8],
        write_flags: u32,
        flags: i32,
        reply: ReplyWrite,
    ) {
        if let Some(io) = self.io_shard(ino).get_mut(&ino) {
            io.observe_write();
        }
        let kill = (write_flags & efuse::abi::consts::write::KILL_SUIDGID != 0).then(|| ctx.caller());
        // An O_APPEND write goes to the end of the file as memfs knows it:
        // the kernel's offset is the size it cached, stale after a change
        // it did not make (a truncate through the bypass socket). Not for
        // a write-back of cached pages, which has its own offsets.
        let append = flags & libc::O_APPEND != 0 && write_flags & efuse::abi::consts::write::CACHE == 0;
        match MemFs::write_at(self, ino, (!append).then_some(offset), data, kill) {
            // A WRITE is at most max_write (1 MiB) long.
            Ok(n) => reply.written(n.min(u32::MAX as usize) as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _ctx: &RequestContext<'_>, ino: u64, _fh: u64, lock_owner: u64, reply: ReplyEmpty) {
        self.posix_locks.release_owner(ino, lock_owner);
        reply.ok()
    }

    fn release(
        &self,
        _ctx: &RequestContext<'_>,
        ino: u64,
        fh: u64,
        _flags: i32,
        flock_owner: Option<u64>,
        reply: ReplyEmpty,
    ) {
        if let Some(owner) = flock_owner {
            self.flock_locks.release_owner(ino, owner);
        }
        // fh 0: a stateless CREATE, which counted nothing.
        if fh != 0 {
            if let Some(io) = self.io_shard(ino).get_mut(&ino) {
                io.released(path_of_handle(fh));
            }
            MemFs::release(self, ino);
        }
        reply.ok()
    }

    fn fsync(&self, _ctx: &RequestContext<'_>, _ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        reply.ok()
    }

    fn opendir(&self, _ctx: &RequestContext<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        // Listings change only through this mount, which keeps the kernel's
        // cached listing right (it drops it when the directory changes).
        let cache_dir = if self.cache().cache_dir { fopen::CACHE_DIR | fopen::KEEP_CACHE } else { 0 };
        match MemFs::open(self, ino, flags, true, None) {
            Ok(fh) => reply.opened(fh, cache_dir),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _ctx: &RequestContext<'_>, ino: u64, _fh: u64, offset: u64, mut reply: ReplyDirectory) {
        match MemFs::readdir(self, ino, offset, |ino, cookie, kind, name| reply.add(ino, cookie, kind, name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(&self, _ctx: &RequestContext<'_>, ino: u64, _fh: u64, offset: u64, mut reply: ReplyDirectoryPlus) {
        match MemFs::readdirplus(self, ino, offset, |e, cookie, name| reply.add(e, cookie, name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(&self, _ctx: &RequestContext<'_>, ino: u64, _fh: u64, _flags: i32, reply: ReplyEmpty) {
        MemFs::release(self, ino);
        reply.ok()
    }

    fn fsyncdir(&self, _ctx: &RequestContext<'_>, _ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        reply.ok()
    }

    fn statfs(&self, _ctx: &RequestContext<'_>, _ino: u64, reply: ReplyStatfs) {
        reply.statfs(&MemFs::statfs(self))
    }

    fn setxattr(&self, _ctx: &RequestContext<'_>, ino: u64, name: &OsStr, value: &[u8], flags: i32, reply: ReplyEmpty) {
        empty(MemFs::setxattr(self, ino, name, value, flags), reply)
    }

    fn getxattr(&self, _ctx: &RequestContext<'_>, ino: u64, name: &OsStr, size: u32, reply: ReplyXattr) {
        with_out_buffer(|buf| {
            let r = MemFs::getxattr(self, ino, name, buf);
            xattr(r, buf, size, reply)
        })
    }

    fn listxattr(&self, _ctx: &RequestContext<'_>, ino: u64, size: u32, reply: ReplyXattr) {
        with_out_buffer(|buf| {
            let r = MemFs::listxattr(self, ino, buf);
            xattr(r, buf, size, reply)
        })
    }

    fn removexattr(&self, _ctx: &RequestContext<'_>, ino: u64, name: &OsStr, reply: ReplyEmpty) {
        empty(MemFs::removexattr(self, ino, name), reply)
    }

    fn access(&self, ctx: &RequestContext<'_>, ino: u64, mask: i32, reply: ReplyEmpty) {
        empty(MemFs::access(self, caller(ctx), ino, mask), reply)
    }

    fn create(&self, ctx: &RequestContext<'_>, parent: u64, name: &OsStr, mode: u32, flags: i32, reply: ReplyCreate) {
        let made = self.create_node(caller(ctx), parent, Some(name), mode, NewKind::Node { rdev: 0 }, true);
        let made = match made {
            Ok(e) => Ok(e),
            // The name appeared since the kernel's lookup: without O_EXCL,
            // open(O_CREAT) opens what is there.
            Err(e) if e == Errno::EEXIST && flags & libc::O_EXCL == 0 => self.open_existing(parent, name, flags),
            Err(e) => Err(e),
        };
        match made {
            Ok(e) => self.reply_created(&e, flags, reply),
            Err(e) => reply.error(e),
        }
    }

    fn getlk(&self, _ctx: &RequestContext<'_>, ino: u64, _fh: u64, owner: u64, lock: &FileLock, reply: ReplyLock) {
        reply.locked(&self.posix_locks.getlk(ino, owner, lock))
    }

    fn setlk(
        &self,
        ctx: &RequestContext<'_>,
        ino: u64,
        _fh: u64,
        owner: u64,
        lock: &FileLock,
        flock: bool,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        if flock {
            self.flock_locks.setlk(ctx, ino, owner, &whole_file(lock), sleep, reply)
        } else {
            self.posix_locks.setlk(ctx, ino, owner, lock, sleep, reply)
        }
    }

    fn fallocate(
        &self,
        _ctx: &RequestContext<'_>,
        ino: u64,
        _fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        empty(MemFs::fallocate(self, ino, offset, length, mode), reply)
    }

    fn lseek(&self, _ctx: &RequestContext<'_>, ino: u64, _fh: u64, offset: u64, whence: i32, reply: ReplyLseek) {
        match MemFs::lseek(self, ino, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(e),
        }
    }

    fn copy_file_range(
        &self,
        _ctx: &RequestContext<'_>,
        ino_in: u64,
        _fh_in: u64,
        offset_in: u64,
        ino_out: u64,
        _fh_out: u64,
        offset_out: u64,
        len: u64,
        flags: u32,
        reply: ReplyCopy,
    ) {
        match MemFs::copy_file_range(self, ino_in, offset_in, ino_out, offset_out, len, flags) {
            Ok(n) => reply.copied(n),
            Err(e) => reply.error(e),
        }
    }

    fn tmpfile(&self, ctx: &RequestContext<'_>, parent: u64, mode: u32, flags: i32, reply: ReplyCreate) {
        match self.create_node(caller(ctx), parent, None, mode, NewKind::Node { rdev: 0 }, true) {
            Ok(e) => self.reply_created(&e, flags, reply),
            Err(e) => reply.error(e),
        }
    }

    fn syncfs(&self, _ctx: &RequestContext<'_>, _ino: u64, reply: ReplyEmpty) {
        reply.ok()
    }
}

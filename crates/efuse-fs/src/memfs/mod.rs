//! memfs: a file system that keeps everything in memory.
//!
//! Inodes live in a sharded hash table keyed by node id (which is also
//! `st_ino`; ids only grow, so the kernel never sees one reused). Each inode
//! has its own lock; directories keep their entries ordered by name and hand
//! READDIR stable cookies; file data lives in fixed-size blocks drawn from a
//! pool of `capacity` bytes, with holes costing nothing.
//!
//! An inode is freed when it has no name, the kernel holds no lookup of it
//! and no handle is open on it. See [`node`] for the lock order.
//!
//! O_DIRECT: memfs has no device beneath it; its memory is where data
//! lives. An O_DIRECT open gets what direct I/O means there, as on tmpfs:
//! the kernel sends its reads and writes straight to memfs instead of
//! through its page cache, so nothing is cached twice and a write is in
//! memfs when it returns; no alignment is asked of offsets, lengths or
//! buffers (ext4 would answer EINVAL to unaligned ones; tmpfs does not).
//!
//! What it is not: persistent, or a place for permission policy beyond
//! `access` (mount with `default_permissions` to have the kernel enforce mode
//! bits on every operation).

mod data;
mod dir;
mod fuse;
mod node;
mod pool;
#[cfg(test)]
mod tests;

use efuse::policy::{InodeIo, PassthroughMode, PathPolicy};
use efuse::CachePolicy;
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockWriteGuard};

use efuse::abi::ROOT_ID;
use efuse::locks::LockTable;
use efuse::{Entry, Errno, FileAttr, SetAttr, Statfs, TimeOrNow, Timespec};

use data::{FileData, MAX_FILE_SIZE};
use dir::Directory;
use node::{Content, Counts, Inode, Node};
use pool::BlockPool;

/// How memfs is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemFsConfig {
    /// Bytes of file data the file system can hold (`--size`).
    pub capacity: u64,
    /// Size of a data block: a power of two from 512 to 1 MiB; anything else
    /// falls back to 4096.
    pub block_size: u32,
    /// TTLs and page-cache rules. Every change to memfs passes through the
    /// mount, so long-lived caches are exact ([`CachePolicy::EXACT`]).
    pub cache: CachePolicy,
    /// Data path choice per open (memfs never passes bytes through: cached or direct).
    pub paths: PathPolicy,
}

impl Default for MemFsConfig {
    fn default() -> Self {
        MemFsConfig {
            capacity: 1 << 30,
            block_size: 4096,
            cache: CachePolicy::EXACT,
            paths: PathPolicy { mode: PassthroughMode::Off, passthrough_granted: false, adaptive: true },
        }
    }
}

/// Bytes of capacity per inode: the inode limit statfs reports and creation
/// enforces is `capacity / BYTES_PER_INODE` (at least [`MIN_INODES`]).
const BYTES_PER_INODE: u64 = 256;
const MIN_INODES: u64 = 1024;
/// Longest symlink target (PATH_MAX less the NUL).
const MAX_SYMLINK: usize = 4095;
/// Largest xattr value, as Linux's XATTR_SIZE_MAX.
const MAX_XATTR_VALUE: usize = 65536;
/// Largest piece copied by one COPY_FILE_RANGE; the caller loops for more.
const MAX_COPY: u64 = 16 << 20;
const SHARDS: usize = 64;

/// Who asks: the parts of the request context memfs looks at.
pub(crate) use efuse::Caller;

/// What a new inode is.
pub(crate) enum NewKind<'a> {
    /// A regular file, FIFO, socket or device: `mode` carries the type.
    Node {
        rdev: u32,
    },
    Dir,
    Symlink(&'a [u8]),
}

/// One shard of the inode table: node id -> inode.
type Shard = RwLock<HashMap<u64, Arc<Node>>>;

/// The in-memory file system. See the module documentation.
pub struct MemFs {
    shards: Box<[Shard]>,
    next_ino: AtomicU64,
    next_fh: AtomicU64,
    inodes: AtomicU64,
    max_inodes: u64,
    pool: Arc<BlockPool>,
    /// Serializes renames between two directories; see [`node`].
    rename_lock: Mutex<()>,
    posix_locks: LockTable,
    flock_locks: LockTable,
    cache: CachePolicy,
    paths: PathPolicy,
    /// What each regular file's I/O looked like, for the per-open path choice.
    io: Box<[Mutex<HashMap<u64, InodeIo>>]>,
    /// OPEN is answered ENOSYS (`--no-open`): files opened by CREATE and
    /// TMPFILE count no open either ([`efuse::InitInfo::stateless_opens`]).
    pub(crate) stateless_opens: std::sync::atomic::AtomicBool,
}

/// Shards of the per-inode I/O observations.
const IO_SHARDS: usize = 16;

thread_local! {
    /// READ and xattr answers are copied here, so the inode lock is released
    /// before the reply is sent, and nothing is allocated once warm.
    static OUT_BUFFER: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` with this thread's output buffer, emptied.
pub(crate) fn with_out_buffer<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    let mut buf = OUT_BUFFER.with(|b| b.take());
    buf.clear();
    let r = f(&mut buf);
    OUT_BUFFER.with(|b| b.set(buf));
    r
}

/// Clears suid and sgid as the VFS does when an unprivileged caller writes
/// or truncates, or anyone changes the owner ([`efuse::kills_sgid`]).
pub(crate) fn kill_suidgid(i: &mut Inode, caller: &Caller) {
    i.mode &= !efuse::kills_sgid(i.mode, i.gid, caller);
}

/// Drops `security.capability`, as Linux does on write, truncate and chown.
fn drop_capabilities(i: &mut Inode) {
    if !i.xattrs.is_empty() {
        i.xattrs.remove(&b"security.capability"[..]);
    }
}

fn name_bytes(name: &OsStr) -> Result<&[u8], Errno> {
    let b = name.as_bytes();
    if b.len() > 255 {
        return Err(Errno::ENAMETOOLONG);
    }
    if b.is_empty() || b.contains(&b'/') || b.contains(&0) {
        return Err(Errno::EINVAL);
    }
    Ok(b)
}

fn is_dot(name: &[u8]) -> bool {
    name == b"." || name == b".."
}

/// relatime: atime moves when it is older than the last change or a day old.
fn atime_due(i: &Inode, now: Timespec) -> bool {
    i.atime <= i.mtime || i.atime <= i.ctime || now.sec - i.atime.sec >= 24 * 3600
}

fn xattr_name(name: &OsStr) -> Result<&[u8], Errno> {
    let b = name.as_bytes();
    if b.len() > 255 {
        return Err(Errno::ERANGE);
    }
    let prefix = [&b"user."[..], b"trusted.", b"security."].into_iter().find(|p| b.starts_with(p));
    match prefix {
        None if b.is_empty() => Err(Errno::EINVAL),
        None => Err(Errno::EOPNOTSUPP),
        Some(p) if p.len() == b.len() => Err(Errno::EINVAL),
        Some(_) => Ok(b),
    }
}

/// Two directories locked for a rename: `b` is `None` when both are the same.
struct DirPair<'a> {
    a: RwLockWriteGuard<'a, Inode>,
    b: Option<RwLockWriteGuard<'a, Inode>>,
}

impl DirPair<'_> {
    fn a(&mut self) -> &mut Inode {
        &mut self.a
    }
    fn b(&mut self) -> &mut Inode {
        match self.b.as_mut() {
            Some(b) => b,
            None => &mut self.a,
        }
    }
}

impl MemFs {
    pub fn new(cfg: MemFsConfig) -> MemFs {
        let block_size = if cfg.block_size.is_power_of_two() && (512..=1 << 20).contains(&cfg.block_size) {
            cfg.block_size
        } else {
            4096
        };
        let pool = Arc::new(BlockPool::new(cfg.capacity, block_size));
        let max_inodes = (cfg.capacity / BYTES_PER_INODE).max(MIN_INODES);
        let shards = (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect();
        let fs = MemFs {
            shards,
            next_ino: AtomicU64::new(ROOT_ID + 1),
            next_fh: AtomicU64::new(1),
            inodes: AtomicU64::new(1),
            max_inodes,
            pool,
            rename_lock: Mutex::new(()),
            posix_locks: LockTable::posix(),
            flock_locks: LockTable::flock(),
            cache: cfg.cache,
            paths: cfg.paths,
            io: (0..IO_SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            stateless_opens: std::sync::atomic::AtomicBool::new(false),
        };
        // SAFETY: geteuid and getegid cannot fail and touch no memory of ours.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let now = Timespec::now();
        let root = Node {
            ino: ROOT_ID,
            kind: libc::S_IFDIR,
            parent: AtomicU64::new(ROOT_ID),
            counts: Mutex::new(Counts { nlink: 2, lookups: 1, ..Default::default() }),
            inner: RwLock::new(Inode {
                mode: libc::S_IFDIR | 0o755,
                uid,
                gid,
                rdev: 0,
                atime: now,
                mtime: now,
                ctime: now,
                btime: now,
                xattrs: BTreeMap::new(),
                content: Content::Dir(Directory::default()),
            }),
        };
        fs.shard(ROOT_ID).write().unwrap_or_else(|e| e.into_inner()).insert(ROOT_ID, Arc::new(root));
        fs
    }

    fn shard(&self, ino: u64) -> &Shard {
        &self.shards[(ino % SHARDS as u64) as usize]
    }

    fn get(&self, ino: u64) -> Option<Arc<Node>> {
        self.shard(ino).read().unwrap_or_else(|e| e.into_inner()).get(&ino).cloned()
    }

    fn node(&self, ino: u64) -> Result<Arc<Node>, Errno> {
        self.get(ino).ok_or(Errno::ENOENT)
    }

    fn reserve_inode(&self) -> Result<(), Errno> {
        let mut cur = self.inodes.load(Ordering::Relaxed);
        loop {
            if cur >= self.max_inodes {
                return Err(Errno::ENOSPC);
            }
            match self.inodes.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(now) => cur = now,
            }
        }
    }

    /// Changes an inode's counts and frees it when nothing refers to it any more.
    fn update_counts(&self, node: &Node, f: impl FnOnce(&mut Counts)) {
        let free = {
            let mut k = node.counts();
            f(&mut k);
            if k.unused() && !k.freed && node.ino != ROOT_ID {
                k.freed = true;
                true
            } else {
                false
            }
        };
        if free {
            self.shard(node.ino).write().unwrap_or_else(|e| e.into_inner()).remove(&node.ino);
            self.io_shard(node.ino).remove(&node.ino);
            self.inodes.fetch_sub(1, Ordering::AcqRel);
            // Its blocks go back to the pool when the last Arc drops.
        }
    }

    /// Adds one kernel lookup; fails if the inode was freed meanwhile.
    fn add_lookup(&self, node: &Node) -> Result<(), Errno> {
        let mut k = node.counts();
        if k.freed {
            return Err(Errno::ENOENT);
        }
        k.lookups += 1;
        Ok(())
    }

    fn attr_of(&self, node: &Node, i: &Inode) -> FileAttr {
        let bs = self.pool.block_size();
        let (size, blocks) = match &i.content {
            Content::File(f) => (f.size(), f.allocated_blocks() * u64::from(bs) / 512),
            Content::Dir(_) => (u64::from(bs), 0),
            Content::Symlink(t) => (t.len() as u64, 0),
            Content::Special => (0, 0),
        };
        FileAttr {
            ino: node.ino,
            size,
            blocks,
            atime: i.atime,
            mtime: i.mtime,
            ctime: i.ctime,
            btime: Some(i.btime),
            mode: i.mode,
            nlink: node.counts().nlink,
            uid: i.uid,
            gid: i.gid,
            rdev: i.rdev,
            blksize: bs,
        }
    }

    /// The I/O observations of the shard holding `ino`.
    pub(crate) fn io_shard(&self, ino: u64) -> std::sync::MutexGuard<'_, HashMap<u64, InodeIo>> {
        self.io[(ino as usize) % IO_SHARDS].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cache policy replies follow.
    pub(crate) fn cache(&self) -> &CachePolicy {
        &self.cache
    }

    pub(crate) fn paths(&self) -> &PathPolicy {
        &self.paths
    }

    fn entry_of(&self, attr: FileAttr) -> Entry {
        Entry { nodeid: attr.ino, generation: 0, attr, entry_ttl: self.cache.entry_ttl, attr_ttl: self.cache.attr_ttl }
    }

    /// Whether directory `a` is `b` or one of its ancestors. Only stable under
    /// the rename lock (directories move only by rename).
    fn is_ancestor(&self, a: u64, b: u64) -> bool {
        let mut cur = b;
        // A chain longer than this is a bug; answering "yes" refuses the rename.
        for _ in 0..(1u32 << 24) {
            if cur == a {
                return true;
            }
            if cur == ROOT_ID {
                return false;
            }
            match self.get(cur) {
                Some(n) => cur = n.parent.load(Ordering::Acquire),
                None => return false,
            }
        }
        true
    }

    // ---- names ----

    pub(crate) fn lookup(&self, parent: u64, name: &OsStr) -> Result<Entry, Errno> {
        let name = name_bytes(name).map_err(|e| if e == Errno::EINVAL { Errno::ENOENT } else { e })?;
        let p = self.node(parent)?;
        let child = {
            let g = p.read();
            let dir = g.dir()?;
            let ino = match name {
                b"." => p.ino,
                b".." => p.parent.load(Ordering::Acquire),
                _ => dir.get(name).ok_or(Errno::ENOENT)?.ino,
            };
            let c = self.node(ino)?;
            self.add_lookup(&c)?;
            c
        };
        let attr = self.attr_of(&child, &child.read());
        Ok(self.entry_of(attr))
    }

    pub(crate) fn forget(&self, ino: u64, nlookup: u64) {
        if let Some(n) = self.get(ino) {
            self.update_counts(&n, |k| k.lookups = k.lookups.saturating_sub(nlookup));
        }
    }

    /// Creates an inode named `name` in `parent`. With `open`, it starts with
    /// one open handle (CREATE). With `name` None it is an unnamed O_TMPFILE.
    pub(crate) fn create_node(
        &self,
        caller: Caller,
        parent: u64,
        name: Option<&OsStr>,
        mode: u32,
        kind: NewKind<'_>,
        open: bool,
    ) -> Result<Entry, Errno> {
        let name = match name {
            Some(n) => {
                let n = name_bytes(n)?;
                if is_dot(n) {
                    return Err(Errno::EEXIST);
                }
                Some(n)
            }
            None => None,
        };
        let (typ, rdev) = match kind {
            NewKind::Dir => (libc::S_IFDIR, 0),
            NewKind::Symlink(t) => {
                if t.is_empty() {
                    return Err(Errno::ENOENT);
                }
                if t.len() > MAX_SYMLINK {
                    return Err(Errno::ENAMETOOLONG);
                }
                (libc::S_IFLNK, 0)
            }
            // CREATE and TMPFILE make regular files: open(2) ignores the type
            // bits of its mode, and the kernel refuses any other answer.
            NewKind::Node { .. } if open => (libc::S_IFREG, 0),
            NewKind::Node { rdev } => match mode & libc::S_IFMT {
                0 | libc::S_IFREG => (libc::S_IFREG, 0),
                t @ (libc::S_IFIFO | libc::S_IFSOCK) => (t, 0),
                t @ (libc::S_IFCHR | libc::S_IFBLK) => (t, rdev),
                libc::S_IFDIR => return Err(Errno::EPERM),
                _ => return Err(Errno::EINVAL),
            },
        };
        let p = self.node(parent)?;
        self.reserve_inode()?;
        let made = self.create_locked(caller, &p, name, typ, mode, rdev, kind, open);
        if made.is_err() {
            self.inodes.fetch_sub(1, Ordering::AcqRel);
        }
        made
    }

    #[allow(clippy::too_many_arguments)]
    fn create_locked(
        &self,
        caller: Caller,
        p: &Node,
        name: Option<&[u8]>,
        typ: u32,
        mode: u32,
        rdev: u32,
        kind: NewKind<'_>,
        open: bool,
    ) -> Result<Entry, Errno> {
        let now = Timespec::now();
        let mut pg = p.write();
        let (pmode, pgid) = (pg.mode, pg.gid);
        let dir = pg.live_dir_mut()?;
        if let Some(n) = name {
            if dir.get(n).is_some() {
                return Err(Errno::EEXIST);
            }
        }
        let mut perm = mode & 0o7777;
        let gid = if pmode & libc::S_ISGID != 0 {
            if typ == libc::S_IFDIR {
                perm |= libc::S_ISGID;
            }
            pgid
        } else {
            caller.gid
        };
        // A non-member's setgid bit on a new file in a setgid directory was
        // already dropped by the kernel (vfs_prepare_mode), judged with the
        // caller's full credentials: `mode` is final.
        let content = match kind {
            NewKind::Dir => Content::Dir(Directory::default()),
            NewKind::Symlink(t) => Content::Symlink(t.into()),
            NewKind::Node { .. } if typ == libc::S_IFREG => Content::File(FileData::new(self.pool.clone())),
            NewKind::Node { .. } => Content::Special,
        };
        let ino = self.next_ino.fetch_add(1, Ordering::Relaxed);
        let nlink = match (name, typ) {
            (None, _) => 0,
            (Some(_), libc::S_IFDIR) => 2,
            _ => 1,
        };
        let node = Arc::new(Node {
            ino,
            kind: typ,
            parent: AtomicU64::new(p.ino),
            counts: Mutex::new(Counts {
                nlink,
                lookups: 1,
                opens: u64::from(open),
                linkable: name.is_none(),
                freed: false,
            }),
            inner: RwLock::new(Inode {
                mode: typ | perm,
                uid: caller.uid,
                gid,
                rdev,
                atime: now,
                mtime: now,
                ctime: now,
                btime: now,
                xattrs: BTreeMap::new(),
                content,
            }),
        });
        let attr = self.attr_of(&node, &node.read());
        self.shard(ino).write().unwrap_or_else(|e| e.into_inner()).insert(ino, node);
        if let Some(n) = name {
            dir.insert(n, ino, typ);
            if typ == libc::S_IFDIR {
                p.counts().nlink += 1;
            }
            pg.touch_modified(now);
        }
        Ok(self.entry_of(attr))
    }

    pub(crate) fn unlink(&self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let name = name_bytes(name)?;
        if is_dot(name) {
            return Err(Errno::EISDIR);
        }
        let p = self.node(parent)?;
        let now = Timespec::now();
        let victim = {
            let mut pg = p.write();
            let dir = pg.dir_mut()?;
            let e = dir.get(name).ok_or(Errno::ENOENT)?;
            if e.is_dir() {
                return Err(Errno::EISDIR);
            }
            let c = self.node(e.ino)?;
            dir.remove(name);
            pg.touch_modified(now);
            self.update_counts(&c, |k| k.nlink = k.nlink.saturating_sub(1));
            c
        };
        victim.write().ctime = now;
        Ok(())
    }

    pub(crate) fn rmdir(&self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let name = name_bytes(name)?;
        if name == b"." {
            return Err(Errno::EINVAL);
        }
        if name == b".." {
            return Err(Errno::ENOTEMPTY);
        }
        let p = self.node(parent)?;
        let now = Timespec::now();
        let mut pg = p.write();
        let dir = pg.dir_mut()?;
        let e = dir.get(name).ok_or(Errno::ENOENT)?;
        if !e.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        let c = self.node(e.ino)?;
        {
            let mut cg = c.write(); // parent before child
            let cd = cg.dir_mut()?;
            if !cd.is_empty() {
                return Err(Errno::ENOTEMPTY);
            }
            cd.unlinked = true;
            cg.ctime = now;
        }
        dir.remove(name);
        pg.touch_modified(now);
        {
            let mut k = p.counts();
            k.nlink = k.nlink.saturating_sub(1);
        }
        drop(pg);
        self.update_counts(&c, |k| k.nlink = 0);
        Ok(())
    }

    pub(crate) fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<(), Errno> {
        const NOREPLACE: u32 = libc::RENAME_NOREPLACE;
        const EXCHANGE: u32 = libc::RENAME_EXCHANGE;
        if flags & !(NOREPLACE | EXCHANGE | libc::RENAME_WHITEOUT) != 0 || flags & libc::RENAME_WHITEOUT != 0 {
            return Err(Errno::EINVAL);
        }
        if flags & NOREPLACE != 0 && flags & EXCHANGE != 0 {
            return Err(Errno::EINVAL);
        }
        let (name, newname) = (name_bytes(name)?, name_bytes(newname)?);
        if is_dot(name) || is_dot(newname) {
            return Err(Errno::from_raw(libc::EBUSY));
        }
        let p1 = self.node(parent)?;
        let p2 = self.node(newparent)?;
        let cross = p1.ino != p2.ino;
        let _serial = if cross { Some(self.rename_lock.lock().unwrap_or_else(|e| e.into_inner())) } else { None };
        let mut dirs = if !cross {
            DirPair { a: p1.write(), b: None }
        } else {
            let p1_first = if self.is_ancestor(p1.ino, p2.ino) {
                true
            } else if self.is_ancestor(p2.ino, p1.ino) {
                false
            } else {
                p1.ino < p2.ino
            };
            if p1_first {
                let a = p1.write();
                DirPair { a, b: Some(p2.write()) }
            } else {
                let b = p2.write();
                DirPair { a: p1.write(), b: Some(b) }
            }
        };
        let now = Timespec::now();
        let src = dirs.a().dir()?.get(name).ok_or(Errno::ENOENT)?;
        let d2 = dirs.b().dir()?;
        if d2.unlinked {
            return Err(Errno::ENOENT);
        }
        let dst = d2.get(newname);
        if flags & NOREPLACE != 0 && dst.is_some() {
            return Err(Errno::EEXIST);
        }
        let mut touched: Vec<Arc<Node>> = Vec::with_capacity(2);
        if flags & EXCHANGE != 0 {
            let dst = dst.ok_or(Errno::ENOENT)?;
            if dst.ino == src.ino {
                return Ok(());
            }
            if cross
                && ((src.is_dir() && self.is_ancestor(src.ino, p2.ino))
                    || (dst.is_dir() && self.is_ancestor(dst.ino, p1.ino)))
            {
                return Err(Errno::EINVAL);
            }
            let (sn, dn) = (self.node(src.ino)?, self.node(dst.ino)?);
            dirs.a().dir_mut()?.repoint(name, dst.ino, dst.kind);
            dirs.b().dir_mut()?.repoint(newname, src.ino, src.kind);
            if cross {
                if src.is_dir() {
                    sn.parent.store(p2.ino, Ordering::Release);
                    self.move_subdir_link(&p1, &p2);
                }
                if dst.is_dir() {
                    dn.parent.store(p1.ino, Ordering::Release);
                    self.move_subdir_link(&p2, &p1);
                }
            }
            touched.push(sn);
            touched.push(dn);
        } else {
            if let Some(dst) = dst {
                if dst.ino == src.ino {
                    return Ok(()); // two names of one file: POSIX says do nothing
                }
            }
            let sn = self.node(src.ino)?;
            if src.is_dir() && cross && self.is_ancestor(src.ino, p2.ino) {
                return Err(Errno::EINVAL);
            }
            let victim = match dst {
                Some(dst) => Some((dst, self.node(dst.ino)?)),
                None => None,
            };
            match (&victim, src.is_dir()) {
                (Some((dst, _)), false) if dst.is_dir() => return Err(Errno::EISDIR),
                (Some((dst, _)), true) if !dst.is_dir() => return Err(Errno::ENOTDIR),
                _ => {}
            }
            // A directory being replaced is locked after both parents (it is a
            // child of the second); one that contains the source is not empty.
            let victim_node = victim.as_ref().map(|v| v.1.clone());
            let mut victim_dir = None;
            if let (Some((dst, _)), Some(vn)) = (&victim, &victim_node) {
                if dst.is_dir() {
                    if cross && self.is_ancestor(dst.ino, p1.ino) {
                        return Err(Errno::ENOTEMPTY);
                    }
                    let vg = vn.write();
                    if !vg.dir()?.is_empty() {
                        return Err(Errno::ENOTEMPTY);
                    }
                    victim_dir = Some(vg);
                }
            }
            dirs.a().dir_mut()?.remove(name);
            dirs.b().dir_mut()?.insert(newname, src.ino, src.kind);
            if src.is_dir() && cross {
                sn.parent.store(p2.ino, Ordering::Release);
                self.move_subdir_link(&p1, &p2);
            }
            if let Some(mut vg) = victim_dir {
                if let Ok(d) = vg.dir_mut() {
                    d.unlinked = true;
                }
                vg.ctime = now;
                let mut k = p2.counts();
                k.nlink = k.nlink.saturating_sub(1);
            }
            touched.push(sn);
            if let Some((dst, vn)) = victim {
                if dst.is_dir() {
                    self.update_counts(&vn, |k| k.nlink = 0);
                } else {
                    self.update_counts(&vn, |k| k.nlink = k.nlink.saturating_sub(1));
                    touched.push(vn);
                }
            }
        }
        dirs.a().touch_modified(now);
        dirs.b().touch_modified(now);
        drop(dirs);
        for n in touched {
            n.write().ctime = now;
        }
        Ok(())
    }

    /// A subdirectory moved from `from` to `to`: its ".." link moves too.
    fn move_subdir_link(&self, from: &Node, to: &Node) {
        {
            let mut k = from.counts();
            k.nlink = k.nlink.saturating_sub(1);
        }
        to.counts().nlink += 1;
    }

    pub(crate) fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> Result<Entry, Errno> {
        let newname = name_bytes(newname)?;
        if is_dot(newname) {
            return Err(Errno::EEXIST);
        }
        let c = self.node(ino)?;
        if c.kind == libc::S_IFDIR {
            return Err(Errno::EPERM);
        }
        let p = self.node(newparent)?;
        let now = Timespec::now();
        {
            let mut pg = p.write();
            let dir = pg.live_dir_mut()?;
            if dir.get(newname).is_some() {
                return Err(Errno::EEXIST);
            }
            {
                let mut k = c.counts();
                if k.freed || (k.nlink == 0 && !k.linkable) {
                    return Err(Errno::ENOENT);
                }
                if k.nlink == u32::MAX {
                    return Err(Errno::EMLINK);
                }
                k.nlink += 1;
                k.linkable = false;
                k.lookups += 1;
            }
            dir.insert(newname, ino, c.kind);
            pg.touch_modified(now);
        }
        let mut g = c.write();
        g.ctime = now;
        Ok(self.entry_of(self.attr_of(&c, &g)))
    }

    pub(crate) fn readlink(&self, ino: u64, out: &mut Vec<u8>) -> Result<(), Errno> {
        let n = self.node(ino)?;
        let g = n.read();
        match &g.content {
            Content::Symlink(t) => {
                out.extend_from_slice(t);
                Ok(())
            }
            _ => Err(Errno::EINVAL),
        }
    }

    // ---- attributes ----

    pub(crate) fn getattr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let n = self.node(ino)?;
        let g = n.read();
        Ok(self.attr_of(&n, &g))
    }

    /// `caller` decides whether a kill of privileges clears sgid.
    pub(crate) fn setattr(&self, ino: u64, set: &SetAttr, caller: &Caller) -> Result<FileAttr, Errno> {
        let n = self.node(ino)?;
        let now = Timespec::now();
        let mut g = n.write();
        if set.size.is_some() || set.uid.is_some() || set.gid.is_some() {
            // File capabilities do not survive a truncate or a change of owner.
            drop_capabilities(&mut g);
        }
        // The size first: it is the only change that can fail.
        if let Some(size) = set.size {
            g.file_mut()?.truncate(size)?;
            g.touch_modified(now);
        }
        // Judged on the file as it was, before a new group (as the VFS does).
        if set.kill_suidgid && set.mode.is_none() {
            kill_suidgid(&mut g, caller);
        }
        if let Some(mode) = set.mode {
            g.mode = (g.mode & libc::S_IFMT) | (mode & 0o7777);
        }
        if let Some(uid) = set.uid {
            g.uid = uid;
        }
        if let Some(gid) = set.gid {
            g.gid = gid;
        }
        let at = |t: TimeOrNow| match t {
            TimeOrNow::Now => now,
            TimeOrNow::Specific(t) => t,
        };
        if let Some(t) = set.atime {
            g.atime = at(t);
        }
        if let Some(t) = set.mtime {
            g.mtime = at(t);
        }
        g.ctime = set.ctime.unwrap_or(now);
        Ok(self.attr_of(&n, &g))
    }

    pub(crate) fn access(&self, caller: Caller, ino: u64, mask: i32) -> Result<(), Errno> {
        let n = self.node(ino)?;
        if mask == libc::F_OK {
            return Ok(());
        }
        let g = n.read();
        let want = (mask & (libc::R_OK | libc::W_OK | libc::X_OK)) as u32;
        if caller.uid == 0 {
            // Root may read and write anything, and execute what someone may.
            if want & libc::X_OK as u32 != 0 && n.kind != libc::S_IFDIR && g.mode & 0o111 == 0 {
                return Err(Errno::EACCES);
            }
            return Ok(());
        }
        let bits = if caller.uid == g.uid {
            (g.mode >> 6) & 7
        } else if caller.in_group(g.gid) {
            (g.mode >> 3) & 7
        } else {
            g.mode & 7
        };
        if want & !bits != 0 {
            return Err(Errno::EACCES);
        }
        Ok(())
    }

    pub(crate) fn statfs(&self) -> Statfs {
        let bs = self.pool.block_size();
        let free = self.pool.free();
        let used_inodes = self.inodes.load(Ordering::Relaxed);
        Statfs {
            blocks: self.pool.total(),
            bfree: free,
            bavail: free,
            files: self.max_inodes,
            ffree: self.max_inodes.saturating_sub(used_inodes),
            bsize: bs,
            namelen: 255,
            frsize: bs,
        }
    }

    /// Inodes in the table now, the root included: each stays until it has
    /// no name, no kernel lookup and no open handle.
    pub fn inode_count(&self) -> u64 {
        self.shards.iter().map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len() as u64).sum()
    }

    /// Bytes of file data held: blocks taken from the pool (a block goes
    /// back when the last reference to its inode drops).
    pub fn data_bytes(&self) -> u64 {
        (self.pool.total() - self.pool.free()) * u64::from(self.pool.block_size())
    }

    // ---- open files ----

    pub(crate) fn open(&self, ino: u64, flags: i32, want_dir: bool, kill: Option<Caller>) -> Result<u64, Errno> {
        let n = self.node(ino)?;
        if want_dir && n.kind != libc::S_IFDIR {
            return Err(Errno::ENOTDIR);
        }
        {
            let mut k = n.counts();
            if k.freed {
                return Err(Errno::ENOENT);
            }
            k.opens += 1;
        }
        // O_TRUNC truncates even with O_RDONLY, as on Linux (the kernel has
        // checked write permission).
        if !want_dir && flags & libc::O_TRUNC != 0 && n.kind == libc::S_IFREG {
            let mut g = n.write();
            if let Ok(f) = g.file_mut() {
                // Shrinking to zero cannot fail.
                let _ = f.truncate(0);
            }
            g.touch_modified(Timespec::now());
            drop_capabilities(&mut g);
            if let Some(caller) = kill {
                kill_suidgid(&mut g, &caller);
            }
        }
        Ok(self.next_handle())
    }

    pub(crate) fn next_handle(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// CREATE found `name` already there: open it as open(2) without O_EXCL would.
    pub(crate) fn open_existing(&self, parent: u64, name: &OsStr, flags: i32) -> Result<Entry, Errno> {
        let e = self.lookup(parent, name)?;
        let opened = match e.attr.kind() {
            libc::S_IFREG => self.open(e.nodeid, flags, false, None).map(|_| ()),
            libc::S_IFDIR => Err(Errno::EISDIR),
            _ => Err(Errno::EEXIST),
        };
        if let Err(err) = opened {
            self.forget(e.nodeid, 1);
            return Err(err);
        }
        let attr = self.getattr(e.nodeid).unwrap_or(e.attr);
        Ok(self.entry_of(attr))
    }

    pub(crate) fn release(&self, ino: u64) {
        if let Some(n) = self.get(ino) {
            self.update_counts(&n, |k| k.opens = k.opens.saturating_sub(1));
        }
    }

    pub(crate) fn read(&self, ino: u64, offset: u64, size: u32, out: &mut Vec<u8>) -> Result<(), Errno> {
        let n = self.node(ino)?;
        let now = Timespec::now();
        let due = {
            let g = n.read();
            g.file()?.read_into(offset, u64::from(size), out);
            atime_due(&g, now)
        };
        if due {
            n.write().atime = now;
        }
        Ok(())
    }

    /// Writes `data`; `kill` (the caller) when the kernel asks to clear
    /// suid/sgid (HANDLE_KILLPRIV_V2). Like any write on Linux, it drops file
    /// capabilities.
    #[cfg(test)]
    pub(crate) fn write(&self, ino: u64, offset: u64, data: &[u8], kill: Option<Caller>) -> Result<usize, Errno> {
        self.write_at(ino, Some(offset), data, kill)
    }

    /// A write at `offset`, or at the end of the file (None: an O_APPEND
    /// open; the end as this file system knows it, under the node's lock).
    pub(crate) fn write_at(
        &self,
        ino: u64,
        offset: Option<u64>,
        data: &[u8],
        kill: Option<Caller>,
    ) -> Result<usize, Errno> {
        let n = self.node(ino)?;
        let mut g = n.write();
        let f = g.file_mut()?;
        let offset = offset.unwrap_or_else(|| f.size());
        let written = f.write(offset, data)?;
        g.touch_modified(Timespec::now());
        drop_capabilities(&mut g);
        if let Some(caller) = kill {
            kill_suidgid(&mut g, &caller);
        }
        Ok(written)
    }

    pub(crate) fn fallocate(&self, ino: u64, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE;
        let n = self.node(ino)?;
        let now = Timespec::now();
        let mut g = n.write();
        let f = g.file_mut()?;
        let before = f.size();
        match mode {
            0 | KEEP => f.allocate(offset, length, mode == KEEP)?,
            m if m == PUNCH | KEEP => f.punch_hole(offset, length)?,
            _ => return Err(Errno::EOPNOTSUPP),
        }
        if mode & PUNCH != 0 || f.size() != before {
            g.touch_modified(now);
        } else {
            g.ctime = now;
        }
        Ok(())
    }

    pub(crate) fn lseek(&self, ino: u64, offset: u64, whence: i32) -> Result<u64, Errno> {
        let n = self.node(ino)?;
        let g = n.read();
        let f = g.file().map_err(|_| Errno::EINVAL)?;
        match whence {
            libc::SEEK_DATA => f.seek_data(offset),
            libc::SEEK_HOLE => f.seek_hole(offset),
            _ => Err(Errno::EINVAL),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn copy_file_range(
        &self,
        ino_in: u64,
        offset_in: u64,
        ino_out: u64,
        offset_out: u64,
        len: u64,
        flags: u32,
    ) -> Result<u64, Errno> {
        if flags != 0 {
            return Err(Errno::EINVAL);
        }
        let len = len.min(MAX_COPY);
        let src = self.node(ino_in)?;
        let dst = self.node(ino_out)?;
        if src.kind != libc::S_IFREG || dst.kind != libc::S_IFREG {
            return Err(if src.kind == libc::S_IFDIR || dst.kind == libc::S_IFDIR {
                Errno::EISDIR
            } else {
                Errno::EINVAL
            });
        }
        let copied = if src.ino == dst.ino {
            let mut g = dst.write();
            let f = g.file_mut()?;
            let avail = f.size().saturating_sub(offset_in).min(len);
            if offset_in < offset_out.saturating_add(avail) && offset_out < offset_in.saturating_add(avail) {
                return Err(Errno::EINVAL);
            }
            let n = copy_range(None, f, offset_in, offset_out, len)?;
            if n > 0 {
                g.touch_modified(Timespec::now());
            }
            n
        } else {
            // Two files: locked in node-id order.
            let (sg, mut dg) = if src.ino < dst.ino {
                let s = src.read();
                (s, dst.write())
            } else {
                let d = dst.write();
                (src.read(), d)
            };
            let n = copy_range(Some(sg.file()?), dg.file_mut()?, offset_in, offset_out, len)?;
            if n > 0 {
                dg.touch_modified(Timespec::now());
            }
            n
        };
        Ok(copied)
    }

    // ---- directories ----

    /// Calls `add(ino, cookie, kind, name)` for the entries after cookie
    /// `offset`, "." and ".." first, until it returns false.
    pub(crate) fn readdir(
        &self,
        ino: u64,
        offset: u64,
        mut add: impl FnMut(u64, u64, u32, &OsStr) -> bool,
    ) -> Result<(), Errno> {
        let n = self.node(ino)?;
        let now = Timespec::now();
        let due = {
            let g = n.read();
            let d = g.dir()?;
            let dots = [(dir::DOT_COOKIE, n.ino, "."), (dir::DOTDOT_COOKIE, n.parent.load(Ordering::Acquire), "..")];
            let mut full = false;
            for (cookie, ino, name) in dots {
                if offset < cookie && !add(ino, cookie, libc::S_IFDIR, OsStr::new(name)) {
                    full = true;
                    break;
                }
            }
            if !full {
                for (cookie, name, e) in d.after(offset) {
                    if !add(e.ino, cookie, e.kind, OsStr::from_bytes(name)) {
                        break;
                    }
                }
            }
            atime_due(&g, now)
        };
        if due {
            n.write().atime = now;
        }
        Ok(())
    }

    /// As [`readdir`](Self::readdir) with attributes. "." and ".." come with
    /// node id 0 (the kernel takes no lookup for them); every other entry
    /// `add` accepts counts as a lookup.
    pub(crate) fn readdirplus(
        &self,
        ino: u64,
        offset: u64,
        mut add: impl FnMut(&Entry, u64, &OsStr) -> bool,
    ) -> Result<(), Errno> {
        let n = self.node(ino)?;
        let g = n.read();
        let d = g.dir()?;
        let dots = [(dir::DOT_COOKIE, n.ino, "."), (dir::DOTDOT_COOKIE, n.parent.load(Ordering::Acquire), "..")];
        for (cookie, ino, name) in dots {
            if offset < cookie {
                let attr = FileAttr { ino, mode: libc::S_IFDIR, ..Default::default() };
                let e = Entry { nodeid: 0, ..self.entry_of(attr) };
                if !add(&e, cookie, OsStr::new(name)) {
                    return Ok(());
                }
            }
        }
        // The directory stays read-locked, so no entry added here can be
        // unlinked (and its inode freed) before its lookup is counted.
        for (cookie, name, e) in d.after(offset) {
            let Some(c) = self.get(e.ino) else { continue };
            let attr = self.attr_of(&c, &c.read());
            if !add(&self.entry_of(attr), cookie, OsStr::from_bytes(name)) {
                break;
            }
            if self.add_lookup(&c).is_err() {
                tracing::warn!(ino = e.ino, "memfs: listed an inode that was already freed");
            }
        }
        Ok(())
    }

    // ---- extended attributes ----

    pub(crate) fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<(), Errno> {
        let name = xattr_name(name)?;
        if value.len() > MAX_XATTR_VALUE {
            return Err(Errno::E2BIG);
        }
        if flags & !(libc::XATTR_CREATE | libc::XATTR_REPLACE) != 0 {
            return Err(Errno::EINVAL);
        }
        let n = self.node(ino)?;
        let mut g = n.write();
        let exists = g.xattrs.contains_key(name);
        if flags & libc::XATTR_CREATE != 0 && exists {
            return Err(Errno::EEXIST);
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return Err(Errno::ENODATA);
        }
        g.xattrs.insert(name.into(), value.into());
        g.ctime = Timespec::now();
        Ok(())
    }

    pub(crate) fn getxattr(&self, ino: u64, name: &OsStr, out: &mut Vec<u8>) -> Result<(), Errno> {
        let name = xattr_name(name)?;
        let n = self.node(ino)?;
        let g = n.read();
        let v = g.xattrs.get(name).ok_or(Errno::ENODATA)?;
        out.extend_from_slice(v);
        Ok(())
    }

    pub(crate) fn listxattr(&self, ino: u64, out: &mut Vec<u8>) -> Result<(), Errno> {
        let n = self.node(ino)?;
        let g = n.read();
        for k in g.xattrs.keys() {
            out.extend_from_slice(k);
            out.push(0);
        }
        Ok(())
    }

    pub(crate) fn removexattr(&self, ino: u64, name: &OsStr) -> Result<(), Errno> {
        let name = xattr_name(name)?;
        let n = self.node(ino)?;
        let mut g = n.write();
        g.xattrs.remove(name).ok_or(Errno::ENODATA)?;
        g.ctime = Timespec::now();
        Ok(())
    }
}

/// Copies up to `len` bytes (stopping at the source's EOF) from `src` (or
/// from `dst` itself when `None`) to `dst`. Holes in the source stay holes
/// where the destination has none; a full pool makes a short copy.
fn copy_range(src: Option<&FileData>, dst: &mut FileData, off_in: u64, off_out: u64, len: u64) -> Result<u64, Errno> {
    let src_size = src.map_or(dst.size(), |s| s.size());
    let len = len.min(src_size.saturating_sub(off_in));
    if len == 0 {
        return Ok(0);
    }
    match off_out.checked_add(len) {
        Some(end) if end <= MAX_FILE_SIZE => {}
        _ => return Err(Errno::EFBIG),
    }
    let bs = u64::from(dst.block_size());
    let mut buf = Vec::with_capacity(bs as usize);
    let mut done = 0u64;
    while done < len {
        let (i, o) = (off_in + done, off_out + done);
        let n = (len - done).min(bs - i % bs).min(bs - o % bs);
        let s = src.unwrap_or(&*dst);
        if s.is_hole(i, n) && dst.is_hole(o, n) {
            done += n;
            continue;
        }
        buf.clear();
        src.unwrap_or(&*dst).read_into(i, n, &mut buf);
        match dst.write(o, &buf) {
            Ok(w) => {
                done += w as u64;
                if (w as u64) < n {
                    break;
                }
            }
            Err(e) if e == Errno::ENOSPC && done > 0 => break,
            Err(e) => return Err(e),
        }
    }
    dst.extend_to(off_out + done)?;
    Ok(done)
}

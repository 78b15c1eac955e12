//! stackfs: a pass-through file system that mirrors a backing directory.
//!
//! Every node is an inode of the backing tree, reached only through
//! descriptors: a lookup is `openat(parent, name, O_PATH | O_NOFOLLOW)`
//! (openat2 with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`
//! where available), and operations on a node use its own descriptor with
//! `AT_EMPTY_PATH` or its `/proc/self/fd/N` magic link. No path string is
//! built from kernel input and no symlink is ever followed, so the mount
//! cannot be made to reach outside the backing directory. Names from the
//! kernel must be single components; "." and ".." are answered without
//! leaving the tree (".." of the root is the root).
//!
//! # Descriptors
//!
//! The daemon's descriptors are bounded per file system, never per open, so
//! one client holding many files open cannot exhaust them for everyone else
//! (RLIMIT_NOFILE is raised to the hard limit at start; the bounds derive
//! from it):
//!
//! - **Inodes**: each node remembers a file handle (name_to_handle_at) and
//!   its `O_PATH` descriptor lives in an LRU of half the limit (less a
//!   reserve), reopened with open_by_handle_at after eviction ([`inodes`]).
//!   That needs CAP_DAC_READ_SEARCH; without it, or on a file system without
//!   file handles, every remembered inode keeps its descriptor and the tree
//!   size is limited by RLIMIT_NOFILE.
//! - **Open files and directories** ([`handles`]): their descriptors live in
//!   a second LRU of a quarter of the limit; an evicted one is reopened from
//!   the node's `O_PATH` descriptor through /proc/self/fd with the open's
//!   own flags (access mode, O_APPEND, O_SYNC/O_DSYNC, O_NOATIME; never
//!   O_CREAT, O_EXCL or O_TRUNC), as the daemon (root: no permission check
//!   the first open did not pass; a non-root daemon can meet EACCES if the
//!   file's mode changed since). A directory stream reopened is positioned
//!   at its cookie with lseek. A passthrough open keeps no descriptor at
//!   all: the kernel holds the backing file, and the few requests that still
//!   reach the daemon for it (fsync, fallocate, lseek, copy_file_range,
//!   setattr, flush on a network file system) reopen one.
//! - **Pinned**: a node keeps its `O_PATH` descriptor outside the LRU when
//!   it has no file handle, and when it is unlinked or renamed over
//!   *through the mount* while it has open files (a descriptor opened just
//!   before the removal becomes the pin; unpinned at its last release): a
//!   reopen through /proc/self/fd works for a deleted file, and that
//!   descriptor is what keeps a deleted file's data alive. So each such file
//!   costs one descriptor while it stays open, as an `O_TMPFILE` file does,
//!   taken from the inode LRU's share (the LRU shrinks to make room, down to
//!   16). Not when all its opens are passthrough opens and the backing file
//!   system reopens a nameless inode by handle while it is held (probed at
//!   start on an `O_TMPFILE` file; ext4 does): the kernel's backing file
//!   holds it then, and requests reopen it by handle.
//!
//! A file unlinked (or replaced) *behind* the mount while open is not seen
//! in time to be pinned. While the descriptor of its open, or its node's
//! `O_PATH` descriptor, is still cached, everything works on the same inode.
//! Once both were evicted, a request that needs a descriptor (a read or
//! write that is not passthrough, fsync, ...) reopens by file handle: if the
//! inode still exists (something else still holds it, e.g. the kernel's
//! passthrough backing file or another process's descriptor of the backing
//! file), that is the same inode and the answer is right; if it is gone, the
//! request fails with ESTALE. It never reaches another file: a handle
//! carries the inode's generation, so a recycled inode number is ESTALE too.
//!
//! # Ownership and permissions
//!
//! When the daemon runs as root and other users' requests reach it (mounted
//! with `-o allow_other`):
//!
//! - **Creating operations** (create, tmpfile, mknod, mkdir, symlink) run with the
//!   thread's file-system uid and gid and its supplementary groups switched
//!   to the caller's (setfsuid/setfsgid and a per-thread setgroups; the groups
//!   come from /proc, since FUSE sends only fsuid and fsgid), restored before
//!   the reply, even on error ([`creds`]). New files are owned by the caller,
//!   a setgid parent directory passes its group (and, to directories, its
//!   setgid bit) on as usual, and the backing file system applies its own
//!   permission checks to the creation exactly as for the caller. Device
//!   nodes can then only be made by root callers.
//! - **Modes**: the kernel applies the caller's umask before it sends the
//!   request, so creating threads run with a private umask of 0: a new
//!   file's mode is what the caller's umask and requested mode give on a
//!   local file system, whatever the daemon's own umask (with or without
//!   `default_permissions`; not with a default ACL on the backing directory,
//!   which the kernel's umask has already been applied against).
//! - **link** creates no inode, so it runs with the daemon's credentials
//!   (linkat with `AT_EMPTY_PATH` needs CAP_DAC_READ_SEARCH, which a switched
//!   fsuid drops).
//! - **Every other operation** runs as the daemon and relies on the kernel's
//!   checks: mount with `default_permissions` (the efuse CLI forces it with
//!   `allow_other`), so the kernel checks modes and ownership against the
//!   attributes stackfs reports, which are the backing ones.
//!
//! When the daemon is not root, every operation runs as the daemon's user and
//! new files belong to it (their modes are still exact).
//!
//! suid and sgid are cleared on write, truncate and chown as the VFS clears
//! them (`HANDLE_KILLPRIV_V2`), with the caller's supplementary groups
//! deciding membership ([`efuse::kills_sgid`]).
//!
//! # The backing tree
//!
//! - **Several file systems**: the backing directory may contain mount
//!   points; stackfs follows them. The mount has one `st_dev`, so `st_ino`
//!   is made unique per mount ([`inomap`]): unchanged on the backing
//!   directory's own file system, tagged with a per-file-system index above
//!   bit 56 elsewhere, so hard-link detection (tar, du, cp -a) stays right.
//! - **Directories moved out of the tree behind the mount** are no longer
//!   reachable through it: resolving a name in such a directory, listing it
//!   anew, or any operation on its node answers ENOENT, also for a process
//!   whose working directory is inside it. With the watcher (`--cache auto`)
//!   this holds as soon as the move is seen (the names the kernel cached
//!   below it are dropped with `FUSE_NOTIFY_INC_EPOCH`); without one
//!   (`--cache none`, `--profile plain`), each directory is checked every
//!   time a name is resolved in it, and names the kernel cached below it may
//!   serve for their TTL (plain: 1 s), as any change behind such a mount
//!   does. Descriptors already open stay usable, as on any file system.
//!   `--cache always` promises nothing changes behind the mount.
//!
//! Locks (POSIX record locks and flock) are kept by stackfs in
//! [`efuse::locks::LockTable`]s, per node, and are not taken on the backing
//! files.
//!
//! # Kernel-side fast paths
//!
//! Each has a rule that keeps it exact, or it is off:
//!
//! - **Names, attributes, negative entries** (`--cache`): `none` answers
//!   with TTL 0; `always` with long TTLs and no watching (the user promises
//!   nothing changes behind the mount); `auto` with long TTLs kept exact by
//!   the backing-directory watcher ([`watch`]), which tells the kernel of
//!   every change made behind the mount; without a watcher, 1 s TTLs
//!   ([`CachePolicy::SHORT`], also the plain profile). A miss is cached as a
//!   negative entry only when the policy's `negative_ttl` is non-zero.
//! - **Page cache** (`FOPEN_KEEP_CACHE`) and **cached listings**
//!   (`FOPEN_CACHE_DIR`): only under a policy that keeps them (exact
//!   caching); the watcher's `inval_inode` drops a changed file's pages and a
//!   changed directory's listing. Symlinks are cached by the kernel: a
//!   symlink's target never changes in place.
//! - **Data path per open** ([`fileio`]): passthrough (the kernel does the
//!   I/O on the backing file), cached or direct, as
//!   [`efuse::policy::PathPolicy`] chooses from the inode's observed reads.
//! - **O_DIRECT** is direct I/O on the backing file on every path: a
//!   passthrough open's backing file is opened by the kernel with the
//!   open's flags; any other open's READs and WRITEs carry the file's flags
//!   as they are at that moment, and one with O_DIRECT is served through a
//!   descriptor opened with O_DIRECT (its own key in the descriptor cache)
//!   with page-aligned memory ([`efuse::buffer`]): the backing page cache is
//!   never filled, and what the device cannot take gets the backing file
//!   system's own errno.
//! - **Stateless opens** (`--no-open`): READ, WRITE, ... arrive with `fh` 0
//!   and are served by a per-inode descriptor ([`fileio::NodeIo`]); real
//!   handles start at 1.
//! - **FLUSH** reaches stackfs only when it carries something: the closing
//!   process's POSIX locks (`--locks daemon`), or a backing file system that
//!   acts on close (network file systems), where it closes a duplicate
//!   descriptor as the caller's close(2) would. Otherwise the session keeps
//!   it off the mount ([`efuse::Capabilities::flush_only_unlocks`]).

mod creds;
mod fileio;
mod handles;
mod inodes;
mod inomap;
mod sys;
mod watch;

use std::cell::RefCell;
use std::ffi::{CStr, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use efuse::abi::consts::fopen;
use efuse::buffer::{self, AlignedBuf};
use efuse::locks::LockTable;
use efuse::policy::{ListingPolicy, PassthroughMode, PathPolicy};
use efuse::{
    name_to_cstr, Caller, Capabilities, Entry, Errno, FileAttr, FileLock, Filesystem, ReplyAttr, ReplyCopy,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLock, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyStatx, ReplyWrite, ReplyXattr, RequestContext, SetAttr, Statfs, TimeOrNow,
};
use efuse::{BackingId, CacheMode, CachePolicy, InitInfo};

use creds::CallerCreds;
use fileio::{OpenPath, Passthrough};
use handles::{CachedFd, FdCache, FdKey, FhCounter, HandleTable, OpenDir, OpenFile};
use inodes::{InodeTable, ROOT_ID};
use watch::{WatchKind, Watcher};

/// How stackfs is set up.
#[derive(Debug, Clone)]
pub struct StackFsConfig {
    /// The directory to mirror.
    pub backing: PathBuf,
    /// Most `O_PATH` descriptors to cache; None derives it from RLIMIT_NOFILE.
    pub max_open_handles: Option<usize>,
    /// Most descriptors of open files and directories to cache; None
    /// derives it from RLIMIT_NOFILE.
    pub max_open_files: Option<usize>,
    /// `--cache`: how long the kernel may trust names, attributes and data.
    pub cache: CacheMode,
    /// `--passthrough`: whether opens may be served by the kernel from the backing file.
    pub passthrough: PassthroughMode,
    /// `--profile plain`: libfuse's behaviour (1 s TTLs, no keep_cache, no
    /// passthrough, no adaptive path choice), the honest baseline.
    pub plain: bool,
}

impl StackFsConfig {
    pub fn new(backing: PathBuf) -> Self {
        StackFsConfig {
            backing,
            max_open_handles: None,
            max_open_files: None,
            cache: CacheMode::Auto,
            passthrough: PassthroughMode::Auto,
            plain: false,
        }
    }
}

/// Why stackfs could not start.
#[derive(Debug, thiserror::Error)]
pub enum StackFsError {
    #[error("backing directory {path}: {source}")]
    BackingMissing { path: PathBuf, source: std::io::Error },
    #[error("backing path {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("cannot open backing directory {path}: {errno}")]
    Open { path: PathBuf, errno: Errno },
    #[error("backing path {0} contains a NUL byte")]
    BadPath(PathBuf),
}

/// Descriptors kept free for pinned nodes and the process itself (transport,
/// watcher, log, control socket) when the cache bounds are derived from
/// RLIMIT_NOFILE: the inode LRU takes half the limit less this, the
/// open-file cache a quarter, so a quarter plus this stays free.
const FD_RESERVE: u64 = 256;

/// Largest READ / xattr value served; larger requests are clamped.
const MAX_IO: usize = 1 << 20;

thread_local! {
    /// READ and xattr data land here, and WRITE data that must be copied to
    /// an aligned place first: one buffer per worker thread, grown to the
    /// largest request seen, so steady-state requests allocate nothing.
    /// Page-aligned, as direct I/O on the backing file needs.
    static IO_BUFFER: RefCell<Option<AlignedBuf>> = const { RefCell::new(None) };
}

/// Runs `f` on this thread's page-aligned I/O buffer, `size` bytes long.
fn with_io_buffer<R>(size: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    IO_BUFFER.with(|b| match b.try_borrow_mut() {
        Ok(mut slot) => {
            if slot.as_ref().is_none_or(|buf| buf.len() < size) {
                *slot = AlignedBuf::new(size.next_multiple_of(buffer::ALIGN)).ok();
            }
            match slot.as_mut() {
                Some(buf) => f(&mut buf.as_mut_slice()[..size]),
                // Out of memory for an aligned buffer: an unaligned one serves
                // all but O_DIRECT (whose pread then answers EINVAL).
                None => f(&mut vec![0u8; size]),
            }
        }
        // Re-entered (cannot happen: replies do not call back): use a fresh buffer.
        Err(_) => match AlignedBuf::new(size) {
            Ok(mut buf) => f(&mut buf.as_mut_slice()[..size]),
            Err(_) => f(&mut vec![0u8; size]),
        },
    })
}

/// Writes all of `data` at `offset`, as far as the backing file takes it.
fn pwrite_all(fd: BorrowedFd<'_>, data: &[u8], offset: u64) -> Result<u32, Errno> {
    let mut done = 0;
    while done < data.len() {
        match sys::pwrite(fd, &data[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e == Errno::EINTR => continue,
            Err(e) if done == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(done.min(u32::MAX as usize) as u32)
}

/// The pass-through file system; see the module documentation.
pub struct StackFs {
    inodes: Arc<InodeTable>,
    files: HandleTable<OpenFile>,
    dirs: HandleTable<OpenDir>,
    /// Listing state of directories read without OPENDIR (`fh` 0), by node id.
    stateless_dirs: HandleTable<OpenDir>,
    /// Whether READDIRPLUS looks up the entries of cold directories.
    listings: ListingPolicy,
    /// The descriptors of open files and directories, bounded.
    fds: FdCache,
    fhs: FhCounter,
    /// A plain descriptor on the backing directory, for syncfs.
    backing_dir: OwnedFd,
    /// Device of the backing directory.
    root_dev: u64,
    /// The inode numbers reported: unique across backing file systems.
    inos: inomap::InoMap,
    cache_mode: CacheMode,
    passthrough_mode: PassthroughMode,
    plain: bool,
    /// What INIT settled: caching, watcher, data paths.
    accel: OnceLock<Accel>,
    /// The backing file system acts on close(2) (network file systems), so
    /// FLUSH closes a duplicate descriptor as the caller's close would.
    flush_backing: bool,
    /// Create-type operations switch to the caller's fsuid/fsgid (we are root).
    act_as_caller: bool,
    posix_locks: LockTable,
    flocks: LockTable,
}

/// The fast paths settled at INIT.
struct Accel {
    cache: CachePolicy,
    /// Keeps `cache` exact under `--cache auto`.
    watcher: Option<Watcher>,
    paths: PathPolicy,
    /// Registers backing files, when the kernel granted passthrough.
    passthrough: Option<Passthrough>,
    /// OPEN is answered ENOSYS (`--no-open`): files opened by CREATE and
    /// TMPFILE keep no per-open state either ([`InitInfo::stateless_opens`]).
    stateless_opens: bool,
}

/// Before INIT (never reached by the kernel): cache nothing.
static BEFORE_INIT: Accel = Accel {
    cache: CachePolicy::NONE,
    watcher: None,
    paths: PathPolicy { mode: PassthroughMode::Off, passthrough_granted: false, adaptive: false },
    passthrough: None,
    stateless_opens: false,
};

/// File systems whose close(2) does work (flushing, reporting write errors):
/// NFS, SMB/CIFS (three magics), FUSE, Ceph, AFS, 9p, Lustre.
const FLUSHING_FS: [i64; 9] =
    [0x6969, 0x517B, 0xFF53_4D42, 0xFE53_4D42, 0x6573_5546, 0x00C3_6400, 0x5346_414F, 0x0102_1997, 0x0BD0_0BD0];

/// A descriptor to do I/O on: an open file's (`file`), or the inode's own
/// for `fh` 0.
struct IoFd {
    fd: Arc<OwnedFd>,
    file: Option<Arc<OpenFile>>,
}

impl IoFd {
    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The inode's I/O state, for an open regular file.
    fn io(&self) -> Option<&fileio::NodeIo> {
        self.file.as_ref().and_then(|f| f.io.as_ref()).map(|(io, _)| &**io)
    }
}

/// How an open was answered: `FOPEN_*` flags and the backing file for passthrough.
struct Opened {
    fh: u64,
    flags: u32,
    backing: Option<BackingId>,
}

/// Clears suid and sgid as the VFS does when `caller` without CAP_FSETID
/// writes or truncates, or anyone changes the owner (HANDLE_KILLPRIV_V2;
/// [`efuse::kills_sgid`]).
fn kill_suidgid(fd: std::os::fd::BorrowedFd<'_>, caller: &Caller) -> Result<(), Errno> {
    let st = sys::statx(fd)?;
    let mode = st.stx_mode as u32;
    let kill = efuse::kills_sgid(mode, st.stx_gid, caller);
    if kill == 0 {
        return Ok(());
    }
    sys::chmod_fd(fd, mode & 0o7777 & !kill)
}

impl StackFs {
    pub fn new(cfg: StackFsConfig) -> Result<StackFs, StackFsError> {
        let path = cfg.backing.clone();
        let meta =
            std::fs::metadata(&path).map_err(|source| StackFsError::BackingMissing { path: path.clone(), source })?;
        if !meta.is_dir() {
            return Err(StackFsError::NotADirectory(path));
        }
        let nofile = sys::raise_nofile_limit();
        let cpath =
            std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| StackFsError::BadPath(path.clone()))?;
        // SAFETY: AT_FDCWD is always a valid directory argument.
        let cwd = unsafe { std::os::fd::BorrowedFd::borrow_raw(libc::AT_FDCWD) };
        let open = |flags| {
            sys::openat(cwd, &cpath, flags | libc::O_DIRECTORY, 0)
                .map_err(|errno| StackFsError::Open { path: path.clone(), errno })
        };
        let root = open(libc::O_PATH)?;
        let mount_fd = open(libc::O_RDONLY)?;
        let backing_dir = open(libc::O_RDONLY)?;
        let st = sys::statx(root.as_fd()).map_err(|errno| StackFsError::Open { path: path.clone(), errno })?;

        let handles = match sys::name_to_handle(root.as_fd())
            .and_then(|h| sys::open_by_handle(mount_fd.as_fd(), &h, libc::O_PATH))
        {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(
                    "stackfs: file handles unavailable on {} ({e}); every remembered inode keeps a descriptor, \
                     so at most about {} inodes can be in use at once (RLIMIT_NOFILE {nofile})",
                    path.display(),
                    nofile.saturating_sub(FD_RESERVE)
                );
                false
            }
        };
        let bound = cfg.max_open_handles.unwrap_or_else(|| (nofile / 2).saturating_sub(FD_RESERVE).max(64) as usize);
        let file_bound = cfg.max_open_files.unwrap_or_else(|| (nofile / 4).max(32) as usize);
        let flush_backing = sys::fs_type(backing_dir.as_fd()).is_ok_and(|t| FLUSHING_FS.contains(&t));
        tracing::info!(backing = %path.display(), handles, bound, file_bound, nofile, "stackfs ready");
        Ok(StackFs {
            inodes: Arc::new(InodeTable::new(root, &st, mount_fd, bound, handles)),
            files: HandleTable::default(),
            dirs: HandleTable::default(),
            stateless_dirs: HandleTable::default(),
            listings: ListingPolicy::default(),
            fds: FdCache::new(file_bound),
            fhs: FhCounter::default(),
            backing_dir,
            root_dev: sys::statx_key(&st).0,
            inos: inomap::InoMap::new(sys::statx_key(&st).0),
            cache_mode: cfg.cache,
            passthrough_mode: cfg.passthrough,
            plain: cfg.plain,
            accel: OnceLock::new(),
            flush_backing,
            act_as_caller: sys::geteuid() == 0,
            posix_locks: LockTable::posix(),
            flocks: LockTable::flock(),
        })
    }

    fn accel(&self) -> &Accel {
        self.accel.get().unwrap_or(&BEFORE_INIT)
    }

    /// The cache policy replies follow now: the one settled at INIT, or
    /// short TTLs once the watcher has lost track.
    fn cache(&self) -> CachePolicy {
        let a = self.accel();
        match &a.watcher {
            Some(w) if w.degraded() => CachePolicy::SHORT,
            _ => a.cache,
        }
    }

    /// Settles caching and data paths for this mount (at INIT).
    fn settle(&self, info: &InitInfo) -> Accel {
        let conn = info.connection.clone();
        let (cache, watcher) = match (self.cache_mode, self.plain) {
            (CacheMode::None, _) => (CachePolicy::NONE, None),
            (_, true) => (CachePolicy::SHORT, None),
            (CacheMode::Always, false) => (CachePolicy::EXACT, None),
            (CacheMode::Auto, false) => {
                let root = self.inodes.fd(ROOT_ID);
                let started = match (&conn, &root) {
                    (Some(c), Ok(root)) => Watcher::start(self.inodes.clone(), c.clone(), root, self.root_dev),
                    (None, _) => Err("no connection to notify the kernel on".into()),
                    (_, Err(e)) => Err(format!("backing directory: {e}")),
                };
                match started {
                    Ok(w) => (CachePolicy::EXACT, Some(w)),
                    Err(why) => {
                        tracing::info!("stackfs: cannot watch the backing directory ({why}); caching for 1 s");
                        (CachePolicy::SHORT, None)
                    }
                }
            }
        };
        let passthrough = match &conn {
            Some(c) if info.passthrough() && self.passthrough_mode != PassthroughMode::Off => {
                Some(Passthrough::new(c.clone()))
            }
            _ => None,
        };
        let paths = PathPolicy {
            mode: self.passthrough_mode,
            passthrough_granted: passthrough.is_some(),
            adaptive: !self.plain,
        };
        Accel { cache, watcher, paths, passthrough, stateless_opens: info.stateless_opens() }
    }

    /// The attributes reported for a backing inode ([`inomap`]: `st_ino`
    /// unique across the backing file systems).
    fn attr(&self, st: &libc::statx) -> FileAttr {
        let (dev, ino) = sys::statx_key(st);
        FileAttr { ino: self.inos.st_ino(dev, ino), ..FileAttr::from_statx(st) }
    }

    fn entry(&self, nodeid: u64, st: &libc::statx) -> Entry {
        let cache = self.cache();
        Entry { nodeid, generation: 0, attr: self.attr(st), entry_ttl: cache.entry_ttl, attr_ttl: cache.attr_ttl }
    }

    /// A directory node is about to be shown: the watcher must see changes
    /// in it before the kernel may cache anything below it.
    fn watch(&self, id: u64, st: &libc::statx) {
        if st.stx_mode as u32 & libc::S_IFMT != libc::S_IFDIR {
            return;
        }
        let Some(w) = &self.accel().watcher else { return };
        let dev = sys::statx_key(st).0;
        if w.kind() == WatchKind::Fanotify && dev == self.root_dev {
            return;
        }
        if let Ok(fd) = self.inodes.fd(id) {
            w.watch_dir(id, &fd, dev);
        }
    }

    /// Drops lookups; nodes that go away lose their watch, and the
    /// descriptor and listing state that served their `fh` 0.
    fn forget_nodes(&self, nodes: &[(u64, u64)]) {
        let watcher = self.accel().watcher.as_ref();
        self.inodes.forget_many(nodes, |id| {
            if let Some(w) = watcher {
                w.forgotten(id);
            }
            if let Some(dir) = self.stateless_dirs.remove(id) {
                dir.release();
            }
            self.fds.remove(FdKey::Stateless(id));
        })
    }

    /// The descriptor of directory node `id`, for resolving names in it:
    /// ENOENT once the directory is found outside the backing tree (moved
    /// away behind the mount). Checked after every directory move the
    /// watcher reports, and on every use when no watcher reports them.
    fn dir_node_fd(&self, id: u64) -> Result<Arc<OwnedFd>, Errno> {
        let fd = self.inodes.fd(id)?;
        let watched = self.accel().watcher.as_ref().is_some_and(|w| !w.degraded());
        if !self.inodes.still_inside(id, &fd, !watched) {
            return Err(Errno::ENOENT);
        }
        Ok(fd)
    }

    /// The descriptor for I/O on `fh` (from the cache, reopened if it was
    /// evicted or never kept), or for `fh` 0 (stateless opens) the inode's
    /// own, opened for writing when `write`; with O_DIRECT as the open was
    /// opened (never for `fh` 0).
    fn io_fd(&self, ino: u64, fh: u64, write: bool) -> Result<IoFd, Errno> {
        self.data_fd(ino, fh, write, None)
    }

    /// [`io_fd`](Self::io_fd) for a READ or WRITE: `direct` says whether the
    /// request asked for O_DIRECT (None: as the open was opened).
    fn data_fd(&self, ino: u64, fh: u64, write: bool, direct: Option<bool>) -> Result<IoFd, Errno> {
        if fh != 0 {
            let file = self.files.get(fh)?;
            let fd = self.file_fd_for(fh, &file, direct.unwrap_or(file.direct))?;
            return Ok(IoFd { fd, file: Some(file) });
        }
        self.inodes.note_stateless();
        let ifd = self.inodes.fd(ino)?;
        let fd = self.inodes.io(ino)?.stateless_fd(&self.fds, ino, &ifd, write, direct.unwrap_or(false))?;
        Ok(IoFd { fd, file: None })
    }

    /// The descriptor of open file `fh`, reopened from its node with the
    /// open's flags when the cache has none.
    fn file_fd(&self, fh: u64, file: &OpenFile) -> Result<Arc<OwnedFd>, Errno> {
        self.file_fd_for(fh, file, file.direct)
    }

    /// The descriptor of open file `fh` with O_DIRECT (`direct`) or without:
    /// a request may ask otherwise than its open did (`fcntl(F_SETFL)`), and
    /// gets a descriptor of its own then.
    fn file_fd_for(&self, fh: u64, file: &OpenFile, direct: bool) -> Result<Arc<OwnedFd>, Errno> {
        let flags = file.flags | if direct { libc::O_DIRECT } else { 0 };
        let reopen = || sys::reopen(self.inodes.fd(file.ino)?.as_fd(), flags);
        Ok(self.fds.get_or_open(OpenFile::key(fh, direct), reopen, || file.is_live())?.fd)
    }

    /// The descriptor of open directory `fh`, reopened when the cache has none.
    fn dir_fd(&self, fh: u64, dir: &OpenDir) -> Result<CachedFd, Errno> {
        let reopen = || sys::reopen(self.inodes.fd(dir.ino)?.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY);
        self.fds.get_or_open(FdKey::Handle(fh), reopen, || dir.is_live())
    }

    /// Before `name` in `dir` loses its inode (unlink, rename over it): an
    /// `O_PATH` descriptor of it, for [`pinned_if_open`](Self::pinned_if_open)
    /// once it is gone; None when no node has open files.
    fn removal_victim(&self, dir: &OwnedFd, name: &CStr) -> Option<(OwnedFd, libc::statx)> {
        if !self.inodes.may_need_pin() {
            return None;
        }
        let fd = sys::open_path_at(dir.as_fd(), name).ok()?;
        let st = sys::statx(fd.as_fd()).ok()?;
        (st.stx_mode as u32 & libc::S_IFMT != libc::S_IFDIR).then_some((fd, st))
    }

    /// After the removal: pin the victim's node if it has open files and no
    /// name left, so they keep working ([`inodes`]). The descriptor opened
    /// before the removal kept the inode alive until now.
    fn pinned_if_open(&self, victim: Option<(OwnedFd, libc::statx)>) {
        let Some((fd, st)) = victim else { return };
        // Another hard link still names it: reopening by handle works.
        if sys::statx(fd.as_fd()).is_ok_and(|now| now.stx_nlink > 0) {
            return;
        }
        self.inodes.pin_if_open(fd, &st);
    }

    /// Looks `name` up in the directory `dir_fd` of node `parent`; adds one lookup.
    fn lookup_in(&self, parent: u64, dir_fd: &OwnedFd, name: &CStr) -> Result<Entry, Errno> {
        match name.to_bytes() {
            b"." => return self.lookup_self(parent),
            b".." if parent == ROOT_ID => return self.lookup_self(ROOT_ID),
            _ => {}
        }
        let dotdot = name.to_bytes() == b"..";
        let fd = if dotdot {
            // Beneath-only resolution refuses "..": a plain openat, below the root.
            self.fds.open_with_room(|| {
                sys::openat(dir_fd.as_fd(), c"..", libc::O_PATH | libc::O_NOFOLLOW | libc::O_DIRECTORY, 0)
            })?
        } else {
            self.fds.open_with_room(|| sys::open_path_at(dir_fd.as_fd(), name))?
        };
        let st = sys::statx(fd.as_fd())?;
        // The kernel reached `parent` through its parent, so that is a node
        // already; anything else (a directory moved out of the tree behind
        // our back) is not ours to show.
        if dotdot && !self.inodes.knows(sys::statx_key(&st)) {
            return Err(Errno::ENOENT);
        }
        let id = self.inodes.remember(fd, &st)?;
        self.watch(id, &st);
        Ok(self.entry(id, &st))
    }

    fn lookup_self(&self, id: u64) -> Result<Entry, Errno> {
        let fd = self.inodes.fd(id)?;
        let st = sys::statx(fd.as_fd())?;
        self.inodes.add_lookup(id)?;
        Ok(self.entry(id, &st))
    }

    fn do_lookup(&self, parent: u64, dir: &OwnedFd, name: &OsStr) -> Result<Entry, Errno> {
        let mut buf = [0u8; 256];
        let name = name_to_cstr(name, &mut buf)?;
        self.lookup_in(parent, dir, name)
    }

    /// Runs a create-type `op` in `parent` as the caller, then looks the new name up.
    fn create_node(
        &self,
        ctx: &RequestContext<'_>,
        parent: u64,
        name: &OsStr,
        op: impl FnOnce(&OwnedFd, &CStr) -> Result<(), Errno>,
    ) -> Result<Entry, Errno> {
        let mut buf = [0u8; 256];
        let name = new_name(name, &mut buf)?;
        let dir = self.dir_node_fd(parent)?;
        {
            let _as_caller = CallerCreds::assume(ctx, self.act_as_caller)?;
            op(&dir, name)?;
        }
        self.lookup_in(parent, &dir, name)
    }

    /// Records one lookup of the inode of `file`, a descriptor this request
    /// opened (CREATE, O_TMPFILE): the node is that file, whatever its name
    /// leads to by now.
    fn remember_opened(&self, file: &OwnedFd) -> Result<(u64, libc::statx), Errno> {
        let path_fd = self.fds.open_with_room(|| sys::reopen(file.as_fd(), libc::O_PATH))?;
        let st = sys::statx(path_fd.as_fd())?;
        let id = self.inodes.remember(path_fd, &st)?;
        Ok((id, st))
    }

    fn attr_of(&self, ino: u64, fh: Option<u64>) -> Result<FileAttr, Errno> {
        // The open's descriptor if it is at hand; else the node's, which
        // reaches the same inode (an unlinked open one is pinned).
        let st = match fh.filter(|&fh| fh != 0).and_then(|fh| self.fds.get(FdKey::Handle(fh))) {
            Some(f) => sys::statx(f.fd.as_fd())?,
            None => sys::statx(self.inodes.fd(ino)?.as_fd())?,
        };
        Ok(self.attr(&st))
    }

    fn do_setattr(&self, ino: u64, attr: &SetAttr, caller: &Caller) -> Result<FileAttr, Errno> {
        let ifd = self.inodes.fd(ino)?;
        let file = match attr.fh {
            Some(fh) => Some(self.io_fd(ino, fh, attr.size.is_some())?),
            None => None,
        };
        if attr.kill_suidgid && attr.mode.is_none() {
            kill_suidgid(ifd.as_fd(), caller)?;
        }
        if let Some(mode) = attr.mode {
            let mode = mode & 0o7777;
            match &file {
                Some(f) => sys::fchmod(f.fd(), mode)?,
                None => sys::chmod_fd(ifd.as_fd(), mode)?,
            }
        }
        if attr.uid.is_some() || attr.gid.is_some() {
            sys::chown_fd(ifd.as_fd(), attr.uid.unwrap_or(u32::MAX), attr.gid.unwrap_or(u32::MAX))?;
        }
        if let Some(size) = attr.size {
            match &file {
                Some(f) => sys::ftruncate(f.fd(), size)?,
                None => {
                    regular_file(ifd.as_fd())?;
                    let f = sys::reopen(ifd.as_fd(), libc::O_WRONLY)?;
                    sys::ftruncate(f.as_fd(), size)?
                }
            }
        }
        if attr.atime.is_some() || attr.mtime.is_some() {
            let ts = |t: Option<TimeOrNow>| match t {
                None => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
                Some(TimeOrNow::Now) => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW },
                Some(TimeOrNow::Specific(t)) => {
                    libc::timespec { tv_sec: t.sec, tv_nsec: t.nsec.min(999_999_999) as i64 }
                }
            };
            let times = [ts(attr.atime), ts(attr.mtime)];
            match &file {
                Some(f) => sys::utimens_fd(f.fd(), &times)?,
                None => sys::utimens_fd(ifd.as_fd(), &times)?,
            }
        }
        let st = match &file {
            Some(f) => sys::statx(f.fd())?,
            None => sys::statx(ifd.as_fd())?,
        };
        Ok(self.attr(&st))
    }

    /// Opens node `ino` for I/O with `flags`, registering a new `fh`.
    fn open_file(&self, ino: u64, flags: i32) -> Result<Opened, Errno> {
        let ifd = self.inodes.fd(ino)?;
        // O_DIRECT stays: the backing file is opened for direct I/O as the
        // caller asked (see `do_read`); a file system without it refuses
        // the open with EINVAL, as it would refuse the caller.
        let app_direct = flags & libc::O_DIRECT != 0;
        let flags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_PATH);
        regular_file(ifd.as_fd())?;
        let fd = self.fds.open_with_room(|| sys::reopen(ifd.as_fd(), flags))?;
        self.register_file(ino, &ifd, fd, flags, app_direct)
    }

    /// Files the open `fd` of node `ino` under a new `fh`, choosing its data
    /// path (regular files) and the `FOPEN_*` flags to answer with.
    fn register_file(
        &self,
        ino: u64,
        ifd: &Arc<OwnedFd>,
        fd: OwnedFd,
        open_flags: i32,
        app_direct: bool,
    ) -> Result<Opened, Errno> {
        let st = sys::statx(fd.as_fd())?;
        let writable = open_flags & libc::O_ACCMODE != libc::O_RDONLY;
        if self.accel().stateless_opens {
            return Ok(self.register_stateless(ino, ifd, &st, writable));
        }
        let (io, keep) = if st.stx_mode as u32 & libc::S_IFMT == libc::S_IFREG {
            let io = self.inodes.io(ino)?;
            let a = self.accel();
            let (path, keep) = io.open(&a.paths, a.passthrough.as_ref(), &fd, st.stx_size, app_direct, writable);
            (Some((io, path)), keep)
        } else {
            (None, true)
        };
        let (flags, backing) = match io.as_ref().map(|(_, p)| *p) {
            Some(OpenPath::Passthrough(id)) => (0, Some(id)),
            Some(OpenPath::Direct) => (fopen::DIRECT_IO | fopen::PARALLEL_DIRECT_WRITES, None),
            // Pages stay across opens only when every change reaches us.
            Some(OpenPath::Cached) | None if keep && self.cache().keep_cache => (fopen::KEEP_CACHE, None),
            Some(OpenPath::Cached) | None => (0, None),
        };
        let fh = self.fhs.next();
        let passthrough = backing.is_some();
        self.files.insert(fh, OpenFile::new(ino, open_flags, io));
        self.inodes.opened(ino);
        if st.stx_nlink == 0 {
            // O_TMPFILE, or unlinked since the lookup: no name to reopen it
            // by, and this descriptor may be all that keeps it alive.
            if let Ok(path) = sys::dup(ifd.as_fd()) {
                self.inodes.pin_if_open(path, &st);
            }
        }
        if !passthrough {
            self.fds.insert(OpenFile::key(fh, app_direct), fd);
        }
        // A passthrough open drops `fd` here: the kernel holds the backing
        // file, and requests that still need a descriptor reopen one.
        Ok(Opened { fh, flags, backing })
    }

    /// A file opened by CREATE or TMPFILE on a mount with stateless opens:
    /// once the kernel has learnt that OPEN is not implemented it sends no
    /// RELEASE, also not for these, so they get `fh` 0 and keep nothing per
    /// open. The node's `fh` 0 descriptor is opened now, for the writes that
    /// follow; it also keeps an unnamed (O_TMPFILE) file alive until FORGET.
    fn register_stateless(&self, ino: u64, ifd: &Arc<OwnedFd>, st: &libc::statx, writable: bool) -> Opened {
        // A failure here is met again, and reported, by the first READ or WRITE.
        if self.io_fd(ino, 0, writable).is_ok() && st.stx_nlink == 0 {
            if let Ok(path) = sys::dup(ifd.as_fd()) {
                self.inodes.pin_if_open(path, st);
            }
        }
        let flags = if self.cache().keep_cache { fopen::KEEP_CACHE } else { 0 };
        Opened { fh: 0, flags, backing: None }
    }

    /// Undoes `register_file` (RELEASE): the inode's last passthrough open
    /// gives its backing file back.
    fn release_file(&self, fh: u64) {
        let Some(file) = self.files.remove(fh) else { return };
        file.release();
        self.fds.remove(FdKey::Handle(fh));
        self.inodes.closed(file.ino);
        if let Some((io, path)) = &file.io {
            if let Some(id) = io.released(*path) {
                if let Some(p) = &self.accel().passthrough {
                    p.close(id);
                }
            }
        }
    }

    fn do_create(
        &self,
        ctx: &RequestContext<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Result<(Entry, Opened), Errno> {
        let app_direct = flags & libc::O_DIRECT != 0;
        // O_PATH (which the kernel never sends) would drop O_CREAT and open
        // whatever the name is, of any type.
        let flags = (flags | libc::O_CREAT | libc::O_NOFOLLOW) & !(libc::O_NOCTTY | libc::O_PATH);
        let mut buf = [0u8; 256];
        let name = new_name(name, &mut buf)?;
        let dir = self.dir_node_fd(parent)?;
        let fd = {
            let _as_caller = CallerCreds::assume(ctx, self.act_as_caller)?;
            match self.fds.open_with_room(|| sys::openat(dir.as_fd(), name, flags | libc::O_EXCL, mode)) {
                // The name appeared since the kernel's lookup: without
                // O_EXCL, open(O_CREAT) opens what is there.
                Err(e) if e == Errno::EEXIST && flags & libc::O_EXCL == 0 => open_existing(dir.as_fd(), name, flags)?,
                other => other?,
            }
        };
        let (id, st) = self.remember_opened(&fd)?;
        self.opened_node(id, &st, fd, flags, app_direct)
    }

    fn do_tmpfile(
        &self,
        ctx: &RequestContext<'_>,
        parent: u64,
        mode: u32,
        flags: i32,
    ) -> Result<(Entry, Opened), Errno> {
        let app_direct = flags & libc::O_DIRECT != 0;
        let dir = self.dir_node_fd(parent)?;
        let flags = (flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_PATH)) | libc::O_TMPFILE;
        let fd = {
            let _as_caller = CallerCreds::assume(ctx, self.act_as_caller)?;
            self.fds.open_with_room(|| sys::openat(dir.as_fd(), c".", flags, mode & 0o7777))?
        };
        let (id, st) = self.remember_opened(&fd)?;
        self.opened_node(id, &st, fd, flags, app_direct)
    }

    /// Files the open `fd` of the new node `id` (one lookup taken) and
    /// answers with its entry; gives the lookup back if that fails.
    fn opened_node(
        &self,
        id: u64,
        st: &libc::statx,
        fd: OwnedFd,
        flags: i32,
        app_direct: bool,
    ) -> Result<(Entry, Opened), Errno> {
        match self.inodes.fd(id).and_then(|ifd| self.register_file(id, &ifd, fd, flags, app_direct)) {
            Ok(opened) => Ok((self.entry(id, st), opened)),
            Err(e) => {
                self.forget_nodes(&[(id, 1)]);
                Err(e)
            }
        }
    }

    /// A READ; `flags` are the open file's flags now. With O_DIRECT in
    /// them the backing file is read with O_DIRECT too, into a page-aligned
    /// buffer: the backing device serves it, not the backing page cache,
    /// and an offset or size the device cannot take gets the backing file
    /// system's own answer (EINVAL on ext4), as the caller would there.
    fn do_read(&self, ino: u64, fh: u64, offset: u64, size: u32, flags: i32, reply: ReplyData) {
        let direct = flags & libc::O_DIRECT != 0;
        let file = match self.data_fd(ino, fh, false, Some(direct)) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        if let Some(io) = file.io() {
            io.observe_read(offset, size);
        }
        let size = (size as usize).min(MAX_IO);
        with_io_buffer(size, |buf| {
            // Fill the request unless at end of file: FUSE treats a short
            // read as end of file. A short direct read has met the end (the
            // rest would start at an unaligned offset).
            let mut done = 0;
            while done < buf.len() {
                match sys::pread(file.fd(), &mut buf[done..], offset + done as u64) {
                    Ok(0) => break,
                    Ok(n) => {
                        done += n;
                        if direct {
                            break;
                        }
                    }
                    Err(e) if e == Errno::EINTR => continue,
                    Err(e) if done == 0 => return reply.error(e),
                    Err(_) => break,
                }
            }
            reply.data(&buf[..done])
        })
    }

    /// A WRITE; with O_DIRECT in `flags` the backing file is written with
    /// O_DIRECT (see [`do_read`](Self::do_read)), from `data` where it lies
    /// when it is page-aligned (both transports place it so), else from a
    /// page-aligned copy.
    fn do_write(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
        flags: i32,
        kill: Option<Caller>,
    ) -> Result<u32, Errno> {
        let direct = flags & libc::O_DIRECT != 0;
        let file = self.data_fd(ino, fh, true, Some(direct))?;
        if let Some(caller) = &kill {
            // The daemon writes with CAP_FSETID, so the backing file system
            // would keep suid/sgid: clear them as the caller's write would.
            kill_suidgid(file.fd(), caller)?;
        }
        if let Some(io) = file.io() {
            io.observe_write();
        }
        if direct && !buffer::is_aligned(data, buffer::ALIGN) {
            return with_io_buffer(data.len(), |buf| {
                buf.copy_from_slice(data);
                pwrite_all(file.fd(), buf, offset)
            });
        }
        pwrite_all(file.fd(), data, offset)
    }

    fn do_opendir(&self, ino: u64) -> Result<u64, Errno> {
        let ifd = self.dir_node_fd(ino)?;
        let fd = self.fds.open_with_room(|| sys::openat(ifd.as_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0))?;
        let fh = self.fhs.next();
        self.dirs.insert(fh, OpenDir::new(ino));
        self.inodes.opened(ino);
        self.fds.insert(FdKey::Handle(fh), fd);
        Ok(fh)
    }

    /// The open directory `fh` of node `ino` and its descriptor. For `fh` 0
    /// (stateless directory opens) the node's own listing state, shared by
    /// every reader of the directory: each READDIR names its position, and
    /// the stream seeks there when it is elsewhere.
    fn open_dir(&self, ino: u64, fh: u64) -> Result<(Arc<OpenDir>, CachedFd), Errno> {
        if fh != 0 {
            let dir = self.dirs.get(fh)?;
            let fd = self.dir_fd(fh, &dir)?;
            return Ok((dir, fd));
        }
        // Only a node the kernel holds, inside the backing tree.
        let ifd = self.dir_node_fd(ino)?;
        let dir = self.stateless_dirs.get_or_insert_with(ino, || OpenDir::new(ino));
        let reopen = || sys::reopen(ifd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY);
        match self.fds.get_or_open(FdKey::Stateless(ino), reopen, || dir.is_live()) {
            Ok(fd) => Ok((dir, fd)),
            Err(e) => {
                // Not a directory (or gone): keep no state for it.
                if let Some(d) = self.stateless_dirs.remove(ino) {
                    d.release();
                }
                Err(e)
            }
        }
    }

    fn do_readdir(&self, ino: u64, fh: u64, offset: u64, mut reply: ReplyDirectory) {
        let (dir, fd) = match self.open_dir(ino, fh) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        let dir_dev = match sys::statx(fd.fd.as_fd()) {
            Ok(st) => sys::statx_key(&st).0,
            Err(e) => return reply.error(e),
        };
        let mut s = dir.stream.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = s.seek(&fd.fd, fd.serial, offset) {
            return reply.error(e);
        }
        let mut added = 0;
        loop {
            let e = match s.peek(&fd.fd) {
                Ok(Some(e)) => e,
                Ok(None) => break,
                Err(err) if added == 0 => return reply.error(err),
                Err(_) => break,
            };
            let ino = self.inos.st_ino(dir_dev, e.ino);
            if !reply.add(ino, e.off, e.kind(), OsStr::from_bytes(s.name(&e))) {
                break;
            }
            s.consume(&e);
            added += 1;
        }
        drop(s);
        reply.ok()
    }

    fn do_readdirplus(&self, parent: u64, fh: u64, offset: u64, mut reply: ReplyDirectoryPlus) {
        let (dir, fd) = match self.dir_node_fd(parent).and_then(|_| self.open_dir(parent, fh)) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        let mut s = dir.stream.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = s.seek(&fd.fd, fd.serial, offset) {
            return reply.error(e);
        }
        // Entries stackfs holds already go out with their attributes and a
        // lookup. The others too when the program uses what it lists
        // ([`ListingPolicy`]): each costs the daemon a lookup here and saves
        // a LOOKUP round trip when it is opened or stat'ed (grep -r, ls -l,
        // du); else they go out bare (node id 0, which the kernel lists
        // without instantiating), as a lookup of each would be wasted (find).
        // Entries that cannot be looked up go out bare too, so the kernel
        // looks them up itself when they are used and meets the error there.
        let fill = self.listings.fill();
        let mut bare = 0;
        let dir_dev = match sys::statx(fd.fd.as_fd()) {
            Ok(st) => sys::statx_key(&st).0,
            Err(e) => return reply.error(e),
        };
        let mut added = 0;
        loop {
            let e = match s.peek(&fd.fd) {
                Ok(Some(e)) => e,
                Ok(None) => break,
                Err(err) if added == 0 => return reply.error(err),
                Err(_) => break,
            };
            let name = s.name(&e);
            if !reply.fits(name.len()) {
                break;
            }
            let name_os = OsStr::from_bytes(name);
            let dots = name == b"." || name == b"..";
            let looked_up = if dots {
                // The kernel takes neither attributes nor a lookup for these.
                Err(Errno::EINVAL)
            } else if !fill && self.inodes.node_by_key((dir_dev, e.ino)).is_none() {
                bare += 1;
                Err(Errno::EINVAL)
            } else {
                let mut buf = [0u8; 256];
                name_to_cstr(name_os, &mut buf).and_then(|c| self.lookup_in(parent, &fd.fd, c))
            };
            match looked_up {
                Ok(entry) => {
                    if !reply.add(&entry, e.off, name_os) {
                        self.forget_nodes(&[(entry.nodeid, 1)]);
                        break;
                    }
                }
                // Removed since it was listed: skip it.
                Err(err) if err == Errno::ENOENT => {}
                Err(_) => {
                    let attr = FileAttr { ino: self.inos.st_ino(dir_dev, e.ino), mode: e.kind(), ..Default::default() };
                    let entry =
                        Entry { nodeid: 0, generation: 0, attr, entry_ttl: Duration::ZERO, attr_ttl: Duration::ZERO };
                    if !reply.add(&entry, e.off, name_os) {
                        break;
                    }
                }
            }
            s.consume(&e);
            added += 1;
        }
        drop(s);
        self.listings.listed_bare(parent, bare);
        reply.ok()
    }

    fn do_statfs(&self, ino: u64) -> Result<Statfs, Errno> {
        let st = sys::fstatvfs(self.inodes.fd(ino)?.as_fd())?;
        Ok(Statfs {
            blocks: st.f_blocks,
            bfree: st.f_bfree,
            bavail: st.f_bavail,
            files: st.f_files,
            ffree: st.f_ffree,
            bsize: st.f_bsize as u32,
            namelen: st.f_namemax as u32,
            frsize: st.f_frsize as u32,
        })
    }

    /// Replies with `size` bytes of xattr data or the size needed (size 0).
    fn xattr_reply(size: u32, reply: ReplyXattr, call: impl FnOnce(&mut [u8]) -> Result<usize, Errno>) {
        if size == 0 {
            return match call(&mut []) {
                Ok(n) => reply.size(n.min(u32::MAX as usize) as u32),
                Err(e) => reply.error(e),
            };
        }
        with_io_buffer((size as usize).min(MAX_IO), |buf| match call(buf) {
            Ok(n) => reply.data(&buf[..n.min(buf.len())]),
            Err(e) => reply.error(e),
        })
    }
}

/// A name for a new directory entry: a single component, not "." or "..".
fn new_name<'b>(name: &OsStr, buf: &'b mut [u8; 256]) -> Result<&'b CStr, Errno> {
    let name = name_to_cstr(name, buf)?;
    if matches!(name.to_bytes(), b"." | b"..") {
        return Err(Errno::EEXIST);
    }
    Ok(name)
}

/// An xattr name as a C string: up to 255 bytes, any byte but NUL.
fn xattr_name<'b>(name: &OsStr, buf: &'b mut [u8; 256]) -> Result<&'b CStr, Errno> {
    let b = name.as_bytes();
    if b.len() > 255 {
        return Err(Errno::ERANGE);
    }
    if b.is_empty() || b.contains(&0) {
        return Err(Errno::EINVAL);
    }
    buf[..b.len()].copy_from_slice(b);
    buf[b.len()] = 0;
    CStr::from_bytes_with_nul(&buf[..=b.len()]).map_err(|_| Errno::EINVAL)
}

fn reply_entry(reply: ReplyEntry, r: Result<Entry, Errno>) {
    match r {
        Ok(e) => reply.entry(&e),
        Err(e) => reply.error(e),
    }
}

fn reply_empty(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

/// Refuses to open anything but a regular file for I/O. The kernel sends
/// OPEN and size changes only for regular files (it opens special files
/// itself); opening a FIFO here would block the worker for good, and a
/// device would be acted on.
fn regular_file(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    match sys::statx(fd)?.stx_mode as u32 & libc::S_IFMT {
        libc::S_IFREG => Ok(()),
        libc::S_IFDIR => Err(Errno::EISDIR),
        _ => Err(Errno::EINVAL),
    }
}

/// Opens `name` in `dir` for a CREATE that found it existing: a regular file
/// only (the kernel refuses any other answer to CREATE), never by opening
/// something else first, which could block (a FIFO) or act on a device.
fn open_existing(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> Result<OwnedFd, Errno> {
    let path = sys::open_path_at(dir, name)?;
    match sys::statx(path.as_fd())?.stx_mode as u32 & libc::S_IFMT {
        libc::S_IFREG => sys::reopen(path.as_fd(), flags),
        libc::S_IFDIR => Err(Errno::EISDIR),
        _ => Err(Errno::EEXIST),
    }
}

impl Filesystem for StackFs {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            posix_locks: true,
            flock_locks: true,
            atomic_o_trunc: true,
            export_support: false,
            readdirplus: true,
            // suid/sgid are cleared here on write, truncate and open(O_TRUNC)
            // when the kernel asks; the backing file system drops file
            // capabilities itself on every write.
            handle_killpriv_v2: true,
            passthrough: true,
            // A symlink's target never changes in place: a new target is a new inode.
            cache_symlinks: true,
            stateless_open: true,
            // Without OPENDIR the kernel caches every listing: only where
            // the cached listings are kept exact.
            stateless_opendir: self.cache_mode != CacheMode::None && !self.plain,
            writeback_cache: false,
            // FLUSH releases daemon-kept POSIX locks; and on a backing file
            // system that acts on close(2), it closes a duplicate descriptor.
            flush_only_unlocks: !self.flush_backing,
            // Opens may be reused where every change reaches the daemon:
            // through the mount, or from the watcher of the backing tree.
            reusable_opens: self.cache_mode != CacheMode::None && !self.plain,
        }
    }

    fn init(&self, info: &InitInfo) -> Result<(), Errno> {
        let accel = self.settle(info);
        tracing::info!(
            cache = ?accel.cache,
            watcher = ?accel.watcher.as_ref().map(|w| w.kind()),
            passthrough = accel.passthrough.is_some(),
            "stackfs fast paths"
        );
        // A second INIT never reaches a file system; keep the first settlement.
        let _ = self.accel.set(accel);
        Ok(())
    }

    /// The backing directory: its files are the mount's, byte for byte,
    /// with the same inode numbers (on its own file system), owners and
    /// modes. Not on the plain profile (the baseline has no fast paths).
    fn direct_reads(&self) -> Option<OwnedFd> {
        if self.plain {
            return None;
        }
        sys::dup(self.inodes.fd(ROOT_ID).ok()?.as_fd()).ok()
    }

    fn usage(&self) -> efuse::stats::FsUsage {
        let (nodes, held) = self.inodes.usage();
        efuse::stats::FsUsage {
            inodes: Some(nodes as u64),
            data_bytes: None,
            descriptors: Some((held + self.fds.len()) as u64),
        }
    }

    fn destroy(&self) {
        if let Some(w) = &self.accel().watcher {
            w.stop();
        }
    }

    fn lookup(&self, _ctx: &RequestContext<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        self.listings.looked_up(parent);
        // A parent that is gone (or cut off from the tree) answers a plain
        // error: a cached miss below it would outlive its return.
        let dir = match self.dir_node_fd(parent) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        match self.do_lookup(parent, &dir, name) {
            Ok(e) => reply.entry(&e),
            Err(e) if e == Errno::ENOENT => {
                // A negative entry lets the kernel cache the miss; the watcher
                // drops it when the name appears behind the mount.
                let ttl = self.cache().negative_ttl;
                if ttl.is_zero() {
                    return reply.error(e);
                }
                reply.entry(&Entry {
                    nodeid: 0,
                    generation: 0,
                    attr: FileAttr::default(),
                    entry_ttl: ttl,
                    attr_ttl: Duration::ZERO,
                })
            }
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, ino: u64, nlookup: u64) {
        self.forget_nodes(&[(ino, nlookup)])
    }

    fn batch_forget(&self, nodes: &[(u64, u64)]) {
        self.forget_nodes(nodes)
    }

    fn getattr(&self, _ctx: &RequestContext<'_>, ino: u64, fh: Option<u64>, reply: ReplyAttr) {
        match self.attr_of(ino, fh) {
            Ok(a) => reply.attr(&a, self.cache().attr_ttl),
            Err(e) => reply.error(e),
        }
    }

    fn statx(&self, _ctx: &RequestContext<'_>, ino: u64, fh: Option<u64>, _flags: u32, _mask: u32, reply: ReplyStatx) {
        match self.attr_of(ino, fh) {
            Ok(a) => reply.statx(&a, self.cache().attr_ttl),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(&self, ctx: &RequestContext<'_>, ino: u64, attr: &SetAttr, reply: ReplyAttr) {
        match self.do_setattr(ino, attr, &ctx.caller()) {
            Ok(a) => reply.attr(&a, self.cache().attr_ttl),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _ctx: &RequestContext<'_>, ino: u64, reply: ReplyData) {
        let fd = match self.inodes.fd(ino) {
            Ok(fd) => fd,
            Err(e) => return reply.error(e),
        };
        let mut buf = [0u8; libc::PATH_MAX as usize + 1];
        match sys::readlink(fd.as_fd(), &mut buf) {
            Ok(n) if n >= buf.len() => reply.error(Errno::ENAMETOOLONG),
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(&self, ctx: &RequestContext<'_>, parent: u64, name: &OsStr, mode: u32, rdev: u32, reply: ReplyEntry) {
        let r = self.create_node(ctx, parent, name, |dir, name| sys::mknodat(dir.as_fd(), name, mode, rdev as u64));
        reply_entry(reply, r)
    }

    fn mkdir(&self, ctx: &RequestContext<'_>, parent: u64, name: &OsStr, mode: u32, reply: ReplyEntry) {
        let r = self.create_node(ctx, parent, name, |dir, name| sys::mkdirat(dir.as_fd(), name, mode & 0o7777));
        reply_entry(reply, r)
    }

    fn unlink(&self, _ctx: &RequestContext<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut buf = [0u8; 256];
        let r = name_to_cstr(name, &mut buf).and_then(|name| {
            let dir = self.dir_node_fd(parent)?;
            let victim = self.removal_victim(&dir, name);
            sys::unlinkat(dir.as_fd(), name, 0)?;
            self.pinned_if_open(victim);
            Ok(())
        });
        reply_empty(reply, r)
    }

    fn rmdir(&self, _ctx: &RequestContext<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut buf = [0u8; 256];
        let r = name_to_cstr(name, &mut buf)
            .and_then(|name| sys::unlinkat(self.dir_node_fd(parent)?.as_fd(), name, libc::AT_REMOVEDIR));
        reply_empty(reply, r)
    }

    fn symlink(&self, ctx: &RequestContext<'_>, parent: u64, name: &OsStr, target: &OsStr, reply: ReplyEntry) {
        let target = match std::ffi::CString::new(target.as_bytes()) {
            Ok(t) => t,
            Err(_) => return reply.error(Errno::EINVAL),
        };
        let r = self.create_node(ctx, parent, name, |dir, name| sys::symlinkat(&target, dir.as_fd(), name));
        reply_entry(reply, r)
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
        let (mut b1, mut b2) = ([0u8; 256], [0u8; 256]);
        let r = (|| {
            let old = name_to_cstr(name, &mut b1)?;
            let new = name_to_cstr(newname, &mut b2)?;
            let od = self.dir_node_fd(parent)?;
            let nd = self.dir_node_fd(newparent)?;
            let replace = flags & (libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) == 0;
            let victim = if replace { self.removal_victim(&nd, new) } else { None };
            sys::renameat2(od.as_fd(), old, nd.as_fd(), new, flags)?;
            self.pinned_if_open(victim);
            Ok(())
        })();
        reply_empty(reply, r)
    }

    fn link(&self, _ctx: &RequestContext<'_>, ino: u64, newparent: u64, newname: &OsStr, reply: ReplyEntry) {
        let mut buf = [0u8; 256];
        let r = (|| {
            let name = name_to_cstr(newname, &mut buf)?;
            let fd = self.inodes.fd(ino)?;
            let dir = self.dir_node_fd(newparent)?;
            sys::link_fd(fd.as_fd(), dir.as_fd(), name)?;
            self.lookup_in(newparent, &dir, name)
        })();
        reply_entry(reply, r)
    }

    fn open(&self, ctx: &RequestContext<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if ctx.kill_suidgid {
            if let Err(e) = self.inodes.fd(ino).and_then(|fd| kill_suidgid(fd.as_fd(), &ctx.caller())) {
                return reply.error(e);
            }
        }
        match self.open_file(ino, flags) {
            Ok(Opened { fh, flags, backing: Some(id) }) => reply.opened_passthrough(fh, flags, id),
            Ok(Opened { fh, flags, backing: None }) => reply.opened(fh, flags),
            Err(e) => reply.error(e),
        }
    }

    fn read(&self, _ctx: &RequestContext<'_>, ino: u64, fh: u64, offset: u64, size: u32, flags: i32, reply: ReplyData) {
        self.do_read(ino, fh, offset, size, flags, reply)
    }

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
        let kill = (write_flags & efuse::abi::consts::write::KILL_SUIDGID != 0).then(|| ctx.caller());
        match self.do_write(ino, fh, offset, data, flags, kill) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _ctx: &RequestContext<'_>, ino: u64, fh: u64, lock_owner: u64, reply: ReplyEmpty) {
        // FLUSH is how the closing process's POSIX locks go (daemon locks).
        self.posix_locks.release_owner(ino, lock_owner);
        if !self.flush_backing || fh == 0 {
            // Local backing file systems do nothing on close(2).
            return reply.ok();
        }
        // close(dup(fd)): what close(2) of the caller's descriptor would do to
        // the backing file (network file systems flush and report errors here).
        let r = self.files.get(fh).and_then(|f| self.file_fd(fh, &f)).and_then(|fd| sys::dup(fd.as_fd())).map(drop);
        reply_empty(reply, r)
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
            self.flocks.release_owner(ino, owner);
        }
        self.release_file(fh);
        reply.ok()
    }

    fn fsync(&self, _ctx: &RequestContext<'_>, ino: u64, fh: u64, datasync: bool, reply: ReplyEmpty) {
        let r = self.io_fd(ino, fh, false).and_then(|f| sys::fsync(f.fd(), datasync));
        reply_empty(reply, r)
    }

    fn opendir(&self, _ctx: &RequestContext<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        // A cached listing stays valid across opens: the watcher drops it
        // (inval_inode of the directory) when the directory changes.
        let flags = if self.cache().cache_dir { fopen::CACHE_DIR | fopen::KEEP_CACHE } else { 0 };
        match self.do_opendir(ino) {
            Ok(fh) => reply.opened(fh, flags),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _ctx: &RequestContext<'_>, ino: u64, fh: u64, offset: u64, reply: ReplyDirectory) {
        self.do_readdir(ino, fh, offset, reply)
    }

    fn readdirplus(&self, _ctx: &RequestContext<'_>, ino: u64, fh: u64, offset: u64, reply: ReplyDirectoryPlus) {
        self.do_readdirplus(ino, fh, offset, reply)
    }

    fn releasedir(&self, _ctx: &RequestContext<'_>, _ino: u64, fh: u64, _flags: i32, reply: ReplyEmpty) {
        if let Some(dir) = self.dirs.remove(fh) {
            dir.release();
            self.fds.remove(FdKey::Handle(fh));
            self.inodes.closed(dir.ino);
        }
        reply.ok()
    }

    fn fsyncdir(&self, _ctx: &RequestContext<'_>, ino: u64, fh: u64, datasync: bool, reply: ReplyEmpty) {
        let r = self.open_dir(ino, fh).and_then(|(_, fd)| sys::fsync(fd.fd.as_fd(), datasync));
        reply_empty(reply, r)
    }

    fn statfs(&self, _ctx: &RequestContext<'_>, ino: u64, reply: ReplyStatfs) {
        match self.do_statfs(ino) {
            Ok(s) => reply.statfs(&s),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(&self, _ctx: &RequestContext<'_>, ino: u64, name: &OsStr, value: &[u8], flags: i32, reply: ReplyEmpty) {
        let mut buf = [0u8; 256];
        let r =
            xattr_name(name, &mut buf).and_then(|name| sys::setxattr(self.inodes.fd(ino)?.as_fd(), name, value, flags));
        reply_empty(reply, r)
    }

    fn getxattr(&self, _ctx: &RequestContext<'_>, ino: u64, name: &OsStr, size: u32, reply: ReplyXattr) {
        let mut buf = [0u8; 256];
        let prep = xattr_name(name, &mut buf).and_then(|name| Ok((name, self.inodes.fd(ino)?)));
        match prep {
            Ok((name, fd)) => Self::xattr_reply(size, reply, |out| sys::getxattr(fd.as_fd(), name, out)),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _ctx: &RequestContext<'_>, ino: u64, size: u32, reply: ReplyXattr) {
        match self.inodes.fd(ino) {
            Ok(fd) => Self::xattr_reply(size, reply, |out| sys::listxattr(fd.as_fd(), out)),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, _ctx: &RequestContext<'_>, ino: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut buf = [0u8; 256];
        let r = xattr_name(name, &mut buf).and_then(|name| sys::removexattr(self.inodes.fd(ino)?.as_fd(), name));
        reply_empty(reply, r)
    }

    fn access(&self, _ctx: &RequestContext<'_>, ino: u64, mask: i32, reply: ReplyEmpty) {
        let r = self.inodes.fd(ino).and_then(|fd| sys::access_fd(fd.as_fd(), mask));
        reply_empty(reply, r)
    }

    fn create(&self, ctx: &RequestContext<'_>, parent: u64, name: &OsStr, mode: u32, flags: i32, reply: ReplyCreate) {
        match self.do_create(ctx, parent, name, mode, flags) {
            Ok((entry, Opened { fh, flags, backing: Some(id) })) => reply.created_passthrough(&entry, fh, flags, id),
            Ok((entry, Opened { fh, flags, backing: None })) => reply.created(&entry, fh, flags),
            Err(e) => reply.error(e),
        }
    }

    fn tmpfile(&self, ctx: &RequestContext<'_>, parent: u64, mode: u32, flags: i32, reply: ReplyCreate) {
        match self.do_tmpfile(ctx, parent, mode, flags) {
            Ok((entry, Opened { fh, flags, backing: Some(id) })) => reply.created_passthrough(&entry, fh, flags, id),
            Ok((entry, Opened { fh, flags, backing: None })) => reply.created(&entry, fh, flags),
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
        let table = if flock { &self.flocks } else { &self.posix_locks };
        table.setlk(ctx, ino, owner, lock, sleep, reply)
    }

    fn fallocate(
        &self,
        _ctx: &RequestContext<'_>,
        ino: u64,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = self.io_fd(ino, fh, true).and_then(|f| sys::fallocate(f.fd(), mode, offset, length));
        reply_empty(reply, r)
    }

    fn lseek(&self, _ctx: &RequestContext<'_>, ino: u64, fh: u64, offset: u64, whence: i32, reply: ReplyLseek) {
        match self.io_fd(ino, fh, false).and_then(|f| sys::lseek(f.fd(), offset, whence)) {
            Ok(off) => reply.offset(off),
            Err(e) => reply.error(e),
        }
    }

    fn copy_file_range(
        &self,
        _ctx: &RequestContext<'_>,
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
        let r = (|| {
            let fin = self.io_fd(ino_in, fh_in, false)?;
            let fout = self.io_fd(ino_out, fh_out, true)?;
            sys::copy_file_range(fin.fd(), offset_in, fout.fd(), offset_out, len, flags)
        })();
        match r {
            Ok(n) => reply.copied(n as u64),
            Err(e) => reply.error(e),
        }
    }

    fn syncfs(&self, _ctx: &RequestContext<'_>, _ino: u64, reply: ReplyEmpty) {
        reply_empty(reply, sys::syncfs(self.backing_dir.as_fd()))
    }
}

#[cfg(test)]
mod tests;

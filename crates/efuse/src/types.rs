//! The plain values a file system hands to efuse and receives from it:
//! attributes, entries, times, errors and the request context.

use std::ffi::CStr;
use std::fmt;
use std::time::Duration;

use efuse_abi::structs as abi;

/// An error number (`errno`) to answer a request with. Always positive.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(i32);

impl Errno {
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const EBADF: Errno = Errno(libc::EBADF);
    pub const EAGAIN: Errno = Errno(libc::EAGAIN);
    pub const ENOMEM: Errno = Errno(libc::ENOMEM);
    pub const EACCES: Errno = Errno(libc::EACCES);
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    pub const EXDEV: Errno = Errno(libc::EXDEV);
    pub const ENOTDIR: Errno = Errno(libc::ENOTDIR);
    pub const EISDIR: Errno = Errno(libc::EISDIR);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const EMFILE: Errno = Errno(libc::EMFILE);
    pub const EFBIG: Errno = Errno(libc::EFBIG);
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    pub const ESPIPE: Errno = Errno(libc::ESPIPE);
    pub const EROFS: Errno = Errno(libc::EROFS);
    pub const EMLINK: Errno = Errno(libc::EMLINK);
    pub const ERANGE: Errno = Errno(libc::ERANGE);
    pub const EDEADLK: Errno = Errno(libc::EDEADLK);
    pub const ENAMETOOLONG: Errno = Errno(libc::ENAMETOOLONG);
    pub const ENOLCK: Errno = Errno(libc::ENOLCK);
    pub const ENOSYS: Errno = Errno(libc::ENOSYS);
    pub const ENOTEMPTY: Errno = Errno(libc::ENOTEMPTY);
    pub const ELOOP: Errno = Errno(libc::ELOOP);
    pub const ENODATA: Errno = Errno(libc::ENODATA);
    pub const EOPNOTSUPP: Errno = Errno(libc::EOPNOTSUPP);
    pub const EOVERFLOW: Errno = Errno(libc::EOVERFLOW);
    pub const EINTR: Errno = Errno(libc::EINTR);
    pub const E2BIG: Errno = Errno(libc::E2BIG);
    pub const ENXIO: Errno = Errno(libc::ENXIO);
    pub const ESTALE: Errno = Errno(libc::ESTALE);

    /// From a raw errno; zero, negative or absurd values become EIO so that a
    /// bug can never turn into a success reply. Linux refuses a reply whose
    /// error is 512 or more (kernel-internal codes) before matching it to its
    /// request, which would then wait forever (fs/fuse/dev.c).
    pub fn from_raw(e: i32) -> Errno {
        if e > 0 && e < 512 {
            Errno(e)
        } else {
            Errno::EIO
        }
    }

    /// The errno of the calling thread's last failed libc call.
    pub fn last() -> Errno {
        Errno::from_raw(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
    }

    pub fn raw(self) -> i32 {
        self.0
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl From<std::io::Error> for Errno {
    fn from(e: std::io::Error) -> Errno {
        Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

impl std::error::Error for Errno {}

/// A point in time as seconds and nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

impl Timespec {
    pub const fn new(sec: i64, nsec: u32) -> Timespec {
        Timespec { sec, nsec }
    }

    /// The current wall-clock time.
    pub fn now() -> Timespec {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes one timespec to a valid pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
        Timespec { sec: ts.tv_sec, nsec: ts.tv_nsec as u32 }
    }
}

/// A new time for `setattr`: the present moment or a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeOrNow {
    Now,
    Specific(Timespec),
}

/// The attributes of an inode, as `stat(2)` reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileAttr {
    /// Inode number shown to applications (`st_ino`); need not equal the node id.
    pub ino: u64,
    pub size: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    /// Birth time, when the file system knows it (reported by STATX only).
    pub btime: Option<Timespec>,
    /// File type and permission bits, as `st_mode`.
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

impl FileAttr {
    /// From a `struct stat`.
    pub fn from_stat(st: &libc::stat) -> FileAttr {
        FileAttr {
            ino: st.st_ino,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: Timespec::new(st.st_atime, st.st_atime_nsec as u32),
            mtime: Timespec::new(st.st_mtime, st.st_mtime_nsec as u32),
            ctime: Timespec::new(st.st_ctime, st.st_ctime_nsec as u32),
            btime: None,
            mode: st.st_mode,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
        }
    }

    /// From a `struct statx` (btime kept when the mask says it is valid).
    pub fn from_statx(st: &libc::statx) -> FileAttr {
        let t = |t: &libc::statx_timestamp| Timespec::new(t.tv_sec, t.tv_nsec);
        FileAttr {
            ino: st.stx_ino,
            size: st.stx_size,
            blocks: st.stx_blocks,
            atime: t(&st.stx_atime),
            mtime: t(&st.stx_mtime),
            ctime: t(&st.stx_ctime),
            btime: if st.stx_mask & libc::STATX_BTIME != 0 { Some(t(&st.stx_btime)) } else { None },
            mode: st.stx_mode as u32,
            nlink: st.stx_nlink,
            uid: st.stx_uid,
            gid: st.stx_gid,
            rdev: libc::makedev(st.stx_rdev_major, st.stx_rdev_minor) as u32,
            blksize: st.stx_blksize,
        }
    }

    /// The file type bits (`mode & S_IFMT`).
    pub fn kind(&self) -> u32 {
        self.mode & libc::S_IFMT
    }

    pub(crate) fn to_abi(self) -> abi::Attr {
        abi::Attr {
            ino: self.ino,
            size: self.size,
            blocks: self.blocks,
            atime: self.atime.sec as u64,
            mtime: self.mtime.sec as u64,
            ctime: self.ctime.sec as u64,
            atimensec: self.atime.nsec,
            mtimensec: self.mtime.nsec,
            ctimensec: self.ctime.nsec,
            mode: self.mode,
            nlink: self.nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: self.rdev,
            blksize: self.blksize,
            flags: 0,
        }
    }

    pub(crate) fn to_statx(self) -> abi::Statx {
        let t = |t: Timespec| abi::SxTime { tv_sec: t.sec, tv_nsec: t.nsec, reserved: 0 };
        let mut mask = libc::STATX_BASIC_STATS;
        let btime = match self.btime {
            Some(b) => {
                mask |= libc::STATX_BTIME;
                t(b)
            }
            None => abi::SxTime::default(),
        };
        abi::Statx {
            mask,
            blksize: self.blksize,
            nlink: self.nlink,
            uid: self.uid,
            gid: self.gid,
            mode: self.mode as u16,
            ino: self.ino,
            size: self.size,
            blocks: self.blocks,
            atime: t(self.atime),
            btime,
            ctime: t(self.ctime),
            mtime: t(self.mtime),
            rdev_major: libc::major(self.rdev as libc::dev_t),
            rdev_minor: libc::minor(self.rdev as libc::dev_t),
            ..Default::default()
        }
    }
}

/// The answer to a LOOKUP (and to MKNOD, MKDIR, SYMLINK, LINK, CREATE): which
/// node a name leads to, its attributes, and how long the kernel may cache them.
///
/// Each entry replied (except with `nodeid` 0, a negative entry) adds one to the
/// node's lookup count; the kernel takes it back with FORGET.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The node id the kernel will use in later requests; 0 caches a negative entry.
    pub nodeid: u64,
    /// Must make (nodeid, generation) unique over the file system's life.
    pub generation: u64,
    pub attr: FileAttr,
    /// How long the kernel may trust the name -> node mapping.
    pub entry_ttl: Duration,
    /// How long the kernel may trust the attributes.
    pub attr_ttl: Duration,
}

impl Entry {
    pub(crate) fn to_abi(self) -> abi::EntryOut {
        abi::EntryOut {
            nodeid: self.nodeid,
            generation: self.generation,
            entry_valid: self.entry_ttl.as_secs(),
            attr_valid: self.attr_ttl.as_secs(),
            entry_valid_nsec: self.entry_ttl.subsec_nanos(),
            attr_valid_nsec: self.attr_ttl.subsec_nanos(),
            attr: self.attr.to_abi(),
        }
    }
}

/// The attribute changes of a SETATTR; `None` leaves a field alone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetAttr {
    /// Permission bits (and suid/sgid/sticky); the type bits are not to be changed.
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
    pub ctime: Option<Timespec>,
    /// The open file the change came through (ftruncate, fchmod, ...).
    pub fh: Option<u64>,
    /// The kernel asks to clear suid/sgid (with `HANDLE_KILLPRIV_V2`): suid
    /// always, sgid when the file is group-executable or the caller is not in
    /// its group (see [`kills_sgid`]).
    pub kill_suidgid: bool,
}

/// The mode bits a write, truncate or chown by `caller` clears from a file
/// of `mode` and group `file_gid`, as Linux's VFS does when the kernel leaves
/// it to the file system (`HANDLE_KILLPRIV_V2`): suid always; sgid when the
/// file is group-executable, or when the caller is neither in the file's
/// group (primary or supplementary) nor privileged. The kernel asks only on
/// writes and truncates by callers without CAP_FSETID, and on every chown.
pub fn kills_sgid(mode: u32, file_gid: u32, caller: &Caller) -> u32 {
    // Never asked for directories; an empty SETATTR (a chown that changes
    // nothing) reaches them too, and must leave their setgid bit alone.
    if mode & libc::S_IFMT == libc::S_IFDIR {
        return 0;
    }
    let mut kill = libc::S_ISUID;
    if mode & libc::S_ISGID != 0 && (mode & libc::S_IXGRP != 0 || !caller.in_group_or_capable(file_gid)) {
        kill |= libc::S_ISGID;
    }
    mode & kill
}

/// Who sent a request, for the permission decisions the kernel leaves to
/// the file system. FUSE sends the caller's fsuid, fsgid and thread id, not
/// its supplementary groups: those are read from `/proc/PID/status` when a
/// decision needs them (rarely: group membership of a suid/sgid file).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Thread id of the caller in the daemon's pid namespace; 0 when unknown
    /// (a caller in another pid namespace, or a request of the kernel's own).
    pub pid: u32,
}

impl Caller {
    /// Whether the caller is a member of group `gid`: its fsgid, or one of its
    /// supplementary groups. A caller whose groups cannot be read (it is
    /// gone, or `pid` is 0) counts as a member of its fsgid only.
    pub fn in_group(&self, gid: u32) -> bool {
        gid == self.gid || self.supplementary_groups().is_some_and(|g| g.contains(&gid))
    }

    /// [`in_group`](Self::in_group), or privileged: fsuid 0 stands for
    /// CAP_FSETID, as FUSE sends no capabilities.
    pub fn in_group_or_capable(&self, gid: u32) -> bool {
        self.uid == 0 || self.in_group(gid)
    }

    /// The caller's supplementary groups, from `/proc/PID/status`; None when
    /// they cannot be read.
    pub fn supplementary_groups(&self) -> Option<Vec<u32>> {
        if self.pid == 0 {
            return None;
        }
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        parse_groups(&status)
    }
}

/// The `Groups:` line of a `/proc/PID/status` text.
fn parse_groups(status: &str) -> Option<Vec<u32>> {
    let line = status.lines().find_map(|l| l.strip_prefix("Groups:"))?;
    line.split_whitespace().map(|g| g.parse().ok()).collect()
}

/// File system statistics, as `statvfs(3)` reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// A byte-range lock, as in `struct flock` with `l_whence = SEEK_SET`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileLock {
    pub start: u64,
    /// Inclusive last byte; `u64::MAX` (`OFFSET_MAX`) means to the end of file.
    pub end: u64,
    /// `F_RDLCK`, `F_WRLCK` or `F_UNLCK`.
    pub typ: i32,
    pub pid: u32,
}

/// What the file system declares it can honour. efuse negotiates with the kernel
/// only the capabilities set here (and those it implements itself).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// POSIX record locks are implemented (`getlk`/`setlk`); else the kernel
    /// keeps them locally.
    pub posix_locks: bool,
    /// BSD `flock` locks are implemented (`setlk` with `flock = true`).
    pub flock_locks: bool,
    /// `open` honours `O_TRUNC` itself.
    pub atomic_o_trunc: bool,
    /// `lookup` answers "." and ".." (needed for NFS export).
    pub export_support: bool,
    /// `readdirplus` is implemented.
    pub readdirplus: bool,
    /// The file system clears suid/sgid on write, truncate and chown as the VFS does.
    pub handle_killpriv_v2: bool,
    /// The file system can hand open files to the kernel for passthrough I/O
    /// (its bytes are the backing file's, unchanged).
    pub passthrough: bool,
    /// Symlink targets never change in place: the kernel may cache READLINK.
    pub cache_symlinks: bool,
    /// READ/WRITE work without per-open state (with fh 0), so the mount may run
    /// without OPEN and RELEASE requests (FUSE_NO_OPEN_SUPPORT).
    pub stateless_open: bool,
    /// READDIR works without OPENDIR (fh 0), so the mount may run without
    /// OPENDIR and RELEASEDIR requests. The kernel then caches every listing
    /// (as with `FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE`, checked against the
    /// directory's mtime at each opendir), so set it only where listings may
    /// be cached.
    pub stateless_opendir: bool,
    /// WRITE handles the kernel's writeback cache (writes with a guessed fh,
    /// the kernel authoritative for size and mtime).
    pub writeback_cache: bool,
    /// `flush` does nothing but release the closing process's POSIX locks:
    /// close(2) does no work and reports no error of this file system's.
    /// With the locks kept by the kernel, FLUSH then carries no
    /// information, and the session keeps it off the mount: opens are
    /// answered with `FOPEN_NOFLUSH`, and a FLUSH that comes all the same
    /// (stateless opens, the writeback cache) is answered ENOSYS, after
    /// which the kernel sends none. Off by default: a file system that
    /// acts on close must see every FLUSH.
    pub flush_only_unlocks: bool,
    /// A read-only open's answer depends on nothing but the file and the
    /// caller's credentials, RELEASE does nothing a later OPEN would need,
    /// and every change to a file reaches the daemon (through the mount or
    /// notified): a bypass client may keep such a handle after its last
    /// close and reuse it for the next open of the unchanged file, with no
    /// OPEN. Off by default: a file system that revalidates at open (a
    /// remote store) must see every OPEN.
    pub reusable_opens: bool,
}

/// Who sent a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestContext<'a> {
    pub unique: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    /// The caller's umask, on MKNOD, MKDIR and CREATE (the kernel already applied it to `mode`).
    pub umask: u32,
    /// On OPEN and CREATE with `HANDLE_KILLPRIV_V2`: the open truncates on
    /// behalf of a caller without CAP_FSETID, so suid (and sgid, if group
    /// executable) must be cleared.
    pub kill_suidgid: bool,
    pub(crate) interrupts: &'a std::sync::Arc<crate::session::Interrupts>,
}

impl RequestContext<'_> {
    /// The caller, for permission decisions (see [`Caller`]).
    pub fn caller(&self) -> Caller {
        Caller { uid: self.uid, gid: self.gid, pid: self.pid }
    }

    /// The kernel asked to interrupt this request (the caller got a signal).
    /// Long-running operations should check it and answer EINTR.
    pub fn is_interrupted(&self) -> bool {
        self.interrupts.contains(self.unique)
    }

    /// Runs `f` once, on the thread that receives the kernel's INTERRUPT,
    /// when this request is interrupted (a waiting lock gives up that way).
    /// Err(f) when it already is: act on it at once. `f` must not block.
    pub fn on_interrupt<F: FnOnce() + Send + 'static>(&self, f: F) -> Result<(), F> {
        self.interrupts.on_interrupt(self.unique, f)
    }

    /// A handle to ask the same question later, from another thread.
    pub fn interrupt_token(&self) -> InterruptToken {
        InterruptToken { interrupts: self.interrupts.clone(), unique: self.unique }
    }
}

/// Whether one request has been interrupted; see [`RequestContext::interrupt_token`].
#[derive(Debug, Clone)]
pub struct InterruptToken {
    interrupts: std::sync::Arc<crate::session::Interrupts>,
    unique: u64,
}

impl InterruptToken {
    pub fn is_interrupted(&self) -> bool {
        self.interrupts.contains(self.unique)
    }
}

/// Converts a name from the kernel into a `CStr` for a libc call, using `buf`
/// as storage. Fails with ENAMETOOLONG past 255 bytes and EINVAL on a '/' or NUL.
pub fn name_to_cstr<'b>(name: &std::ffi::OsStr, buf: &'b mut [u8; 256]) -> Result<&'b CStr, Errno> {
    use std::os::unix::ffi::OsStrExt;
    let b = name.as_bytes();
    if b.len() > 255 {
        return Err(Errno::ENAMETOOLONG);
    }
    if b.is_empty() || b.contains(&b'/') || b.contains(&0) {
        return Err(Errno::EINVAL);
    }
    buf[..b.len()].copy_from_slice(b);
    buf[b.len()] = 0;
    CStr::from_bytes_with_nul(&buf[..=b.len()]).map_err(|_| Errno::EINVAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_never_zero() {
        assert_eq!(Errno::from_raw(0), Errno::EIO);
        assert_eq!(Errno::from_raw(-5), Errno::EIO);
        assert_eq!(Errno::from_raw(libc::ENOENT), Errno::ENOENT);
        // The kernel accepts 1..=511 only.
        assert_eq!(Errno::from_raw(511).raw(), 511);
        assert_eq!(Errno::from_raw(512), Errno::EIO);
        assert_eq!(Errno::from_raw(4095), Errno::EIO);
    }

    #[test]
    fn groups_line() {
        let status = "Name:\tx\nGid:\t5\t5\t5\t5\nGroups:\t4002 65534 \nNStgid:\t1\n";
        assert_eq!(parse_groups(status), Some(vec![4002, 65534]));
        assert_eq!(parse_groups("Groups:\t\n"), Some(vec![]));
        assert_eq!(parse_groups("Groups:\tx\n"), None);
        // Our own process: the answer must match getgroups(2).
        let me = Caller { uid: 1, gid: u32::MAX, pid: std::process::id() };
        let mut buf = [0 as libc::gid_t; 256];
        // SAFETY: getgroups writes at most buf.len() ids into buf.
        let n = unsafe { libc::getgroups(buf.len() as i32, buf.as_mut_ptr()) };
        assert!(n >= 0);
        let mut want: Vec<u32> = buf[..n as usize].to_vec();
        let mut got = me.supplementary_groups().unwrap();
        want.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, want);
    }

    #[test]
    fn sgid_kill_rule() {
        let member = Caller { uid: 7, gid: 100, pid: 0 };
        let other = Caller { uid: 7, gid: 200, pid: 0 };
        let root = Caller { uid: 0, gid: 200, pid: 0 };
        let suid_sgid = libc::S_ISUID | libc::S_ISGID | 0o644;
        // suid always; sgid of a non-group-executable file only for non-members.
        assert_eq!(kills_sgid(suid_sgid, 100, &member), libc::S_ISUID);
        assert_eq!(kills_sgid(suid_sgid, 100, &other), libc::S_ISUID | libc::S_ISGID);
        assert_eq!(kills_sgid(suid_sgid, 100, &root), libc::S_ISUID);
        // Group-executable: sgid goes for everyone.
        assert_eq!(kills_sgid(libc::S_ISGID | 0o754, 100, &member), libc::S_ISGID);
        assert_eq!(kills_sgid(0o755, 100, &other), 0);
        // Directories keep theirs.
        assert_eq!(kills_sgid(libc::S_IFDIR | libc::S_ISGID | 0o775, 100, &other), 0);
    }

    #[test]
    fn names_are_checked() {
        let mut buf = [0u8; 256];
        assert_eq!(name_to_cstr("a".as_ref(), &mut buf).unwrap().to_bytes(), b"a");
        assert_eq!(name_to_cstr("a/b".as_ref(), &mut buf), Err(Errno::EINVAL));
        assert_eq!(name_to_cstr("".as_ref(), &mut buf), Err(Errno::EINVAL));
        let long = "x".repeat(256);
        assert_eq!(name_to_cstr(long.as_ref(), &mut buf), Err(Errno::ENAMETOOLONG));
    }
}

//! What the library does for each intercepted call: resolve a path to a
//! bypass mount, walk it, open, read and write through the daemon, convert
//! a descriptor to a kernel open when the program uses it in a way the
//! library does not serve.
//!
//! Each function returns None when the call belongs to the kernel (the
//! export then calls the real function), or Some(result) with errno set
//! for -1. Callers hold the re-entry guard.

use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

use efuse_abi::consts::fattr;
use efuse_abi::structs::{Attr, SetattrIn};
use efuse_bypass::client::Client;
use efuse_bypass::wire::walk;
use libc::c_int;

use crate::files::{self, OpenFile};
use crate::guard::set_errno;
use crate::log::{blog, Show};
use crate::mounts;
use crate::ops::{self, Fail, Walked};
use crate::paths;

/// A path under a bypass mount.
pub struct Target {
    pub mount: usize,
    pub client: &'static Client,
    /// The path below the mount's root ("" for the root).
    pub rest: Vec<u8>,
    /// The path ended with a slash: it must name a directory.
    pub dir: bool,
    /// It was resolved against a directory descriptor (whose name may be
    /// stale): any failure goes to the kernel, which knows better.
    pub via_fd: bool,
}

/// -1 with errno `e`.
pub fn fail(e: i32) -> Option<isize> {
    set_errno(e);
    Some(-1)
}

/// Reads a NUL-terminated C string.
///
/// # Safety
/// `p` is null or a NUL-terminated string.
pub unsafe fn cstr<'a>(p: *const libc::c_char) -> Option<&'a [u8]> {
    if p.is_null() {
        return None;
    }
    Some(std::ffi::CStr::from_ptr(p).to_bytes())
}

fn readlink_raw(path: &[u8], out: &mut [u8]) -> Option<usize> {
    let mut p = [0u8; 64];
    if path.len() >= p.len() {
        return None;
    }
    p[..path.len()].copy_from_slice(path);
    // SAFETY: a NUL-terminated path and a live output buffer.
    let n = unsafe { libc::syscall(libc::SYS_readlinkat, libc::AT_FDCWD, p.as_ptr(), out.as_mut_ptr(), out.len()) };
    (n > 0 && (n as usize) < out.len()).then_some(n as usize)
}

/// The absolute directory `dirfd` stands for.
fn base_of(dirfd: c_int, buf: &mut [u8]) -> Option<usize> {
    if dirfd == libc::AT_FDCWD {
        // SAFETY: getcwd into a live buffer (the system call: the C
        // library's getcwd may allocate).
        let n = unsafe { libc::syscall(libc::SYS_getcwd, buf.as_mut_ptr(), buf.len()) };
        if n <= 1 || buf[0] != b'/' {
            return None;
        }
        return Some(n as usize - 1);
    }
    let mut name = [0u8; 32];
    let mut l = crate::log::Line::new();
    use std::fmt::Write as _;
    let _ = write!(l, "/proc/self/fd/{dirfd}");
    let s = l.bytes();
    name[..s.len()].copy_from_slice(s);
    let n = readlink_raw(&name[..s.len()], buf)?;
    (buf[0] == b'/').then_some(n)
}

/// Classifies `path` (relative to `dirfd`): Some if it is under a bypass
/// mount whose daemon is connected.
pub fn resolve(dirfd: c_int, path: &[u8]) -> Option<Target> {
    if path.is_empty() || !crate::config::on() || !mounts::paths_valid() {
        return None;
    }
    // PATH_MAX bytes or more: the kernel's ENAMETOOLONG, whatever tidying
    // would make of it.
    if path.len() >= libc::PATH_MAX as usize {
        return None;
    }
    let tidied = || {
        if path[0] == b'/' {
            Some(paths::tidy(b"", path))
        } else {
            let mut base = [0u8; 4096];
            let blen = base_of(dirfd, &mut base)?;
            Some(paths::tidy(&base[..blen], path))
        }
    };
    let mut t = None;
    if mounts::discovered().is_none() {
        if let Some(points) = &crate::config::get().mounts {
            // The mounts to bypass are named (`efuse run --mount`): until
            // the process has made EFUSE_BYPASS_AFTER path calls under them,
            // it needs no mount table (a short process, such as one `cat`,
            // never reads it), and other paths never do.
            let tp = tidied()?;
            if paths::longest_prefix(points, &tp.path).is_none() || !mounts::early_call() {
                return None;
            }
            t = Some(tp);
        }
    }
    let m = mounts::get();
    if !m.any() {
        return None;
    }
    let t = match t {
        Some(t) => t,
        None => tidied()?,
    };
    let (k, rest) = paths::longest_prefix(&m.relevant_points, &t.path)?;
    let i = m.relevant[k];
    // A relative path the kernel resolves from a deep directory may be too
    // long for a WALK from the mount's root: the kernel's.
    if rest.len() > efuse_bypass::wire::WALK_PATH_MAX {
        return None;
    }
    m.bypass[i].as_ref()?;
    let client = m.client(i)?;
    Some(Target {
        mount: i,
        client,
        rest: rest.to_vec(),
        dir: t.dir,
        via_fd: path[0] != b'/' && dirfd != libc::AT_FDCWD,
    })
}

/// `struct stat` from FUSE attributes, as the kernel fills it.
pub fn fill_stat(a: &Attr, dev: u64, st: &mut libc::stat) {
    // SAFETY: stat is plain data.
    *st = unsafe { std::mem::zeroed() };
    st.st_dev = dev;
    st.st_ino = a.ino;
    st.st_nlink = a.nlink as _;
    st.st_mode = a.mode;
    st.st_uid = a.uid;
    st.st_gid = a.gid;
    st.st_rdev = decode_rdev(a.rdev);
    st.st_size = a.size as i64;
    st.st_blksize = if a.blksize != 0 { a.blksize as _ } else { 4096 };
    st.st_blocks = a.blocks as i64;
    st.st_atime = a.atime as i64;
    st.st_atime_nsec = a.atimensec as i64;
    st.st_mtime = a.mtime as i64;
    st.st_mtime_nsec = a.mtimensec as i64;
    st.st_ctime = a.ctime as i64;
    st.st_ctime_nsec = a.ctimensec as i64;
}

/// The kernel's 32-bit device encoding (new_encode_dev) to the C library's.
fn decode_rdev(r: u32) -> u64 {
    let major = (r & 0xfff00) >> 8;
    let minor = (r & 0xff) | ((r >> 12) & 0xfff00);
    libc::makedev(major, minor)
}

/// `struct statx` from FUSE attributes (the basic fields; no birth time).
pub fn fill_statx(a: &Attr, dev: u64, mask: u32, sx: &mut libc::statx) {
    // SAFETY: statx is plain data.
    *sx = unsafe { std::mem::zeroed() };
    let _ = mask;
    sx.stx_mask = libc::STATX_BASIC_STATS;
    sx.stx_blksize = if a.blksize != 0 { a.blksize } else { 4096 };
    sx.stx_nlink = a.nlink;
    sx.stx_uid = a.uid;
    sx.stx_gid = a.gid;
    sx.stx_mode = a.mode as u16;
    sx.stx_ino = a.ino;
    sx.stx_size = a.size;
    sx.stx_blocks = a.blocks;
    sx.stx_atime.tv_sec = a.atime as i64;
    sx.stx_atime.tv_nsec = a.atimensec;
    sx.stx_mtime.tv_sec = a.mtime as i64;
    sx.stx_mtime.tv_nsec = a.mtimensec;
    sx.stx_ctime.tv_sec = a.ctime as i64;
    sx.stx_ctime.tv_nsec = a.ctimensec;
    let rdev = decode_rdev(a.rdev);
    sx.stx_rdev_major = libc::major(rdev);
    sx.stx_rdev_minor = libc::minor(rdev);
    sx.stx_dev_major = libc::major(dev);
    sx.stx_dev_minor = libc::minor(dev);
}

fn walk_flags(t: &Target, follow: bool, keep: bool) -> u32 {
    let mut f = 0;
    if follow || t.dir {
        f |= walk::FOLLOW_LAST;
    }
    if t.dir {
        f |= walk::DIRECTORY;
    }
    if !keep {
        f |= walk::NO_KEEP;
    }
    f
}

/// Attributes of the node a path names (stat, lstat, access F_OK).
pub fn attr_of(dirfd: c_int, path: &[u8], follow: bool) -> Option<Result<(Attr, u64), i32>> {
    // Relative to a directory descriptor (find, rm -r, fts): the kernel's
    // answer from its caches costs less than naming the directory through
    // /proc to walk the table.
    if path.first() != Some(&b'/') && dirfd != libc::AT_FDCWD {
        return None;
    }
    let t = resolve(dirfd, path)?;
    match ops::walk(t.client, &t.rest, walk_flags(&t, follow, false)) {
        Ok(Walked::Done(e)) => Some(Ok((e.attr, mounts::get().dev(t.mount)))),
        Ok(Walked::Left) => {
            blog!("{}: leaves the mount's tree; through the kernel", Show(path));
            None
        }
        Err(Fail::Errno(e)) if !t.via_fd => Some(Err(e)),
        Err(f) => {
            blog!("{}: walk failed ({f:?}); through the kernel", Show(path));
            None
        }
    }
}

// ---------------------------------------------------------------- umask

static UMASK: AtomicU32 = AtomicU32::new(u32::MAX);

/// The process's umask (read once from /proc/self/status, then tracked
/// through umask()).
pub fn umask() -> u32 {
    let u = UMASK.load(Ordering::Relaxed);
    if u != u32::MAX {
        return u;
    }
    let text = std::fs::read("/proc/self/status").unwrap_or_default();
    let v = text
        .split(|b| *b == b'\n')
        .find_map(|l| l.strip_prefix(b"Umask:"))
        .and_then(|v| u32::from_str_radix(std::str::from_utf8(v).ok()?.trim(), 8).ok())
        .unwrap_or(0o022);
    UMASK.store(v, Ordering::Relaxed);
    v
}

pub fn set_umask(v: u32) {
    UMASK.store(v & 0o777, Ordering::Relaxed);
}

// ---------------------------------------------------------------- opens

/// Flags that make an open go to the kernel: O_PATH and directories are
/// the kernel's; O_APPEND and O_DIRECT are served exactly only by it.
const KERNEL_FLAGS: c_int = libc::O_PATH | libc::O_DIRECTORY | libc::O_APPEND | libc::O_DIRECT | libc::O_TMPFILE;

fn release_node(c: &Client, nodeid: u64, fh: Option<(u64, u32)>) {
    match fh {
        // One request: the release carries the forget.
        Some((fh, flags)) => ops::release(c, nodeid, fh, flags, true),
        None => ops::forget(c, nodeid),
    }
}

/// open/openat/creat of a regular file under a bypass mount: the daemon
/// opens it, the kernel gives the descriptor (an O_PATH open of the same
/// file).
pub fn open(dirfd: c_int, path: &[u8], flags: c_int, mode: u32) -> Option<c_int> {
    if flags & KERNEL_FLAGS != 0 || (flags & libc::O_TRUNC != 0 && flags & libc::O_ACCMODE == libc::O_RDONLY) {
        return None;
    }
    let t = resolve(dirfd, path)?;
    if t.dir {
        return None;
    }
    let c = t.client;
    let creat = flags & libc::O_CREAT != 0;
    let excl = creat && flags & libc::O_EXCL != 0;
    let nofollow = flags & libc::O_NOFOLLOW != 0;
    let fuse_flags =
        (flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_TRUNC | libc::O_CLOEXEC)) as u32;
    let mut created = false;
    let mut opened = None;
    // The table entry the open was checked at (see `kept`).
    let mut known = None;
    let local = if excl { ops::Local::Unknown } else { ops::walk_table(c, &t.rest, walk_flags(&t, !nofollow, true)) };
    // A name the table knows does not exist: no request to learn it again.
    let absent = matches!(local, ops::Local::Absent);
    if absent && !creat {
        if t.via_fd {
            return None;
        }
        set_errno(libc::ENOENT);
        return Some(-1);
    }
    if let ops::Local::Found(e, entry, seq) = local {
        // A node the table knows is opened at once (one request); if the
        // table was wrong by then, the daemon walks as usual.
        if e.attr.mode & libc::S_IFMT == libc::S_IFREG {
            let readable = flags & libc::O_ACCMODE != libc::O_WRONLY && flags & libc::O_TRUNC == 0;
            if flags & libc::O_ACCMODE == libc::O_RDONLY && flags & libc::O_TRUNC == 0 {
                let cloexec = flags & libc::O_CLOEXEC != 0;
                if let Some(k) =
                    crate::kept::take(c, t.mount as u32, e.nodeid, keep_flags(fuse_flags), entry, seq, cloexec)
                {
                    return Some(bind_taken(path, k, e.nodeid));
                }
                if let Some(fd) = open_direct(&t, dirfd, path, flags, fuse_flags, &e, entry, seq) {
                    return Some(fd);
                }
            }
            let o = if readable {
                ops::open_prefetching(c, e.nodeid, fuse_flags, entry, seq)
            } else {
                ops::open_adopting(c, e.nodeid, fuse_flags)
            };
            if let Ok(o) = o {
                known = Some((entry, seq));
                opened = Some((e, o));
            }
        }
    }
    let read_only = flags & libc::O_ACCMODE == libc::O_RDONLY && flags & libc::O_TRUNC == 0;
    if !excl && !absent && opened.is_none() && read_only && c.direct_dir().is_some() && crate::direct::room() {
        // A name the table does not know yet: one WALK (holding nothing),
        // then the open is a direct read if it can be, with the entry the
        // WALK just published.
        match ops::walk(c, &t.rest, walk_flags(&t, !nofollow, false)) {
            Ok(Walked::Done(e)) if e.attr.mode & libc::S_IFMT == libc::S_IFREG => {
                let (entry, seq) = match ops::walk_table(c, &t.rest, walk_flags(&t, !nofollow, true)) {
                    ops::Local::Found(f, entry, seq) if f.nodeid == e.nodeid => (entry, seq),
                    _ => (0, 0),
                };
                if let Some(fd) = open_direct(&t, dirfd, path, flags, fuse_flags, &e, entry, seq) {
                    return Some(fd);
                }
            }
            Ok(Walked::Done(_)) | Ok(Walked::Left) => return None,
            Err(Fail::Errno(e @ (libc::ENOENT | libc::ENOTDIR))) if !creat && !t.via_fd => {
                set_errno(e);
                return Some(-1);
            }
            Err(_) => {}
        }
    }
    if !excl && !absent && opened.is_none() {
        match ops::walk(c, &t.rest, walk_flags(&t, !nofollow, true)) {
            Ok(Walked::Done(e)) => {
                if e.attr.mode & libc::S_IFMT != libc::S_IFREG {
                    ops::forget(c, e.nodeid);
                    return None;
                }
                match ops::open(c, e.nodeid, fuse_flags) {
                    Ok(o) => opened = Some((e, o)),
                    Err(f) => {
                        blog!("open {}: OPEN failed ({f:?}); through the kernel", Show(path));
                        ops::forget(c, e.nodeid);
                        return None;
                    }
                }
            }
            Ok(Walked::Left) => return None,
            Err(Fail::Errno(libc::ENOENT)) if creat => {}
            Err(Fail::Errno(e @ (libc::ENOENT | libc::ENOTDIR))) if !t.via_fd => {
                set_errno(e);
                return Some(-1);
            }
            Err(_) => return None,
        }
    }
    if opened.is_none() {
        let (parent, name) = paths::parent_and_name(&t.rest)?;
        let p = match ops::walk(c, parent, walk::FOLLOW_LAST | walk::DIRECTORY) {
            Ok(Walked::Done(p)) => p,
            Err(Fail::Errno(e @ (libc::ENOENT | libc::ENOTDIR))) if !t.via_fd => {
                set_errno(e);
                return Some(-1);
            }
            _ => return None,
        };
        let um = umask();
        let r = ops::create(
            c,
            p.nodeid,
            name,
            fuse_flags | libc::O_CREAT as u32 | (flags & libc::O_EXCL) as u32,
            mode & !um & 0o7777,
            um,
        );
        ops::forget(c, p.nodeid);
        match r {
            Ok((e, o)) => {
                if e.attr.mode & libc::S_IFMT != libc::S_IFREG {
                    release_node(c, e.nodeid, Some((o.fh, fuse_flags)));
                    return None;
                }
                created = true;
                opened = Some((e, o));
            }
            Err(Fail::Errno(libc::EEXIST)) if excl && !t.via_fd => {
                set_errno(libc::EEXIST);
                return Some(-1);
            }
            Err(f) => {
                blog!("open {}: CREATE failed ({f:?}); through the kernel", Show(path));
                return None;
            }
        }
    }
    let (e, o) = opened?;
    if flags & libc::O_TRUNC != 0 && !created {
        let inp = SetattrIn { valid: fattr::SIZE | fattr::FH, fh: o.fh, size: 0, ..Default::default() };
        if let Err(f) = ops::setattr(c, e.nodeid, &inp) {
            release_node(c, e.nodeid, Some((o.fh, fuse_flags)));
            return match f {
                Fail::Errno(err) if !t.via_fd => {
                    set_errno(err);
                    Some(-1)
                }
                _ => None,
            };
        }
    }
    let Some(fd) = kernel_opath(&t, dirfd, path, flags, e.attr.ino) else {
        release_node(c, e.nodeid, Some((o.fh, fuse_flags)));
        return None;
    };
    let keep = keep_flags(fuse_flags);
    let Some(idx) = files::alloc(t.mount as u32, e.nodeid, o.fh, keep) else {
        blog!("open {}: open-file table full; through the kernel", Show(path));
        unsafe { crate::real::close()(fd) };
        release_node(c, e.nodeid, Some((o.fh, fuse_flags)));
        return None;
    };
    // The kernel just handed out this number: an entry still there is one
    // whose close the library did not see (a raw system call).
    forget_stale(fd);
    if !files::bind(fd, idx) {
        unsafe { crate::real::close()(fd) };
        let _ = files::drop_ref(idx);
        release_node(c, e.nodeid, Some((o.fh, fuse_flags)));
        return None;
    }
    if let Some((entry, seq)) = known.filter(|_| !created && flags & libc::O_TRUNC == 0) {
        let f = files::file(idx);
        f.entry.store(entry, Ordering::Relaxed);
        f.seq.store(seq, Ordering::Relaxed);
        let keep_cache = o.open_flags & efuse_abi::consts::fopen::KEEP_CACHE != 0;
        f.keep_cache.store(keep_cache as u32, Ordering::Relaxed);
    }
    crate::prefetch::bind(idx, e.nodeid, o.fh);
    ensure_atfork();
    blog!("open {} -> fd {fd} (node {}, handle {})", Show(path), e.nodeid, o.fh);
    Some(fd)
}

/// A read-only open served from the file system's own file (see
/// `direct`): no request to the daemon. None: not possible here; the
/// caller opens through the daemon.
#[allow(clippy::too_many_arguments)]
fn open_direct(
    t: &Target,
    dirfd: c_int,
    path: &[u8],
    flags: c_int,
    fuse_flags: u32,
    e: &efuse_abi::structs::EntryOut,
    entry: u32,
    seq: u32,
) -> Option<c_int> {
    let c = t.client;
    let dir = c.direct_dir()?;
    // A vfork child borrows its parent's memory: nothing of its own there.
    if !owns_memory() || !crate::direct::room() || crate::direct::closed_lately(t.mount as u32, e.nodeid) {
        return None;
    }
    // The mount's rule (mode bits) and the backing file system's (the open
    // below, which may also apply ACLs): served only when both allow, so
    // the answer is the mount's.
    if crate::creds::may_read(&e.attr) != Some(true) {
        return None;
    }
    let close = |fd: c_int| {
        // SAFETY: our own descriptor.
        unsafe { crate::real::close()(fd) };
    };
    // The program's descriptor first, on the number an open would give.
    let fd = kernel_opath(t, dirfd, path, flags, e.attr.ino)?;
    let Some(back) = crate::direct::open_backing(dir, &t.rest, flags, e.attr.ino) else {
        close(fd);
        return None;
    };
    let Some(back) = crate::direct::move_high(back) else {
        close(fd);
        return None;
    };
    let Some(idx) = files::alloc(t.mount as u32, e.nodeid, 0, keep_flags(fuse_flags)) else {
        close(fd);
        close(back);
        return None;
    };
    if !crate::direct::may_attach(idx) {
        let _ = files::drop_ref(idx);
        close(fd);
        close(back);
        return None;
    }
    let f = files::file(idx);
    f.direct.store(1, Ordering::Relaxed);
    f.entry.store(entry, Ordering::Relaxed);
    f.seq.store(seq, Ordering::Relaxed);
    crate::direct::attach(idx, back);
    forget_stale(fd);
    if !files::bind(fd, idx) {
        crate::direct::detach(idx, t.mount as u32, e.nodeid);
        let _ = files::drop_ref(idx);
        close(fd);
        return None;
    }
    ensure_atfork();
    blog!("open {} -> fd {fd} (node {}, direct)", Show(path), e.nodeid);
    Some(fd)
}

/// The descriptor of a served open: an O_PATH open of the same name
/// through the kernel, on the number an open would give, checked to be
/// inode `ino` of the mount. None (nothing left open, the reason logged):
/// the open goes to the kernel.
fn kernel_opath(t: &Target, dirfd: c_int, path: &[u8], flags: c_int, ino: u64) -> Option<c_int> {
    let mut cpath = path.to_vec();
    cpath.push(0);
    let pflags = libc::O_PATH | (flags & (libc::O_CLOEXEC | libc::O_NOFOLLOW));
    // SAFETY: a NUL-terminated path.
    let fd = unsafe { crate::real::openat()(dirfd, cpath.as_ptr().cast(), pflags, 0) };
    let dev = mounts::get().dev(t.mount);
    // Descriptors 0, 1 and 2 stay kernel files: the C library's stdio
    // writes and reads them with its internal calls, which this library
    // does not see. Landing there (0-2 was closed), the open is the
    // kernel's, which gives the same number.
    let why = if (0..=2).contains(&fd) {
        "would be a standard stream"
    } else if fd < 0 || !same_file(fd, ino, dev) {
        "the kernel's name leads to another file"
    } else {
        return Some(fd);
    };
    blog!("open {}: {why} (fd {fd}); through the kernel", Show(path));
    if fd >= 0 {
        // SAFETY: our own descriptor.
        unsafe { crate::real::close()(fd) };
    }
    None
}

/// The open flags an open file keeps (F_GETFL reports them).
fn keep_flags(fuse_flags: u32) -> u32 {
    fuse_flags & (libc::O_ACCMODE | libc::O_NONBLOCK | libc::O_NOATIME | libc::O_SYNC | libc::O_DSYNC) as u32
}

/// The rest of an open that took a kept handle: the new descriptor is
/// bound to its open file.
fn bind_taken(path: &[u8], k: crate::kept::Taken, nodeid: u64) -> c_int {
    forget_stale(k.fd);
    files::bind(k.fd, k.idx);
    ensure_atfork();
    blog!("open {} -> fd {} (node {nodeid}, kept handle {})", Show(path), k.fd, k.fh);
    k.fd
}

/// statx of descriptor `fd` (fields `mask`), trusting the kernel's cached
/// attributes (AT_STATX_DONT_SYNC: inode numbers and types never change).
pub fn statx_of(fd: c_int, mask: u32) -> Option<libc::statx> {
    // SAFETY: statx into a zeroed struct.
    let mut sx: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::syscall(libc::SYS_statx, fd, c"".as_ptr(), libc::AT_EMPTY_PATH | libc::AT_STATX_DONT_SYNC, mask, &mut sx)
    };
    (r == 0).then_some(sx)
}

/// Is `fd` the file with inode `ino` on device `dev`?
fn same_file(fd: c_int, ino: u64, dev: u64) -> bool {
    statx_of(fd, libc::STATX_INO)
        .is_some_and(|sx| sx.stx_ino == ino && libc::makedev(sx.stx_dev_major, sx.stx_dev_minor) == dev)
}

// ---------------------------------------------------------------- fork

/// The process whose memory the library's per-process state belongs to:
/// a child created with vfork (or posix_spawn) shares it and must not
/// change it.
static OWNER: AtomicI32 = AtomicI32::new(0);

pub fn pid() -> i32 {
    // SAFETY: no preconditions.
    unsafe { libc::syscall(libc::SYS_getpid) as i32 }
}

/// This process's id as the fork handlers last recorded it (0: none yet).
pub fn owner() -> i32 {
    OWNER.load(Ordering::Relaxed)
}

pub fn owns_memory() -> bool {
    let o = OWNER.load(Ordering::Relaxed);
    o == 0 || o == pid()
}

pub fn ensure_atfork() {
    static DONE: AtomicU32 = AtomicU32::new(0);
    if DONE.swap(1, Ordering::AcqRel) == 0 {
        OWNER.store(pid(), Ordering::Relaxed);
        extern "C" fn prepare() {
            // The child inherits every descriptor: one more reference each.
            files::each(|_, idx| files::add_ref(idx));
        }
        extern "C" fn child() {
            crate::guard::forget_tid();
            OWNER.store(pid(), Ordering::Relaxed);
            crate::kept::forget_in_child();
            crate::direct::forget_readers_in_child();
        }
        // SAFETY: registers plain functions that cannot unwind.
        unsafe { libc::pthread_atfork(Some(prepare), None, Some(child)) };
    }
}

// ---------------------------------------------------------------- descriptors

/// The connection of an open file's mount (None: the daemon is gone).
fn client_of(f: &OpenFile) -> Option<&'static Client> {
    mounts::discovered()?.client(f.mount.load(Ordering::Relaxed) as usize)
}

fn io_limit(c: &Client, header: usize) -> usize {
    let w = c.welcome().max_io as usize;
    let s = c.slot_size().saturating_sub(header);
    w.min(s).max(1)
}

/// Reads at `off` until `buf` is full or the file ends.
fn read_at(c: &Client, f: &OpenFile, off: u64, buf: &mut [u8]) -> Result<usize, i32> {
    let (node, fh, flags) =
        (f.nodeid.load(Ordering::Relaxed), f.fh.load(Ordering::Relaxed), f.flags.load(Ordering::Relaxed));
    if f.direct.load(Ordering::Relaxed) != 0 {
        return read_direct(files::index_of(f), off, buf);
    }
    if let Some(n) = crate::kept::read(c, f, off, buf) {
        return Ok(n);
    }
    if let Some(n) = crate::prefetch::read(c, files::index_of(f), node, fh, off, buf) {
        return Ok(n);
    }
    in_chunks(buf.len(), io_limit(c, 16), |at, want| {
        ops::read(c, node, fh, off + at as u64, &mut buf[at..at + want], flags)
    })
}

/// [`read_at`] of a direct read: one read of the backing file, whose
/// answer is the file's (a short count only at its end).
fn read_direct(idx: u32, off: u64, buf: &mut [u8]) -> Result<usize, i32> {
    let r = crate::direct::with_fd(idx, |fd| loop {
        // SAFETY: reads into the live `buf`.
        let n = unsafe { crate::real::pread64()(fd, buf.as_mut_ptr().cast(), buf.len(), off as i64) };
        if n >= 0 {
            return Ok(n as usize);
        }
        match crate::guard::errno() {
            libc::EINTR => continue,
            e => return Err(e),
        }
    });
    // No backing descriptor in this process (none should be missing).
    r.unwrap_or(Err(libc::EBADF))
}

fn write_at(c: &Client, f: &OpenFile, off: u64, data: &[u8]) -> Result<usize, i32> {
    let (node, fh, flags) =
        (f.nodeid.load(Ordering::Relaxed), f.fh.load(Ordering::Relaxed), f.flags.load(Ordering::Relaxed));
    in_chunks(data.len(), io_limit(c, 80), |at, want| {
        ops::write(c, node, fh, off + at as u64, &data[at..at + want], flags)
    })
}

/// Moves `len` bytes in requests of at most `chunk`: `one(at, want)` moves
/// `want` bytes from `at` and says how many it did. Stops at the first short
/// one; an error after some bytes ends with what was done.
fn in_chunks(len: usize, chunk: usize, mut one: impl FnMut(usize, usize) -> ops::R<usize>) -> Result<usize, i32> {
    let mut done = 0;
    while done < len {
        let want = (len - done).min(chunk);
        match one(done, want) {
            Ok(n) => {
                done += n;
                if n < want {
                    break;
                }
            }
            Err(e) if done == 0 => return Err(errno_of(e)),
            Err(_) => break,
        }
    }
    Ok(done)
}

fn errno_of(f: Fail) -> i32 {
    match f {
        Fail::Errno(e) => e,
        Fail::Broken => libc::EIO,
    }
}

fn acc(f: &OpenFile) -> c_int {
    f.flags.load(Ordering::Relaxed) as c_int & libc::O_ACCMODE
}

/// The buffers of an iovec array as one list of slices.
///
/// # Safety
/// `iov` points to `cnt` valid iovecs.
unsafe fn iovecs<'a>(iov: *const libc::iovec, cnt: c_int) -> Option<&'a [libc::iovec]> {
    if !(0..=libc::UIO_MAXIOV).contains(&cnt) || (cnt > 0 && iov.is_null()) {
        return None;
    }
    if cnt == 0 {
        return Some(&[]);
    }
    Some(std::slice::from_raw_parts(iov, cnt as usize))
}

/// read/pread/readv/preadv on a served descriptor. `at`: None uses and
/// moves the shared offset.
///
/// # Safety
/// The iovecs describe writable memory of the caller.
pub unsafe fn readv(idx: u32, iov: *const libc::iovec, cnt: c_int, at: Option<i64>) -> isize {
    transfer(idx, iov, cnt, at, libc::O_WRONLY, |c, f, off, v| {
        read_at(c, f, off, std::slice::from_raw_parts_mut(v.iov_base as *mut u8, v.iov_len))
    })
}

/// write/pwrite/writev/pwritev on a served descriptor.
///
/// # Safety
/// The iovecs describe readable memory of the caller.
pub unsafe fn writev(idx: u32, iov: *const libc::iovec, cnt: c_int, at: Option<i64>) -> isize {
    transfer(idx, iov, cnt, at, libc::O_RDONLY, |c, f, off, v| {
        write_at(c, f, off, std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len))
    })
}

/// The common part of readv and writev: the checks, the offset (locked and
/// moved when `at` is None), and `one` over each iovec in turn until one
/// comes up short. `refused`: the access mode that may not do this.
///
/// # Safety
/// The iovecs describe memory `one` may use.
unsafe fn transfer(
    idx: u32,
    iov: *const libc::iovec,
    cnt: c_int,
    at: Option<i64>,
    refused: c_int,
    mut one: impl FnMut(&Client, &OpenFile, u64, &libc::iovec) -> Result<usize, i32>,
) -> isize {
    let f = files::file(idx);
    if acc(f) == refused {
        return fail(libc::EBADF).unwrap_or(-1);
    }
    let Some(iov) = iovecs(iov, cnt) else { return fail(libc::EINVAL).unwrap_or(-1) };
    if at.is_some_and(|a| a < 0) {
        return fail(libc::EINVAL).unwrap_or(-1);
    }
    let Some(c) = client_of(f) else { return fail(libc::EIO).unwrap_or(-1) };
    let _lock = at.is_none().then(|| f.lock_offset());
    let start = at.map_or_else(|| f.offset.load(Ordering::Acquire), |a| a as u64);
    let mut total = 0usize;
    for v in iov {
        if v.iov_len == 0 {
            continue;
        }
        match one(c, f, start + total as u64, v) {
            Ok(n) => {
                total += n;
                if n < v.iov_len {
                    break;
                }
            }
            Err(e) if total == 0 => return fail(e).unwrap_or(-1),
            Err(_) => break,
        }
    }
    if at.is_none() {
        f.offset.store(start + total as u64, Ordering::Release);
    }
    total as isize
}

pub fn lseek(idx: u32, off: i64, whence: c_int) -> i64 {
    let f = files::file(idx);
    let Some(c) = client_of(f) else { return fail(libc::EIO).unwrap_or(-1) as i64 };
    let _lock = f.lock_offset();
    let cur = f.offset.load(Ordering::Acquire) as i64;
    let (node, fh) = (f.nodeid.load(Ordering::Relaxed), f.fh.load(Ordering::Relaxed));
    let direct = f.direct.load(Ordering::Relaxed) != 0;
    let idx_ = files::index_of(f);
    let size = || match table_attr(c, f) {
        Some(a) => Ok(a.size as i64),
        // A direct read: the backing file's size is the file's.
        None if direct => crate::direct::with_fd(idx_, |fd| {
            // SAFETY: fstat into a zeroed stat.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            match unsafe { crate::real::fstat()(fd, &mut st) } {
                0 => Ok(st.st_size),
                _ => Err(Fail::Errno(crate::guard::errno())),
            }
        })
        .unwrap_or(Err(Fail::Errno(libc::EBADF))),
        None => ops::getattr(c, node, Some(fh)).map(|a| a.size as i64),
    };
    let new = match whence {
        libc::SEEK_SET => Ok(off),
        libc::SEEK_CUR => Ok(cur.saturating_add(off)),
        libc::SEEK_END => size().map(|s| s.saturating_add(off)),
        libc::SEEK_DATA | libc::SEEK_HOLE => {
            if off < 0 {
                return fail(libc::ENXIO).unwrap_or(-1) as i64;
            }
            let asked = if direct {
                // The backing file's holes are the file's.
                crate::direct::with_fd(idx_, |fd| {
                    // SAFETY: lseek of our own descriptor (its offset is unused).
                    match unsafe { crate::real::lseek()(fd, off, whence) } {
                        n if n >= 0 => Ok(n as u64),
                        _ => Err(Fail::Errno(crate::guard::errno())),
                    }
                })
                .unwrap_or(Err(Fail::Errno(libc::EBADF)))
            } else {
                ops::lseek(c, node, fh, off as u64, whence as u32)
            };
            match asked {
                Ok(o) => Ok(o as i64),
                Err(Fail::Errno(libc::ENOSYS)) => match size() {
                    // No hole information: the whole file is data.
                    Ok(s) if off >= s => return fail(libc::ENXIO).unwrap_or(-1) as i64,
                    Ok(s) => Ok(if whence == libc::SEEK_DATA { off } else { s }),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            }
        }
        _ => return fail(libc::EINVAL).unwrap_or(-1) as i64,
    };
    match new {
        Ok(n) if n < 0 => fail(libc::EINVAL).unwrap_or(-1) as i64,
        Ok(n) => {
            f.offset.store(n as u64, Ordering::Release);
            n
        }
        Err(e) => fail(errno_of(e)).unwrap_or(-1) as i64,
    }
}

/// The attributes of open file `f` from the metadata table, if its entry
/// is unchanged since the daemon checked the open (no change to the file
/// completed since, so they are its attributes now).
fn table_attr(c: &Client, f: &OpenFile) -> Option<Attr> {
    let (nodeid, entry, seq) =
        (f.nodeid.load(Ordering::Relaxed), f.entry.load(Ordering::Relaxed), f.seq.load(Ordering::Relaxed));
    if seq == 0 {
        return None;
    }
    let t = c.table()?;
    let a = t.attr_of(entry, nodeid, efuse_bypass::table::now_ns())?;
    t.unchanged(entry, nodeid, seq).then_some(a)
}

/// Whether fstat of open file `idx` is the kernel's: a direct read (no
/// daemon handle) whose table entry changed since it was opened. The
/// kernel answers for its O_PATH descriptor, exactly.
pub fn kernel_stat(idx: u32) -> bool {
    let f = files::file(idx);
    f.direct.load(Ordering::Relaxed) != 0 && client_of(f).and_then(|c| table_attr(c, f)).is_none()
}

/// GETATTR of open file `f`, from the table when it can.
fn attr_of_file(c: &Client, f: &OpenFile) -> ops::R<Attr> {
    match table_attr(c, f) {
        Some(a) => Ok(a),
        None => ops::getattr(c, f.nodeid.load(Ordering::Relaxed), Some(f.fh.load(Ordering::Relaxed))),
    }
}

pub fn fstat(idx: u32, st: &mut libc::stat) -> c_int {
    let f = files::file(idx);
    let Some(c) = client_of(f) else { return fail(libc::EIO).unwrap_or(-1) as c_int };
    match attr_of_file(c, f) {
        Ok(a) => {
            let dev = mounts::get().dev(f.mount.load(Ordering::Relaxed) as usize);
            fill_stat(&a, dev, st);
            0
        }
        Err(e) => fail(errno_of(e)).unwrap_or(-1) as c_int,
    }
}

pub fn fstatx(idx: u32, mask: u32, sx: &mut libc::statx) -> c_int {
    let f = files::file(idx);
    let Some(c) = client_of(f) else { return fail(libc::EIO).unwrap_or(-1) as c_int };
    match attr_of_file(c, f) {
        Ok(a) => {
            let dev = mounts::get().dev(f.mount.load(Ordering::Relaxed) as usize);
            fill_statx(&a, dev, mask, sx);
            0
        }
        Err(e) => fail(errno_of(e)).unwrap_or(-1) as c_int,
    }
}

/// SETATTR through the handle of a served descriptor.
pub fn fsetattr(idx: u32, mut inp: SetattrIn) -> c_int {
    let f = files::file(idx);
    let Some(c) = client_of(f) else { return fail(libc::EIO).unwrap_or(-1) as c_int };
    inp.valid |= fattr::FH;
    inp.fh = f.fh.load(Ordering::Relaxed);
    match ops::setattr(c, f.nodeid.load(Ordering::Relaxed), &inp) {
        Ok(_) => 0,
        Err(e) => fail(errno_of(e)).unwrap_or(-1) as c_int,
    }
}

pub fn fsync(idx: u32, datasync: bool) -> c_int {
    let f = files::file(idx);
    if f.direct.load(Ordering::Relaxed) != 0 {
        // The backing file is the file: syncing it is syncing the file.
        let r = crate::direct::with_fd(idx, |fd| {
            // SAFETY: plain calls on our own descriptor.
            unsafe {
                if datasync {
                    crate::real::fdatasync()(fd)
                } else {
                    crate::real::fsync()(fd)
                }
            }
        });
        return match r {
            Some(0) => 0,
            Some(_) => fail(crate::guard::errno()).unwrap_or(-1) as c_int,
            None => fail(libc::EBADF).unwrap_or(-1) as c_int,
        };
    }
    let Some(c) = client_of(f) else { return fail(libc::EIO).unwrap_or(-1) as c_int };
    match ops::fsync(c, f.nodeid.load(Ordering::Relaxed), f.fh.load(Ordering::Relaxed), datasync) {
        Ok(()) | Err(Fail::Errno(libc::ENOSYS)) => 0,
        Err(e) => fail(errno_of(e)).unwrap_or(-1) as c_int,
    }
}

/// The flags F_GETFL reports (the kernel adds O_LARGEFILE on 64-bit).
pub fn getfl(idx: u32) -> c_int {
    #[cfg(target_arch = "x86_64")]
    const LARGEFILE: c_int = 0o100000;
    #[cfg(target_arch = "aarch64")]
    const LARGEFILE: c_int = 0o400000;
    files::file(idx).flags.load(Ordering::Relaxed) as c_int | LARGEFILE
}

pub fn set_nonblock(idx: u32, on: bool) {
    let f = files::file(idx);
    if on {
        f.flags.fetch_or(libc::O_NONBLOCK as u32, Ordering::Relaxed);
    } else {
        f.flags.fetch_and(!(libc::O_NONBLOCK as u32), Ordering::Relaxed);
    }
}

/// Drops one reference of open file `idx`; the last one flushes nothing
/// more, releases the handle and forgets the node.
pub fn drop_file(idx: u32) {
    drop_file_keeping(idx, None)
}

/// [`drop_file`] with `opath`, a descriptor of the file to keep with its
/// handle if this is the last reference (see `kept`; closed otherwise).
fn drop_file_keeping(idx: u32, opath: Option<c_int>) {
    let f = files::file(idx);
    if f.direct.load(Ordering::Relaxed) != 0 {
        // No daemon handle: this process's backing descriptor goes with
        // its last descriptor of the file.
        if files::mine(idx) == 0 {
            crate::direct::detach(idx, f.mount.load(Ordering::Relaxed), f.nodeid.load(Ordering::Relaxed));
        }
        let _ = files::drop_ref(idx);
        if let Some(fd) = opath {
            // SAFETY: the library's own duplicate (never kept for these).
            unsafe { crate::real::close()(fd) };
        }
        return;
    }
    let c = client_of(f);
    if let Some(c) = c.filter(|c| c.welcome().flags & efuse_bypass::welcome::NO_FLUSH == 0) {
        ops::flush(c, f.nodeid.load(Ordering::Relaxed), f.fh.load(Ordering::Relaxed));
    }
    match files::drop_ref(idx) {
        Some(r) => {
            let kept = c.is_some_and(|c| crate::kept::keep(c, idx, &r, opath));
            crate::prefetch::forget(idx);
            if let Some(c) = c.filter(|_| !kept) {
                release_node(c, r.nodeid, Some((r.fh, r.flags)));
            }
        }
        None => {
            if let Some(fd) = opath {
                // SAFETY: the library's own duplicate, not kept.
                unsafe { crate::real::close()(fd) };
            }
        }
    }
}

/// Drops the entry of `fd`, a number the kernel has just handed out for a
/// new descriptor: it was free in the kernel, so an entry for it is stale
/// (its close was not seen). Costs one atomic load when there is none.
pub fn forget_stale(fd: c_int) {
    if fd >= 0 && files::get(fd).is_some() && owns_memory() {
        if let Some(idx) = files::unbind(fd) {
            blog!("fd {fd}: closed without the library seeing it; its entry dropped");
            drop_file(idx);
        }
    }
}

/// close_range/closefrom of `first..=last` (without CLOSE_RANGE_CLOEXEC):
/// the served descriptors in the range are closed as close() closes them.
/// `real` closes the range; its result is returned.
pub fn close_range(first: u32, last: u32, real: impl FnOnce() -> c_int) -> c_int {
    let hi = (last as usize).min(files::MAX_FDS - 1);
    let mut gone = Vec::new();
    // A vfork child closes its own descriptors; the table is its parent's.
    if (first as usize) <= hi && owns_memory() {
        for fd in first as usize..=hi {
            if let Some(idx) = files::unbind(fd as c_int) {
                gone.push((fd as c_int, idx));
            }
        }
    }
    let r = real();
    let e = crate::guard::errno();
    if r != 0 {
        // Nothing was closed (bad arguments): the entries stand.
        for &(fd, idx) in &gone {
            files::bind(fd, idx);
        }
    } else {
        for &(fd, idx) in &gone {
            blog!("fd {fd}: closed by close_range/closefrom");
            drop_file(idx);
        }
    }
    set_errno(e);
    r
}

/// close() of a served descriptor.
pub fn close(fd: c_int) -> c_int {
    if !owns_memory() {
        // A vfork child (before its exec) closes its own copy; the entry and
        // the reference are the parent's (vfork runs no fork handlers).
        // SAFETY: closes the program's descriptor, as it asked.
        return unsafe { crate::real::close()(fd) };
    }
    let idx = files::unbind(fd);
    let opath = idx.and_then(|i| crate::kept::spare_fd(i, fd));
    // SAFETY: closes the program's descriptor, as it asked.
    let r = unsafe { crate::real::close()(fd) };
    let e = crate::guard::errno();
    if let Some(idx) = idx {
        drop_file_keeping(idx, opath);
    }
    set_errno(e);
    r
}

/// Turns served descriptor `fd` into an ordinary kernel open of the same
/// file with the same flags and offset (same number, same FD_CLOEXEC), for
/// a use the library does not serve. Every other descriptor of this process
/// on the same open file (its dups) becomes a copy of that kernel open too,
/// so they keep sharing one offset as dups do. Err: errno; the descriptors
/// stay as they were.
pub fn convert(fd: c_int, why: &str) -> Result<(), i32> {
    let Some(idx) = files::get(fd) else { return Ok(()) };
    convert_as(fd, idx, true, why)
}

/// [`convert`] of `fd`, a copy of open file `idx` that the table does not
/// know (made in a vfork child, whose table is its parent's): only `fd`
/// becomes a kernel open; the table stays as it is.
pub fn convert_copy(fd: c_int, idx: u32, why: &str) -> Result<(), i32> {
    convert_as(fd, idx, false, why)
}

fn convert_as(fd: c_int, idx: u32, dups: bool, why: &str) -> Result<(), i32> {
    // A served descriptor is an O_PATH open; a number that holds anything
    // else is no longer the served file (in a vfork child, whose table is
    // its parent's, a dup may have put another file there): left alone.
    let is_served = |d: c_int| {
        // SAFETY: F_GETFL on a descriptor number.
        let fl = unsafe { crate::real::fcntl()(d, libc::F_GETFL, 0) };
        fl >= 0 && fl & libc::O_PATH != 0
    };
    if !is_served(fd) {
        return Ok(());
    }
    let f = files::file(idx);
    let flags = f.flags.load(Ordering::Relaxed) as c_int;
    let mut l = crate::log::Line::new();
    use std::fmt::Write as _;
    let _ = write!(l, "/proc/self/fd/{fd}\0");
    let real = crate::real::openat();
    let mut fds = vec![fd];
    if dups {
        files::each(|d, i| {
            if i == idx && d != fd && is_served(d) {
                fds.push(d);
            }
        });
    }
    let mut done = Vec::with_capacity(fds.len());
    // SAFETY: a NUL-terminated path; plain descriptor calls on our fds.
    unsafe {
        let nfd = real(libc::AT_FDCWD, l.bytes().as_ptr().cast(), flags | libc::O_CLOEXEC, 0);
        if nfd < 0 {
            let e = crate::guard::errno();
            blog!("fd {fd}: conversion to a kernel open for {why} failed (errno {e})");
            return Err(e);
        }
        let _lock = f.lock_offset();
        let off = f.offset.load(Ordering::Acquire) as i64;
        crate::real::lseek()(nfd, off, libc::SEEK_SET);
        for &d in &fds {
            let fdfl = crate::real::fcntl()(d, libc::F_GETFD, 0);
            let cloexec = if fdfl >= 0 && fdfl & libc::FD_CLOEXEC != 0 { libc::O_CLOEXEC } else { 0 };
            if crate::real::dup3()(nfd, d, cloexec) < 0 {
                let e = crate::guard::errno();
                if d == fd {
                    crate::real::close()(nfd);
                    return Err(e);
                }
                // A dup the kernel refuses to replace stays served.
                continue;
            }
            done.push(d);
        }
        crate::real::close()(nfd);
        // The kernel's size of the file may predate served writes: a stat
        // makes it fetch the attributes the daemon invalidated, before an
        // mmap (SIGBUS past a stale size) or a splice relies on it.
        let mut st: libc::stat = std::mem::zeroed();
        crate::real::fstat()(fd, &mut st);
    }
    // A vfork child shares this memory with its parent, whose descriptors
    // are still served: leave the table alone there.
    if owns_memory() && dups {
        for &d in &done {
            if files::unbind(d).is_some() {
                drop_file(idx);
            }
        }
    }
    blog!("fd {fd}: converted to a kernel open for {why} ({} descriptor(s))", done.len());
    Ok(())
}

/// Converts every served descriptor (`all`), or those without FD_CLOEXEC
/// (exec).
pub fn convert_all(all: bool, why: &str) {
    let mut fds = Vec::new();
    files::each(|fd, _| fds.push(fd));
    for fd in fds {
        if !all {
            // SAFETY: F_GETFD on a descriptor of the table.
            let fl = unsafe { crate::real::fcntl()(fd, libc::F_GETFD, 0) };
            if fl >= 0 && fl & libc::FD_CLOEXEC != 0 {
                continue;
            }
        }
        let _ = convert(fd, why);
    }
}

// ---------------------------------------------------------------- path calls

/// Walks to the parent of a path's last component (one lookup held, the
/// caller forgets it). Err(None): the kernel's; Err(Some(e)): fail with e.
/// A path that ends with a slash, `.` or `..` is the kernel's: the name
/// must then be a directory (or cannot be used at all), which the kernel
/// checks per call (unlink: ENOTDIR or EISDIR, rmdir of `d/.`: EINVAL,
/// rename: ENOTDIR or EBUSY, link: ENOENT).
fn parent_of(t: &Target) -> Result<(u64, &[u8]), Option<i32>> {
    if t.dir {
        return Err(None);
    }
    let (parent, name) = paths::parent_and_name(&t.rest).ok_or(None)?;
    match ops::walk(t.client, parent, walk::FOLLOW_LAST | walk::DIRECTORY) {
        Ok(Walked::Done(p)) => Ok((p.nodeid, name)),
        Err(Fail::Errno(e)) if !t.via_fd => Err(Some(e)),
        _ => Err(None),
    }
}

/// The answer of a path call that changes something: errno from the file
/// system, or the kernel when the daemon cannot serve it.
fn answer(r: ops::R<()>, what: &str, path: &[u8]) -> Option<isize> {
    match r {
        Ok(()) => Some(0),
        Err(Fail::Errno(libc::ENOSYS)) | Err(Fail::Broken) => {
            blog!("{what} {}: not served by the daemon; through the kernel", Show(path));
            None
        }
        Err(Fail::Errno(e)) => fail(e),
    }
}

pub fn mkdir(dirfd: c_int, path: &[u8], mode: u32) -> Option<isize> {
    // "d/" creates d; "d/." and "d/.." are the kernel's (EEXIST, ENOENT).
    if paths::ends_with_dots(path) {
        return None;
    }
    let mut t = resolve(dirfd, path)?;
    t.dir = false;
    let (p, name) = match parent_of(&t) {
        Ok(x) => x,
        Err(Some(e)) => return fail(e),
        Err(None) => return None,
    };
    let um = umask();
    let r = ops::mkdir(t.client, p, name, mode & !um & 0o7777, um).map(|e| ops::forget(t.client, e.nodeid));
    ops::forget(t.client, p);
    answer(r, "mkdir", path)
}

pub fn unlink(dirfd: c_int, path: &[u8], dir: bool) -> Option<isize> {
    let t = resolve(dirfd, path)?;
    let (p, name) = match parent_of(&t) {
        Ok(x) => x,
        Err(Some(e)) => return fail(e),
        Err(None) => return None,
    };
    let r = ops::unlink(t.client, p, name, dir);
    ops::forget(t.client, p);
    answer(r, if dir { "rmdir" } else { "unlink" }, path)
}

pub fn rename(olddirfd: c_int, old: &[u8], newdirfd: c_int, new: &[u8], flags: u32) -> Option<isize> {
    let a = resolve(olddirfd, old)?;
    let b = resolve(newdirfd, new)?;
    if a.mount != b.mount {
        return None;
    }
    let (pa, na) = parent_of(&a).ok()?;
    let (pb, nb) = match parent_of(&b) {
        Ok(x) => x,
        Err(_) => {
            ops::forget(a.client, pa);
            return None;
        }
    };
    let r = ops::rename(a.client, pa, na, pb, nb, flags);
    ops::forget(a.client, pa);
    ops::forget(a.client, pb);
    answer(r, "rename", old)
}

pub fn symlink(target: &[u8], dirfd: c_int, path: &[u8]) -> Option<isize> {
    let t = resolve(dirfd, path)?;
    let (p, name) = match parent_of(&t) {
        Ok(x) => x,
        Err(Some(e)) => return fail(e),
        Err(None) => return None,
    };
    let r = ops::symlink(t.client, p, name, target).map(|e| ops::forget(t.client, e.nodeid));
    ops::forget(t.client, p);
    answer(r, "symlink", path)
}

pub fn link(olddirfd: c_int, old: &[u8], newdirfd: c_int, new: &[u8], follow: bool) -> Option<isize> {
    let a = resolve(olddirfd, old)?;
    let b = resolve(newdirfd, new)?;
    if a.mount != b.mount || a.dir || b.dir {
        return None;
    }
    let node = match ops::walk(a.client, &a.rest, walk_flags(&a, follow, true)) {
        Ok(Walked::Done(e)) => e.nodeid,
        Err(Fail::Errno(e)) if !a.via_fd => return fail(e),
        _ => return None,
    };
    let (p, name) = match parent_of(&b) {
        Ok(x) => x,
        Err(_) => {
            ops::forget(a.client, node);
            return None;
        }
    };
    let r = ops::link(a.client, node, p, name).map(|e| ops::forget(a.client, e.nodeid));
    ops::forget(a.client, p);
    ops::forget(a.client, node);
    answer(r, "link", new)
}

pub fn readlink(dirfd: c_int, path: &[u8], buf: &mut [u8]) -> Option<isize> {
    let t = resolve(dirfd, path)?;
    let node = match ops::walk(t.client, &t.rest, walk_flags(&t, false, true)) {
        Ok(Walked::Done(e)) => {
            if e.attr.mode & libc::S_IFMT != libc::S_IFLNK {
                ops::forget(t.client, e.nodeid);
                return fail(libc::EINVAL);
            }
            e.nodeid
        }
        Err(Fail::Errno(e)) if !t.via_fd => return fail(e),
        _ => return None,
    };
    let r = ops::readlink(t.client, node, buf);
    ops::forget(t.client, node);
    match r {
        Ok(n) => Some(n as isize),
        Err(Fail::Errno(e)) if e != libc::ENOSYS => fail(e),
        Err(_) => None,
    }
}

/// truncate/chmod/chown/utimensat on a path: WALK + SETATTR + FORGET.
pub fn setattr_path(dirfd: c_int, path: &[u8], follow: bool, build: impl FnOnce(&Attr) -> SetattrIn) -> Option<isize> {
    let t = resolve(dirfd, path)?;
    let e = match ops::walk(t.client, &t.rest, walk_flags(&t, follow, true)) {
        Ok(Walked::Done(e)) => e,
        Err(Fail::Errno(e)) if !t.via_fd => return fail(e),
        _ => return None,
    };
    let inp = build(&e.attr);
    let r = ops::setattr(t.client, e.nodeid, &inp).map(|_| ());
    ops::forget(t.client, e.nodeid);
    answer(r, "setattr", path)
}

/// SETATTR arguments of utimensat's times (None: both now).
pub fn times_setattr(times: Option<&[libc::timespec; 2]>) -> Option<SetattrIn> {
    let mut inp = SetattrIn::default();
    let now = libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW };
    let t = times.copied().unwrap_or([now, now]);
    for (i, ts) in t.iter().enumerate() {
        let (set, set_now) = if i == 0 { (fattr::ATIME, fattr::ATIME_NOW) } else { (fattr::MTIME, fattr::MTIME_NOW) };
        match ts.tv_nsec {
            libc::UTIME_OMIT => {}
            libc::UTIME_NOW => inp.valid |= set | set_now,
            n if (0..1_000_000_000).contains(&n) => {
                inp.valid |= set;
                if i == 0 {
                    inp.atime = ts.tv_sec as u64;
                    inp.atimensec = n as u32;
                } else {
                    inp.mtime = ts.tv_sec as u64;
                    inp.mtimensec = n as u32;
                }
            }
            _ => return None,
        }
    }
    Some(inp)
}

//! The system calls stackfs makes, as small safe functions over borrowed and
//! owned descriptors. Every `unsafe` block of stackfs lives here.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use efuse::Errno;

/// The empty path, for the `AT_EMPTY_PATH` forms.
pub(super) const EMPTY: &CStr = c"";

fn check(r: libc::c_int) -> Result<libc::c_int, Errno> {
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r)
    }
}

fn check_size(r: libc::ssize_t) -> Result<usize, Errno> {
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r as usize)
    }
}

/// Takes ownership of a descriptor a syscall just returned.
fn owned(r: libc::c_int) -> Result<OwnedFd, Errno> {
    let fd = check(r)?;
    // SAFETY: the kernel just handed us `fd`; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// "/proc/self/fd/N" for a descriptor, built on the stack. Opening it reaches
/// exactly the inode the descriptor refers to (a "magic link"), which is how
/// an `O_PATH` descriptor is reopened for I/O or used with path-only calls.
pub(super) struct ProcFdPath {
    buf: [u8; 32],
}

impl ProcFdPath {
    pub(super) fn new(fd: BorrowedFd<'_>) -> ProcFdPath {
        let mut buf = [0u8; 32];
        let prefix = b"/proc/self/fd/";
        buf[..prefix.len()].copy_from_slice(prefix);
        let mut digits = [0u8; 12];
        let mut n = fd.as_raw_fd() as u32;
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let d = &digits[i..];
        buf[prefix.len()..prefix.len() + d.len()].copy_from_slice(d);
        // buf[prefix.len() + d.len()] is already the terminating NUL.
        ProcFdPath { buf }
    }

    pub(super) fn as_cstr(&self) -> &CStr {
        CStr::from_bytes_until_nul(&self.buf).unwrap_or(c"/proc/self/fd/")
    }
}

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Opens one name in `dir` as an `O_PATH` handle, never following a symlink
/// (a symlink yields a handle on the link itself). Uses openat2 with
/// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS` where the
/// kernel has it, so even a name that slipped past our checks cannot leave `dir`.
pub(super) fn open_path_at(dir: BorrowedFd<'_>, name: &CStr) -> Result<OwnedFd, Errno> {
    let flags = libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        let how = OpenHow {
            flags: flags as u64,
            mode: 0,
            resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
        };
        // SAFETY: `how` is a valid open_how of the size passed; `name` is NUL-terminated.
        let r = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                name.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        match owned(r as libc::c_int) {
            Err(e) if e == Errno::ENOSYS => NO_OPENAT2.store(true, Ordering::Relaxed),
            other => return other,
        }
    }
    // SAFETY: plain openat on a NUL-terminated name.
    owned(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) })
}

/// openat(2) with explicit flags and mode.
pub(super) fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> Result<OwnedFd, Errno> {
    // SAFETY: plain openat on a NUL-terminated name.
    owned(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) })
}

/// Opens the inode behind `fd` anew with `flags`, through /proc/self/fd.
pub(super) fn reopen(fd: BorrowedFd<'_>, flags: i32) -> Result<OwnedFd, Errno> {
    let path = ProcFdPath::new(fd);
    // O_NOFOLLOW would refuse the magic link itself.
    let flags = (flags & !(libc::O_NOFOLLOW | libc::O_CREAT | libc::O_EXCL)) | libc::O_CLOEXEC;
    // SAFETY: plain open on a NUL-terminated path.
    owned(unsafe { libc::open(path.as_cstr().as_ptr(), flags) })
}

/// statx of the inode `fd` refers to (or of `name` in directory `fd`), never
/// following a symlink.
pub(super) fn statx(fd: BorrowedFd<'_>) -> Result<libc::statx, Errno> {
    let mut st = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: statx writes one struct statx to a valid pointer.
    check(unsafe {
        libc::statx(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW | libc::AT_STATX_SYNC_AS_STAT,
            libc::STATX_BASIC_STATS | libc::STATX_BTIME,
            st.as_mut_ptr(),
        )
    })?;
    // SAFETY: zero-initialised and filled by the kernel.
    Ok(unsafe { st.assume_init() })
}

/// Identity of an inode: device and inode number.
pub(super) fn statx_key(st: &libc::statx) -> (u64, u64) {
    (libc::makedev(st.stx_dev_major, st.stx_dev_minor), st.stx_ino)
}

/// A file handle from name_to_handle_at: names an inode independently of any
/// path or descriptor, so an evicted descriptor can be reopened later.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct FileHandle {
    pub(super) mount_id: i32,
    handle_type: i32,
    bytes: Box<[u8]>,
}

impl std::fmt::Debug for FileHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileHandle(mnt {}, type {}, {} bytes)", self.mount_id, self.handle_type, self.bytes.len())
    }
}

const MAX_HANDLE_SZ: usize = libc::MAX_HANDLE_SZ as usize;

/// `struct file_handle` with room for the largest handle.
#[repr(C)]
struct RawHandle {
    handle_bytes: libc::c_uint,
    handle_type: libc::c_int,
    f_handle: [u8; MAX_HANDLE_SZ],
}

/// The file handle of the inode `fd` refers to.
pub(super) fn name_to_handle(fd: BorrowedFd<'_>) -> Result<FileHandle, Errno> {
    let mut raw = RawHandle { handle_bytes: MAX_HANDLE_SZ as u32, handle_type: 0, f_handle: [0; MAX_HANDLE_SZ] };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `raw` is a file_handle with handle_bytes of space after the header.
    check(unsafe {
        libc::name_to_handle_at(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            &mut raw as *mut RawHandle as *mut libc::file_handle,
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    })?;
    let n = (raw.handle_bytes as usize).min(MAX_HANDLE_SZ);
    Ok(FileHandle { mount_id, handle_type: raw.handle_type, bytes: raw.f_handle[..n].into() })
}

/// Opens the inode named by `h` on the mount `mount_fd` belongs to. Needs
/// CAP_DAC_READ_SEARCH.
///
/// While the kernel is evicting a just-deleted inode, ext4 answers ENOMEM
/// (its iget finds the inode being freed and reports that as an allocation
/// failure) where a moment later it answers ESTALE; so ENOMEM is retried a
/// few times before it is believed.
pub(super) fn open_by_handle(mount_fd: BorrowedFd<'_>, h: &FileHandle, flags: i32) -> Result<OwnedFd, Errno> {
    let n = h.bytes.len().min(MAX_HANDLE_SZ);
    let mut raw = RawHandle { handle_bytes: n as u32, handle_type: h.handle_type, f_handle: [0; MAX_HANDLE_SZ] };
    raw.f_handle[..n].copy_from_slice(&h.bytes[..n]);
    let mut tries = 0;
    loop {
        // SAFETY: `raw` is a valid file_handle; the kernel only reads it.
        let r = owned(unsafe {
            libc::open_by_handle_at(
                mount_fd.as_raw_fd(),
                &mut raw as *mut RawHandle as *mut libc::file_handle,
                flags | libc::O_CLOEXEC,
            )
        });
        match r {
            Err(e) if e == Errno::ENOMEM && tries < 4 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_micros(100 << tries));
            }
            other => return other,
        }
    }
}

/// A duplicate descriptor (closed by the caller, for FLUSH).
pub(super) fn dup(fd: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we own.
    owned(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })
}

pub(super) fn readlink(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Errno> {
    // SAFETY: the kernel writes at most buf.len() bytes.
    check_size(unsafe { libc::readlinkat(fd.as_raw_fd(), EMPTY.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
}

pub(super) fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> Result<(), Errno> {
    // SAFETY: NUL-terminated name.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

pub(super) fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, rdev: u64) -> Result<(), Errno> {
    // SAFETY: NUL-terminated name.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, rdev) }).map(drop)
}

pub(super) fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> Result<(), Errno> {
    // SAFETY: NUL-terminated strings.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

pub(super) fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> Result<(), Errno> {
    // SAFETY: NUL-terminated name.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

pub(super) fn renameat2(
    olddir: BorrowedFd<'_>,
    old: &CStr,
    newdir: BorrowedFd<'_>,
    new: &CStr,
    flags: u32,
) -> Result<(), Errno> {
    // SAFETY: NUL-terminated names.
    check(unsafe { libc::renameat2(olddir.as_raw_fd(), old.as_ptr(), newdir.as_raw_fd(), new.as_ptr(), flags) })
        .map(drop)
}

/// Hard link to the inode `fd` refers to, named `name` in `dir`. The
/// `AT_EMPTY_PATH` form needs CAP_DAC_READ_SEARCH; without it, link through
/// /proc/self/fd, following that one magic link.
pub(super) fn link_fd(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &CStr) -> Result<(), Errno> {
    // SAFETY: NUL-terminated names.
    let r =
        unsafe { libc::linkat(fd.as_raw_fd(), EMPTY.as_ptr(), dir.as_raw_fd(), name.as_ptr(), libc::AT_EMPTY_PATH) };
    match check(r) {
        Err(e) if e == Errno::ENOENT || e == Errno::EPERM => {
            let path = ProcFdPath::new(fd);
            // SAFETY: NUL-terminated names.
            check(unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    path.as_cstr().as_ptr(),
                    dir.as_raw_fd(),
                    name.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            })
            .map(drop)
        }
        other => other.map(drop),
    }
}

pub(super) fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> Result<(), Errno> {
    let path = ProcFdPath::new(fd);
    // SAFETY: NUL-terminated path.
    check(unsafe { libc::fchmodat(libc::AT_FDCWD, path.as_cstr().as_ptr(), mode, 0) }).map(drop)
}

/// fchmod(2) on a descriptor open for I/O.
pub(super) fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> Result<(), Errno> {
    // SAFETY: plain syscall on a valid descriptor.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

/// `u32::MAX` leaves an id unchanged.
pub(super) fn chown_fd(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> Result<(), Errno> {
    // SAFETY: empty path with AT_EMPTY_PATH names the descriptor itself.
    check(unsafe {
        libc::fchownat(fd.as_raw_fd(), EMPTY.as_ptr(), uid, gid, libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW)
    })
    .map(drop)
}

pub(super) fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> Result<(), Errno> {
    let size = i64::try_from(size).map_err(|_| Errno::EFBIG)?;
    // SAFETY: plain syscall on a valid descriptor.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), size) }).map(drop)
}

/// Sets atime and mtime (`UTIME_NOW`, `UTIME_OMIT` allowed) of the inode `fd`
/// refers to, which may be an `O_PATH` handle of a symlink.
pub(super) fn utimens_fd(fd: BorrowedFd<'_>, times: &[libc::timespec; 2]) -> Result<(), Errno> {
    // SAFETY: `times` points to two timespecs; empty path with AT_EMPTY_PATH.
    let r = unsafe {
        libc::utimensat(fd.as_raw_fd(), EMPTY.as_ptr(), times.as_ptr(), libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW)
    };
    match check(r) {
        // Kernels before AT_EMPTY_PATH support in utimensat: go through /proc.
        Err(e) if e == Errno::EINVAL => {
            let path = ProcFdPath::new(fd);
            // SAFETY: as above, with a NUL-terminated path.
            check(unsafe { libc::utimensat(libc::AT_FDCWD, path.as_cstr().as_ptr(), times.as_ptr(), 0) }).map(drop)
        }
        other => other.map(drop),
    }
}

pub(super) fn access_fd(fd: BorrowedFd<'_>, mask: i32) -> Result<(), Errno> {
    let path = ProcFdPath::new(fd);
    // SAFETY: NUL-terminated path.
    check(unsafe { libc::faccessat(libc::AT_FDCWD, path.as_cstr().as_ptr(), mask, 0) }).map(drop)
}

pub(super) fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> Result<usize, Errno> {
    let offset = i64::try_from(offset).map_err(|_| Errno::EINVAL)?;
    // SAFETY: the kernel writes at most buf.len() bytes.
    check_size(unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), offset) })
}

pub(super) fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> Result<usize, Errno> {
    let offset = i64::try_from(offset).map_err(|_| Errno::EINVAL)?;
    // SAFETY: the kernel reads at most buf.len() bytes.
    check_size(unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), offset) })
}

pub(super) fn fsync(fd: BorrowedFd<'_>, datasync: bool) -> Result<(), Errno> {
    // SAFETY: plain syscalls on a valid descriptor.
    check(unsafe {
        if datasync {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    })
    .map(drop)
}

pub(super) fn syncfs(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: plain syscall on a valid descriptor.
    check(unsafe { libc::syncfs(fd.as_raw_fd()) }).map(drop)
}

pub(super) fn fstatvfs(fd: BorrowedFd<'_>) -> Result<libc::statvfs, Errno> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: fstatvfs writes one struct statvfs.
    check(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: zero-initialised and filled by libc.
    Ok(unsafe { st.assume_init() })
}

pub(super) fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> Result<(), Errno> {
    let offset = i64::try_from(offset).map_err(|_| Errno::EINVAL)?;
    let len = i64::try_from(len).map_err(|_| Errno::EINVAL)?;
    // SAFETY: plain syscall on a valid descriptor.
    check(unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset, len) }).map(drop)
}

pub(super) fn lseek(fd: BorrowedFd<'_>, offset: u64, whence: i32) -> Result<u64, Errno> {
    // The kernel passes the caller's loff_t through unchanged: a negative
    // offset arrives as a large u64 and the backing lseek must judge it.
    let offset = offset as i64;
    // SAFETY: plain syscall on a valid descriptor.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r as u64)
    }
}

pub(super) fn copy_file_range(
    fd_in: BorrowedFd<'_>,
    off_in: u64,
    fd_out: BorrowedFd<'_>,
    off_out: u64,
    len: u64,
    flags: u32,
) -> Result<usize, Errno> {
    let mut off_in = i64::try_from(off_in).map_err(|_| Errno::EINVAL)?;
    let mut off_out = i64::try_from(off_out).map_err(|_| Errno::EINVAL)?;
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    // SAFETY: the offsets are valid pointers to i64s we own.
    check_size(unsafe {
        libc::copy_file_range(fd_in.as_raw_fd(), &mut off_in, fd_out.as_raw_fd(), &mut off_out, len, flags)
    })
}

/// getdents64(2): fills `buf` with `linux_dirent64` records; 0 at the end.
pub(super) fn getdents64(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Errno> {
    // SAFETY: the kernel writes at most buf.len() bytes.
    let r = unsafe { libc::syscall(libc::SYS_getdents64, fd.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r as usize)
    }
}

/// Extended attribute calls through /proc/self/fd/N (O_PATH descriptors do
/// not support the f*xattr calls). With an empty `buf`, the size needed.
pub(super) fn getxattr(fd: BorrowedFd<'_>, name: &CStr, buf: &mut [u8]) -> Result<usize, Errno> {
    let path = ProcFdPath::new(fd);
    // SAFETY: the kernel writes at most buf.len() bytes; a null pointer with size 0 asks for the size.
    check_size(unsafe { libc::getxattr(path.as_cstr().as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
}

pub(super) fn listxattr(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Errno> {
    let path = ProcFdPath::new(fd);
    // SAFETY: as getxattr.
    check_size(unsafe { libc::listxattr(path.as_cstr().as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
}

pub(super) fn setxattr(fd: BorrowedFd<'_>, name: &CStr, value: &[u8], flags: i32) -> Result<(), Errno> {
    let path = ProcFdPath::new(fd);
    // SAFETY: the kernel reads value.len() bytes.
    check(unsafe { libc::setxattr(path.as_cstr().as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), flags) })
        .map(drop)
}

pub(super) fn removexattr(fd: BorrowedFd<'_>, name: &CStr) -> Result<(), Errno> {
    let path = ProcFdPath::new(fd);
    // SAFETY: NUL-terminated strings.
    check(unsafe { libc::removexattr(path.as_cstr().as_ptr(), name.as_ptr()) }).map(drop)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
pub(super) fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write one struct rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

pub(super) fn geteuid() -> u32 {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::geteuid() }
}

/// Sets this thread's file-system uid; returns the previous one. The raw
/// syscall is per thread (glibc's wrapper is too, but we make that explicit).
pub(super) fn setfsuid(uid: u32) -> u32 {
    // SAFETY: setfsuid has no memory arguments; it returns the previous fsuid.
    unsafe { libc::syscall(libc::SYS_setfsuid, uid) as u32 }
}

pub(super) fn setfsgid(gid: u32) -> u32 {
    // SAFETY: as setfsuid.
    unsafe { libc::syscall(libc::SYS_setfsgid, gid) as u32 }
}

/// Sets this thread's supplementary groups. The raw syscall changes the
/// calling thread only; glibc's setgroups(3) would change every thread of
/// the process.
pub(super) fn setgroups_thread(groups: &[u32]) -> Result<(), Errno> {
    // SAFETY: passes a live slice of gid_t (u32) and its length.
    let rc = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if rc < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// This thread's supplementary groups.
pub(super) fn getgroups() -> Result<Vec<u32>, Errno> {
    // SAFETY: a size of 0 asks only for the count.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    if n < 0 {
        return Err(Errno::last());
    }
    let mut groups = vec![0 as libc::gid_t; n as usize];
    // SAFETY: getgroups writes at most `groups.len()` ids into the buffer.
    let n = unsafe { libc::getgroups(groups.len() as i32, groups.as_mut_ptr()) };
    if n < 0 {
        return Err(Errno::last());
    }
    groups.truncate(n as usize);
    Ok(groups)
}

/// The path the kernel has for `fd` now (/proc/self/fd), or None.
fn path_of(fd: BorrowedFd<'_>, buf: &mut [u8; 4096]) -> Option<usize> {
    let link = ProcFdPath::new(fd);
    // SAFETY: readlink writes at most buf.len() bytes into buf.
    let n = unsafe { libc::readlink(link.as_cstr().as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (n > 0 && (n as usize) < buf.len()).then_some(n as usize)
}

/// Whether the directory `dir` lies below (or is) the directory `root`,
/// judged by the paths the kernel has for both now: a directory deleted, or
/// moved where the daemon cannot name it, is not. Paths too long to read
/// are judged by walking up `..` instead.
pub(super) fn is_beneath(dir: BorrowedFd<'_>, root: BorrowedFd<'_>) -> bool {
    let (mut d, mut r) = ([0u8; 4096], [0u8; 4096]);
    let (Some(dn), Some(rn)) = (path_of(dir, &mut d), path_of(root, &mut r)) else { return walks_up_to(dir, root) };
    let (d, r) = (&d[..dn], &r[..rn]);
    let under =
        d.first() == Some(&b'/') && (r == b"/" || d == r || (d.starts_with(r) && d.get(r.len()) == Some(&b'/')));
    // A removed directory's path reads "<old path> (deleted)", which may
    // still start with the root's: its link count tells (a name may end in
    // " (deleted)" too).
    under && statx(dir).is_ok_and(|st| st.stx_nlink > 0)
}

/// Whether walking up `..` from `dir` reaches `root` (before the root of
/// its file system, or 65536 steps).
fn walks_up_to(dir: BorrowedFd<'_>, root: BorrowedFd<'_>) -> bool {
    use std::os::fd::AsFd;
    let Ok(root_key) = statx(root).map(|st| statx_key(&st)) else { return false };
    let Ok(mut here) = reopen(dir, libc::O_PATH) else { return false };
    for _ in 0..65536 {
        let Ok(st) = statx(here.as_fd()) else { return false };
        let key = statx_key(&st);
        if key == root_key {
            return true;
        }
        if st.stx_nlink == 0 {
            return false;
        }
        let Ok(up) = openat(here.as_fd(), c"..", libc::O_PATH | libc::O_DIRECTORY, 0) else { return false };
        let Ok(up_st) = statx(up.as_fd()) else { return false };
        if statx_key(&up_st) == key {
            // The root of everything the daemon can see, and not the backing root.
            return false;
        }
        here = up;
    }
    false
}

/// Gives this thread its own root, working directory and umask (they are
/// shared by the whole process otherwise).
pub(super) fn unshare_fs() -> Result<(), Errno> {
    // SAFETY: unshare with CLONE_FS only copies this task's fs_struct.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Sets the umask (of this thread, after [`unshare_fs`]); returns the old one.
pub(super) fn umask(mask: u32) -> u32 {
    // SAFETY: umask cannot fail and touches no memory.
    unsafe { libc::umask(mask as libc::mode_t) as u32 }
}

/// Longest key [`FileHandle::key`] produces.
pub(super) const HANDLE_KEY_MAX: usize = 4 + MAX_HANDLE_SZ;

impl FileHandle {
    /// The handle's identity without its mount: type then bytes, as fanotify
    /// reports it ([`handle_key`]).
    pub(super) fn key(&self) -> Box<[u8]> {
        let mut buf = [0u8; HANDLE_KEY_MAX];
        handle_key(self.handle_type, &self.bytes, &mut buf).into()
    }
}

/// The key of the handle (`handle_type`, `bytes`), built in `buf`.
pub(super) fn handle_key<'b>(handle_type: i32, bytes: &[u8], buf: &'b mut [u8; HANDLE_KEY_MAX]) -> &'b [u8] {
    let n = bytes.len().min(MAX_HANDLE_SZ);
    buf[..4].copy_from_slice(&handle_type.to_ne_bytes());
    buf[4..4 + n].copy_from_slice(&bytes[..n]);
    &buf[..4 + n]
}

/// fstatfs(2)'s `f_type`: which kind of file system `fd` is on.
pub(super) fn fs_type(fd: BorrowedFd<'_>) -> Result<i64, Errno> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs writes one struct statfs.
    check(unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: zero-initialised and filled by the kernel.
    let st = unsafe { st.assume_init() };
    // f_type's width differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64)
}

/// fanotify_init(2), close-on-exec.
pub(super) fn fanotify_init(flags: u32, event_f_flags: u32) -> Result<OwnedFd, Errno> {
    // SAFETY: plain syscall; returns a new descriptor.
    owned(unsafe { libc::fanotify_init(flags | libc::FAN_CLOEXEC, event_f_flags) })
}

/// fanotify_mark(2) on the inode `fd` refers to (followed through /proc/self/fd).
pub(super) fn fanotify_mark(fan: BorrowedFd<'_>, flags: u32, mask: u64, fd: BorrowedFd<'_>) -> Result<(), Errno> {
    let path = ProcFdPath::new(fd);
    // SAFETY: NUL-terminated path; the kernel only reads it.
    check(unsafe { libc::fanotify_mark(fan.as_raw_fd(), flags, mask, libc::AT_FDCWD, path.as_cstr().as_ptr()) })
        .map(drop)
}

/// inotify_init1(2), close-on-exec.
pub(super) fn inotify_init() -> Result<OwnedFd, Errno> {
    // SAFETY: plain syscall; returns a new descriptor.
    owned(unsafe { libc::inotify_init1(libc::IN_CLOEXEC) })
}

/// inotify_add_watch(2) on the inode `fd` refers to; returns the watch descriptor.
pub(super) fn inotify_add_watch(ino: BorrowedFd<'_>, fd: BorrowedFd<'_>, mask: u32) -> Result<i32, Errno> {
    let path = ProcFdPath::new(fd);
    // SAFETY: NUL-terminated path; the kernel only reads it.
    check(unsafe { libc::inotify_add_watch(ino.as_raw_fd(), path.as_cstr().as_ptr(), mask) })
}

pub(super) fn inotify_rm_watch(ino: BorrowedFd<'_>, wd: i32) {
    // SAFETY: plain syscall; a stale wd only yields EINVAL.
    unsafe { libc::inotify_rm_watch(ino.as_raw_fd(), wd) };
}

/// read(2), retried on EINTR.
pub(super) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Errno> {
    loop {
        // SAFETY: the kernel writes at most buf.len() bytes.
        match check_size(unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) }) {
            Err(e) if e == Errno::EINTR => continue,
            other => return other,
        }
    }
}

/// An eventfd, to wake a thread blocked in [`poll2`].
pub(super) fn eventfd() -> Result<OwnedFd, Errno> {
    // SAFETY: plain syscall; returns a new descriptor.
    owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) })
}

pub(super) fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer.
    unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

/// Waits until `a` or `b` is readable; returns (a readable, b readable).
pub(super) fn poll2(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> Result<(bool, bool), Errno> {
    let mut fds = [
        libc::pollfd { fd: a.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: b.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    loop {
        // SAFETY: two valid pollfds.
        match check(unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) }) {
            Err(e) if e == Errno::EINTR => continue,
            Err(e) => return Err(e),
            Ok(_) => return Ok((fds[0].revents != 0, fds[1].revents != 0)),
        }
    }
}

pub(super) fn getpid() -> i32 {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::getpid() }
}

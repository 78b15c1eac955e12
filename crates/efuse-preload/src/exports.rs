//! The interposed C functions. Each one first decides, as cheaply as it
//! can, whether the call is the library's (a served descriptor: one atomic
//! load; a path: only when some mount offers the bypass), and otherwise
//! calls the C library's own function.
//!
//! C-variadic functions (open, openat, fcntl, ioctl) are defined with one
//! fixed trailing integer argument: on x86_64 and aarch64 a variadic
//! integer travels in the same register as a fixed one, and it is only
//! used when the flags or command say it was passed.

#![allow(clippy::missing_safety_doc)]

use std::panic::{catch_unwind, AssertUnwindSafe};

use efuse_abi::consts::fattr;
use efuse_abi::structs::SetattrIn;
use libc::{c_char, c_int, c_uint, c_void, mode_t, off_t, size_t, ssize_t};

use crate::files;
use crate::guard::{self, set_errno};
use crate::real;
use crate::serve::{self, cstr};

/// Runs a served path call; a panic sends it to the kernel.
fn catch_path<T>(f: impl FnOnce() -> Option<T>) -> Option<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(None)
}

/// Runs a served descriptor call; a panic becomes EIO.
fn catch_fd<T: From<i8>>(f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        set_errno(libc::EIO);
        T::from(-1)
    })
}

/// A path call: served if it is the library's, else `$real`.
macro_rules! path_call {
    ($serve:expr, $real:expr) => {{
        if let Some(g) = guard::enter() {
            let r = if crate::config::on() { catch_path(|| $serve) } else { None };
            drop(g);
            if let Some(v) = r {
                return v as _;
            }
        }
        $real
    }};
}

/// A descriptor call: served if the descriptor is the library's (even in a
/// signal handler that interrupted the library), else `$real`.
macro_rules! fd_call {
    ($fd:expr, |$idx:ident| $serve:expr, $real:expr) => {{
        if let Some($idx) = files::get($fd) {
            let g = guard::enter();
            let r = catch_fd(|| $serve);
            drop(g);
            return r as _;
        }
        $real
    }};
}

/// Converts a served descriptor to a kernel open before a use the library
/// does not serve.
fn convert(fd: c_int, why: &str) {
    if files::get(fd).is_some() {
        let g = guard::enter();
        let _ = catch_unwind(AssertUnwindSafe(|| serve::convert(fd, why)));
        drop(g);
    }
}

/// A direct read (see `direct`) has no daemon handle to change the file
/// through: before such a use, it becomes a kernel open.
fn leave_direct(fd: c_int, why: &str) -> Result<(), c_int> {
    if files::get(fd).is_some_and(|i| files::file(i).direct.load(std::sync::atomic::Ordering::Relaxed) != 0) {
        let g = guard::enter();
        let r = catch_unwind(AssertUnwindSafe(|| serve::convert(fd, why))).unwrap_or(Err(libc::EIO));
        drop(g);
        if let Err(e) = r {
            set_errno(e);
            return Err(-1);
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ open

/// Descriptors 0, 1 and 2 are also stdio's stdin, stdout and stderr, whose
/// reads and writes (a shell's `echo`, `printf`, `read`) go through the C
/// library's internal calls, which this library never sees: a served file
/// must not sit there, or those calls hit the O_PATH descriptor (EBADF).
fn stdio_fd(fd: c_int) -> bool {
    (0..=2).contains(&fd)
}

unsafe fn do_open(dirfd: c_int, path: *const c_char, flags: c_int, mode: c_uint) -> Option<c_int> {
    let fd = serve::open(dirfd, cstr(path)?, flags, mode)?;
    if stdio_fd(fd) {
        // Inside the library already (path_call holds the guard).
        let _ = serve::convert(fd, "a standard descriptor (stdio uses it unseen)");
    }
    Some(fd)
}

fn mode_of(flags: c_int, mode: c_uint) -> u32 {
    if flags & libc::O_CREAT != 0 || flags & libc::O_TMPFILE == libc::O_TMPFILE {
        mode
    } else {
        0
    }
}

#[no_mangle]
pub unsafe extern "C" fn open(path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
    path_call!(do_open(libc::AT_FDCWD, path, flags, mode_of(flags, mode)), fresh(real::open()(path, flags, mode)))
}

#[no_mangle]
pub unsafe extern "C" fn open64(path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
    path_call!(do_open(libc::AT_FDCWD, path, flags, mode_of(flags, mode)), fresh(real::open64()(path, flags, mode)))
}

#[no_mangle]
pub unsafe extern "C" fn __open_2(path: *const c_char, flags: c_int) -> c_int {
    open(path, flags, 0)
}

#[no_mangle]
pub unsafe extern "C" fn __open64_2(path: *const c_char, flags: c_int) -> c_int {
    open64(path, flags, 0)
}

#[no_mangle]
pub unsafe extern "C" fn openat(dirfd: c_int, path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
    path_call!(do_open(dirfd, path, flags, mode_of(flags, mode)), fresh(real::openat()(dirfd, path, flags, mode)))
}

#[no_mangle]
pub unsafe extern "C" fn openat64(dirfd: c_int, path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
    path_call!(do_open(dirfd, path, flags, mode_of(flags, mode)), fresh(real::openat64()(dirfd, path, flags, mode)))
}

#[no_mangle]
pub unsafe extern "C" fn __openat_2(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    openat(dirfd, path, flags, 0)
}

#[no_mangle]
pub unsafe extern "C" fn __openat64_2(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    openat64(dirfd, path, flags, 0)
}

#[no_mangle]
pub unsafe extern "C" fn creat(path: *const c_char, mode: mode_t) -> c_int {
    let flags = libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC;
    path_call!(do_open(libc::AT_FDCWD, path, flags, mode), fresh(real::creat()(path, mode)))
}

#[no_mangle]
pub unsafe extern "C" fn creat64(path: *const c_char, mode: mode_t) -> c_int {
    let flags = libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC;
    path_call!(do_open(libc::AT_FDCWD, path, flags, mode), fresh(real::creat64()(path, mode)))
}

#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    // The library's own socket is not the program's to close (it never got
    // that number from an open of its own): it stays, the close succeeds.
    if crate::mounts::is_library_fd(fd) {
        return 0;
    }
    fd_call!(fd, |_idx| serve::close(fd), real::close()(fd))
}

/// Runs `close(a, b)` over `first..=last` without closing the library's own
/// sockets: over the stretches between them.
fn around_library_fds(first: u32, last: u32, mut close: impl FnMut(u32, u32) -> c_int) -> c_int {
    let mut from = first;
    let mut r = 0;
    for fd in crate::mounts::library_fds_in(first, last) {
        if fd > from {
            r = close(from, fd - 1);
        }
        match fd.checked_add(1) {
            Some(n) => from = n,
            None => return r,
        }
    }
    if from <= last {
        r = close(from, last);
    }
    r
}

/// A descriptor the kernel has just made (an open, a dup the library does
/// not serve): an entry left for its number is stale (see
/// `serve::forget_stale`).
fn fresh(fd: c_int) -> c_int {
    if fd >= 0 && files::get(fd).is_some() {
        let g = guard::enter();
        let _ = catch_unwind(AssertUnwindSafe(|| serve::forget_stale(fd)));
        drop(g);
    }
    fd
}

#[no_mangle]
pub unsafe extern "C" fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    // CLOSE_RANGE_CLOEXEC only marks; bad arguments close nothing.
    let known = (libc::CLOSE_RANGE_UNSHARE | libc::CLOSE_RANGE_CLOEXEC) as c_int;
    if flags & libc::CLOSE_RANGE_CLOEXEC as c_int != 0 || flags & !known != 0 || first > last {
        return real::close_range()(first, last, flags);
    }
    let g = guard::enter();
    let r =
        serve::close_range(first, last, || around_library_fds(first, last, |a, b| real::close_range()(a, b, flags)));
    drop(g);
    r
}

#[no_mangle]
pub unsafe extern "C" fn closefrom(low: c_int) {
    let g = guard::enter();
    let first = low.max(0) as u32;
    serve::close_range(first, u32::MAX, || {
        around_library_fds(first, u32::MAX, |a, b| {
            if b == u32::MAX {
                real::closefrom()(a as c_int);
                0
            } else {
                real::close_range()(a, b, 0)
            }
        })
    });
    drop(g);
}

// ------------------------------------------------------------------ data

fn one(buf: *mut c_void, n: size_t) -> libc::iovec {
    libc::iovec { iov_base: buf, iov_len: n }
}

#[no_mangle]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t {
    fd_call!(fd, |idx| serve::readv(idx, &one(buf, n), 1, None), real::read()(fd, buf, n))
}

#[no_mangle]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t {
    fd_call!(fd, |idx| serve::writev(idx, &one(buf as *mut c_void, n), 1, None), real::write()(fd, buf, n))
}

#[no_mangle]
pub unsafe extern "C" fn pread(fd: c_int, buf: *mut c_void, n: size_t, off: off_t) -> ssize_t {
    fd_call!(fd, |idx| serve::readv(idx, &one(buf, n), 1, Some(off)), real::pread()(fd, buf, n, off))
}

#[no_mangle]
pub unsafe extern "C" fn pread64(fd: c_int, buf: *mut c_void, n: size_t, off: off_t) -> ssize_t {
    fd_call!(fd, |idx| serve::readv(idx, &one(buf, n), 1, Some(off)), real::pread64()(fd, buf, n, off))
}

#[no_mangle]
pub unsafe extern "C" fn pwrite(fd: c_int, buf: *const c_void, n: size_t, off: off_t) -> ssize_t {
    fd_call!(fd, |idx| serve::writev(idx, &one(buf as *mut c_void, n), 1, Some(off)), real::pwrite()(fd, buf, n, off))
}

#[no_mangle]
pub unsafe extern "C" fn pwrite64(fd: c_int, buf: *const c_void, n: size_t, off: off_t) -> ssize_t {
    fd_call!(fd, |idx| serve::writev(idx, &one(buf as *mut c_void, n), 1, Some(off)), real::pwrite64()(fd, buf, n, off))
}

#[no_mangle]
pub unsafe extern "C" fn readv(fd: c_int, iov: *const libc::iovec, cnt: c_int) -> ssize_t {
    fd_call!(fd, |idx| serve::readv(idx, iov, cnt, None), real::readv()(fd, iov, cnt))
}

#[no_mangle]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const libc::iovec, cnt: c_int) -> ssize_t {
    fd_call!(fd, |idx| serve::writev(idx, iov, cnt, None), real::writev()(fd, iov, cnt))
}

#[no_mangle]
pub unsafe extern "C" fn preadv(fd: c_int, iov: *const libc::iovec, cnt: c_int, off: off_t) -> ssize_t {
    fd_call!(fd, |idx| serve::readv(idx, iov, cnt, Some(off)), real::preadv()(fd, iov, cnt, off))
}

#[no_mangle]
pub unsafe extern "C" fn preadv64(fd: c_int, iov: *const libc::iovec, cnt: c_int, off: off_t) -> ssize_t {
    fd_call!(fd, |idx| serve::readv(idx, iov, cnt, Some(off)), real::preadv64()(fd, iov, cnt, off))
}

#[no_mangle]
pub unsafe extern "C" fn pwritev(fd: c_int, iov: *const libc::iovec, cnt: c_int, off: off_t) -> ssize_t {
    fd_call!(fd, |idx| serve::writev(idx, iov, cnt, Some(off)), real::pwritev()(fd, iov, cnt, off))
}

#[no_mangle]
pub unsafe extern "C" fn pwritev64(fd: c_int, iov: *const libc::iovec, cnt: c_int, off: off_t) -> ssize_t {
    fd_call!(fd, |idx| serve::writev(idx, iov, cnt, Some(off)), real::pwritev64()(fd, iov, cnt, off))
}

#[no_mangle]
pub unsafe extern "C" fn preadv2(fd: c_int, iov: *const libc::iovec, cnt: c_int, off: off_t, fl: c_int) -> ssize_t {
    if fl != 0 {
        convert(fd, "preadv2 with flags");
    }
    let at = (off != -1).then_some(off);
    fd_call!(fd, |idx| serve::readv(idx, iov, cnt, at), real::preadv2()(fd, iov, cnt, off, fl))
}

#[no_mangle]
pub unsafe extern "C" fn pwritev2(fd: c_int, iov: *const libc::iovec, cnt: c_int, off: off_t, fl: c_int) -> ssize_t {
    if fl != 0 {
        convert(fd, "pwritev2 with flags");
    }
    let at = (off != -1).then_some(off);
    fd_call!(fd, |idx| serve::writev(idx, iov, cnt, at), real::pwritev2()(fd, iov, cnt, off, fl))
}

// What programs built with 64-bit file offsets call for preadv2 and
// pwritev2 (Python's os.preadv and os.pwritev, for one).
#[no_mangle]
pub unsafe extern "C" fn preadv64v2(fd: c_int, iov: *const libc::iovec, cnt: c_int, off: off_t, fl: c_int) -> ssize_t {
    if fl != 0 {
        convert(fd, "preadv2 with flags");
    }
    let at = (off != -1).then_some(off);
    fd_call!(fd, |idx| serve::readv(idx, iov, cnt, at), real::preadv64v2()(fd, iov, cnt, off, fl))
}

#[no_mangle]
pub unsafe extern "C" fn pwritev64v2(fd: c_int, iov: *const libc::iovec, cnt: c_int, off: off_t, fl: c_int) -> ssize_t {
    if fl != 0 {
        convert(fd, "pwritev2 with flags");
    }
    let at = (off != -1).then_some(off);
    fd_call!(fd, |idx| serve::writev(idx, iov, cnt, at), real::pwritev64v2()(fd, iov, cnt, off, fl))
}

#[no_mangle]
pub unsafe extern "C" fn lseek(fd: c_int, off: off_t, whence: c_int) -> off_t {
    fd_call!(fd, |idx| serve::lseek(idx, off, whence), real::lseek()(fd, off, whence))
}

#[no_mangle]
pub unsafe extern "C" fn lseek64(fd: c_int, off: off_t, whence: c_int) -> off_t {
    fd_call!(fd, |idx| serve::lseek(idx, off, whence), real::lseek64()(fd, off, whence))
}

#[no_mangle]
pub unsafe extern "C" fn ftruncate(fd: c_int, len: off_t) -> c_int {
    if len < 0 && files::get(fd).is_some() {
        set_errno(libc::EINVAL);
        return -1;
    }
    if let Err(r) = leave_direct(fd, "ftruncate") {
        return r;
    }
    let inp = SetattrIn { valid: fattr::SIZE, size: len as u64, ..Default::default() };
    fd_call!(fd, |idx| serve::fsetattr(idx, inp), real::ftruncate()(fd, len))
}

#[no_mangle]
pub unsafe extern "C" fn ftruncate64(fd: c_int, len: off_t) -> c_int {
    ftruncate(fd, len)
}

#[no_mangle]
pub unsafe extern "C" fn fsync(fd: c_int) -> c_int {
    fd_call!(fd, |idx| serve::fsync(idx, false), real::fsync()(fd))
}

#[no_mangle]
pub unsafe extern "C" fn fdatasync(fd: c_int) -> c_int {
    fd_call!(fd, |idx| serve::fsync(idx, true), real::fdatasync()(fd))
}

#[no_mangle]
pub unsafe extern "C" fn fchmod(fd: c_int, mode: mode_t) -> c_int {
    if let Err(r) = leave_direct(fd, "fchmod") {
        return r;
    }
    if files::get(fd).is_some() {
        // The daemon needs the file type bits with the mode: fstat first.
        let mut st: libc::stat = std::mem::zeroed();
        if fstat(fd, &mut st) != 0 {
            return -1;
        }
        let inp =
            SetattrIn { valid: fattr::MODE, mode: (st.st_mode & libc::S_IFMT) | (mode & 0o7777), ..Default::default() };
        fd_call!(fd, |idx| serve::fsetattr(idx, inp), 0);
    }
    real::fchmod()(fd, mode)
}

/// SETATTR of a chown. A chown clears suid and sgid as the kernel's does:
/// asks the file system to (KILL_SUIDGID, as the kernel asks when the
/// daemon handles it, HANDLE_KILLPRIV_V2); the file system leaves
/// directories alone.
fn owner_setattr(uid: libc::uid_t, gid: libc::gid_t) -> SetattrIn {
    let mut inp = SetattrIn::default();
    if uid != u32::MAX {
        inp.valid |= fattr::UID;
        inp.uid = uid;
    }
    if gid != u32::MAX {
        inp.valid |= fattr::GID;
        inp.gid = gid;
    }
    if inp.valid != 0 {
        inp.valid |= fattr::KILL_SUIDGID;
    }
    inp
}

#[no_mangle]
pub unsafe extern "C" fn fchown(fd: c_int, uid: libc::uid_t, gid: libc::gid_t) -> c_int {
    if let Err(r) = leave_direct(fd, "fchown") {
        return r;
    }
    let inp = owner_setattr(uid, gid);
    fd_call!(fd, |idx| if inp.valid == 0 { 0 } else { serve::fsetattr(idx, inp) }, real::fchown()(fd, uid, gid))
}

#[no_mangle]
pub unsafe extern "C" fn futimens(fd: c_int, times: *const libc::timespec) -> c_int {
    if let Err(r) = leave_direct(fd, "futimens") {
        return r;
    }
    if files::get(fd).is_some() {
        let t = if times.is_null() { None } else { Some(&*(times as *const [libc::timespec; 2])) };
        let Some(inp) = serve::times_setattr(t) else {
            set_errno(libc::EINVAL);
            return -1;
        };
        fd_call!(fd, |idx| if inp.valid == 0 { 0 } else { serve::fsetattr(idx, inp) }, 0);
    }
    real::futimens()(fd, times)
}

// ------------------------------------------------------------------ stat

unsafe fn stat_path(dirfd: c_int, path: *const c_char, st: *mut libc::stat, follow: bool) -> Option<c_int> {
    let p = cstr(path)?;
    if st.is_null() {
        return None;
    }
    match serve::attr_of(dirfd, p, follow)? {
        Ok((a, dev)) => {
            serve::fill_stat(&a, dev, &mut *st);
            Some(0)
        }
        Err(e) => {
            set_errno(e);
            Some(-1)
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn stat(path: *const c_char, st: *mut libc::stat) -> c_int {
    path_call!(stat_path(libc::AT_FDCWD, path, st, true), real::stat()(path, st))
}

#[no_mangle]
pub unsafe extern "C" fn stat64(path: *const c_char, st: *mut libc::stat) -> c_int {
    path_call!(stat_path(libc::AT_FDCWD, path, st, true), real::stat64()(path, st))
}

#[no_mangle]
pub unsafe extern "C" fn lstat(path: *const c_char, st: *mut libc::stat) -> c_int {
    path_call!(stat_path(libc::AT_FDCWD, path, st, false), real::lstat()(path, st))
}

#[no_mangle]
pub unsafe extern "C" fn lstat64(path: *const c_char, st: *mut libc::stat) -> c_int {
    path_call!(stat_path(libc::AT_FDCWD, path, st, false), real::lstat64()(path, st))
}

#[no_mangle]
pub unsafe extern "C" fn fstat(fd: c_int, st: *mut libc::stat) -> c_int {
    if files::get(fd).is_some_and(serve::kernel_stat) {
        return real::fstat()(fd, st);
    }
    fd_call!(
        fd,
        |idx| if st.is_null() { serve::fail(libc::EFAULT).unwrap_or(-1) as c_int } else { serve::fstat(idx, &mut *st) },
        real::fstat()(fd, st)
    )
}

#[no_mangle]
pub unsafe extern "C" fn fstat64(fd: c_int, st: *mut libc::stat) -> c_int {
    fstat(fd, st)
}

unsafe fn fstatat_any(dirfd: c_int, path: *const c_char, st: *mut libc::stat, flags: c_int) -> c_int {
    if flags & libc::AT_EMPTY_PATH != 0 && cstr(path).is_some_and(|p| p.is_empty()) {
        // The descriptor itself (AT_FDCWD: the working directory, the kernel's).
        if files::get(dirfd).is_some() {
            return fstat(dirfd, st);
        }
        return real::fstatat()(dirfd, path, st, flags);
    }
    let follow = flags & libc::AT_SYMLINK_NOFOLLOW == 0;
    path_call!(stat_path(dirfd, path, st, follow), real::fstatat()(dirfd, path, st, flags))
}

#[no_mangle]
pub unsafe extern "C" fn fstatat(dirfd: c_int, path: *const c_char, st: *mut libc::stat, flags: c_int) -> c_int {
    fstatat_any(dirfd, path, st, flags)
}

#[no_mangle]
pub unsafe extern "C" fn fstatat64(dirfd: c_int, path: *const c_char, st: *mut libc::stat, flags: c_int) -> c_int {
    fstatat_any(dirfd, path, st, flags)
}

#[no_mangle]
pub unsafe extern "C" fn __xstat(_ver: c_int, path: *const c_char, st: *mut libc::stat) -> c_int {
    stat(path, st)
}

#[no_mangle]
pub unsafe extern "C" fn __xstat64(_ver: c_int, path: *const c_char, st: *mut libc::stat) -> c_int {
    stat(path, st)
}

#[no_mangle]
pub unsafe extern "C" fn __lxstat(_ver: c_int, path: *const c_char, st: *mut libc::stat) -> c_int {
    lstat(path, st)
}

#[no_mangle]
pub unsafe extern "C" fn __lxstat64(_ver: c_int, path: *const c_char, st: *mut libc::stat) -> c_int {
    lstat(path, st)
}

#[no_mangle]
pub unsafe extern "C" fn __fxstat(_ver: c_int, fd: c_int, st: *mut libc::stat) -> c_int {
    fstat(fd, st)
}

#[no_mangle]
pub unsafe extern "C" fn __fxstat64(_ver: c_int, fd: c_int, st: *mut libc::stat) -> c_int {
    fstat(fd, st)
}

#[no_mangle]
pub unsafe extern "C" fn __fxstatat(
    _ver: c_int,
    dirfd: c_int,
    path: *const c_char,
    st: *mut libc::stat,
    flags: c_int,
) -> c_int {
    fstatat_any(dirfd, path, st, flags)
}

#[no_mangle]
pub unsafe extern "C" fn __fxstatat64(
    _ver: c_int,
    dirfd: c_int,
    path: *const c_char,
    st: *mut libc::stat,
    flags: c_int,
) -> c_int {
    fstatat_any(dirfd, path, st, flags)
}

unsafe fn statx_path(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mask: c_uint,
    sx: *mut libc::statx,
) -> Option<c_int> {
    let p = cstr(path)?;
    // Birth time and the rarer fields: the kernel's answer.
    if sx.is_null() || mask & !libc::STATX_BASIC_STATS != 0 || p.is_empty() {
        return None;
    }
    match serve::attr_of(dirfd, p, flags & libc::AT_SYMLINK_NOFOLLOW == 0)? {
        Ok((a, dev)) => {
            serve::fill_statx(&a, dev, mask, &mut *sx);
            Some(0)
        }
        Err(e) => {
            set_errno(e);
            Some(-1)
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn statx(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mask: c_uint,
    sx: *mut libc::statx,
) -> c_int {
    if flags & libc::AT_EMPTY_PATH != 0 && cstr(path).is_some_and(|p| p.is_empty()) && !sx.is_null() {
        if mask & !libc::STATX_BASIC_STATS == 0 && !files::get(dirfd).is_some_and(serve::kernel_stat) {
            fd_call!(dirfd, |idx| serve::fstatx(idx, mask, &mut *sx), ())
        } else {
            convert(dirfd, "statx of extra fields");
        }
        return real::statx()(dirfd, path, flags, mask, sx);
    }
    path_call!(statx_path(dirfd, path, flags, mask, sx), real::statx()(dirfd, path, flags, mask, sx))
}

unsafe fn access_path(dirfd: c_int, path: *const c_char, how: c_int, flags: c_int) -> Option<c_int> {
    // Existence only: permission questions (real ids) stay the kernel's.
    if how != libc::F_OK {
        return None;
    }
    let p = cstr(path)?;
    match serve::attr_of(dirfd, p, flags & libc::AT_SYMLINK_NOFOLLOW == 0)? {
        Ok(_) => Some(0),
        Err(e) => {
            set_errno(e);
            Some(-1)
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn access(path: *const c_char, how: c_int) -> c_int {
    path_call!(access_path(libc::AT_FDCWD, path, how, 0), real::access()(path, how))
}

#[no_mangle]
pub unsafe extern "C" fn faccessat(dirfd: c_int, path: *const c_char, how: c_int, flags: c_int) -> c_int {
    path_call!(access_path(dirfd, path, how, flags), real::faccessat()(dirfd, path, how, flags))
}

// ------------------------------------------------------------------ dup, fcntl

/// Records that `new` (just made by the kernel as a copy of served `old`)
/// shares old's open file.
fn share(old_idx: u32, new: c_int) -> c_int {
    if new >= 0 && !serve::owns_memory() {
        // A vfork child (posix_spawn's file actions): the table is its
        // parent's. The copy becomes a kernel open of its own, for the
        // program the child is about to exec.
        let g = guard::enter();
        let _ = catch_unwind(AssertUnwindSafe(|| serve::convert_copy(new, old_idx, "a copy made in a vfork child")));
        drop(g);
        return new;
    }
    if new >= 0 {
        fresh(new);
        files::add_ref(old_idx);
        if !files::bind(new, old_idx) {
            // Too high to track: make it an ordinary open.
            files::drop_ref(old_idx);
        }
    }
    new
}

/// After a dup that the kernel placed on 0, 1 or 2 (they were closed):
/// convert the copy (and with it the whole open file).
fn std_after(new: c_int) -> c_int {
    if stdio_fd(new) {
        convert(new, "a copy onto descriptor 0, 1 or 2");
    }
    new
}

/// Before the kernel closes `fd` implicitly (dup2/dup3 onto it): drop its
/// reference properly.
fn closing(fd: c_int) {
    if !serve::owns_memory() {
        return;
    }
    if let Some(idx) = files::unbind(fd) {
        let g = guard::enter();
        let _ = catch_unwind(AssertUnwindSafe(|| serve::drop_file(idx)));
        drop(g);
    }
}

#[no_mangle]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    if let Some(idx) = files::get(fd) {
        return std_after(share(idx, real::dup()(fd)));
    }
    fresh(real::dup()(fd))
}

#[no_mangle]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    if old == new {
        return real::dup2()(old, new);
    }
    crate::mounts::make_room(new);
    if stdio_fd(new) {
        // Both then share the kernel's open file, as dup2 promises.
        convert(old, "dup2 onto a standard descriptor (stdio uses it unseen)");
    }
    let idx = files::get(old);
    if files::get(new).is_some() && fcntl(old, libc::F_GETFD, 0) >= 0 {
        closing(new);
    }
    let r = real::dup2()(old, new);
    match idx {
        Some(i) => share(i, r),
        None => r,
    }
}

#[no_mangle]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    if old == new {
        return real::dup3()(old, new, flags);
    }
    crate::mounts::make_room(new);
    if stdio_fd(new) {
        convert(old, "dup3 onto a standard descriptor (stdio uses it unseen)");
    }
    let idx = files::get(old);
    if files::get(new).is_some() && fcntl(old, libc::F_GETFD, 0) >= 0 && flags & !libc::O_CLOEXEC == 0 {
        closing(new);
    }
    let r = real::dup3()(old, new, flags);
    match idx {
        Some(i) => share(i, r),
        None => r,
    }
}

unsafe fn fcntl_any(
    fd: c_int,
    cmd: c_int,
    arg: usize,
    realf: unsafe extern "C" fn(c_int, c_int, usize) -> c_int,
) -> c_int {
    let Some(idx) = files::get(fd) else {
        let r = realf(fd, cmd, arg);
        return if matches!(cmd, libc::F_DUPFD | libc::F_DUPFD_CLOEXEC) { fresh(r) } else { r };
    };
    match cmd {
        libc::F_GETFD | libc::F_SETFD => realf(fd, cmd, arg),
        libc::F_DUPFD | libc::F_DUPFD_CLOEXEC => std_after(share(idx, realf(fd, cmd, arg))),
        libc::F_GETFL => serve::getfl(idx),
        libc::F_SETFL => {
            let want = arg as c_int;
            let have = serve::getfl(idx);
            let special = libc::O_APPEND | libc::O_DIRECT;
            if (want ^ have) & special != 0 {
                convert(fd, "F_SETFL of O_APPEND or O_DIRECT");
                return realf(fd, cmd, arg);
            }
            serve::set_nonblock(idx, want & libc::O_NONBLOCK != 0);
            0
        }
        _ => {
            convert(fd, "fcntl (locks and other commands)");
            realf(fd, cmd, arg)
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: usize) -> c_int {
    fcntl_any(fd, cmd, arg, real::fcntl())
}

#[no_mangle]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: usize) -> c_int {
    fcntl_any(fd, cmd, arg, real::fcntl64())
}

// ------------------------------------------------------------------ uses converted first

#[no_mangle]
pub unsafe extern "C" fn mmap(a: *mut c_void, l: size_t, p: c_int, f: c_int, fd: c_int, o: off_t) -> *mut c_void {
    if f & libc::MAP_ANONYMOUS == 0 {
        convert(fd, "mmap");
    }
    real::mmap()(a, l, p, f, fd, o)
}

#[no_mangle]
pub unsafe extern "C" fn mmap64(a: *mut c_void, l: size_t, p: c_int, f: c_int, fd: c_int, o: off_t) -> *mut c_void {
    if f & libc::MAP_ANONYMOUS == 0 {
        convert(fd, "mmap");
    }
    real::mmap64()(a, l, p, f, fd, o)
}

macro_rules! converting {
    ($name:ident ($fd:ident : c_int $(, $a:ident : $t:ty)*) -> $r:ty, $why:expr) => {
        #[no_mangle]
        pub unsafe extern "C" fn $name($fd: c_int $(, $a: $t)*) -> $r {
            convert($fd, $why);
            real::$name()($fd $(, $a)*)
        }
    };
}

converting!(flock(fd: c_int, op: c_int) -> c_int, "flock");
converting!(lockf(fd: c_int, cmd: c_int, len: off_t) -> c_int, "lockf");
converting!(lockf64(fd: c_int, cmd: c_int, len: off_t) -> c_int, "lockf");
/// FICLONE (`cp --reflink=auto`): a FUSE mount has no reflinks and answers
/// EOPNOTSUPP (EXDEV across file systems), after which cp copies with read
/// and write. Every other ioctl is the kernel's, on a kernel open.
#[no_mangle]
pub unsafe extern "C" fn ioctl(fd: c_int, req: libc::c_ulong, arg: usize) -> c_int {
    if req == libc::FICLONE as libc::c_ulong {
        let (dst, src) = (files::get(fd).is_some(), files::get(arg as c_int).is_some());
        if dst || src {
            guard::set_errno(if dst && src { libc::EOPNOTSUPP } else { libc::EXDEV });
            return -1;
        }
    }
    convert(fd, "ioctl");
    real::ioctl()(fd, req, arg)
}
converting!(tee(fd: c_int, out: c_int, len: size_t, fl: c_uint) -> ssize_t, "tee");
converting!(fstatfs(fd: c_int, b: *mut libc::statfs) -> c_int, "fstatfs");
converting!(fstatfs64(fd: c_int, b: *mut libc::statfs) -> c_int, "fstatfs");
converting!(fstatvfs(fd: c_int, b: *mut libc::statvfs) -> c_int, "fstatvfs");
converting!(fstatvfs64(fd: c_int, b: *mut libc::statvfs) -> c_int, "fstatvfs");

/// Advice changes no result, only how a kernel caches: on a served
/// descriptor (whose data the daemon serves) it is checked and taken, as
/// the kernel takes it, without turning the descriptor into a kernel open.
macro_rules! advising {
    ($name:ident) => {
        #[no_mangle]
        pub unsafe extern "C" fn $name(fd: c_int, o: off_t, l: off_t, adv: c_int) -> c_int {
            if files::get(fd).is_some() {
                let known = (libc::POSIX_FADV_NORMAL..=libc::POSIX_FADV_NOREUSE).contains(&adv);
                return if !known || l < 0 { libc::EINVAL } else { 0 };
            }
            real::$name()(fd, o, l, adv)
        }
    };
}
advising!(posix_fadvise);
advising!(posix_fadvise64);
converting!(fallocate(fd: c_int, mode: c_int, o: off_t, l: off_t) -> c_int, "fallocate");
converting!(fallocate64(fd: c_int, mode: c_int, o: off_t, l: off_t) -> c_int, "fallocate");
converting!(posix_fallocate(fd: c_int, o: off_t, l: off_t) -> c_int, "posix_fallocate");
converting!(posix_fallocate64(fd: c_int, o: off_t, l: off_t) -> c_int, "posix_fallocate");
converting!(fdopen(fd: c_int, mode: *const c_char) -> *mut libc::FILE, "fdopen");
converting!(readahead(fd: c_int, o: off_t, l: size_t) -> ssize_t, "readahead");
converting!(sync_file_range(fd: c_int, o: off_t, l: off_t, fl: c_uint) -> c_int, "sync_file_range");
converting!(fchdir(fd: c_int) -> c_int, "fchdir");
converting!(fgetxattr(fd: c_int, n: *const c_char, v: *mut c_void, s: size_t) -> ssize_t, "fgetxattr");
converting!(fsetxattr(fd: c_int, n: *const c_char, v: *const c_void, s: size_t, fl: c_int) -> c_int, "fsetxattr");
converting!(flistxattr(fd: c_int, l: *mut c_char, s: size_t) -> ssize_t, "flistxattr");
converting!(fremovexattr(fd: c_int, n: *const c_char) -> c_int, "fremovexattr");
converting!(fdopendir(fd: c_int) -> *mut libc::DIR, "fdopendir");
converting!(syncfs(fd: c_int) -> c_int, "syncfs");

#[no_mangle]
pub unsafe extern "C" fn sendfile(out: c_int, inf: c_int, off: *mut off_t, n: size_t) -> ssize_t {
    convert(out, "sendfile");
    convert(inf, "sendfile");
    real::sendfile()(out, inf, off, n)
}

#[no_mangle]
pub unsafe extern "C" fn sendfile64(out: c_int, inf: c_int, off: *mut off_t, n: size_t) -> ssize_t {
    convert(out, "sendfile");
    convert(inf, "sendfile");
    real::sendfile64()(out, inf, off, n)
}

#[no_mangle]
pub unsafe extern "C" fn splice(
    a: c_int,
    ao: *mut libc::loff_t,
    b: c_int,
    bo: *mut libc::loff_t,
    n: size_t,
    f: c_uint,
) -> ssize_t {
    convert(a, "splice");
    convert(b, "splice");
    real::splice()(a, ao, b, bo, n, f)
}

#[no_mangle]
pub unsafe extern "C" fn copy_file_range(
    a: c_int,
    ao: *mut libc::loff_t,
    b: c_int,
    bo: *mut libc::loff_t,
    n: size_t,
    f: c_uint,
) -> ssize_t {
    // The kernel answers EXDEV for a copy it cannot make inside one file
    // system, and programs (cat, cp) then copy with read and write, which
    // the library serves: no need to hand the descriptors to the kernel.
    if files::get(a).is_some() || files::get(b).is_some() {
        let g = guard::enter();
        crate::log::blog!("copy_file_range fd {a} -> fd {b}: EXDEV (programs copy with read and write then)");
        drop(g);
        guard::set_errno(libc::EXDEV);
        return -1;
    }
    real::copy_file_range()(a, ao, b, bo, n, f)
}

/// libaio's `io_submit` (a system call the kernel serves on kernel files
/// only): every served descriptor the control blocks name is converted
/// first. libaio's convention: the count submitted, or a negative errno.
#[no_mangle]
pub unsafe extern "C" fn io_submit(ctx: libc::c_ulong, nr: libc::c_long, iocbs: *mut *mut c_void) -> c_int {
    if nr > 0 && !iocbs.is_null() {
        for i in 0..nr as usize {
            let cb = *iocbs.add(i);
            if !cb.is_null() {
                // struct iocb: aio_data (8), aio_key and aio_rw_flags (4 each),
                // aio_lio_opcode (2), aio_reqprio (2), then aio_fildes.
                let fd = std::ptr::read_unaligned((cb as *const u8).add(20) as *const u32) as c_int;
                convert(fd, "io_submit (Linux AIO)");
            }
        }
    }
    let r = libc::syscall(libc::SYS_io_submit, ctx, nr, iocbs);
    if r < 0 {
        -guard::errno()
    } else {
        r as c_int
    }
}

/// POSIX AIO: the C library's helper threads read and write the
/// descriptor with calls this library does not see: converted first.
macro_rules! posix_aio {
    ($($name:ident),*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name(cb: *mut libc::aiocb) -> c_int {
            if !cb.is_null() {
                convert((*cb).aio_fildes, "POSIX AIO");
            }
            real::$name()(cb)
        }
    )*};
}
posix_aio!(aio_read, aio_write, aio_read64, aio_write64);

macro_rules! posix_aio_fsync {
    ($($name:ident),*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name(op: c_int, cb: *mut libc::aiocb) -> c_int {
            if !cb.is_null() {
                convert((*cb).aio_fildes, "POSIX AIO");
            }
            real::$name()(op, cb)
        }
    )*};
}
posix_aio_fsync!(aio_fsync, aio_fsync64);

unsafe fn convert_aio_list(list: *const *mut libc::aiocb, n: c_int) {
    if list.is_null() {
        return;
    }
    for i in 0..n.max(0) as usize {
        let cb = *list.add(i);
        if !cb.is_null() {
            convert((*cb).aio_fildes, "POSIX AIO");
        }
    }
}

macro_rules! posix_lio_listio {
    ($($name:ident),*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name(
            mode: c_int,
            list: *const *mut libc::aiocb,
            n: c_int,
            sev: *mut libc::sigevent,
        ) -> c_int {
            convert_aio_list(list, n);
            real::$name()(mode, list, n, sev)
        }
    )*};
}
posix_lio_listio!(lio_listio, lio_listio64);

unsafe fn convert_pollfds(fds: *const libc::pollfd, n: libc::nfds_t) {
    if fds.is_null() {
        return;
    }
    for i in 0..n as usize {
        convert((*fds.add(i)).fd, "poll");
    }
}

#[no_mangle]
pub unsafe extern "C" fn poll(fds: *mut libc::pollfd, n: libc::nfds_t, t: c_int) -> c_int {
    convert_pollfds(fds, n);
    real::poll()(fds, n, t)
}

#[no_mangle]
pub unsafe extern "C" fn ppoll(
    fds: *mut libc::pollfd,
    n: libc::nfds_t,
    t: *const libc::timespec,
    m: *const libc::sigset_t,
) -> c_int {
    convert_pollfds(fds, n);
    real::ppoll()(fds, n, t, m)
}

unsafe fn convert_fdsets(n: c_int, sets: [*mut libc::fd_set; 3]) {
    for s in sets {
        if s.is_null() {
            continue;
        }
        for fd in 0..n.min(libc::FD_SETSIZE as c_int) {
            if libc::FD_ISSET(fd, s) {
                convert(fd, "select");
            }
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn select(
    n: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    t: *mut libc::timeval,
) -> c_int {
    convert_fdsets(n, [r, w, e]);
    real::select()(n, r, w, e, t)
}

#[no_mangle]
pub unsafe extern "C" fn pselect(
    n: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    t: *const libc::timespec,
    m: *const libc::sigset_t,
) -> c_int {
    convert_fdsets(n, [r, w, e]);
    real::pselect()(n, r, w, e, t, m)
}

#[no_mangle]
pub unsafe extern "C" fn epoll_ctl(ep: c_int, op: c_int, fd: c_int, ev: *mut libc::epoll_event) -> c_int {
    convert(fd, "epoll_ctl");
    real::epoll_ctl()(ep, op, fd, ev)
}

#[no_mangle]
pub unsafe extern "C" fn sendmsg(s: c_int, msg: *const libc::msghdr, fl: c_int) -> ssize_t {
    if !msg.is_null() && (*msg).msg_controllen > 0 {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let n =
                    ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize) / std::mem::size_of::<c_int>();
                let fds = libc::CMSG_DATA(c) as *const c_int;
                for k in 0..n {
                    convert(fds.add(k).read_unaligned(), "passing over a socket");
                }
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    real::sendmsg()(s, msg, fl)
}

// ------------------------------------------------------------------ path calls

#[no_mangle]
pub unsafe extern "C" fn mkdir(path: *const c_char, mode: mode_t) -> c_int {
    path_call!(serve::mkdir(libc::AT_FDCWD, cstr(path)?, mode), real::mkdir()(path, mode))
}

#[no_mangle]
pub unsafe extern "C" fn mkdirat(dirfd: c_int, path: *const c_char, mode: mode_t) -> c_int {
    path_call!(serve::mkdir(dirfd, cstr(path)?, mode), real::mkdirat()(dirfd, path, mode))
}

#[no_mangle]
pub unsafe extern "C" fn unlink(path: *const c_char) -> c_int {
    path_call!(serve::unlink(libc::AT_FDCWD, cstr(path)?, false), real::unlink()(path))
}

#[no_mangle]
pub unsafe extern "C" fn unlinkat(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    path_call!(serve::unlink(dirfd, cstr(path)?, flags & libc::AT_REMOVEDIR != 0), real::unlinkat()(dirfd, path, flags))
}

#[no_mangle]
pub unsafe extern "C" fn rmdir(path: *const c_char) -> c_int {
    path_call!(serve::unlink(libc::AT_FDCWD, cstr(path)?, true), real::rmdir()(path))
}

#[no_mangle]
pub unsafe extern "C" fn rename(old: *const c_char, new: *const c_char) -> c_int {
    path_call!(serve::rename(libc::AT_FDCWD, cstr(old)?, libc::AT_FDCWD, cstr(new)?, 0), real::rename()(old, new))
}

#[no_mangle]
pub unsafe extern "C" fn renameat(od: c_int, old: *const c_char, nd: c_int, new: *const c_char) -> c_int {
    path_call!(serve::rename(od, cstr(old)?, nd, cstr(new)?, 0), real::renameat()(od, old, nd, new))
}

#[no_mangle]
pub unsafe extern "C" fn renameat2(od: c_int, old: *const c_char, nd: c_int, new: *const c_char, fl: c_uint) -> c_int {
    path_call!(serve::rename(od, cstr(old)?, nd, cstr(new)?, fl), real::renameat2()(od, old, nd, new, fl))
}

#[no_mangle]
pub unsafe extern "C" fn link(old: *const c_char, new: *const c_char) -> c_int {
    path_call!(serve::link(libc::AT_FDCWD, cstr(old)?, libc::AT_FDCWD, cstr(new)?, false), real::link()(old, new))
}

#[no_mangle]
pub unsafe extern "C" fn linkat(od: c_int, old: *const c_char, nd: c_int, new: *const c_char, fl: c_int) -> c_int {
    if fl & libc::AT_EMPTY_PATH != 0 {
        return real::linkat()(od, old, nd, new, fl);
    }
    path_call!(
        serve::link(od, cstr(old)?, nd, cstr(new)?, fl & libc::AT_SYMLINK_FOLLOW != 0),
        real::linkat()(od, old, nd, new, fl)
    )
}

#[no_mangle]
pub unsafe extern "C" fn symlink(target: *const c_char, path: *const c_char) -> c_int {
    path_call!(serve::symlink(cstr(target)?, libc::AT_FDCWD, cstr(path)?), real::symlink()(target, path))
}

#[no_mangle]
pub unsafe extern "C" fn symlinkat(target: *const c_char, dirfd: c_int, path: *const c_char) -> c_int {
    path_call!(serve::symlink(cstr(target)?, dirfd, cstr(path)?), real::symlinkat()(target, dirfd, path))
}

unsafe fn out_buf<'a>(buf: *mut c_char, n: size_t) -> Option<&'a mut [u8]> {
    (!buf.is_null() && n > 0).then(|| std::slice::from_raw_parts_mut(buf as *mut u8, n))
}

#[no_mangle]
pub unsafe extern "C" fn readlink(path: *const c_char, buf: *mut c_char, n: size_t) -> ssize_t {
    path_call!(serve::readlink(libc::AT_FDCWD, cstr(path)?, out_buf(buf, n)?), real::readlink()(path, buf, n))
}

#[no_mangle]
pub unsafe extern "C" fn readlinkat(dirfd: c_int, path: *const c_char, buf: *mut c_char, n: size_t) -> ssize_t {
    path_call!(serve::readlink(dirfd, cstr(path)?, out_buf(buf, n)?), real::readlinkat()(dirfd, path, buf, n))
}

unsafe fn truncate_path(path: *const c_char, len: off_t) -> Option<isize> {
    if len < 0 {
        return None;
    }
    serve::setattr_path(libc::AT_FDCWD, cstr(path)?, true, |_| SetattrIn {
        valid: fattr::SIZE,
        size: len as u64,
        ..Default::default()
    })
}

#[no_mangle]
pub unsafe extern "C" fn truncate(path: *const c_char, len: off_t) -> c_int {
    path_call!(truncate_path(path, len), real::truncate()(path, len))
}

#[no_mangle]
pub unsafe extern "C" fn truncate64(path: *const c_char, len: off_t) -> c_int {
    path_call!(truncate_path(path, len), real::truncate64()(path, len))
}

unsafe fn chmod_path(dirfd: c_int, path: *const c_char, mode: mode_t, follow: bool) -> Option<isize> {
    serve::setattr_path(dirfd, cstr(path)?, follow, |a| SetattrIn {
        valid: fattr::MODE,
        mode: (a.mode & libc::S_IFMT) | (mode & 0o7777),
        ..Default::default()
    })
}

#[no_mangle]
pub unsafe extern "C" fn chmod(path: *const c_char, mode: mode_t) -> c_int {
    path_call!(chmod_path(libc::AT_FDCWD, path, mode, true), real::chmod()(path, mode))
}

#[no_mangle]
pub unsafe extern "C" fn fchmodat(dirfd: c_int, path: *const c_char, mode: mode_t, fl: c_int) -> c_int {
    if fl != 0 {
        return real::fchmodat()(dirfd, path, mode, fl);
    }
    path_call!(chmod_path(dirfd, path, mode, true), real::fchmodat()(dirfd, path, mode, fl))
}

unsafe fn chown_path(
    dirfd: c_int,
    path: *const c_char,
    uid: libc::uid_t,
    gid: libc::gid_t,
    follow: bool,
) -> Option<isize> {
    let inp = owner_setattr(uid, gid);
    serve::setattr_path(dirfd, cstr(path)?, follow, |_| inp)
}

#[no_mangle]
pub unsafe extern "C" fn chown(path: *const c_char, uid: libc::uid_t, gid: libc::gid_t) -> c_int {
    path_call!(chown_path(libc::AT_FDCWD, path, uid, gid, true), real::chown()(path, uid, gid))
}

#[no_mangle]
pub unsafe extern "C" fn lchown(path: *const c_char, uid: libc::uid_t, gid: libc::gid_t) -> c_int {
    path_call!(chown_path(libc::AT_FDCWD, path, uid, gid, false), real::lchown()(path, uid, gid))
}

#[no_mangle]
pub unsafe extern "C" fn fchownat(
    dirfd: c_int,
    path: *const c_char,
    uid: libc::uid_t,
    gid: libc::gid_t,
    fl: c_int,
) -> c_int {
    if fl & libc::AT_EMPTY_PATH != 0 {
        if cstr(path).is_some_and(|p| p.is_empty()) && files::get(dirfd).is_some() {
            return fchown(dirfd, uid, gid);
        }
        return real::fchownat()(dirfd, path, uid, gid, fl);
    }
    path_call!(
        chown_path(dirfd, path, uid, gid, fl & libc::AT_SYMLINK_NOFOLLOW == 0),
        real::fchownat()(dirfd, path, uid, gid, fl)
    )
}

unsafe fn utimens_path(dirfd: c_int, path: *const c_char, times: *const libc::timespec, fl: c_int) -> Option<isize> {
    let t = if times.is_null() { None } else { Some(&*(times as *const [libc::timespec; 2])) };
    let inp = serve::times_setattr(t)?;
    serve::setattr_path(dirfd, cstr(path)?, fl & libc::AT_SYMLINK_NOFOLLOW == 0, |_| inp)
}

#[no_mangle]
pub unsafe extern "C" fn utimensat(
    dirfd: c_int,
    path: *const c_char,
    times: *const libc::timespec,
    fl: c_int,
) -> c_int {
    if path.is_null() {
        if files::get(dirfd).is_some() {
            return futimens(dirfd, times);
        }
        return real::utimensat()(dirfd, path, times, fl);
    }
    path_call!(utimens_path(dirfd, path, times, fl), real::utimensat()(dirfd, path, times, fl))
}

#[no_mangle]
pub unsafe extern "C" fn umask(mask: mode_t) -> mode_t {
    let old = real::umask()(mask);
    serve::set_umask(mask);
    old
}

// ------------------------------------------------------------------ exec

/// A NULL-terminated array of C strings as byte slices.
unsafe fn strings<'a>(p: *const *const c_char) -> Vec<&'a [u8]> {
    let mut v = Vec::new();
    if p.is_null() {
        return v;
    }
    let mut i = 0;
    while !(*p.add(i)).is_null() {
        v.push(std::ffi::CStr::from_ptr(*p.add(i)).to_bytes());
        i += 1;
    }
    v
}

/// The environment with the library's variables back, NUL-terminated
/// strings and their pointer array (kept alive by the caller).
struct Env {
    _strings: Vec<Vec<u8>>,
    ptrs: Vec<*const c_char>,
}

unsafe fn patched_env(envp: *const *const c_char) -> Option<Env> {
    let cfg = crate::config::get();
    if cfg.off {
        return None;
    }
    let cur = strings(envp);
    let new = crate::env::patch(&cur, &cfg.kept, cfg.library.as_deref())?;
    let strings: Vec<Vec<u8>> = new
        .into_iter()
        .map(|mut s| {
            s.push(0);
            s
        })
        .collect();
    let mut ptrs: Vec<*const c_char> = strings.iter().map(|s| s.as_ptr() as *const c_char).collect();
    ptrs.push(std::ptr::null());
    Some(Env { _strings: strings, ptrs })
}

/// Before an exec: served descriptors the new program inherits become
/// kernel opens (`all`: every one, for spawns whose file actions may dup
/// any of them); returns the environment to pass.
unsafe fn before_exec(envp: *const *const c_char, all: bool) -> Option<Env> {
    let g = guard::enter();
    let r = catch_unwind(AssertUnwindSafe(|| {
        if g.is_some() && crate::config::on() {
            serve::convert_all(all, "exec");
            if !all && serve::owns_memory() {
                // This process becomes another program (a spawn's parent
                // goes on and keeps them; so does a vfork child's parent,
                // whose memory the child shares).
                crate::kept::release_all();
            }
        }
        patched_env(envp)
    }))
    .unwrap_or(None);
    drop(g);
    r
}

fn env_ptr(e: &Option<Env>, orig: *const *const c_char) -> *const *const c_char {
    e.as_ref().map_or(orig, |e| e.ptrs.as_ptr())
}

extern "C" {
    static environ: *const *const c_char;
}

#[no_mangle]
pub unsafe extern "C" fn execve(path: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
    let e = before_exec(envp, false);
    real::execve()(path, argv, env_ptr(&e, envp))
}

#[no_mangle]
pub unsafe extern "C" fn execv(path: *const c_char, argv: *const *const c_char) -> c_int {
    let e = before_exec(environ, false);
    real::execve()(path, argv, env_ptr(&e, environ))
}

#[no_mangle]
pub unsafe extern "C" fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int {
    let e = before_exec(environ, false);
    real::execvpe()(file, argv, env_ptr(&e, environ))
}

#[no_mangle]
pub unsafe extern "C" fn execvpe(file: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
    let e = before_exec(envp, false);
    real::execvpe()(file, argv, env_ptr(&e, envp))
}

#[no_mangle]
pub unsafe extern "C" fn fexecve(fd: c_int, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
    convert(fd, "fexecve");
    let e = before_exec(envp, false);
    real::fexecve()(fd, argv, env_ptr(&e, envp))
}

#[no_mangle]
pub unsafe extern "C" fn posix_spawn(
    pid: *mut libc::pid_t,
    path: *const c_char,
    fa: *const libc::posix_spawn_file_actions_t,
    at: *const libc::posix_spawnattr_t,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    let e = before_exec(envp as *const *const c_char, true);
    real::posix_spawn()(pid, path, fa, at, argv, env_ptr(&e, envp as *const *const c_char) as *const *mut c_char)
}

#[no_mangle]
pub unsafe extern "C" fn posix_spawnp(
    pid: *mut libc::pid_t,
    path: *const c_char,
    fa: *const libc::posix_spawn_file_actions_t,
    at: *const libc::posix_spawnattr_t,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    let e = before_exec(envp as *const *const c_char, true);
    real::posix_spawnp()(pid, path, fa, at, argv, env_ptr(&e, envp as *const *const c_char) as *const *mut c_char)
}

// ------------------------------------------------------------------ credentials

/// Before a credential change: every served descriptor becomes a kernel
/// open now, while the process still has the credentials it opened them
/// with (reopening through /proc/self/fd is checked against the caller's
/// credentials: a daemon that opens as root and then drops privileges must
/// keep its descriptors). Kernel opens are right whatever the call's result.
/// (In a vfork child the conversion changes only the child's descriptors.)
fn credentials_changing() {
    let g = guard::enter();
    if g.is_some() {
        let _ = catch_unwind(|| {
            if crate::config::on() {
                serve::convert_all(true, "a credential change");
                if serve::owns_memory() {
                    crate::kept::release_all();
                }
            }
        });
    }
    drop(g);
}

/// After a successful credential change: the daemon judged this process's
/// connections by the old credentials, so the process gives them up (a
/// forked parent sharing them keeps them) and connects again at next use,
/// or, with `stop`, is served no more. A vfork child shares the parent's
/// memory and is about to exec: the connections are the parent's, not the
/// child's to give up.
fn credentials_changed(stop: bool) {
    let g = guard::enter();
    if g.is_some() && serve::owns_memory() {
        let _ = catch_unwind(|| {
            if crate::config::on() {
                crate::creds::forget();
                if stop {
                    crate::log::blog!("a thread's own file-system ids or capabilities: served no more");
                    crate::mounts::stop_serving();
                }
                if let Some(m) = crate::mounts::discovered() {
                    m.disown_connections();
                }
            }
        });
    }
    drop(g);
}

macro_rules! credential {
    ($name:ident ($($a:ident : $t:ty),*)) => {
        #[no_mangle]
        pub unsafe extern "C" fn $name($($a: $t),*) -> c_int {
            credentials_changing();
            let r = real::$name()($($a),*);
            if r == 0 {
                credentials_changed(false);
            }
            r
        }
    };
}

credential!(setuid(u: libc::uid_t));
credential!(seteuid(u: libc::uid_t));
credential!(setreuid(r: libc::uid_t, e: libc::uid_t));
credential!(setresuid(r: libc::uid_t, e: libc::uid_t, s: libc::uid_t));
credential!(setgid(g: libc::gid_t));
credential!(setegid(g: libc::gid_t));
credential!(setregid(r: libc::gid_t, e: libc::gid_t));
credential!(setresgid(r: libc::gid_t, e: libc::gid_t, s: libc::gid_t));
credential!(setgroups(n: size_t, l: *const libc::gid_t));

/// setfsuid/setfsgid: they change the ids of the calling thread only,
/// while the daemon reads the process's at connection; an id other than
/// the effective one ends the serving (the descriptors are converted first,
/// while the old id still opens them). Setting the effective id changes
/// nothing. They report no failure (the old id comes back either way).
#[no_mangle]
pub unsafe extern "C" fn setfsuid(u: libc::uid_t) -> c_int {
    let changing = u != libc::geteuid();
    if changing {
        credentials_changing();
    }
    let r = real::setfsuid()(u);
    if changing && !crate::creds::fs_ids_are_effective() {
        credentials_changed(true);
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn setfsgid(g: libc::gid_t) -> c_int {
    let changing = g != libc::getegid();
    if changing {
        credentials_changing();
    }
    let r = real::setfsgid()(g);
    if changing && !crate::creds::fs_ids_are_effective() {
        credentials_changed(true);
    }
    r
}

/// capset changes the calling thread's capabilities only, while the daemon
/// reads the process's at connection: after it the process is served no
/// more. prctl's capability operations need nothing: the bounding and
/// ambient sets act at exec (a new program connects anew), securebits at
/// later set*id calls, which are interposed.
#[no_mangle]
pub unsafe extern "C" fn capset(h: *mut c_void, d: *const c_void) -> c_int {
    credentials_changing();
    let r = real::capset()(h, d);
    if r == 0 {
        credentials_changed(true);
    }
    r
}

// ------------------------------------------------------------------ root and mounts

/// After a successful change of the process's root or mount table: path
/// calls go to the kernel from now on (see `mounts::paths_valid`).
fn paths_changed(what: &str) {
    crate::mounts::paths_changed();
    let g = guard::enter();
    if g.is_some() {
        crate::log::blog!(
            "{what}: the mount table no longer describes this process's paths; path calls go to the kernel"
        );
    }
    drop(g);
}

#[no_mangle]
pub unsafe extern "C" fn chroot(path: *const c_char) -> c_int {
    let r = real::chroot()(path);
    if r == 0 {
        paths_changed("chroot");
    }
    r
}

/// Namespaces that change which mount a path reaches (a user namespace may
/// bring a mount namespace with it).
const MOUNT_NAMESPACES: c_int = libc::CLONE_NEWNS | libc::CLONE_NEWUSER;

#[no_mangle]
pub unsafe extern "C" fn unshare(flags: c_int) -> c_int {
    let r = real::unshare()(flags);
    if r == 0 && flags & MOUNT_NAMESPACES != 0 {
        paths_changed("unshare");
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn setns(fd: c_int, nstype: c_int) -> c_int {
    let r = real::setns()(fd, nstype);
    // nstype 0 (or a pidfd with several types) may join a mount namespace.
    if r == 0 && (nstype == 0 || nstype & MOUNT_NAMESPACES != 0) {
        paths_changed("setns");
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn mount(
    src: *const c_char,
    target: *const c_char,
    fstype: *const c_char,
    flags: libc::c_ulong,
    data: *const c_void,
) -> c_int {
    let r = real::mount()(src, target, fstype, flags, data);
    // Propagation changes (MS_PRIVATE etc.) alone move nothing.
    let propagation = libc::MS_SHARED | libc::MS_PRIVATE | libc::MS_SLAVE | libc::MS_UNBINDABLE;
    if r == 0 && (flags & propagation == 0 || flags & !(propagation | libc::MS_REC) != 0) {
        paths_changed("mount");
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn umount(target: *const c_char) -> c_int {
    let r = real::umount()(target);
    if r == 0 {
        paths_changed("umount");
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn umount2(target: *const c_char, flags: c_int) -> c_int {
    let r = real::umount2()(target, flags);
    if r == 0 {
        paths_changed("umount");
    }
    r
}

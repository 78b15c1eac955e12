//! The real C library functions behind the ones this library interposes:
//! looked up once with `dlsym(RTLD_NEXT)` and cached in atomics, so calling
//! one costs a load and an indirect call, takes no lock and allocates
//! nothing (safe in a signal handler once resolved).

use libc::{c_char, c_int, c_uint, c_void, mode_t, off_t, size_t, ssize_t};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Resolves `name` (NUL-terminated) in the objects loaded after this one.
/// A symbol the C library lacks is a broken installation: say which and
/// stop, rather than jump to address 0.
fn lookup(name: &'static [u8]) -> usize {
    // SAFETY: name is NUL-terminated (the macro appends the NUL).
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr().cast()) };
    if p.is_null() {
        let msg = b"efuse-preload: the C library lacks a function this library interposes: ";
        // SAFETY: plain writes to stderr of live buffers, then abort.
        unsafe {
            libc::syscall(libc::SYS_write, 2, msg.as_ptr(), msg.len());
            libc::syscall(libc::SYS_write, 2, name.as_ptr(), name.len() - 1);
            libc::syscall(libc::SYS_write, 2, b"\n".as_ptr(), 1);
            libc::abort();
        }
    }
    p as usize
}

macro_rules! reals {
    ($($name:ident : fn($($a:ty),*) -> $r:ty;)*) => {
        $(
            /// The C library's function of this name.
            #[allow(non_snake_case, dead_code)]
            #[inline]
            pub fn $name() -> unsafe extern "C" fn($($a),*) -> $r {
                static P: AtomicUsize = AtomicUsize::new(0);
                let mut p = P.load(Ordering::Relaxed);
                if p == 0 {
                    p = lookup(concat!(stringify!($name), "\0").as_bytes());
                    P.store(p, Ordering::Relaxed);
                }
                // SAFETY: the symbol has this C signature in every C
                // library this crate supports (glibc on Linux).
                unsafe { std::mem::transmute::<usize, unsafe extern "C" fn($($a),*) -> $r>(p) }
            }
        )*
    };
}

reals! {
    open: fn(*const c_char, c_int, c_uint) -> c_int;
    open64: fn(*const c_char, c_int, c_uint) -> c_int;
    openat: fn(c_int, *const c_char, c_int, c_uint) -> c_int;
    openat64: fn(c_int, *const c_char, c_int, c_uint) -> c_int;
    creat: fn(*const c_char, mode_t) -> c_int;
    creat64: fn(*const c_char, mode_t) -> c_int;
    close: fn(c_int) -> c_int;
    close_range: fn(c_uint, c_uint, c_int) -> c_int;
    closefrom: fn(c_int) -> ();
    read: fn(c_int, *mut c_void, size_t) -> ssize_t;
    write: fn(c_int, *const c_void, size_t) -> ssize_t;
    pread: fn(c_int, *mut c_void, size_t, off_t) -> ssize_t;
    pread64: fn(c_int, *mut c_void, size_t, off_t) -> ssize_t;
    pwrite: fn(c_int, *const c_void, size_t, off_t) -> ssize_t;
    pwrite64: fn(c_int, *const c_void, size_t, off_t) -> ssize_t;
    readv: fn(c_int, *const libc::iovec, c_int) -> ssize_t;
    writev: fn(c_int, *const libc::iovec, c_int) -> ssize_t;
    preadv: fn(c_int, *const libc::iovec, c_int, off_t) -> ssize_t;
    preadv64: fn(c_int, *const libc::iovec, c_int, off_t) -> ssize_t;
    pwritev: fn(c_int, *const libc::iovec, c_int, off_t) -> ssize_t;
    pwritev64: fn(c_int, *const libc::iovec, c_int, off_t) -> ssize_t;
    preadv2: fn(c_int, *const libc::iovec, c_int, off_t, c_int) -> ssize_t;
    pwritev2: fn(c_int, *const libc::iovec, c_int, off_t, c_int) -> ssize_t;
    preadv64v2: fn(c_int, *const libc::iovec, c_int, off_t, c_int) -> ssize_t;
    pwritev64v2: fn(c_int, *const libc::iovec, c_int, off_t, c_int) -> ssize_t;
    lseek: fn(c_int, off_t, c_int) -> off_t;
    lseek64: fn(c_int, off_t, c_int) -> off_t;
    stat: fn(*const c_char, *mut libc::stat) -> c_int;
    stat64: fn(*const c_char, *mut libc::stat) -> c_int;
    lstat: fn(*const c_char, *mut libc::stat) -> c_int;
    lstat64: fn(*const c_char, *mut libc::stat) -> c_int;
    fstat: fn(c_int, *mut libc::stat) -> c_int;
    fstat64: fn(c_int, *mut libc::stat) -> c_int;
    fstatat: fn(c_int, *const c_char, *mut libc::stat, c_int) -> c_int;
    fstatat64: fn(c_int, *const c_char, *mut libc::stat, c_int) -> c_int;
    statx: fn(c_int, *const c_char, c_int, c_uint, *mut libc::statx) -> c_int;
    access: fn(*const c_char, c_int) -> c_int;
    faccessat: fn(c_int, *const c_char, c_int, c_int) -> c_int;
    dup: fn(c_int) -> c_int;
    dup2: fn(c_int, c_int) -> c_int;
    dup3: fn(c_int, c_int, c_int) -> c_int;
    fcntl: fn(c_int, c_int, usize) -> c_int;
    fcntl64: fn(c_int, c_int, usize) -> c_int;
    ftruncate: fn(c_int, off_t) -> c_int;
    ftruncate64: fn(c_int, off_t) -> c_int;
    truncate: fn(*const c_char, off_t) -> c_int;
    truncate64: fn(*const c_char, off_t) -> c_int;
    fsync: fn(c_int) -> c_int;
    fdatasync: fn(c_int) -> c_int;
    fchmod: fn(c_int, mode_t) -> c_int;
    fchown: fn(c_int, libc::uid_t, libc::gid_t) -> c_int;
    futimens: fn(c_int, *const libc::timespec) -> c_int;
    mkdir: fn(*const c_char, mode_t) -> c_int;
    mkdirat: fn(c_int, *const c_char, mode_t) -> c_int;
    unlink: fn(*const c_char) -> c_int;
    unlinkat: fn(c_int, *const c_char, c_int) -> c_int;
    rmdir: fn(*const c_char) -> c_int;
    rename: fn(*const c_char, *const c_char) -> c_int;
    renameat: fn(c_int, *const c_char, c_int, *const c_char) -> c_int;
    renameat2: fn(c_int, *const c_char, c_int, *const c_char, c_uint) -> c_int;
    link: fn(*const c_char, *const c_char) -> c_int;
    linkat: fn(c_int, *const c_char, c_int, *const c_char, c_int) -> c_int;
    symlink: fn(*const c_char, *const c_char) -> c_int;
    symlinkat: fn(*const c_char, c_int, *const c_char) -> c_int;
    readlink: fn(*const c_char, *mut c_char, size_t) -> ssize_t;
    readlinkat: fn(c_int, *const c_char, *mut c_char, size_t) -> ssize_t;
    chmod: fn(*const c_char, mode_t) -> c_int;
    fchmodat: fn(c_int, *const c_char, mode_t, c_int) -> c_int;
    chown: fn(*const c_char, libc::uid_t, libc::gid_t) -> c_int;
    lchown: fn(*const c_char, libc::uid_t, libc::gid_t) -> c_int;
    fchownat: fn(c_int, *const c_char, libc::uid_t, libc::gid_t, c_int) -> c_int;
    utimensat: fn(c_int, *const c_char, *const libc::timespec, c_int) -> c_int;
    umask: fn(mode_t) -> mode_t;
    mmap: fn(*mut c_void, size_t, c_int, c_int, c_int, off_t) -> *mut c_void;
    mmap64: fn(*mut c_void, size_t, c_int, c_int, c_int, off_t) -> *mut c_void;
    flock: fn(c_int, c_int) -> c_int;
    lockf: fn(c_int, c_int, off_t) -> c_int;
    lockf64: fn(c_int, c_int, off_t) -> c_int;
    ioctl: fn(c_int, libc::c_ulong, usize) -> c_int;
    sendfile: fn(c_int, c_int, *mut off_t, size_t) -> ssize_t;
    sendfile64: fn(c_int, c_int, *mut off_t, size_t) -> ssize_t;
    aio_read: fn(*mut libc::aiocb) -> c_int;
    aio_write: fn(*mut libc::aiocb) -> c_int;
    aio_read64: fn(*mut libc::aiocb) -> c_int;
    aio_write64: fn(*mut libc::aiocb) -> c_int;
    aio_fsync: fn(c_int, *mut libc::aiocb) -> c_int;
    aio_fsync64: fn(c_int, *mut libc::aiocb) -> c_int;
    lio_listio: fn(c_int, *const *mut libc::aiocb, c_int, *mut libc::sigevent) -> c_int;
    lio_listio64: fn(c_int, *const *mut libc::aiocb, c_int, *mut libc::sigevent) -> c_int;
    splice: fn(c_int, *mut libc::loff_t, c_int, *mut libc::loff_t, size_t, c_uint) -> ssize_t;
    tee: fn(c_int, c_int, size_t, c_uint) -> ssize_t;
    copy_file_range: fn(c_int, *mut libc::loff_t, c_int, *mut libc::loff_t, size_t, c_uint) -> ssize_t;
    poll: fn(*mut libc::pollfd, libc::nfds_t, c_int) -> c_int;
    ppoll: fn(*mut libc::pollfd, libc::nfds_t, *const libc::timespec, *const libc::sigset_t) -> c_int;
    select: fn(c_int, *mut libc::fd_set, *mut libc::fd_set, *mut libc::fd_set, *mut libc::timeval) -> c_int;
    pselect: fn(c_int, *mut libc::fd_set, *mut libc::fd_set, *mut libc::fd_set, *const libc::timespec, *const libc::sigset_t) -> c_int;
    epoll_ctl: fn(c_int, c_int, c_int, *mut libc::epoll_event) -> c_int;
    fstatfs: fn(c_int, *mut libc::statfs) -> c_int;
    fstatfs64: fn(c_int, *mut libc::statfs) -> c_int;
    fstatvfs: fn(c_int, *mut libc::statvfs) -> c_int;
    fstatvfs64: fn(c_int, *mut libc::statvfs) -> c_int;
    posix_fadvise: fn(c_int, off_t, off_t, c_int) -> c_int;
    posix_fadvise64: fn(c_int, off_t, off_t, c_int) -> c_int;
    fallocate: fn(c_int, c_int, off_t, off_t) -> c_int;
    fallocate64: fn(c_int, c_int, off_t, off_t) -> c_int;
    posix_fallocate: fn(c_int, off_t, off_t) -> c_int;
    posix_fallocate64: fn(c_int, off_t, off_t) -> c_int;
    fdopen: fn(c_int, *const c_char) -> *mut libc::FILE;
    readahead: fn(c_int, off_t, size_t) -> ssize_t;
    sync_file_range: fn(c_int, off_t, off_t, c_uint) -> c_int;
    fchdir: fn(c_int) -> c_int;
    sendmsg: fn(c_int, *const libc::msghdr, c_int) -> ssize_t;
    fgetxattr: fn(c_int, *const c_char, *mut c_void, size_t) -> ssize_t;
    fsetxattr: fn(c_int, *const c_char, *const c_void, size_t, c_int) -> c_int;
    flistxattr: fn(c_int, *mut c_char, size_t) -> ssize_t;
    fremovexattr: fn(c_int, *const c_char) -> c_int;
    fdopendir: fn(c_int) -> *mut libc::DIR;
    syncfs: fn(c_int) -> c_int;
    execve: fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int;
    execv: fn(*const c_char, *const *const c_char) -> c_int;
    execvp: fn(*const c_char, *const *const c_char) -> c_int;
    execvpe: fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int;
    fexecve: fn(c_int, *const *const c_char, *const *const c_char) -> c_int;
    posix_spawn: fn(*mut libc::pid_t, *const c_char, *const libc::posix_spawn_file_actions_t, *const libc::posix_spawnattr_t, *const *mut c_char, *const *mut c_char) -> c_int;
    posix_spawnp: fn(*mut libc::pid_t, *const c_char, *const libc::posix_spawn_file_actions_t, *const libc::posix_spawnattr_t, *const *mut c_char, *const *mut c_char) -> c_int;
    setuid: fn(libc::uid_t) -> c_int;
    seteuid: fn(libc::uid_t) -> c_int;
    setreuid: fn(libc::uid_t, libc::uid_t) -> c_int;
    setresuid: fn(libc::uid_t, libc::uid_t, libc::uid_t) -> c_int;
    setgid: fn(libc::gid_t) -> c_int;
    setegid: fn(libc::gid_t) -> c_int;
    setregid: fn(libc::gid_t, libc::gid_t) -> c_int;
    setresgid: fn(libc::gid_t, libc::gid_t, libc::gid_t) -> c_int;
    setgroups: fn(size_t, *const libc::gid_t) -> c_int;
    setfsuid: fn(libc::uid_t) -> c_int;
    setfsgid: fn(libc::gid_t) -> c_int;
    capset: fn(*mut c_void, *const c_void) -> c_int;
    chroot: fn(*const c_char) -> c_int;
    unshare: fn(c_int) -> c_int;
    setns: fn(c_int, c_int) -> c_int;
    mount: fn(*const c_char, *const c_char, *const c_char, libc::c_ulong, *const c_void) -> c_int;
    umount: fn(*const c_char) -> c_int;
    umount2: fn(*const c_char, c_int) -> c_int;
}

//! O_DIRECT through stackfs is direct I/O on the backing file, on every data
//! path: passthrough, cached and direct opens, both transports, the default
//! and plain profiles, `--passthrough off`, `--writeback-cache` and
//! `--no-open`.
//!
//! The proof is the backing file's page cache, read with mincore(2): after
//! its pages are dropped (fdatasync, then `posix_fadvise(DONTNEED)`), an
//! O_DIRECT read through the mount must leave it empty (the device served
//! the read), and an O_DIRECT write through the mount must leave it empty
//! too while the bytes are already in the file (a buffered write would
//! leave dirty pages). Offsets and lengths the device cannot take get the
//! errno ext4 gives for the same call on a reference file. memfs, which has
//! no device, serves O_DIRECT from its memory with no alignment asked (as
//! tmpfs does), and never from the kernel's page cache.

mod common;

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{bounded, errno, errno_name, require_fuse, require_uring, skip, Fs, MountSpec, Mounted, Rng};

const FILE: &str = "data.bin";
const FILE_LEN: usize = 8 << 20;
const BLOCK: usize = 1 << 20;
const IO_LIMIT: Duration = Duration::from_secs(60);

/// A page-aligned buffer, as O_DIRECT wants of the caller.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: plain owned memory.
unsafe impl Send for Aligned {}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Aligned { ptr, layout }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: owned, initialised memory of this length.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn open(p: &Path, flags: i32) -> Result<OwnedFd, i32> {
    // SAFETY: open(2) on a NUL-terminated path.
    let fd = unsafe { libc::open(cpath(p).as_ptr(), flags | libc::O_CLOEXEC, 0o644) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pread(fd: &OwnedFd, buf: &mut [u8], off: u64) -> Result<usize, i32> {
    // SAFETY: read into a live buffer of its length.
    let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), off as i64) };
    if n < 0 {
        Err(errno())
    } else {
        Ok(n as usize)
    }
}

fn pwrite(fd: &OwnedFd, buf: &[u8], off: u64) -> Result<usize, i32> {
    // SAFETY: write from a live buffer of its length.
    let n = unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), off as i64) };
    if n < 0 {
        Err(errno())
    } else {
        Ok(n as usize)
    }
}

fn set_direct(fd: &OwnedFd, on: bool) {
    // SAFETY: fcntl on a descriptor we own.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    let fl = if on { fl | libc::O_DIRECT } else { fl & !libc::O_DIRECT };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl) }, 0, "F_SETFL O_DIRECT: {}", errno());
}

/// Pages of `p` in the page cache (mincore of a shared read-only mapping,
/// which itself brings nothing in).
fn resident(p: &Path) -> usize {
    let fd = open(p, libc::O_RDONLY).unwrap_or_else(|e| panic!("open {}: {}", p.display(), errno_name(e)));
    let len = std::fs::metadata(p).unwrap().len() as usize;
    if len == 0 {
        return 0;
    }
    let page = 4096;
    // SAFETY: a fresh mapping of a file we opened; unmapped below.
    let map = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, fd.as_raw_fd(), 0) };
    assert_ne!(map, libc::MAP_FAILED, "mmap {}: {}", p.display(), errno_name(errno()));
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: the vector has one byte per page of the mapping.
    let rc = unsafe { libc::mincore(map, len, vec.as_mut_ptr()) };
    let err = errno();
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(map, len) };
    assert_eq!(rc, 0, "mincore {}: {}", p.display(), errno_name(err));
    vec.iter().filter(|&&b| b & 1 != 0).count()
}

/// Writes back and drops `p`'s cached pages; fails the test if some stay.
fn evict(p: &Path) {
    let fd = open(p, libc::O_RDONLY).unwrap();
    for _ in 0..100 {
        // SAFETY: plain syscalls on a descriptor we own.
        unsafe {
            libc::fdatasync(fd.as_raw_fd());
            libc::posix_fadvise(fd.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
        if resident(p) == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{}: {} pages stay cached after fdatasync and POSIX_FADV_DONTNEED", p.display(), resident(p));
}

/// The backing file's direct-I/O alignment (`statx` `STATX_DIOALIGN`):
/// (memory, offset); None where the file system does not say.
fn dio_align(p: &Path) -> Option<(u32, u32)> {
    let mut st = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: statx writes one struct statx.
    let rc = unsafe { libc::statx(libc::AT_FDCWD, cpath(p).as_ptr(), 0, libc::STATX_DIOALIGN, st.as_mut_ptr()) };
    assert_eq!(rc, 0, "statx {}: {}", p.display(), errno_name(errno()));
    // SAFETY: zeroed and filled by the kernel.
    let st = unsafe { st.assume_init() };
    (st.stx_mask & libc::STATX_DIOALIGN != 0 && st.stx_dio_offset_align != 0)
        .then_some((st.stx_dio_mem_align, st.stx_dio_offset_align))
}

fn content() -> Vec<u8> {
    Rng::new(7).bytes(FILE_LEN)
}

fn opens(m: &Mounted) -> (u64, u64, u64) {
    let v = m.stats();
    let p = &v["paths"];
    let n = |k: &str| p[k].as_u64().unwrap_or_else(|| panic!("stats paths.{k} missing: {v}"));
    (n("passthrough"), n("cached"), n("direct"))
}

/// Reads the whole file with O_DIRECT through `fd` in 1 MiB blocks and checks it.
fn read_all_direct(fd: &OwnedFd, want: &[u8], what: &str) {
    let mut buf = Aligned::new(BLOCK);
    for off in (0..want.len()).step_by(BLOCK) {
        let n =
            pread(fd, buf.bytes(), off as u64).unwrap_or_else(|e| panic!("{what}: pread at {off}: {}", errno_name(e)));
        assert_eq!(n, BLOCK, "{what}: short read at {off}");
        assert!(buf.bytes()[..] == want[off..off + BLOCK], "{what}: wrong data at {off}");
    }
}

/// One scenario's result on the backing file: pages cached after it.
fn check_uncached(test: &str, what: &str, backing: &Path) {
    let pages = resident(backing);
    assert_eq!(
        pages, 0,
        "{test}: {what}: {pages} pages of the backing file are in its page cache: O_DIRECT through the mount went through it"
    );
}

/// The stackfs scenarios under one mount configuration.
fn stackfs_direct(test: &str, args: &[&str]) {
    if !require_fuse(test) {
        return;
    }
    if args.contains(&"uring") && !require_uring(test) {
        return;
    }
    let data = content();
    let spec = args.iter().fold(MountSpec::default(), |s, a| s.arg(a));
    let m = Mounted::with(Fs::Stackfs, test, spec, |b| std::fs::write(b.join(FILE), &data).unwrap());
    std::fs::write(m.reference.join(FILE), &data).unwrap();
    let backing = m.backing.clone().unwrap().join(FILE);
    let file = m.mnt.join(FILE);
    if dio_align(&backing).is_none() {
        // tmpfs, for one: its page cache is all it has, so there is nothing to tell apart.
        skip(
            test,
            "the test directory's file system has no direct I/O to a device (STATX_DIOALIGN); \
             point TMPDIR at ext4, xfs or btrfs",
        );
        return;
    }

    // A: an O_DIRECT open alone (passthrough where allowed, else the direct path).
    evict(&backing);
    let before = opens(&m);
    {
        let (f, want) = (file.clone(), data.clone());
        bounded("O_DIRECT read", IO_LIMIT, move || {
            let fd = open(&f, libc::O_RDONLY | libc::O_DIRECT).unwrap_or_else(|e| panic!("open: {}", errno_name(e)));
            read_all_direct(&fd, &want, "O_DIRECT read");
        });
    }
    check_uncached(test, "O_DIRECT read", &backing);
    let fresh: Vec<u8> = Rng::new(11).bytes(2 * BLOCK);
    {
        let (f, fresh) = (file.clone(), fresh.clone());
        let b = backing.clone();
        let cached_after_write = bounded("O_DIRECT write", IO_LIMIT, move || {
            let fd = open(&f, libc::O_RDWR | libc::O_DIRECT).unwrap_or_else(|e| panic!("open: {}", errno_name(e)));
            let mut buf = Aligned::new(fresh.len());
            buf.bytes().copy_from_slice(&fresh);
            assert_eq!(pwrite(&fd, buf.bytes(), BLOCK as u64), Ok(fresh.len()), "O_DIRECT write");
            // Checked while the file is still open: nothing was left to a
            // later flush or release.
            resident(&b)
        });
        assert_eq!(cached_after_write, 0, "{test}: an O_DIRECT write left {cached_after_write} backing pages cached");
    }
    // In the file already: read past every cache with O_DIRECT.
    let fd = open(&backing, libc::O_RDONLY | libc::O_DIRECT).unwrap();
    let mut buf = Aligned::new(fresh.len());
    assert_eq!(pread(&fd, buf.bytes(), BLOCK as u64), Ok(fresh.len()));
    assert!(buf.bytes()[..] == fresh[..], "{test}: the O_DIRECT write is not in the backing file");
    drop(fd);
    let mut data = data;
    data[BLOCK..3 * BLOCK].copy_from_slice(&fresh);
    std::fs::write(m.reference.join(FILE), &data).unwrap();
    let after = opens(&m);
    let took = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
    assert_eq!(took.1, 0, "{test}: an O_DIRECT open alone was answered through the page cache: {took:?}");

    // B: an O_DIRECT open beside a live buffered one, which fixes the path
    // (cached without passthrough: O_DIRECT requests still reach stackfs).
    evict(&backing);
    {
        let (f, want) = (file.clone(), data.clone());
        let b = backing.clone();
        let fresh: Vec<u8> = Rng::new(13).bytes(BLOCK);
        let got = bounded("O_DIRECT beside a buffered open", IO_LIMIT, move || {
            let _held = open(&f, libc::O_RDWR).unwrap_or_else(|e| panic!("open: {}", errno_name(e)));
            let fd = open(&f, libc::O_RDWR | libc::O_DIRECT).unwrap_or_else(|e| panic!("open: {}", errno_name(e)));
            read_all_direct(&fd, &want, "O_DIRECT read beside a buffered open");
            let after_read = resident(&b);
            let mut buf = Aligned::new(BLOCK);
            buf.bytes().copy_from_slice(&fresh);
            assert_eq!(pwrite(&fd, buf.bytes(), 0), Ok(BLOCK), "O_DIRECT write beside a buffered open");
            (after_read, resident(&b), fresh)
        });
        assert_eq!(got.0, 0, "{test}: O_DIRECT read beside a buffered open left {} backing pages cached", got.0);
        assert_eq!(got.1, 0, "{test}: O_DIRECT write beside a buffered open left {} backing pages cached", got.1);
        data[..BLOCK].copy_from_slice(&got.2);
    }
    let both = opens(&m);
    eprintln!(
        "{test}: opens passthrough/cached/direct: O_DIRECT alone {took:?}, beside a buffered open {:?}",
        (both.0 - after.0, both.1 - after.1, both.2 - after.2)
    );

    // C: O_DIRECT turned on after the open with fcntl(F_SETFL). A
    // passthrough open cannot follow: the kernel opened its backing file
    // with the open's flags and reads it with those (README, Data paths).
    evict(&backing);
    let before = opens(&m);
    {
        let (f, want) = (file.clone(), data.clone());
        let b = backing.clone();
        let cached = bounded("fcntl O_DIRECT read", IO_LIMIT, move || {
            let fd = open(&f, libc::O_RDONLY).unwrap_or_else(|e| panic!("open: {}", errno_name(e)));
            set_direct(&fd, true);
            read_all_direct(&fd, &want, "read after fcntl(O_DIRECT)");
            resident(&b)
        });
        let after = opens(&m);
        if after.0 == before.0 {
            assert_eq!(cached, 0, "{test}: read after fcntl(F_SETFL, O_DIRECT) left {cached} backing pages cached");
        } else {
            eprintln!("{test}: fcntl(O_DIRECT) case skipped: the open was a passthrough one");
        }
    }

    // D: what the device cannot take gets ext4's answer.
    let reference = m.reference.join(FILE);
    let cases: [(&str, bool, u64, usize); 4] = [
        ("read at offset 1", false, 1, 4096),
        ("read of 100 bytes", false, 0, 100),
        ("write at offset 1", true, 1, 4096),
        ("write of 100 bytes", true, 0, 100),
    ];
    for (what, write, off, len) in cases {
        let run = |p: PathBuf| {
            bounded(what, IO_LIMIT, move || {
                let fd = open(&p, libc::O_RDWR | libc::O_DIRECT).map_err(|e| format!("open: {}", errno_name(e)))?;
                let mut buf = Aligned::new(8192);
                let r = if write {
                    pwrite(&fd, &buf.bytes()[..len], off)
                } else {
                    pread(&fd, &mut buf.bytes()[..len], off)
                };
                r.map_err(errno_name)
            })
        };
        let (got, want) = (run(file.clone()), run(reference.clone()));
        assert_eq!(got, want, "{test}: unaligned O_DIRECT {what}: stackfs answered {got:?}, ext4 {want:?}");
    }
    // Nothing above changed the file but what was meant to.
    let now = std::fs::read(&backing).unwrap();
    assert!(now == data, "{test}: backing file content differs from what was written");
}

#[test]
fn stackfs_o_direct_default() {
    stackfs_direct("stackfs_o_direct_default", &[]);
}

#[test]
fn stackfs_o_direct_uring() {
    stackfs_direct("stackfs_o_direct_uring", &["--transport", "uring"]);
}

#[test]
fn stackfs_o_direct_plain() {
    stackfs_direct("stackfs_o_direct_plain", &["--profile", "plain"]);
}

#[test]
fn stackfs_o_direct_passthrough_off() {
    stackfs_direct("stackfs_o_direct_passthrough_off", &["--passthrough", "off"]);
}

#[test]
fn stackfs_o_direct_passthrough_off_uring() {
    stackfs_direct("stackfs_o_direct_passthrough_off_uring", &["--passthrough", "off", "--transport", "uring"]);
}

#[test]
fn stackfs_o_direct_writeback_cache() {
    stackfs_direct("stackfs_o_direct_writeback_cache", &["--writeback-cache"]);
}

#[test]
fn stackfs_o_direct_no_open() {
    stackfs_direct("stackfs_o_direct_no_open", &["--no-open"]);
}

/// memfs: O_DIRECT reads reach the daemon every time (no page cache), and
/// offsets and lengths need no alignment.
#[test]
fn memfs_o_direct_goes_to_memory() {
    let test = "memfs_o_direct_goes_to_memory";
    if !require_fuse(test) {
        return;
    }
    let m = Mounted::with(Fs::Memfs, test, MountSpec::default(), |_| {});
    let data = Rng::new(3).bytes(BLOCK);
    std::fs::write(m.mnt.join(FILE), &data).unwrap();
    let reads = |m: &Mounted| m.stats()["opcodes"]["READ"]["count"].as_u64().unwrap_or(0);
    let before = reads(&m);
    let f = m.mnt.join(FILE);
    let want = data.clone();
    bounded("memfs O_DIRECT", IO_LIMIT, move || {
        let fd = open(&f, libc::O_RDWR | libc::O_DIRECT).unwrap_or_else(|e| panic!("open: {}", errno_name(e)));
        for _ in 0..2 {
            read_all_direct(&fd, &want, "memfs O_DIRECT read");
        }
        let mut buf = Aligned::new(8192);
        assert_eq!(pread(&fd, &mut buf.bytes()[..100], 1), Ok(100), "unaligned O_DIRECT read");
        assert!(buf.bytes()[..100] == want[1..101]);
        assert_eq!(pwrite(&fd, &buf.bytes()[..100], 3), Ok(100), "unaligned O_DIRECT write");
    });
    assert!(reads(&m) >= before + 2, "memfs: O_DIRECT reads were served without the daemon");
}

//! A file removed from stackfs is freed on the backing file system as soon
//! as nothing but the daemon's caches holds it, as on ext4, and a file
//! removed while open keeps working until its last close.
//!
//! stackfs keeps descriptors of backing inodes in bounded caches: an
//! `O_PATH` descriptor per node the kernel holds, the descriptors of open
//! files and, with stateless opens (`--no-open`), a per-inode descriptor
//! serving `fh` 0 (also one with O_DIRECT). A removed inode is freed only
//! when its last descriptor closes, which for stackfs is when the kernel
//! FORGETs the node: at once after an unlink or a rename over it through
//! the mount, after the watcher's invalidation for a removal behind the
//! mount, and after the last close for a file removed while open. The
//! daemon's descriptors on removed inodes show in `/proc/PID/fd` as targets
//! ending in " (deleted)"; each test waits (bounded) until none is left.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{require_fuse, require_tools, Cmd, Fs, MountSpec, Mounted};

/// Bound on one command run in the mount.
const LOOK: Duration = Duration::from_secs(60);
/// How long the daemon may take to let go of a removed file nothing holds:
/// FORGET follows the removal at once, so this is only a bound.
const RELEASE: Duration = Duration::from_secs(10);
/// Files each workload makes.
const FILES: usize = 200;

/// Makes `d/f0` .. `d/f{N-1}` (8 KiB each), reads each back and writes one
/// byte into it, each in an open of its own; every tenth is read again with
/// O_DIRECT (which has a descriptor of its own on `--no-open`).
const MAKE: &str = "import mmap, os, sys
n = int(sys.argv[1])
os.mkdir('d')
for i in range(n):
    p = 'd/f%d' % i
    body = bytes([i % 251]) * 8192
    with open(p, 'wb') as f:
        f.write(body)
    with open(p, 'rb') as f:
        if f.read() != body:
            sys.exit('%s read back wrong' % p)
    with open(p, 'r+b') as f:
        f.write(b'x')
buf = mmap.mmap(-1, 4096)
for i in range(0, n, 10):
    fd = os.open('d/f%d' % i, os.O_RDONLY | os.O_DIRECT)
    try:
        if os.readv(fd, [buf]) != 4096 or buf[1:4] != bytes([i % 251]) * 3:
            sys.exit('direct read of d/f%d wrong' % i)
    finally:
        os.close(fd)
";

/// Removes a third of `d/f*` with unlink, and replaces another third by
/// renaming a new file over each.
const REMOVE_SOME: &str = "import os, sys
n = int(sys.argv[1])
for i in range(0, n, 3):
    os.unlink('d/f%d' % i)
for i in range(1, n, 3):
    with open('d/new%d' % i, 'wb') as f:
        f.write(b'new')
    os.rename('d/new%d' % i, 'd/f%d' % i)
";

/// Opens K files, removes them through the mount (argv[2] empty) or behind
/// it (argv[2]: the backing directory), then makes, reads and removes
/// OTHERS other files, so the descriptors that served the first ones are
/// evicted from a small cache, and reads and writes every removed file
/// through its open descriptor (its page cache dropped first, so reads
/// reach the daemon). Exits non-zero on any difference from ext4 (the link
/// count of the removed files is checked when argv[4] is "nlink").
const HOLD: &str = "import os, sys, time
k, behind, others, nlink = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == 'nlink'
def body(i):
    return bytes([(i * 7) % 251 + 1]) * 8192
fds = []
for i in range(k):
    with open('h%d' % i, 'wb') as f:
        f.write(body(i))
    fds.append(os.open('h%d' % i, os.O_RDWR))
for i in range(k):
    os.unlink(os.path.join(behind, 'h%d' % i) if behind else 'h%d' % i)
# Behind the mount, the watcher tells the kernel; wait until it has.
deadline = time.time() + 10
while any(os.path.exists('h%d' % i) for i in range(k)):
    if time.time() > deadline:
        sys.exit('removed files still visible through the mount')
    time.sleep(0.02)
for j in range(others):
    with open('o%d' % j, 'wb') as f:
        f.write(b'o' * 100)
    with open('o%d' % j, 'rb') as f:
        f.read()
    os.unlink('o%d' % j)
for i, fd in enumerate(fds):
    if nlink and os.fstat(fd).st_nlink != 0:
        sys.exit('h%d: nlink %d after removal' % (i, os.fstat(fd).st_nlink))
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    if os.pread(fd, 8192, 0) != body(i):
        sys.exit('h%d: read after removal differs' % i)
    if behind:
        continue
    if os.pwrite(fd, b'tail', 8190) != 4:
        sys.exit('h%d: short write after removal' % i)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    if os.pread(fd, 8, 8188) != body(i)[:2] + b'tail':
        sys.exit('h%d: written bytes not read back' % i)
    if os.fstat(fd).st_size != 8194:
        sys.exit('h%d: size %d after the write' % (i, os.fstat(fd).st_size))
for fd in fds:
    os.close(fd)
";

/// Runs `code` with `args` in `dir`; fails the test (saying `what` mount)
/// if it exits non-zero.
fn python(what: &str, dir: &Path, code: &str, args: &[&str]) {
    let out = Cmd::new("python3").arg("-c").arg(code).args(args).cwd(dir).timeout(LOOK).run();
    assert!(out.ok(), "{what}: {}\n{}{}", out.status, out.stdout, out.stderr);
}

/// The daemon's descriptors on files below `dir`: (target, open flags).
fn held_below(pid: u32, dir: &Path) -> Vec<(String, u32)> {
    let prefix = format!("{}/", dir.display());
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        panic!("daemon {pid} is gone");
    };
    let mut held = Vec::new();
    for e in entries.flatten() {
        // A descriptor closed while we look is simply not there.
        let Ok(target) = fs::read_link(e.path()) else { continue };
        let target = target.to_string_lossy().into_owned();
        if !target.starts_with(&prefix) {
            continue;
        }
        let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy()));
        let flags = info
            .ok()
            .and_then(|i| i.lines().find_map(|l| l.strip_prefix("flags:").map(|f| f.trim().to_string())))
            .and_then(|f| u32::from_str_radix(&f, 8).ok())
            .unwrap_or(0);
        held.push((target, flags));
    }
    held
}

/// The daemon's descriptors on removed inodes of the backing directory.
fn removed(pid: u32, backing: &Path) -> Vec<String> {
    held_below(pid, backing).into_iter().map(|(t, _)| t).filter(|t| t.ends_with(" (deleted)")).collect()
}

/// Waits until the daemon holds no removed inode of `backing`.
fn assert_released(pid: u32, backing: &Path, what: &str) {
    let freed = common::wait_until(RELEASE, || removed(pid, backing).is_empty());
    let left = removed(pid, backing);
    assert!(
        freed,
        "{what}: the daemon still holds {} descriptors of removed files {RELEASE:?} later: {:?}",
        left.len(),
        &left[..left.len().min(10)]
    );
}

/// Asserts that the daemon holds descriptors of at least half the files
/// in `dir` (and, with `io`, some that serve `fh` 0, not `O_PATH`): the
/// files must be in its caches, or their removal proves nothing. What the
/// kernel forgot meanwhile (inotify cannot tell the daemon's own changes
/// from others': its creations invalidate the new names; `drop_caches`)
/// is brought back by reading the files again.
fn assert_cached(m: &Mounted, pid: u32, dir: &Path, io: bool, what: &str) {
    let enough = |held: &[(String, u32)]| {
        held.len() >= FILES / 2 && (!io || held.iter().any(|(_, flags)| *flags & libc::O_PATH as u32 == 0))
    };
    let cached = common::wait_until(RELEASE, || {
        if enough(&held_below(pid, dir)) {
            return true;
        }
        Cmd::new("sh").args(["-c", "cat d/* >/dev/null"]).cwd(&m.mnt).timeout(LOOK).ok();
        false
    });
    let held = held_below(pid, dir);
    assert!(cached, "{what}: the files made are not in the daemon's caches ({} descriptors): {held:?}", held.len());
}

fn daemon(m: &Mounted) -> (u32, PathBuf) {
    let pid = common::daemon_pid(&m.mnt).expect("the daemon's pid");
    (pid, m.backing.clone().expect("stackfs has a backing directory"))
}

/// Files made, read and written through the mount, then removed through it
/// (unlink, rename over, `rm -r`): the daemon's descriptors of them close
/// at once, with stateless opens (with and without the watcher) and with
/// OPEN and passthrough.
#[test]
fn files_removed_through_the_mount_are_freed() {
    let test = "files_removed_through_the_mount_are_freed";
    if !require_fuse(test) || !require_tools(test, &["python3"]) {
        return;
    }
    let n = FILES.to_string();
    for args in [&["--no-open"][..], &["--no-open", "--cache", "none"], &[]] {
        let spec = args.iter().fold(MountSpec::default(), |s, a| s.arg(a));
        let m = Mounted::with(Fs::Stackfs, test, spec, |_| {});
        let (pid, backing) = daemon(&m);
        let what = format!("stackfs {}", args.join(" "));
        python(&what, &m.mnt, MAKE, &[&n]);
        assert_cached(&m, pid, &backing.join("d"), args.contains(&"--no-open"), &what);
        assert_eq!(removed(pid, &backing), Vec::<String>::new(), "{what}: nothing was removed yet");
        python(&what, &m.mnt, REMOVE_SOME, &[&n]);
        assert_released(pid, &backing, &format!("{what}, unlink and rename over"));
        let out = Cmd::new("rm").args(["-r", "d"]).cwd(&m.mnt).timeout(LOOK).run();
        assert!(out.ok(), "{what}: rm -r: {}", out.stderr);
        assert_released(pid, &backing, &format!("{what}, rm -r"));
    }
}

/// Files removed through the mount while open keep their data and take
/// writes through the open descriptor, also once the daemon's cached
/// descriptors of them were evicted (a cache of 32); the last close frees
/// them.
#[test]
fn files_removed_while_open_work_until_closed() {
    let test = "files_removed_while_open_work_until_closed";
    if !require_fuse(test) || !require_tools(test, &["python3"]) {
        return;
    }
    for args in [&["--no-open"][..], &[]] {
        let spec = args
            .iter()
            .fold(MountSpec::default(), |s, a| s.arg(a))
            .arg("--max-open-files")
            .arg("32")
            .arg("--max-open-handles")
            .arg("32");
        let m = Mounted::with(Fs::Stackfs, test, spec, |_| {});
        let (pid, backing) = daemon(&m);
        let what = format!("stackfs {}", args.join(" "));
        python(&what, &m.mnt, HOLD, &["40", "", "100", "nlink"]);
        assert_released(pid, &backing, &format!("{what}, after the last close"));
        // The backing directory is empty again, as ext4's would be.
        let left: Vec<_> = fs::read_dir(&backing).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "{what}: left in the backing directory: {left:?}");
    }
}

/// Files removed (or replaced) in the backing directory behind the mount:
/// the watcher's invalidation makes the kernel FORGET them, and the daemon
/// lets go at once (fanotify and inotify); one open through the mount
/// while removed still reads right until closed.
#[test]
fn files_removed_behind_the_mount_are_freed() {
    let test = "files_removed_behind_the_mount_are_freed";
    if !require_fuse(test) || !require_tools(test, &["python3"]) {
        return;
    }
    let n = FILES.to_string();
    for watch in ["fanotify", "inotify"] {
        let mut spec = MountSpec::default().arg("--no-open");
        if watch == "inotify" {
            spec = spec.env("EFUSE_STACKFS_WATCH", "inotify");
        }
        let m = Mounted::with(Fs::Stackfs, test, spec, |_| {});
        let (pid, backing) = daemon(&m);
        let what = format!("stackfs --no-open, {watch}");
        python(&what, &m.mnt, MAKE, &[&n]);
        let d = backing.join("d");
        assert_cached(&m, pid, &d, true, &what);
        for i in (0..FILES).step_by(2) {
            fs::remove_file(d.join(format!("f{i}"))).unwrap();
        }
        for i in (1..FILES).step_by(4) {
            let new = d.join(format!("new{i}"));
            fs::write(&new, b"new").unwrap();
            fs::rename(&new, d.join(format!("f{i}"))).unwrap();
        }
        assert_released(pid, &backing, &format!("{what}, unlink and rename over behind the mount"));
        // The replaced names show the new files through the mount.
        let f1 = Cmd::new("cat").arg("d/f1").cwd(&m.mnt).timeout(LOOK).ok();
        assert_eq!(f1, "new", "{what}");
        let f5 = Cmd::new("stat").args(["-c", "%s", "d/f5"]).cwd(&m.mnt).timeout(LOOK).ok();
        assert_eq!(f5.trim(), "3", "{what}");
        fs::remove_dir_all(&d).unwrap();
        assert_released(pid, &backing, &format!("{what}, rm -r behind the mount"));
        // inotify cannot name the inode an unlink behind the mount took the
        // link from (the name is gone when the event is read), so the link
        // count the kernel cached for a file open through the mount stays.
        let nlink = if watch == "fanotify" { "nlink" } else { "" };
        python(&what, &m.mnt, HOLD, &["10", &backing.display().to_string(), "0", nlink]);
        assert_released(pid, &backing, &format!("{what}, after closing files removed behind the mount"));
    }
}

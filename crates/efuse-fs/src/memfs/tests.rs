//! memfs driven through its operations, without a kernel.

use std::ffi::OsStr;
use std::sync::Arc;

use efuse::{Errno, SetAttr, TimeOrNow, Timespec};

use super::*;

const ROOT: u64 = 1;
const USER: Caller = Caller { uid: 1000, gid: 1000, pid: 0 };

fn small(blocks: u64) -> MemFs {
    MemFs::new(MemFsConfig { capacity: blocks * 4096, block_size: 4096, ..Default::default() })
}

fn n(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn file(fs: &MemFs, parent: u64, name: &str) -> u64 {
    fs.create_node(USER, parent, Some(n(name)), libc::S_IFREG | 0o644, NewKind::Node { rdev: 0 }, false).unwrap().nodeid
}

fn dir(fs: &MemFs, parent: u64, name: &str) -> u64 {
    fs.create_node(USER, parent, Some(n(name)), 0o755, NewKind::Dir, false).unwrap().nodeid
}

fn listing(fs: &MemFs, ino: u64, offset: u64) -> Vec<(u64, String)> {
    let mut v = Vec::new();
    fs.readdir(ino, offset, |_, cookie, _, name| {
        v.push((cookie, name.to_string_lossy().into_owned()));
        true
    })
    .unwrap();
    v
}

fn nlink(fs: &MemFs, ino: u64) -> u32 {
    fs.getattr(ino).unwrap().nlink
}

fn read_all(fs: &MemFs, ino: u64) -> Vec<u8> {
    let mut v = Vec::new();
    fs.read(ino, 0, 1 << 20, &mut v).unwrap();
    v
}

#[test]
fn create_lookup_and_attributes() {
    let fs = MemFs::new(MemFsConfig::default());
    let f = file(&fs, ROOT, "a");
    let d = dir(&fs, ROOT, "d");
    assert!(f > ROOT && d > f, "node ids grow");
    assert_eq!(fs.lookup(ROOT, n("a")).unwrap().nodeid, f);
    assert_eq!(fs.lookup(ROOT, n("zz")).unwrap_err(), Errno::ENOENT);
    assert_eq!(fs.lookup(f, n("x")).unwrap_err(), Errno::ENOTDIR);
    assert_eq!(fs.lookup(ROOT, n(&"x".repeat(256))).unwrap_err(), Errno::ENAMETOOLONG);
    assert_eq!(
        fs.create_node(USER, ROOT, Some(n("a")), 0o644, NewKind::Node { rdev: 0 }, false).unwrap_err(),
        Errno::EEXIST
    );
    let a = fs.getattr(f).unwrap();
    assert_eq!((a.mode, a.uid, a.gid, a.nlink, a.size), (libc::S_IFREG | 0o644, 1000, 1000, 1, 0));
    assert_eq!(nlink(&fs, ROOT), 3);
    assert_eq!(nlink(&fs, d), 2);
    assert_eq!(fs.lookup(d, n("..")).unwrap().nodeid, ROOT);

    let sl = fs.create_node(USER, d, Some(n("l")), 0o777, NewKind::Symlink(b"../a"), false).unwrap();
    assert_eq!(sl.attr.mode, libc::S_IFLNK | 0o777);
    assert_eq!(sl.attr.size, 4);
    let mut t = Vec::new();
    fs.readlink(sl.nodeid, &mut t).unwrap();
    assert_eq!(t, b"../a");
    let fifo = fs.create_node(USER, d, Some(n("p")), libc::S_IFIFO | 0o600, NewKind::Node { rdev: 0 }, false);
    assert_eq!(fifo.unwrap().attr.kind(), libc::S_IFIFO);
    let dev = fs.create_node(USER, d, Some(n("c")), libc::S_IFCHR | 0o600, NewKind::Node { rdev: 0x0103 }, false);
    assert_eq!(dev.unwrap().attr.rdev, 0x0103);
}

#[test]
fn create_makes_regular_files_whatever_the_mode_type() {
    // CREATE and TMPFILE (open = true): the kernel refuses an answer that is
    // not a regular file, so type bits in the mode are ignored, as open(2) does.
    let fs = MemFs::new(MemFsConfig::default());
    for (name, typ) in [("c", libc::S_IFCHR), ("b", libc::S_IFBLK), ("p", libc::S_IFIFO), ("d", libc::S_IFDIR)] {
        let e = fs.create_node(USER, ROOT, Some(n(name)), typ | 0o640, NewKind::Node { rdev: 0x0103 }, true).unwrap();
        assert_eq!((e.attr.mode, e.attr.rdev), (libc::S_IFREG | 0o640, 0), "{name}");
        fs.release(e.nodeid);
    }
    let tmp = fs.create_node(USER, ROOT, None, libc::S_IFSOCK | 0o600, NewKind::Node { rdev: 0 }, true).unwrap();
    assert_eq!(tmp.attr.mode, libc::S_IFREG | 0o600);
}

#[test]
fn setgid_directories_pass_on_their_group() {
    let fs = MemFs::new(MemFsConfig::default());
    let d = dir(&fs, ROOT, "shared");
    fs.setattr(d, &SetAttr { gid: Some(50), mode: Some(0o2775), ..Default::default() }, &USER).unwrap();
    let sub = fs.create_node(USER, d, Some(n("sub")), 0o755, NewKind::Dir, false).unwrap();
    assert_eq!(sub.attr.gid, 50);
    assert_eq!(sub.attr.mode, libc::S_IFDIR | 0o2755);
    let f = fs.create_node(USER, d, Some(n("f")), libc::S_IFREG | 0o2755, NewKind::Node { rdev: 0 }, false).unwrap();
    assert_eq!(f.attr.gid, 50);
    // Whether a non-member keeps setgid is the kernel's decision, made with
    // the caller's full credentials before the request (vfs_prepare_mode):
    // memfs takes the mode as given.
    assert_eq!(f.attr.mode & 0o7777, 0o2755);
}

#[test]
fn setattr_truncate_and_times() {
    let fs = small(16);
    let f = file(&fs, ROOT, "f");
    fs.write(f, 0, &[5u8; 10000], None).unwrap();
    assert_eq!(fs.getattr(f).unwrap().blocks, 3 * 8);
    let before = fs.getattr(f).unwrap();
    let a = fs.setattr(f, &SetAttr { size: Some(100), ..Default::default() }, &USER).unwrap();
    assert_eq!((a.size, a.blocks), (100, 8));
    assert!(a.mtime >= before.mtime && a.ctime >= before.ctime);
    assert_eq!(fs.statfs().bfree, 15);
    let a = fs.setattr(f, &SetAttr { size: Some(5000), ..Default::default() }, &USER).unwrap();
    assert_eq!(a.blocks, 8);
    let data = read_all(&fs, f);
    assert_eq!(data.len(), 5000);
    assert!(data[100..].iter().all(|&b| b == 0));

    let t = Timespec::new(1_000_000, 5);
    let a = fs
        .setattr(
            f,
            &SetAttr { atime: Some(TimeOrNow::Specific(t)), mtime: Some(TimeOrNow::Now), ..Default::default() },
            &USER,
        )
        .unwrap();
    assert_eq!(a.atime, t);
    assert!(a.mtime > t);
    let a = fs.setattr(f, &SetAttr { mode: Some(0o4711), ..Default::default() }, &USER).unwrap();
    assert_eq!(a.mode, libc::S_IFREG | 0o4711);
    let a = fs.setattr(f, &SetAttr { kill_suidgid: true, ..Default::default() }, &USER).unwrap();
    assert_eq!(a.mode, libc::S_IFREG | 0o711);
    assert_eq!(fs.setattr(ROOT, &SetAttr { size: Some(0), ..Default::default() }, &USER).unwrap_err(), Errno::EISDIR);
}

#[test]
fn pool_accounting_and_enospc() {
    let fs = small(4);
    assert_eq!(fs.statfs().blocks, 4);
    let f = file(&fs, ROOT, "f");
    let fh = fs.open(f, libc::O_RDWR, false, None).unwrap();
    // Sparse: one block at 1 GiB.
    fs.write(f, 1 << 30, b"x", None).unwrap();
    assert_eq!(fs.getattr(f).unwrap().size, (1 << 30) + 1);
    assert_eq!(fs.statfs().bfree, 3);
    // Three blocks left: a 5-block write is short, ending where space ran out.
    assert_eq!(fs.write(f, 0, &[1u8; 5 * 4096], None).unwrap(), 3 * 4096);
    assert_eq!(fs.write(f, 3 * 4096, b"y", None).unwrap_err(), Errno::ENOSPC);
    assert_eq!(fs.fallocate(f, 3 * 4096, 1, 0).unwrap_err(), Errno::ENOSPC);
    assert_eq!(fs.statfs().bfree, 0);
    // Unlinked but open: the blocks stay until the last handle goes.
    fs.unlink(ROOT, n("f")).unwrap();
    assert_eq!(fs.statfs().bfree, 0);
    fs.release(f);
    assert_eq!(fs.statfs().bfree, 0, "the kernel still holds a lookup");
    let files = fs.statfs().ffree;
    fs.forget(f, 1);
    assert_eq!(fs.statfs().bfree, 4);
    assert_eq!(fs.statfs().ffree, files + 1);
    assert_eq!(fs.getattr(f).unwrap_err(), Errno::ENOENT);
    let _ = fh;
}

#[test]
fn open_trunc_and_fallocate() {
    let fs = small(8);
    let f = file(&fs, ROOT, "f");
    fs.write(f, 0, &[1u8; 8192], None).unwrap();
    // Linux truncates on O_TRUNC even with O_RDONLY (the kernel checked
    // write permission before asking).
    fs.open(f, libc::O_RDONLY | libc::O_TRUNC, false, None).unwrap();
    assert_eq!(fs.getattr(f).unwrap().size, 0);
    fs.write(f, 0, &[1u8; 8192], None).unwrap();
    fs.open(f, libc::O_WRONLY | libc::O_TRUNC, false, None).unwrap();
    assert_eq!(fs.getattr(f).unwrap().size, 0);
    assert_eq!(fs.statfs().bfree, 8);
    fs.fallocate(f, 0, 3 * 4096, libc::FALLOC_FL_KEEP_SIZE).unwrap();
    assert_eq!(fs.getattr(f).unwrap().size, 0);
    assert_eq!(fs.getattr(f).unwrap().blocks, 24);
    fs.fallocate(f, 0, 2 * 4096, 0).unwrap();
    assert_eq!(fs.getattr(f).unwrap().size, 8192);
    fs.fallocate(f, 0, 4096, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE).unwrap();
    assert_eq!(fs.getattr(f).unwrap().blocks, 16);
    assert_eq!(fs.lseek(f, 0, libc::SEEK_DATA).unwrap(), 4096);
    assert_eq!(fs.lseek(f, 4096, libc::SEEK_HOLE).unwrap(), 8192);
    assert_eq!(fs.lseek(f, 8192, libc::SEEK_HOLE).unwrap_err(), Errno::ENXIO);
    assert_eq!(fs.fallocate(f, 0, 10, libc::FALLOC_FL_PUNCH_HOLE).unwrap_err(), Errno::EOPNOTSUPP);
    assert_eq!(fs.fallocate(f, 0, 10, libc::FALLOC_FL_ZERO_RANGE).unwrap_err(), Errno::EOPNOTSUPP);
}

#[test]
fn unlink_and_rmdir_rules() {
    let fs = MemFs::new(MemFsConfig::default());
    let d = dir(&fs, ROOT, "d");
    let f = file(&fs, d, "f");
    assert_eq!(fs.unlink(ROOT, n("d")).unwrap_err(), Errno::EISDIR);
    assert_eq!(fs.rmdir(d, n("f")).unwrap_err(), Errno::ENOTDIR);
    assert_eq!(fs.rmdir(ROOT, n("d")).unwrap_err(), Errno::ENOTEMPTY);
    assert_eq!(fs.unlink(ROOT, n("nope")).unwrap_err(), Errno::ENOENT);
    fs.unlink(d, n("f")).unwrap();
    assert_eq!(nlink(&fs, f), 0);
    fs.rmdir(ROOT, n("d")).unwrap();
    assert_eq!(nlink(&fs, ROOT), 2);
    // The removed directory still answers its holder, but takes no new names.
    assert_eq!(nlink(&fs, d), 0);
    assert_eq!(
        fs.create_node(USER, d, Some(n("x")), 0o644, NewKind::Node { rdev: 0 }, false).unwrap_err(),
        Errno::ENOENT
    );
    fs.forget(d, 1);
    assert_eq!(fs.getattr(d).unwrap_err(), Errno::ENOENT);
}

#[test]
fn hard_links() {
    let fs = MemFs::new(MemFsConfig::default());
    let d = dir(&fs, ROOT, "d");
    let f = file(&fs, ROOT, "f");
    assert_eq!(fs.link(d, ROOT, n("d2")).unwrap_err(), Errno::EPERM);
    let e = fs.link(f, d, n("g")).unwrap();
    assert_eq!((e.nodeid, e.attr.nlink), (f, 2));
    assert_eq!(fs.link(f, d, n("g")).unwrap_err(), Errno::EEXIST);
    fs.unlink(ROOT, n("f")).unwrap();
    fs.unlink(d, n("g")).unwrap();
    assert_eq!(fs.link(f, ROOT, n("back")).unwrap_err(), Errno::ENOENT);
    // An O_TMPFILE file may be given a name once.
    let t = fs.create_node(USER, ROOT, None, libc::S_IFREG | 0o600, NewKind::Node { rdev: 0 }, true).unwrap();
    assert_eq!(t.attr.nlink, 0);
    assert!(listing(&fs, ROOT, 0).iter().all(|(_, name)| name != "t"));
    fs.link(t.nodeid, ROOT, n("t")).unwrap();
    assert_eq!(nlink(&fs, t.nodeid), 1);
}

#[test]
fn rename_rules() {
    let fs = MemFs::new(MemFsConfig::default());
    let a = dir(&fs, ROOT, "a");
    let b = dir(&fs, a, "b");
    let c = dir(&fs, b, "c");
    let f = file(&fs, ROOT, "f");
    let g = file(&fs, ROOT, "g");
    let full = dir(&fs, ROOT, "full");
    file(&fs, full, "x");
    let empty = dir(&fs, ROOT, "empty");

    assert_eq!(fs.rename(ROOT, n("nope"), ROOT, n("x"), 0).unwrap_err(), Errno::ENOENT);
    // Into its own subtree.
    assert_eq!(fs.rename(ROOT, n("a"), c, n("a"), 0).unwrap_err(), Errno::EINVAL);
    assert_eq!(fs.rename(ROOT, n("a"), a, n("a2"), 0).unwrap_err(), Errno::EINVAL);
    // Onto an ancestor of the source.
    assert_eq!(fs.rename(b, n("c"), a, n("b"), 0).unwrap_err(), Errno::ENOTEMPTY);
    assert_eq!(fs.rename(ROOT, n("f"), ROOT, n("a"), 0).unwrap_err(), Errno::EISDIR);
    assert_eq!(fs.rename(ROOT, n("a"), ROOT, n("f"), 0).unwrap_err(), Errno::ENOTDIR);
    assert_eq!(fs.rename(ROOT, n("a"), ROOT, n("full"), 0).unwrap_err(), Errno::ENOTEMPTY);
    assert_eq!(fs.rename(ROOT, n("f"), ROOT, n("g"), libc::RENAME_NOREPLACE).unwrap_err(), Errno::EEXIST);
    assert_eq!(fs.rename(ROOT, n("f"), ROOT, n("zz"), libc::RENAME_EXCHANGE).unwrap_err(), Errno::ENOENT);
    assert_eq!(
        fs.rename(ROOT, n("f"), ROOT, n("g"), libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE).unwrap_err(),
        Errno::EINVAL
    );

    // Replacing a file drops the old one's link.
    fs.rename(ROOT, n("f"), ROOT, n("g"), 0).unwrap();
    assert_eq!(fs.lookup(ROOT, n("g")).unwrap().nodeid, f);
    assert_eq!(fs.lookup(ROOT, n("f")).unwrap_err(), Errno::ENOENT);
    assert_eq!(nlink(&fs, g), 0);

    // Replacing an empty directory, across directories: link counts follow.
    assert_eq!(nlink(&fs, ROOT), 5);
    fs.rename(b, n("c"), ROOT, n("empty"), 0).unwrap();
    assert_eq!(fs.lookup(ROOT, n("empty")).unwrap().nodeid, c);
    assert_eq!(fs.lookup(c, n("..")).unwrap().nodeid, ROOT);
    assert_eq!((nlink(&fs, ROOT), nlink(&fs, b), nlink(&fs, empty)), (5, 2, 0));

    // Exchange a directory and a file across directories.
    fs.rename(ROOT, n("g"), a, n("b"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs.lookup(ROOT, n("g")).unwrap().nodeid, b);
    assert_eq!(fs.lookup(a, n("b")).unwrap().nodeid, f);
    assert_eq!(fs.lookup(b, n("..")).unwrap().nodeid, ROOT);
    assert_eq!((nlink(&fs, ROOT), nlink(&fs, a)), (6, 2));
    // Exchange a directory with its own ancestor's entry is refused.
    assert_eq!(fs.rename(ROOT, n("a"), a, n("b"), libc::RENAME_EXCHANGE).unwrap_err(), Errno::EINVAL);

    // Two names of one file: nothing happens.
    fs.link(f, ROOT, n("h")).unwrap();
    fs.rename(ROOT, n("h"), a, n("b"), 0).unwrap();
    assert_eq!(fs.lookup(ROOT, n("h")).unwrap().nodeid, f);
    assert_eq!(nlink(&fs, f), 2);
    assert_eq!(fs.rename(ROOT, n("h"), ROOT, n("i"), libc::RENAME_WHITEOUT).unwrap_err(), Errno::EINVAL);
}

#[test]
fn readdir_cookies_are_stable() {
    let fs = MemFs::new(MemFsConfig::default());
    for i in 0..10 {
        file(&fs, ROOT, &format!("f{i}"));
    }
    let all = listing(&fs, ROOT, 0);
    assert_eq!(all[0].1, ".");
    assert_eq!(all[1].1, "..");
    assert_eq!(all.len(), 12);
    // Read five, then the directory changes under the listing.
    let resume = all[4].0;
    fs.unlink(ROOT, n("f1")).unwrap();
    fs.unlink(ROOT, n("f6")).unwrap();
    fs.rename(ROOT, n("f2"), ROOT, n("f2b"), 0).unwrap();
    file(&fs, ROOT, "new");
    let rest: Vec<String> = listing(&fs, ROOT, resume).into_iter().map(|x| x.1).collect();
    assert_eq!(rest, ["f3", "f4", "f5", "f7", "f8", "f9", "f2b", "new"]);
    assert!(listing(&fs, ROOT, u64::MAX).is_empty());
    // A full buffer stops the listing; the last cookie resumes it.
    let mut got = Vec::new();
    fs.readdir(ROOT, 0, |_, cookie, _, _| {
        got.push(cookie);
        got.len() < 3
    })
    .unwrap();
    assert_eq!(listing(&fs, ROOT, got[1])[0].1, all[2].1);
}

#[test]
fn readdirplus_counts_lookups_for_entries_sent() {
    let fs = MemFs::new(MemFsConfig::default());
    let a = file(&fs, ROOT, "a");
    let b = file(&fs, ROOT, "b");
    let mut seen = Vec::new();
    fs.readdirplus(ROOT, 0, |e, _, name| {
        if seen.len() == 3 {
            return false; // "b" does not fit
        }
        seen.push((e.nodeid, name.to_string_lossy().into_owned()));
        true
    })
    .unwrap();
    assert_eq!(seen, [(0, ".".to_string()), (0, "..".to_string()), (a, "a".to_string())]);
    fs.unlink(ROOT, n("a")).unwrap();
    fs.unlink(ROOT, n("b")).unwrap();
    // a: one lookup from create, one from readdirplus; b: only from create.
    fs.forget(a, 1);
    fs.forget(b, 1);
    assert!(fs.getattr(a).is_ok());
    assert_eq!(fs.getattr(b).unwrap_err(), Errno::ENOENT);
    fs.forget(a, 1);
    assert_eq!(fs.getattr(a).unwrap_err(), Errno::ENOENT);
}

#[test]
fn xattrs() {
    let fs = MemFs::new(MemFsConfig::default());
    let f = file(&fs, ROOT, "f");
    assert_eq!(fs.setxattr(f, n("user.a"), b"1", libc::XATTR_REPLACE).unwrap_err(), Errno::ENODATA);
    fs.setxattr(f, n("user.a"), b"1", libc::XATTR_CREATE).unwrap();
    assert_eq!(fs.setxattr(f, n("user.a"), b"2", libc::XATTR_CREATE).unwrap_err(), Errno::EEXIST);
    fs.setxattr(f, n("user.a"), b"22", libc::XATTR_REPLACE).unwrap();
    fs.setxattr(f, n("trusted.b"), b"", 0).unwrap();
    assert_eq!(fs.setxattr(f, n("system.x"), b"", 0).unwrap_err(), Errno::EOPNOTSUPP);
    assert_eq!(fs.setxattr(f, n("other"), b"", 0).unwrap_err(), Errno::EOPNOTSUPP);
    assert_eq!(fs.setxattr(f, n("user.big"), &[0; 65537], 0).unwrap_err(), Errno::E2BIG);
    let mut v = Vec::new();
    fs.getxattr(f, n("user.a"), &mut v).unwrap();
    assert_eq!(v, b"22");
    assert_eq!(fs.getxattr(f, n("user.zz"), &mut v).unwrap_err(), Errno::ENODATA);
    v.clear();
    fs.listxattr(f, &mut v).unwrap();
    assert_eq!(v, b"trusted.b\0user.a\0");
    fs.removexattr(f, n("user.a")).unwrap();
    assert_eq!(fs.removexattr(f, n("user.a")).unwrap_err(), Errno::ENODATA);
}

#[test]
fn access_checks() {
    let fs = MemFs::new(MemFsConfig::default());
    let f = file(&fs, ROOT, "f"); // 0644, 1000:1000
    let other = Caller { uid: 2000, gid: 2000, pid: 0 };
    let group = Caller { uid: 2000, gid: 1000, pid: 0 };
    let root = Caller { uid: 0, gid: 0, pid: 0 };
    assert!(fs.access(USER, f, libc::R_OK | libc::W_OK).is_ok());
    assert_eq!(fs.access(USER, f, libc::X_OK).unwrap_err(), Errno::EACCES);
    assert!(fs.access(other, f, libc::R_OK).is_ok());
    assert_eq!(fs.access(group, f, libc::W_OK).unwrap_err(), Errno::EACCES);
    assert!(fs.access(other, f, libc::F_OK).is_ok());
    assert!(fs.access(root, f, libc::R_OK | libc::W_OK).is_ok());
    assert_eq!(fs.access(root, f, libc::X_OK).unwrap_err(), Errno::EACCES);
    fs.setattr(f, &SetAttr { mode: Some(0o701), ..Default::default() }, &USER).unwrap();
    assert!(fs.access(root, f, libc::X_OK).is_ok());
    assert!(fs.access(other, f, libc::X_OK).is_ok());
    assert_eq!(fs.access(group, f, libc::X_OK).unwrap_err(), Errno::EACCES);
    assert!(fs.access(root, ROOT, libc::X_OK).is_ok());
    assert_eq!(fs.access(USER, 999, libc::F_OK).unwrap_err(), Errno::ENOENT);
}

#[test]
fn copy_file_range_keeps_holes() {
    let fs = small(16);
    let a = file(&fs, ROOT, "a");
    let b = file(&fs, ROOT, "b");
    fs.write(a, 0, &[1u8; 4096], None).unwrap();
    fs.write(a, 3 * 4096, &[2u8; 100], None).unwrap();
    let free = fs.statfs().bfree;
    assert_eq!(fs.copy_file_range(a, 0, b, 0, 1 << 20, 0).unwrap(), 3 * 4096 + 100);
    assert_eq!(read_all(&fs, a), read_all(&fs, b));
    assert_eq!(fs.statfs().bfree, free - 2, "the hole is not copied as data");
    // Within one file, not overlapping.
    assert_eq!(fs.copy_file_range(a, 0, a, 8 * 4096, 10, 0).unwrap(), 10);
    assert_eq!(fs.copy_file_range(a, 0, a, 100, 200, 0).unwrap_err(), Errno::EINVAL);
    assert_eq!(fs.copy_file_range(a, 1 << 30, b, 0, 10, 0).unwrap(), 0);
    assert_eq!(fs.copy_file_range(a, 0, ROOT, 0, 10, 0).unwrap_err(), Errno::EISDIR);
}

#[test]
fn concurrent_renames_do_not_deadlock() {
    let fs = Arc::new(MemFs::new(MemFsConfig::default()));
    let dirs: Vec<u64> = (0..4).map(|i| dir(&fs, ROOT, &format!("d{i}"))).collect();
    let sub: Vec<u64> = dirs.iter().map(|&d| dir(&fs, d, "s")).collect();
    for &d in &dirs {
        file(&fs, d, "f");
    }
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let fs = fs.clone();
            let dirs = dirs.clone();
            let sub = sub.clone();
            std::thread::spawn(move || {
                let mut x = t.wrapping_mul(0x9e3779b97f4a7c15) | 1;
                for _ in 0..3000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let all: Vec<u64> = dirs.iter().chain(sub.iter()).copied().collect();
                    let p = all[(x % 8) as usize];
                    let q = all[((x >> 8) % 8) as usize];
                    let names = ["f", "s", "g", "t"];
                    let a = names[((x >> 16) % 4) as usize];
                    let b = names[((x >> 20) % 4) as usize];
                    let flags = [0, libc::RENAME_EXCHANGE, libc::RENAME_NOREPLACE][((x >> 24) % 3) as usize];
                    let _ = fs.rename(p, n(a), q, n(b), flags);
                    let _ = fs.lookup(q, n(b)).map(|e| fs.forget(e.nodeid, 1));
                    let _ = fs.readdirplus(p, 0, |e, _, _| {
                        if e.nodeid != 0 {
                            fs.forget(e.nodeid, 1);
                        }
                        true
                    });
                    if x % 17 == 0 {
                        let _ = fs.create_node(USER, p, Some(n("t")), 0o755, NewKind::Dir, false);
                        let _ = fs.rmdir(q, n("t"));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Every directory is still reachable from the root and link counts add up.
    fn walk(fs: &MemFs, d: u64, seen: &mut usize) {
        let mut subdirs = Vec::new();
        fs.readdir(d, 2, |ino, _, kind, _| {
            if kind == libc::S_IFDIR {
                subdirs.push(ino);
            }
            true
        })
        .unwrap();
        assert_eq!(nlink(fs, d) as usize, 2 + subdirs.len());
        for s in subdirs {
            assert_eq!(fs.lookup(s, n("..")).unwrap().nodeid, d);
            *seen += 1;
            walk(fs, s, seen);
        }
    }
    let mut seen = 0;
    walk(&fs, ROOT, &mut seen);
}

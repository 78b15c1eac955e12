//! The daemon side of the bypass transport, end to end: a mount's bypass
//! socket, spoken to as the client library does (efuse_bypass's Client,
//! requests encoded with efuse_abi's structs), on memfs and stackfs.
//!
//! Covered: the handshake; WALK (relative and absolute links, "..", ELOOP,
//! ENOTDIR) then GETATTR, OPEN, READ, WRITE, RELEASE; forged node ids and
//! handles; a write through a read-only handle; an unprivileged client
//! against other users' files and a directory it may not search; cache
//! coherence with the kernel mount (write, create, unlink seen at once);
//! disconnect releasing every handle and lookup; a hostile client writing
//! garbage into its region and socket while another client works; and
//! `--bypass off`.
//!
//! Every client step runs under `bounded`: a daemon that stops answering
//! fails the test instead of hanging it; the `Mounted` guard unmounts.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{bounded, daemon_pid, require_fuse, wait_until, Fs, MountSpec, Mounted};
use efuse_abi::structs as abi;
use efuse_abi::Opcode;
use efuse_bypass::client::Client;
use efuse_bypass::wire::{walk, WalkIn, WalkOut};
use zerocopy::{FromBytes, IntoBytes};

const LIMIT: Duration = Duration::from_secs(60);
const ROOT: u64 = 1;

fn socket_of(mnt: &Path) -> PathBuf {
    let mp = std::fs::canonicalize(mnt).expect("mount point");
    PathBuf::from("/run/efuse").join(efuse_bypass::socket_name(mp.as_os_str().as_bytes()))
}

fn connect(mnt: &Path) -> std::io::Result<Client> {
    let dev = std::fs::metadata(mnt)?.dev();
    Client::connect(&socket_of(mnt), 0, dev)
}

/// A reply: Ok(payload) or Err(positive errno).
fn call(c: &Client, op: u32, nodeid: u64, args: &[&[u8]]) -> Result<Vec<u8>, i32> {
    c.call(op, nodeid, args, |e, p| if e == 0 { Ok(p.to_vec()) } else { Err(-e) }).expect("the call itself failed")
}

fn walk_flags(c: &Client, start: u64, path: &str, flags: u32) -> Result<(u32, abi::EntryOut), i32> {
    let w = WalkIn { flags, path_len: path.len() as u32 };
    let p = call(c, efuse_bypass::op::WALK, start, &[w.as_bytes(), path.as_bytes()])?;
    let out = WalkOut::read_from_prefix(&p).expect("WalkOut").0;
    Ok((out.status, out.entry))
}

/// Walks to `path` (following a final link) and keeps the node.
fn walk_to(c: &Client, path: &str) -> Result<abi::EntryOut, i32> {
    match walk_flags(c, ROOT, path, walk::FOLLOW_LAST)? {
        (walk::DONE, e) => Ok(e),
        (s, _) => panic!("WALK {path}: status {s}, expected DONE"),
    }
}

fn getattr(c: &Client, nodeid: u64) -> Result<abi::Attr, i32> {
    let g = abi::GetattrIn::default();
    let p = call(c, Opcode::Getattr as u32, nodeid, &[g.as_bytes()])?;
    Ok(abi::AttrOut::read_from_prefix(&p).expect("AttrOut").0.attr)
}

fn open(c: &Client, nodeid: u64, flags: i32) -> Result<u64, i32> {
    let o = abi::OpenIn { flags: flags as u32, open_flags: 0 };
    let p = call(c, Opcode::Open as u32, nodeid, &[o.as_bytes()])?;
    let out = abi::OpenOut::read_from_prefix(&p).expect("OpenOut").0;
    assert_eq!(out.open_flags & efuse_abi::consts::fopen::PASSTHROUGH, 0, "a bypass client got passthrough");
    Ok(out.fh)
}

fn read(c: &Client, nodeid: u64, fh: u64, off: u64, size: u32) -> Result<Vec<u8>, i32> {
    let r = abi::ReadIn { fh, offset: off, size, ..Default::default() };
    call(c, Opcode::Read as u32, nodeid, &[r.as_bytes()])
}

fn write(c: &Client, nodeid: u64, fh: u64, off: u64, data: &[u8]) -> Result<u32, i32> {
    let w = abi::WriteIn { fh, offset: off, size: data.len() as u32, ..Default::default() };
    let p = call(c, Opcode::Write as u32, nodeid, &[w.as_bytes(), data])?;
    Ok(abi::WriteOut::read_from_prefix(&p).expect("WriteOut").0.size)
}

fn release(c: &Client, nodeid: u64, fh: u64) -> Result<(), i32> {
    let r = abi::ReleaseIn { fh, ..Default::default() };
    call(c, Opcode::Release as u32, nodeid, &[r.as_bytes()]).map(|_| ())
}

fn forget(c: &Client, nodeid: u64, n: u64) {
    let f = abi::ForgetIn { nlookup: n };
    assert_eq!(call(c, Opcode::Forget as u32, nodeid, &[f.as_bytes()]), Ok(vec![]));
}

fn create(c: &Client, parent: u64, name: &str, flags: i32) -> Result<(abi::EntryOut, u64), i32> {
    let a = abi::CreateIn { flags: flags as u32, mode: libc::S_IFREG | 0o644, umask: 0, open_flags: 0 };
    let p = call(c, Opcode::Create as u32, parent, &[a.as_bytes(), name.as_bytes(), b"\0"])?;
    let (e, rest) = abi::EntryOut::read_from_prefix(&p).expect("EntryOut");
    Ok((e, abi::OpenOut::read_from_prefix(rest).expect("OpenOut").0.fh))
}

fn unlink(c: &Client, parent: u64, name: &str) -> Result<(), i32> {
    call(c, Opcode::Unlink as u32, parent, &[name.as_bytes(), b"\0"]).map(|_| ())
}

fn mounted(fs: Fs, test: &str, args: &[&str]) -> Option<Mounted> {
    if !require_fuse(test) {
        return None;
    }
    let mut spec = MountSpec::default();
    for a in args {
        spec = spec.arg(a);
    }
    Some(Mounted::with(fs, test, spec, |_| {}))
}

fn both(test: &str, f: impl Fn(&Mounted) + Clone) {
    for fs in [Fs::Memfs, Fs::Stackfs] {
        let Some(m) = mounted(fs, &format!("{test}-{}", fs.name()), &[]) else { return };
        f(&m);
    }
}

#[test]
fn handshake_walk_and_file_io() {
    both("bypass-io", |m| {
        std::fs::create_dir(m.mnt.join("dir")).unwrap();
        std::fs::write(m.mnt.join("dir/f"), b"hello world").unwrap();
        let mnt = m.mnt.clone();
        bounded("bypass io", LIMIT, move || {
            let c = connect(&mnt).expect("connect");
            let w = c.welcome();
            assert_eq!(w.error, 0);
            assert_eq!(w.slot_count, 8);
            assert!(w.slot_size as usize >= 4096 + 8192);
            let e = walk_to(&c, "dir/f").expect("walk dir/f");
            assert_eq!(e.attr.ino, std::fs::metadata(mnt.join("dir/f")).unwrap().ino());
            let a = getattr(&c, e.nodeid).expect("getattr");
            assert_eq!(a.size, 11);
            let fh = open(&c, e.nodeid, libc::O_RDWR).expect("open");
            assert_eq!(read(&c, e.nodeid, fh, 0, 4096).expect("read"), b"hello world");
            assert_eq!(write(&c, e.nodeid, fh, 6, b"WORLD!"), Ok(6));
            assert_eq!(read(&c, e.nodeid, fh, 0, 4096).expect("read"), b"hello WORLD!");
            release(&c, e.nodeid, fh).expect("release");
            // The handle is gone after RELEASE.
            assert_eq!(read(&c, e.nodeid, fh, 0, 10), Err(libc::EBADF));
            forget(&c, e.nodeid, 1);
            // Not held any more: the node id is refused.
            assert_eq!(getattr(&c, e.nodeid), Err(libc::ENOENT));
        });
    });
}

#[test]
fn walk_follows_links_as_the_kernel() {
    both("bypass-walk", |m| {
        let r = &m.mnt;
        std::fs::create_dir_all(r.join("a/b")).unwrap();
        std::fs::write(r.join("a/f"), b"x").unwrap();
        std::os::unix::fs::symlink("b", r.join("a/rel")).unwrap();
        std::os::unix::fs::symlink("../f", r.join("a/b/up")).unwrap();
        std::os::unix::fs::symlink("/etc", r.join("a/abs")).unwrap();
        std::os::unix::fs::symlink("loop2", r.join("loop1")).unwrap();
        std::os::unix::fs::symlink("loop1", r.join("loop2")).unwrap();
        let ino = |p: &str| std::fs::metadata(r.join(p)).unwrap().ino();
        let (b_ino, f_ino) = (ino("a/b"), ino("a/f"));
        let lnk_ino = std::fs::symlink_metadata(r.join("a/rel")).unwrap().ino();
        let mnt = m.mnt.clone();
        bounded("bypass walk", LIMIT, move || {
            let c = connect(&mnt).expect("connect");
            let nk = walk::NO_KEEP;
            let done = |p: &str, fl: u32| match walk_flags(&c, ROOT, p, fl | nk) {
                Ok((walk::DONE, e)) => Ok(e.attr.ino),
                Ok((s, _)) => panic!("{p}: status {s}"),
                Err(e) => Err(e),
            };
            assert_eq!(done("a/rel", walk::FOLLOW_LAST), Ok(b_ino));
            assert_eq!(done("a/rel", 0), Ok(lnk_ino), "a final link is not followed without FOLLOW_LAST");
            assert_eq!(done("a/rel/", 0), Ok(b_ino), "a trailing slash follows");
            assert_eq!(done("a/b/up", walk::FOLLOW_LAST), Ok(f_ino));
            assert_eq!(done("./a//b/../f", 0), Ok(f_ino));
            assert_eq!(walk_flags(&c, ROOT, "a/abs/passwd", 0).map(|r| r.0), Ok(walk::LEFT));
            assert_eq!(walk_flags(&c, ROOT, "..", 0).map(|r| r.0), Ok(walk::LEFT));
            assert_eq!(walk_flags(&c, ROOT, "a/../../x", 0).map(|r| r.0), Ok(walk::LEFT));
            assert_eq!(done("loop1", walk::FOLLOW_LAST), Err(libc::ELOOP));
            assert_eq!(done("loop1/x", 0), Err(libc::ELOOP));
            assert_eq!(done("a/f/x", 0), Err(libc::ENOTDIR));
            assert_eq!(done("a/f", walk::DIRECTORY), Err(libc::ENOTDIR));
            assert_eq!(done("a/missing", 0), Err(libc::ENOENT));
            assert_eq!(done(&"n".repeat(256), 0), Err(libc::ENAMETOOLONG));
            assert_eq!(done(&"a/".repeat(2048), 0), Err(libc::ENAMETOOLONG));
            // From a held directory, relative to it.
            let a = walk_to(&c, "a").expect("walk a");
            assert_eq!(walk_flags(&c, a.nodeid, "b/../f", nk).map(|r| r.1.attr.ino), Ok(f_ino));
            assert_eq!(walk_flags(&c, a.nodeid, "..", nk).map(|r| r.0), Ok(walk::LEFT));
            // Ending where it started: the client holds one more lookup.
            assert_eq!(walk_flags(&c, a.nodeid, ".", 0).map(|r| r.1.nodeid), Ok(a.nodeid));
            forget(&c, a.nodeid, 1);
            assert!(getattr(&c, a.nodeid).is_ok(), "the first lookup is still held");
            forget(&c, a.nodeid, 1);
            // The walks also published "a" in the client's metadata table,
            // which holds a lookup of its own: the client may still name it.
            assert!(getattr(&c, a.nodeid).is_ok(), "named by the client's table");
        });
    });
}

#[test]
fn forged_ids_and_handles_are_refused() {
    both("bypass-forged", |m| {
        std::fs::write(m.mnt.join("f"), b"data").unwrap();
        std::fs::write(m.mnt.join("g"), b"other").unwrap();
        let mnt = m.mnt.clone();
        bounded("bypass forged", LIMIT, move || {
            let c = connect(&mnt).expect("connect");
            let f = walk_to(&c, "f").expect("walk f");
            let g = walk_to(&c, "g").expect("walk g");
            // A node id the client never got.
            for forged in [f.nodeid + 1000, g.nodeid ^ 0x5555, u64::MAX] {
                assert_eq!(getattr(&c, forged), Err(libc::ENOENT), "nodeid {forged}");
            }
            let ro = open(&c, f.nodeid, libc::O_RDONLY).expect("open ro");
            assert_eq!(read(&c, f.nodeid, ro, 0, 100).as_deref(), Ok(&b"data"[..]));
            // WRITE on a read-only handle.
            assert_eq!(write(&c, f.nodeid, ro, 0, b"X"), Err(libc::EBADF));
            // A handle it never got, and its own handle on another node.
            assert_eq!(read(&c, f.nodeid, ro + 77, 0, 10), Err(libc::EBADF));
            assert_eq!(read(&c, g.nodeid, ro, 0, 10), Err(libc::EBADF));
            let wo = open(&c, g.nodeid, libc::O_WRONLY).expect("open wo");
            assert_eq!(read(&c, g.nodeid, wo, 0, 10), Err(libc::EBADF));
            // Locks and ioctls go through the kernel.
            let lk = abi::LkIn::default();
            assert_eq!(call(&c, Opcode::Getlk as u32, f.nodeid, &[lk.as_bytes()]), Err(libc::ENOSYS));
            assert_eq!(call(&c, 0x7777, f.nodeid, &[]), Err(libc::ENOSYS));
            // Names the kernel never sends.
            assert_eq!(call(&c, Opcode::Lookup as u32, ROOT, &[b"..\0"]), Err(libc::EINVAL));
            assert_eq!(call(&c, Opcode::Lookup as u32, ROOT, &[b"a/b\0"]), Err(libc::EINVAL));
            release(&c, f.nodeid, ro).unwrap();
            release(&c, g.nodeid, wo).unwrap();
            // The file is unchanged.
            assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"data");
        });
    });
}

#[test]
fn changes_are_seen_through_the_kernel_at_once() {
    both("bypass-coherence", |m| {
        std::fs::write(m.mnt.join("f"), b"old").unwrap();
        std::fs::write(m.mnt.join("doomed"), b"x").unwrap();
        let mnt = m.mnt.clone();
        bounded("bypass coherence", LIMIT, move || {
            let c = connect(&mnt).expect("connect");
            // The kernel caches attributes, data, a positive and a negative entry.
            let before = std::fs::metadata(mnt.join("f")).unwrap();
            assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"old");
            assert!(std::fs::metadata(mnt.join("new")).is_err());
            assert!(std::fs::metadata(mnt.join("doomed")).is_ok());
            std::thread::sleep(Duration::from_millis(20));

            let f = walk_to(&c, "f").expect("walk f");
            let fh = open(&c, f.nodeid, libc::O_RDWR).expect("open");
            assert_eq!(write(&c, f.nodeid, fh, 0, b"new contents"), Ok(12));
            let after = std::fs::metadata(mnt.join("f")).unwrap();
            assert_eq!(after.len(), 12, "kernel stat after a bypass write: stale size");
            assert!(
                (after.mtime(), after.mtime_nsec()) > (before.mtime(), before.mtime_nsec()),
                "kernel stat after a bypass write: stale mtime"
            );
            assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"new contents", "kernel read: stale data");
            release(&c, f.nodeid, fh).unwrap();

            let (e, fh) = create(&c, ROOT, "new", libc::O_WRONLY).expect("create");
            assert_eq!(write(&c, e.nodeid, fh, 0, b"fresh"), Ok(5));
            assert_eq!(std::fs::read(mnt.join("new")).expect("stale negative entry"), b"fresh");
            release(&c, e.nodeid, fh).unwrap();

            unlink(&c, ROOT, "doomed").expect("unlink");
            let gone = std::fs::metadata(mnt.join("doomed")).err().and_then(|e| e.raw_os_error());
            assert_eq!(gone, Some(libc::ENOENT), "kernel stat after a bypass unlink");
        });
    });
}

/// Files the daemon holds now: stackfs's descriptors, memfs's inodes.
fn held(m: &Mounted) -> u64 {
    let s = m.stats();
    let u = &s["usage"];
    match m.fs {
        Fs::Stackfs => {
            let pid = daemon_pid(&m.mnt).expect("daemon pid");
            std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0)
        }
        Fs::Memfs => u["inodes"].as_u64().expect("memfs reports inodes"),
    }
}

#[test]
fn disconnect_releases_everything() {
    both("bypass-disconnect", |m| {
        for i in 0..20 {
            std::fs::write(m.mnt.join(format!("f{i}")), b"x").unwrap();
        }
        let base = held(m);
        let mnt = m.mnt.clone();
        let c = bounded("bypass open many", LIMIT, move || {
            let c = connect(&mnt).expect("connect");
            for i in 0..20 {
                let e = walk_to(&c, &format!("f{i}")).expect("walk");
                open(&c, e.nodeid, libc::O_RDONLY).expect("open");
            }
            c
        });
        let s = m.stats();
        assert_eq!(s["bypass_clients"].as_u64(), Some(1), "stats: {s}");
        assert!(s["bypass_requests"].as_u64().unwrap_or(0) >= 40, "stats: {s}");
        // The files go away through the kernel while the client holds them.
        for i in 0..20 {
            std::fs::remove_file(m.mnt.join(format!("f{i}"))).unwrap();
        }
        let mid = held(m);
        if m.fs == Fs::Memfs {
            assert!(mid >= base, "memfs freed files a client holds ({base} -> {mid})");
        } else {
            assert!(mid >= base + 20, "stackfs holds no descriptors for 20 open files ({base} -> {mid})");
        }
        drop(c);
        let mut now = 0;
        let back = wait_until(Duration::from_secs(10), || {
            now = held(m);
            now <= base.saturating_sub(if m.fs == Fs::Memfs { 20 } else { 0 })
        });
        assert!(back, "{}: after disconnect the daemon still holds {now} (before: {base})", m.fs.name());
        assert_eq!(m.stats()["bypass_clients"].as_u64(), Some(0));
    });
}

#[test]
fn bypass_off_refuses_clients() {
    let Some(m) = mounted(Fs::Memfs, "bypass-off", &["--bypass", "off"]) else { return };
    let mnt = m.mnt.clone();
    let e = bounded("bypass off", LIMIT, move || connect(&mnt).err().map(|e| e.raw_os_error()));
    assert_eq!(e, Some(Some(libc::EOPNOTSUPP)));
}

/// Runs `f` in a forked child as uid/gid 65534 with no supplementary
/// groups; returns what it wrote to the pipe (a list of i32), or panics
/// after the limit.
fn as_nobody(f: impl FnOnce(&mut Vec<i32>)) -> Vec<i32> {
    in_child(|out| if drop_to_nobody() { f(out) } else { out.push(-9998) })
}

/// Makes the calling (single-threaded, forked) process uid/gid 65534 with no
/// supplementary groups.
fn drop_to_nobody() -> bool {
    // SAFETY: raw credential calls in the single-threaded child.
    unsafe {
        libc::setgroups(0, std::ptr::null()) == 0
            && libc::setresgid(65534, 65534, 65534) == 0
            && libc::setresuid(65534, 65534, 65534) == 0
    }
}

/// Runs `f` in a forked child; returns what it pushed (a list of i32), or
/// panics after the limit.
fn in_child(f: impl FnOnce(&mut Vec<i32>)) -> Vec<i32> {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the child runs `f`, writes, and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let mut out = Vec::new();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut out)));
        if r.is_err() {
            out.push(-9999);
        }
        let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_ne_bytes()).collect();
        // SAFETY: write and _exit in the child.
        unsafe {
            libc::write(wr.as_raw_fd(), bytes.as_ptr().cast(), bytes.len());
            libc::_exit(0);
        }
    }
    drop(wr);
    let mut p = libc::pollfd { fd: rd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd.
    let n = unsafe { libc::poll(&mut p, 1, LIMIT.as_millis() as i32) };
    if n <= 0 {
        // SAFETY: our child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let mut got = Vec::new();
    use std::io::Read;
    let _ = std::fs::File::from(rd).read_to_end(&mut got);
    let mut status = 0;
    // SAFETY: reaps our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(n > 0, "the child did not finish within {LIMIT:?}");
    got.chunks_exact(4).map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// 0 for Ok, the errno for Err.
fn code<T>(r: Result<T, i32>) -> i32 {
    r.err().unwrap_or(0)
}

#[test]
fn unprivileged_client_gets_exactly_the_kernels_rights() {
    for fs in [Fs::Memfs, Fs::Stackfs] {
        let test = format!("bypass-unpriv-{}", fs.name());
        let Some(m) = mounted(fs, &test, &["-o", "allow_other"]) else { return };
        let r = &m.mnt;
        std::fs::create_dir(r.join("private")).unwrap();
        std::fs::write(r.join("private/secret"), b"s3cret").unwrap();
        std::fs::set_permissions(r.join("private"), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(r.join("rootonly"), b"root").unwrap();
        std::fs::set_permissions(r.join("rootonly"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(r.join("public"), b"pub").unwrap();
        std::fs::set_permissions(r.join("public"), std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::create_dir(r.join("tmp")).unwrap();
        std::fs::set_permissions(r.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
        std::fs::write(r.join("tmp/roots"), b"r").unwrap();
        std::fs::set_permissions(r.join("tmp/roots"), std::fs::Permissions::from_mode(0o666)).unwrap();
        // Set-id files anyone may write: a write or truncate by someone
        // without CAP_FSETID must clear the bits (else: a root shell).
        for name in ["setid-w", "setid-t"] {
            std::fs::write(r.join(name), b"#!/bin/true\n").unwrap();
            std::fs::set_permissions(r.join(name), std::fs::Permissions::from_mode(0o6777)).unwrap();
        }
        // Root's client resolves the private file: root's metadata table
        // names it. Nobody's clients get a table of their own, without it.
        let root_client = connect(&m.mnt).expect("root connects");
        walk_to(&root_client, "private/secret").expect("root walks private/secret");
        let mnt = m.mnt.clone();
        let got = as_nobody(move |out| {
            let c = match connect(&mnt) {
                Ok(c) => c,
                Err(e) => {
                    out.push(-e.raw_os_error().unwrap_or(1));
                    return;
                }
            };
            out.push(0);
            // A directory it may not search: no walk, no attributes.
            out.push(code(walk_flags(&c, ROOT, "private/secret", walk::NO_KEEP)));
            out.push(code(walk_flags(&c, ROOT, "private/nothing", walk::NO_KEEP)));
            // The directory itself may be looked at (stat works through the kernel too).
            let private = walk_to(&c, "private").expect("walk private");
            out.push(match c.table() {
                Some(t) if t.find(private.nodeid, b"secret", 0).is_some() => -2,
                Some(_) => 0,
                None => -3,
            });
            out.push(code(call(&c, Opcode::Lookup as u32, private.nodeid, &[b"secret\0"])));
            let od = abi::OpenIn { flags: libc::O_RDONLY as u32, open_flags: 0 };
            out.push(code(call(&c, Opcode::Opendir as u32, private.nodeid, &[od.as_bytes()])));
            // Another user's files.
            let ro = walk_to(&c, "rootonly").expect("walk rootonly");
            out.push(code(open(&c, ro.nodeid, libc::O_RDONLY)));
            let public = walk_to(&c, "public").expect("walk public");
            out.push(code(open(&c, public.nodeid, libc::O_WRONLY)));
            out.push(code(open(&c, public.nodeid, libc::O_RDONLY | libc::O_TRUNC)));
            let fh = open(&c, public.nodeid, libc::O_RDONLY);
            out.push(code(fh));
            let data = fh.and_then(|fh| read(&c, public.nodeid, fh, 0, 100));
            out.push(if data.as_deref() == Ok(&b"pub"[..]) { 0 } else { -1 });
            // Changes to what it does not own.
            out.push(code(create(&c, ROOT, "mine", libc::O_WRONLY)));
            out.push(code(unlink(&c, ROOT, "public")));
            let chmod = abi::SetattrIn { valid: efuse_abi::consts::fattr::MODE, mode: 0o777, ..Default::default() };
            out.push(code(call(&c, Opcode::Setattr as u32, public.nodeid, &[chmod.as_bytes()])));
            let trunc = abi::SetattrIn { valid: efuse_abi::consts::fattr::SIZE, size: 0, ..Default::default() };
            out.push(code(call(&c, Opcode::Setattr as u32, public.nodeid, &[trunc.as_bytes()])));
            // A sticky directory: may create, may not remove root's file.
            let tmp = walk_to(&c, "tmp").expect("walk tmp");
            out.push(code(unlink(&c, tmp.nodeid, "roots")));
            let made = create(&c, tmp.nodeid, "nobodys", libc::O_WRONLY);
            out.push(code(made.map(|_| ())));
            let acc = abi::AccessIn { mask: libc::W_OK as u32, padding: 0 };
            out.push(code(call(&c, Opcode::Access as u32, ro.nodeid, &[acc.as_bytes()])));
            let acc = abi::AccessIn { mask: libc::R_OK as u32, padding: 0 };
            out.push(code(call(&c, Opcode::Access as u32, public.nodeid, &[acc.as_bytes()])));
            let w = walk_to(&c, "setid-w").expect("walk setid-w");
            let fh = open(&c, w.nodeid, libc::O_WRONLY);
            out.push(code(fh.and_then(|fh| write(&c, w.nodeid, fh, 0, b"x"))));
            let t = walk_to(&c, "setid-t").expect("walk setid-t");
            out.push(code(call(&c, Opcode::Setattr as u32, t.nodeid, &[trunc.as_bytes()])));
        });
        let want = vec![
            0,            // connected
            libc::EACCES, // walk private/secret
            libc::EACCES, // walk private/nothing: EACCES, not ENOENT (nothing leaks)
            0,            // its table does not name root's private/secret
            libc::EACCES, // LOOKUP in private
            libc::EACCES, // OPENDIR private
            libc::EACCES, // open rootonly
            libc::EACCES, // open public for writing
            libc::EACCES, // O_TRUNC needs write
            0,            // open public read-only
            0,            // and its data
            libc::EACCES, // create in root's 0755 directory
            libc::EACCES, // unlink there
            libc::EPERM,  // chmod another's file
            libc::EACCES, // truncate without write permission
            libc::EPERM,  // sticky: root's file
            0,            // create in the sticky directory
            libc::EACCES, // access(W_OK) on rootonly
            0,            // access(R_OK) on public
            0,            // write to a set-id file anyone may write
            0,            // truncate of one
        ];
        assert_eq!(got, want, "{test}: results of the unprivileged client");
        // Through the kernel, as root: nothing changed but the new file.
        assert_eq!(std::fs::read(m.mnt.join("public")).unwrap(), b"pub");
        assert_eq!(std::fs::metadata(m.mnt.join("public")).unwrap().mode() & 0o777, 0o644);
        assert_eq!(std::fs::metadata(m.mnt.join("tmp/nobodys")).unwrap().uid(), 65534);
        assert!(m.mnt.join("tmp/roots").exists());
        for name in ["setid-w", "setid-t"] {
            let mode = std::fs::metadata(m.mnt.join(name)).unwrap().mode() & 0o7777;
            assert_eq!(mode, 0o777, "{test}: {name} kept its set-id bits after a change by nobody");
        }
    }
}

/// A client that writes random bytes into its whole region, rings the
/// doorbell and fills its socket, while a well-behaved client works.
#[test]
fn a_hostile_client_harms_nobody_else() {
    both("bypass-hostile", |m| {
        std::fs::write(m.mnt.join("work"), b"").unwrap();
        let mnt = m.mnt.clone();
        bounded("bypass hostile", LIMIT, move || {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let hostile = {
                let (mnt, stop) = (mnt.clone(), stop.clone());
                std::thread::spawn(move || scribble(&mnt, &stop))
            };
            let c = connect(&mnt).expect("connect");
            let e = walk_to(&c, "work").expect("walk");
            let fh = open(&c, e.nodeid, libc::O_RDWR).expect("open");
            for i in 0..300u32 {
                let data = format!("round {i:05}");
                assert_eq!(write(&c, e.nodeid, fh, 0, data.as_bytes()), Ok(data.len() as u32));
                assert_eq!(read(&c, e.nodeid, fh, 0, 64).expect("read"), data.as_bytes(), "round {i}");
            }
            release(&c, e.nodeid, fh).unwrap();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let rounds = hostile.join().expect("hostile thread");
            assert!(rounds > 0, "the hostile client never got a region");
        });
        // The daemon is alive and the mount answers.
        assert_eq!(std::fs::read(m.mnt.join("work")).unwrap(), b"round 00299");
    });
}

/// The hostile client: its own handshake, then garbage. Returns how many
/// rounds of garbage it wrote.
fn scribble(mnt: &Path, stop: &std::sync::atomic::AtomicBool) -> u64 {
    let sock = std::os::unix::net::UnixStream::connect(socket_of(mnt)).expect("connect");
    let fd = sock.as_raw_fd();
    let hello = efuse_bypass::Hello { magic: efuse_bypass::MAGIC, version: efuse_bypass::VERSION, flags: 0 };
    efuse_bypass::client::send_with_fd(fd, hello.as_bytes(), None).expect("hello");
    let mut buf = [0u8; std::mem::size_of::<efuse_bypass::Welcome>()];
    let mut fds = efuse_bypass::client::recv_with_fds(fd, &mut buf).expect("welcome").into_iter();
    let memfd = fds.next().expect("welcome without a region");
    let w = efuse_bypass::Welcome::read_from_bytes(&buf).unwrap();
    // The metadata table, shared with the other clients of these
    // credentials (the test's well-behaved client among them): it cannot be
    // written, resized, or mapped writable.
    let table = fds.next().expect("welcome without a table");
    let tlen = efuse_bypass::table::table_len(w.table_buckets);
    // SAFETY: mmap of our descriptor; a success is unmapped at once.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            tlen,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            table.as_raw_fd(),
            0,
        )
    };
    assert_eq!(p, libc::MAP_FAILED, "the shared table could be mapped writable");
    // SAFETY: as above, read-only; then an attempt to make it writable.
    let ro = unsafe { libc::mmap(std::ptr::null_mut(), tlen, libc::PROT_READ, libc::MAP_SHARED, table.as_raw_fd(), 0) };
    assert_ne!(ro, libc::MAP_FAILED, "the shared table cannot be mapped at all");
    assert_ne!(unsafe { libc::mprotect(ro, tlen, libc::PROT_READ | libc::PROT_WRITE) }, 0, "mprotect made it writable");
    // SAFETY: our own mapping.
    unsafe { libc::munmap(ro, tlen) };
    let junk = [0xffu8; 64];
    // SAFETY: pwrite/ftruncate on our descriptor.
    assert!(unsafe { libc::pwrite(table.as_raw_fd(), junk.as_ptr().cast(), junk.len(), 0) } < 0, "pwrite to the table");
    assert_ne!(unsafe { libc::ftruncate(table.as_raw_fd(), 0) }, 0, "the table could be truncated");
    let region = efuse_bypass::Region::map(memfd.as_raw_fd(), w.slot_count, w.slot_size).expect("map");
    let len = efuse_bypass::region_len(w.slot_count, w.slot_size);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rounds = 0;
    // SAFETY: the region's header page is ours to scribble on, as any
    // client's is; the daemon must survive it.
    let base = region.header() as *const _ as *mut u8;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for _ in 0..4096 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x as usize) % len;
            // SAFETY: in bounds of the mapping.
            unsafe { base.add(at).write_volatile(x as u8) };
        }
        // Requests in every slot, with random lengths, and the doorbell.
        for i in 0..w.slot_count {
            let s = region.slot(i);
            s.len.store((x >> (i * 3)) as u32 % (w.slot_size + 100), std::sync::atomic::Ordering::Relaxed);
            s.state.store(efuse_bypass::state::REQUEST, std::sync::atomic::Ordering::Release);
        }
        region.header().doorbell.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        efuse_bypass::futex_wake(&region.header().doorbell, 1);
        // SAFETY: send on our socket, no wait.
        unsafe { libc::send(fd, (&x as *const u64).cast(), 8, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        rounds += 1;
        std::thread::yield_now();
    }
    drop(memfd);
    rounds
}

/// Connections that never send their Hello hold nobody else up: a real
/// client gets in while they wait, the daemon drops a user's fifth silent
/// connection at once and the others after the Hello timeout.
#[test]
fn silent_connections_hold_nobody_up() {
    let Some(m) = mounted(Fs::Memfs, "bypass-silent", &[]) else { return };
    let sock = socket_of(&m.mnt);
    let knock = || std::os::unix::net::UnixStream::connect(&sock).expect("connect");
    let mut silent: Vec<std::os::unix::net::UnixStream> = (0..3).map(|_| knock()).collect();
    // Each would cost a second of waiting, one after the other, if the
    // daemon read Hellos in turn; it waits on none of them.
    let t = std::time::Instant::now();
    let c = connect(&m.mnt).expect("a real client gets in");
    assert!(getattr(&c, ROOT).is_ok());
    assert!(t.elapsed() < Duration::from_millis(900), "the client waited {:?} behind silent ones", t.elapsed());
    let hung_up = |s: &std::os::unix::net::UnixStream, within: Duration| {
        s.set_read_timeout(Some(within)).unwrap();
        let mut b = [0u8; 1];
        matches!(std::io::Read::read(&mut &*s, &mut b), Ok(0))
    };
    // Beyond four pending connections of one user, the daemon hangs up at once.
    silent.push(knock());
    silent.push(knock());
    assert!(hung_up(&silent[4], Duration::from_millis(500)), "the fifth silent connection is dropped at once");
    assert!(!hung_up(&silent[3], Duration::from_millis(50)), "the fourth waits for its Hello");
    // The rest go when their Hello is overdue.
    assert!(
        silent.iter().all(|s| hung_up(s, Duration::from_secs(3))),
        "silent connections are dropped after the timeout"
    );
}

/// The daemon judges a client by the ids of the process that connected, read
/// when its Hello comes: if they changed in between (a process that exec'd
/// a set-id program while a child kept the socket would lend its new ids),
/// the client is refused. Here the connecting process drops to nobody
/// between connect and Hello.
#[test]
fn ids_changed_between_connect_and_hello_are_refused() {
    let Some(m) = mounted(Fs::Memfs, "bypass-ids-changed", &[]) else { return };
    let sock = socket_of(&m.mnt);
    let got = in_child(move |out| {
        let Ok(s) = std::os::unix::net::UnixStream::connect(&sock) else { return out.push(-1) };
        if !drop_to_nobody() {
            return out.push(-2);
        }
        let hello = efuse_bypass::Hello { magic: efuse_bypass::MAGIC, version: efuse_bypass::VERSION, flags: 0 };
        if efuse_bypass::client::send_with_fd(s.as_raw_fd(), hello.as_bytes(), None).is_err() {
            return out.push(-3);
        }
        let mut buf = [0u8; std::mem::size_of::<efuse_bypass::Welcome>()];
        out.push(match efuse_bypass::client::recv_with_fds(s.as_raw_fd(), &mut buf) {
            Ok(_) => efuse_bypass::Welcome::read_from_bytes(&buf).map_or(-4, |w| w.error),
            Err(_) => -5,
        });
    });
    assert_eq!(got, [-libc::EPERM], "the Welcome's error (negative errno; -1..-5: the child's own failure)");
}

/// The directory of direct reads (stackfs's backing directory) goes only to
/// a client as privileged as the daemon: root's client gets it, nobody's
/// (on an allow_other mount) and a root client without CAP_DAC_OVERRIDE do
/// not (either could use it for more than the mount allows: names above
/// it, ACLs, set-id programs); memfs offers none; a read-only mount none.
#[test]
fn only_clients_as_privileged_as_the_daemon_get_the_backing_directory() {
    let Some(m) = mounted(Fs::Stackfs, "bypass-direct-who", &["-o", "allow_other"]) else { return };
    let mnt = m.mnt.clone();
    let root = bounded("root connects", LIMIT, move || connect(&mnt).expect("connect").direct_dir().is_some());
    assert!(root, "root's client (as privileged as the daemon) got no directory of direct reads");
    let mnt = m.mnt.clone();
    let nobody = as_nobody(move |out| out.push(connect(&mnt).map(|c| c.direct_dir().is_some() as i32).unwrap_or(-1)));
    assert_eq!(nobody, vec![0], "nobody's client: 1 = got the backing directory, -1 = refused");
    let mnt = m.mnt.clone();
    let weaker = in_child(move |out| {
        // Root without CAP_DAC_OVERRIDE (dropped from the effective set).
        // SAFETY: capget/capset on this single-threaded child.
        let ok = unsafe {
            let mut hdr = [0x2008_0522u32, 0];
            let mut data = [0u32; 6];
            libc::syscall(libc::SYS_capget, hdr.as_mut_ptr(), data.as_mut_ptr()) == 0 && {
                data[0] &= !(1 << 1);
                libc::syscall(libc::SYS_capset, hdr.as_mut_ptr(), data.as_ptr()) == 0
            }
        };
        if !ok {
            out.push(-9997);
            return;
        }
        out.push(connect(&mnt).map(|c| c.direct_dir().is_some() as i32).unwrap_or(-1));
    });
    assert_eq!(weaker, vec![0], "a root client without CAP_DAC_OVERRIDE got the backing directory");
    drop(m);
    for (fs, args) in [(Fs::Memfs, &[][..]), (Fs::Stackfs, &["-o", "ro"][..])] {
        let test = format!("bypass-direct-none-{}", fs.name());
        let Some(m) = mounted(fs, &test, args) else { return };
        let mnt = m.mnt.clone();
        let got = bounded("connect", LIMIT, move || connect(&mnt).expect("connect").direct_dir().is_some());
        assert!(!got, "{test}: a directory of direct reads was offered");
    }
}

//! Permission differential test, in the spirit of tests/differential.rs: a
//! seeded PRNG generates operations that depend on who asks (create, mkdir,
//! open for read/write with and without O_TRUNC, write, truncate, ftruncate,
//! chmod with suid/sgid/sticky, chown and chgrp, utimensat, rename with and
//! without RENAME_NOREPLACE, link, unlink, rmdir, user.* xattrs, access,
//! symlink, mkfifo), each run as root, as `nobody` (65534:65534) or as an
//! unprivileged member of supplementary groups (4001:4001, groups 4002 and
//! 65534), with a random umask, on files and directories with random modes and
//! owners, in sticky and setgid directories, with names of NAME_MAX and
//! NAME_MAX+1 bytes and paths of PATH_MAX-1 and PATH_MAX bytes.
//!
//! Every step runs once on the efuse mount (`-o allow_other,default_permissions`;
//! the daemon started with umask 022, so a file system that applies its own
//! umask shows) and once on a plain ext4 directory. After every step the
//! return codes and errno must be identical, as must, for every path the step
//! touched and its parent: type, all 12 mode bits, owner, group, size, link
//! count, content and user.* xattrs (after a write, ftruncate or open the
//! child also fstat()s the same descriptor, so a mode that is right only
//! after the kernel refreshes its attributes shows). The whole tree is
//! compared every FULL_CHECK_EVERY steps and at the end.
//!
//! `EFUSE_PERM_SEED` (decimal or 0x-hex) and `EFUSE_PERM_OPS` (default 2500)
//! replay or lengthen a run; `EFUSE_PERM_MISMATCHES=N` keeps going until N
//! mismatches (default 1: stop at the first), after each one making the
//! mount's tree look like ext4's again (as root) so the next ones are not
//! echoes, and prints each kind of mismatch once with its count. A mismatch
//! prints the seed, the step, who ran it with which umask, the touched paths
//! before it, and both sides' results and paths after it.
//!
//! How a step runs: credentials and umask belong to the process (the thread,
//! for credentials), and this test process is multi-threaded and shared with
//! other tests, so each step forks a child that switches
//! (setgroups, setresgid, setresuid, in that order, as raw per-thread
//! syscalls), sets its umask, chdirs into the side's root (relative paths:
//! both sides see byte-identical paths, so the PATH_MAX limits hit alike),
//! makes the calls, writes one fixed-size record to a pipe and _exits. The
//! child makes only async-signal-safe calls on memory prepared before fork. A
//! child that does not answer within STEP_TIMEOUT is killed and the step fails.
//!
//! Not compared, because they legitimately differ: timestamps (except those a
//! step set explicitly), inode numbers, st_blocks, directory sizes and link
//! counts. For rename and rmdir of a non-empty directory POSIX allows EEXIST
//! or ENOTEMPTY; both read as ENOTEMPTY (RENAME_NOREPLACE's EEXIST is kept).

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::ffi::{CStr, CString};
use std::fmt::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{
    env_u64, errno, errno_name, first_difference, require_fuse, require_root, watch_progress, Fs, MountSpec, Mounted,
    Rng,
};

const DEFAULT_SEED: u64 = 0x9E4D_5EED_0777;
const DEFAULT_OPS: u64 = 2500;
/// One step (one forked child) must answer within this.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);
/// The parent's own checks touch the mount too: no progress for this long fails.
const STALL: Duration = Duration::from_secs(60);
const FULL_CHECK_EVERY: u64 = 100;
/// The fixed sticky and setgid directories get their owners and modes back this often.
const RESTORE_EVERY: u64 = 200;
/// The daemon's umask; the steps' umasks are random, so one applied twice shows.
const DAEMON_UMASK: u32 = 0o022;
/// Every step works below this directory of each side's root.
const WORK: &str = "t";
const PATH_MAX: usize = 4096;
const NAME_MAX: usize = 255;

/// Who runs a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Who {
    Root,
    Nobody,
    /// Unprivileged, in groups 4002 and 65534 besides its own 4001: group
    /// access through a supplementary group must count as on ext4.
    Member,
}

impl Who {
    fn uid(self) -> u32 {
        match self {
            Who::Root => 0,
            Who::Nobody => 65534,
            Who::Member => 4001,
        }
    }

    fn gid(self) -> u32 {
        self.uid()
    }

    fn groups(self) -> &'static [u32] {
        match self {
            Who::Member => &[4002, 65534],
            _ => &[],
        }
    }

    fn name(self) -> &'static str {
        match self {
            Who::Root => "root",
            Who::Nobody => "nobody",
            Who::Member => "member",
        }
    }

    fn describe(self) -> String {
        let groups: Vec<String> = self.groups().iter().map(u32::to_string).collect();
        format!("{} (uid {} gid {} groups [{}])", self.name(), self.uid(), self.gid(), groups.join(","))
    }
}

/// Owners and groups that files get: every caller's, plus a group only the member is in.
const OWNER_UIDS: &[u32] = &[0, 4001, 65534];
const OWNER_GIDS: &[u32] = &[0, 4001, 4002, 65534];
const XATTR_NAMES: &[&str] = &["user.a", "user.b"];
const COMMON_PERMS: &[u32] =
    &[0o755, 0o644, 0o777, 0o700, 0o600, 0o000, 0o070, 0o007, 0o750, 0o640, 0o775, 0o664, 0o711, 0o060, 0o666];

/// One timestamp argument of utimensat.
#[derive(Clone, Copy, Debug)]
enum Stamp {
    Now,
    Omit,
    At(i64, i64),
}

impl Stamp {
    fn timespec(self) -> libc::timespec {
        match self {
            Stamp::Now => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW },
            Stamp::Omit => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
            Stamp::At(s, ns) => libc::timespec { tv_sec: s, tv_nsec: ns },
        }
    }

    fn describe(self) -> String {
        match self {
            Stamp::Now => "UTIME_NOW".into(),
            Stamp::Omit => "UTIME_OMIT".into(),
            Stamp::At(s, ns) => format!("{s}.{ns:09}"),
        }
    }
}

/// What a step does with the descriptor it opened.
#[derive(Clone, Debug)]
enum Io {
    None,
    Write { off: i64, data: Vec<u8> },
    Read { len: usize },
    Ftruncate { len: i64 },
}

#[derive(Clone, Debug)]
enum Op {
    Open { path: String, flags: i32, mode: u32, io: Io },
    Truncate { path: String, len: i64 },
    Mkdir { path: String, mode: u32 },
    Mkfifo { path: String, mode: u32 },
    Symlink { target: String, path: String },
    Chmod { path: String, mode: u32 },
    Chown { path: String, uid: Option<u32>, gid: Option<u32>, follow: bool },
    Utimens { path: String, times: Option<[Stamp; 2]>, follow: bool },
    Rename { from: String, to: String, noreplace: bool },
    Link { from: String, to: String },
    Unlink { path: String },
    Rmdir { path: String },
    Setxattr { path: String, name: &'static str, value: Vec<u8>, flags: i32, follow: bool },
    Getxattr { path: String, name: &'static str },
    Access { path: String, mode: i32 },
}

impl Op {
    /// The paths the step names (a symlink's target is not one).
    fn paths(&self) -> Vec<&str> {
        match self {
            Op::Rename { from, to, .. } | Op::Link { from, to } => vec![from, to],
            Op::Open { path, .. }
            | Op::Truncate { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Mkfifo { path, .. }
            | Op::Symlink { path, .. }
            | Op::Chmod { path, .. }
            | Op::Chown { path, .. }
            | Op::Utimens { path, .. }
            | Op::Unlink { path }
            | Op::Rmdir { path }
            | Op::Setxattr { path, .. }
            | Op::Getxattr { path, .. }
            | Op::Access { path, .. } => vec![path],
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Op::Open { flags, io, .. } => match (flags & libc::O_CREAT != 0, io) {
                (true, Io::None) => "create",
                (true, _) => "create+io",
                (false, Io::None) => "open",
                (false, Io::Write { .. }) => "open+write",
                (false, Io::Read { .. }) => "open+read",
                (false, Io::Ftruncate { .. }) => "open+ftruncate",
            },
            Op::Truncate { .. } => "truncate",
            Op::Mkdir { .. } => "mkdir",
            Op::Mkfifo { .. } => "mkfifo",
            Op::Symlink { .. } => "symlink",
            Op::Chmod { .. } => "chmod",
            Op::Chown { .. } => "chown",
            Op::Utimens { .. } => "utimensat",
            Op::Rename { .. } => "rename",
            Op::Link { .. } => "link",
            Op::Unlink { .. } => "unlink",
            Op::Rmdir { .. } => "rmdir",
            Op::Setxattr { .. } => "setxattr",
            Op::Getxattr { .. } => "getxattr",
            Op::Access { .. } => "access",
        }
    }

    fn describe(&self) -> String {
        let p = |s: &str| format!("\"{}\"", short(s));
        match self {
            Op::Open { path, flags, mode, io } => {
                let mut s = format!("open({}, {}, {mode:04o})", p(path), open_flags(*flags));
                match io {
                    Io::None => {}
                    Io::Write { off, data } => s += &format!("; pwrite(off {off}, {} bytes); fstat", data.len()),
                    Io::Read { len } => s += &format!("; read({len})"),
                    Io::Ftruncate { len } => s += &format!("; ftruncate({len}); fstat"),
                }
                s
            }
            Op::Truncate { path, len } => format!("truncate({}, {len})", p(path)),
            Op::Mkdir { path, mode } => format!("mkdir({}, {mode:04o})", p(path)),
            Op::Mkfifo { path, mode } => format!("mknod({}, S_IFIFO|{mode:04o})", p(path)),
            Op::Symlink { target, path } => format!("symlink({}, {})", p(target), p(path)),
            Op::Chmod { path, mode } => format!("chmod({}, {mode:04o})", p(path)),
            Op::Chown { path, uid, gid, follow } => {
                let id = |v: &Option<u32>| v.map_or("-1".to_string(), |v| v.to_string());
                format!("{}({}, {}, {})", if *follow { "chown" } else { "lchown" }, p(path), id(uid), id(gid))
            }
            Op::Utimens { path, times, follow } => {
                let t = match times {
                    None => "NULL".to_string(),
                    Some([a, m]) => format!("[{}, {}]", a.describe(), m.describe()),
                };
                let f = if *follow { "0" } else { "AT_SYMLINK_NOFOLLOW" };
                format!("utimensat(AT_FDCWD, {}, {t}, {f})", p(path))
            }
            Op::Rename { from, to, noreplace } => {
                format!("renameat2({}, {}, {})", p(from), p(to), if *noreplace { "RENAME_NOREPLACE" } else { "0" })
            }
            Op::Link { from, to } => format!("link({}, {})", p(from), p(to)),
            Op::Unlink { path } => format!("unlink({})", p(path)),
            Op::Rmdir { path } => format!("rmdir({})", p(path)),
            Op::Setxattr { path, name, value, flags, follow } => {
                let f = match *flags {
                    libc::XATTR_CREATE => "XATTR_CREATE",
                    libc::XATTR_REPLACE => "XATTR_REPLACE",
                    _ => "0",
                };
                let call = if *follow { "setxattr" } else { "lsetxattr" };
                format!("{call}({}, {name:?}, {} bytes, {f})", p(path), value.len())
            }
            Op::Getxattr { path, name } => format!("getxattr({}, {name:?})", p(path)),
            Op::Access { path, mode } => {
                let mut m: Vec<&str> = [(libc::R_OK, "R_OK"), (libc::W_OK, "W_OK"), (libc::X_OK, "X_OK")]
                    .iter()
                    .filter(|(b, _)| mode & b != 0)
                    .map(|(_, n)| *n)
                    .collect();
                if m.is_empty() {
                    m.push("F_OK");
                }
                format!("access({}, {})", p(path), m.join("|"))
            }
        }
    }
}

fn open_flags(flags: i32) -> String {
    let mut f = match flags & libc::O_ACCMODE {
        libc::O_RDONLY => "O_RDONLY".to_string(),
        libc::O_WRONLY => "O_WRONLY".to_string(),
        _ => "O_RDWR".to_string(),
    };
    for (bit, name) in [(libc::O_CREAT, "O_CREAT"), (libc::O_EXCL, "O_EXCL"), (libc::O_TRUNC, "O_TRUNC")] {
        if flags & bit != 0 {
            f += "|";
            f += name;
        }
    }
    if flags & libc::O_NONBLOCK == 0 {
        f += "|(blocking)";
    }
    f
}

/// A path for a report: long components as `c×250`, runs of equal ones as `(…)^16`.
fn short(path: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut parts = path.split('/').peekable();
    while let Some(part) = parts.next() {
        let mut n = 1;
        while parts.peek() == Some(&part) {
            parts.next();
            n += 1;
        }
        let shown = match part.chars().next() {
            Some(c) if part.len() > 24 && part.chars().all(|x| x == c) => format!("{c}×{}", part.len()),
            _ if part.len() > 24 => format!("{}…({} bytes)", &part[..12], part.len()),
            _ => part.to_string(),
        };
        out.push(if n > 1 { format!("({shown})^{n}") } else { shown });
    }
    let shown = out.join("/");
    if path.len() > 200 {
        format!("{shown} [{} bytes]", path.len())
    } else {
        shown
    }
}

struct Step {
    who: Who,
    umask: u32,
    op: Op,
}

impl Step {
    fn describe(&self) -> String {
        format!("as {}, umask {:04o}: {}", self.who.describe(), self.umask, self.op.describe())
    }
}

/// A step whose outcome differs from ext4 for a documented reason (README,
/// "Known differences"), not run on either side; counted and reported.
///
/// A chown that changes neither owner nor group, by a non-owner, of a file
/// with set-id bits: ext4 refuses it (EPERM), because the VFS turns it into a
/// mode change that clears the bits. Through FUSE with `HANDLE_KILLPRIV_V2`
/// the kernel sends the file system the same empty SETATTR for it as for a
/// write by a non-owner (which must clear the bits and succeed), so the file
/// system cannot tell the two apart: efuse clears the bits and succeeds.
fn known_deviation(step: &Step, before: &[(String, View)]) -> Option<&'static str> {
    let Op::Chown { path, uid: None, gid: None, follow } = &step.op else { return None };
    if step.who == Who::Root {
        return None;
    }
    let key = if *follow && before.iter().any(|(p, _)| p == &format!("{path} (followed)")) {
        format!("{path} (followed)")
    } else {
        path.clone()
    };
    let (mode, uid, _) = before.iter().find(|(p, _)| *p == key)?.1.meta?;
    let setid = mode & (libc::S_ISUID | libc::S_ISGID) != 0;
    (mode & libc::S_IFMT != libc::S_IFDIR && setid && uid != step.who.uid())
        .then_some("chown(-1, -1) by a non-owner of a set-id file (ext4: EPERM; efuse: clears the bits)")
}

// ---------------------------------------------------------------------------
// The forked child.

const MAX_CALLS: usize = 2;
const RECORD_MAGIC: u64 = 0x7065_726d_7265_6331;

/// One libc call's result: the return value and, when it is negative, errno.
#[repr(C)]
#[derive(Clone, Copy)]
struct Call {
    ret: i64,
    errno: i64,
}

/// A stat taken by the child (on its own descriptor or path).
#[repr(C)]
#[derive(Clone, Copy)]
struct StatRec {
    taken: u32,
    ok: u32,
    errno: i64,
    mode: u32,
    uid: u32,
    gid: u32,
    pad: u32,
    nlink: u64,
    size: i64,
    atime: [i64; 2],
    mtime: [i64; 2],
}

/// What the child sends back: fixed size, well under PIPE_BUF, so one write.
#[repr(C)]
#[derive(Clone, Copy)]
struct Record {
    magic: u64,
    /// 0, or which credential switch failed: 1 setgroups, 2 setresgid, 3 setresuid, 4 chdir.
    setup_stage: i64,
    setup_errno: i64,
    ncalls: u64,
    calls: [Call; MAX_CALLS],
    /// [0]: after open (or the utimensat result), [1]: after the I/O.
    stats: [StatRec; 2],
    /// FNV-1a of the bytes read.
    hash: u64,
}

/// Everything the child needs, allocated before fork.
struct Prepared {
    root: CString,
    a: CString,
    b: CString,
    xattr: CString,
    data: Vec<u8>,
    rbuf: Vec<u8>,
    groups: Vec<libc::gid_t>,
    times: [libc::timespec; 2],
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("test paths hold no NUL")
}

impl Prepared {
    fn new(root: &CStr, step: &Step) -> Prepared {
        let (a, b): (&str, &str) = match &step.op {
            Op::Rename { from, to, .. } | Op::Link { from, to } => (from, to),
            Op::Symlink { target, path } => (path, target),
            other => (other.paths()[0], ""),
        };
        let (xattr, data) = match &step.op {
            Op::Setxattr { name, value, .. } => (*name, value.clone()),
            Op::Getxattr { name, .. } => (*name, Vec::new()),
            Op::Open { io: Io::Write { data, .. }, .. } => ("", data.clone()),
            _ => ("", Vec::new()),
        };
        let times = match &step.op {
            Op::Utimens { times: Some([x, y]), .. } => [x.timespec(), y.timespec()],
            _ => [Stamp::Omit.timespec(), Stamp::Omit.timespec()],
        };
        Prepared {
            root: root.to_owned(),
            a: cstr(a),
            b: cstr(b),
            xattr: cstr(xattr),
            data,
            rbuf: vec![0u8; 8192],
            groups: step.who.groups().to_vec(),
            times,
        }
    }
}

fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Record {
    fn empty() -> Record {
        // SAFETY: Record is plain integers; all zeroes is a valid value.
        let mut r: Record = unsafe { std::mem::zeroed() };
        r.magic = RECORD_MAGIC;
        r
    }

    /// Notes a call's result; must run right after the call, before errno changes.
    fn call(&mut self, ret: i64) {
        // SAFETY: __errno_location returns this thread's errno slot.
        let e = if ret < 0 { (unsafe { *libc::__errno_location() }) as i64 } else { 0 };
        if let Some(c) = self.calls.get_mut(self.ncalls as usize) {
            *c = Call { ret, errno: e };
            self.ncalls += 1;
        }
    }

    fn stat(&mut self, slot: usize, r: libc::c_int, st: &libc::stat) {
        // SAFETY: as in `call`.
        let e = if r < 0 { (unsafe { *libc::__errno_location() }) as i64 } else { 0 };
        if let Some(s) = self.stats.get_mut(slot) {
            s.taken = 1;
            s.ok = (r == 0) as u32;
            s.errno = e;
            s.mode = st.st_mode;
            s.uid = st.st_uid;
            s.gid = st.st_gid;
            s.nlink = st.st_nlink;
            s.size = st.st_size;
            s.atime = [st.st_atime, st.st_atime_nsec];
            s.mtime = [st.st_mtime, st.st_mtime_nsec];
        }
    }
}

/// The forked child's whole life: switch credentials, set the umask, enter
/// the side's root, run the step, report, _exit.
///
/// # Safety
/// Only after fork in the child: async-signal-safe calls only (raw syscalls
/// on memory prepared before fork), no allocation, no locks, no unwinding.
unsafe fn child_main(step: &Step, p: &mut Prepared, out: RawFd) -> ! {
    let mut rec = Record::empty();
    let (uid, gid) = (step.who.uid() as libc::c_long, step.who.gid() as libc::c_long);
    // Raw syscalls: they change this (the only) thread's credentials, without
    // the C library's all-threads broadcast that is not fork-safe.
    let stage = if libc::syscall(libc::SYS_setgroups, p.groups.len() as libc::c_long, p.groups.as_ptr()) != 0 {
        1
    } else if libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0 {
        2
    } else if libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0 {
        3
    } else {
        libc::umask(step.umask as libc::mode_t);
        if libc::chdir(p.root.as_ptr()) != 0 {
            4
        } else {
            0
        }
    };
    if stage != 0 {
        rec.setup_stage = stage;
        rec.setup_errno = *libc::__errno_location() as i64;
    } else {
        run_op(step, p, &mut rec);
    }
    libc::write(out, (&rec as *const Record).cast(), std::mem::size_of::<Record>());
    libc::_exit(0)
}

/// The step's calls, in the child.
///
/// # Safety
/// As `child_main`; every pointer comes from `p`, which outlives the calls.
unsafe fn run_op(step: &Step, p: &mut Prepared, rec: &mut Record) {
    let (a, b) = (p.a.as_ptr(), p.b.as_ptr());
    let mut st: libc::stat = std::mem::zeroed();
    match &step.op {
        Op::Open { flags, mode, io, .. } => {
            let fd = libc::open(a, *flags, *mode as libc::c_uint);
            rec.call(fd as i64);
            if fd < 0 {
                return;
            }
            let r = libc::fstat(fd, &mut st);
            rec.stat(0, r, &st);
            match io {
                Io::None => {}
                Io::Write { off, .. } => {
                    let r = libc::pwrite(fd, p.data.as_ptr().cast(), p.data.len(), *off);
                    rec.call(r as i64);
                    let r = libc::fstat(fd, &mut st);
                    rec.stat(1, r, &st);
                }
                Io::Read { len } => {
                    let n = (*len).min(p.rbuf.len());
                    let r = libc::read(fd, p.rbuf.as_mut_ptr().cast(), n);
                    rec.call(r as i64);
                    if r > 0 {
                        rec.hash = fnv(p.rbuf.get(..r as usize).unwrap_or(&[]));
                    }
                }
                Io::Ftruncate { len } => {
                    let r = libc::ftruncate(fd, *len);
                    rec.call(r as i64);
                    let r = libc::fstat(fd, &mut st);
                    rec.stat(1, r, &st);
                }
            }
            libc::close(fd);
        }
        Op::Truncate { len, .. } => rec.call(libc::truncate(a, *len) as i64),
        Op::Mkdir { mode, .. } => rec.call(libc::mkdir(a, *mode as libc::mode_t) as i64),
        Op::Mkfifo { mode, .. } => rec.call(libc::mknod(a, libc::S_IFIFO | *mode as libc::mode_t, 0) as i64),
        Op::Symlink { .. } => rec.call(libc::symlink(b, a) as i64),
        Op::Chmod { mode, .. } => rec.call(libc::chmod(a, *mode as libc::mode_t) as i64),
        Op::Chown { uid, gid, follow, .. } => {
            let flags = if *follow { 0 } else { libc::AT_SYMLINK_NOFOLLOW };
            let (u, g) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
            rec.call(libc::fchownat(libc::AT_FDCWD, a, u, g, flags) as i64)
        }
        Op::Utimens { times, follow, .. } => {
            let flags = if *follow { 0 } else { libc::AT_SYMLINK_NOFOLLOW };
            let tp = if times.is_some() { p.times.as_ptr() } else { std::ptr::null() };
            let r = libc::utimensat(libc::AT_FDCWD, a, tp, flags);
            rec.call(r as i64);
            if r == 0 {
                let r = libc::fstatat(libc::AT_FDCWD, a, &mut st, flags);
                rec.stat(0, r, &st);
            }
        }
        Op::Rename { noreplace, .. } => {
            let flags = if *noreplace { libc::RENAME_NOREPLACE } else { 0 };
            rec.call(libc::renameat2(libc::AT_FDCWD, a, libc::AT_FDCWD, b, flags) as i64)
        }
        Op::Link { .. } => rec.call(libc::link(a, b) as i64),
        Op::Unlink { .. } => rec.call(libc::unlink(a) as i64),
        Op::Rmdir { .. } => rec.call(libc::rmdir(a) as i64),
        Op::Setxattr { flags, follow, .. } => {
            let (v, n) = (p.data.as_ptr().cast(), p.data.len());
            let r = if *follow {
                libc::setxattr(a, p.xattr.as_ptr(), v, n, *flags)
            } else {
                libc::lsetxattr(a, p.xattr.as_ptr(), v, n, *flags)
            };
            rec.call(r as i64)
        }
        Op::Getxattr { .. } => {
            let r = libc::getxattr(a, p.xattr.as_ptr(), p.rbuf.as_mut_ptr().cast(), p.rbuf.len());
            rec.call(r as i64);
            if r > 0 {
                rec.hash = fnv(p.rbuf.get(..r as usize).unwrap_or(&[]));
            }
        }
        Op::Access { mode, .. } => rec.call(libc::access(a, *mode) as i64),
    }
}

/// Runs `step` in a forked child inside `root`; Err when the child hangs
/// (killed after `timeout`), dies without a record, or cannot take on the
/// step's credentials.
fn run_in_child(root: &CStr, step: &Step, timeout: Duration) -> Result<Record, String> {
    let mut p = Prepared::new(root, step);
    let mut fds = [-1; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe2: {}", errno_name(errno())));
    }
    // SAFETY: pipe2 just created both descriptors and nothing else owns them.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the child only runs child_main, which is async-signal-safe and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", errno_name(errno())));
    }
    if pid == 0 {
        // SAFETY: we are the child of the fork above.
        unsafe { child_main(step, &mut p, wr.as_raw_fd()) }
    }
    drop(wr);
    let deadline = Instant::now() + timeout;
    let got = read_record(rd.as_raw_fd(), deadline, timeout);
    let hung = matches!(&got, Err(e) if e.starts_with("timed out"));
    if hung {
        // SAFETY: plain syscall on the child we just forked.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let status = reap(pid, Instant::now() + Duration::from_secs(5));
    let rec = match (got, status) {
        (Err(e), Ok(st)) => return Err(format!("child {pid}: {e} ({})", wait_status(st))),
        (Err(e), Err(w)) => return Err(format!("child {pid}: {e}; {w}")),
        (Ok(_), Err(w)) => return Err(format!("child {pid}: {w}")),
        (Ok(_), Ok(st)) if !(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0) => {
            return Err(format!("child {pid} sent its record but then {}", wait_status(st)));
        }
        (Ok(rec), Ok(_)) => rec,
    };
    if rec.setup_stage != 0 {
        let what = ["", "setgroups", "setresgid", "setresuid", "chdir into the side's root"];
        let stage = what.get(rec.setup_stage as usize).copied().unwrap_or("?");
        return Err(format!(
            "child could not become {}: {stage} failed with {}",
            step.who.describe(),
            errno_name(rec.setup_errno as i32)
        ));
    }
    Ok(rec)
}

fn wait_status(st: libc::c_int) -> String {
    if libc::WIFEXITED(st) {
        format!("exited {}", libc::WEXITSTATUS(st))
    } else if libc::WIFSIGNALED(st) {
        format!("killed by signal {}", libc::WTERMSIG(st))
    } else {
        format!("wait status {st:#x}")
    }
}

fn read_record(fd: RawFd, deadline: Instant, timeout: Duration) -> Result<Record, String> {
    let mut rec = Record::empty();
    // Only a whole record from the child puts the magic back.
    rec.magic = 0;
    let size = std::mem::size_of::<Record>();
    let mut got = 0usize;
    while got < size {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("timed out after {timeout:?} without a result (killed)"));
        }
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        let ms = left.as_millis().clamp(1, 1000) as libc::c_int;
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 && errno() != libc::EINTR {
            return Err(format!("poll: {}", errno_name(errno())));
        }
        if r <= 0 {
            continue;
        }
        // SAFETY: writes at most size - got bytes into rec, a plain-integer struct of `size` bytes.
        let n = unsafe { libc::read(fd, (&mut rec as *mut Record).cast::<u8>().add(got).cast(), size - got) };
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        if n < 0 {
            return Err(format!("read from child: {}", errno_name(errno())));
        }
        if n == 0 {
            return Err(format!("exited after {got} of {size} bytes of its result"));
        }
        got += n as usize;
    }
    if rec.magic != RECORD_MAGIC {
        return Err("sent a garbled result".into());
    }
    Ok(rec)
}

/// Waits for `pid` until `deadline`, killing it if it is still there then.
fn reap(pid: libc::pid_t, deadline: Instant) -> Result<libc::c_int, String> {
    let mut pause = Duration::from_micros(20);
    let mut killed = false;
    loop {
        let mut st = 0;
        // SAFETY: waits only for our own child.
        let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) };
        if r == pid {
            return Ok(st);
        }
        if r < 0 && errno() != libc::EINTR {
            return Err(format!("waitpid: {}", errno_name(errno())));
        }
        if Instant::now() >= deadline {
            if killed {
                return Err("could not be reaped even after SIGKILL (stuck in the kernel?)".into());
            }
            // SAFETY: plain syscall on our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed = true;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

fn describe_stat(s: &StatRec) -> String {
    if s.ok == 0 {
        return format!("err {}", errno_name(s.errno as i32));
    }
    let ty = file_type(s.mode);
    let mut t = format!("{ty} {:04o} {}:{}", s.mode & 0o7777, s.uid, s.gid);
    if ty != "dir" {
        let _ = write!(t, " size={} nlink={}", s.size, s.nlink);
    }
    t
}

fn file_type(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "file",
        libc::S_IFDIR => "dir",
        libc::S_IFLNK => "symlink",
        libc::S_IFIFO => "fifo",
        _ => "other",
    }
}

/// The child's record as text: what must be identical on both sides.
fn describe_record(op: &Op, rec: &Record) -> String {
    let names: [&str; 2] = match op {
        Op::Open { io, .. } => [
            "open",
            match io {
                Io::Write { .. } => "pwrite",
                Io::Read { .. } => "read",
                Io::Ftruncate { .. } => "ftruncate",
                Io::None => "",
            },
        ],
        other => [other.kind(), ""],
    };
    let mut out = Vec::new();
    let calls = rec.calls.iter().zip(names).zip(&rec.stats).take(rec.ncalls as usize);
    for ((c, name), st) in calls {
        let mut e = c.errno as i32;
        let lenient = matches!(op, Op::Rmdir { .. } | Op::Rename { noreplace: false, .. });
        if lenient && e == libc::EEXIST {
            e = libc::ENOTEMPTY;
        }
        let mut s = if c.ret < 0 {
            format!("{name} err {}", errno_name(e))
        } else if name == "open" || c.ret == 0 {
            format!("{name} ok")
        } else {
            format!("{name} = {}", c.ret)
        };
        if c.ret > 0 && (name == "read" || name == "getxattr") {
            let _ = write!(s, " (bytes {:016x})", rec.hash);
        }
        if st.taken != 0 {
            if let Op::Utimens { times: Some([at, mt]), .. } = op {
                // Only explicitly set times are the same on both sides.
                let mut shown = Vec::new();
                for (name, stamp, got) in [("atime", at, st.atime), ("mtime", mt, st.mtime)] {
                    if let Stamp::At(..) = stamp {
                        shown.push(format!("{name}={}.{:09}", got[0], got[1]));
                    }
                }
                if st.ok == 0 {
                    shown.push(format!("stat err {}", errno_name(st.errno as i32)));
                }
                if !shown.is_empty() {
                    let _ = write!(s, " [{}]", shown.join(" "));
                }
            } else if !matches!(op, Op::Utimens { .. }) {
                let _ = write!(s, " [fstat {}]", describe_stat(st));
            }
        }
        out.push(s);
    }
    out.join("; ")
}

// ---------------------------------------------------------------------------
// The parent's view of a side, as root, through a descriptor of its root.

/// One path as seen by root: comparable text, and a regular file's bytes.
#[derive(Clone, Debug, PartialEq)]
struct View {
    text: String,
    data: Option<Vec<u8>>,
    /// (st_mode, uid, gid) when the path exists: what a repair needs.
    meta: Option<(u32, u32, u32)>,
}

impl View {
    fn error(e: i32) -> View {
        View { text: format!("err {}", errno_name(e)), data: None, meta: None }
    }
}

/// A side: its root directory, by absolute path (for the children's chdir)
/// and by descriptor (for the parent's checks, whose relative paths stay
/// below PATH_MAX however deep the tree gets).
struct Side {
    name: String,
    root: CString,
    fd: OwnedFd,
}

impl Side {
    fn open(name: &str, root: &Path) -> Side {
        let c = CString::new(root.as_os_str().as_bytes()).expect("no NUL in temp paths");
        // SAFETY: valid C string; the result is checked.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        assert!(fd >= 0, "open {}: {}", root.display(), errno_name(errno()));
        // SAFETY: a descriptor we just opened and own.
        Side { name: name.to_string(), root: c, fd: unsafe { OwnedFd::from_raw_fd(fd) } }
    }

    fn run(&self, step: &Step) -> Result<Record, String> {
        run_in_child(&self.root, step, STEP_TIMEOUT)
    }
}

/// `rel` (relative to `dirfd`) as root sees it, following a final symlink when `follow`.
fn view_at(dirfd: RawFd, rel: &CStr, follow: bool) -> View {
    // SAFETY (whole function): valid descriptors and C strings, buffers as long as the lengths passed.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        let nofollow = if follow { 0 } else { libc::AT_SYMLINK_NOFOLLOW };
        if libc::fstatat(dirfd, rel.as_ptr(), &mut st, nofollow) != 0 {
            return View::error(errno());
        }
        let fmt = st.st_mode & libc::S_IFMT;
        let ty = file_type(st.st_mode);
        let mut text = format!("{ty} {:04o} {}:{}", st.st_mode & 0o7777, st.st_uid, st.st_gid);
        if fmt != libc::S_IFDIR {
            let _ = write!(text, " size={} nlink={}", st.st_size, st.st_nlink);
        }
        let mut data = None;
        if fmt == libc::S_IFLNK {
            let mut buf = vec![0u8; PATH_MAX + 1];
            let n = libc::readlinkat(dirfd, rel.as_ptr(), buf.as_mut_ptr().cast(), buf.len());
            if n < 0 {
                let _ = write!(text, " readlink err {}", errno_name(errno()));
            } else {
                let target = &buf[..n as usize];
                let _ = write!(text, " -> \"{}\"", short(&String::from_utf8_lossy(target)));
                data = Some(target.to_vec());
            }
        } else if fmt == libc::S_IFREG || fmt == libc::S_IFDIR {
            let mut flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY;
            if !follow {
                flags |= libc::O_NOFOLLOW;
            }
            let fd = libc::openat(dirfd, rel.as_ptr(), flags);
            if fd < 0 {
                let _ = write!(text, " open err {}", errno_name(errno()));
            } else {
                let fd = OwnedFd::from_raw_fd(fd);
                if fmt == libc::S_IFREG {
                    match read_all(fd.as_raw_fd()) {
                        Ok(bytes) => data = Some(bytes),
                        Err(e) => {
                            let _ = write!(text, " read err {}", errno_name(e));
                        }
                    }
                }
                let _ = write!(text, "{}", user_xattrs(fd.as_raw_fd()));
            }
        }
        View { text, data, meta: Some((st.st_mode, st.st_uid, st.st_gid)) }
    }
}

fn read_all(fd: RawFd) -> Result<Vec<u8>, i32> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: buf is buf.len() bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(errno());
        }
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n as usize]);
    }
}

/// " xattrs[user.a=hex ...]" for the user.* attributes of an open file, or "".
fn user_xattrs(fd: RawFd) -> String {
    // SAFETY (whole function): buffers are as long as the sizes passed.
    unsafe {
        let mut list = vec![0u8; 4096];
        let n = libc::flistxattr(fd, list.as_mut_ptr().cast(), list.len());
        if n < 0 {
            return format!(" listxattr err {}", errno_name(errno()));
        }
        let mut names: Vec<&[u8]> = list[..n as usize].split(|b| *b == 0).filter(|n| n.starts_with(b"user.")).collect();
        if names.is_empty() {
            return String::new();
        }
        names.sort();
        let mut shown = Vec::new();
        for name in names {
            let c = CString::new(name).expect("split at NUL");
            let mut v = vec![0u8; 1024];
            let r = libc::fgetxattr(fd, c.as_ptr(), v.as_mut_ptr().cast(), v.len());
            let value = if r < 0 {
                format!("err {}", errno_name(errno()))
            } else {
                v[..r as usize].iter().map(|b| format!("{b:02x}")).collect()
            };
            shown.push(format!("{}={value}", String::from_utf8_lossy(name)));
        }
        format!(" xattrs[{}]", shown.join(" "))
    }
}

/// The paths a step touched and their parents, in order, without repeats.
fn touched(op: &Op) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for p in op.paths() {
        for q in [Some(p), p.rsplit_once('/').map(|(parent, _)| parent)].into_iter().flatten() {
            if !out.iter().any(|x| x == q) {
                out.push(q.to_string());
            }
        }
    }
    out
}

/// Root's view of each path (and, for a symlink, of what it points to).
fn views(side: &Side, paths: &[String]) -> Vec<(String, View)> {
    let mut out = Vec::new();
    for p in paths {
        let c = cstr(p);
        let v = view_at(side.fd.as_raw_fd(), &c, false);
        let link = v.text.starts_with("symlink");
        out.push((p.clone(), v));
        if link {
            out.push((format!("{p} (followed)"), view_at(side.fd.as_raw_fd(), &c, true)));
        }
    }
    out
}

/// Every entry below `WORK`, walked by descriptor (a deep tree may be longer
/// than PATH_MAX from the root).
fn tree(side: &Side) -> Vec<(String, View)> {
    fn walk(dirfd: RawFd, prefix: &str, out: &mut Vec<(String, View)>) {
        // SAFETY (whole function): valid descriptors and C strings; readdir's
        // entries are read before the next readdir call.
        unsafe {
            let fd = libc::openat(dirfd, c".".as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC);
            if fd < 0 {
                out.push((format!("{prefix}/"), View::error(errno())));
                return;
            }
            let dir = libc::fdopendir(fd);
            if dir.is_null() {
                out.push((format!("{prefix}/"), View::error(errno())));
                libc::close(fd);
                return;
            }
            let mut names: Vec<Vec<u8>> = Vec::new();
            loop {
                *libc::__errno_location() = 0;
                let e = libc::readdir(dir);
                if e.is_null() {
                    if errno() != 0 {
                        out.push((format!("{prefix}/"), View::error(errno())));
                    }
                    break;
                }
                let name = CStr::from_ptr((*e).d_name.as_ptr()).to_bytes();
                if name != b"." && name != b".." {
                    names.push(name.to_vec());
                }
            }
            libc::closedir(dir);
            names.sort();
            for name in names {
                let c = CString::new(name.clone()).expect("names hold no NUL");
                let key = format!("{prefix}/{}", String::from_utf8_lossy(&name));
                let v = view_at(dirfd, &c, false);
                let is_dir = v.text.starts_with("dir");
                out.push((key.clone(), v));
                if is_dir {
                    let sub = libc::openat(
                        dirfd,
                        c.as_ptr(),
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    );
                    if sub < 0 {
                        out.push((format!("{key}/"), View::error(errno())));
                        continue;
                    }
                    let sub = OwnedFd::from_raw_fd(sub);
                    walk(sub.as_raw_fd(), &key, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    let c = cstr(WORK);
    out.push((WORK.to_string(), view_at(side.fd.as_raw_fd(), &c, false)));
    // SAFETY: valid descriptor and C string; the result is checked.
    let fd =
        unsafe { libc::openat(side.fd.as_raw_fd(), c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd >= 0 {
        // SAFETY: a descriptor we just opened and own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        walk(fd.as_raw_fd(), WORK, &mut out);
    }
    out
}

/// The first difference between two sides' views, if any.
fn diff_views(test: &[(String, View)], reference: &[(String, View)], fs: &str) -> Option<(String, String)> {
    let (ka, kb): (Vec<&str>, Vec<&str>) =
        (test.iter().map(|e| e.0.as_str()).collect(), reference.iter().map(|e| e.0.as_str()).collect());
    if ka != kb {
        let only_a: Vec<String> = ka.iter().filter(|k| !kb.contains(k)).map(|k| short(k)).collect();
        let only_b: Vec<String> = kb.iter().filter(|k| !ka.contains(k)).map(|k| short(k)).collect();
        return Some(("paths".into(), format!("paths differ: only on {fs}: {only_a:?}; only on ext4: {only_b:?}")));
    }
    for ((k, a), (_, b)) in test.iter().zip(reference) {
        if a.text != b.text {
            return Some((k.clone(), format!("{}:\n      {fs}: {}\n      ext4: {}", short(k), a.text, b.text)));
        }
        if a.data != b.data {
            let (da, db) = (a.data.clone().unwrap_or_default(), b.data.clone().unwrap_or_default());
            return Some((k.clone(), format!("{}: contents differ: {}", short(k), first_difference(&da, &db))));
        }
    }
    None
}

/// Makes the mount's copies of `views`' paths look like ext4's again
/// (existence, type, owner, mode, content), so a run that keeps going after a
/// mismatch reports new differences rather than echoes of the last one.
/// Best effort: a repair that fails shows up as the next mismatch.
fn repair_all(test: &Side, have: &[(String, View)], want: &[(String, View)]) {
    let find = |list: &[(String, View)], k: &str| list.iter().find(|(x, _)| x == k).map(|(_, v)| v.clone());
    let mut keys: Vec<&str> = have.iter().chain(want).map(|(k, _)| k.as_str()).collect();
    keys.retain(|k| !k.ends_with(" (followed)") && k.len() < PATH_MAX);
    keys.sort();
    keys.dedup();
    // Children go before their parents when removing, after them when creating.
    for k in keys.iter().rev() {
        if let (None | Some(View { meta: None, .. }), Some(h)) = (find(want, k), find(have, k)) {
            remove(test, k, &h);
        }
    }
    for k in &keys {
        if let Some(w) = find(want, k) {
            repair(test, k, &w, find(have, k).as_ref());
        }
    }
}

fn remove(test: &Side, key: &str, have: &View) {
    let Some((mode, ..)) = have.meta else { return };
    let flags = if mode & libc::S_IFMT == libc::S_IFDIR { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: valid descriptor and C string.
    unsafe { libc::unlinkat(test.fd.as_raw_fd(), cstr(key).as_ptr(), flags) };
}

fn repair(test: &Side, key: &str, want: &View, have: Option<&View>) {
    let Some((mode, uid, gid)) = want.meta else { return };
    let fmt = mode & libc::S_IFMT;
    let (c, dirfd) = (cstr(key), test.fd.as_raw_fd());
    let have_fmt = have.and_then(|h| h.meta).map(|(m, ..)| m & libc::S_IFMT);
    // SAFETY (whole function): valid descriptor, C strings and buffers.
    unsafe {
        if have_fmt.is_some_and(|f| f != fmt) {
            remove(test, key, have.expect("has a type"));
        }
        if have_fmt != Some(fmt) {
            let data = want.data.clone().unwrap_or_default();
            match fmt {
                libc::S_IFDIR => {
                    libc::mkdirat(dirfd, c.as_ptr(), 0o700);
                }
                libc::S_IFIFO => {
                    libc::mknodat(dirfd, c.as_ptr(), libc::S_IFIFO | 0o600, 0);
                }
                libc::S_IFLNK => {
                    let target = CString::new(data).unwrap_or_default();
                    libc::symlinkat(target.as_ptr(), dirfd, c.as_ptr());
                }
                _ => {}
            }
        }
        let file_differs = have.is_none_or(|h| h.data != want.data || have_fmt != Some(fmt));
        if let (libc::S_IFREG, Some(w), true) = (fmt, &want.data, file_differs) {
            let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW | libc::O_CLOEXEC;
            let fd = libc::openat(dirfd, c.as_ptr(), flags, 0o600);
            if fd >= 0 {
                libc::write(fd, w.as_ptr().cast(), w.len());
                libc::close(fd);
            }
        }
        libc::fchownat(dirfd, c.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW);
        if fmt != libc::S_IFLNK {
            libc::fchmodat(dirfd, c.as_ptr(), mode & 0o7777, 0);
        }
    }
}

// ---------------------------------------------------------------------------
// Generating steps.

/// The names steps use: fixed directories (sticky, setgid, owned by each
/// user), plain names, NAME_MAX and NAME_MAX+1 names, and a deep chain whose
/// leaf holds names that make paths of exactly PATH_MAX-1 and PATH_MAX bytes.
struct Vocab {
    dirs: Vec<String>,
    names: Vec<String>,
    deep_chain: Vec<String>,
    deep_leaf: String,
    deep_names: Vec<String>,
    targets: Vec<String>,
}

/// (directory, mode, uid, gid) restored every RESTORE_EVERY steps.
const FIXED_DIRS: &[(&str, u32, u32, u32)] =
    &[("t", 0o755, 0, 0), ("t/pub", 0o1777, 0, 0), ("t/sg", 0o2775, 0, 4002), ("t/sgo", 0o3777, 4001, 4001)];

impl Vocab {
    fn new() -> Vocab {
        let comp = "c".repeat(250);
        let mut deep_chain = vec![format!("{WORK}/deep")];
        for _ in 0..16 {
            let next = format!("{}/{comp}", deep_chain.last().expect("non-empty"));
            deep_chain.push(next);
        }
        let deep_leaf = deep_chain.last().expect("non-empty").clone();
        // A name that makes "leaf/name" PATH_MAX-1 bytes (the longest a path
        // may be), and one a byte longer.
        let room = PATH_MAX - 1 - (deep_leaf.len() + 1);
        assert!((2..NAME_MAX).contains(&room), "deep chain leaves {room} bytes for a name");
        let (n255, n256) = ("L".repeat(NAME_MAX), "L".repeat(NAME_MAX + 1));
        let names = ["f0", "f1", "f2", "f0", "f1", "d0", "d1", "s0", "p0"]
            .iter()
            .map(|s| s.to_string())
            .chain([n255, n256])
            .collect();
        let dirs = ["t", "t/pub", "t/sg", "t/sgo", "t/u", "t/n", "t/pub/d0", "t/sg/d0", "t/u/d0", "t/d0"]
            .iter()
            .map(|s| s.to_string())
            .chain([deep_leaf.clone()])
            .collect();
        let deep_names =
            vec!["n".repeat(room), "n".repeat(room + 1), "f0".into(), "d0".into(), "s0".into(), "p0".into()];
        // Relative targets without "..": a symlink never leads out of its side.
        let long = "d0/".repeat((PATH_MAX - 1) / 3);
        let targets = ["f0", "f1", "d0", "d0/f0", ".", "s0", "nonexistent", "pub"]
            .iter()
            .map(|s| s.to_string())
            .chain([long.clone(), format!("{long}x")])
            .collect();
        Vocab { dirs, names, deep_chain, deep_leaf, deep_names, targets }
    }
}

/// What kind of path an operation mostly wants: most random paths would not
/// exist, and an operation on nothing tests little.
#[derive(Clone, Copy, PartialEq)]
enum Want {
    Any,
    Existing,
    File,
    Dir,
    /// Absent, in a directory that exists.
    Fresh,
}

struct Gen {
    rng: Rng,
    v: Vocab,
    /// The reference side's root: candidates are checked against it, so the
    /// sequence depends only on the seed and on ext4.
    reference: RawFd,
}

impl Gen {
    fn path(&mut self) -> String {
        match self.rng.below(100) {
            0..=11 => format!("{}/{}", self.v.deep_leaf, self.rng.pick(&self.v.deep_names)),
            12..=17 => self.rng.pick(&self.v.dirs).clone(),
            _ => format!("{}/{}", self.rng.pick(&self.v.dirs), self.rng.pick(&self.v.names)),
        }
    }

    /// A path of the wanted kind most of the time (a few tries, then any).
    fn pick(&mut self, want: Want) -> String {
        let want = if self.rng.chance(15) { Want::Any } else { want };
        let mut p = self.path();
        for _ in 0..6 {
            if want == Want::Any || self.is(&p, want) {
                break;
            }
            p = self.path();
        }
        p
    }

    fn is(&self, path: &str, want: Want) -> bool {
        let lstat = |p: &str| {
            let c = cstr(p);
            // SAFETY: valid descriptor, C string and stat buffer.
            unsafe {
                let mut st: libc::stat = std::mem::zeroed();
                (libc::fstatat(self.reference, c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) == 0)
                    .then_some(st.st_mode & libc::S_IFMT)
            }
        };
        match (want, lstat(path)) {
            (Want::Any, _) | (Want::Existing, Some(_)) => true,
            (Want::File, Some(t)) => t == libc::S_IFREG,
            (Want::Dir, Some(t)) => t == libc::S_IFDIR,
            (Want::Fresh, None) => path.rsplit_once('/').is_some_and(|(parent, _)| lstat(parent).is_some()),
            _ => false,
        }
    }

    fn perm(&mut self) -> u32 {
        if self.rng.chance(40) {
            *self.rng.pick(COMMON_PERMS)
        } else {
            self.rng.below(0o1000) as u32
        }
    }

    /// Permission bits, often with suid, sgid or sticky.
    fn mode(&mut self) -> u32 {
        let mut m = self.perm();
        if self.rng.chance(50) {
            m |= (1 + self.rng.below(7) as u32) << 9;
        }
        m
    }

    fn umask(&mut self) -> u32 {
        match self.rng.below(10) {
            0..=2 => 0,
            3..=5 => *self.rng.pick(&[0o022, 0o002, 0o077, 0o027, 0o007]),
            _ => self.rng.below(0o1000) as u32,
        }
    }

    fn who(&mut self) -> Who {
        match self.rng.below(100) {
            0..=24 => Who::Root,
            25..=54 => Who::Nobody,
            _ => Who::Member,
        }
    }

    fn len(&mut self) -> i64 {
        match self.rng.below(6) {
            0 => 0,
            1 => 1,
            2 => 4096,
            _ => self.rng.below(70_000) as i64,
        }
    }

    fn data(&mut self) -> Vec<u8> {
        let n = 1 + self.rng.below(4096) as usize;
        self.rng.bytes(n)
    }

    fn open(&mut self) -> Op {
        let acc = *self.rng.pick(&[libc::O_RDONLY, libc::O_WRONLY, libc::O_RDWR]);
        let mut flags = acc | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY;
        let want = match self.rng.below(10) {
            0..=2 => {
                flags |= libc::O_CREAT | libc::O_EXCL;
                Want::Fresh
            }
            3 => {
                flags |= libc::O_CREAT;
                Want::Any
            }
            _ => Want::File,
        };
        if self.rng.chance(25) {
            flags |= libc::O_TRUNC;
        }
        let writable = acc != libc::O_RDONLY;
        let io = match (self.rng.below(100), writable) {
            (0..=54, true) | (0..=9, false) => {
                let near = self.rng.below(8192) as i64;
                let off = *self.rng.pick(&[0, 0, near, 65_536]);
                Io::Write { off, data: self.data() }
            }
            (55..=69, _) => Io::Ftruncate { len: self.len() },
            (70..=84, _) => Io::Read { len: 4096 },
            _ => Io::None,
        };
        Op::Open { path: self.pick(want), flags, mode: self.mode(), io }
    }

    fn stamp(&mut self) -> Stamp {
        Stamp::At(1_000_000_000 + self.rng.below(1_000_000_000) as i64, self.rng.below(1_000_000_000) as i64)
    }

    fn step(&mut self) -> Step {
        let who = self.who();
        let umask = self.umask();
        let op = match self.rng.below(100) {
            0..=29 => self.open(),
            30..=35 => Op::Mkdir { path: self.pick(Want::Fresh), mode: self.mode() },
            36..=43 => Op::Chmod { path: self.pick(Want::Existing), mode: self.mode() },
            44..=50 => {
                let (uid, gid) = match self.rng.below(20) {
                    0..=6 => (Some(*self.rng.pick(OWNER_UIDS)), None),
                    7..=13 => (None, Some(*self.rng.pick(OWNER_GIDS))),
                    14 => (None, None),
                    _ => (Some(*self.rng.pick(OWNER_UIDS)), Some(*self.rng.pick(OWNER_GIDS))),
                };
                Op::Chown { path: self.pick(Want::Existing), uid, gid, follow: self.rng.chance(80) }
            }
            51..=54 => {
                let times = match self.rng.below(6) {
                    0 => None,
                    1 => Some([Stamp::Now, Stamp::Now]),
                    2 => Some([self.stamp(), self.stamp()]),
                    3 => Some([Stamp::Omit, self.stamp()]),
                    4 => Some([Stamp::Now, Stamp::Omit]),
                    _ => Some([Stamp::Omit, Stamp::Omit]),
                };
                Op::Utimens { path: self.pick(Want::Existing), times, follow: self.rng.chance(80) }
            }
            55..=62 => {
                let from = self.pick(Want::Existing);
                let over = self.rng.chance(50);
                let to = self.pick(if over { Want::Existing } else { Want::Fresh });
                Op::Rename { from, to, noreplace: self.rng.chance(25) }
            }
            63..=65 => Op::Link { from: self.pick(Want::File), to: self.pick(Want::Fresh) },
            66..=69 => Op::Unlink { path: self.pick(Want::Existing) },
            70..=72 => Op::Rmdir { path: self.pick(Want::Dir) },
            73..=76 => {
                let name = *self.rng.pick(XATTR_NAMES);
                let len = 1 + self.rng.below(32) as usize;
                let flags = *self.rng.pick(&[0, 0, libc::XATTR_CREATE, libc::XATTR_REPLACE]);
                let value = self.rng.bytes(len);
                Op::Setxattr { path: self.pick(Want::Existing), name, value, flags, follow: self.rng.chance(80) }
            }
            77..=78 => {
                let name = *self.rng.pick(XATTR_NAMES);
                Op::Getxattr { path: self.pick(Want::Existing), name }
            }
            79..=83 => {
                let mode = *self.rng.pick(&[
                    libc::F_OK,
                    libc::R_OK,
                    libc::W_OK,
                    libc::X_OK,
                    libc::R_OK | libc::W_OK,
                    libc::R_OK | libc::X_OK,
                    libc::W_OK | libc::X_OK,
                    libc::R_OK | libc::W_OK | libc::X_OK,
                ]);
                Op::Access { path: self.pick(Want::Existing), mode }
            }
            84..=86 => Op::Symlink { target: self.rng.pick(&self.v.targets).clone(), path: self.pick(Want::Fresh) },
            87..=88 => Op::Mkfifo { path: self.pick(Want::Fresh), mode: self.mode() },
            _ => Op::Truncate { path: self.pick(Want::File), len: self.len() },
        };
        Step { who, umask, op }
    }

    fn root(op: Op) -> Step {
        Step { who: Who::Root, umask: 0, op }
    }

    /// Root puts a directory in place with a given owner and mode.
    fn fixed_dir(out: &mut Vec<Step>, path: &str, mode: u32, uid: u32, gid: u32) {
        out.push(Gen::root(Op::Mkdir { path: path.into(), mode: mode & 0o1777 }));
        out.push(Gen::root(Op::Chown { path: path.into(), uid: Some(uid), gid: Some(gid), follow: false }));
        out.push(Gen::root(Op::Chmod { path: path.into(), mode }));
    }

    /// The starting tree: the fixed directories, two with random owners and
    /// modes, the deep chain, and a file with a random owner and mode in each.
    fn setup(&mut self) -> Vec<Step> {
        let mut out = Vec::new();
        for (path, mode, uid, gid) in FIXED_DIRS {
            Gen::fixed_dir(&mut out, path, *mode, *uid, *gid);
        }
        for path in ["t/u", "t/n"] {
            let (mode, uid, gid) = (self.mode(), *self.rng.pick(OWNER_UIDS), *self.rng.pick(OWNER_GIDS));
            Gen::fixed_dir(&mut out, path, mode | 0o500, uid, gid);
        }
        for d in &self.v.deep_chain.clone() {
            out.push(Gen::root(Op::Mkdir { path: d.clone(), mode: 0o755 }));
        }
        out.push(Gen::root(Op::Chmod { path: self.v.deep_leaf.clone(), mode: 0o1777 }));
        let leaf = self.v.deep_leaf.clone();
        for dir in ["t", "t/pub", "t/sg", "t/sgo", "t/u", "t/n", &leaf] {
            for name in ["f0", "f1", "d0/f0"] {
                if name == "d0/f0" {
                    let mode = self.mode() | 0o111;
                    let (uid, gid) = (*self.rng.pick(OWNER_UIDS), *self.rng.pick(OWNER_GIDS));
                    Gen::fixed_dir(&mut out, &format!("{dir}/d0"), mode, uid, gid);
                }
                let path = format!("{dir}/{name}");
                let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NONBLOCK | libc::O_CLOEXEC;
                let io = Io::Write { off: 0, data: self.data() };
                out.push(Gen::root(Op::Open { path: path.clone(), flags, mode: 0o600, io }));
                let (uid, gid) = (*self.rng.pick(OWNER_UIDS), *self.rng.pick(OWNER_GIDS));
                out.push(Gen::root(Op::Chown { path: path.clone(), uid: Some(uid), gid: Some(gid), follow: false }));
                let mode = self.mode();
                out.push(Gen::root(Op::Chmod { path, mode }));
            }
            out.push(Gen::root(Op::Symlink { target: "f0".into(), path: format!("{dir}/s0") }));
        }
        out
    }

    fn restore(&self) -> Vec<Step> {
        let mut out = Vec::new();
        for (path, mode, uid, gid) in FIXED_DIRS {
            Gen::fixed_dir(&mut out, path, *mode, *uid, *gid);
        }
        Gen::fixed_dir(&mut out, &self.v.deep_leaf, 0o1777, 0, 0);
        out
    }
}

// ---------------------------------------------------------------------------
// The engine.

struct Mismatch {
    kind: String,
    first: String,
    count: u64,
}

struct Run<'a> {
    label: &'a str,
    seed: u64,
    ops: u64,
    test: Side,
    reference: Side,
    max_mismatches: u64,
    mismatches: Vec<Mismatch>,
    total_mismatches: u64,
    history: VecDeque<String>,
    /// Steps not run, by documented reason ([`known_deviation`]).
    deviations: BTreeMap<&'static str, u64>,
}

impl Run<'_> {
    fn replay(&self) -> String {
        format!("EFUSE_PERM_SEED={:#x} EFUSE_PERM_OPS={}", self.seed, self.ops)
    }

    /// Records a mismatch; panics with every kind seen once the budget is used up.
    fn mismatch(&mut self, kind: String, detail: String) {
        self.total_mismatches += 1;
        let mut msg = format!("{detail}\n  recent steps (ext4's results):\n");
        for h in &self.history {
            let _ = writeln!(msg, "    {h}");
        }
        match self.mismatches.iter_mut().find(|m| m.kind == kind) {
            Some(m) => m.count += 1,
            None => self.mismatches.push(Mismatch { kind, first: msg, count: 1 }),
        }
        if self.total_mismatches >= self.max_mismatches {
            self.fail();
        }
    }

    fn fail(&self) -> ! {
        let mut msg = format!(
            "{}: {} MISMATCH(ES) with ext4, {} kind(s) (seed {:#x}; replay with {})\n",
            self.label,
            self.total_mismatches,
            self.mismatches.len(),
            self.seed,
            self.replay()
        );
        for m in &self.mismatches {
            let _ = writeln!(msg, "=== {} ({}x); first:\n{}", m.kind, m.count, m.first);
        }
        panic!("{msg}");
    }

    fn step(&mut self, i: u64, step: &Step, tally: &mut BTreeMap<(&'static str, Who), (u64, u64)>) {
        let paths = touched(&step.op);
        let before = views(&self.reference, &paths);
        if let Some(why) = known_deviation(step, &before) {
            *self.deviations.entry(why).or_default() += 1;
            return;
        }
        let fs = self.test.name.clone();
        let run = |side: &Side| {
            side.run(step).unwrap_or_else(|e| {
                panic!(
                    "{}: step #{i} on {}: {e}\n  step: {}\n  (seed {:#x}; replay with {})",
                    self.label,
                    side.name,
                    step.describe(),
                    self.seed,
                    self.replay()
                )
            })
        };
        let (rt, rr) = (run(&self.test), run(&self.reference));
        let (dt, dr) = (describe_record(&step.op, &rt), describe_record(&step.op, &rr));
        let ok = rr.ncalls > 0 && rr.calls[0].ret >= 0;
        let t = tally.entry((step.op.kind(), step.who)).or_default();
        if ok {
            t.0 += 1;
        } else {
            t.1 += 1;
        }
        self.history.push_back(format!("#{i} {} => {dr}", step.describe()));
        if self.history.len() > 15 {
            self.history.pop_front();
        }
        let (at, ar) = (views(&self.test, &paths), views(&self.reference, &paths));
        let diff = if dt != dr {
            Some(("result".to_string(), "the calls' results (above)".to_string()))
        } else {
            diff_views(&at, &ar, &fs).map(|(k, d)| (format!("after: {}", role(&step.op, &k)), d))
        };
        let Some((part, detail)) = diff else { return };
        let mut msg = format!(
            "{}: MISMATCH at step #{i} (seed {:#x}; replay with {})\n  {}\n  before (ext4):\n",
            self.label,
            self.seed,
            self.replay(),
            step.describe()
        );
        for (k, v) in &before {
            let _ = writeln!(msg, "    {}: {}", short(k), v.text);
        }
        let _ = writeln!(msg, "  {fs}: {dt}\n  ext4: {dr}\n  first difference: {detail}");
        let _ = writeln!(msg, "  after ({fs} | ext4):");
        let mut keys: Vec<&String> = ar.iter().map(|(k, _)| k).collect();
        keys.extend(at.iter().map(|(k, _)| k).filter(|k| !ar.iter().any(|(x, _)| x == *k)));
        for k in keys {
            let text = |list: &[(String, View)]| {
                list.iter().find(|(x, _)| x == k).map_or("(not looked at)".to_string(), |(_, v)| v.text.clone())
            };
            let _ = writeln!(msg, "    {}: {} | {}", short(k), text(&at), text(&ar));
        }
        let kind = format!("{} as {}: {part}", step.op.kind(), step.who.name());
        self.mismatch(kind, msg);
        repair_all(&self.test, &at, &ar);
        // A symlink's target is not a touched path: the whole tree, silently.
        repair_all(&self.test, &tree(&self.test), &tree(&self.reference));
    }

    fn check_tree(&mut self, i: u64) {
        let (a, b) = (tree(&self.test), tree(&self.reference));
        if let Some((_, d)) = diff_views(&a, &b, &self.test.name) {
            let msg = format!(
                "{}: MISMATCH in the whole-tree check after step #{} (seed {:#x}; replay with {})\n  {d}",
                self.label,
                i.saturating_sub(1),
                self.seed,
                self.replay()
            );
            self.mismatch("tree check".into(), msg);
            repair_all(&self.test, &a, &b);
        }
    }
}

/// Which of the step's paths a view key is, for grouping mismatches.
fn role(op: &Op, key: &str) -> &'static str {
    let paths = op.paths();
    let base = key.trim_end_matches(" (followed)");
    let followed = key.ends_with(" (followed)");
    match paths.iter().position(|p| *p == base) {
        Some(0) if followed => "path (followed)",
        Some(0) => "path",
        Some(_) => "second path",
        None => "parent",
    }
}

/// Runs `ops` random steps (after the setup) on `test_root` (the file system
/// under test, shown as `fs`) and `ref_root` (ext4).
#[allow(clippy::too_many_arguments)]
fn run_permissions(
    label: &str,
    fs: &str,
    test_root: &Path,
    ref_root: &Path,
    seed: u64,
    ops: u64,
    max_mismatches: u64,
    progress: &AtomicU64,
) {
    let mut run = Run {
        label,
        seed,
        ops,
        test: Side::open(fs, test_root),
        reference: Side::open("ext4", ref_root),
        max_mismatches: max_mismatches.max(1),
        mismatches: Vec::new(),
        total_mismatches: 0,
        history: VecDeque::new(),
        deviations: BTreeMap::new(),
    };
    let mut gen = Gen { rng: Rng::new(seed), v: Vocab::new(), reference: run.reference.fd.as_raw_fd() };
    let mut tally: BTreeMap<(&'static str, Who), (u64, u64)> = BTreeMap::new();
    let mut queue: VecDeque<Step> = gen.setup().into();
    let mut i = 0u64;
    let mut random = 0u64;
    while random < ops || !queue.is_empty() {
        let step = match queue.pop_front() {
            Some(s) => s,
            None => {
                random += 1;
                if random.is_multiple_of(RESTORE_EVERY) {
                    queue.extend(gen.restore());
                }
                gen.step()
            }
        };
        run.step(i, &step, &mut tally);
        i += 1;
        progress.store(i, Ordering::Relaxed);
        if i.is_multiple_of(FULL_CHECK_EVERY) {
            run.check_tree(i);
        }
    }
    run.check_tree(i);
    if run.total_mismatches > 0 {
        run.fail();
    }
    let mut summary = String::new();
    for ((kind, who), (ok, err)) in &tally {
        let _ = write!(summary, " {kind}/{} {ok}/{err},", who.name());
    }
    println!("{label}: {i} steps identical to ext4 (seed {seed:#x}); ok/err per op and caller:{summary}");
    for (why, n) in &run.deviations {
        println!("{label}: {n} step(s) not run, a documented difference: {why}");
    }
}

/// Both roots open to everyone, every ancestor searchable, as the children need.
fn prepare_roots(roots: &[&Path]) {
    for root in roots {
        let c = CString::new(root.as_os_str().as_bytes()).expect("no NUL in temp paths");
        // SAFETY: valid C string.
        let ok = unsafe { libc::chown(c.as_ptr(), 0, 0) == 0 && libc::chmod(c.as_ptr(), 0o755) == 0 };
        assert!(ok, "chown/chmod {}: {}", root.display(), errno_name(errno()));
        for dir in root.ancestors().skip(1) {
            let md = std::fs::metadata(dir).unwrap_or_else(|e| panic!("stat {}: {e}", dir.display()));
            let mode = std::os::unix::fs::PermissionsExt::mode(&md.permissions());
            assert!(
                mode & 0o001 != 0,
                "{} (mode {mode:o}) is not searchable by others: the unprivileged callers cannot reach {}",
                dir.display(),
                root.display()
            );
        }
    }
}

fn run_watched(label: &str, fs: &str, test_root: &Path, ref_root: &Path) {
    let seed = env_u64("EFUSE_PERM_SEED", DEFAULT_SEED);
    let ops = env_u64("EFUSE_PERM_OPS", DEFAULT_OPS);
    let max = env_u64("EFUSE_PERM_MISMATCHES", 1);
    println!("{label}: seed {seed:#x}, {ops} steps");
    let (l, f, t, r) = (label.to_string(), fs.to_string(), test_root.to_path_buf(), ref_root.to_path_buf());
    watch_progress(label, STALL, &format!("seed {seed:#x}"), move |p| {
        run_permissions(&l, &f, &t, &r, seed, ops, max, p)
    });
}

fn permissions_on(fs: Fs, test: &str) {
    if !require_fuse(test) {
        return;
    }
    let spec = MountSpec::default().arg("-o").arg("allow_other,default_permissions").umask(DAEMON_UMASK);
    let m = Mounted::with(fs, test, spec, |_| {});
    let mut roots = vec![m.root.as_path(), m.mnt.as_path(), m.reference.as_path()];
    roots.extend(m.backing.as_deref());
    prepare_roots(&roots);
    run_watched(test, fs.name(), &m.mnt, &m.reference);
}

#[test]
fn memfs_permissions_match_ext4() {
    permissions_on(Fs::Memfs, "memfs_permissions_match_ext4");
}

#[test]
fn stackfs_permissions_match_ext4() {
    permissions_on(Fs::Stackfs, "stackfs_permissions_match_ext4");
}

/// Two ext4 directories: the engine itself must see no difference (nothing
/// compared may depend on timing, descriptors or which side runs first).
#[test]
fn engine_self_test_ext4_vs_ext4_agree() {
    let test = "engine_self_test_ext4_vs_ext4_agree";
    if !require_root(test) {
        return;
    }
    let root = common::TempDir::new("perm-selftest");
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    std::fs::create_dir_all(&a).expect("mkdir a");
    std::fs::create_dir_all(&b).expect("mkdir b");
    prepare_roots(&[root.path(), &a, &b]);
    let progress = AtomicU64::new(0);
    run_permissions(test, "ext4-a", &a, &b, DEFAULT_SEED, 800, 1, &progress);
}

/// The engine must notice a permission difference: a file that both sides
/// have, owned by nobody on one and by the member on the other.
#[test]
fn engine_self_test_detects_divergence() {
    let test = "engine_self_test_detects_divergence";
    if !require_root(test) {
        return;
    }
    let root = common::TempDir::new("perm-divergence");
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    for (side, uid) in [(&a, 65534), (&b, 4001)] {
        let pub_dir = side.join(WORK).join("pub");
        std::fs::create_dir_all(&pub_dir).expect("mkdir t/pub");
        std::fs::write(pub_dir.join("f1"), b"same bytes").expect("create t/pub/f1");
        std::os::unix::fs::chown(pub_dir.join("f1"), Some(uid), Some(0)).expect("chown t/pub/f1");
    }
    prepare_roots(&[root.path(), &a, &b]);
    let progress = AtomicU64::new(0);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_permissions("divergence", "ext4-a", &a, &b, DEFAULT_SEED, 300, 1, &progress)
    }));
    let msg = match r {
        Ok(()) => panic!("the engine did not notice a file owned by someone else on one side"),
        Err(p) => p.downcast_ref::<String>().cloned().unwrap_or_default(),
    };
    assert!(msg.contains("MISMATCH") && msg.contains("seed"), "mismatch report lacks step or seed: {msg}");
    assert!(msg.contains("65534:0") && msg.contains("4001:0"), "mismatch report lacks both sides' owners: {msg}");
}

/// The child really runs with the step's credentials and umask, and a child
/// that blocks is killed and reported instead of hanging the test.
#[test]
fn engine_self_test_child_credentials_umask_and_timeout() {
    let test = "engine_self_test_child_credentials_umask_and_timeout";
    if !require_root(test) {
        return;
    }
    let root = common::TempDir::new("perm-child");
    prepare_roots(&[root.path()]);
    let dir = root.path();
    std::fs::write(dir.join("g4002"), b"x").expect("create g4002");
    std::os::unix::fs::chown(dir.join("g4002"), Some(0), Some(4002)).expect("chown g4002");
    std::fs::set_permissions(dir.join("g4002"), std::os::unix::fs::PermissionsExt::from_mode(0o060))
        .expect("chmod g4002");
    let c = CString::new(dir.as_os_str().as_bytes()).expect("no NUL");
    let run = |who: Who, umask: u32, op: Op| {
        let step = Step { who, umask, op };
        describe_record(&step.op, &run_in_child(&c, &step, STEP_TIMEOUT).expect("child runs"))
    };
    let access = || Op::Access { path: "g4002".into(), mode: libc::R_OK | libc::W_OK };
    // Group access through a supplementary group only.
    assert_eq!(run(Who::Member, 0, access()), "access ok");
    assert_eq!(run(Who::Nobody, 0, access()), "access err EACCES");
    assert_eq!(run(Who::Root, 0, access()), "access ok");
    // Owner, group and umask of a new file, seen by fstat on the new descriptor.
    let create = |path: &str| Op::Open {
        path: path.into(),
        flags: libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NONBLOCK,
        mode: 0o777,
        io: Io::None,
    };
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod dir");
    assert_eq!(run(Who::Member, 0o027, create("m")), "open ok [fstat file 0750 4001:4001 size=0 nlink=1]");
    assert_eq!(run(Who::Nobody, 0o000, create("n")), "open ok [fstat file 0777 65534:65534 size=0 nlink=1]");
    // A fifo opened for reading without O_NONBLOCK blocks: killed, reported.
    let fifo = CString::new(dir.join("fifo").as_os_str().as_bytes()).expect("no NUL");
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) }, 0, "mkfifo: {}", errno_name(errno()));
    let step = Step {
        who: Who::Nobody,
        umask: 0,
        op: Op::Open { path: "fifo".into(), flags: libc::O_RDONLY, mode: 0, io: Io::None },
    };
    let start = Instant::now();
    let err = run_in_child(&c, &step, Duration::from_secs(1)).err().expect("a blocked child is an error");
    assert!(err.contains("timed out") && err.contains("signal 9"), "unexpected report: {err}");
    assert!(start.elapsed() < Duration::from_secs(8), "the blocked child took {:?} to be dealt with", start.elapsed());
}

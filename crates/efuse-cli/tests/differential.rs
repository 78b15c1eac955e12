//! Differential random-operation test in the spirit of fsx: a seeded PRNG
//! generates thousands of file system operations, each applied through libc
//! to an efuse mount and to a plain ext4 directory. After every step the
//! return values and errno must be identical; periodically and at the end the
//! two trees (names, types, modes, sizes, link counts, symlink targets,
//! contents) must be identical too.
//!
//! `EFUSE_FSX_SEED` picks the seed (decimal or 0x-hex; default fixed) and
//! `EFUSE_FSX_OPS` the number of operations (default 3000; long runs on
//! demand, e.g. 200000). A mismatch prints the seed, the op index and the
//! recent history so the run can be replayed.
//!
//! Not compared, because they legitimately differ: st_blocks, inode numbers,
//! timestamps, directory sizes and link counts, and readdir order (sorted).

mod common;

use std::collections::VecDeque;
use std::ffi::CString;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{env_u64, errno, errno_name, first_difference, require_fuse, watch_progress, Fs, Mounted, Rng};

const DEFAULT_SEED: u64 = 0x5EED_F00D_2024;
const DEFAULT_OPS: u64 = 3000;
const SLOTS: usize = 8;
const CHECK_EVERY: u64 = 500;
/// A step that makes no progress for this long fails the test.
const STALL: Duration = Duration::from_secs(60);
/// Bound for the whole engine run in a child process (the bypass suite).
const BYPASS_CHILD: Duration = Duration::from_secs(600);

const PARENTS: &[&str] = &["", "", "d0/", "d1/", "d0/e0/", "d1/e1/", "d2/"];
const NAMES: &[&str] = &["f0", "f1", "f2", "f3", "d0", "d1", "d2", "e0", "e1", "s0"];
const SYMLINK_TARGETS: &[&str] = &["f0", "f1", "../f1", "d0", "e0/f0", "../d1/f2", "nonexistent", "s0", "."];
const FILE_MODES: &[u32] = &[0o644, 0o600, 0o755, 0o700, 0o444, 0o000, 0o777, 0o640];
const DIR_MODES: &[u32] = &[0o755, 0o700, 0o777, 0o750];

#[derive(Clone, Debug)]
enum Op {
    Open { slot: usize, path: String, flags: i32, mode: u32 },
    Close { slot: usize },
    Write { slot: usize, len: usize },
    Pwrite { slot: usize, off: i64, len: usize },
    Read { slot: usize, len: usize },
    Pread { slot: usize, off: i64, len: usize },
    Lseek { slot: usize, off: i64, whence: i32 },
    Ftruncate { slot: usize, len: i64 },
    Truncate { path: String, len: i64 },
    Rename { from: String, to: String },
    Link { from: String, to: String },
    Unlink { path: String },
    Mkdir { path: String, mode: u32 },
    Rmdir { path: String },
    Symlink { target: String, path: String },
    Readlink { path: String },
    Chmod { path: String, mode: u32 },
    Fallocate { slot: usize, mode: i32, off: i64, len: i64 },
    Fsync { slot: usize, data_only: bool },
    Stat { path: String, follow: bool },
    Fstat { slot: usize },
    Readdir { path: String },
}

#[derive(Clone, Copy)]
struct SlotInfo {
    is_dir: bool,
}

/// One side: a root directory and its table of open descriptors.
struct Side {
    root: PathBuf,
    fds: [i32; SLOTS],
}

impl Side {
    fn new(root: &Path) -> Side {
        Side { root: root.to_path_buf(), fds: [-1; SLOTS] }
    }

    fn c(&self, rel: &str) -> CString {
        CString::new(self.root.join(rel).as_os_str().as_bytes()).expect("no NUL in test paths")
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        for fd in &mut self.fds {
            if *fd >= 0 {
                // SAFETY: closing a descriptor this side opened and still owns.
                unsafe { libc::close(*fd) };
                *fd = -1;
            }
        }
    }
}

/// What one side returned for one op. `data` holds bytes read, compared exactly.
#[derive(PartialEq, Debug)]
struct Outcome {
    text: String,
    data: Option<Vec<u8>>,
}

impl Outcome {
    fn of(text: String) -> Outcome {
        Outcome { text, data: None }
    }
}

/// Turns a libc return value into text; `ok` formats the success value.
fn ret(r: i64, ok: impl FnOnce(i64) -> String) -> String {
    if r < 0 {
        format!("err {}", errno_name(errno()))
    } else {
        ok(r)
    }
}

fn describe_stat(st: &libc::stat) -> String {
    let fmt = st.st_mode & libc::S_IFMT;
    let ty = match fmt {
        libc::S_IFREG => "file",
        libc::S_IFDIR => "dir",
        libc::S_IFLNK => "symlink",
        _ => "other",
    };
    let perm = st.st_mode & 0o7777;
    if fmt == libc::S_IFDIR {
        // Directory size and link count are file-system specific.
        format!("{ty} mode={perm:o}")
    } else {
        format!("{ty} mode={perm:o} size={} nlink={}", st.st_size, st.st_nlink)
    }
}

/// Applies `op` to one side and reports what happened.
fn apply(side: &mut Side, op: &Op, buf: &[u8]) -> Outcome {
    // SAFETY (whole function): every call gets valid NUL-terminated paths that
    // live across the call, buffers at least as long as the lengths passed, and
    // descriptors from this side's own table (or -1, which the kernel rejects).
    unsafe {
        match op {
            Op::Open { slot, path, flags, mode } => {
                let fd = libc::open(side.c(path).as_ptr(), *flags | libc::O_CLOEXEC, *mode);
                if fd < 0 {
                    return Outcome::of(format!("err {}", errno_name(errno())));
                }
                side.fds[*slot] = fd;
                let mut st: libc::stat = std::mem::zeroed();
                let r = libc::fstat(fd, &mut st);
                Outcome::of(ret(r as i64, |_| format!("fd {}", describe_stat(&st))))
            }
            Op::Close { slot } => {
                let r = libc::close(side.fds[*slot]);
                side.fds[*slot] = -1;
                Outcome::of(ret(r as i64, |_| "ok".into()))
            }
            Op::Write { slot, len } => {
                let r = libc::write(side.fds[*slot], buf.as_ptr().cast(), *len);
                Outcome::of(ret(r as i64, |n| format!("wrote {n}")))
            }
            Op::Pwrite { slot, off, len } => {
                let r = libc::pwrite(side.fds[*slot], buf.as_ptr().cast(), *len, *off);
                Outcome::of(ret(r as i64, |n| format!("wrote {n}")))
            }
            Op::Read { slot, len } | Op::Pread { slot, len, .. } => {
                let mut data = vec![0u8; *len];
                let r = match op {
                    Op::Pread { off, .. } => libc::pread(side.fds[*slot], data.as_mut_ptr().cast(), *len, *off),
                    _ => libc::read(side.fds[*slot], data.as_mut_ptr().cast(), *len),
                };
                if r < 0 {
                    return Outcome::of(format!("err {}", errno_name(errno())));
                }
                data.truncate(r as usize);
                Outcome { text: format!("read {r}"), data: Some(data) }
            }
            Op::Lseek { slot, off, whence } => {
                let r = libc::lseek(side.fds[*slot], *off, *whence);
                Outcome::of(ret(r, |n| format!("pos {n}")))
            }
            Op::Ftruncate { slot, len } => {
                Outcome::of(ret(libc::ftruncate(side.fds[*slot], *len) as i64, |_| "ok".into()))
            }
            Op::Truncate { path, len } => {
                Outcome::of(ret(libc::truncate(side.c(path).as_ptr(), *len) as i64, |_| "ok".into()))
            }
            Op::Rename { from, to } => {
                let r = libc::rename(side.c(from).as_ptr(), side.c(to).as_ptr());
                Outcome::of(ret(r as i64, |_| "ok".into()).replace("EEXIST", "ENOTEMPTY"))
            }
            Op::Link { from, to } => {
                Outcome::of(ret(libc::link(side.c(from).as_ptr(), side.c(to).as_ptr()) as i64, |_| "ok".into()))
            }
            Op::Unlink { path } => Outcome::of(ret(libc::unlink(side.c(path).as_ptr()) as i64, |_| "ok".into())),
            Op::Mkdir { path, mode } => {
                Outcome::of(ret(libc::mkdir(side.c(path).as_ptr(), *mode) as i64, |_| "ok".into()))
            }
            Op::Rmdir { path } => {
                // POSIX allows EEXIST or ENOTEMPTY for a non-empty directory.
                let r = libc::rmdir(side.c(path).as_ptr());
                Outcome::of(ret(r as i64, |_| "ok".into()).replace("EEXIST", "ENOTEMPTY"))
            }
            Op::Symlink { target, path } => {
                let t = CString::new(target.as_str()).expect("no NUL");
                Outcome::of(ret(libc::symlink(t.as_ptr(), side.c(path).as_ptr()) as i64, |_| "ok".into()))
            }
            Op::Readlink { path } => {
                let mut b = [0u8; 4096];
                let r = libc::readlink(side.c(path).as_ptr(), b.as_mut_ptr().cast(), b.len());
                Outcome::of(ret(r as i64, |n| format!("-> {}", String::from_utf8_lossy(&b[..n as usize]))))
            }
            Op::Chmod { path, mode } => {
                Outcome::of(ret(libc::chmod(side.c(path).as_ptr(), *mode) as i64, |_| "ok".into()))
            }
            Op::Fallocate { slot, mode, off, len } => {
                Outcome::of(ret(libc::fallocate(side.fds[*slot], *mode, *off, *len) as i64, |_| "ok".into()))
            }
            Op::Fsync { slot, data_only } => {
                let fd = side.fds[*slot];
                let r = if *data_only { libc::fdatasync(fd) } else { libc::fsync(fd) };
                Outcome::of(ret(r as i64, |_| "ok".into()))
            }
            Op::Stat { path, follow } => {
                let mut st: libc::stat = std::mem::zeroed();
                let p = side.c(path);
                let r = if *follow { libc::stat(p.as_ptr(), &mut st) } else { libc::lstat(p.as_ptr(), &mut st) };
                Outcome::of(ret(r as i64, |_| describe_stat(&st)))
            }
            Op::Fstat { slot } => {
                let mut st: libc::stat = std::mem::zeroed();
                let r = libc::fstat(side.fds[*slot], &mut st);
                Outcome::of(ret(r as i64, |_| describe_stat(&st)))
            }
            Op::Readdir { path } => Outcome::of(match fs::read_dir(side.root.join(path)) {
                Ok(rd) => {
                    let mut names: Vec<String> = Vec::new();
                    for e in rd {
                        match e {
                            Ok(e) => names.push(e.file_name().to_string_lossy().into_owned()),
                            Err(e) => names.push(format!("<readdir error {e}>")),
                        }
                    }
                    names.sort();
                    format!("entries [{}]", names.join(" "))
                }
                Err(e) => format!("err {}", errno_name(e.raw_os_error().unwrap_or(0))),
            }),
        }
    }
}

fn any_path(rng: &mut Rng) -> String {
    format!("{}{}", rng.pick(PARENTS), rng.pick(NAMES))
}

fn size_like(rng: &mut Rng) -> i64 {
    match rng.below(10) {
        0..=5 => rng.below(256 * 1024) as i64,
        6 | 7 => (rng.below(512) * 4096) as i64,
        8 => rng.below(8192) as i64,
        _ => rng.below(2 * 1024 * 1024) as i64,
    }
}

fn len_like(rng: &mut Rng) -> usize {
    match rng.below(10) {
        0..=4 => 1 + rng.below(4096) as usize,
        5..=7 => 1 + rng.below(64 * 1024) as usize,
        8 => 4096 * (1 + rng.below(16) as usize),
        _ => 1 + rng.below(256 * 1024) as usize,
    }
}

/// Picks the next operation given which slots are open.
fn generate(rng: &mut Rng, slots: &[Option<SlotInfo>; SLOTS]) -> Op {
    let open: Vec<usize> = (0..SLOTS).filter(|&i| slots[i].is_some()).collect();
    let free: Vec<usize> = (0..SLOTS).filter(|&i| slots[i].is_none()).collect();
    let roll = rng.below(100);
    // Descriptor ops need an open slot; otherwise open one.
    if roll < 55 && !open.is_empty() {
        let slot = *rng.pick(&open);
        let is_dir = slots[slot].map(|s| s.is_dir).unwrap_or(false);
        return match rng.below(100) {
            0..=19 => Op::Write { slot, len: len_like(rng) },
            20..=37 => Op::Pwrite { slot, off: size_like(rng), len: len_like(rng) },
            38..=47 => Op::Read { slot, len: len_like(rng) },
            48..=59 => Op::Pread { slot, off: size_like(rng), len: len_like(rng) },
            60..=65 if !is_dir => {
                let whence = *rng.pick(&[libc::SEEK_SET, libc::SEEK_CUR, libc::SEEK_END]);
                let off = if whence == libc::SEEK_SET { size_like(rng) } else { size_like(rng) / 4 - 32 * 1024 };
                Op::Lseek { slot, off, whence }
            }
            66..=72 => Op::Ftruncate { slot, len: size_like(rng) },
            73..=81 => {
                let mode =
                    *rng.pick(&[0, libc::FALLOC_FL_KEEP_SIZE, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE]);
                Op::Fallocate { slot, mode, off: size_like(rng), len: 1 + rng.below(128 * 1024) as i64 }
            }
            82..=85 => Op::Fsync { slot, data_only: rng.chance(50) },
            86..=90 => Op::Fstat { slot },
            _ => Op::Close { slot },
        };
    }
    match roll {
        0..=69 => {
            let Some(&slot) = free.first() else {
                return Op::Close { slot: *rng.pick(&open) };
            };
            let acc = *rng.pick(&[libc::O_RDONLY, libc::O_WRONLY, libc::O_RDWR, libc::O_RDWR]);
            let mut flags = acc;
            if rng.chance(60) {
                flags |= libc::O_CREAT;
            }
            if rng.chance(10) {
                flags |= libc::O_EXCL;
            }
            if rng.chance(12) {
                flags |= libc::O_TRUNC;
            }
            if rng.chance(15) {
                flags |= libc::O_APPEND;
            }
            Op::Open { slot, path: any_path(rng), flags, mode: *rng.pick(FILE_MODES) | 0o600 }
        }
        70..=73 => Op::Rename { from: any_path(rng), to: any_path(rng) },
        74..=76 => Op::Link { from: any_path(rng), to: any_path(rng) },
        77..=80 => Op::Unlink { path: any_path(rng) },
        81..=84 => Op::Mkdir { path: any_path(rng), mode: *rng.pick(DIR_MODES) },
        85..=86 => Op::Rmdir { path: any_path(rng) },
        87..=88 => Op::Symlink { target: rng.pick(SYMLINK_TARGETS).to_string(), path: any_path(rng) },
        89 => Op::Readlink { path: any_path(rng) },
        90..=91 => {
            let mode = if rng.chance(50) { *rng.pick(FILE_MODES) } else { *rng.pick(DIR_MODES) };
            Op::Chmod { path: any_path(rng), mode }
        }
        92..=93 => Op::Truncate { path: any_path(rng), len: size_like(rng) },
        94..=96 => Op::Stat { path: any_path(rng), follow: rng.chance(50) },
        _ => Op::Readdir { path: rng.pick(&["", "d0", "d1", "d0/e0", "d1/e1", "d2"]).to_string() },
    }
}

/// Where two trees first differ, or None when they are the same.
fn compare_trees(a: &Path, b: &Path) -> Option<String> {
    // Errors become part of the listing: both sides must fail alike (as a
    // non-root run does on mode 000 entries), and a one-sided error shows up.
    fn walk(root: &Path, rel: &Path, out: &mut Vec<(String, String, Option<Vec<u8>>)>) {
        let dir = root.join(rel);
        let names: std::io::Result<Vec<_>> =
            fs::read_dir(&dir).and_then(|rd| rd.map(|e| e.map(|e| e.file_name())).collect());
        let mut names = match names {
            Ok(n) => n,
            Err(e) => {
                out.push((
                    format!("{}/", rel.display()),
                    format!("readdir error {}", errno_name(e.raw_os_error().unwrap_or(0))),
                    None,
                ));
                return;
            }
        };
        names.sort();
        for n in names {
            let r = rel.join(&n);
            let p = root.join(&r);
            let key = r.display().to_string();
            let md = match fs::symlink_metadata(&p) {
                Ok(md) => md,
                Err(e) => {
                    out.push((key, format!("lstat error {}", errno_name(e.raw_os_error().unwrap_or(0))), None));
                    continue;
                }
            };
            let perm = md.mode() & 0o7777;
            let ft = md.file_type();
            if ft.is_dir() {
                out.push((key, format!("dir mode={perm:o}"), None));
                walk(root, &r, out);
            } else if ft.is_symlink() {
                let t = fs::read_link(&p).map(|t| t.display().to_string()).unwrap_or_else(|e| format!("<{e}>"));
                out.push((key, format!("symlink -> {t} nlink={}", md.nlink()), None));
            } else if ft.is_file() {
                let desc = format!("file mode={perm:o} size={} nlink={}", md.len(), md.nlink());
                match fs::read(&p) {
                    Ok(data) => out.push((key, format!("{desc} read={}", data.len()), Some(data))),
                    Err(e) => out.push((
                        key,
                        format!("{desc} read error {}", errno_name(e.raw_os_error().unwrap_or(0))),
                        None,
                    )),
                }
            } else {
                out.push((key, format!("other fifo={} mode={perm:o}", ft.is_fifo()), None));
            }
        }
    }
    let (mut ea, mut eb) = (Vec::new(), Vec::new());
    walk(a, Path::new(""), &mut ea);
    walk(b, Path::new(""), &mut eb);
    let names_a: Vec<&str> = ea.iter().map(|e| e.0.as_str()).collect();
    let names_b: Vec<&str> = eb.iter().map(|e| e.0.as_str()).collect();
    if names_a != names_b {
        return Some(format!("tree listings differ:\n  test: {names_a:?}\n  ext4: {names_b:?}"));
    }
    for (x, y) in ea.iter().zip(&eb) {
        if x.1 != y.1 {
            return Some(format!("{}: test has {}, ext4 has {}", x.0, x.1, y.1));
        }
        if let (Some(dx), Some(dy)) = (&x.2, &y.2) {
            if dx != dy {
                return Some(format!("{}: contents differ: {}", x.0, first_difference(dx, dy)));
            }
        }
    }
    None
}

fn op_kind(op: &Op) -> &'static str {
    match op {
        Op::Open { .. } => "open",
        Op::Close { .. } => "close",
        Op::Write { .. } => "write",
        Op::Pwrite { .. } => "pwrite",
        Op::Read { .. } => "read",
        Op::Pread { .. } => "pread",
        Op::Lseek { .. } => "lseek",
        Op::Ftruncate { .. } => "ftruncate",
        Op::Truncate { .. } => "truncate",
        Op::Rename { .. } => "rename",
        Op::Link { .. } => "link",
        Op::Unlink { .. } => "unlink",
        Op::Mkdir { .. } => "mkdir",
        Op::Rmdir { .. } => "rmdir",
        Op::Symlink { .. } => "symlink",
        Op::Readlink { .. } => "readlink",
        Op::Chmod { .. } => "chmod",
        Op::Fallocate { .. } => "fallocate",
        Op::Fsync { .. } => "fsync",
        Op::Stat { .. } => "stat",
        Op::Fstat { .. } => "fstat",
        Op::Readdir { .. } => "readdir",
    }
}

fn describe_op(op: &Op) -> String {
    match op {
        Op::Open { slot, path, flags, mode } => {
            let mut f = match flags & libc::O_ACCMODE {
                libc::O_RDONLY => "O_RDONLY".to_string(),
                libc::O_WRONLY => "O_WRONLY".to_string(),
                _ => "O_RDWR".to_string(),
            };
            for (bit, name) in [
                (libc::O_CREAT, "O_CREAT"),
                (libc::O_EXCL, "O_EXCL"),
                (libc::O_TRUNC, "O_TRUNC"),
                (libc::O_APPEND, "O_APPEND"),
            ] {
                if flags & bit != 0 {
                    f += "|";
                    f += name;
                }
            }
            format!("open({path:?}, {f}, {mode:o}) -> slot {slot}")
        }
        Op::Fallocate { slot, mode, off, len } => {
            let m = match *mode {
                0 => "0",
                libc::FALLOC_FL_KEEP_SIZE => "KEEP_SIZE",
                _ => "PUNCH_HOLE|KEEP_SIZE",
            };
            format!("fallocate(slot {slot}, {m}, off {off}, len {len})")
        }
        other => format!("{other:?}"),
    }
}

/// Runs `ops` seeded operations on `test_root` (the file system under test)
/// and `ref_root` (ext4). Panics with seed, op index and history on the first
/// difference. `progress` counts completed ops for the caller's watchdog.
fn run_differential(label: &str, test_root: &Path, ref_root: &Path, seed: u64, ops: u64, progress: &AtomicU64) {
    // Work one level down: symlink targets like "../f1" then resolve inside
    // each side's own directory, never to a file the two sides share.
    let (test_root, ref_root) = (&test_root.join("fsx"), &ref_root.join("fsx"));
    for d in [test_root, ref_root] {
        if let Err(e) = fs::create_dir_all(d) {
            panic!("{label}: mkdir {}: {e}", d.display());
        }
    }
    let mut rng = Rng::new(seed);
    let mut a = Side::new(test_root);
    let mut b = Side::new(ref_root);
    let mut slots: [Option<SlotInfo>; SLOTS] = [None; SLOTS];
    let mut history: VecDeque<String> = VecDeque::new();
    let replay = format!("EFUSE_FSX_SEED={seed:#x} EFUSE_FSX_OPS={ops}");
    let fail = |i: u64, what: String, history: &VecDeque<String>| -> ! {
        let mut msg =
            format!("{label}: MISMATCH at op #{i} (seed {seed:#x}; replay with {replay})\n{what}\nrecent ops:\n");
        for h in history {
            let _ = writeln!(msg, "  {h}");
        }
        panic!("{msg}");
    };
    // A few directories first so most generated paths have a parent.
    let setup = [
        Op::Mkdir { path: "d0".into(), mode: 0o755 },
        Op::Mkdir { path: "d1".into(), mode: 0o755 },
        Op::Mkdir { path: "d0/e0".into(), mode: 0o755 },
    ];
    let mut tally: std::collections::BTreeMap<&'static str, (u64, u64)> = Default::default();
    let mut i = 0u64;
    let mut next_check = CHECK_EVERY;
    let mut queue: VecDeque<Op> = setup.into_iter().collect();
    while i < ops || !queue.is_empty() {
        let op = queue.pop_front().unwrap_or_else(|| generate(&mut rng, &slots));
        let buf = match &op {
            Op::Write { len, .. } | Op::Pwrite { len, .. } => rng.bytes(*len),
            _ => Vec::new(),
        };
        let ra = apply(&mut a, &op, &buf);
        let rb = apply(&mut b, &op, &buf);
        let line = format!("#{i} {} => {}", describe_op(&op), ra.text);
        history.push_back(line);
        if history.len() > 40 {
            history.pop_front();
        }
        if ra.text != rb.text {
            fail(
                i,
                format!("{}\n  {label} returned: {}\n  ext4 returned: {}", describe_op(&op), ra.text, rb.text),
                &history,
            );
        }
        if ra.data != rb.data {
            let (da, db) = (ra.data.unwrap_or_default(), rb.data.unwrap_or_default());
            fail(i, format!("{}: data read differs: {}", describe_op(&op), first_difference(&da, &db)), &history);
        }
        let kind = op_kind(&op);
        let entry = tally.entry(kind).or_default();
        if ra.text.starts_with("err") {
            entry.1 += 1;
        } else {
            entry.0 += 1;
        }
        match &op {
            Op::Open { slot, .. } if a.fds[*slot] >= 0 => {
                slots[*slot] = Some(SlotInfo { is_dir: ra.text.starts_with("fd dir") });
            }
            Op::Close { slot } => slots[*slot] = None,
            _ => {}
        }
        i += 1;
        progress.store(i, Ordering::Relaxed);
        if i == next_check || i == ops {
            next_check += CHECK_EVERY;
            if let Some(d) = compare_trees(test_root, ref_root) {
                fail(i, format!("tree check after op #{}: {d}", i - 1), &history);
            }
        }
    }
    // Close everything on both sides, then the final check sees flushed state.
    for (slot, info) in slots.iter().enumerate() {
        if info.is_some() {
            let op = Op::Close { slot };
            let (ra, rb) = (apply(&mut a, &op, &[]), apply(&mut b, &op, &[]));
            if ra != rb {
                fail(i, format!("final close of slot {slot}: {} vs {}", ra.text, rb.text), &history);
            }
        }
    }
    if let Some(d) = compare_trees(test_root, ref_root) {
        fail(i, format!("final tree check: {d}"), &history);
    }
    let summary: Vec<String> = tally.iter().map(|(k, (ok, err))| format!("{k} {ok}/{err}")).collect();
    println!("{label}: {i} ops identical to ext4 (seed {seed:#x}); ok/err per op: {}", summary.join(", "));
}

/// Runs the differential engine under the harness's stall watchdog.
fn run_watched(label: &str, test_root: &Path, ref_root: &Path) {
    let seed = env_u64("EFUSE_FSX_SEED", DEFAULT_SEED);
    let ops = env_u64("EFUSE_FSX_OPS", DEFAULT_OPS);
    println!("{label}: seed {seed:#x}, {ops} ops");
    let (l, t, r) = (label.to_string(), test_root.to_path_buf(), ref_root.to_path_buf());
    watch_progress(label, STALL, &format!("seed {seed:#x}"), move |p| run_differential(&l, &t, &r, seed, ops, p));
}

fn differential_on(fs_kind: Fs, test: &str) {
    if let Some((test_dir, ref_dir)) = common::bypass_child_dirs() {
        // The bypass suite's child (below): the parent mounted.
        run_watched(test, &test_dir, &ref_dir);
        return;
    }
    if !require_fuse(test) {
        return;
    }
    let m = Mounted::new(fs_kind, test);
    if common::bypass_suite() {
        // The engine's own libc calls must go through the client library:
        // run it in this binary again, started under `efuse run`.
        let module = module_path!().split_once("::").map_or("", |(_, m)| m);
        let out = common::run_self_under_bypass(&format!("{module}::{test}"), &m.mnt, &m.reference, BYPASS_CHILD);
        print!("{}", out.stdout);
        return;
    }
    run_watched(test, &m.mnt, &m.reference);
}

#[test]
fn memfs_differential_random_ops_match_ext4() {
    differential_on(Fs::Memfs, "memfs_differential_random_ops_match_ext4");
}

#[test]
fn stackfs_differential_random_ops_match_ext4() {
    differential_on(Fs::Stackfs, "stackfs_differential_random_ops_match_ext4");
}

/// The engine itself: ext4 against ext4 must agree on every op (no root needed).
#[test]
fn engine_self_test_ext4_vs_ext4_agree() {
    let root = common::TempDir::new("fsx-selftest");
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    run_watched("engine_self_test_ext4_vs_ext4_agree", &a, &b);
}

/// The engine must notice a divergence: one side starts with a stray file.
#[test]
fn engine_self_test_detects_divergence() {
    let root = common::TempDir::new("fsx-divergence");
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    fs::create_dir(a.join("fsx")).unwrap();
    fs::write(a.join("fsx/f0"), b"only on one side").unwrap();
    let progress = AtomicU64::new(0);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_differential("divergence", &a, &b, DEFAULT_SEED, 600, &progress)
    }));
    let msg = match r {
        Ok(()) => panic!("the engine did not notice a stray file on one side"),
        Err(p) => p.downcast_ref::<String>().cloned().unwrap_or_default(),
    };
    assert!(msg.contains("MISMATCH at op #") && msg.contains("seed"), "mismatch report lacks op index or seed: {msg}");
}

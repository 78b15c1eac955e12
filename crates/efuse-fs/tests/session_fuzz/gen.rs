//! The request generator: well-formed requests of every opcode, aimed at the
//! node ids and file handles the session handed out earlier (learned from its
//! replies) as well as at random ones, with odd names, sizes and flags; and
//! mutations of them (bit flips, truncation, trailing garbage, a header
//! length that disagrees with the buffer, unknown opcodes, bad extension
//! lengths, replays), delivered contiguous or split as a ring entry carries
//! them. The stream is a function of the seed and the replies.

use std::collections::{HashMap, VecDeque};

use efuse::abi::consts::{ext, init, release, write, FSYNC_FDATASYNC, GETATTR_FH, LK_FLOCK, OPEN_KILL_SUIDGID};
use efuse::abi::structs as abi;
use efuse::abi::{Opcode, ROOT_ID};
use zerocopy::IntoBytes;

use crate::wire::Wire;

/// SplitMix64: small, fast, and plenty for driving a fuzzer.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    pub fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    /// One of `items`, which must not be empty.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    fn index<T>(&mut self, q: &VecDeque<T>) -> Option<usize> {
        (!q.is_empty()).then(|| self.below(q.len() as u64) as usize)
    }
}

/// What a reply taught the generator.
pub enum Fact {
    /// An entry (LOOKUP, MKNOD, ..., CREATE, READDIRPLUS): one more lookup of its node.
    Entry(abi::EntryOut),
    /// A file handle from OPEN or CREATE, on `nodeid`.
    OpenFile { fh: u64, nodeid: u64 },
    /// A directory handle from OPENDIR.
    OpenDir { fh: u64, nodeid: u64 },
    /// A READDIR(PLUS) cookie.
    Cookie(u64),
}

/// How a request was made, for the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum How {
    WellFormed,
    BitFlip,
    Truncated,
    Extended,
    BadLength,
    UnknownOpcode,
    BadExtension,
    Overwritten,
    Replay,
    Garbage,
}

/// How many of each remembered thing to keep.
const KEEP: usize = 512;
/// Well-formed requests kept for replays and mutations.
const HISTORY: usize = 64;

fn remember<T>(q: &mut VecDeque<T>, v: T, cap: usize) {
    if q.len() == cap {
        q.pop_front();
    }
    q.push_back(v);
}

/// What the session handed out, as far as the generator knows.
#[derive(Default)]
struct Known {
    /// Every node id a reply named.
    nodes: VecDeque<u64>,
    dirs: VecDeque<u64>,
    files: VecDeque<u64>,
    /// Lookups the replies gave and no FORGET took back, by node id.
    lookups: HashMap<u64, u64>,
    /// (fh, nodeid) of open files and directories.
    open_files: VecDeque<(u64, u64)>,
    open_dirs: VecDeque<(u64, u64)>,
    cookies: VecDeque<u64>,
    /// Uniques recently sent, and those of SETLKW requests: INTERRUPT targets.
    recent: VecDeque<u64>,
    setlkw: VecDeque<u64>,
    history: VecDeque<Vec<u8>>,
}

/// Which kind of node an operation wants.
#[derive(Clone, Copy)]
enum Want {
    Dir,
    File,
    Any,
}

/// Opcodes and how often each is chosen. DESTROY is sent once, at the end.
const WEIGHTS: &[(Opcode, u64)] = &[
    (Opcode::Lookup, 12),
    (Opcode::Forget, 3),
    (Opcode::Getattr, 5),
    (Opcode::Setattr, 5),
    (Opcode::Readlink, 2),
    (Opcode::Symlink, 3),
    (Opcode::Mknod, 3),
    (Opcode::Mkdir, 6),
    (Opcode::Unlink, 4),
    (Opcode::Rmdir, 3),
    (Opcode::Rename, 3),
    (Opcode::Link, 2),
    (Opcode::Open, 6),
    (Opcode::Read, 6),
    (Opcode::Write, 7),
    (Opcode::Statfs, 1),
    (Opcode::Release, 5),
    (Opcode::Fsync, 1),
    (Opcode::Setxattr, 3),
    (Opcode::Getxattr, 3),
    (Opcode::Listxattr, 2),
    (Opcode::Removexattr, 2),
    (Opcode::Flush, 2),
    (Opcode::Init, 1),
    (Opcode::Opendir, 3),
    (Opcode::Readdir, 3),
    (Opcode::Releasedir, 3),
    (Opcode::Fsyncdir, 1),
    (Opcode::Getlk, 2),
    (Opcode::Setlk, 3),
    (Opcode::Setlkw, 1),
    (Opcode::Access, 2),
    (Opcode::Create, 6),
    (Opcode::Interrupt, 2),
    (Opcode::Bmap, 1),
    (Opcode::Ioctl, 1),
    (Opcode::Poll, 1),
    (Opcode::NotifyReply, 1),
    (Opcode::BatchForget, 2),
    (Opcode::Fallocate, 2),
    (Opcode::Readdirplus, 3),
    (Opcode::Rename2, 2),
    (Opcode::Lseek, 2),
    (Opcode::CopyFileRange, 1),
    (Opcode::CopyFileRange64, 1),
    (Opcode::Setupmapping, 1),
    (Opcode::Removemapping, 1),
    (Opcode::Syncfs, 1),
    (Opcode::Tmpfile, 2),
    (Opcode::Statx, 2),
];

/// Names that collide often, so lookups find what creations made; "escape"
/// and "abs" are symlinks out of stackfs's backing directory (see sandbox).
const NAMES: &[&[u8]] =
    &[b"a", b"b", b"c", b"d", b"e", b"dir", b"file", b"x.txt", b"sub", b"link", b"escape", b"abs", b"keep"];

const XATTR_NAMES: &[&[u8]] = &[
    b"user.a",
    b"user.b",
    b"user.fuzz",
    b"user.",
    b"trusted.t",
    b"security.capability",
    b"security.selinux",
    b"system.posix_acl_access",
    b"system.posix_acl_default",
    b"nonamespace",
    b"",
];

/// The request generator; see the module documentation.
pub struct Generator {
    rng: Rng,
    known: Known,
    next_unique: u64,
    /// Workers draw uniques from disjoint lanes: `lane`, `lane + lanes`, ... (times 2).
    unique_step: u64,
    /// SETXATTR carries the long argument (FUSE_SETXATTR_EXT negotiated).
    setxattr_ext: bool,
    total_weight: u64,
}

impl Generator {
    /// The generator of worker `lane` of `lanes`.
    pub fn new(seed: u64, setxattr_ext: bool, lane: u64, lanes: u64) -> Generator {
        Generator {
            rng: Rng::new(seed ^ lane.wrapping_mul(0xd6e8_feb8_6659_fd93)),
            known: Known::default(),
            // INIT was 2; the kernel's uniques are even (odd ones mark interrupts).
            next_unique: 4 + 2 * lane,
            unique_step: 2 * lanes,
            setxattr_ext,
            total_weight: WEIGHTS.iter().map(|w| w.1).sum(),
        }
    }

    fn fresh_unique(&mut self) -> u64 {
        let u = self.next_unique;
        self.next_unique += self.unique_step;
        u
    }

    /// The next request of the stream, as it reaches the session, and how it was made.
    pub fn next_request(&mut self) -> (Wire, How) {
        let r = self.rng.below(1000);
        let (mut buf, how) = if r < 25 && !self.known.history.is_empty() {
            let i = self.rng.below(self.known.history.len() as u64) as usize;
            let mut b = self.known.history[i].clone();
            if self.rng.percent(70) {
                self.bit_flips(&mut b);
            }
            (b, How::Replay)
        } else if r < 35 {
            let len = self.rng.below(160);
            ((0..len).map(|_| self.rng.next() as u8).collect(), How::Garbage)
        } else {
            let op = self.pick_opcode();
            let mut b = self.well_formed(op);
            if b.len() <= 8192 {
                remember(&mut self.known.history, b.clone(), HISTORY);
            }
            if self.rng.percent(22) {
                let how = self.mutate(&mut b);
                (b, how)
            } else {
                (b, How::WellFormed)
            }
        };
        self.set_unique(&mut buf);
        // A third as a ring entry carries them.
        let wire = if self.rng.percent(30) { Wire::split(buf, self.setxattr_ext) } else { Wire::Contiguous(buf) };
        (wire, how)
    }

    /// Gives `buf` a unique the session has not seen: a reply must be
    /// attributable to exactly one request. Now and then 0, which the kernel
    /// never sends, except for SETLKW, whose answer may come later and must
    /// not be confused with another.
    fn set_unique(&mut self, buf: &mut [u8]) {
        if buf.len() < 16 {
            return;
        }
        let opcode = u32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let unique = if self.rng.below(1000) < 5 && opcode != Opcode::Setlkw as u32 { 0 } else { self.fresh_unique() };
        buf[8..16].copy_from_slice(&unique.to_ne_bytes());
        if unique != 0 {
            remember(&mut self.known.recent, unique, 64);
            if opcode == Opcode::Setlkw as u32 {
                remember(&mut self.known.setlkw, unique, 64);
            }
        }
    }

    fn pick_opcode(&mut self) -> Opcode {
        // Keep the open handles few, as a kernel closing its files would.
        if self.known.open_files.len() > 48 && self.rng.percent(25) {
            return Opcode::Release;
        }
        if self.known.open_dirs.len() > 16 && self.rng.percent(25) {
            return Opcode::Releasedir;
        }
        let mut r = self.rng.below(self.total_weight);
        for &(op, w) in WEIGHTS {
            if r < w {
                return op;
            }
            r -= w;
        }
        Opcode::Lookup
    }

    /// Learns node ids, handles and cookies from a successful reply.
    pub fn learn(&mut self, fact: Fact) {
        let k = &mut self.known;
        match fact {
            Fact::Entry(e) if e.nodeid != 0 => {
                remember(&mut k.nodes, e.nodeid, KEEP);
                match e.attr.mode & libc::S_IFMT {
                    libc::S_IFDIR => remember(&mut k.dirs, e.nodeid, KEEP),
                    libc::S_IFREG => remember(&mut k.files, e.nodeid, KEEP),
                    _ => {}
                }
                *k.lookups.entry(e.nodeid).or_default() += 1;
            }
            Fact::Entry(_) => {}
            Fact::OpenFile { fh, nodeid } => remember(&mut k.open_files, (fh, nodeid), KEEP),
            Fact::OpenDir { fh, nodeid } => remember(&mut k.open_dirs, (fh, nodeid), KEEP),
            Fact::Cookie(c) => remember(&mut k.cookies, c, 64),
        }
    }

    // ---- argument pickers ----

    fn node(&mut self, want: Want) -> u64 {
        let r = self.rng.below(100);
        match r {
            0..=74 => {
                let q = match want {
                    Want::Dir => &self.known.dirs,
                    Want::File => &self.known.files,
                    Want::Any => &self.known.nodes,
                };
                let q = if q.is_empty() { &self.known.nodes } else { q };
                match self.rng.index(q) {
                    Some(i) => q[i],
                    None => ROOT_ID,
                }
            }
            75..=86 => ROOT_ID,
            87..=91 => self.rng.index(&self.known.nodes).map_or(ROOT_ID, |i| self.known.nodes[i]),
            92..=94 => 0,
            95..=97 => self.rng.below(4096),
            _ => self.rng.next(),
        }
    }

    /// A file handle and the node it was opened on, when known.
    fn handle(&mut self, dir: bool) -> (u64, Option<u64>) {
        let q = if dir { &self.known.open_dirs } else { &self.known.open_files };
        match self.rng.below(100) {
            0..=79 => match self.rng.index(q) {
                Some(i) => (q[i].0, Some(q[i].1)),
                None => (0, None),
            },
            80..=89 => (0, None),
            90..=94 => (self.rng.below(256), None),
            _ => (self.rng.next(), None),
        }
    }

    /// The node a request on handle `fh` names: mostly the one it was opened on.
    fn node_of(&mut self, opened_on: Option<u64>, want: Want) -> u64 {
        match opened_on {
            Some(n) if self.rng.percent(90) => n,
            _ => self.node(want),
        }
    }

    fn name(&mut self) -> Vec<u8> {
        match self.rng.below(1000) {
            0..=699 => self.rng.pick(NAMES).to_vec(),
            700..=739 => b".".to_vec(),
            740..=779 => b"..".to_vec(),
            780..=799 => self.rng.pick(&[&b"a/b"[..], b"../canary", b"/", b"../../etc/passwd", b"./a"]).to_vec(),
            800..=819 => self.rng.pick(&[&b"a\0b"[..], b"\0", b"..\0x", b"escape\0/"]).to_vec(),
            820..=834 => Vec::new(),
            835..=859 => vec![b'n'; 255],
            860..=879 => vec![b'n'; 256],
            880..=889 => vec![b'n'; 4096],
            890..=891 => vec![b'h'; 1 << 17],
            892..=959 => format!("f{}", self.rng.below(64)).into_bytes(),
            _ => {
                let len = 1 + self.rng.below(32);
                (0..len).map(|_| self.rng.next() as u8).collect()
            }
        }
    }

    /// A name with the kernel's NUL terminator (now and then without).
    fn cname(&mut self) -> Vec<u8> {
        let mut n = self.name();
        if !self.rng.percent(1) {
            n.push(0);
        }
        n
    }

    fn xattr_name(&mut self) -> Vec<u8> {
        let mut n = if self.rng.percent(80) { self.rng.pick(XATTR_NAMES).to_vec() } else { self.name() };
        if self.rng.percent(5) {
            // Longer than XATTR_NAME_MAX (255).
            n = b"user.".to_vec();
            n.resize(300, b'x');
        }
        n.push(0);
        n
    }

    fn xattr_value(&mut self) -> Vec<u8> {
        let len = match self.rng.below(100) {
            0..=59 => self.rng.below(64),
            60..=69 => 0,
            70..=79 => 255,
            80..=89 => 4096,
            90..=94 => 65536,
            _ => 65537,
        };
        vec![self.rng.next() as u8; len as usize]
    }

    /// A size as READ, READDIR and GETXATTR carry.
    fn size(&mut self) -> u32 {
        match self.rng.below(100) {
            0..=79 => self.rng.pick(&[0, 1, 7, 100, 512, 4096, 4096, 4096, 65536, 131072, 1 << 20, (1 << 20) + 1]),
            80..=89 => u32::MAX,
            _ => self.rng.next() as u32,
        }
    }

    fn offset(&mut self) -> u64 {
        match self.rng.below(100) {
            0..=29 => 0,
            30..=69 => self.rng.below(65536),
            70..=79 => self.rng.below(1 << 24),
            80..=84 => 1 << 40,
            85..=89 => i64::MAX as u64 - self.rng.below(4096),
            90..=94 => u64::MAX - self.rng.below(4096),
            _ => self.rng.next(),
        }
    }

    fn data(&mut self) -> Vec<u8> {
        let len = match self.rng.below(100) {
            0..=9 => 0,
            10..=69 => self.rng.below(4096),
            70..=89 => self.rng.below(65536),
            90..=97 => 131072,
            _ => 1 << 20,
        };
        vec![self.rng.next() as u8; len as usize]
    }

    fn mode(&mut self, typ: u32) -> u32 {
        if self.rng.percent(3) {
            return self.rng.next() as u32;
        }
        let perm = if self.rng.percent(60) {
            self.rng.pick(&[0o644, 0o755, 0o600, 0o777, 0, 0o4755, 0o2755, 0o1777])
        } else {
            self.rng.below(0o10000) as u32
        };
        let t = if self.rng.percent(80) {
            typ
        } else {
            self.rng.pick(&[
                libc::S_IFREG,
                libc::S_IFDIR,
                libc::S_IFCHR,
                libc::S_IFBLK,
                libc::S_IFIFO,
                libc::S_IFSOCK,
                libc::S_IFLNK,
                0,
                libc::S_IFMT,
            ])
        };
        t | perm
    }

    fn umask(&mut self) -> u32 {
        self.rng.pick(&[0, 0o022, 0o077, 0o777])
    }

    fn open_flags(&mut self) -> u32 {
        if self.rng.percent(5) {
            return self.rng.next() as u32;
        }
        let mut f = self.rng.pick(&[libc::O_RDONLY, libc::O_WRONLY, libc::O_RDWR, libc::O_RDWR, 3]);
        for extra in [
            libc::O_TRUNC,
            libc::O_APPEND,
            libc::O_NONBLOCK,
            libc::O_DIRECT,
            libc::O_SYNC,
            libc::O_NOATIME,
            libc::O_CREAT,
            libc::O_EXCL,
            libc::O_LARGEFILE,
            libc::O_NOFOLLOW,
            libc::O_CLOEXEC,
            libc::O_DIRECTORY,
            libc::O_PATH,
            libc::O_TMPFILE,
        ] {
            if self.rng.percent(6) {
                f |= extra;
            }
        }
        f as u32
    }

    fn owner(&mut self) -> u64 {
        if self.rng.percent(90) {
            1 + self.rng.below(4)
        } else {
            self.rng.next()
        }
    }

    fn file_lock(&mut self) -> abi::FileLock {
        let start = match self.rng.below(10) {
            0..=3 => 0,
            4..=6 => self.rng.below(100),
            7 => u64::MAX,
            8 => i64::MAX as u64,
            _ => self.rng.next(),
        };
        let end = match self.rng.below(10) {
            0..=3 => u64::MAX,
            4..=6 => start.saturating_add(self.rng.below(100)),
            7 => start.wrapping_sub(1),
            8 => self.rng.below(100),
            _ => self.rng.next(),
        };
        let typ = match self.rng.below(20) {
            0..=7 => libc::F_RDLCK as u32,
            8..=14 => libc::F_WRLCK as u32,
            15..=18 => libc::F_UNLCK as u32,
            _ => self.rng.next() as u32,
        };
        abi::FileLock { start, end, typ, pid: 1 + self.rng.below(1000) as u32 }
    }

    /// A FORGET target and count: mostly what a reply gave, sometimes absurd.
    fn forget_target(&mut self) -> (u64, u64) {
        let node = match self.rng.index(&self.known.nodes) {
            Some(i) if self.rng.percent(85) => self.known.nodes[i],
            _ => self.node(Want::Any),
        };
        let held = self.known.lookups.get(&node).copied().unwrap_or(0);
        let n = match self.rng.below(10) {
            0..=6 => held.max(1),
            7 => 1,
            8 => u64::MAX,
            _ => self.rng.next(),
        };
        let left = held.saturating_sub(n);
        if left == 0 {
            self.known.lookups.remove(&node);
            self.known.dirs.retain(|&d| d != node);
            self.known.files.retain(|&f| f != node);
        } else {
            self.known.lookups.insert(node, left);
        }
        (node, n)
    }

    // ---- requests ----

    fn encode(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> Vec<u8> {
        let (uid, gid) = match self.rng.below(10) {
            0..=4 => (0, 0),
            5..=7 => (1000, 1000),
            8 => (1000, 0),
            _ => (self.rng.next() as u32, self.rng.next() as u32),
        };
        let mut body = body.to_vec();
        let mut total_extlen = 0;
        if self.rng.percent(3) {
            // Supplementary groups, as the kernel appends with CREATE_SUPP_GROUP.
            // struct fuse_supp_groups: nr_groups, then the groups.
            let header = abi::ExtHeader { size: 16, typ: ext::GROUPS };
            body.extend_from_slice(header.as_bytes());
            body.extend_from_slice(&1u32.to_ne_bytes());
            body.extend_from_slice(&100u32.to_ne_bytes());
            total_extlen = 2;
        }
        let h = abi::InHeader {
            len: (std::mem::size_of::<abi::InHeader>() + body.len()) as u32,
            opcode,
            unique: 0,
            nodeid,
            uid,
            gid,
            pid: 1 + self.rng.below(5000) as u32,
            total_extlen,
            padding: 0,
        };
        let mut v = h.as_bytes().to_vec();
        v.extend_from_slice(&body);
        v
    }

    /// An INTERRUPT of request `target`.
    pub fn interrupt(&mut self, target: u64) -> Vec<u8> {
        let mut v = self.encode(Opcode::Interrupt as u32, 0, abi::InterruptIn { unique: target }.as_bytes());
        let u = self.fresh_unique() | 1;
        v[8..16].copy_from_slice(&u.to_ne_bytes());
        v
    }

    /// The DESTROY the kernel sends at unmount, with a unique no stream reaches.
    pub fn destroy(&mut self) -> Vec<u8> {
        let mut v = self.encode(Opcode::Destroy as u32, 0, &[]);
        v[8..16].copy_from_slice(&(u64::MAX - 1).to_ne_bytes());
        v
    }

    /// A well-formed request of `op` with plausible arguments.
    fn well_formed(&mut self, op: Opcode) -> Vec<u8> {
        use Opcode as O;
        let mut b = Vec::new();
        let nodeid = match op {
            O::Lookup | O::Unlink | O::Rmdir => {
                b = self.cname();
                self.node(Want::Dir)
            }
            O::Forget => {
                let (node, n) = self.forget_target();
                b.extend_from_slice(abi::ForgetIn { nlookup: n }.as_bytes());
                node
            }
            O::BatchForget => {
                let n = match self.rng.below(10) {
                    0 => 0,
                    1..=7 => 1 + self.rng.below(8),
                    _ => self.rng.below(200),
                };
                let count = match self.rng.below(20) {
                    0 => u32::MAX,
                    1 => n as u32 + 1,
                    2 => (n as u32).saturating_sub(1),
                    _ => n as u32,
                };
                b.extend_from_slice(abi::BatchForgetIn { count, dummy: 0 }.as_bytes());
                for _ in 0..n {
                    let (nodeid, nlookup) = self.forget_target();
                    b.extend_from_slice(abi::ForgetOne { nodeid, nlookup }.as_bytes());
                }
                0
            }
            O::Getattr | O::Statx => {
                let (fh, on) = self.handle(false);
                let getattr_flags = self.rng.pick(&[0, 0, GETATTR_FH, u32::MAX]);
                if op == O::Getattr {
                    b.extend_from_slice(abi::GetattrIn { getattr_flags, dummy: 0, fh }.as_bytes());
                } else {
                    let sx = abi::StatxIn {
                        getattr_flags,
                        reserved: 0,
                        fh,
                        sx_flags: self.rng.pick(&[0, 0x2000, 0x4000, u32::MAX]),
                        sx_mask: self.rng.pick(&[0xfff, 0x7ff, 0, u32::MAX]),
                    };
                    b.extend_from_slice(sx.as_bytes());
                }
                self.node_of(on, Want::Any)
            }
            O::Setattr => {
                let (fh, on) = self.handle(false);
                let valid = match self.rng.below(10) {
                    0 => 0,
                    1 => 0xfff,
                    2 => u32::MAX,
                    _ => self.rng.next() as u32 & 0xfff,
                };
                let time = |g: &mut Generator| match g.rng.below(4) {
                    0 => 0,
                    1 => 1_700_000_000,
                    2 => u64::MAX,
                    _ => g.rng.next(),
                };
                let a = abi::SetattrIn {
                    valid,
                    padding: 0,
                    fh,
                    size: match self.rng.below(10) {
                        0..=5 => self.rng.below(70000),
                        6 => 1 << 40,
                        7 => i64::MAX as u64,
                        8 => u64::MAX,
                        _ => self.rng.next(),
                    },
                    lock_owner: self.owner(),
                    atime: time(self),
                    mtime: time(self),
                    ctime: time(self),
                    atimensec: self.rng.pick(&[0, 999_999_999, 1_000_000_000, u32::MAX]),
                    mtimensec: self.rng.pick(&[0, 500, 1_000_000_000]),
                    ctimensec: self.rng.pick(&[0, 1]),
                    mode: self.mode(0),
                    unused4: 0,
                    uid: self.rng.pick(&[0, 1000, u32::MAX, 12345]),
                    gid: self.rng.pick(&[0, 1000, u32::MAX, 54321]),
                    unused5: 0,
                };
                b.extend_from_slice(a.as_bytes());
                self.node_of(on, Want::Any)
            }
            O::Readlink => self.node(Want::Any),
            O::Symlink => {
                b = self.cname();
                let mut target = match self.rng.below(10) {
                    0..=4 => self.rng.pick(&[&b"a"[..], b"../canary", b"/etc/passwd", b"dir/x", b"escape"]).to_vec(),
                    5 => vec![b'T'; 4095],
                    6 => vec![b'T'; 4096],
                    7 => Vec::new(),
                    _ => self.name(),
                };
                target.push(0);
                b.extend_from_slice(&target);
                self.node(Want::Dir)
            }
            O::Mknod => {
                let typ = self.rng.pick(&[libc::S_IFREG, libc::S_IFIFO, libc::S_IFSOCK]);
                let a = abi::MknodIn {
                    mode: self.mode(typ),
                    rdev: self.rng.pick(&[0, 0x103, u32::MAX]),
                    umask: self.umask(),
                    padding: 0,
                };
                b.extend_from_slice(a.as_bytes());
                b.extend_from_slice(&self.cname());
                self.node(Want::Dir)
            }
            O::Mkdir => {
                let a = abi::MkdirIn { mode: self.mode(0), umask: self.umask() };
                b.extend_from_slice(a.as_bytes());
                b.extend_from_slice(&self.cname());
                self.node(Want::Dir)
            }
            O::Rename | O::Rename2 => {
                let newdir = self.node(Want::Dir);
                if op == O::Rename {
                    b.extend_from_slice(abi::RenameIn { newdir }.as_bytes());
                } else {
                    let flags = self.rng.pick(&[0, 0, 0, 1, 2, 4, 3, 5, 6, 8, u32::MAX]);
                    b.extend_from_slice(abi::Rename2In { newdir, flags, padding: 0 }.as_bytes());
                }
                b.extend_from_slice(&self.cname());
                b.extend_from_slice(&self.cname());
                self.node(Want::Dir)
            }
            O::Link => {
                let oldnodeid = self.node(Want::File);
                b.extend_from_slice(abi::LinkIn { oldnodeid }.as_bytes());
                b.extend_from_slice(&self.cname());
                self.node(Want::Dir)
            }
            O::Open => {
                let a = abi::OpenIn {
                    flags: self.open_flags(),
                    open_flags: self.rng.pick(&[0, 0, OPEN_KILL_SUIDGID, u32::MAX]),
                };
                b.extend_from_slice(a.as_bytes());
                self.node(Want::File)
            }
            O::Opendir => {
                let flags =
                    if self.rng.percent(80) { (libc::O_RDONLY | libc::O_DIRECTORY) as u32 } else { self.open_flags() };
                b.extend_from_slice(abi::OpenIn { flags, open_flags: 0 }.as_bytes());
                self.node(Want::Dir)
            }
            O::Read => {
                let (fh, on) = self.handle(false);
                let a = abi::ReadIn {
                    fh,
                    offset: self.offset(),
                    size: self.size(),
                    read_flags: self.rng.pick(&[0, 0, efuse::abi::consts::READ_LOCKOWNER, u32::MAX]),
                    lock_owner: self.owner(),
                    flags: self.open_flags(),
                    padding: 0,
                };
                b.extend_from_slice(a.as_bytes());
                self.node_of(on, Want::File)
            }
            O::Write => {
                let (fh, on) = self.handle(false);
                let data = self.data();
                let size = if self.rng.percent(95) { data.len() as u32 } else { self.size() };
                let a = abi::WriteIn {
                    fh,
                    offset: self.offset(),
                    size,
                    write_flags: self.rng.pick(&[0, 0, write::CACHE, write::LOCKOWNER, write::KILL_SUIDGID, u32::MAX]),
                    lock_owner: self.owner(),
                    flags: self.open_flags(),
                    padding: 0,
                };
                b.extend_from_slice(a.as_bytes());
                b.extend_from_slice(&data);
                self.node_of(on, Want::File)
            }
            O::Statfs => self.node(Want::Any),
            O::Release | O::Releasedir => {
                let dir = op == O::Releasedir;
                let q = if dir { &mut self.known.open_dirs } else { &mut self.known.open_files };
                let tracked = match q.len() {
                    0 => None,
                    n => {
                        let i = (self.rng.next() % n as u64) as usize;
                        // Mostly a real close; sometimes the handle stays known and is closed twice.
                        if self.rng.percent(90) {
                            q.remove(i)
                        } else {
                            Some(q[i])
                        }
                    }
                };
                let (fh, on) = match tracked {
                    Some((fh, n)) if self.rng.percent(90) => (fh, Some(n)),
                    _ => self.handle(dir),
                };
                let a = abi::ReleaseIn {
                    fh,
                    flags: self.open_flags(),
                    release_flags: self.rng.pick(&[0, 0, release::FLUSH, release::FLOCK_UNLOCK, 3, u32::MAX]),
                    lock_owner: self.owner(),
                };
                b.extend_from_slice(a.as_bytes());
                self.node_of(on, if dir { Want::Dir } else { Want::File })
            }
            O::Fsync | O::Fsyncdir => {
                let (fh, on) = self.handle(op == O::Fsyncdir);
                let a = abi::FsyncIn { fh, fsync_flags: self.rng.pick(&[0, FSYNC_FDATASYNC, u32::MAX]), padding: 0 };
                b.extend_from_slice(a.as_bytes());
                self.node_of(on, Want::Any)
            }
            O::Setxattr => {
                let name = self.xattr_name();
                let value = self.xattr_value();
                let size = if self.rng.percent(95) { value.len() as u32 } else { self.size() };
                let flags = self.rng.pick(&[0, 0, libc::XATTR_CREATE as u32, libc::XATTR_REPLACE as u32, 3, u32::MAX]);
                if self.setxattr_ext {
                    let a = abi::SetxattrIn { size, flags, setxattr_flags: self.rng.pick(&[0, 1]), padding: 0 };
                    b.extend_from_slice(a.as_bytes());
                } else {
                    b.extend_from_slice(abi::SetxattrInCompat { size, flags }.as_bytes());
                }
                b.extend_from_slice(&name);
                b.extend_from_slice(&value);
                self.node(Want::Any)
            }
            O::Getxattr => {
                b.extend_from_slice(abi::GetxattrIn { size: self.size(), padding: 0 }.as_bytes());
                b.extend_from_slice(&self.xattr_name());
                self.node(Want::Any)
            }
            O::Listxattr => {
                b.extend_from_slice(abi::GetxattrIn { size: self.size(), padding: 0 }.as_bytes());
                self.node(Want::Any)
            }
            O::Removexattr => {
                b = self.xattr_name();
                self.node(Want::Any)
            }
            O::Flush => {
                let (fh, on) = self.handle(false);
                let a = abi::FlushIn { fh, unused: 0, padding: 0, lock_owner: self.owner() };
                b.extend_from_slice(a.as_bytes());
                self.node_of(on, Want::File)
            }
            O::Init => {
                let a = abi::InitIn {
                    major: self.rng.pick(&[7, 7, 8, 6, 0, u32::MAX]),
                    minor: self.rng.pick(&[45, 31, 20, 99, u32::MAX]),
                    max_readahead: self.rng.pick(&[131072, 0, u32::MAX]),
                    flags: self.rng.next() as u32 | init::INIT_EXT as u32,
                    flags2: self.rng.next() as u32,
                    unused: [0; 11],
                };
                let bytes = a.as_bytes();
                // Kernels before 7.36 send the 16-byte form.
                let n = if self.rng.percent(30) { 16 } else { bytes.len() };
                b.extend_from_slice(&bytes[..n]);
                0
            }
            O::Readdir | O::Readdirplus => {
                let (fh, on) = self.handle(true);
                let offset = match self.rng.below(10) {
                    0..=4 => 0,
                    5..=7 => self.rng.index(&self.known.cookies).map_or(0, |i| self.known.cookies[i]),
                    8 => self.rng.below(64),
                    _ => self.rng.next(),
                };
                let size = self.rng.pick(&[0, 1, 23, 24, 32, 80, 152, 160, 1024, 4096, 4096, 65536, 1 << 20, u32::MAX]);
                let a = abi::ReadIn { fh, offset, size, read_flags: 0, lock_owner: 0, flags: 0, padding: 0 };
                b.extend_from_slice(a.as_bytes());
                self.node_of(on, Want::Dir)
            }
            O::Getlk | O::Setlk | O::Setlkw => {
                let (fh, on) = self.handle(false);
                let a = abi::LkIn {
                    fh,
                    owner: self.owner(),
                    lk: self.file_lock(),
                    lk_flags: self.rng.pick(&[0, 0, 0, LK_FLOCK, LK_FLOCK, u32::MAX]),
                    padding: 0,
                };
                b.extend_from_slice(a.as_bytes());
                self.node_of(on, Want::File)
            }
            O::Access => {
                let mask = if self.rng.percent(90) { self.rng.below(8) as u32 } else { self.rng.next() as u32 };
                b.extend_from_slice(abi::AccessIn { mask, padding: 0 }.as_bytes());
                self.node(Want::Any)
            }
            O::Create | O::Tmpfile => {
                let mut flags = self.open_flags();
                if op == O::Create && self.rng.percent(90) {
                    flags |= libc::O_CREAT as u32;
                }
                let a = abi::CreateIn {
                    flags,
                    mode: self.mode(libc::S_IFREG),
                    umask: self.umask(),
                    open_flags: self.rng.pick(&[0, 0, OPEN_KILL_SUIDGID]),
                };
                b.extend_from_slice(a.as_bytes());
                if op == O::Create {
                    b.extend_from_slice(&self.cname());
                } else {
                    match self.rng.below(10) {
                        0..=4 => b.push(0),
                        5..=8 => {}
                        _ => b.extend_from_slice(&self.cname()),
                    }
                }
                self.node(Want::Dir)
            }
            O::Interrupt => {
                let unique = match self.rng.below(10) {
                    0..=4 => self.rng.index(&self.known.setlkw).map_or(0, |i| self.known.setlkw[i]),
                    5..=6 => self.rng.index(&self.known.recent).map_or(0, |i| self.known.recent[i]),
                    // A request not read yet: the kernel may interrupt before the daemon reads it.
                    7 => self.next_unique + self.unique_step * (1 + self.rng.below(4)),
                    _ => self.rng.next(),
                };
                b.extend_from_slice(abi::InterruptIn { unique }.as_bytes());
                0
            }
            O::Bmap => {
                let a = abi::BmapIn {
                    block: self.offset(),
                    blocksize: self.rng.pick(&[0, 512, 4096, u32::MAX]),
                    padding: 0,
                };
                b.extend_from_slice(a.as_bytes());
                self.node(Want::File)
            }
            O::Destroy => 0,
            O::Ioctl => {
                let (fh, on) = self.handle(false);
                let in_size = self.rng.below(64) as u32;
                let a = abi::IoctlIn {
                    fh,
                    flags: self.rng.pick(&[0, 1, 4, u32::MAX]),
                    cmd: self.rng.pick(&[0x5401, 0x541b, 0x8008_6601, u32::MAX]),
                    arg: self.rng.next(),
                    in_size,
                    out_size: self.size(),
                };
                b.extend_from_slice(a.as_bytes());
                let have = if self.rng.percent(80) { in_size } else { self.rng.below(in_size as u64 + 1) as u32 };
                b.resize(b.len() + have as usize, 0xab);
                self.node_of(on, Want::File)
            }
            O::Poll => {
                let (fh, on) = self.handle(false);
                let a = abi::PollIn { fh, kh: self.rng.next(), flags: self.rng.pick(&[0, 1]), events: 0x1f };
                b.extend_from_slice(a.as_bytes());
                self.node_of(on, Want::File)
            }
            O::NotifyReply => {
                let data = vec![0x5a; self.rng.below(200) as usize];
                let size = if self.rng.percent(90) { data.len() as u32 } else { self.size() };
                let a =
                    abi::NotifyRetrieveIn { dummy1: 0, offset: self.offset(), size, dummy2: 0, dummy3: 0, dummy4: 0 };
                b.extend_from_slice(a.as_bytes());
                b.extend_from_slice(&data);
                self.node(Want::File)
            }
            O::Fallocate => {
                let (fh, on) = self.handle(false);
                let a = abi::FallocateIn {
                    fh,
                    offset: self.offset(),
                    length: match self.rng.below(10) {
                        0 => 0,
                        1..=3 => self.rng.below(1 << 20),
                        4..=5 => 4096,
                        6 => 1 << 20,
                        7 => u64::MAX,
                        8 => 1 << 40,
                        _ => self.rng.next(),
                    },
                    // 0, KEEP_SIZE, PUNCH_HOLE(|KEEP_SIZE), COLLAPSE, ZERO_RANGE, INSERT, UNSHARE.
                    mode: self.rng.pick(&[0, 0, 1, 2, 3, 8, 0x10, 0x11, 0x20, 0x40, u32::MAX]),
                    padding: 0,
                };
                b.extend_from_slice(a.as_bytes());
                self.node_of(on, Want::File)
            }
            O::Lseek => {
                let (fh, on) = self.handle(false);
                let a = abi::LseekIn {
                    fh,
                    offset: self.offset(),
                    whence: self.rng.pick(&[0, 1, 2, 3, 3, 4, 4, 5, u32::MAX]),
                    padding: 0,
                };
                b.extend_from_slice(a.as_bytes());
                self.node_of(on, Want::File)
            }
            O::CopyFileRange | O::CopyFileRange64 => {
                let (fh_in, on) = self.handle(false);
                let (fh_out, out_on) = self.handle(false);
                let nodeid_out = self.node_of(out_on, Want::File);
                let a = abi::CopyFileRangeIn {
                    fh_in,
                    off_in: self.offset(),
                    nodeid_out,
                    fh_out,
                    off_out: self.offset(),
                    len: self.rng.pick(&[0, 1, 4096, 65536, 1 << 20, 1 << 32, u64::MAX]),
                    flags: self.rng.pick(&[0, 0, 0, 1, u64::MAX]),
                };
                b.extend_from_slice(a.as_bytes());
                self.node_of(on, Want::File)
            }
            O::Setupmapping => {
                let a = abi::SetupMappingIn {
                    fh: self.rng.next(),
                    foffset: self.offset(),
                    len: self.offset(),
                    flags: self.rng.next(),
                    moffset: self.offset(),
                };
                b.extend_from_slice(a.as_bytes());
                self.node(Want::File)
            }
            O::Removemapping => {
                let n = self.rng.below(4);
                let count = if self.rng.percent(80) { n as u32 } else { u32::MAX };
                b.extend_from_slice(abi::RemoveMappingIn { count, padding: 0 }.as_bytes());
                for _ in 0..n {
                    let one = abi::RemoveMappingOne { moffset: self.offset(), len: self.offset() };
                    b.extend_from_slice(one.as_bytes());
                }
                self.node(Want::File)
            }
            O::Syncfs => {
                b.extend_from_slice(abi::SyncfsIn { padding: 0 }.as_bytes());
                self.node(Want::Any)
            }
        };
        self.encode(op as u32, nodeid, &b)
    }

    // ---- mutations ----

    fn bit_flips(&mut self, b: &mut [u8]) {
        if b.is_empty() {
            return;
        }
        for _ in 0..1 + self.rng.below(4) {
            // Mostly in the body: header flips are mostly rejected outright.
            let at = if b.len() > 40 && self.rng.percent(85) {
                40 + self.rng.below(b.len() as u64 - 40)
            } else {
                self.rng.below(b.len() as u64)
            } as usize;
            b[at] ^= 1 << self.rng.below(8);
        }
    }

    fn set_len(b: &mut [u8], len: u32) {
        if b.len() >= 4 {
            b[..4].copy_from_slice(&len.to_ne_bytes());
        }
    }

    /// Damages a well-formed request; returns what was done.
    fn mutate(&mut self, b: &mut Vec<u8>) -> How {
        match self.rng.below(100) {
            0..=39 => {
                self.bit_flips(b);
                How::BitFlip
            }
            40..=54 => {
                let cut = self.rng.below(b.len() as u64) as usize;
                b.truncate(cut);
                if self.rng.percent(70) {
                    Self::set_len(b, cut as u32);
                }
                How::Truncated
            }
            55..=67 => {
                let extra = if self.rng.percent(90) { self.rng.below(300) } else { 4096 };
                for _ in 0..extra {
                    b.push(self.rng.next() as u8);
                }
                if self.rng.percent(70) {
                    let len = b.len() as u32;
                    Self::set_len(b, len);
                }
                How::Extended
            }
            68..=77 => {
                let actual = b.len() as u32;
                let len = match self.rng.below(5) {
                    0 => 0,
                    1 => u32::MAX,
                    2 => actual.wrapping_add(1 + self.rng.below(16) as u32),
                    3 => actual.wrapping_sub(1 + self.rng.below(16) as u32),
                    _ => self.rng.next() as u32,
                };
                Self::set_len(b, len);
                How::BadLength
            }
            78..=85 => {
                let op = loop {
                    let op = match self.rng.below(5) {
                        0 => 0,
                        1 => self.rng.pick(&[7, 19]),
                        2 => 54 + self.rng.below(64) as u32,
                        3 => u32::MAX,
                        _ => self.rng.next() as u32,
                    };
                    if Opcode::from_u32(op).is_none() {
                        break op;
                    }
                };
                if b.len() >= 8 {
                    b[4..8].copy_from_slice(&op.to_ne_bytes());
                }
                How::UnknownOpcode
            }
            86..=92 => {
                let extlen: u16 =
                    if self.rng.percent(70) { 1 + self.rng.below(4) as u16 } else { self.rng.next() as u16 };
                if b.len() >= 40 {
                    b[36..38].copy_from_slice(&extlen.to_ne_bytes());
                }
                How::BadExtension
            }
            _ => {
                if b.len() > 40 {
                    let start = 40 + self.rng.below(b.len() as u64 - 40) as usize;
                    let end = (start + 1 + self.rng.below(16) as usize).min(b.len());
                    for x in &mut b[start..end] {
                        *x = self.rng.next() as u8;
                    }
                }
                How::Overwritten
            }
        }
    }
}

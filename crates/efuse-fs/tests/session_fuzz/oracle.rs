//! What the session must do with each request, and the checks of what it
//! did: whether a request gets a reply and which, the shape of a successful
//! reply per opcode, and a model of the session's counters.
//!
//! The rules are the protocol's: a request the decoder accepts is answered
//! once with its own unique and opcode, except FORGET, BATCH_FORGET,
//! INTERRUPT and NOTIFY_REPLY, which nothing waits for. A request it refuses
//! is answered EIO (ENOSYS for an unknown opcode) when its header is readable,
//! its unique is not 0 and its opcode expects an answer; otherwise dropped.

use std::mem::size_of;

use efuse::abi::encode::rec_align;
use efuse::abi::request::parse_header;
use efuse::abi::structs as abi;
use efuse::abi::{Opcode, Operation, ProtocolOptions};
use efuse::session::REQUEST_BUFFER_SIZE;
use efuse::stats::CounterSnapshot;
use zerocopy::FromBytes;

use crate::gen::Fact;
use crate::wire::Wire;

// A decoded request with unique 0 (which the kernel never sends: 0 marks its
// notifications) is still answered, with unique 0, while a refused one is
// dropped. The session does not look at the unique of a request it can
// decode; the kernel would take such an answer for a notification of an
// unknown code and refuse it, so nothing is lost either way.

/// What INIT settled that decides how a request must be answered.
pub struct Negotiated {
    pub opts: ProtocolOptions,
    pub max_read: u32,
    /// OPEN / OPENDIR are answered ENOSYS by the session (stateless opens).
    pub no_open: bool,
    pub no_opendir: bool,
    /// FLUSH carries no information (the kernel keeps the locks and the file
    /// system acts on nothing else): answered ENOSYS by the session.
    pub no_flush: bool,
}

/// The payload a successful reply must carry.
#[derive(Debug, Clone, Copy)]
pub enum Shape {
    /// `fuse_entry_out`; `created`: the node id must not be 0 (LOOKUP may
    /// answer a negative entry with 0), and the type must be `kind` when given.
    Entry {
        created: bool,
        kind: Option<u32>,
    },
    Attr,
    Statx,
    /// `fuse_open_out` (OPEN, OPENDIR).
    Open {
        dir: bool,
    },
    /// `fuse_entry_out` of a regular file, then `fuse_open_out`.
    Create,
    /// `fuse_write_out` with at most `max` bytes written.
    Write {
        max: u64,
    },
    /// COPY_FILE_RANGE (`fuse_write_out`) or COPY_FILE_RANGE_64 (`fuse_copy_file_range_out`).
    Copy {
        max: u64,
        wide: bool,
    },
    Statfs,
    /// GETXATTR / LISTXATTR: `fuse_getxattr_out` when asked with size 0, else at most `size` bytes.
    Xattr {
        size: u32,
    },
    Lock,
    Lseek,
    Bmap,
    /// READ, READLINK: at most `max` bytes.
    Data {
        max: usize,
    },
    /// READDIR(PLUS): whole records, at most `max` bytes.
    Dir {
        max: usize,
        plus: bool,
    },
    Empty,
    /// Must fail with this errno (answered by the session, not the file system).
    Fails(i32),
}

/// The answer a request must get.
#[derive(Debug, Clone, Copy)]
pub enum Expect {
    /// None: the header is unreadable, or the opcode expects no answer.
    Nothing,
    /// Refused by the decoder: one reply with this errno.
    Rejected { unique: u64, errno: i32 },
    /// Decoded: one reply with this unique and opcode, of `shape` when it succeeds.
    Answer { unique: u64, op: Opcode, nodeid: u64, shape: Shape },
}

/// Decodes the request as the session will and says what must come back;
/// the opcode is returned when the request is decodable (and so counted).
pub fn expect(wire: &Wire, n: &Negotiated) -> (Expect, Option<Opcode>) {
    let req = match wire.parse(n.opts) {
        Ok(req) => req,
        Err(_) => return (rejected(wire.header()), None),
    };
    let Some(op) = Opcode::from_u32(req.header.opcode) else {
        panic!("the decoder accepted unknown opcode {}", req.header.opcode)
    };
    use Operation as O;
    let shape = match &req.op {
        O::Forget { .. } | O::BatchForget { .. } | O::Interrupt { .. } | O::NotifyReply { .. } => None,
        O::Lookup { .. } => Some(Shape::Entry { created: false, kind: None }),
        O::Mknod { arg, .. } => {
            let t = arg.mode & libc::S_IFMT;
            Some(Shape::Entry { created: true, kind: valid_type(t).then_some(t) })
        }
        O::Mkdir { .. } => Some(Shape::Entry { created: true, kind: Some(libc::S_IFDIR) }),
        O::Symlink { .. } => Some(Shape::Entry { created: true, kind: Some(libc::S_IFLNK) }),
        O::Link { .. } => Some(Shape::Entry { created: true, kind: None }),
        O::Getattr { .. } | O::Setattr { .. } => Some(Shape::Attr),
        O::Statx { .. } => Some(Shape::Statx),
        // The kernel reads a link into a page and keeps a byte for the NUL.
        O::Readlink => Some(Shape::Data { max: 4095 }),
        O::Unlink { .. }
        | O::Rmdir { .. }
        | O::Rename { .. }
        | O::Rename2 { .. }
        | O::Release { .. }
        | O::Releasedir { .. }
        | O::Fsync { .. }
        | O::Fsyncdir { .. }
        | O::Setxattr { .. }
        | O::Removexattr { .. }
        | O::Setlk { .. }
        | O::Setlkw { .. }
        | O::Access { .. }
        | O::Fallocate { .. }
        | O::Syncfs { .. }
        | O::Destroy => Some(Shape::Empty),
        O::Flush { .. } if n.no_flush => Some(Shape::Fails(libc::ENOSYS)),
        O::Flush { .. } => Some(Shape::Empty),
        O::Open { .. } if n.no_open => Some(Shape::Fails(libc::ENOSYS)),
        O::Open { .. } => Some(Shape::Open { dir: false }),
        O::Opendir { .. } if n.no_opendir => Some(Shape::Fails(libc::ENOSYS)),
        O::Opendir { .. } => Some(Shape::Open { dir: true }),
        O::Create { .. } | O::Tmpfile { .. } => Some(Shape::Create),
        O::Read { arg } => Some(Shape::Data { max: arg.size.min(n.max_read) as usize }),
        O::Write { data, .. } => Some(Shape::Write { max: data.len() as u64 }),
        O::Statfs => Some(Shape::Statfs),
        O::Getxattr { arg, .. } | O::Listxattr { arg } => Some(Shape::Xattr { size: arg.size }),
        // A second INIT on a live session.
        O::Init { .. } => Some(Shape::Fails(libc::EPROTO)),
        O::Readdir { arg } => Some(Shape::Dir { max: (arg.size as usize).min(REQUEST_BUFFER_SIZE), plus: false }),
        O::Readdirplus { arg } => Some(Shape::Dir { max: (arg.size as usize).min(REQUEST_BUFFER_SIZE), plus: true }),
        O::Getlk { .. } => Some(Shape::Lock),
        O::Bmap { .. } => Some(Shape::Bmap),
        O::Lseek { .. } => Some(Shape::Lseek),
        O::CopyFileRange { arg } => Some(Shape::Copy { max: arg.len, wide: false }),
        O::CopyFileRange64 { arg } => Some(Shape::Copy { max: arg.len, wide: true }),
        O::Ioctl { .. } => Some(Shape::Fails(libc::ENOTTY)),
        O::Poll { .. } | O::SetupMapping { .. } | O::RemoveMapping { .. } => Some(Shape::Fails(libc::ENOSYS)),
    };
    let h = req.header;
    let expect = match shape {
        Some(shape) => Expect::Answer { unique: h.unique, op, nodeid: h.nodeid, shape },
        None => Expect::Nothing,
    };
    (expect, Some(op))
}

fn rejected(buf: &[u8]) -> Expect {
    let Ok(h) = parse_header(buf) else { return Expect::Nothing };
    let op = Opcode::from_u32(h.opcode);
    let no_reply = matches!(op, Some(Opcode::Forget | Opcode::BatchForget | Opcode::Interrupt | Opcode::NotifyReply));
    if h.unique == 0 || no_reply {
        return Expect::Nothing;
    }
    // ENOSYS tells the kernel not to send an unknown opcode again.
    let errno = if op.is_some() { libc::EIO } else { libc::ENOSYS };
    Expect::Rejected { unique: h.unique, errno }
}

/// The types a node may have (the kernel's fuse_valid_type).
fn valid_type(t: u32) -> bool {
    matches!(
        t,
        libc::S_IFREG | libc::S_IFDIR | libc::S_IFLNK | libc::S_IFCHR | libc::S_IFBLK | libc::S_IFIFO | libc::S_IFSOCK
    )
}

/// Attributes the kernel accepts (fuse_invalid_attr): others fail the
/// caller with EIO and mark the inode bad.
fn valid_attr(a: &abi::Attr) -> Result<(), String> {
    if !valid_type(a.mode & libc::S_IFMT) {
        return Err(format!("attributes with mode {:o}", a.mode));
    }
    if a.size > i64::MAX as u64 {
        return Err(format!("attributes with size {}", a.size));
    }
    Ok(())
}

fn read<T: FromBytes>(payload: &[u8]) -> Result<T, String> {
    T::read_from_prefix(payload).map(|(v, _)| v).map_err(|_| format!("{} bytes, too short", payload.len()))
}

fn exact(payload: &[u8], want: usize) -> Result<(), String> {
    if payload.len() == want {
        Ok(())
    } else {
        Err(format!("payload of {} bytes where {want} belong", payload.len()))
    }
}

/// Checks one reply to a decoded request of `shape` and collects what the
/// generator can learn from it.
pub fn check_answer(
    shape: Shape,
    nodeid: u64,
    error: i32,
    payload: &[u8],
    facts: &mut Vec<Fact>,
) -> Result<(), String> {
    if error != 0 {
        // Linux refuses a reply with -512 or less before matching it to its
        // request, which then waits forever (fs/fuse/dev.c, fuse_dev_do_write).
        if !(-511..=-1).contains(&error) {
            return Err(format!("error {error} is not a negated errno the kernel accepts"));
        }
        if !payload.is_empty() {
            return Err(format!("error reply carries {} bytes", payload.len()));
        }
        if let Shape::Fails(e) = shape {
            if error != -e {
                return Err(format!("error {error}, the session answers {}", -e));
            }
        }
        return Ok(());
    }
    match shape {
        Shape::Fails(e) => return Err(format!("succeeded; the session answers {}", -e)),
        Shape::Entry { created, kind } => {
            exact(payload, size_of::<abi::EntryOut>())?;
            let e: abi::EntryOut = read(payload)?;
            if created && e.nodeid == 0 {
                return Err("new entry with node id 0".into());
            }
            if e.nodeid != 0 {
                valid_attr(&e.attr)?;
                if let Some(k) = kind.filter(|&k| e.attr.mode & libc::S_IFMT != k) {
                    return Err(format!("new entry of type {:o} where {k:o} was made", e.attr.mode & libc::S_IFMT));
                }
            }
            facts.push(Fact::Entry(e));
        }
        Shape::Attr => {
            exact(payload, size_of::<abi::AttrOut>())?;
            valid_attr(&read::<abi::AttrOut>(payload)?.attr)?;
        }
        Shape::Statx => {
            exact(payload, size_of::<abi::StatxOut>())?;
            let sx = read::<abi::StatxOut>(payload)?.stat;
            let t = sx.mode as u32 & libc::S_IFMT;
            if sx.mask & libc::STATX_TYPE != 0 && !valid_type(t) {
                return Err(format!("statx of type {t:o}"));
            }
            if sx.mask & libc::STATX_SIZE != 0 && sx.size > i64::MAX as u64 {
                return Err(format!("statx size {}", sx.size));
            }
        }
        Shape::Open { dir } => {
            exact(payload, size_of::<abi::OpenOut>())?;
            let o: abi::OpenOut = read(payload)?;
            facts.push(if dir { Fact::OpenDir { fh: o.fh, nodeid } } else { Fact::OpenFile { fh: o.fh, nodeid } });
        }
        Shape::Create => {
            exact(payload, size_of::<abi::EntryOut>() + size_of::<abi::OpenOut>())?;
            let e: abi::EntryOut = read(payload)?;
            let o: abi::OpenOut = read(&payload[size_of::<abi::EntryOut>()..])?;
            if e.nodeid == 0 {
                return Err("created file with node id 0".into());
            }
            valid_attr(&e.attr)?;
            if e.attr.mode & libc::S_IFMT != libc::S_IFREG {
                return Err(format!("created file of type {:o}", e.attr.mode & libc::S_IFMT));
            }
            facts.push(Fact::Entry(e));
            facts.push(Fact::OpenFile { fh: o.fh, nodeid: e.nodeid });
        }
        Shape::Write { max } => {
            exact(payload, size_of::<abi::WriteOut>())?;
            let w: abi::WriteOut = read(payload)?;
            if w.size as u64 > max {
                return Err(format!("{} bytes written of {max} sent", w.size));
            }
        }
        Shape::Copy { max, wide } => {
            let copied = if wide {
                exact(payload, size_of::<abi::CopyFileRangeOut>())?;
                read::<abi::CopyFileRangeOut>(payload)?.bytes_copied
            } else {
                exact(payload, size_of::<abi::WriteOut>())?;
                read::<abi::WriteOut>(payload)?.size as u64
            };
            if copied > max {
                return Err(format!("{copied} bytes copied of {max} asked"));
            }
        }
        Shape::Statfs => exact(payload, size_of::<abi::StatfsOut>())?,
        Shape::Xattr { size: 0 } => exact(payload, size_of::<abi::GetxattrOut>())?,
        Shape::Xattr { size } => {
            if payload.len() > size as usize {
                return Err(format!("{} bytes of xattr data for a {size}-byte buffer", payload.len()));
            }
        }
        Shape::Lock => exact(payload, size_of::<abi::LkOut>())?,
        Shape::Lseek => exact(payload, size_of::<abi::LseekOut>())?,
        Shape::Bmap => exact(payload, size_of::<abi::BmapOut>())?,
        Shape::Data { max } => {
            if payload.len() > max {
                return Err(format!("{} bytes of data, at most {max} asked", payload.len()));
            }
        }
        Shape::Dir { max, plus } => dirents(payload, max, plus, facts)?,
        Shape::Empty => exact(payload, 0)?,
    }
    Ok(())
}

/// Walks the records of a READDIR(PLUS) reply: each whole, aligned, with a
/// name of 1 to 255 bytes and no '/' or NUL.
fn dirents(payload: &[u8], max: usize, plus: bool, facts: &mut Vec<Fact>) -> Result<(), String> {
    if payload.len() > max {
        return Err(format!("listing of {} bytes for a {max}-byte buffer", payload.len()));
    }
    let head = if plus { size_of::<abi::DirentPlus>() } else { size_of::<abi::Dirent>() };
    let mut rest = payload;
    while !rest.is_empty() {
        let (entry, d) = if plus {
            let p: abi::DirentPlus = read(rest)?;
            (Some(p.entry_out), p.dirent)
        } else {
            (None, read::<abi::Dirent>(rest)?)
        };
        let namelen = d.namelen as usize;
        if namelen == 0 || namelen > 255 {
            return Err(format!("directory entry with a name of {namelen} bytes"));
        }
        let size = rec_align(head + namelen);
        if size > rest.len() {
            return Err(format!("directory record of {size} bytes overruns the {} left", rest.len()));
        }
        let name = &rest[head..head + namelen];
        if name.contains(&b'/') || name.contains(&0) {
            return Err(format!("directory entry named {:?}", String::from_utf8_lossy(name)));
        }
        // "." and ".." take no lookup (the kernel ignores their node ids),
        // nor does node id 0; any other entry must be a valid node, else
        // the kernel fails the whole listing (fuse_direntplus_link).
        if let Some(e) = entry.filter(|e| e.nodeid != 0 && name != b"." && name != b"..") {
            if e.nodeid == efuse::abi::ROOT_ID {
                return Err(format!("entry {:?} names the root", String::from_utf8_lossy(name)));
            }
            valid_attr(&e.attr)?;
            facts.push(Fact::Entry(e));
        }
        facts.push(Fact::Cookie(d.off));
        rest = &rest[size..];
    }
    Ok(())
}

/// What the session's counters must say.
#[derive(Clone)]
pub struct CounterModel {
    requests: [u64; Opcode::ALL.len()],
    errors: [u64; Opcode::ALL.len()],
    undecodable: u64,
}

impl CounterModel {
    pub fn new() -> CounterModel {
        CounterModel { requests: [0; Opcode::ALL.len()], errors: [0; Opcode::ALL.len()], undecodable: 0 }
    }

    pub fn request(&mut self, op: Opcode) {
        self.requests[op.index()] += 1;
    }

    /// An error reply to a decoded request. Replies to requests the decoder
    /// refused are not errors of any opcode: they are counted once, as
    /// undecodable.
    pub fn error(&mut self, op: Opcode) {
        self.errors[op.index()] += 1;
    }

    pub fn undecodable(&mut self) {
        self.undecodable += 1;
    }

    /// Adds what another worker sent and was answered.
    pub fn add(&mut self, other: &CounterModel) {
        for i in 0..self.requests.len() {
            self.requests[i] += other.requests[i];
            self.errors[i] += other.errors[i];
        }
        self.undecodable += other.undecodable;
    }

    pub fn requests(&self, op: Opcode) -> u64 {
        self.requests[op.index()]
    }

    pub fn errors(&self, op: Opcode) -> u64 {
        self.errors[op.index()]
    }

    pub fn total_undecodable(&self) -> u64 {
        self.undecodable
    }

    /// Compares with the session's counters. SETLKW errors only when no
    /// SETLKW is `waiting`: one counts its error when it answers, which may
    /// fall between our look at the replies and at the counters.
    pub fn compare(&self, snap: &CounterSnapshot, waiting: bool) -> Result<(), String> {
        let mut diffs = Vec::new();
        for op in Opcode::ALL {
            let got = snap.opcodes.get(op.name()).copied().unwrap_or_default();
            if got.count != self.requests(op) {
                diffs.push(format!("{} requests: counted {}, sent {}", op.name(), got.count, self.requests(op)));
            }
            let settled = !(waiting && op == Opcode::Setlkw);
            if settled && got.errors != self.errors(op) {
                diffs.push(format!("{} errors: counted {}, answered {}", op.name(), got.errors, self.errors(op)));
            }
        }
        let total: u64 = self.requests.iter().sum();
        if snap.requests_total != total {
            diffs.push(format!("requests_total: counted {}, sent {total}", snap.requests_total));
        }
        if snap.undecodable != self.undecodable {
            diffs.push(format!("undecodable: counted {}, sent {}", snap.undecodable, self.undecodable));
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(format!("counters disagree: {}", diffs.join("; ")))
        }
    }
}

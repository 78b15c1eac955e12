//! FUSE requests over a bypass connection: each function encodes one
//! request with efuse-abi's structures, sends it through
//! `efuse_bypass::client::Client::call` and decodes the reply.

use efuse_abi::structs::{
    Attr, AttrOut, CreateIn, EntryOut, FlushIn, ForgetIn, FsyncIn, GetattrIn, LinkIn, LseekIn, LseekOut, MkdirIn,
    OpenIn, OpenOut, ReadIn, ReleaseIn, Rename2In, RenameIn, SetattrIn, WriteIn, WriteOut,
};
use efuse_abi::Opcode;
use efuse_bypass::client::{CallError, Client};
use efuse_bypass::wire::{walk, WalkIn, WalkOut};
use zerocopy::{FromBytes, IntoBytes};

/// Why a request did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fail {
    /// The file system's answer: this errno.
    Errno(i32),
    /// No usable answer (daemon gone, nonsense reply, request too big).
    Broken,
}

impl From<CallError> for Fail {
    fn from(_: CallError) -> Fail {
        Fail::Broken
    }
}

pub type R<T> = Result<T, Fail>;

/// Sends a request whose reply is a fixed structure `T`.
fn call_struct<T: FromBytes>(c: &Client, op: u32, nodeid: u64, args: &[&[u8]]) -> R<T> {
    c.call(op, nodeid, args, |err, payload| {
        if err != 0 {
            return Err(Fail::Errno(-err));
        }
        T::read_from_prefix(payload).map(|(v, _)| v).map_err(|_| Fail::Broken)
    })?
}

/// Sends a request whose reply carries no payload.
fn call_empty(c: &Client, op: u32, nodeid: u64, args: &[&[u8]]) -> R<()> {
    c.call(op, nodeid, args, |err, _| if err != 0 { Err(Fail::Errno(-err)) } else { Ok(()) })?
}

/// The result of a WALK.
pub enum Walked {
    Done(EntryOut),
    /// The path leaves what the daemon can walk: use the kernel.
    Left,
}

pub fn walk(c: &Client, path: &[u8], flags: u32) -> R<Walked> {
    if path.len() > efuse_bypass::wire::WALK_PATH_MAX {
        return Err(Fail::Errno(libc::ENAMETOOLONG));
    }
    // Attributes only: the table answers when it knows the whole path, or
    // that a name on it does not exist.
    if flags & walk::NO_KEEP != 0 {
        match walk_table(c, path, flags) {
            Local::Found(e, _, _) => return Ok(Walked::Done(e)),
            Local::Absent => return Err(Fail::Errno(libc::ENOENT)),
            Local::Unknown => {}
        }
    }
    let inp = WalkIn { flags, path_len: path.len() as u32 };
    let out: WalkOut = call_struct(c, efuse_bypass::op::WALK, efuse_abi::ROOT_ID, &[inp.as_bytes(), path])?;
    match out.status {
        walk::DONE => Ok(Walked::Done(out.entry)),
        walk::LEFT => Ok(Walked::Left),
        _ => Err(Fail::Broken),
    }
}

/// What the metadata table says of a path.
pub enum Local {
    /// The final node, its table entry and the entry's sequence number.
    Found(EntryOut, u32, u32),
    /// A name on the way does not exist (a negative entry, fresh, in a
    /// directory this process may search): ENOENT, as the kernel answers
    /// from a negative dentry.
    Absent,
    /// The table does not know: ask the daemon.
    Unknown,
}

/// The walk the library makes over its metadata table, without a request:
/// Found when every component is there and fresh, each directory on the way
/// is searchable with this process's credentials, and no symbolic link needs
/// following; Absent when a name on the way is known not to exist; anything
/// else Unknown, and the daemon walks. What it finds holds no lookup for
/// the client.
pub fn walk_table(c: &Client, path: &[u8], flags: u32) -> Local {
    match walk_table_inner(c, path, flags) {
        Some(l) => l,
        None => Local::Unknown,
    }
}

fn walk_table_inner(c: &Client, path: &[u8], flags: u32) -> Option<Local> {
    use efuse_bypass::table::now_ns;
    let t = c.table()?;
    let now = now_ns();
    let (_, root) = t.find(0, b"/", now)?;
    if root.attr_expires <= now || root.nodeid != efuse_abi::ROOT_ID {
        return None;
    }
    let (mut nodeid, mut generation, mut attr) = (root.nodeid, root.generation, root.attr);
    let (mut entry, mut seq) = (u32::MAX, 1);
    let mut parts = path.split(|b| *b == b'/').filter(|p| !p.is_empty() && *p != b".").peekable();
    while let Some(name) = parts.next() {
        if name == b".." || attr.mode & libc::S_IFMT != libc::S_IFDIR {
            return None;
        }
        if !crate::creds::may_search(&attr)? {
            return None;
        }
        let (i, p) = t.find(nodeid, name, now)?;
        if p.nodeid == 0 {
            // (`find` gave it only while its entry is valid.)
            return Some(Local::Absent);
        }
        if p.attr_expires <= now {
            return None;
        }
        (entry, seq) = (i, p.seq);
        let last = parts.peek().is_none();
        let follow = !last || flags & (walk::FOLLOW_LAST | walk::DIRECTORY) != 0;
        if p.attr.mode & libc::S_IFMT == libc::S_IFLNK && follow {
            return None;
        }
        (nodeid, generation, attr) = (p.nodeid, p.generation, p.attr);
    }
    if flags & walk::DIRECTORY != 0 && attr.mode & libc::S_IFMT != libc::S_IFDIR {
        return None;
    }
    let e =
        EntryOut { nodeid, generation, entry_valid: 0, attr_valid: 0, entry_valid_nsec: 0, attr_valid_nsec: 0, attr };
    Some(Local::Found(e, entry, seq))
}

pub fn forget(c: &Client, nodeid: u64) {
    if nodeid == efuse_abi::ROOT_ID || nodeid == 0 {
        return;
    }
    // Nobody needs the answer: the daemon frees the slot when done.
    let _ = c.post(Opcode::Forget as u32, nodeid, &[ForgetIn { nlookup: 1 }.as_bytes()]);
}

pub fn getattr(c: &Client, nodeid: u64, fh: Option<u64>) -> R<Attr> {
    let inp = GetattrIn {
        getattr_flags: if fh.is_some() { efuse_abi::consts::GETATTR_FH } else { 0 },
        dummy: 0,
        fh: fh.unwrap_or(0),
    };
    let out: AttrOut = call_struct(c, Opcode::Getattr as u32, nodeid, &[inp.as_bytes()])?;
    Ok(out.attr)
}

pub fn setattr(c: &Client, nodeid: u64, inp: &SetattrIn) -> R<Attr> {
    let out: AttrOut = call_struct(c, Opcode::Setattr as u32, nodeid, &[inp.as_bytes()])?;
    Ok(out.attr)
}

pub fn open(c: &Client, nodeid: u64, flags: u32) -> R<OpenOut> {
    call_struct(c, Opcode::Open as u32, nodeid, &[OpenIn { flags, open_flags: 0 }.as_bytes()])
}

/// OPEN of a node found by [`walk_table`]: the daemon takes the lookup the
/// client will FORGET at close ([`efuse_bypass::wire::OPEN_ADOPT`]).
pub fn open_adopting(c: &Client, nodeid: u64, flags: u32) -> R<OpenOut> {
    let inp = OpenIn { flags, open_flags: efuse_bypass::wire::OPEN_ADOPT };
    call_struct(c, Opcode::Open as u32, nodeid, &[inp.as_bytes()])
}

/// [`open_adopting`] that also reads the file's first bytes with the open
/// ([`efuse_bypass::wire::OPEN_PREFETCH`]) and stashes them for this
/// thread's first read ([`crate::prefetch`]), tied to table entry `entry`
/// as it was at `seq`.
pub fn open_prefetching(c: &Client, nodeid: u64, flags: u32, entry: u32, seq: u32) -> R<OpenOut> {
    use efuse_bypass::wire::{PrefetchOut, OPEN_ADOPT, OPEN_PREFETCH, PREFETCH_MAX};
    let inp = OpenIn { flags, open_flags: OPEN_ADOPT | OPEN_PREFETCH };
    c.call(Opcode::Open as u32, nodeid, &[inp.as_bytes()], |err, payload| {
        if err != 0 {
            return Err(Fail::Errno(-err));
        }
        let (out, rest) = OpenOut::read_from_prefix(payload).map_err(|_| Fail::Broken)?;
        if let Ok((pf, data)) = PrefetchOut::read_from_prefix(rest) {
            let n = pf.len as usize;
            if pf.valid == 1 && n <= PREFETCH_MAX && n <= data.len() {
                crate::prefetch::stash(nodeid, entry, seq, &data[..n], PREFETCH_MAX);
            }
        }
        Ok(out)
    })?
}

/// CREATE: the new node's entry (one lookup held) and its open handle.
pub fn create(c: &Client, parent: u64, name: &[u8], flags: u32, mode: u32, umask: u32) -> R<(EntryOut, OpenOut)> {
    let inp = CreateIn { flags, mode, umask, open_flags: 0 };
    c.call(Opcode::Create as u32, parent, &[inp.as_bytes(), name, b"\0"], |err, p| {
        if err != 0 {
            return Err(Fail::Errno(-err));
        }
        let (e, rest) = EntryOut::read_from_prefix(p).map_err(|_| Fail::Broken)?;
        let (o, _) = OpenOut::read_from_prefix(rest).map_err(|_| Fail::Broken)?;
        Ok((e, o))
    })?
}

/// One READ of at most the slot's and the daemon's limit: bytes copied into `buf`.
pub fn read(c: &Client, nodeid: u64, fh: u64, offset: u64, buf: &mut [u8], flags: u32) -> R<usize> {
    let inp = ReadIn { fh, offset, size: buf.len() as u32, read_flags: 0, lock_owner: 0, flags, padding: 0 };
    c.call(Opcode::Read as u32, nodeid, &[inp.as_bytes()], |err, p| {
        if err != 0 {
            return Err(Fail::Errno(-err));
        }
        if p.len() > buf.len() {
            return Err(Fail::Broken);
        }
        buf[..p.len()].copy_from_slice(p);
        Ok(p.len())
    })?
}

/// One WRITE: bytes the daemon took.
pub fn write(c: &Client, nodeid: u64, fh: u64, offset: u64, data: &[u8], flags: u32) -> R<usize> {
    let inp = WriteIn { fh, offset, size: data.len() as u32, write_flags: 0, lock_owner: 0, flags, padding: 0 };
    let out: WriteOut = call_struct(c, Opcode::Write as u32, nodeid, &[inp.as_bytes(), data])?;
    if out.size as usize > data.len() {
        return Err(Fail::Broken);
    }
    Ok(out.size as usize)
}

/// FLUSH at close, unwaited: the library keeps no locks in the daemon and
/// every write was answered when made, so close has nothing to wait for.
pub fn flush(c: &Client, nodeid: u64, fh: u64) {
    let inp = FlushIn { fh, unused: 0, padding: 0, lock_owner: 0 };
    let _ = c.post(Opcode::Flush as u32, nodeid, &[inp.as_bytes()]);
}

/// RELEASE of handle `fh`; with `forget`, also the FORGET of one lookup of
/// the node ([`efuse_bypass::wire::RELEASE_FORGET`]).
pub fn release(c: &Client, nodeid: u64, fh: u64, flags: u32, forget: bool) {
    let release_flags = if forget { efuse_bypass::wire::RELEASE_FORGET } else { 0 };
    let inp = ReleaseIn { fh, flags, release_flags, lock_owner: 0 };
    // As the kernel's RELEASE: nothing waits for it (close has nothing to
    // report: every write was answered when made).
    let _ = c.post(Opcode::Release as u32, nodeid, &[inp.as_bytes()]);
}

pub fn fsync(c: &Client, nodeid: u64, fh: u64, datasync: bool) -> R<()> {
    let inp = FsyncIn { fh, fsync_flags: datasync as u32, padding: 0 };
    call_empty(c, Opcode::Fsync as u32, nodeid, &[inp.as_bytes()])
}

pub fn lseek(c: &Client, nodeid: u64, fh: u64, offset: u64, whence: u32) -> R<u64> {
    let inp = LseekIn { fh, offset, whence, padding: 0 };
    let out: LseekOut = call_struct(c, Opcode::Lseek as u32, nodeid, &[inp.as_bytes()])?;
    Ok(out.offset)
}

pub fn mkdir(c: &Client, parent: u64, name: &[u8], mode: u32, umask: u32) -> R<EntryOut> {
    call_struct(c, Opcode::Mkdir as u32, parent, &[MkdirIn { mode, umask }.as_bytes(), name, b"\0"])
}

pub fn unlink(c: &Client, parent: u64, name: &[u8], dir: bool) -> R<()> {
    let op = if dir { Opcode::Rmdir } else { Opcode::Unlink };
    call_empty(c, op as u32, parent, &[name, b"\0"])
}

pub fn rename(c: &Client, olddir: u64, old: &[u8], newdir: u64, new: &[u8], flags: u32) -> R<()> {
    if flags == 0 {
        let inp = RenameIn { newdir };
        call_empty(c, Opcode::Rename as u32, olddir, &[inp.as_bytes(), old, b"\0", new, b"\0"])
    } else {
        let inp = Rename2In { newdir, flags, padding: 0 };
        call_empty(c, Opcode::Rename2 as u32, olddir, &[inp.as_bytes(), old, b"\0", new, b"\0"])
    }
}

pub fn link(c: &Client, node: u64, newparent: u64, name: &[u8]) -> R<EntryOut> {
    call_struct(c, Opcode::Link as u32, newparent, &[LinkIn { oldnodeid: node }.as_bytes(), name, b"\0"])
}

pub fn symlink(c: &Client, parent: u64, name: &[u8], target: &[u8]) -> R<EntryOut> {
    call_struct(c, Opcode::Symlink as u32, parent, &[name, b"\0", target, b"\0"])
}

/// READLINK: the target's length, its first `buf.len()` bytes copied.
pub fn readlink(c: &Client, node: u64, buf: &mut [u8]) -> R<usize> {
    c.call(Opcode::Readlink as u32, node, &[], |err, p| {
        if err != 0 {
            return Err(Fail::Errno(-err));
        }
        let n = p.len().min(buf.len());
        buf[..n].copy_from_slice(&p[..n]);
        Ok(n)
    })?
}

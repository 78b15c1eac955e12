//! Typed replies: one object per request, consumed by the single answer it gives.
//!
//! A reply object owns the request's `unique` and a handle to the channel the
//! request came from, so a file system may answer from another thread. A reply
//! dropped without an answer sends EIO (and logs it), so the kernel never waits
//! forever on a forgotten request.

use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use efuse_abi::structs as abi;
use efuse_abi::Opcode;
use zerocopy::IntoBytes;

use crate::connection::BackingId;
use crate::session::SessionShared;
use crate::types::{Entry, Errno, FileAttr, FileLock, Statfs};

/// One reply, as a transport sends it.
#[derive(Clone, Copy)]
pub struct Reply<'a> {
    pub opcode: Opcode,
    pub unique: u64,
    /// 0 or a negative errno.
    pub error: i32,
    /// What follows the out header.
    pub payload: &'a [IoSlice<'a>],
    /// What a successful reply hands the kernel (a lookup, an open handle),
    /// to be taken back if the kernel refuses the reply.
    pub grant: Grant<'a>,
}

/// What a reply hands the kernel that the file system must take back if
/// the kernel refuses the reply (the request is gone: the connection was
/// aborted, or the request was interrupted on a kernel that drops
/// interrupted requests). libfuse does the same: a refused entry is
/// forgotten, a refused open released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Grant<'a> {
    #[default]
    Nothing,
    /// One lookup of `nodeid` (LOOKUP, MKNOD, MKDIR, SYMLINK, LINK).
    Lookup { nodeid: u64 },
    /// An open handle (OPEN, OPENDIR when `dir`); `flags` are the open flags.
    Open { ino: u64, fh: u64, flags: i32, dir: bool },
    /// CREATE and TMPFILE: one lookup and an open handle.
    Create { nodeid: u64, fh: u64, flags: i32 },
    /// READDIRPLUS: one lookup of each node id.
    Lookups(&'a [u64]),
}

/// A [`Grant`] whose reply the kernel refused: handed to
/// [`Filesystem::refused`](crate::Filesystem::refused) to undo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    Lookup { nodeid: u64 },
    Open { ino: u64, fh: u64, flags: i32, dir: bool },
    Create { nodeid: u64, fh: u64, flags: i32 },
    Lookups(Vec<u64>),
}

impl Grant<'_> {
    /// The owned form, or None when nothing was granted.
    pub fn to_refused(self) -> Option<Refused> {
        match self {
            Grant::Nothing | Grant::Lookup { nodeid: 0 } => None,
            Grant::Lookup { nodeid } => Some(Refused::Lookup { nodeid }),
            Grant::Open { ino, fh, flags, dir } => Some(Refused::Open { ino, fh, flags, dir }),
            Grant::Create { nodeid, fh, flags } => Some(Refused::Create { nodeid, fh, flags }),
            Grant::Lookups([]) => None,
            Grant::Lookups(ids) => Some(Refused::Lookups(ids.to_vec())),
        }
    }
}

/// Where replies go: a /dev/fuse fd, a ring entry, or a test buffer.
pub trait ReplySink: Send + Sync {
    /// Sends one reply. Failures are the sink's to handle: the kernel forgets
    /// requests whose connection was aborted; a sink that learns the kernel
    /// refused a reply carrying a [`Grant`] hands it to
    /// [`SessionShared::refused`] (now or, for a transport that learns it
    /// later, then), so the file system takes it back.
    fn send(&self, reply: &Reply<'_>);

    /// The session whose requests this sink answers: replies are counted
    /// there and end the request's tracking (interrupts).
    fn session(&self) -> Option<&SessionShared> {
        None
    }
}

/// The common part of every reply object.
pub(crate) struct Responder {
    unique: u64,
    opcode: Opcode,
    sink: Option<Arc<dyn ReplySink>>,
}

impl Responder {
    pub(crate) fn new(unique: u64, opcode: Opcode, sink: Arc<dyn ReplySink>) -> Responder {
        Responder { unique, opcode, sink: Some(sink) }
    }

    /// A responder whose answer goes nowhere: for calls the session makes on
    /// its own account (undoing a refused reply), which no kernel waits for.
    pub(crate) fn nowhere(opcode: Opcode) -> Responder {
        Responder { unique: 0, opcode, sink: None }
    }

    fn send(mut self, error: i32, payload: &[IoSlice<'_>], grant: Grant<'_>) {
        if let Some(sink) = self.sink.take() {
            deliver(&*sink, &Reply { opcode: self.opcode, unique: self.unique, error, payload, grant });
        }
    }

    fn count_open_path(&self, open_flags: u32) {
        if self.opcode == Opcode::Opendir {
            return;
        }
        if let Some(c) = self.sink.as_ref().and_then(|s| s.session()) {
            c.counters.open_path(open_flags);
        }
    }

    pub(crate) fn error_raw(self, errno: i32) {
        self.send(-errno, &[], Grant::Nothing)
    }

    fn ok(self, payload: &[IoSlice<'_>]) {
        self.send(0, payload, Grant::Nothing)
    }

    fn granting(self, payload: &[IoSlice<'_>], grant: Grant<'_>) {
        self.send(0, payload, grant)
    }

    fn error(self, e: Errno) {
        self.send(-e.raw(), &[], Grant::Nothing)
    }
}

/// Counts an error reply, sends it, and ends the request's tracking.
fn deliver(sink: &dyn ReplySink, reply: &Reply<'_>) {
    let session = sink.session();
    if reply.error != 0 {
        if let Some(s) = session {
            s.counters.error(reply.opcode);
        }
    }
    sink.send(reply);
    if let Some(s) = session {
        s.interrupts.finished(reply.unique);
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(sink) = self.sink.take() {
            tracing::warn!(
                opcode = self.opcode.name(),
                unique = self.unique,
                "request dropped without a reply; answering EIO"
            );
            let reply = Reply {
                opcode: self.opcode,
                unique: self.unique,
                error: -libc::EIO,
                payload: &[],
                grant: Grant::Nothing,
            };
            deliver(&*sink, &reply);
        }
    }
}

macro_rules! reply_type {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        pub struct $name(pub(crate) Responder);

        impl $name {
            /// Answers with an error.
            pub fn error(self, e: Errno) {
                self.0.error(e)
            }

            pub(crate) fn new(r: Responder) -> Self {
                $name(r)
            }
        }
    };
}

reply_type!(
    /// Answer to LOOKUP, MKNOD, MKDIR, SYMLINK, LINK: an [`Entry`].
    ReplyEntry
);
impl ReplyEntry {
    /// Answers with `e`; a non-zero node id adds one to its lookup count.
    pub fn entry(self, e: &Entry) {
        let out = e.to_abi();
        self.0.granting(&[IoSlice::new(out.as_bytes())], Grant::Lookup { nodeid: e.nodeid })
    }
}

/// Answer to GETATTR and SETATTR: attributes and how long they may be cached.
pub struct ReplyAttr {
    r: Responder,
    /// Answers a STATX request on behalf of a file system without `statx`.
    as_statx: bool,
}

impl ReplyAttr {
    pub(crate) fn new(r: Responder) -> ReplyAttr {
        ReplyAttr { r, as_statx: false }
    }

    pub fn attr(self, attr: &FileAttr, ttl: Duration) {
        if self.as_statx {
            return ReplyStatx(self.r).statx(attr, ttl);
        }
        let out = abi::AttrOut {
            attr_valid: ttl.as_secs(),
            attr_valid_nsec: ttl.subsec_nanos(),
            dummy: 0,
            attr: attr.to_abi(),
        };
        self.r.ok(&[IoSlice::new(out.as_bytes())])
    }

    pub fn error(self, e: Errno) {
        self.r.error(e)
    }
}

reply_type!(
    /// Answer to STATX: attributes including birth time when known.
    ReplyStatx
);
impl ReplyStatx {
    pub fn statx(self, attr: &FileAttr, ttl: Duration) {
        let out = abi::StatxOut {
            attr_valid: ttl.as_secs(),
            attr_valid_nsec: ttl.subsec_nanos(),
            flags: 0,
            spare: [0; 2],
            stat: attr.to_statx(),
        };
        self.0.ok(&[IoSlice::new(out.as_bytes())])
    }

    /// A GETATTR reply object that answers this STATX request, for file
    /// systems that implement only `getattr`.
    pub fn into_attr(self) -> ReplyAttr {
        ReplyAttr { r: self.0, as_statx: true }
    }
}

reply_type!(
    /// Answer carrying bytes: READ, READLINK.
    ReplyData
);
impl ReplyData {
    pub fn data(self, data: &[u8]) {
        self.0.ok(&[IoSlice::new(data)])
    }

    /// Answers with the concatenation of several buffers, copied once by the kernel.
    pub fn data_vectored(self, parts: &[IoSlice<'_>]) {
        self.0.ok(parts)
    }
}

reply_type!(
    /// Answer with no payload: UNLINK, RMDIR, RENAME, FLUSH, RELEASE, FSYNC, ...
    ReplyEmpty
);
impl ReplyEmpty {
    pub fn ok(self) {
        self.0.ok(&[])
    }

    /// A reply object whose answer goes nowhere, for calls into the file
    /// system that no kernel request waits for.
    pub(crate) fn nowhere(opcode: Opcode) -> ReplyEmpty {
        ReplyEmpty(Responder::nowhere(opcode))
    }
}

/// Answer to OPEN and OPENDIR: a file handle and `FOPEN_*` flags.
pub struct ReplyOpen {
    r: Responder,
    /// The node opened and the open flags, to release a refused handle.
    ino: u64,
    flags: i32,
    /// `FOPEN_*` flags the session adds to the file system's (FOPEN_NOFLUSH).
    session_flags: u32,
}

impl ReplyOpen {
    pub(crate) fn new(r: Responder, ino: u64, flags: i32, session_flags: u32) -> ReplyOpen {
        ReplyOpen { r, ino, flags, session_flags }
    }

    /// Answers with an error.
    pub fn error(self, e: Errno) {
        self.r.error(e)
    }

    pub fn opened(self, fh: u64, open_flags: u32) {
        self.send(fh, open_flags, 0)
    }

    /// Opens with FUSE passthrough: the kernel serves reads, writes and mmap
    /// from `backing` without asking the daemon.
    pub fn opened_passthrough(self, fh: u64, open_flags: u32, backing: BackingId) {
        self.send(fh, open_flags | efuse_abi::consts::fopen::PASSTHROUGH, backing.raw())
    }

    fn send(self, fh: u64, open_flags: u32, backing_id: i32) {
        let out = abi::OpenOut { fh, open_flags: open_flags | self.session_flags, backing_id };
        self.r.count_open_path(open_flags);
        let dir = self.r.opcode == Opcode::Opendir;
        let grant = Grant::Open { ino: self.ino, fh, flags: self.flags, dir };
        self.r.granting(&[IoSlice::new(out.as_bytes())], grant)
    }
}

/// Answer to CREATE: the new entry and its open file handle.
pub struct ReplyCreate {
    r: Responder,
    /// The open flags, to release a refused handle.
    flags: i32,
    /// `FOPEN_*` flags the session adds to the file system's (FOPEN_NOFLUSH).
    session_flags: u32,
}

impl ReplyCreate {
    pub(crate) fn new(r: Responder, flags: i32, session_flags: u32) -> ReplyCreate {
        ReplyCreate { r, flags, session_flags }
    }

    /// Answers with an error.
    pub fn error(self, e: Errno) {
        self.r.error(e)
    }

    pub fn created(self, entry: &Entry, fh: u64, open_flags: u32) {
        self.send(entry, fh, open_flags, 0)
    }

    /// Creates and opens with FUSE passthrough (see [`ReplyOpen::opened_passthrough`]).
    pub fn created_passthrough(self, entry: &Entry, fh: u64, open_flags: u32, backing: BackingId) {
        self.send(entry, fh, open_flags | efuse_abi::consts::fopen::PASSTHROUGH, backing.raw())
    }

    fn send(self, entry: &Entry, fh: u64, open_flags: u32, backing_id: i32) {
        let e = entry.to_abi();
        let o = abi::OpenOut { fh, open_flags: open_flags | self.session_flags, backing_id };
        self.r.count_open_path(open_flags);
        let grant = Grant::Create { nodeid: entry.nodeid, fh, flags: self.flags };
        self.r.granting(&[IoSlice::new(e.as_bytes()), IoSlice::new(o.as_bytes())], grant)
    }
}

reply_type!(
    /// Answer to WRITE: bytes written.
    ReplyWrite
);
impl ReplyWrite {
    pub fn written(self, size: u32) {
        let out = abi::WriteOut { size, padding: 0 };
        self.0.ok(&[IoSlice::new(out.as_bytes())])
    }
}

reply_type!(
    /// Answer to COPY_FILE_RANGE and COPY_FILE_RANGE_64: bytes copied.
    ReplyCopy
);
impl ReplyCopy {
    pub fn copied(self, bytes: u64) {
        if self.0.opcode == Opcode::CopyFileRange64 {
            let out = abi::CopyFileRangeOut { bytes_copied: bytes };
            self.0.ok(&[IoSlice::new(out.as_bytes())])
        } else {
            // The 32-bit reply cannot carry more; the kernel asked for at most that.
            let out = abi::WriteOut { size: bytes.min(u32::MAX as u64) as u32, padding: 0 };
            self.0.ok(&[IoSlice::new(out.as_bytes())])
        }
    }
}

reply_type!(
    /// Answer to STATFS.
    ReplyStatfs
);
impl ReplyStatfs {
    pub fn statfs(self, s: &Statfs) {
        let out = abi::StatfsOut {
            st: abi::Kstatfs {
                blocks: s.blocks,
                bfree: s.bfree,
                bavail: s.bavail,
                files: s.files,
                ffree: s.ffree,
                bsize: s.bsize,
                namelen: s.namelen,
                frsize: s.frsize,
                padding: 0,
                spare: [0; 6],
            },
        };
        self.0.ok(&[IoSlice::new(out.as_bytes())])
    }
}

reply_type!(
    /// Answer to GETXATTR and LISTXATTR: the size needed (when asked with size 0)
    /// or the data.
    ReplyXattr
);
impl ReplyXattr {
    pub fn size(self, size: u32) {
        let out = abi::GetxattrOut { size, padding: 0 };
        self.0.ok(&[IoSlice::new(out.as_bytes())])
    }
    pub fn data(self, data: &[u8]) {
        self.0.ok(&[IoSlice::new(data)])
    }
}

reply_type!(
    /// Answer to GETLK: the conflicting lock, or one of type `F_UNLCK`.
    ReplyLock
);
impl ReplyLock {
    pub fn locked(self, lk: &FileLock) {
        let out = abi::LkOut { lk: abi::FileLock { start: lk.start, end: lk.end, typ: lk.typ as u32, pid: lk.pid } };
        self.0.ok(&[IoSlice::new(out.as_bytes())])
    }
}

reply_type!(
    /// Answer to LSEEK (SEEK_DATA / SEEK_HOLE).
    ReplyLseek
);
impl ReplyLseek {
    pub fn offset(self, offset: u64) {
        let out = abi::LseekOut { offset };
        self.0.ok(&[IoSlice::new(out.as_bytes())])
    }
}

reply_type!(
    /// Answer to BMAP.
    ReplyBmap
);
impl ReplyBmap {
    pub fn block(self, block: u64) {
        let out = abi::BmapOut { block };
        self.0.ok(&[IoSlice::new(out.as_bytes())])
    }
}

thread_local! {
    /// Directory listing buffers are reused per thread, so READDIR allocates
    /// nothing once warm.
    static DIR_BUFFER: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

fn take_dir_buffer(limit: usize) -> Vec<u8> {
    let mut buf = DIR_BUFFER.with(|b| b.take());
    buf.clear();
    buf.reserve(limit);
    buf
}

fn return_dir_buffer(buf: Vec<u8>) {
    DIR_BUFFER.with(|b| {
        let old = b.take();
        b.set(if old.capacity() > buf.capacity() { old } else { buf });
    });
}

/// Answer to READDIR: entries are added until the kernel's buffer is full.
pub struct ReplyDirectory {
    r: Responder,
    buf: Vec<u8>,
    limit: usize,
}

impl ReplyDirectory {
    pub(crate) fn new(r: Responder, limit: usize) -> ReplyDirectory {
        ReplyDirectory { r, buf: take_dir_buffer(limit), limit }
    }

    /// Adds one entry. `offset` is the cookie the kernel passes back to continue
    /// after this entry; `kind` is the file type bits (`S_IFDIR`, ...) or 0.
    /// Returns false when the entry did not fit: stop and call [`ok`](Self::ok).
    #[must_use]
    pub fn add(&mut self, ino: u64, offset: u64, kind: u32, name: &std::ffi::OsStr) -> bool {
        use std::os::unix::ffi::OsStrExt;
        efuse_abi::encode::push_dirent(&mut self.buf, self.limit, ino, offset, kind >> 12, name.as_bytes())
    }

    /// Sends what was added (nothing added means end of directory).
    pub fn ok(self) {
        let ReplyDirectory { r, buf, .. } = self;
        r.ok(&[IoSlice::new(&buf)]);
        return_dir_buffer(buf);
    }

    pub fn error(self, e: Errno) {
        let ReplyDirectory { r, buf, .. } = self;
        r.error(e);
        return_dir_buffer(buf);
    }
}

/// Answer to READDIRPLUS: entries with their attributes.
///
/// Every entry added with a non-zero `nodeid` counts as a lookup, exactly as
/// a LOOKUP reply does, except the entries "." and "..", which the kernel
/// ignores. An entry that did not fit was not sent: take no lookup for it.
pub struct ReplyDirectoryPlus {
    r: Responder,
    buf: Vec<u8>,
    limit: usize,
    /// Node ids whose lookup the reply carries, to give back if refused.
    lookups: Vec<u64>,
}

thread_local! {
    static LOOKUP_BUFFER: std::cell::Cell<Vec<u64>> = const { std::cell::Cell::new(Vec::new()) };
}

impl ReplyDirectoryPlus {
    pub(crate) fn new(r: Responder, limit: usize) -> ReplyDirectoryPlus {
        let mut lookups = LOOKUP_BUFFER.with(|b| b.take());
        lookups.clear();
        ReplyDirectoryPlus { r, buf: take_dir_buffer(limit), limit, lookups }
    }

    /// Whether an entry with a name of `namelen` bytes still fits.
    pub fn fits(&self, namelen: usize) -> bool {
        self.buf.len() + efuse_abi::encode::direntplus_size(namelen) <= self.limit
    }

    /// Adds one entry; returns false when it did not fit.
    #[must_use]
    pub fn add(&mut self, entry: &Entry, offset: u64, name: &std::ffi::OsStr) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let e = entry.to_abi();
        let name = name.as_bytes();
        let added =
            efuse_abi::encode::push_direntplus(&mut self.buf, self.limit, &e, offset, entry.attr.mode >> 12, name);
        if added && entry.nodeid != 0 && name != b"." && name != b".." {
            self.lookups.push(entry.nodeid);
        }
        added
    }

    pub fn ok(self) {
        let ReplyDirectoryPlus { r, buf, lookups, .. } = self;
        r.granting(&[IoSlice::new(&buf)], Grant::Lookups(&lookups));
        return_dir_buffer(buf);
        LOOKUP_BUFFER.with(|b| b.set(lookups));
    }

    pub fn error(self, e: Errno) {
        let ReplyDirectoryPlus { r, buf, lookups, .. } = self;
        r.error(e);
        return_dir_buffer(buf);
        LOOKUP_BUFFER.with(|b| b.set(lookups));
    }
}

/// A sink that keeps replies in memory: for unit tests of file systems and of
/// the session, without a kernel. [`Session::memory_sink`](crate::Session::memory_sink)
/// makes one that belongs to a session (replies counted, requests tracked
/// for interrupts); [`refuse`](Self::refuse) makes it act as a kernel that
/// refuses replies.
#[derive(Default)]
pub struct MemorySink {
    pub replies: std::sync::Mutex<Vec<RecordedReply>>,
    session: Option<Arc<SessionShared>>,
    refusing: std::sync::atomic::AtomicBool,
}

/// One reply kept by [`MemorySink`]: opcode, unique, error, payload.
pub type RecordedReply = (Opcode, u64, i32, Vec<u8>);

impl MemorySink {
    pub(crate) fn for_session(session: Arc<SessionShared>) -> MemorySink {
        MemorySink { session: Some(session), ..Default::default() }
    }

    /// From now on (`on`) the sink refuses replies as the kernel does for a
    /// request that is gone: they are not recorded, and what they granted is
    /// handed back to the session to undo.
    pub fn refuse(&self, on: bool) {
        self.refusing.store(on, std::sync::atomic::Ordering::Relaxed);
    }
}

impl ReplySink for MemorySink {
    fn send(&self, reply: &Reply<'_>) {
        let mut data = Vec::new();
        for p in reply.payload {
            data.extend_from_slice(p);
        }
        let refused = self.refusing.load(std::sync::atomic::Ordering::Relaxed);
        if refused {
            if let (Some(s), Some(g)) = (&self.session, reply.grant.to_refused()) {
                s.refused(g);
            }
        } else if let Ok(mut r) = self.replies.lock() {
            r.push((reply.opcode, reply.unique, reply.error, data));
        }
    }

    fn session(&self) -> Option<&SessionShared> {
        self.session.as_deref()
    }
}

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
use crate::stats::Counters;
use crate::types::{Entry, Errno, FileAttr, FileLock, Statfs};

/// Where replies go: a /dev/fuse fd, a ring entry, or a test buffer.
pub trait ReplySink: Send + Sync {
    /// Sends one reply. `error` is 0 or a negative errno; `payload` follows the
    /// out header. Failures are the sink's to log: the kernel forgets requests
    /// that were interrupted or whose connection was aborted.
    fn send(&self, opcode: Opcode, unique: u64, error: i32, payload: &[IoSlice<'_>]);

    /// The session's counters, where replies are counted.
    fn counters(&self) -> Option<&Counters> {
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

    fn send(mut self, error: i32, payload: &[IoSlice<'_>]) {
        if let Some(sink) = self.sink.take() {
            if error != 0 {
                if let Some(c) = sink.counters() {
                    c.error(self.opcode);
                }
            }
            sink.send(self.opcode, self.unique, error, payload);
        }
    }

    fn count_open_path(&self, open_flags: u32) {
        if self.opcode == Opcode::Opendir {
            return;
        }
        if let Some(c) = self.sink.as_ref().and_then(|s| s.counters()) {
            c.open_path(open_flags);
        }
    }

    pub(crate) fn error_raw(self, errno: i32) {
        self.send(-errno, &[])
    }

    fn ok(self, payload: &[IoSlice<'_>]) {
        self.send(0, payload)
    }

    fn error(self, e: Errno) {
        self.send(-e.raw(), &[])
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
            if let Some(c) = sink.counters() {
                c.error(self.opcode);
            }
            sink.send(self.opcode, self.unique, -libc::EIO, &[]);
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
    pub fn entry(self, e: &Entry) {
        let out = e.to_abi();
        self.0.ok(&[IoSlice::new(out.as_bytes())])
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
}

reply_type!(
    /// Answer to OPEN and OPENDIR: a file handle and `FOPEN_*` flags.
    ReplyOpen
);
impl ReplyOpen {
    pub fn opened(self, fh: u64, open_flags: u32) {
        self.send(fh, open_flags, 0)
    }

    /// Opens with FUSE passthrough: the kernel serves reads, writes and mmap
    /// from `backing` without asking the daemon.
    pub fn opened_passthrough(self, fh: u64, open_flags: u32, backing: BackingId) {
        self.send(fh, open_flags | efuse_abi::consts::fopen::PASSTHROUGH, backing.raw())
    }

    fn send(self, fh: u64, open_flags: u32, backing_id: i32) {
        let out = abi::OpenOut { fh, open_flags, backing_id };
        self.0.count_open_path(open_flags);
        self.0.ok(&[IoSlice::new(out.as_bytes())])
    }
}

reply_type!(
    /// Answer to CREATE: the new entry and its open file handle.
    ReplyCreate
);
impl ReplyCreate {
    pub fn created(self, entry: &Entry, fh: u64, open_flags: u32) {
        self.send(entry, fh, open_flags, 0)
    }

    /// Creates and opens with FUSE passthrough (see [`ReplyOpen::opened_passthrough`]).
    pub fn created_passthrough(self, entry: &Entry, fh: u64, open_flags: u32, backing: BackingId) {
        self.send(entry, fh, open_flags | efuse_abi::consts::fopen::PASSTHROUGH, backing.raw())
    }

    fn send(self, entry: &Entry, fh: u64, open_flags: u32, backing_id: i32) {
        let e = entry.to_abi();
        let o = abi::OpenOut { fh, open_flags, backing_id };
        self.0.count_open_path(open_flags);
        self.0.ok(&[IoSlice::new(e.as_bytes()), IoSlice::new(o.as_bytes())])
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
}

impl ReplyDirectoryPlus {
    pub(crate) fn new(r: Responder, limit: usize) -> ReplyDirectoryPlus {
        ReplyDirectoryPlus { r, buf: take_dir_buffer(limit), limit }
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
        efuse_abi::encode::push_direntplus(
            &mut self.buf,
            self.limit,
            &e,
            offset,
            entry.attr.mode >> 12,
            name.as_bytes(),
        )
    }

    pub fn ok(self) {
        let ReplyDirectoryPlus { r, buf, .. } = self;
        r.ok(&[IoSlice::new(&buf)]);
        return_dir_buffer(buf);
    }

    pub fn error(self, e: Errno) {
        let ReplyDirectoryPlus { r, buf, .. } = self;
        r.error(e);
        return_dir_buffer(buf);
    }
}

/// A sink that keeps replies in memory: for unit tests of file systems and of
/// the session, without a kernel.
#[derive(Default)]
pub struct MemorySink {
    pub replies: std::sync::Mutex<Vec<RecordedReply>>,
}

/// One reply kept by [`MemorySink`]: opcode, unique, error, payload.
pub type RecordedReply = (Opcode, u64, i32, Vec<u8>);

impl ReplySink for MemorySink {
    fn send(&self, opcode: Opcode, unique: u64, error: i32, payload: &[IoSlice<'_>]) {
        let mut data = Vec::new();
        for p in payload {
            data.extend_from_slice(p);
        }
        if let Ok(mut r) = self.replies.lock() {
            r.push((opcode, unique, error, data));
        }
    }
}

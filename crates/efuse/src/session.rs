//! The session: INIT negotiation, then decode each request, call the file
//! system, and let the typed reply encode the answer.
//!
//! A session is shared by all transport workers (`Arc<Session<F>>`); it holds
//! no lock on the request path. Counters are atomics; the interrupt set is
//! consulted only when the kernel has sent an INTERRUPT.

use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use efuse_abi::consts::{fattr, init, release, write as wflags, FSYNC_FDATASYNC, GETATTR_FH, LK_FLOCK};
use efuse_abi::request::parse_header;
use efuse_abi::structs as abi;
use efuse_abi::{Opcode, Operation, ProtocolOptions, Request};
use zerocopy::IntoBytes;

use crate::filesystem::{Filesystem, InitInfo};
use crate::reply::*;
use crate::stats::Counters;
use crate::types::*;

/// Largest WRITE (and READ) efuse negotiates: 1 MiB, 256 pages.
pub const MAX_WRITE: u32 = 1 << 20;
/// Bytes a request buffer needs beyond `MAX_WRITE` for headers (as libfuse).
pub const BUFFER_HEADER_SIZE: usize = 4096;
/// Request buffer size a transport must provide.
pub const REQUEST_BUFFER_SIZE: usize = MAX_WRITE as usize + BUFFER_HEADER_SIZE;

/// Requests in flight, and the interrupts the kernel sent for them.
///
/// Every request that expects a reply is tracked from dispatch until its
/// reply (`begin` / `finished`, sharded by `unique` so that threads rarely
/// meet on a lock). An INTERRUPT marks its target and runs the waker the
/// handler registered ([`RequestContext::on_interrupt`]). An INTERRUPT whose
/// target is not in flight was either sent for a request already answered,
/// or read by another thread a moment before its target was dispatched: it
/// waits as an orphan for its target for [`ORPHAN_GRACE`], then is answered
/// EAGAIN (the kernel sends it again if the request is still pending) and
/// forgotten, so nothing about an answered request stays recorded.
pub struct Interrupts {
    shards: Box<[Mutex<Vec<Tracked>>]>,
    orphans: Mutex<Vec<Orphan>>,
    has_orphans: AtomicBool,
}

struct Tracked {
    unique: u64,
    interrupted: bool,
    waker: Option<Box<dyn FnOnce() + Send>>,
}

struct Orphan {
    target: u64,
    /// The INTERRUPT request's own unique (target | FUSE_INT_REQ_BIT).
    unique: u64,
    sink: Arc<dyn ReplySink>,
    since: Instant,
}

/// How long an INTERRUPT waits for a target that is not (yet) in flight.
pub const ORPHAN_GRACE: std::time::Duration = std::time::Duration::from_millis(50);
const INTERRUPT_SHARDS: usize = 32;

impl Default for Interrupts {
    fn default() -> Self {
        Interrupts {
            shards: (0..INTERRUPT_SHARDS).map(|_| Mutex::new(Vec::new())).collect(),
            orphans: Mutex::new(Vec::new()),
            has_orphans: AtomicBool::new(false),
        }
    }
}

impl std::fmt::Debug for Interrupts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interrupts").field("in_flight", &self.in_flight()).finish_non_exhaustive()
    }
}

fn lock_ignoring_poison<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Interrupts {
    fn shard(&self, unique: u64) -> std::sync::MutexGuard<'_, Vec<Tracked>> {
        // Uniques step by two (bit 0 marks interrupts): skip that bit.
        lock_ignoring_poison(&self.shards[(unique >> 1) as usize % INTERRUPT_SHARDS])
    }

    /// A request starts: track it until [`finished`](Self::finished).
    pub(crate) fn begin(&self, unique: u64) {
        self.shard(unique).push(Tracked { unique, interrupted: false, waker: None });
        // Pairs with the fence in `interrupt`: either this sees its orphan,
        // or it sees this request in flight.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.has_orphans.load(Ordering::SeqCst) {
            self.adopt(unique);
        }
    }

    /// The request's reply was sent.
    pub(crate) fn finished(&self, unique: u64) {
        let mut s = self.shard(unique);
        if let Some(i) = s.iter().position(|t| t.unique == unique) {
            s.swap_remove(i);
        }
    }

    /// The kernel sent INTERRUPT `unique` for request `target`, on `sink`.
    pub(crate) fn interrupt(&self, target: u64, unique: u64, sink: &Arc<dyn ReplySink>) {
        // Unique 0 is no request of the kernel's (a reply with it would be
        // read as a notification): nothing to answer, nothing to keep.
        if self.wake(target) || unique == 0 {
            return;
        }
        {
            let mut o = lock_ignoring_poison(&self.orphans);
            o.push(Orphan { target, unique, sink: sink.clone(), since: Instant::now() });
            self.has_orphans.store(true, Ordering::SeqCst);
        }
        // The target may have begun between the look above and the push
        // (its `begin` then missed the orphan): look again.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.wake(target) {
            let mut o = lock_ignoring_poison(&self.orphans);
            o.retain(|x| x.unique != unique);
            self.has_orphans.store(!o.is_empty(), Ordering::SeqCst);
        }
    }

    /// Marks `target` interrupted and runs its waker; false if not in flight.
    fn wake(&self, target: u64) -> bool {
        let waker = {
            let mut s = self.shard(target);
            let Some(t) = s.iter_mut().find(|t| t.unique == target) else { return false };
            t.interrupted = true;
            t.waker.take()
        };
        if let Some(w) = waker {
            w();
        }
        true
    }

    /// A request began while orphans wait: hands it its interrupt, if one
    /// came early, and retires orphans past their grace.
    fn adopt(&self, unique: u64) {
        let now = Instant::now();
        let (mine, expired) = {
            let mut o = lock_ignoring_poison(&self.orphans);
            let mut mine = false;
            let mut expired = Vec::new();
            o.retain(|x| {
                if x.target == unique {
                    mine = true;
                    false
                } else if now.duration_since(x.since) >= ORPHAN_GRACE {
                    expired.push((x.unique, x.sink.clone()));
                    false
                } else {
                    true
                }
            });
            self.has_orphans.store(!o.is_empty(), Ordering::SeqCst);
            (mine, expired)
        };
        if mine {
            self.wake(unique);
        }
        for (u, sink) in expired {
            // The kernel queues the interrupt again if its request still
            // waits; for an answered request it drops it.
            let reply = Reply {
                opcode: Opcode::Interrupt,
                unique: u,
                error: -libc::EAGAIN,
                payload: &[],
                grant: Grant::Nothing,
            };
            sink.send(&reply);
        }
    }

    pub(crate) fn contains(&self, unique: u64) -> bool {
        self.shard(unique).iter().any(|t| t.unique == unique && t.interrupted)
    }

    /// Registers `f` to run once when request `unique` is interrupted.
    /// Err(f) when it already was (the caller acts on it at once); a request
    /// that is not tracked never runs `f`.
    pub(crate) fn on_interrupt<F: FnOnce() + Send + 'static>(&self, unique: u64, f: F) -> Result<(), F> {
        let mut s = self.shard(unique);
        match s.iter_mut().find(|t| t.unique == unique) {
            Some(t) if t.interrupted => Err(f),
            Some(t) => {
                t.waker = Some(Box::new(f));
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.shards.iter().map(|s| lock_ignoring_poison(s).len()).sum()
    }

    /// INTERRUPTs waiting for their target.
    pub fn orphans(&self) -> usize {
        lock_ignoring_poison(&self.orphans).len()
    }
}

/// Kernel features a mount asks for. Each is negotiated only when the kernel
/// offers it and the file system declares it can honour it
/// ([`Capabilities`]); anything else is left off with no error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// READDIRPLUS (adaptive): listings carry attributes, saving LOOKUPs.
    pub readdirplus: bool,
    /// The kernel caches symlink targets.
    pub cache_symlinks: bool,
    /// The kernel's writeback cache for buffered writes (excludes passthrough).
    pub writeback_cache: bool,
    /// FUSE passthrough: opened files may be served by the kernel from a backing file.
    pub passthrough: bool,
    /// No OPEN/RELEASE round trips (excludes passthrough); needs a file system
    /// with stateless opens.
    pub no_open: bool,
    /// No OPENDIR/RELEASEDIR round trips (the kernel caches listings); needs
    /// a file system with stateless directory opens.
    pub no_opendir: bool,
    /// POSIX and flock locks are kept by the daemon (when the file system
    /// implements them) rather than by the kernel locally.
    pub daemon_locks: bool,
}

impl Features {
    /// libfuse's behaviour: the "plain FUSE" baseline of `--profile plain`.
    pub const PLAIN: Features = Features {
        readdirplus: false,
        cache_symlinks: false,
        writeback_cache: false,
        passthrough: false,
        no_open: false,
        no_opendir: false,
        daemon_locks: true,
    };

    /// Everything that keeps answers exact and saves round trips. Locks are
    /// kept by the kernel (exact on a local mount), so a close needs no FLUSH;
    /// directories are listed without OPENDIR/RELEASEDIR where the file
    /// system's listings may be cached.
    pub const DEFAULT: Features = Features {
        readdirplus: true,
        cache_symlinks: true,
        writeback_cache: false,
        passthrough: true,
        no_open: false,
        no_opendir: true,
        daemon_locks: false,
    };
}

impl Default for Features {
    fn default() -> Self {
        Features::DEFAULT
    }
}

/// Per-mount settings the session negotiates with.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Log every request (the `debug` mount option).
    pub debug: bool,
    /// Largest WRITE to accept; at most [`MAX_WRITE`].
    pub max_write: u32,
    /// Name of the file system, for reports.
    pub fs_name: String,
    /// Kernel features to ask for.
    pub features: Features,
    /// Ask for FUSE_OVER_IO_URING at INIT: set by the transport when it will
    /// register ring queues after INIT (the kernel then waits for them).
    pub over_io_uring: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            debug: false,
            max_write: MAX_WRITE,
            fs_name: "efuse".into(),
            features: Features::DEFAULT,
            over_io_uring: false,
        }
    }
}

/// Whether this process may register passthrough backing files
/// (CAP_SYS_ADMIN in its effective set).
pub fn has_cap_sys_admin() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return false };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

/// What INIT settled.
#[derive(Debug, Clone, Copy, Default)]
pub struct Negotiated {
    pub minor: u32,
    pub flags: u64,
    pub max_write: u32,
    pub max_readahead: u32,
}

/// State shared by the session and every reply channel.
pub struct SessionShared {
    pub counters: Counters,
    pub interrupts: Arc<Interrupts>,
    pub started: Instant,
    /// Set by DESTROY: workers stop reading.
    pub destroyed: AtomicBool,
    setxattr_ext: AtomicBool,
    max_read: AtomicU32,
    /// OPEN / OPENDIR are answered ENOSYS by the session (stateless opens).
    no_open: AtomicBool,
    no_opendir: AtomicBool,
    /// FLUSH carries no information on this mount ([`Capabilities::flush_only_unlocks`]
    /// and the kernel keeps the locks): opens carry FOPEN_NOFLUSH and a
    /// FLUSH is answered ENOSYS.
    noflush: AtomicBool,
    /// Grants of replies the kernel refused, for the file system to undo.
    refused: Mutex<Vec<Refused>>,
    any_refused: AtomicBool,
    /// Who hears of changes before they are answered.
    pub changes: Arc<crate::changes::Changes>,
}

impl SessionShared {
    /// Whether FLUSH carries no information on this mount (see
    /// [`Capabilities::flush_only_unlocks`]): the session answers it ENOSYS.
    pub fn flush_ignored(&self) -> bool {
        self.noflush.load(Ordering::Relaxed)
    }

    /// The kernel refused a reply that granted `g`: the session has the file
    /// system undo it ([`Filesystem::refused`]) after the request in progress.
    pub fn refused(&self, g: Refused) {
        tracing::debug!(?g, "reply refused by the kernel; undoing what it granted");
        lock_ignoring_poison(&self.refused).push(g);
        self.any_refused.store(true, Ordering::Release);
    }
}

impl Default for SessionShared {
    fn default() -> Self {
        SessionShared {
            counters: Counters::default(),
            interrupts: Arc::default(),
            started: Instant::now(),
            destroyed: AtomicBool::new(false),
            setxattr_ext: AtomicBool::new(false),
            max_read: AtomicU32::new(MAX_WRITE),
            no_open: AtomicBool::new(false),
            no_opendir: AtomicBool::new(false),
            noflush: AtomicBool::new(false),
            refused: Mutex::new(Vec::new()),
            any_refused: AtomicBool::new(false),
            changes: Arc::default(),
        }
    }
}

/// Why INIT failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("the first request was {0}, not INIT")]
    NotInit(String),
    #[error("kernel speaks FUSE {0}.{1}; efuse needs 7.{min} or later", min = efuse_abi::MIN_KERNEL_MINOR_VERSION)]
    TooOld(u32, u32),
    #[error("the file system refused to start: {0}")]
    Refused(Errno),
    #[error("malformed INIT: {0}")]
    Malformed(#[from] efuse_abi::DecodeError),
}

/// A FUSE session over one file system.
pub struct Session<F: Filesystem> {
    fs: F,
    config: SessionConfig,
    shared: Arc<SessionShared>,
}

/// The outcome of handling one INIT request.
pub enum InitOutcome {
    /// Negotiated; the session is ready for requests.
    Done(Negotiated),
    /// The kernel offered a newer major version: we answered with ours and
    /// expect a second INIT.
    Retry,
}

impl<F: Filesystem> Session<F> {
    pub fn new(fs: F, config: SessionConfig) -> Session<F> {
        Session { fs, config, shared: Arc::new(SessionShared::default()) }
    }

    pub fn shared(&self) -> &Arc<SessionShared> {
        &self.shared
    }

    pub fn fs(&self) -> &F {
        &self.fs
    }

    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// The INIT flags to ask for: what efuse always offers, plus each feature
    /// the mount wants and the file system can honour.
    fn wanted_flags(&self) -> u64 {
        let caps = self.fs.capabilities();
        let feat = self.config.features;
        let mut f = init::ASYNC_READ
            | init::BIG_WRITES
            | init::MAX_PAGES
            | init::PARALLEL_DIROPS
            | init::AUTO_INVAL_DATA
            | init::ASYNC_DIO
            | init::ABORT_ERROR
            | init::INIT_EXT
            // Shared mmap of a file the policy opened with FOPEN_DIRECT_IO.
            | init::DIRECT_IO_ALLOW_MMAP;
        let mut want = |on: bool, flag: u64| {
            if on {
                f |= flag;
            }
        };
        let stateless_open = feat.no_open && caps.stateless_open;
        want(caps.posix_locks && feat.daemon_locks, init::POSIX_LOCKS);
        // flock locks go at RELEASE, which the kernel never sends without
        // OPEN: with stateless opens the kernel keeps them (exact locally).
        want(caps.flock_locks && feat.daemon_locks && !stateless_open, init::FLOCK_LOCKS);
        // Without OPEN the kernel truncates with SETATTR itself.
        want(caps.atomic_o_trunc && !stateless_open, init::ATOMIC_O_TRUNC);
        want(caps.export_support, init::EXPORT_SUPPORT);
        want(caps.readdirplus && feat.readdirplus, init::DO_READDIRPLUS | init::READDIRPLUS_AUTO);
        want(caps.handle_killpriv_v2, init::HANDLE_KILLPRIV_V2);
        want(caps.cache_symlinks && feat.cache_symlinks, init::CACHE_SYMLINKS);
        want(caps.writeback_cache && feat.writeback_cache, init::WRITEBACK_CACHE);
        want(stateless_open, init::NO_OPEN_SUPPORT);
        want(caps.stateless_opendir && feat.no_opendir, init::NO_OPENDIR_SUPPORT);
        // The kernel refuses passthrough with the writeback cache, and without
        // OPEN there is no reply to carry a backing file.
        let passthrough =
            caps.passthrough && feat.passthrough && !(caps.writeback_cache && feat.writeback_cache) && !stateless_open;
        want(passthrough, init::PASSTHROUGH);
        want(self.config.over_io_uring, init::OVER_IO_URING);
        f
    }

    /// Handles the INIT request in `buf` and sends the reply through `sink`.
    pub fn handle_init(
        &self,
        buf: &[u8],
        sink: &Arc<dyn ReplySink>,
        connection: Option<crate::connection::Connection>,
    ) -> Result<InitOutcome, InitError> {
        let req = Request::parse(buf, ProtocolOptions::default())?;
        let arg = match req.op {
            Operation::Init { arg } => arg,
            other => {
                let name = format!("{other:?}");
                let short = name.split([' ', '{']).next().unwrap_or("?").to_string();
                return Err(InitError::NotInit(short));
            }
        };
        let unique = req.header.unique;
        self.shared.counters.request(Opcode::Init);
        let send = |error: i32, out: &[u8]| {
            let payload = [IoSlice::new(out)];
            let payload: &[IoSlice<'_>] = if out.is_empty() { &[] } else { &payload };
            sink.send(&Reply { opcode: Opcode::Init, unique, error, payload, grant: Grant::Nothing })
        };
        if arg.major > efuse_abi::KERNEL_VERSION {
            // Newer major: answer with ours and wait for the kernel to retry.
            let out = abi::InitOut {
                major: efuse_abi::KERNEL_VERSION,
                minor: efuse_abi::KERNEL_MINOR_VERSION,
                ..Default::default()
            };
            send(0, out.as_bytes());
            return Ok(InitOutcome::Retry);
        }
        if arg.major < efuse_abi::KERNEL_VERSION || arg.minor < efuse_abi::MIN_KERNEL_MINOR_VERSION {
            send(-libc::EPROTO, &[]);
            return Err(InitError::TooOld(arg.major, arg.minor));
        }
        let minor = arg.minor.min(efuse_abi::KERNEL_MINOR_VERSION);
        let mut kernel_flags = arg.flags as u64;
        if kernel_flags & init::INIT_EXT != 0 {
            kernel_flags |= (arg.flags2 as u64) << 32;
        }
        let mut flags = kernel_flags & self.wanted_flags();
        if flags & init::PASSTHROUGH != 0 && !has_cap_sys_admin() {
            tracing::info!("passthrough off: registering backing files needs CAP_SYS_ADMIN; reads and writes go through the daemon");
            flags &= !init::PASSTHROUGH;
        } else if self.config.features.passthrough
            && self.fs.capabilities().passthrough
            && kernel_flags & init::PASSTHROUGH == 0
        {
            tracing::info!(
                "passthrough off: the kernel does not offer it (needs Linux 6.9+ with CONFIG_FUSE_PASSTHROUGH)"
            );
        }
        let max_write = self.config.max_write.clamp(4096, MAX_WRITE);
        // What the file system tells the kernel, the listeners hear too.
        let connection = connection.map(|c| c.telling(self.shared.changes.clone()));
        let info = InitInfo { minor, max_write, max_read: max_write, flags, connection };
        if let Err(e) = self.fs.init(&info) {
            send(-e.raw(), &[]);
            return Err(InitError::Refused(e));
        }
        self.shared.setxattr_ext.store(flags & init::SETXATTR_EXT != 0, Ordering::Relaxed);
        self.shared.no_open.store(flags & init::NO_OPEN_SUPPORT != 0, Ordering::Relaxed);
        self.shared.no_opendir.store(flags & init::NO_OPENDIR_SUPPORT != 0, Ordering::Relaxed);
        // With daemon-kept POSIX locks, FLUSH is how a closing process's locks go.
        let noflush = self.fs.capabilities().flush_only_unlocks && flags & init::POSIX_LOCKS == 0;
        self.shared.noflush.store(noflush, Ordering::Relaxed);
        self.shared.max_read.store(max_write, Ordering::Relaxed);
        let out = abi::InitOut {
            major: efuse_abi::KERNEL_VERSION,
            minor,
            max_readahead: arg.max_readahead,
            flags: flags as u32,
            flags2: (flags >> 32) as u32,
            max_background: 0,
            congestion_threshold: 0,
            max_write,
            time_gran: 1,
            max_pages: (max_write / 4096) as u16,
            // Backing files live on a file system that is not itself stacked.
            max_stack_depth: if flags & init::PASSTHROUGH != 0 { 1 } else { 0 },
            ..Default::default()
        };
        send(0, out.as_bytes());
        tracing::info!(
            kernel = format!("7.{}", arg.minor),
            negotiated = format!("7.{minor}"),
            max_write,
            flags = init::describe(flags),
            "INIT"
        );
        Ok(InitOutcome::Done(Negotiated { minor, flags, max_write, max_readahead: arg.max_readahead }))
    }

    /// Decodes and dispatches one request. Never panics on bad input: a
    /// request that cannot be decoded is answered with EIO (ENOSYS for an
    /// unknown opcode), or dropped when it expects no answer.
    pub fn dispatch(&self, buf: &[u8], sink: &Arc<dyn ReplySink>) {
        let opts = ProtocolOptions { setxattr_ext: self.shared.setxattr_ext.load(Ordering::Relaxed) };
        match Request::parse(buf, opts) {
            Ok(req) => self.handle(req, sink),
            Err(e) => self.reject(buf, e, sink),
        }
        self.undo_refused();
    }

    /// A sink that keeps replies in memory and belongs to this session:
    /// replies are counted and requests tracked as with a kernel transport.
    pub fn memory_sink(&self) -> Arc<MemorySink> {
        Arc::new(MemorySink::for_session(self.shared.clone()))
    }

    /// Has the file system take back what refused replies granted
    /// ([`Filesystem::refused`]). Transports call it between requests; the
    /// dispatch functions call it after each request.
    pub fn undo_refused(&self) {
        if !self.shared.any_refused.load(Ordering::Acquire) {
            return;
        }
        let refused = {
            let mut r = lock_ignoring_poison(&self.shared.refused);
            self.shared.any_refused.store(false, Ordering::Release);
            std::mem::take(&mut *r)
        };
        let ctx = RequestContext {
            unique: 0,
            uid: 0,
            gid: 0,
            pid: 0,
            umask: 0,
            kill_suidgid: false,
            interrupts: &self.shared.interrupts,
        };
        for g in &refused {
            self.fs.refused(&ctx, g);
        }
    }

    /// [`Session::dispatch`] for a request split as a FUSE-over-io_uring
    /// entry carries it (see [`Request::parse_split`]): names and write data
    /// borrow from `payload`, nothing is copied.
    pub fn dispatch_split(&self, header: &[u8], op_in: &[u8], payload: &[u8], sink: &Arc<dyn ReplySink>) {
        let opts = ProtocolOptions { setxattr_ext: self.shared.setxattr_ext.load(Ordering::Relaxed) };
        match Request::parse_split(header, op_in, payload, opts) {
            Ok(req) => self.handle(req, sink),
            Err(e) => self.reject(header, e, sink),
        }
        self.undo_refused();
    }

    fn handle(&self, req: Request<'_>, sink: &Arc<dyn ReplySink>) {
        let h = req.header;
        let opcode = match Opcode::from_u32(h.opcode) {
            Some(o) => o,
            None => return, // parse() already rejected unknown opcodes
        };
        self.shared.counters.request(opcode);
        if self.config.debug {
            tracing::debug!(
                unique = h.unique,
                op = opcode.name(),
                nodeid = h.nodeid,
                uid = h.uid,
                pid = h.pid,
                "request"
            );
        }
        let umask = match &req.op {
            Operation::Mknod { arg, .. } => arg.umask,
            Operation::Mkdir { arg, .. } => arg.umask,
            Operation::Create { arg, .. } | Operation::Tmpfile { arg, .. } => arg.umask,
            _ => 0,
        };
        let kill_suidgid = match &req.op {
            Operation::Open { arg } => arg.open_flags & efuse_abi::consts::OPEN_KILL_SUIDGID != 0,
            Operation::Create { arg, .. } => arg.open_flags & efuse_abi::consts::OPEN_KILL_SUIDGID != 0,
            _ => false,
        };
        let ctx = RequestContext {
            unique: h.unique,
            uid: h.uid,
            gid: h.gid,
            pid: h.pid,
            umask,
            kill_suidgid,
            interrupts: &self.shared.interrupts,
        };
        let expects_reply =
            !matches!(opcode, Opcode::Forget | Opcode::BatchForget | Opcode::Interrupt | Opcode::NotifyReply);
        // Tracked for interrupts when the replies come back to this session.
        if expects_reply && sink.session().is_some_and(|s| std::ptr::eq(s, &*self.shared)) {
            self.shared.interrupts.begin(h.unique);
        }
        // Changes are told to the listeners before their reply goes out.
        let watched = crate::changes::watch(&self.shared.changes, h.nodeid, &req.op, sink);
        let sink = watched.as_ref().unwrap_or(sink);
        let r = || Responder::new(h.unique, opcode, sink.clone());
        let ino = h.nodeid;
        let fs = &self.fs;
        match req.op {
            Operation::Lookup { name } => fs.lookup(&ctx, ino, name, ReplyEntry::new(r())),
            Operation::Forget { arg } => fs.forget(ino, arg.nlookup),
            Operation::BatchForget { nodes } => {
                // Batches are at most a page of entries; decode in chunks without allocating.
                let mut chunk = [(0u64, 0u64); 64];
                let mut n = 0;
                for one in nodes {
                    chunk[n] = (one.nodeid, one.nlookup);
                    n += 1;
                    if n == chunk.len() {
                        fs.batch_forget(&chunk[..n]);
                        n = 0;
                    }
                }
                if n > 0 {
                    fs.batch_forget(&chunk[..n]);
                }
            }
            Operation::Getattr { arg } => {
                let fh = (arg.getattr_flags & GETATTR_FH != 0).then_some(arg.fh);
                fs.getattr(&ctx, ino, fh, ReplyAttr::new(r()))
            }
            Operation::Statx { arg } => {
                let fh = (arg.getattr_flags & GETATTR_FH != 0).then_some(arg.fh);
                fs.statx(&ctx, ino, fh, arg.sx_flags, arg.sx_mask, ReplyStatx::new(r()))
            }
            Operation::Setattr { arg } => {
                let attr = setattr_from_abi(&arg);
                if self.config.debug {
                    tracing::debug!(unique = h.unique, valid = arg.valid, ?attr, "SETATTR");
                }
                fs.setattr(&ctx, ino, &attr, ReplyAttr::new(r()))
            }
            Operation::Readlink => fs.readlink(&ctx, ino, ReplyData::new(r())),
            Operation::Symlink { name, target } => fs.symlink(&ctx, ino, name, target, ReplyEntry::new(r())),
            Operation::Mknod { arg, name } => fs.mknod(&ctx, ino, name, arg.mode, arg.rdev, ReplyEntry::new(r())),
            Operation::Mkdir { arg, name } => fs.mkdir(&ctx, ino, name, arg.mode | libc::S_IFDIR, ReplyEntry::new(r())),
            Operation::Unlink { name } => fs.unlink(&ctx, ino, name, ReplyEmpty::new(r())),
            Operation::Rmdir { name } => fs.rmdir(&ctx, ino, name, ReplyEmpty::new(r())),
            Operation::Rename { newdir, name, newname } => {
                fs.rename(&ctx, ino, name, newdir, newname, 0, ReplyEmpty::new(r()))
            }
            Operation::Rename2 { arg, name, newname } => {
                fs.rename(&ctx, ino, name, arg.newdir, newname, arg.flags, ReplyEmpty::new(r()))
            }
            Operation::Link { arg, name } => fs.link(&ctx, arg.oldnodeid, ino, name, ReplyEntry::new(r())),
            // Stateless opens: ENOSYS tells the kernel to stop sending OPEN and RELEASE.
            Operation::Open { .. } if self.shared.no_open.load(Ordering::Relaxed) => r().error_raw(libc::ENOSYS),
            Operation::Open { arg } => {
                let reply = ReplyOpen::new(r(), ino, arg.flags as i32, self.file_open_flags());
                fs.open(&ctx, ino, arg.flags as i32, reply)
            }
            Operation::Read { arg } => {
                let size = arg.size.min(self.shared.max_read.load(Ordering::Relaxed));
                fs.read(&ctx, ino, arg.fh, arg.offset, size, arg.flags as i32, ReplyData::new(r()))
            }
            Operation::Write { arg, data } => {
                fs.write(&ctx, ino, arg.fh, arg.offset, data, arg.write_flags, arg.flags as i32, ReplyWrite::new(r()))
            }
            Operation::Statfs => fs.statfs(&ctx, ino, ReplyStatfs::new(r())),
            Operation::Release { arg } => {
                let flock_owner = (arg.release_flags & release::FLOCK_UNLOCK != 0).then_some(arg.lock_owner);
                fs.release(&ctx, ino, arg.fh, arg.flags as i32, flock_owner, ReplyEmpty::new(r()))
            }
            Operation::Fsync { arg } => {
                fs.fsync(&ctx, ino, arg.fh, arg.fsync_flags & FSYNC_FDATASYNC != 0, ReplyEmpty::new(r()))
            }
            Operation::Setxattr { arg, name, value } => {
                fs.setxattr(&ctx, ino, name, value, arg.flags as i32, ReplyEmpty::new(r()))
            }
            Operation::Getxattr { arg, name } => fs.getxattr(&ctx, ino, name, arg.size, ReplyXattr::new(r())),
            Operation::Listxattr { arg } => fs.listxattr(&ctx, ino, arg.size, ReplyXattr::new(r())),
            Operation::Removexattr { name } => fs.removexattr(&ctx, ino, name, ReplyEmpty::new(r())),
            // ENOSYS: the kernel sends no FLUSH on this mount again.
            Operation::Flush { .. } if self.shared.noflush.load(Ordering::Relaxed) => r().error_raw(libc::ENOSYS),
            Operation::Flush { arg } => fs.flush(&ctx, ino, arg.fh, arg.lock_owner, ReplyEmpty::new(r())),
            Operation::Init { .. } => {
                // A second INIT on a live session is a kernel bug; refuse it.
                r().error_raw(libc::EPROTO)
            }
            Operation::Opendir { .. } if self.shared.no_opendir.load(Ordering::Relaxed) => r().error_raw(libc::ENOSYS),
            Operation::Opendir { arg } => {
                fs.opendir(&ctx, ino, arg.flags as i32, ReplyOpen::new(r(), ino, arg.flags as i32, 0))
            }
            Operation::Readdir { arg } => {
                let limit = (arg.size as usize).min(REQUEST_BUFFER_SIZE);
                fs.readdir(&ctx, ino, arg.fh, arg.offset, ReplyDirectory::new(r(), limit))
            }
            Operation::Readdirplus { arg } => {
                let limit = (arg.size as usize).min(REQUEST_BUFFER_SIZE);
                fs.readdirplus(&ctx, ino, arg.fh, arg.offset, ReplyDirectoryPlus::new(r(), limit))
            }
            Operation::Releasedir { arg } => fs.releasedir(&ctx, ino, arg.fh, arg.flags as i32, ReplyEmpty::new(r())),
            Operation::Fsyncdir { arg } => {
                fs.fsyncdir(&ctx, ino, arg.fh, arg.fsync_flags & FSYNC_FDATASYNC != 0, ReplyEmpty::new(r()))
            }
            Operation::Getlk { arg } => {
                fs.getlk(&ctx, ino, arg.fh, arg.owner, &lock_from_abi(&arg.lk), ReplyLock::new(r()))
            }
            Operation::Setlk { arg } | Operation::Setlkw { arg } => {
                let sleep = opcode == Opcode::Setlkw;
                let flock = arg.lk_flags & LK_FLOCK != 0;
                fs.setlk(&ctx, ino, arg.fh, arg.owner, &lock_from_abi(&arg.lk), flock, sleep, ReplyEmpty::new(r()))
            }
            Operation::Access { arg } => fs.access(&ctx, ino, arg.mask as i32, ReplyEmpty::new(r())),
            Operation::Create { arg, name } => {
                let reply = ReplyCreate::new(r(), arg.flags as i32, self.file_open_flags());
                fs.create(&ctx, ino, name, arg.mode, arg.flags as i32, reply)
            }
            Operation::Tmpfile { arg, .. } => {
                let reply = ReplyCreate::new(r(), arg.flags as i32, self.file_open_flags());
                fs.tmpfile(&ctx, ino, arg.mode, arg.flags as i32, reply)
            }
            Operation::Interrupt { arg } => {
                tracing::debug!(target_unique = arg.unique, "INTERRUPT");
                self.shared.interrupts.interrupt(arg.unique, h.unique, sink);
            }
            Operation::Bmap { arg } => fs.bmap(&ctx, ino, arg.blocksize, arg.block, ReplyBmap::new(r())),
            Operation::Destroy => {
                self.shared.destroyed.store(true, Ordering::Release);
                fs.destroy();
                ReplyEmpty::new(r()).ok()
            }
            Operation::Fallocate { arg } => {
                fs.fallocate(&ctx, ino, arg.fh, arg.offset, arg.length, arg.mode as i32, ReplyEmpty::new(r()))
            }
            Operation::Lseek { arg } => {
                fs.lseek(&ctx, ino, arg.fh, arg.offset, arg.whence as i32, ReplyLseek::new(r()))
            }
            Operation::CopyFileRange { arg } | Operation::CopyFileRange64 { arg } => fs.copy_file_range(
                &ctx,
                ino,
                arg.fh_in,
                arg.off_in,
                arg.nodeid_out,
                arg.fh_out,
                arg.off_out,
                arg.len,
                arg.flags as u32,
                ReplyCopy::new(r()),
            ),
            Operation::Syncfs { .. } => fs.syncfs(&ctx, ino, ReplyEmpty::new(r())),
            Operation::NotifyReply { .. } => {
                // Answers to NOTIFY_RETRIEVE, which efuse never sends: nothing waits for them.
            }
            // No ioctls are implemented: answer as a local file system does for
            // an unknown command (isatty() probes on every open land here).
            Operation::Ioctl { .. } => r().error_raw(libc::ENOTTY),
            Operation::Poll { .. } | Operation::SetupMapping { .. } | Operation::RemoveMapping { .. } => {
                r().error_raw(libc::ENOSYS)
            }
        }
    }

    /// `FOPEN_*` flags the session adds to every answer to OPEN, CREATE and TMPFILE.
    fn file_open_flags(&self) -> u32 {
        if self.shared.noflush.load(Ordering::Relaxed) {
            efuse_abi::consts::fopen::NOFLUSH
        } else {
            0
        }
    }

    fn reject(&self, buf: &[u8], e: efuse_abi::DecodeError, sink: &Arc<dyn ReplySink>) {
        self.shared.counters.undecodable();
        let Ok(h) = parse_header(buf) else {
            tracing::warn!(len = buf.len(), "dropping request: {e}");
            return;
        };
        let op = Opcode::from_u32(h.opcode);
        let no_reply =
            matches!(op, Some(Opcode::Forget | Opcode::BatchForget | Opcode::Interrupt | Opcode::NotifyReply));
        if h.unique == 0 || no_reply {
            tracing::warn!(unique = h.unique, opcode = h.opcode, "dropping request: {e}");
            return;
        }
        let (op, errno) = match op {
            Some(op) => (op, libc::EIO),
            // Unknown opcode: ENOSYS tells the kernel not to send it again.
            None => (Opcode::Init, libc::ENOSYS),
        };
        tracing::warn!(unique = h.unique, opcode = h.opcode, "answering {}: {e}", Errno::from_raw(errno));
        sink.send(&Reply { opcode: op, unique: h.unique, error: -errno, payload: &[], grant: Grant::Nothing });
    }
}

fn time_or_now(valid: u32, set: u32, now: u32, sec: u64, nsec: u32) -> Option<TimeOrNow> {
    if valid & now != 0 {
        Some(TimeOrNow::Now)
    } else if valid & set != 0 {
        Some(TimeOrNow::Specific(Timespec::new(sec as i64, nsec)))
    } else {
        None
    }
}

fn setattr_from_abi(a: &abi::SetattrIn) -> SetAttr {
    let v = a.valid;
    SetAttr {
        mode: (v & fattr::MODE != 0).then_some(a.mode),
        uid: (v & fattr::UID != 0).then_some(a.uid),
        gid: (v & fattr::GID != 0).then_some(a.gid),
        size: (v & fattr::SIZE != 0).then_some(a.size),
        atime: time_or_now(v, fattr::ATIME, fattr::ATIME_NOW, a.atime, a.atimensec),
        mtime: time_or_now(v, fattr::MTIME, fattr::MTIME_NOW, a.mtime, a.mtimensec),
        ctime: (v & fattr::CTIME != 0).then_some(Timespec::new(a.ctime as i64, a.ctimensec)),
        fh: (v & fattr::FH != 0).then_some(a.fh),
        // An empty SETATTR is the kernel's remove-privileges call (a write by
        // a caller without CAP_FSETID, e.g. through passthrough, or chown):
        // with HANDLE_KILLPRIV_V2 the file system must clear suid/sgid itself.
        kill_suidgid: v & fattr::KILL_SUIDGID != 0 || v == 0,
    }
}

fn lock_from_abi(l: &abi::FileLock) -> FileLock {
    FileLock { start: l.start, end: l.end, typ: l.typ as i32, pid: l.pid }
}

/// Write flags a file system may want to test.
pub use wflags::KILL_SUIDGID as WRITE_KILL_SUIDGID;

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    struct Hello;
    impl Filesystem for Hello {
        fn lookup(&self, _ctx: &RequestContext<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
            if parent == 1 && name == "hello" {
                let attr = FileAttr { ino: 2, mode: libc::S_IFREG | 0o644, nlink: 1, ..Default::default() };
                reply.entry(&Entry {
                    nodeid: 2,
                    generation: 0,
                    attr,
                    entry_ttl: std::time::Duration::from_secs(1),
                    attr_ttl: std::time::Duration::from_secs(1),
                })
            } else {
                reply.error(Errno::ENOENT)
            }
        }
        fn getattr(&self, _ctx: &RequestContext<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
            let attr = FileAttr { ino, mode: libc::S_IFDIR | 0o755, nlink: 2, ..Default::default() };
            reply.attr(&attr, std::time::Duration::from_secs(1))
        }
    }

    fn request(op: Opcode, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
        let h =
            abi::InHeader { len: (40 + body.len()) as u32, opcode: op as u32, unique, nodeid, ..Default::default() };
        let mut v = h.as_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn init_then_lookup_and_statx_fallback() {
        let session = Session::new(Hello, SessionConfig::default());
        let mem = Arc::new(MemorySink::default());
        let sink: Arc<dyn ReplySink> = mem.clone();
        let init_in = abi::InitIn {
            major: 7,
            minor: 45,
            max_readahead: 131072,
            flags: (init::ASYNC_READ | init::INIT_EXT | init::POSIX_LOCKS) as u32,
            flags2: (init::PASSTHROUGH >> 32) as u32,
            ..Default::default()
        };
        let out = session.handle_init(&request(Opcode::Init, 1, 0, init_in.as_bytes()), &sink, None).unwrap();
        let InitOutcome::Done(n) = out else { panic!("retry") };
        // Only what both sides support: no locks (Hello lacks them), no passthrough.
        assert_eq!(n.flags, init::ASYNC_READ | init::INIT_EXT);
        assert_eq!(n.max_write, MAX_WRITE);

        session.dispatch(&request(Opcode::Lookup, 2, 1, b"hello\0"), &sink);
        session.dispatch(&request(Opcode::Lookup, 3, 1, b"nope\0"), &sink);
        let sx = abi::StatxIn::default();
        session.dispatch(&request(Opcode::Statx, 4, 1, sx.as_bytes()), &sink);
        // Unknown opcode 7 -> ENOSYS; malformed lookup -> EIO; bad forget -> dropped.
        session.dispatch(&request(Opcode::Lookup, 5, 1, b"unterminated"), &sink);
        let mut bad = request(Opcode::Statfs, 6, 1, &[]);
        bad[4] = 7;
        session.dispatch(&bad, &sink);
        session.dispatch(&request(Opcode::Forget, 0, 1, &[1]), &sink);
        session.dispatch(&request(Opcode::Mkdir, 8, 1, &[0; 8]), &sink);

        let replies = mem.replies.lock().unwrap();
        let by_unique = |u: u64| replies.iter().find(|r| r.1 == u).cloned().unwrap();
        assert_eq!(by_unique(1).2, 0);
        assert_eq!(by_unique(2).2, 0);
        assert_eq!(by_unique(2).3.len(), std::mem::size_of::<abi::EntryOut>());
        assert_eq!(by_unique(3).2, -libc::ENOENT);
        let statx = by_unique(4);
        assert_eq!(statx.2, 0);
        assert_eq!(statx.3.len(), std::mem::size_of::<abi::StatxOut>());
        assert_eq!(by_unique(5).2, -libc::EIO);
        assert_eq!(by_unique(6).2, -libc::ENOSYS);
        // MKDIR with an unterminated name is malformed: EIO, not a call into the fs.
        assert_eq!(by_unique(8).2, -libc::EIO);
        assert_eq!(replies.len(), 7);
        let snap = session.shared().counters.snapshot();
        assert_eq!(snap.opcodes["LOOKUP"].count, 2);
        assert_eq!(snap.undecodable, 4);
    }

    #[test]
    fn old_kernel_is_refused() {
        let session = Session::new(Hello, SessionConfig::default());
        let mem = Arc::new(MemorySink::default());
        let sink: Arc<dyn ReplySink> = mem.clone();
        let init_in = abi::InitIn { major: 7, minor: 20, ..Default::default() };
        assert!(session.handle_init(&request(Opcode::Init, 1, 0, &init_in.as_bytes()[..16]), &sink, None).is_err());
        assert_eq!(mem.replies.lock().unwrap()[0].2, -libc::EPROTO);
    }

    /// A file system that grants what it is asked for and records what it
    /// is asked to take back.
    #[derive(Default)]
    struct Granting {
        forgets: Mutex<Vec<(u64, u64)>>,
        releases: Mutex<Vec<u64>>,
        releasedirs: Mutex<Vec<u64>>,
    }

    impl Granting {
        fn entry(nodeid: u64) -> Entry {
            let attr = FileAttr { ino: nodeid, mode: libc::S_IFREG | 0o644, nlink: 1, ..Default::default() };
            let ttl = std::time::Duration::from_secs(1);
            Entry { nodeid, generation: 0, attr, entry_ttl: ttl, attr_ttl: ttl }
        }
    }

    impl Filesystem for Granting {
        fn lookup(&self, _ctx: &RequestContext<'_>, _parent: u64, _name: &OsStr, reply: ReplyEntry) {
            reply.entry(&Granting::entry(2))
        }
        fn forget(&self, ino: u64, n: u64) {
            self.forgets.lock().unwrap().push((ino, n));
        }
        fn open(&self, _ctx: &RequestContext<'_>, _ino: u64, _flags: i32, reply: ReplyOpen) {
            reply.opened(7, 0)
        }
        fn opendir(&self, _ctx: &RequestContext<'_>, _ino: u64, _flags: i32, reply: ReplyOpen) {
            reply.opened(8, 0)
        }
        fn create(&self, _: &RequestContext<'_>, _: u64, _: &OsStr, _: u32, _: i32, reply: ReplyCreate) {
            reply.created(&Granting::entry(3), 9, 0)
        }
        fn readdirplus(&self, _: &RequestContext<'_>, _: u64, _: u64, _: u64, mut reply: ReplyDirectoryPlus) {
            assert!(reply.add(&Granting::entry(1), 1, OsStr::new(".")));
            assert!(reply.add(&Granting::entry(4), 2, OsStr::new("a")));
            assert!(reply.add(&Granting::negative(), 3, OsStr::new("b")));
            assert!(reply.add(&Granting::entry(5), 4, OsStr::new("c")));
            reply.ok()
        }
        fn release(&self, _: &RequestContext<'_>, _: u64, fh: u64, _: i32, _: Option<u64>, reply: ReplyEmpty) {
            self.releases.lock().unwrap().push(fh);
            reply.ok()
        }
        fn releasedir(&self, _: &RequestContext<'_>, _: u64, fh: u64, _: i32, reply: ReplyEmpty) {
            self.releasedirs.lock().unwrap().push(fh);
            reply.ok()
        }
        fn getattr(&self, ctx: &RequestContext<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
            match ino {
                // Waits for an interrupt, as a blocked lock does.
                10 => {
                    if let Err(cancel) = ctx.on_interrupt(move || reply.error(Errno::EINTR)) {
                        cancel()
                    }
                }
                // Reports whether it was interrupted before it began.
                11 => reply.error(if ctx.is_interrupted() { Errno::EINTR } else { Errno::ENOENT }),
                _ => reply.attr(&Granting::entry(ino).attr, std::time::Duration::ZERO),
            }
        }
    }

    impl Granting {
        fn negative() -> Entry {
            Entry { nodeid: 0, ..Granting::entry(0) }
        }
    }

    fn init(session: &Session<Granting>, sink: &Arc<dyn ReplySink>) {
        let init_in = abi::InitIn { major: 7, minor: 45, flags: u32::MAX, ..Default::default() };
        assert!(session.handle_init(&request(Opcode::Init, 1, 0, init_in.as_bytes()), sink, None).is_ok());
    }

    /// What a refused reply granted is taken back through the file system's
    /// own forget/release; a delivered one keeps it.
    #[test]
    fn refused_replies_are_undone() {
        let session = Session::new(Granting::default(), SessionConfig::default());
        let mem = session.memory_sink();
        let sink: Arc<dyn ReplySink> = mem.clone();
        init(&session, &sink);
        let send_all = |base: u64| {
            session.dispatch(&request(Opcode::Lookup, base, 1, b"x\0"), &sink);
            let o = abi::OpenIn { flags: libc::O_RDWR as u32, open_flags: 0 };
            session.dispatch(&request(Opcode::Open, base + 2, 2, o.as_bytes()), &sink);
            session.dispatch(&request(Opcode::Opendir, base + 4, 1, o.as_bytes()), &sink);
            let c = abi::CreateIn { flags: libc::O_RDWR as u32, mode: 0o644, ..Default::default() };
            let mut body = c.as_bytes().to_vec();
            body.extend_from_slice(b"new\0");
            session.dispatch(&request(Opcode::Create, base + 6, 1, &body), &sink);
            let r = abi::ReadIn { size: 4096, ..Default::default() };
            session.dispatch(&request(Opcode::Readdirplus, base + 8, 1, r.as_bytes()), &sink);
        };
        send_all(100);
        let fs = session.fs();
        assert!(fs.forgets.lock().unwrap().is_empty(), "delivered replies keep what they granted");
        mem.refuse(true);
        send_all(200);
        let mut forgets = fs.forgets.lock().unwrap().clone();
        forgets.sort_unstable();
        // LOOKUP's entry, CREATE's entry, READDIRPLUS's two real entries
        // ("." and the negative entry carry no lookup).
        assert_eq!(forgets, vec![(2, 1), (3, 1), (4, 1), (5, 1)]);
        assert_eq!(*fs.releases.lock().unwrap(), vec![7, 9]);
        assert_eq!(*fs.releasedirs.lock().unwrap(), vec![8]);
        assert_eq!(session.shared().interrupts.in_flight(), 0);
    }

    fn interrupt(target: u64) -> Vec<u8> {
        let i = abi::InterruptIn { unique: target };
        request(Opcode::Interrupt, target | 1, 0, i.as_bytes())
    }

    /// An INTERRUPT for a request already answered is answered EAGAIN and
    /// forgotten once its grace is over; nothing stays recorded.
    #[test]
    fn late_interrupt_is_not_kept() {
        let session = Session::new(Granting::default(), SessionConfig::default());
        let mem = session.memory_sink();
        let sink: Arc<dyn ReplySink> = mem.clone();
        init(&session, &sink);
        let g = abi::GetattrIn::default();
        session.dispatch(&request(Opcode::Getattr, 20, 5, g.as_bytes()), &sink);
        session.dispatch(&interrupt(20), &sink);
        let ints = &session.shared().interrupts;
        assert_eq!((ints.in_flight(), ints.orphans()), (0, 1));
        std::thread::sleep(ORPHAN_GRACE + std::time::Duration::from_millis(20));
        session.dispatch(&request(Opcode::Getattr, 22, 5, g.as_bytes()), &sink);
        assert_eq!((ints.in_flight(), ints.orphans()), (0, 0));
        assert!(!ints.has_orphans.load(Ordering::Acquire));
        let replies = mem.replies.lock().unwrap();
        assert!(replies.iter().any(|r| r.1 == 21 && r.2 == -libc::EAGAIN), "the stale INTERRUPT is answered EAGAIN");
    }

    /// An INTERRUPT wakes the request it names; one that arrives just before
    /// its request is dispatched is handed to it.
    #[test]
    fn interrupts_reach_their_request() {
        let session = Session::new(Granting::default(), SessionConfig::default());
        let mem = session.memory_sink();
        let sink: Arc<dyn ReplySink> = mem.clone();
        init(&session, &sink);
        let g = abi::GetattrIn::default();
        session.dispatch(&request(Opcode::Getattr, 30, 10, g.as_bytes()), &sink);
        let ints = &session.shared().interrupts;
        assert_eq!(ints.in_flight(), 1);
        session.dispatch(&interrupt(30), &sink);
        assert_eq!((ints.in_flight(), ints.orphans()), (0, 0));
        session.dispatch(&interrupt(32), &sink);
        session.dispatch(&request(Opcode::Getattr, 32, 11, g.as_bytes()), &sink);
        assert_eq!((ints.in_flight(), ints.orphans()), (0, 0));
        let replies = mem.replies.lock().unwrap();
        let err = |u: u64| replies.iter().find(|r| r.1 == u).map(|r| r.2);
        assert_eq!(err(30), Some(-libc::EINTR));
        assert_eq!(err(32), Some(-libc::EINTR));
    }

    /// An INTERRUPT read at the very moment its request begins on another
    /// thread still reaches it (the check and the record cross without a gap).
    #[test]
    fn interrupt_racing_begin_is_not_lost() {
        let ints = Arc::new(Interrupts::default());
        let sink: Arc<dyn ReplySink> = Arc::new(MemorySink::default());
        let rounds = 20_000u64;
        let (start, done) = (Arc::new(std::sync::Barrier::new(2)), Arc::new(std::sync::Barrier::new(2)));
        let (a, s2, d2) = (ints.clone(), start.clone(), done.clone());
        let beginner = std::thread::spawn(move || {
            for i in 0..rounds {
                s2.wait();
                a.begin(2 * i + 2);
                d2.wait();
            }
        });
        let mut lost = 0;
        for i in 0..rounds {
            let target = 2 * i + 2;
            start.wait();
            ints.interrupt(target, target | 1, &sink);
            done.wait();
            if !ints.contains(target) {
                lost += 1;
            }
            ints.finished(target);
            assert_eq!(ints.orphans(), 0, "an orphan stayed behind its request");
        }
        beginner.join().unwrap();
        assert_eq!(lost, 0, "{lost} of {rounds} interrupts never reached their request");
    }
}

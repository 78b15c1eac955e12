//! The FUSE-over-io_uring transport (Linux 6.14+, `CONFIG_FUSE_IO_URING`,
//! module parameter `enable_uring=Y`): one ring queue per CPU, each served by
//! a thread pinned to that CPU, so a request is fetched, served and answered
//! on the CPU that issued it, with one `io_uring_enter` per batch instead of a
//! read and a write per request.
//!
//! The protocol (the kernel side is `fs/fuse/dev_uring.c`):
//! - INIT arrives on /dev/fuse as always; the daemon asks for
//!   `FUSE_OVER_IO_URING` in its reply. From then on the kernel holds new
//!   requests until every queue (one per *possible* CPU, qid = CPU index) has
//!   an entry registered, or until a registration fails (then it falls back to
//!   /dev/fuse for this connection).
//! - A ring entry is two buffers: a header buffer (`struct
//!   fuse_uring_req_header`: 128 bytes for the in/out header, 128 for the
//!   per-opcode argument, then `fuse_uring_ent_in_out`) and a payload buffer of
//!   at least `max(8192, max_write, max_pages * 4096)` bytes.
//! - `FUSE_IO_URING_CMD_REGISTER`: an `IORING_OP_URING_CMD` on the /dev/fuse
//!   session fd, in a 128-byte SQE whose `addr`/`len` point at the iovec pair
//!   [header, payload] and whose 80-byte command area holds `fuse_uring_cmd_req`
//!   with the qid. The command completes only when a request has been copied
//!   into the entry: `fuse_in_header` at the start of the header area, the
//!   opcode's first argument (`in_args[0]`, possibly empty) in `op_in`, the
//!   remaining arguments (names, write data, extensions) in the payload, and
//!   `ring_ent_in_out.{commit_id, payload_sz}`.
//! - The reply goes into the same buffers: `fuse_out_header` at the start of
//!   the header area, the reply body in the payload with
//!   `ring_ent_in_out.payload_sz` set, then `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`
//!   with the entry's `commit_id` hands the reply over and waits for the next
//!   request in one command.
//! - INTERRUPT and FORGET still go through /dev/fuse (a /dev/fuse worker keeps
//!   serving it); notifications are written there too.
//! - When the connection ends (unmount, abort, daemon exit), commands waiting
//!   in the kernel complete with `-ENOTCONN` (or `-ECANCELED`), and a commit
//!   for a request of a dead connection fails with `-ENOTCONN`.
//!
//! Threading: a ring is only ever touched by its queue thread. A reply given
//! on another thread (a lock waiter, the blocking pool) is written into its
//! entry's buffers there and the queue thread is woken through an eventfd
//! whose read is kept armed in the ring; it then submits the commit.
//! Requests that may block for long (fsync, fsyncdir, syncfs, setlkw,
//! fallocate, copy_file_range over 1 MiB) are handed to a small blocking pool,
//! so they do not hold up the requests queued behind them on that CPU.

use std::cell::Cell;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use efuse_abi::consts::uring as cmd;
use efuse_abi::structs::{CopyFileRangeIn, InHeader, OutHeader, UringCmdReq, UringEntInOut, UringReqHeader};
use efuse_abi::Opcode;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use zerocopy::{FromBytes, IntoBytes};

use crate::filesystem::Filesystem;
use crate::reply::ReplySink;
use crate::session::{Negotiated, Session, SessionShared};
use crate::stats::Counters;

/// Ring entries per CPU queue, unless configured. Measured on a 2-CPU
/// machine (uncached stat storm, 2 threads; 4 KiB O_DIRECT reads): depth 8,
/// 16 and 64 were within noise of each other, since a queue rarely has more
/// than a few requests in flight per CPU; 16 leaves room for requests that
/// wait long (blocked locks, the blocking pool) without stalling the queue.
pub const DEFAULT_QUEUE_DEPTH: usize = 16;
/// Threads of the pool that serves requests which may block for long.
const BLOCKING_POOL_THREADS: usize = 4;
/// copy_file_range requests longer than this go to the blocking pool.
const LONG_COPY: u64 = 1 << 20;
/// user_data of the eventfd read; entry indexes are below it.
const WAKE_TAG: u64 = u64::MAX;
/// How long a stopping queue waits for its commands still in the kernel.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Size of `fuse_in_header` at the start of the header area.
const IN_HEADER: usize = size_of::<InHeader>();
/// Offset of `ring_ent_in_out` in the header buffer.
const ENT_IN_OUT: usize = offset_of!(UringReqHeader, ring_ent_in_out);
const OP_IN: usize = offset_of!(UringReqHeader, op_in);

/// Why the ring could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    #[error("queue {qid}: creating the io_uring failed: {source}")]
    Setup { qid: usize, source: io::Error },
    #[error("queue {qid}: FUSE_IO_URING_CMD_REGISTER failed: {source}")]
    Register { qid: usize, source: io::Error },
    #[error("queue {qid}: {what}")]
    Other { qid: usize, what: String },
}

/// Page-aligned, zeroed memory that the kernel reads and writes through the
/// user pointers we registered. Only ever accessed through raw pointers,
/// except for the payload slice lent to the session while a request is being
/// dispatched (see [`EntryMem::borrowed`]).
struct RawBuf {
    ptr: NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: a RawBuf is plain memory; who may touch it when is governed by the
// entry protocol below, not by the type.
unsafe impl Send for RawBuf {}
// SAFETY: as above.
unsafe impl Sync for RawBuf {}

impl RawBuf {
    fn new(len: usize) -> io::Result<RawBuf> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), 4096)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(RawBuf { ptr, layout })
    }

    fn len(&self) -> usize {
        self.layout.size()
    }

    fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for RawBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// The buffers of one ring entry.
///
/// Ownership follows the entry's state: while a command is in the kernel the
/// kernel owns both buffers; when its completion delivers a request, the
/// queue thread owns them until the reply is written; the reply is written by
/// whichever thread answers (exactly one: reply objects answer once), then
/// the queue thread submits the commit and the kernel owns them again.
struct EntryMem {
    header: RawBuf,
    payload: RawBuf,
    /// The queue thread has lent the payload to a dispatch in progress (names
    /// and write data borrow from it): a reply given meanwhile must not write
    /// into it, so it is staged and copied in after the dispatch returns.
    borrowed: AtomicBool,
}

impl EntryMem {
    /// Writes a reply into the entry's buffers.
    ///
    /// # Safety
    /// The caller owns the entry (a request is in userspace on it, this is
    /// its only reply) and the payload is not lent out (`borrowed` is false).
    unsafe fn write_reply(&self, out: &OutHeader, parts: &[IoSlice<'_>]) {
        let h = self.header.as_ptr();
        std::ptr::copy_nonoverlapping(out.as_bytes().as_ptr(), h, size_of::<OutHeader>());
        let mut at = 0usize;
        for p in parts {
            std::ptr::copy_nonoverlapping(p.as_ptr(), self.payload.as_ptr().add(at), p.len());
            at += p.len();
        }
        let sz = (at as u32).to_ne_bytes();
        let field = ENT_IN_OUT + offset_of!(UringEntInOut, payload_sz);
        std::ptr::copy_nonoverlapping(sz.as_ptr(), h.add(field), sz.len());
    }
}

/// A reply given while its entry's payload was lent out.
struct Staged {
    index: u32,
    out: OutHeader,
    body: Vec<u8>,
}

/// Replies waiting for the queue thread to commit them.
#[derive(Default)]
struct Pending {
    /// Entries whose reply is in their buffers.
    commits: Vec<u32>,
    /// Replies to copy into their entries first.
    staged: Vec<Staged>,
    /// Spare staging buffers, so staging allocates only while warming up.
    spare: Vec<Vec<u8>>,
}

/// What a queue shares with the threads that answer its requests.
struct QueueShared {
    qid: usize,
    session: Arc<SessionShared>,
    entries: Box<[EntryMem]>,
    pending: Mutex<Pending>,
    /// Woken by replies from other threads and by `stop`.
    eventfd: OwnedFd,
    wake_pending: AtomicBool,
    stop: AtomicBool,
}

thread_local! {
    /// The queue this thread serves (address of its QueueShared), or 0.
    static ON_QUEUE: Cell<usize> = const { Cell::new(0) };
}

impl QueueShared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our eventfd.
            let rc = unsafe { libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
            if rc < 0 {
                tracing::warn!(qid = self.qid, "waking the ring queue failed: {}", io::Error::last_os_error());
            }
        }
    }

    fn on_queue_thread(&self) -> bool {
        ON_QUEUE.with(|q| q.get() == self as *const QueueShared as usize)
    }
}

/// The reply channel of one ring entry: what reply objects hold.
struct EntrySink {
    queue: Arc<QueueShared>,
    index: u32,
}

impl ReplySink for EntrySink {
    fn send(&self, _opcode: Opcode, unique: u64, error: i32, payload: &[IoSlice<'_>]) {
        let q = &self.queue;
        q.session.interrupts.remove(unique);
        let entry = &q.entries[self.index as usize];
        let mut len: usize = payload.iter().map(|p| p.len()).sum();
        let mut error = error;
        let mut parts = payload;
        if len > entry.payload.len() {
            tracing::error!(
                unique,
                len,
                cap = entry.payload.len(),
                "reply exceeds the ring payload buffer; answering EIO"
            );
            (error, len, parts) = (-libc::EIO, 0, &[]);
        }
        let out = OutHeader { len: (size_of::<OutHeader>() + len) as u32, error, unique };
        if entry.borrowed.load(Ordering::Acquire) {
            let mut body = q.lock().spare.pop().unwrap_or_default();
            body.clear();
            for p in parts {
                body.extend_from_slice(p);
            }
            q.lock().staged.push(Staged { index: self.index, out, body });
        } else {
            // SAFETY: this request is in userspace on this entry and this is its
            // only reply (reply objects answer once); the payload is not lent.
            unsafe { entry.write_reply(&out, parts) };
            q.lock().commits.push(self.index);
        }
        if !q.on_queue_thread() {
            q.wake();
        }
    }

    fn counters(&self) -> Option<&Counters> {
        Some(&self.queue.session.counters)
    }
}

/// A request handed to the blocking pool: header and op argument copied
/// (these requests carry no payload).
struct Job {
    header: [u8; IN_HEADER],
    op_in: [u8; cmd::OP_IN_OUT_SZ],
    sink: Arc<dyn ReplySink>,
}

struct PoolState {
    jobs: VecDeque<Job>,
    closed: bool,
}

/// Threads that serve requests which may block for long, so a ring queue
/// never waits on one. Replies go back to the queue through its eventfd.
struct BlockingPool {
    state: Mutex<PoolState>,
    ready: Condvar,
}

impl BlockingPool {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn submit(&self, job: Job) {
        self.lock().jobs.push_back(job);
        self.ready.notify_one();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    fn serve<F: Filesystem>(&self, session: &Session<F>) {
        loop {
            let job = {
                let mut st = self.lock();
                loop {
                    if let Some(j) = st.jobs.pop_front() {
                        break j;
                    }
                    if st.closed {
                        return;
                    }
                    st = self.ready.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            };
            session.dispatch_split(&job.header, &job.op_in, &[], &job.sink);
        }
    }
}

/// Whether a request may block for long and so goes to the blocking pool.
fn blocks_long(opcode: u32, op_in: &[u8]) -> bool {
    match Opcode::from_u32(opcode) {
        Some(Opcode::Fsync | Opcode::Fsyncdir | Opcode::Syncfs | Opcode::Setlkw | Opcode::Fallocate) => true,
        Some(Opcode::CopyFileRange | Opcode::CopyFileRange64) => {
            CopyFileRangeIn::read_from_prefix(op_in).is_ok_and(|(a, _)| a.len > LONG_COPY)
        }
        _ => false,
    }
}

/// The running ring queues.
pub(crate) struct UringRunning {
    queues: Vec<Arc<QueueShared>>,
    threads: Vec<JoinHandle<()>>,
    pool: Arc<BlockingPool>,
    pool_threads: Vec<JoinHandle<()>>,
}

impl UringRunning {
    pub(crate) fn queues(&self) -> usize {
        self.queues.len()
    }

    /// Tells every queue to stop (they also stop by themselves when the
    /// connection ends) and waits for them and the blocking pool.
    pub(crate) fn stop_and_join(self) {
        for q in &self.queues {
            q.stop.store(true, Ordering::Release);
            q.wake();
        }
        for t in self.threads {
            let _ = t.join();
        }
        self.pool.close();
        // A pool thread may still be inside a file system call that never
        // returns (a lock that is never released): give up on it after a
        // while rather than hang the daemon's exit.
        let deadline = Instant::now() + STOP_GRACE;
        for t in self.pool_threads {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::warn!("a blocking-pool thread is still inside the file system; not waiting for it");
            }
        }
    }
}

/// The number of queues the kernel expects: one per possible CPU.
fn possible_cpus() -> usize {
    let parse = |s: &str| -> Option<usize> {
        let mut max = None;
        for part in s.trim().split(',') {
            let last = part.rsplit('-').next()?.parse::<usize>().ok()?;
            max = Some(max.map_or(last, |m: usize| m.max(last)));
        }
        max.map(|m| m + 1)
    };
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| parse(&s))
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

/// Registers one queue per CPU on the connection of `session_fd` and starts
/// their threads. Returns once every queue has registered its entries, or
/// with the first failure.
pub(crate) fn start<F: Filesystem>(
    session: &Arc<Session<F>>,
    session_fd: Arc<OwnedFd>,
    negotiated: &Negotiated,
    depth: usize,
) -> Result<UringRunning, UringError> {
    let depth = depth.clamp(1, 1024);
    // The kernel refuses payload buffers smaller than its max_payload_sz.
    let payload_size = (negotiated.max_write as usize).max(efuse_abi::MIN_READ_BUFFER).next_multiple_of(4096);
    let pool = Arc::new(BlockingPool {
        state: Mutex::new(PoolState { jobs: VecDeque::new(), closed: false }),
        ready: Condvar::new(),
    });
    let mut pool_threads = Vec::new();
    for i in 0..BLOCKING_POOL_THREADS {
        let (pool, session) = (pool.clone(), session.clone());
        match std::thread::Builder::new().name(format!("efuse-block-{i}")).spawn(move || pool.serve(&*session)) {
            Ok(t) => pool_threads.push(t),
            Err(e) => return Err(UringError::Other { qid: 0, what: format!("cannot start the blocking pool: {e}") }),
        }
    }
    let nr = possible_cpus();
    let (started_tx, started_rx) = mpsc::channel();
    let mut queues = Vec::with_capacity(nr);
    let mut threads = Vec::with_capacity(nr);
    let mut failure = None;
    for qid in 0..nr {
        let shared = match QueueShared::new(qid, session.shared().clone(), depth, payload_size) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        let ctx = QueueStart {
            session: session.clone(),
            shared: shared.clone(),
            fd: session_fd.clone(),
            pool: pool.clone(),
            started: started_tx.clone(),
        };
        match std::thread::Builder::new().name(format!("efuse-ring-{qid}")).spawn(move || queue_thread(ctx)) {
            Ok(t) => {
                queues.push(shared);
                threads.push(t);
            }
            Err(e) => {
                failure = Some(UringError::Other { qid, what: format!("cannot start its thread: {e}") });
                break;
            }
        }
    }
    drop(started_tx);
    for _ in 0..threads.len() {
        match started_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failure.get_or_insert(e);
            }
            Err(_) => {
                failure.get_or_insert(UringError::Other { qid: 0, what: "a queue thread died while starting".into() });
            }
        }
    }
    let running = UringRunning { queues, threads, pool, pool_threads };
    match failure {
        None => Ok(running),
        Some(e) => {
            // Queues that did register stay until the connection ends (their
            // commands fail then); nothing will be sent to them.
            std::thread::spawn(move || running.stop_and_join());
            Err(e)
        }
    }
}

impl QueueShared {
    fn new(
        qid: usize,
        session: Arc<SessionShared>,
        depth: usize,
        payload_size: usize,
    ) -> Result<QueueShared, UringError> {
        let alloc = |e: io::Error| UringError::Other { qid, what: format!("allocating ring buffers: {e}") };
        let mut entries = Vec::with_capacity(depth);
        for _ in 0..depth {
            entries.push(EntryMem {
                header: RawBuf::new(size_of::<UringReqHeader>()).map_err(alloc)?,
                payload: RawBuf::new(payload_size).map_err(alloc)?,
                borrowed: AtomicBool::new(false),
            });
        }
        // SAFETY: eventfd(2) with valid flags; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(UringError::Setup { qid, source: io::Error::last_os_error() });
        }
        Ok(QueueShared {
            qid,
            session,
            entries: entries.into_boxed_slice(),
            pending: Mutex::default(),
            // SAFETY: efd is a fresh descriptor we own.
            eventfd: unsafe { OwnedFd::from_raw_fd(efd) },
            wake_pending: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        })
    }
}

struct QueueStart<F: Filesystem> {
    session: Arc<Session<F>>,
    shared: Arc<QueueShared>,
    fd: Arc<OwnedFd>,
    pool: Arc<BlockingPool>,
    started: mpsc::Sender<Result<(), UringError>>,
}

/// Where an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryState {
    /// A REGISTER or COMMIT_AND_FETCH is in the kernel.
    InKernel,
    /// A request is being served; its reply is awaited.
    InUser,
    /// Its command failed for good.
    Dead,
}

/// The queue thread's own state: the ring and what it knows of each entry.
struct UringQueue<F: Filesystem> {
    session: Arc<Session<F>>,
    shared: Arc<QueueShared>,
    /// Keeps the session descriptor open while commands refer to it.
    fd: Arc<OwnedFd>,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    sinks: Vec<Arc<dyn ReplySink>>,
    state: Vec<EntryState>,
    commit_ids: Vec<u64>,
    /// [header, payload] per entry, read by the kernel during REGISTER.
    iovecs: Box<[[libc::iovec; 2]]>,
    in_kernel: usize,
    /// The connection has ended (or we were told to stop): commit nothing more.
    gone: bool,
    wake_buf: Box<u64>,
    pool: Arc<BlockingPool>,
    cqes: Vec<(u64, i32)>,
    commits: Vec<u32>,
    staged: Vec<Staged>,
}

fn queue_thread<F: Filesystem>(ctx: QueueStart<F>) {
    let qid = ctx.shared.qid;
    pin_to_cpu(qid);
    ON_QUEUE.with(|q| q.set(Arc::as_ptr(&ctx.shared) as usize));
    let started = ctx.started.clone();
    let mut queue = match UringQueue::new(ctx) {
        Ok(q) => q,
        Err(e) => {
            let _ = started.send(Err(e));
            return;
        }
    };
    match queue.register() {
        Ok(()) => {
            let _ = started.send(Ok(()));
        }
        Err(e) => {
            let _ = started.send(Err(e));
            return;
        }
    }
    drop(started);
    queue.run();
    tracing::debug!(qid, "ring queue stopped");
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET stays in bounds for cpu < CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= libc::CPU_SETSIZE as usize {
            return;
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(cpu, "cannot pin ring queue thread to its CPU: {}", io::Error::last_os_error());
        }
    }
}

/// Sets the SQE's `len` field, which `UringCmd80` does not expose but
/// FUSE_IO_URING_CMD_REGISTER requires (the number of iovecs at `addr`).
fn set_sqe_len(sqe: &mut squeue::Entry128, len: u32) {
    /// `struct io_uring_sqe`: opcode, flags, ioprio, fd, off, addr, then `__u32 len`.
    const LEN_OFFSET: usize = 24;
    const _: () = assert!(size_of::<squeue::Entry128>() == 128);
    // SAFETY: Entry128 is #[repr(C)] and begins with the 64-byte
    // io_uring_sqe, whose u32 `len` lies at LEN_OFFSET (checked by the test
    // `sqe_len_offset`); the write stays inside the 128-byte entry.
    unsafe {
        let p = (sqe as *mut squeue::Entry128).cast::<u8>().add(LEN_OFFSET);
        std::ptr::write_unaligned(p.cast::<u32>(), len);
    }
}

fn fuse_cmd(
    fd: RawFd,
    op: u32,
    qid: usize,
    commit_id: u64,
    iov: Option<&[libc::iovec; 2]>,
    tag: u64,
) -> squeue::Entry128 {
    let req = UringCmdReq { flags: 0, commit_id, qid: qid as u16, padding: [0; 6] };
    let mut area = [0u8; 80];
    area[..size_of::<UringCmdReq>()].copy_from_slice(req.as_bytes());
    let mut b = opcode::UringCmd80::new(types::Fd(fd), op).cmd(area);
    if let Some(iov) = iov {
        b = b.addr(Some(iov.as_ptr() as u64));
    }
    let mut sqe = b.build().user_data(tag);
    if iov.is_some() {
        set_sqe_len(&mut sqe, 2);
    }
    sqe
}

fn is_gone(errno: i32) -> bool {
    matches!(errno, libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED | libc::ENODEV)
}

impl<F: Filesystem> UringQueue<F> {
    fn new(ctx: QueueStart<F>) -> Result<UringQueue<F>, UringError> {
        let qid = ctx.shared.qid;
        let depth = ctx.shared.entries.len();
        // One SQE per entry plus the eventfd read; completions likewise.
        let sq = (depth + 1).next_power_of_two() as u32;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_cqsize(sq * 2)
            .build(sq)
            .or_else(|_| IoUring::<squeue::Entry128, cqueue::Entry>::builder().setup_cqsize(sq * 2).build(sq))
            .map_err(|source| UringError::Setup { qid, source })?;
        let sinks = (0..depth)
            .map(|i| Arc::new(EntrySink { queue: ctx.shared.clone(), index: i as u32 }) as Arc<dyn ReplySink>)
            .collect();
        let iovecs = ctx
            .shared
            .entries
            .iter()
            .map(|e| {
                [
                    libc::iovec { iov_base: e.header.as_ptr().cast(), iov_len: size_of::<UringReqHeader>() },
                    libc::iovec { iov_base: e.payload.as_ptr().cast(), iov_len: e.payload.len() },
                ]
            })
            .collect();
        Ok(UringQueue {
            session: ctx.session,
            shared: ctx.shared,
            fd: ctx.fd,
            ring,
            sinks,
            state: vec![EntryState::Dead; depth],
            commit_ids: vec![0; depth],
            iovecs,
            in_kernel: 0,
            gone: false,
            wake_buf: Box::new(0),
            pool: ctx.pool,
            cqes: Vec::with_capacity(depth + 1),
            commits: Vec::with_capacity(depth),
            staged: Vec::new(),
        })
    }

    fn push(&mut self, sqe: &squeue::Entry128) {
        loop {
            // SAFETY: every buffer an SQE points at (iovecs, entry buffers,
            // wake_buf) lives in this queue or its QueueShared, which outlive
            // the ring's commands (they end before the ring is dropped, or the
            // ring's drop cancels them).
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return;
            }
            // Full: cannot happen with one SQE per entry, but submit and retry.
            if let Err(e) = self.ring.submit() {
                tracing::warn!(qid = self.shared.qid, "io_uring submit failed: {e}");
            }
        }
    }

    fn arm_wake(&mut self) {
        let buf: *mut u64 = &mut *self.wake_buf;
        let sqe =
            opcode::Read::new(types::Fd(self.shared.eventfd.as_raw_fd()), buf.cast(), 8).build().user_data(WAKE_TAG);
        self.push(&squeue::Entry128::from(sqe));
    }

    fn push_register(&mut self, i: usize) {
        let sqe = fuse_cmd(self.fd.as_raw_fd(), cmd::CMD_REGISTER, self.shared.qid, 0, Some(&self.iovecs[i]), i as u64);
        self.push(&sqe);
        self.state[i] = EntryState::InKernel;
        self.in_kernel += 1;
    }

    fn push_commit(&mut self, i: usize) {
        let sqe = fuse_cmd(
            self.fd.as_raw_fd(),
            cmd::CMD_COMMIT_AND_FETCH,
            self.shared.qid,
            self.commit_ids[i],
            None,
            i as u64,
        );
        self.push(&sqe);
        self.state[i] = EntryState::InKernel;
        self.in_kernel += 1;
    }

    /// Registers every entry. A failing REGISTER completes at once, so the
    /// completions present right after submitting tell whether it worked;
    /// requests that already arrived are kept for `run`.
    fn register(&mut self) -> Result<(), UringError> {
        let qid = self.shared.qid;
        self.arm_wake();
        for i in 0..self.state.len() {
            self.push_register(i);
        }
        let mut tries = 0;
        loop {
            if let Err(source) = self.ring.submit() {
                return Err(UringError::Register { qid, source });
            }
            let mut again = Vec::new();
            for c in self.ring.completion() {
                self.cqes.push((c.user_data(), c.result()));
            }
            let mut kept = Vec::with_capacity(self.cqes.len());
            for &(tag, res) in &self.cqes {
                if tag != WAKE_TAG && res < 0 {
                    self.in_kernel -= 1;
                    self.state[tag as usize] = EntryState::Dead;
                    match -res {
                        // The INIT reply is not processed yet, or interrupted: retry.
                        libc::EAGAIN | libc::EINTR if tries < 200 => again.push(tag as usize),
                        errno => return Err(UringError::Register { qid, source: io::Error::from_raw_os_error(errno) }),
                    }
                } else {
                    kept.push((tag, res));
                }
            }
            self.cqes = kept;
            if again.is_empty() {
                return Ok(());
            }
            tries += 1;
            std::thread::sleep(Duration::from_millis(5));
            for i in again {
                self.push_register(i);
            }
        }
    }

    fn run(&mut self) {
        let qid = self.shared.qid;
        let mut stop_deadline = None;
        loop {
            let mut batch = std::mem::take(&mut self.cqes);
            for &(tag, res) in &batch {
                self.complete(tag, res);
            }
            batch.clear();
            self.cqes = batch;
            self.flush_replies();
            if self.shared.stop.load(Ordering::Acquire) {
                self.gone = true;
                stop_deadline.get_or_insert_with(|| Instant::now() + STOP_GRACE);
            }
            if self.gone && self.in_kernel == 0 {
                break;
            }
            let waited = match stop_deadline {
                None => self.ring.submit_and_wait(1),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        tracing::debug!(
                            qid,
                            in_kernel = self.in_kernel,
                            "ring queue stops with commands in the kernel"
                        );
                        break;
                    }
                    let ts = types::Timespec::from(left);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    self.ring.submitter().submit_with_args(1, &args)
                }
            };
            if let Err(e) = waited {
                match e.raw_os_error() {
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY | libc::ETIME) => {}
                    _ => {
                        tracing::error!(qid, "io_uring_enter failed: {e}; ring queue stops");
                        break;
                    }
                }
            }
            for c in self.ring.completion() {
                self.cqes.push((c.user_data(), c.result()));
            }
        }
    }

    fn complete(&mut self, tag: u64, res: i32) {
        if tag == WAKE_TAG {
            self.shared.wake_pending.store(false, Ordering::Release);
            if res < 0 && !is_gone(-res) && -res != libc::EINTR {
                tracing::warn!(qid = self.shared.qid, "eventfd read failed: {}", io::Error::from_raw_os_error(-res));
            }
            if !self.gone && !self.shared.stop.load(Ordering::Acquire) {
                self.arm_wake();
            }
            return;
        }
        let i = tag as usize;
        if i >= self.state.len() || self.state[i] != EntryState::InKernel {
            tracing::error!(qid = self.shared.qid, tag, res, "completion for an entry not in the kernel");
            return;
        }
        self.in_kernel -= 1;
        if res < 0 {
            let errno = -res;
            self.state[i] = EntryState::Dead;
            if is_gone(errno) {
                self.gone = true;
            } else if matches!(errno, libc::EINTR | libc::EAGAIN) && !self.gone {
                // Resubmit what failed: a commit if a request was served on it.
                if self.commit_ids[i] != 0 {
                    self.push_commit(i);
                } else {
                    self.push_register(i);
                }
            } else {
                tracing::warn!(
                    qid = self.shared.qid,
                    entry = i,
                    "ring command failed: {}; entry retired",
                    io::Error::from_raw_os_error(errno)
                );
                if self.state.iter().all(|s| *s == EntryState::Dead) {
                    self.gone = true;
                }
            }
            return;
        }
        self.state[i] = EntryState::InUser;
        self.serve(i);
        self.flush_replies();
    }

    /// Serves the request that arrived on entry `i`.
    fn serve(&mut self, i: usize) {
        let entry = &self.shared.entries[i];
        let h = entry.header.as_ptr();
        // Copy the small parts: the reply's out header overwrites the in
        // header, and nothing may borrow the header buffer.
        let mut header = [0u8; IN_HEADER];
        let mut op_in = [0u8; cmd::OP_IN_OUT_SZ];
        let mut ent = [0u8; size_of::<UringEntInOut>()];
        // SAFETY: the kernel completed the command, so the entry's buffers are
        // ours; the copies stay inside the 288-byte header buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(h, header.as_mut_ptr(), header.len());
            std::ptr::copy_nonoverlapping(h.add(OP_IN), op_in.as_mut_ptr(), op_in.len());
            std::ptr::copy_nonoverlapping(h.add(ENT_IN_OUT), ent.as_mut_ptr(), ent.len());
        }
        let ent = UringEntInOut::read_from_bytes(&ent).unwrap_or_default();
        self.commit_ids[i] = ent.commit_id;
        let payload_sz = (ent.payload_sz as usize).min(entry.payload.len());
        let opcode = InHeader::read_from_prefix(&header[..]).map(|(h, _)| h.opcode).unwrap_or(0);
        if ent.commit_id == 0 {
            // The kernel could not match a commit to it; nothing to answer.
            tracing::error!(qid = self.shared.qid, opcode, "ring request with commit_id 0; entry retired");
            self.state[i] = EntryState::Dead;
            return;
        }
        if payload_sz == 0 && blocks_long(opcode, &op_in) {
            self.pool.submit(Job { header, op_in, sink: self.sinks[i].clone() });
            return;
        }
        if payload_sz == 0 {
            self.session.dispatch_split(&header, &op_in, &[], &self.sinks[i]);
            return;
        }
        entry.borrowed.store(true, Ordering::Release);
        // SAFETY: the payload is ours (request in userspace); nothing writes
        // it while `borrowed` is set: replies are staged instead, and the
        // kernel does not touch it before we commit.
        let payload = unsafe { std::slice::from_raw_parts(entry.payload.as_ptr(), payload_sz) };
        self.session.dispatch_split(&header, &op_in, payload, &self.sinks[i]);
        entry.borrowed.store(false, Ordering::Release);
    }

    /// Copies staged replies into their entries and commits every answered
    /// entry (submitted with the next wait).
    fn flush_replies(&mut self) {
        {
            let mut p = self.shared.lock();
            std::mem::swap(&mut p.commits, &mut self.commits);
            std::mem::swap(&mut p.staged, &mut self.staged);
        }
        if self.commits.is_empty() && self.staged.is_empty() {
            return;
        }
        let mut spare = Vec::new();
        for s in self.staged.drain(..) {
            let entry = &self.shared.entries[s.index as usize];
            // SAFETY: the dispatch that lent the payload has returned (staged
            // replies are flushed only outside `serve`), and this is the
            // request's only reply.
            unsafe { entry.write_reply(&s.out, &[IoSlice::new(&s.body)]) };
            self.commits.push(s.index);
            spare.push(s.body);
        }
        if !spare.is_empty() {
            self.shared.lock().spare.append(&mut spare);
        }
        let mut commits = std::mem::take(&mut self.commits);
        for &i in &commits {
            let i = i as usize;
            if self.state[i] != EntryState::InUser {
                continue;
            }
            if self.gone {
                self.state[i] = EntryState::Dead;
            } else {
                self.push_commit(i);
            }
        }
        commits.clear();
        self.commits = commits;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_matches_the_kernel() {
        assert_eq!(OP_IN, cmd::IN_OUT_HEADER_SZ);
        assert_eq!(ENT_IN_OUT, cmd::IN_OUT_HEADER_SZ + cmd::OP_IN_OUT_SZ);
        assert_eq!(ENT_IN_OUT + offset_of!(UringEntInOut, payload_sz), 272);
    }

    /// `set_sqe_len` writes where the crate's own builders put `len`.
    #[test]
    fn sqe_len_offset() {
        let mut buf = [0u8; 8];
        let read = squeue::Entry128::from(opcode::Read::new(types::Fd(3), buf.as_mut_ptr(), 77).build());
        let mut cmd = fuse_cmd(3, cmd::CMD_REGISTER, 1, 0, None, 0);
        set_sqe_len(&mut cmd, 77);
        let bytes = |e: &squeue::Entry128| -> [u8; 128] {
            // SAFETY: Entry128 is a 128-byte #[repr(C)] value of plain integers.
            unsafe { std::mem::transmute_copy(e) }
        };
        let (r, c) = (bytes(&read), bytes(&cmd));
        assert_eq!(r[24..28], 77u32.to_ne_bytes());
        assert_eq!(c[24..28], r[24..28]);
        // The command area starts at byte 48: fuse_uring_cmd_req with qid 1.
        assert_eq!(c[48 + 16..48 + 18], 1u16.to_ne_bytes());
    }

    #[test]
    fn long_requests_go_to_the_pool() {
        let mut op = [0u8; 128];
        assert!(blocks_long(Opcode::Fsync as u32, &op));
        assert!(blocks_long(Opcode::Setlkw as u32, &op));
        assert!(!blocks_long(Opcode::Setlk as u32, &op));
        assert!(!blocks_long(Opcode::CopyFileRange as u32, &op));
        let arg = CopyFileRangeIn { len: 4 << 20, ..Default::default() };
        op[..56].copy_from_slice(arg.as_bytes());
        assert!(blocks_long(Opcode::CopyFileRange as u32, &op));
        assert!(!blocks_long(9999, &op));
    }

    #[test]
    fn possible_cpus_is_positive() {
        assert!(possible_cpus() >= 1);
    }
}

//! A crew: the threads that serve one CPU's ring queue.
//!
//! Every member has an io_uring of its own and keeps at most one entry of
//! its queue available to the kernel (one REGISTER or COMMIT_AND_FETCH in
//! flight). The kernel hands a new request to an available entry of the
//! CPU's queue (the one made available last) and copies it in through task
//! work of the thread that submitted that entry's command (a request
//! already waiting when a member commits is copied in by the commit
//! itself), so a member blocked in a handler (a slow
//! backing read, a notification waiting for an inode lock that another
//! request on the same CPU holds) holds back only its own request: the next
//! one goes to another member's entry. Handlers run inline, on the member
//! that received the request, with no hand-off.
//!
//! A handler that returns without answering (a lock waiter) leaves its entry
//! held; its member registers a fresh entry so the queue keeps its capacity.
//! When the answer comes (from whichever thread grants the lock), the entry
//! is adopted by an idle member (or a new one, up to a bound) which commits
//! it. Members, entries and threads are bounded per queue.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::mem::size_of;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use efuse_abi::consts::uring as cmd;
use efuse_abi::structs::{InHeader, OutHeader, UringCmdReq, UringEntInOut};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use zerocopy::{FromBytes, IntoBytes};

use super::keeper::Keepers;
use super::memory::{EntryMem, Phase, ENT_IN_OUT, OP_IN};
use crate::filesystem::Filesystem;
use crate::reply::{Grant, Reply, ReplySink};
use crate::session::{Session, SessionShared};

/// Size of `fuse_in_header` at the start of the header area.
const IN_HEADER: usize = size_of::<InHeader>();

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

/// Entries a queue may have beyond one per member, for requests answered
/// later (each waiting lock holds its entry until granted): without room,
/// requests of that CPU wait in the kernel behind the waiters, the unlock
/// that would free them too. Their payload buffers are address space the
/// kernel only writes what a request carries into, so an idle one costs a
/// page or two.
const HELD_ENTRIES: usize = 1024;

/// Starts a crew member with no entry of its own.
pub(super) type SpawnMember = Box<dyn Fn() -> io::Result<std::thread::JoinHandle<()>> + Send>;

/// What members of a crew share.
pub(super) struct Queue {
    pub(super) qid: u16,
    cpu: usize,
    pub(super) session: Arc<SessionShared>,
    payload_size: usize,
    /// Held entries whose answer is written, waiting for a member to commit them.
    adopt: Mutex<VecDeque<Arc<EntryMem>>>,
    crew: Mutex<Crew>,
    crew_changed: Condvar,
    stop: AtomicBool,
    /// Members at most, and entries at most (held ones included).
    max_members: usize,
    max_entries: usize,
    /// Starts a member with no entry (set once the crew is running).
    spawn: Mutex<Option<SpawnMember>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// The machine's CPU keepers and this queue's index among them.
    keepers: std::sync::OnceLock<(Arc<Keepers>, usize)>,
}

#[derive(Default)]
struct Crew {
    members: usize,
    idle: usize,
    entries: usize,
}

impl Queue {
    pub(super) fn new(qid: u16, cpu: usize, session: Arc<SessionShared>, payload_size: usize, members: usize) -> Queue {
        Queue {
            qid,
            cpu,
            session,
            payload_size,
            adopt: Mutex::new(VecDeque::new()),
            crew: Mutex::new(Crew::default()),
            crew_changed: Condvar::new(),
            stop: AtomicBool::new(false),
            max_members: members * 4,
            max_entries: members + HELD_ENTRIES,
            spawn: Mutex::new(None),
            threads: Mutex::new(Vec::new()),
            keepers: std::sync::OnceLock::new(),
        }
    }

    pub(super) fn cpu(&self) -> usize {
        self.cpu
    }

    pub(super) fn set_keepers(&self, k: Arc<Keepers>, idx: usize) {
        let _ = self.keepers.set((k, idx));
    }

    /// A member received a request: keepers hold the other CPUs meanwhile.
    fn note_request(&self) {
        if let Some((k, idx)) = self.keepers.get() {
            k.note(*idx);
        }
    }

    fn crew(&self) -> MutexGuard<'_, Crew> {
        self.crew.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new entry of this queue; None at the bound.
    fn new_entry(&self) -> Option<Arc<EntryMem>> {
        let mut c = self.crew();
        if c.entries >= self.max_entries {
            return None;
        }
        c.entries += 1;
        drop(c);
        match EntryMem::new(self.qid, self.payload_size) {
            Ok(e) => Some(Arc::new(e)),
            Err(e) => {
                self.crew().entries -= 1;
                tracing::warn!(qid = self.qid, "allocating a ring entry: {e}");
                None
            }
        }
    }

    /// Counts an entry made outside [`new_entry`] (at start).
    pub(super) fn count_entry(&self) {
        self.crew().entries += 1;
    }

    /// An entry was retired (its command failed for good): room for another.
    fn retire_entry(&self) {
        let mut c = self.crew();
        c.entries = c.entries.saturating_sub(1);
    }

    /// An answered held entry waits for a member: wake an idle one, or start one.
    fn adopt(&self, entry: Arc<EntryMem>) {
        self.adopt.lock().unwrap_or_else(|e| e.into_inner()).push_back(entry);
        let mut c = self.crew();
        if c.idle > 0 {
            drop(c);
            self.crew_changed.notify_one();
            return;
        }
        if c.members >= self.max_members || self.stop.load(Ordering::Acquire) {
            // Busy members take it when they are free (see Member::run).
            return;
        }
        c.members += 1;
        drop(c);
        let spawned = match &*self.spawn.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(spawn) => spawn(),
            None => Err(io::Error::other("crew not running")),
        };
        match spawned {
            Ok(t) => self.threads.lock().unwrap_or_else(|e| e.into_inner()).push(t),
            Err(e) => {
                self.crew().members -= 1;
                tracing::warn!(qid = self.qid, "cannot start a ring queue member: {e}");
            }
        }
    }

    fn take_adopted(&self) -> Option<Arc<EntryMem>> {
        self.adopt.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
    }

    pub(super) fn set_spawn(&self, spawn: SpawnMember) {
        *self.spawn.lock().unwrap_or_else(|e| e.into_inner()) = Some(spawn);
    }

    pub(super) fn add_thread(&self, t: std::thread::JoinHandle<()>) {
        self.threads.lock().unwrap_or_else(|e| e.into_inner()).push(t);
    }

    pub(super) fn note_member(&self) {
        self.crew().members += 1;
    }

    /// Tells the crew to stop: members exit once none of their commands is
    /// left in the kernel (the end of the connection completes them all).
    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        *self.spawn.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.crew_changed.notify_all();
    }

    /// The member threads started so far.
    pub(super) fn take_threads(&self) -> Vec<std::thread::JoinHandle<()>> {
        std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The reply channel of one entry: what reply objects hold.
pub(super) struct EntrySink {
    queue: Arc<Queue>,
    entry: Arc<EntryMem>,
}

impl ReplySink for EntrySink {
    fn send(&self, reply: &Reply<'_>) {
        let entry = &self.entry;
        let mut len: usize = reply.payload.iter().map(|p| p.len()).sum();
        let (mut error, mut parts, mut grant) = (reply.error, reply.payload, reply.grant);
        if len > entry.payload.len() {
            tracing::error!(
                unique = reply.unique,
                len,
                cap = entry.payload.len(),
                "reply exceeds the ring payload buffer; answering EIO"
            );
            (error, len, parts, grant) = (-libc::EIO, 0, &[], Grant::Nothing);
        }
        let out = OutHeader { len: (size_of::<OutHeader>() + len) as u32, error, unique: reply.unique };
        let mut st = entry.state();
        // Whether the kernel takes the reply is known when its commit completes.
        st.grant = grant.to_refused();
        match st.phase {
            Phase::Serving { .. } => {
                if st.lent {
                    let mut body = Vec::with_capacity(len);
                    for p in parts {
                        body.extend_from_slice(p);
                    }
                    st.staged = Some((out, body));
                } else {
                    // SAFETY: a request is in userspace on this entry, this is
                    // its only reply (reply objects answer once), not lent.
                    unsafe { entry.write_reply(&out, parts) };
                }
                st.phase = Phase::Serving { replied: true };
            }
            Phase::Held => {
                // SAFETY: as above; a held entry's payload is not lent.
                unsafe { entry.write_reply(&out, parts) };
                st.phase = Phase::Idle;
                drop(st);
                self.queue.adopt(entry.clone());
            }
            Phase::Idle => {
                tracing::error!(unique = reply.unique, "reply for a ring entry without a request; dropped");
            }
        }
    }

    fn session(&self) -> Option<&SessionShared> {
        Some(&self.queue.session)
    }
}

/// One entry a member submitted commands for.
struct Owned {
    entry: Arc<EntryMem>,
    sink: Arc<dyn ReplySink>,
    commit_id: u64,
    in_kernel: bool,
}

/// How a member starts.
pub(super) struct MemberStart<F: Filesystem> {
    pub(super) queue: Arc<Queue>,
    pub(super) session: Arc<Session<F>>,
    pub(super) fd: Arc<OwnedFd>,
    /// Entries to register at once (the first members' own, and entries of
    /// queues of offline CPUs); empty for members started later.
    pub(super) entries: Vec<Arc<EntryMem>>,
    /// Told whether registering worked (first members only).
    pub(super) started: Option<mpsc::Sender<Result<(), UringError>>>,
}

/// A crew member's own state.
struct Member<F: Filesystem> {
    queue: Arc<Queue>,
    session: Arc<Session<F>>,
    /// Keeps the session descriptor open while commands refer to it.
    fd: Arc<OwnedFd>,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    /// Entries this member submitted commands for, by slot (the slot is the
    /// command's user_data, so slots never move).
    owned: Vec<Option<Owned>>,
    in_kernel: usize,
    /// The connection is gone: commit nothing more.
    gone: bool,
    cqes: Vec<(u64, i32)>,
}

pub(super) fn member_thread<F: Filesystem>(start: MemberStart<F>) {
    pin_to_cpu(start.queue.cpu);
    let qid = start.queue.qid as usize;
    // Only this thread submits to its ring, so the kernel may defer the
    // task work that copies a request in until this thread waits for it:
    // no signal-style notification per request (measured: about 0.7 us less
    // daemon CPU per request). Older kernels: cooperative task running.
    let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_cqsize(16)
        .build(8)
        .or_else(|_| {
            IoUring::<squeue::Entry128, cqueue::Entry>::builder().setup_coop_taskrun().setup_cqsize(16).build(8)
        })
        .or_else(|_| IoUring::<squeue::Entry128, cqueue::Entry>::builder().setup_cqsize(16).build(8));
    let ring = match ring {
        Ok(r) => r,
        Err(source) => {
            if let Some(tx) = start.started {
                let _ = tx.send(Err(UringError::Setup { qid, source }));
            }
            start.queue.crew().members -= 1;
            return;
        }
    };
    let mut m = Member {
        queue: start.queue,
        session: start.session,
        fd: start.fd,
        ring,
        owned: Vec::new(),
        in_kernel: 0,
        gone: false,
        cqes: Vec::new(),
    };
    for e in start.entries {
        m.register(e);
    }
    if let Some(tx) = start.started {
        let r = m.first_registration();
        let failed = r.is_err();
        let _ = tx.send(r);
        if failed {
            // REGISTERs of other entries may have gone through: their
            // buffers stay with the kernel.
            m.leak();
            m.queue.crew().members -= 1;
            return;
        }
    }
    m.run();
    let mut c = m.queue.crew();
    c.members -= 1;
    drop(c);
    m.queue.crew_changed.notify_all();
    tracing::debug!(qid, "ring queue member stopped");
}

/// Pins the calling thread to `cpu`.
pub(super) fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET stays in bounds for cpu < CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= libc::CPU_SETSIZE as usize {
            return;
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(cpu, "cannot pin a ring queue thread to its CPU: {}", io::Error::last_os_error());
        }
    }
}

/// Sets the SQE's `len` field, which `UringCmd80` does not expose but
/// FUSE_IO_URING_CMD_REGISTER requires (the number of iovecs at `addr`).
pub(super) fn set_sqe_len(sqe: &mut squeue::Entry128, len: u32) {
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

pub(super) fn fuse_cmd(
    fd: RawFd,
    op: u32,
    qid: u16,
    commit_id: u64,
    iov: Option<&[libc::iovec; 2]>,
    tag: u64,
) -> squeue::Entry128 {
    let req = UringCmdReq { flags: 0, commit_id, qid, padding: [0; 6] };
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

/// How long a stopping member waits for its commands to come back from the
/// kernel before it gives up on them (keeping their buffers, never freed).
const STOP_GRACE: Duration = Duration::from_secs(10);

impl<F: Filesystem> Member<F> {
    fn push(&mut self, sqe: &squeue::Entry128) {
        loop {
            // SAFETY: every buffer an SQE points at (an entry's iovecs and
            // buffers) is kept alive by `owned` (an Arc) until its command
            // completes, and the ring is never dropped with commands in flight.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                tracing::warn!(qid = self.queue.qid, "io_uring submit failed: {e}");
            }
        }
    }

    /// Takes a free slot for `entry`.
    fn own(&mut self, entry: Arc<EntryMem>, commit_id: u64) -> usize {
        let sink: Arc<dyn ReplySink> = Arc::new(EntrySink { queue: self.queue.clone(), entry: entry.clone() });
        let owned = Owned { entry, sink, commit_id, in_kernel: false };
        match self.owned.iter().position(Option::is_none) {
            Some(i) => {
                self.owned[i] = Some(owned);
                i
            }
            None => {
                self.owned.push(Some(owned));
                self.owned.len() - 1
            }
        }
    }

    fn slot(&mut self, i: usize) -> &mut Owned {
        self.owned[i].as_mut().expect("a command's slot stays owned until it completes")
    }

    /// Starts owning `entry` and registers it.
    fn register(&mut self, entry: Arc<EntryMem>) {
        let i = self.own(entry, 0);
        self.submit_register(i);
    }

    fn submit_register(&mut self, i: usize) {
        let fd = self.fd.as_raw_fd();
        let o = self.slot(i);
        let sqe = fuse_cmd(fd, cmd::CMD_REGISTER, o.entry.qid, 0, Some(o.entry.iovecs()), i as u64);
        o.in_kernel = true;
        self.push(&sqe);
        self.in_kernel += 1;
    }

    fn submit_commit(&mut self, i: usize) {
        let fd = self.fd.as_raw_fd();
        let o = self.slot(i);
        let sqe = fuse_cmd(fd, cmd::CMD_COMMIT_AND_FETCH, o.entry.qid, o.commit_id, None, i as u64);
        o.in_kernel = true;
        self.push(&sqe);
        self.in_kernel += 1;
    }

    /// Starts owning an entry another thread answered, and commits it.
    fn adopt(&mut self, entry: Arc<EntryMem>) {
        let commit_id = entry.state().commit_id;
        let i = self.own(entry, commit_id);
        self.submit_commit(i);
    }

    /// Entries of this queue's own id with a command in the kernel.
    fn available(&self) -> usize {
        self.owned.iter().flatten().filter(|o| o.in_kernel && o.entry.qid == self.queue.qid).count()
    }

    /// Submits the first REGISTERs and checks them: a failing REGISTER
    /// completes at once; requests that already arrived are kept for `run`.
    fn first_registration(&mut self) -> Result<(), UringError> {
        let qid = self.queue.qid as usize;
        let mut tries = 0;
        loop {
            if let Err(source) = self.ring.submit() {
                return Err(UringError::Register { qid, source });
            }
            for c in self.ring.completion() {
                self.cqes.push((c.user_data(), c.result()));
            }
            let mut again = Vec::new();
            let mut kept = Vec::with_capacity(self.cqes.len());
            for (tag, res) in std::mem::take(&mut self.cqes) {
                let i = tag as usize;
                if res < 0 && self.owned.get(i).is_some_and(Option::is_some) {
                    self.slot(i).in_kernel = false;
                    self.in_kernel -= 1;
                    match -res {
                        // The INIT reply is not processed yet, or interrupted: retry.
                        libc::EAGAIN | libc::EINTR if tries < 200 => again.push(i),
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
                self.submit_register(i);
            }
        }
    }

    fn run(&mut self) {
        let mut stop_deadline: Option<Instant> = None;
        loop {
            let batch = std::mem::take(&mut self.cqes);
            for &(tag, res) in &batch {
                self.complete(tag, res);
            }
            self.cqes = batch;
            self.cqes.clear();
            self.session.undo_refused();
            let stopping = self.gone || self.queue.stop.load(Ordering::Acquire);
            if stopping {
                if self.in_kernel == 0 {
                    return;
                }
                stop_deadline.get_or_insert_with(|| Instant::now() + STOP_GRACE);
            } else if self.available() == 0 || self.queue.crew().members >= self.queue.max_members {
                // Answered held entries wait for a member; take one when free
                // (or, with the crew at its bound, whenever possible).
                if let Some(e) = self.queue.take_adopted() {
                    self.adopt(e);
                }
            }
            if self.in_kernel == 0 {
                if !self.park() {
                    return;
                }
                continue;
            }
            let waited = match stop_deadline {
                None => self.commit_then_wait(),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        tracing::warn!(
                            qid = self.queue.qid,
                            in_kernel = self.in_kernel,
                            "ring commands did not come back from the kernel; keeping their buffers"
                        );
                        // Never free memory the kernel may still write to.
                        self.leak();
                        return;
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
                        tracing::error!(qid = self.queue.qid, "io_uring_enter failed: {e}; member stops");
                        self.leak();
                        return;
                    }
                }
            }
            for c in self.ring.completion() {
                self.cqes.push((c.user_data(), c.result()));
            }
            if !self.cqes.is_empty() {
                self.queue.note_request();
            }
        }
    }

    /// Submits the commits (and fetches) queued in the SQ, then waits for a
    /// completion, in two calls rather than one: the first returns to user
    /// space right after the commits, so the program a reply woke on this
    /// CPU runs at once (it preempts this thread there) and usually sends
    /// its next request before this thread waits; the wait then finds it
    /// and does not sleep. Waiting in the same call as the commits made this
    /// thread sleep once per request (one voluntary switch per request,
    /// against 0.03 for /dev/fuse workers, which return to user space after
    /// each reply); measured with fstat loops on memfs `--cache none`
    /// (median of 5 alternating runs): +4% with one client thread, +13%
    /// with two (and no more collapses to half the rate), +1% with four.
    fn commit_then_wait(&mut self) -> io::Result<usize> {
        /// `IORING_ENTER_GETEVENTS` (uapi io_uring.h): with a minimum of 0
        /// it runs deferred task work (requests waiting to be copied in)
        /// and returns without blocking.
        const ENTER_GETEVENTS: u32 = 1;
        let pending = self.ring.submission().len() as u32;
        // SAFETY: every SQE pushed is complete and its buffers are kept
        // alive by `owned` (see `push`); the SQ tail was published when
        // `push` dropped its queue guard.
        let submitted = unsafe { self.ring.submitter().enter::<libc::sigset_t>(pending, 0, ENTER_GETEVENTS, None) }?;
        if self.ring.completion().is_empty() {
            self.ring.submit_and_wait(1)
        } else {
            Ok(submitted)
        }
    }

    /// Gives up on commands still in the kernel: their entries (and this
    /// ring, dropped with the member) are never freed, since the kernel may
    /// still write to them.
    fn leak(&mut self) {
        for o in self.owned.iter_mut() {
            if o.as_ref().is_some_and(|o| o.in_kernel) {
                std::mem::forget(o.take());
            }
        }
    }

    /// Waits, with no command in the kernel, for an answered entry to adopt.
    /// False when the crew stops.
    fn park(&mut self) -> bool {
        let q = self.queue.clone();
        let mut c = q.crew();
        c.idle += 1;
        loop {
            if q.stop.load(Ordering::Acquire) {
                c.idle -= 1;
                return false;
            }
            if let Some(e) = q.take_adopted() {
                c.idle -= 1;
                drop(c);
                self.adopt(e);
                return true;
            }
            c = q.crew_changed.wait(c).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn complete(&mut self, tag: u64, res: i32) {
        let i = tag as usize;
        if !self.owned.get(i).and_then(Option::as_ref).is_some_and(|o| o.in_kernel) {
            tracing::error!(qid = self.queue.qid, tag, res, "completion for an entry not in the kernel");
            return;
        }
        self.slot(i).in_kernel = false;
        self.in_kernel -= 1;
        // A completed commit settles the fate of the reply it carried.
        let grant = self.slot(i).entry.state().grant.take();
        if let (Some(g), true) = (grant, res == -libc::ENOENT) {
            self.queue.session.refused(g);
        }
        if res < 0 {
            let errno = -res;
            if is_gone(errno) {
                self.gone = true;
            } else if matches!(errno, libc::EINTR | libc::EAGAIN) && !self.gone {
                if self.slot(i).commit_id != 0 {
                    self.submit_commit(i);
                } else {
                    self.submit_register(i);
                }
            } else {
                tracing::warn!(
                    qid = self.queue.qid,
                    "ring command failed: {}; entry retired",
                    io::Error::from_raw_os_error(errno)
                );
                self.owned[i] = None;
                self.queue.retire_entry();
                if !self.gone && self.available() == 0 {
                    if let Some(e) = self.queue.new_entry() {
                        self.register(e);
                    }
                }
            }
            return;
        }
        self.serve(i);
    }

    /// Serves the request that arrived on owned entry `i`, inline.
    fn serve(&mut self, i: usize) {
        let entry = self.slot(i).entry.clone();
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
        self.slot(i).commit_id = ent.commit_id;
        let payload_sz = (ent.payload_sz as usize).min(entry.payload.len());
        if ent.commit_id == 0 {
            let opcode = InHeader::read_from_prefix(&header[..]).map(|(h, _)| h.opcode).unwrap_or(0);
            tracing::error!(qid = self.queue.qid, opcode, "ring request with commit_id 0; entry retired");
            self.owned[i] = None;
            self.queue.retire_entry();
            return;
        }
        {
            let mut st = entry.state();
            st.commit_id = ent.commit_id;
            st.phase = Phase::Serving { replied: false };
            st.lent = payload_sz > 0;
            st.staged = None;
        }
        let sink = self.slot(i).sink.clone();
        if payload_sz == 0 {
            self.session.dispatch_split(&header, &op_in, &[], &sink);
        } else {
            // SAFETY: the payload is ours (request in userspace); nothing
            // writes it while `lent` is set: replies are staged instead, and
            // the kernel does not touch it before we commit.
            let payload = unsafe { std::slice::from_raw_parts(entry.payload.as_ptr(), payload_sz) };
            self.session.dispatch_split(&header, &op_in, payload, &sink);
        }
        let mut st = entry.state();
        st.lent = false;
        if let Some((out, body)) = st.staged.take() {
            // SAFETY: the dispatch that lent the payload has returned, and this
            // is the request's only reply.
            unsafe { entry.write_reply(&out, &[IoSlice::new(&body)]) };
        }
        match st.phase {
            Phase::Serving { replied: true } => {
                st.phase = Phase::Idle;
                drop(st);
                if !self.gone {
                    self.submit_commit(i);
                }
            }
            _ => {
                // Answered later, from another thread; keep the queue's
                // capacity with a fresh entry meanwhile.
                st.phase = Phase::Held;
                drop(st);
                self.owned[i] = None;
                if !self.gone && self.available() == 0 {
                    if let Some(e) = self.queue.new_entry() {
                        self.register(e);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    /// `set_sqe_len` writes where the crate's own builders put `len`.
    #[test]
    fn sqe_len_offset() {
        let mut buf = [0u8; 8];
        let read = squeue::Entry128::from(opcode::Read::new(types::Fd(3), buf.as_mut_ptr(), 77).build());
        let mut c = fuse_cmd(3, cmd::CMD_REGISTER, 1, 0, None, 0);
        set_sqe_len(&mut c, 77);
        let bytes = |e: &squeue::Entry128| -> [u8; 128] {
            // SAFETY: Entry128 is a 128-byte #[repr(C)] value of plain integers.
            unsafe { std::mem::transmute_copy(e) }
        };
        let (r, c) = (bytes(&read), bytes(&c));
        assert_eq!(r[24..28], 77u32.to_ne_bytes());
        assert_eq!(c[24..28], r[24..28]);
        // The command area starts at byte 48: fuse_uring_cmd_req with qid 1.
        assert_eq!(c[48 + 16..48 + 18], 1u16.to_ne_bytes());
    }

    #[test]
    fn ent_in_out_layout() {
        assert_eq!(offset_of!(UringEntInOut, commit_id), 8);
    }
}

//! One bypass client: the thread that serves its region's slots.
//!
//! For each request: copy it out of the slot once, then look only at the
//! copy: length, opcode whitelist, credentials and `unique` overwritten with
//! the daemon's, every node id and file handle checked against this
//! client's own tables (never the region's), the kernel's permission rules
//! applied, file handles translated to the file system's. Then the copy goes
//! through [`Session::dispatch`] like a kernel request; the reply is written
//! into the slot, what it granted (lookups, open handles) is recorded in the
//! client's tables, the kernel's caches of what changed are invalidated, and
//! only then is the reply published. When the client goes away, everything
//! it still held is released and forgotten through the session.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use efuse_abi::consts::{fattr, fopen, init, GETATTR_FH};
use efuse_abi::structs as abi;
use efuse_abi::{Opcode, Operation, ProtocolOptions, Request, ROOT_ID};
use efuse_bypass::{futex_wait, futex_wake, state, Region};
use zerocopy::{FromBytes, IntoBytes};

use efuse_bypass::table::{now_ns, Published, Publisher};

use super::perm::{self, Creds, MAY_EXEC, MAY_READ, MAY_WRITE};
use super::Shared;
use crate::filesystem::Filesystem;
use crate::reply::{Refused, Reply, ReplySink};
use crate::session::{Session, SessionShared};

const IN_HEADER: usize = std::mem::size_of::<abi::InHeader>();
const OUT_HEADER: usize = std::mem::size_of::<abi::OutHeader>();
/// How long an idle serving thread keeps polling before it sleeps. It
/// yields the CPU every [`SPIN_POLLS_PER_YIELD`] polls (a few hundred
/// nanoseconds), so on a machine with as many busy threads as CPUs a
/// spinning daemon thread never keeps a client from running; a yield each
/// poll (a system call, about a microsecond here) made every answer late.
const SPIN: Duration = Duration::from_micros(20);
/// Polls between two yields while spinning.
const SPIN_POLLS_PER_YIELD: u32 = 64;
/// Sleep on the doorbell at most this long, then look for a hang-up.
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// An accepted, welcomed client.
pub(crate) struct Conn {
    pub sock: OwnedFd,
    pub region: Arc<Region>,
    pub creds: Creds,
    /// The uid SO_PEERCRED gave (what the per-user limit counts).
    pub peer_uid: u32,
    /// Set by the accept thread, which watches every client's socket, when
    /// this one hangs up (it also rings the doorbell).
    pub hung: Arc<std::sync::atomic::AtomicBool>,
    /// The metadata table of the client's credentials (see `tables`).
    pub table: Option<super::tables::Lease>,
}

/// A handle the client holds, by the daemon's number for it.
#[derive(Debug, Clone, Copy)]
struct Handle {
    ino: u64,
    /// The file system's handle.
    fh: u64,
    flags: i32,
    dir: bool,
    /// Made by the daemon on a mount with stateless opens: the file system
    /// never saw an OPEN, so it gets no RELEASE.
    stateless: bool,
}

/// The client's lookups of one node.
#[derive(Debug, Default, Clone, Copy)]
struct Held {
    /// Lookups the file system counted for this client.
    fs: u64,
    /// Lookups the client was told it holds that the file system never
    /// counted: a WALK that ends on the node it started from (the client
    /// already held it). Forgotten first, without a FORGET to the file system.
    extra: u64,
}

#[derive(Default)]
struct Tables {
    lookups: HashMap<u64, Held>,
    handles: HashMap<u64, Handle>,
    next_handle: u64,
}

impl Tables {
    fn holds(&self, nodeid: u64) -> bool {
        nodeid == ROOT_ID || self.lookups.get(&nodeid).is_some_and(|h| h.fs + h.extra > 0)
    }

    fn add_lookup(&mut self, nodeid: u64) {
        if nodeid != 0 {
            self.lookups.entry(nodeid).or_default().fs += 1;
        }
    }

    fn add_handle(&mut self, h: Handle) -> u64 {
        // Small numbers, reused: the lowest free one past the last given.
        let mut n = self.next_handle;
        while self.handles.contains_key(&n) {
            n = n.wrapping_add(1);
        }
        self.next_handle = n.wrapping_add(1);
        self.handles.insert(n, h);
        n
    }

    /// Records what a delivered reply granted.
    fn grant(&mut self, g: &Refused) {
        match g {
            Refused::Lookup { nodeid } => self.add_lookup(*nodeid),
            Refused::Create { nodeid, .. } => self.add_lookup(*nodeid),
            Refused::Lookups(ids) => ids.iter().for_each(|n| self.add_lookup(*n)),
            Refused::Open { .. } => {}
        }
    }
}

enum Target {
    /// The reply goes into slot `i` (for the client).
    Slot(u32),
    /// The reply is kept for the daemon (its own requests).
    Capture,
}

struct SinkState {
    target: Target,
    done: bool,
    error: i32,
    /// Bytes written into the slot (header included).
    len: usize,
    /// A captured payload, or an OPEN/CREATE reply held back for rewriting.
    captured: Vec<u8>,
    held_back: bool,
    grant: Option<Refused>,
}

/// Where the session's replies to this client's requests go. One per
/// client: its thread has one request in the session at a time.
struct Sink {
    region: Arc<Region>,
    shared: Arc<SessionShared>,
    st: Mutex<SinkState>,
    cv: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ReplySink for Sink {
    fn send(&self, reply: &Reply<'_>) {
        let mut st = lock(&self.st);
        if st.done {
            tracing::warn!(op = reply.opcode.name(), "bypass: a second reply to one request; dropped");
            if let Some(g) = reply.grant.to_refused() {
                self.shared.refused(g);
            }
            return;
        }
        let plen: usize = reply.payload.iter().map(|p| p.len()).sum();
        st.error = reply.error;
        st.held_back = false;
        let mut grant = reply.grant.to_refused();
        match st.target {
            Target::Capture => {
                st.captured.clear();
                reply.payload.iter().for_each(|p| st.captured.extend_from_slice(p));
            }
            Target::Slot(i) => {
                let rewrite =
                    reply.error == 0 && matches!(reply.opcode, Opcode::Open | Opcode::Opendir | Opcode::Create);
                if rewrite {
                    st.captured.clear();
                    reply.payload.iter().for_each(|p| st.captured.extend_from_slice(p));
                    st.held_back = true;
                    st.len = OUT_HEADER + plen;
                } else {
                    let out = abi::OutHeader { len: (OUT_HEADER + plen) as u32, error: reply.error, unique: 0 };
                    let written = if reply.payload.len() <= 7 {
                        let mut parts: [&[u8]; 8] = [&[]; 8];
                        parts[0] = out.as_bytes();
                        for (d, s) in parts[1..].iter_mut().zip(reply.payload) {
                            *d = s;
                        }
                        self.region.write_parts(i, &parts[..=reply.payload.len()])
                    } else {
                        let mut all = Vec::with_capacity(plen);
                        reply.payload.iter().for_each(|p| all.extend_from_slice(p));
                        self.region.write_parts(i, &[out.as_bytes(), &all])
                    };
                    match written {
                        Ok(n) => st.len = n,
                        Err(need) => {
                            tracing::warn!(op = reply.opcode.name(), need, "bypass: reply larger than the slot; EIO");
                            let eio = abi::OutHeader { len: OUT_HEADER as u32, error: -libc::EIO, unique: 0 };
                            let _ = self.region.write_parts(i, &[eio.as_bytes()]);
                            st.len = OUT_HEADER;
                            st.error = -libc::EIO;
                            // Nobody receives what the reply granted: take it back.
                            if let Some(g) = grant.take() {
                                self.shared.refused(g);
                            }
                        }
                    }
                }
            }
        }
        st.grant = grant;
        st.done = true;
        self.cv.notify_all();
    }

    fn session(&self) -> Option<&SessionShared> {
        Some(&self.shared)
    }
}

/// What a finished call returned.
pub(super) struct Outcome {
    error: i32,
    len: usize,
    payload: Vec<u8>,
    held_back: bool,
    grant: Option<Refused>,
}

/// A change to tell the kernel about once the file system made it.
#[derive(Debug)]
enum Change {
    /// Attributes and data of a node.
    Data(u64),
    /// Attributes of a node.
    Attr(u64),
    /// A name in a directory (and so the directory's attributes).
    Entry(u64, Vec<u8>),
}

/// A request refused before dispatch: the errno (positive).
type Refuse = i32;

pub(super) struct Client<F: Filesystem> {
    session: Arc<Session<F>>,
    shared: Arc<Shared>,
    conn: Conn,
    /// What this client's metadata table holds (shared with the other
    /// clients of its credentials; kept exact by the table's listener).
    table: Option<Arc<Mutex<Publisher>>>,
    /// The table's count of WALKs in progress (see `SharedTable::walkers`).
    walkers: Option<Arc<std::sync::atomic::AtomicU32>>,
    sink: Arc<Sink>,
    dyn_sink: Arc<dyn ReplySink>,
    tables: Tables,
    req: Vec<u8>,
    opts: ProtocolOptions,
    protected_hardlinks: bool,
}

/// Serves `conn` until it hangs up or the server stops, then releases what
/// it held.
pub(crate) fn serve<F: Filesystem>(session: Arc<Session<F>>, conn: Conn, shared: Arc<Shared>) {
    let sink = Arc::new(Sink {
        region: conn.region.clone(),
        shared: session.shared().clone(),
        st: Mutex::new(SinkState {
            target: Target::Capture,
            done: false,
            error: 0,
            len: 0,
            captured: Vec::new(),
            held_back: false,
            grant: None,
        }),
        cv: Condvar::new(),
    });
    let opts = ProtocolOptions { setxattr_ext: shared.negotiated.flags & init::SETXATTR_EXT != 0 };
    let table = conn.table.as_ref().map(|l| l.table.publisher.clone());
    let walkers = conn.table.as_ref().map(|l| l.table.walkers.clone());
    let mut c = Client {
        session,
        table,
        walkers,
        shared: shared.clone(),
        dyn_sink: sink.clone(),
        sink,
        conn,
        tables: Tables { next_handle: 1, ..Default::default() },
        req: Vec::new(),
        opts,
        protected_hardlinks: perm::protected_hardlinks(),
    };
    c.run();
    c.cleanup();
    shared.client_out(c.conn.peer_uid);
    tracing::info!(pid = c.conn.creds.pid, "bypass: client disconnected");
}

impl<F: Filesystem> Client<F> {
    fn run(&mut self) {
        let region = self.conn.region.clone();
        let n = region.slot_count();
        let h = region.header();
        let mut hung_seen = false;
        loop {
            let seen = h.doorbell.load(Ordering::SeqCst);
            let mut any = false;
            for i in 0..n {
                let sh = region.slot(i);
                if sh
                    .state
                    .compare_exchange(state::REQUEST, state::SERVING, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    any = true;
                    self.serve_slot(i);
                }
            }
            self.drain_table();
            if any {
                continue;
            }
            if self.shared.stop.load(Ordering::Acquire) {
                return;
            }
            // Gone (the accept thread saw the hang-up): once a scan after
            // that finds nothing left to serve, leave.
            if self.conn.hung.load(Ordering::Acquire) {
                if hung_seen {
                    return;
                }
                hung_seen = true;
                continue;
            }
            // Idle: poll the doorbell a short while. Mostly a plain spin (a
            // client on the other CPU gets its answer within a cache-line
            // transfer); every few hundred polls a yield, so that a client
            // waiting for this CPU gets it.
            let start = Instant::now();
            let mut rang = false;
            'spin: while start.elapsed() < SPIN {
                for _ in 0..SPIN_POLLS_PER_YIELD {
                    if h.doorbell.load(Ordering::Acquire) != seen {
                        rang = true;
                        break 'spin;
                    }
                    std::hint::spin_loop();
                }
                // SAFETY: no preconditions.
                unsafe { libc::sched_yield() };
            }
            if rang {
                continue;
            }
            h.server_waiting.store(1, Ordering::SeqCst);
            if h.doorbell.load(Ordering::SeqCst) == seen {
                futex_wait(&h.doorbell, seen, Some(IDLE_WAIT));
            }
            h.server_waiting.store(0, Ordering::SeqCst);
            if h.doorbell.load(Ordering::Acquire) == seen && self.hung_up() {
                return;
            }
        }
    }

    /// Has the client closed its socket (exited)?
    fn hung_up(&self) -> bool {
        if self.conn.hung.load(Ordering::Acquire) {
            return true;
        }
        let mut p = libc::pollfd { fd: self.conn.sock.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: one pollfd, no wait.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n > 0 && p.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR | libc::POLLNVAL) != 0
    }

    fn serve_slot(&mut self, i: u32) {
        let region = self.conn.region.clone();
        let sh = region.slot(i);
        let len = sh.len.load(Ordering::Acquire) as usize;
        // Read once, with the request: nobody waits for this one's reply.
        let no_reply = sh.flags.load(Ordering::Acquire) & efuse_bypass::slot_flags::NO_REPLY != 0;
        self.shared.stats.requests.fetch_add(1, Ordering::Relaxed);
        let mut req = std::mem::take(&mut self.req);
        let written = match region.copy_out(i, len, &mut req) {
            Ok(()) => self.handle(i, &mut req),
            Err(_) => self.error_reply(i, libc::EIO),
        };
        self.req = req;
        if no_reply {
            // The client let go of the slot when it posted the request; it
            // is free again once served.
            sh.state.store(state::FREE, Ordering::Release);
            region.header().claimed.fetch_and(!(1u64 << i), Ordering::Release);
            return;
        }
        sh.len.store(written as u32, Ordering::Relaxed);
        sh.state.store(state::REPLY, Ordering::SeqCst);
        if sh.client_waiting.load(Ordering::SeqCst) != 0 {
            futex_wake(&sh.state, 1);
        }
    }

    /// Writes an error reply into slot `i`; returns its length.
    fn error_reply(&self, i: u32, errno: i32) -> usize {
        let out = abi::OutHeader { len: OUT_HEADER as u32, error: -errno, unique: 0 };
        let _ = self.conn.region.write_parts(i, &[out.as_bytes()]);
        OUT_HEADER
    }

    fn reply_bytes(&self, i: u32, payload: &[u8]) -> usize {
        let out = abi::OutHeader { len: (OUT_HEADER + payload.len()) as u32, error: 0, unique: 0 };
        match self.conn.region.write_parts(i, &[out.as_bytes(), payload]) {
            Ok(n) => n,
            Err(_) => self.error_reply(i, libc::EIO),
        }
    }

    /// Serves the copy `req` of slot `i`'s request (see [`Self::serve_request`]),
    /// then the FORGET a RELEASE may carry
    /// ([`efuse_bypass::wire::RELEASE_FORGET`]), after the release.
    fn handle(&mut self, i: u32, req: &mut [u8]) -> usize {
        let mut forget_after = None;
        if let Ok((h, rest)) = abi::InHeader::read_from_prefix(req) {
            if h.opcode == Opcode::Release as u32 {
                if let Ok((mut r, _)) = abi::ReleaseIn::read_from_prefix(rest) {
                    if r.release_flags & efuse_bypass::wire::RELEASE_FORGET != 0 {
                        forget_after = Some(h.nodeid);
                        r.release_flags &= !efuse_bypass::wire::RELEASE_FORGET;
                        let at = IN_HEADER..IN_HEADER + std::mem::size_of::<abi::ReleaseIn>();
                        req[at].copy_from_slice(r.as_bytes());
                    }
                }
            }
        }
        let len = self.serve_request(i, req);
        if let Some(n) = forget_after {
            self.forget_held(n, 1);
        }
        len
    }

    /// Validates the copy `req` of slot `i`'s request, serves it, writes the
    /// reply; returns the reply's length.
    fn serve_request(&mut self, i: u32, req: &mut [u8]) -> usize {
        let Ok((mut h, _)) = abi::InHeader::read_from_prefix(req) else {
            return self.error_reply(i, libc::EIO);
        };
        if h.len as usize != req.len() {
            return self.error_reply(i, libc::EIO);
        }
        if h.total_extlen != 0 {
            return self.error_reply(i, libc::EINVAL);
        }
        h.uid = self.conn.creds.uid;
        h.gid = self.conn.creds.gid;
        h.pid = self.conn.creds.pid;
        h.unique = self.shared.next_unique();
        req[..IN_HEADER].copy_from_slice(h.as_bytes());
        if h.opcode == efuse_bypass::op::WALK {
            return match super::walk::walk(self, h.nodeid, &req[IN_HEADER..]) {
                Ok(out) => self.reply_bytes(i, out.as_bytes()),
                Err(e) => self.error_reply(i, e),
            };
        }
        let Some(op) = Opcode::from_u32(h.opcode).filter(|o| WHITELIST.contains(o)) else {
            return self.error_reply(i, libc::ENOSYS);
        };
        if op == Opcode::Forget {
            return self.forget_request(i, req);
        }
        if !self.holds(h.nodeid) {
            return self.error_reply(i, libc::ENOENT);
        }
        // OPEN of a node the client found in its table: it will FORGET it
        // at close, so the open takes a lookup for it (the bit is ours, not
        // the file system's).
        let mut adopt = false;
        let mut prefetch = false;
        if op == Opcode::Open {
            if let Ok((mut o, _)) = abi::OpenIn::read_from_prefix(&req[IN_HEADER..]) {
                adopt = o.open_flags & efuse_bypass::wire::OPEN_ADOPT != 0;
                prefetch = o.open_flags & efuse_bypass::wire::OPEN_PREFETCH != 0;
                o.open_flags &= !(efuse_bypass::wire::OPEN_ADOPT | efuse_bypass::wire::OPEN_PREFETCH);
                req[IN_HEADER..IN_HEADER + std::mem::size_of::<abi::OpenIn>()].copy_from_slice(o.as_bytes());
            }
        }
        let mut changes = Vec::new();
        let mut release: Option<u64> = None;
        let mut open_fallback: Option<(i32, bool)> = None;
        if let Err(e) = self.check(req, &mut changes, &mut release, &mut open_fallback) {
            return self.error_reply(i, e);
        }
        if op == Opcode::Access {
            // Checked above, as the kernel does with default_permissions
            // (which never sends ACCESS to the file system).
            return self.error_reply(i, 0);
        }
        if matches!(op, Opcode::Open | Opcode::Opendir) {
            if let Err(e) = self.adopt(h.nodeid, adopt) {
                return self.error_reply(i, e);
            }
        }
        let out = self.call(req, Target::Slot(i));
        if let Some(dh) = release {
            self.tables.handles.remove(&dh);
        }
        if out.error == -libc::ENOSYS {
            if let Some((flags, dir)) = open_fallback {
                return self.stateless_open(i, h.nodeid, flags, dir);
            }
        }
        if let Some(g) = &out.grant {
            self.tables.grant(g);
        }
        let len = if out.held_back { self.finish_open(i, op, &out, prefetch) } else { out.len };
        if out.error == 0 {
            self.invalidate(&changes);
        }
        len
    }

    /// OPEN/OPENDIR/CREATE succeeded: the client gets the daemon's handle,
    /// never the file system's, and no passthrough (it has no kernel file).
    fn finish_open(&mut self, i: u32, op: Opcode, out: &Outcome, prefetch: bool) -> usize {
        let mut payload = out.payload.clone();
        let at = if op == Opcode::Create { std::mem::size_of::<abi::EntryOut>() } else { 0 };
        let (ino, fh, flags, dir) = match &out.grant {
            Some(Refused::Open { ino, fh, flags, dir }) => (*ino, *fh, *flags, *dir),
            Some(Refused::Create { nodeid, fh, flags }) => (*nodeid, *fh, *flags, false),
            _ => return self.error_reply(i, libc::EIO),
        };
        let Ok((mut o, _)) = abi::OpenOut::read_from_prefix(payload.get(at..).unwrap_or(&[])) else {
            return self.error_reply(i, libc::EIO);
        };
        let dh = self.tables.add_handle(Handle { ino, fh, flags, dir, stateless: false });
        o.fh = dh;
        o.open_flags &= !fopen::PASSTHROUGH;
        o.backing_id = 0;
        payload[at..at + std::mem::size_of::<abi::OpenOut>()].copy_from_slice(o.as_bytes());
        if prefetch && op == Opcode::Open {
            self.prefetch(ino, fh, flags, &mut payload);
        }
        self.reply_bytes(i, &payload)
    }

    /// Appends the first bytes of the file just opened (handle `fs_fh` of
    /// the file system) to an OPEN reply: a [`efuse_bypass::wire::PrefetchOut`]
    /// and the data; nothing (valid 0) when the handle cannot read or the
    /// read fails.
    fn prefetch(&self, ino: u64, fs_fh: u64, flags: i32, payload: &mut Vec<u8>) {
        use efuse_bypass::wire::{PrefetchOut, PREFETCH_MAX};
        let readable = matches!(flags & libc::O_ACCMODE, libc::O_RDONLY | libc::O_RDWR);
        let mut head = PrefetchOut::default();
        let mut data = Vec::new();
        if readable {
            let r = abi::ReadIn {
                fh: fs_fh,
                offset: 0,
                size: PREFETCH_MAX as u32,
                flags: flags as u32,
                ..Default::default()
            };
            let out = self.internal(Opcode::Read, ino, &[r.as_bytes()]);
            if out.error == 0 && out.payload.len() <= PREFETCH_MAX {
                head = PrefetchOut { len: out.payload.len() as u32, valid: 1 };
                data = out.payload;
            }
        }
        payload.extend_from_slice(head.as_bytes());
        payload.extend_from_slice(&data);
    }

    /// The session answered OPEN/OPENDIR with ENOSYS (stateless opens): the
    /// daemon checked permissions already and makes the handle itself.
    fn stateless_open(&mut self, i: u32, ino: u64, flags: i32, dir: bool) -> usize {
        if !dir && flags & libc::O_TRUNC != 0 {
            // Without OPEN the kernel truncates with SETATTR; so do we.
            let mut valid = fattr::SIZE;
            if !self.conn.creds.capable(perm::cap::FSETID) {
                valid |= fattr::KILL_SUIDGID;
            }
            let s = abi::SetattrIn { valid, size: 0, ..Default::default() };
            let out = self.internal(Opcode::Setattr, ino, &[s.as_bytes()]);
            if out.error != 0 {
                return self.error_reply(i, -out.error);
            }
            self.invalidate(&[Change::Data(ino)]);
        }
        let dh = self.tables.add_handle(Handle { ino, fh: 0, flags, dir, stateless: true });
        let o = abi::OpenOut { fh: dh, open_flags: 0, backing_id: 0 };
        self.reply_bytes(i, o.as_bytes())
    }

    /// FORGET: never more than the client holds; an empty reply so the
    /// client can reuse the slot.
    fn forget_request(&mut self, i: u32, req: &[u8]) -> usize {
        let nodeid = abi::InHeader::read_from_prefix(req).map(|(h, _)| h.nodeid).unwrap_or(0);
        let n = abi::ForgetIn::read_from_prefix(&req[IN_HEADER..]).map(|(f, _)| f.nlookup).unwrap_or(0);
        self.forget_held(nodeid, n);
        self.error_reply(i, 0)
    }

    fn forget_held(&mut self, nodeid: u64, n: u64) {
        let Some(held) = self.tables.lookups.get_mut(&nodeid) else { return };
        let from_extra = n.min(held.extra);
        held.extra -= from_extra;
        let from_fs = (n - from_extra).min(held.fs);
        held.fs -= from_fs;
        if held.fs == 0 && held.extra == 0 {
            self.tables.lookups.remove(&nodeid);
        }
        if from_fs > 0 {
            self.fs_forget(nodeid, from_fs);
        }
    }

    /// Sends FORGET to the file system through the session.
    pub(super) fn fs_forget(&self, nodeid: u64, n: u64) {
        if nodeid == 0 || nodeid == ROOT_ID || n == 0 {
            return;
        }
        let f = abi::ForgetIn { nlookup: n };
        let buf = self.build(Opcode::Forget as u32, nodeid, &[f.as_bytes()]);
        // FORGET has no reply: nothing reaches the sink.
        self.session.dispatch(&buf, &self.dyn_sink);
    }

    /// A request of the daemon's own, on behalf of this client.
    fn build(&self, opcode: u32, nodeid: u64, args: &[&[u8]]) -> Vec<u8> {
        let len = IN_HEADER + args.iter().map(|a| a.len()).sum::<usize>();
        let h = abi::InHeader {
            len: len as u32,
            opcode,
            unique: self.shared.next_unique(),
            nodeid,
            uid: self.conn.creds.uid,
            gid: self.conn.creds.gid,
            pid: self.conn.creds.pid,
            total_extlen: 0,
            padding: 0,
        };
        let mut buf = Vec::with_capacity(len);
        buf.extend_from_slice(h.as_bytes());
        args.iter().for_each(|a| buf.extend_from_slice(a));
        buf
    }

    /// Dispatches `buf` through the session and waits for its reply (a file
    /// system may answer later, from another thread).
    fn call(&self, buf: &[u8], target: Target) -> Outcome {
        {
            let mut st = lock(&self.sink.st);
            st.target = target;
            st.done = false;
            st.grant = None;
            st.held_back = false;
        }
        self.session.dispatch(buf, &self.dyn_sink);
        let mut st = lock(&self.sink.st);
        while !st.done {
            st = self.sink.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        Outcome {
            error: st.error,
            len: st.len,
            payload: std::mem::take(&mut st.captured),
            held_back: st.held_back,
            grant: st.grant.take(),
        }
    }

    pub(super) fn internal(&self, op: Opcode, nodeid: u64, args: &[&[u8]]) -> Outcome {
        let buf = self.build(op as u32, nodeid, args);
        self.call(&buf, Target::Capture)
    }

    /// The node's attributes, through the session.
    pub(super) fn getattr(&self, nodeid: u64) -> Result<abi::Attr, i32> {
        self.attr_out(nodeid).map(|a| a.attr)
    }

    /// The node's attributes and how long they may be cached.
    pub(super) fn attr_out(&self, nodeid: u64) -> Result<abi::AttrOut, i32> {
        let g = abi::GetattrIn::default();
        let out = self.internal(Opcode::Getattr, nodeid, &[g.as_bytes()]);
        if out.error != 0 {
            return Err(-out.error);
        }
        abi::AttrOut::read_from_prefix(&out.payload).map(|(a, _)| a).map_err(|_| libc::EIO)
    }

    /// `name` in `parent` as this client's table has it now, if its entry
    /// and attributes are still valid: what a LOOKUP would answer, as the
    /// kernel answers a path walk from its dentries (the table is cleared
    /// before any change to what it says is answered). The table holds the
    /// node's lookup; the caller takes none.
    /// Counts a WALK in progress until the guard drops (see `walkers`).
    pub(super) fn walking(&self) -> Option<WalkGuard> {
        let w = self.walkers.as_ref()?.clone();
        w.fetch_add(1, Ordering::SeqCst);
        Some(WalkGuard(w))
    }

    pub(super) fn known(&self, parent: u64, name: &[u8]) -> Option<abi::EntryOut> {
        let t = self.table.as_ref()?;
        let p = lock(t).get(parent, name)?;
        let now = now_ns();
        // (A negative entry, node 0, has no attributes to expire.)
        if p.entry_expires <= now || (p.nodeid != 0 && p.attr_expires <= now) {
            return None;
        }
        let left = |at: u64| {
            let ns = at - now;
            (ns / 1_000_000_000, (ns % 1_000_000_000) as u32)
        };
        let (entry_valid, entry_valid_nsec) = left(p.entry_expires);
        let (attr_valid, attr_valid_nsec) = left(p.attr_expires);
        Some(abi::EntryOut {
            nodeid: p.nodeid,
            generation: p.generation,
            entry_valid,
            attr_valid,
            entry_valid_nsec,
            attr_valid_nsec,
            attr: p.attr,
        })
        .filter(|e| e.nodeid != 0 || e.entry_valid > 0 || e.entry_valid_nsec > 0)
    }

    /// Looks `name` up in `parent` through the session; the file system
    /// counts one lookup the caller must forget ([`Self::fs_forget`]).
    pub(super) fn lookup(&self, parent: u64, name: &[u8]) -> Result<abi::EntryOut, i32> {
        let e = self.lookup_entry(parent, name)?;
        if e.nodeid == 0 {
            return Err(libc::ENOENT); // a negative entry
        }
        Ok(e)
    }

    /// [`Self::lookup`] that gives a negative entry (node 0, with the time
    /// the miss may be cached) as the file system answered it.
    pub(super) fn lookup_entry(&self, parent: u64, name: &[u8]) -> Result<abi::EntryOut, i32> {
        let out = self.internal(Opcode::Lookup, parent, &[name, b"\0"]);
        if out.error != 0 {
            return Err(-out.error);
        }
        abi::EntryOut::read_from_prefix(&out.payload).map(|(e, _)| e).map_err(|_| libc::EIO)
    }

    /// Looks up a child only to look at it; forgets it again.
    fn peek(&self, parent: u64, name: &[u8]) -> Result<abi::EntryOut, i32> {
        let e = self.lookup(parent, name)?;
        self.fs_forget(e.nodeid, 1);
        Ok(e)
    }

    pub(super) fn readlink(&self, nodeid: u64) -> Result<Vec<u8>, i32> {
        let out = self.internal(Opcode::Readlink, nodeid, &[]);
        if out.error != 0 {
            return Err(-out.error);
        }
        Ok(out.payload)
    }

    pub(super) fn creds(&self) -> &Creds {
        &self.conn.creds
    }

    pub(super) fn holds(&self, nodeid: u64) -> bool {
        self.tables.holds(nodeid) || self.published(nodeid)
    }

    /// Whether the client's table names `nodeid` (the daemon then holds a
    /// lookup of it for the table, so the client may name it).
    fn published(&self, nodeid: u64) -> bool {
        self.table.as_ref().is_some_and(|t| lock(t).has_node(nodeid))
    }

    /// The table's change counter, read before asking the file system for
    /// what to publish (0 without a table).
    pub(super) fn epoch(&self) -> u64 {
        self.table.as_ref().map_or(0, |t| lock(t).epoch())
    }

    /// Publishes `e` as `name` in `parent` in the client's table, handing
    /// the table the one lookup of `e.nodeid` the caller holds. False (the
    /// caller keeps its lookup) without a table, after a change since
    /// `epoch`, or for a node written behind the daemon's back (a kernel
    /// passthrough open for writing).
    pub(super) fn publish(&self, epoch: u64, parent: u64, name: &[u8], e: &abi::EntryOut) -> bool {
        let Some(t) = &self.table else { return false };
        // A negative entry (node 0) is kept as long as the file system said
        // the miss may be cached, and not at all without a timeout.
        if e.nodeid == 0 && e.entry_valid == 0 && e.entry_valid_nsec == 0 {
            return false;
        }
        if e.nodeid != 0 && self.session.shared().changes.unseen_writers(e.nodeid) > 0 {
            return false;
        }
        let now = now_ns();
        let p = Published {
            seq: 0,
            parent,
            nodeid: e.nodeid,
            generation: e.generation,
            entry_expires: expiry(now, e.entry_valid, e.entry_valid_nsec),
            attr_expires: expiry(now, e.attr_valid, e.attr_valid_nsec),
            attr: e.attr,
        };
        lock(t).publish(epoch, name, &p)
    }

    /// Forgets, in the file system, the lookups of table entries that went.
    fn drain_table(&self) {
        let Some(t) = &self.table else { return };
        if self.walkers.as_ref().is_some_and(|w| w.load(Ordering::SeqCst) > 0) {
            // A WALK of another client may stand on a node only an entry
            // that went pinned: its lookup is forgotten later.
            return;
        }
        let dropped = lock(t).take_dropped();
        for n in dropped {
            self.fs_forget(n, 1);
        }
    }

    /// The client names a node its table holds in a request that makes it
    /// keep the node (OPEN): it gets a lookup of its own, taken again by
    /// name, so the node outlives the table's entry.
    fn adopt(&mut self, nodeid: u64, asked: bool) -> Result<(), i32> {
        if !asked && self.tables.holds(nodeid) {
            return Ok(());
        }
        let named = self.table.as_ref().and_then(|t| lock(t).name_of(nodeid));
        let Some((parent, name)) = named else { return Err(libc::ENOENT) };
        let e = self.lookup(parent, &name)?;
        if e.nodeid != nodeid {
            self.fs_forget(e.nodeid, 1);
            return Err(libc::ESTALE);
        }
        self.tables.add_lookup(nodeid);
        Ok(())
    }

    /// The client keeps one lookup of `nodeid` that the file system counted.
    pub(super) fn keep_lookup(&mut self, nodeid: u64) {
        self.tables.add_lookup(nodeid);
    }

    /// The client is told it holds one more lookup of `nodeid`, which it
    /// held already (the file system counts none for it).
    pub(super) fn keep_extra(&mut self, nodeid: u64) {
        if nodeid != ROOT_ID {
            self.tables.lookups.entry(nodeid).or_default().extra += 1;
        }
    }

    fn dir_attr(&self, nodeid: u64) -> Result<abi::Attr, i32> {
        let a = self.getattr(nodeid)?;
        if !perm::is_dir(&a) {
            return Err(libc::ENOTDIR);
        }
        Ok(a)
    }

    fn read_only(&self) -> bool {
        self.shared.opts.read_only
    }

    /// A handle of this client's for `ino`; rewrites nothing.
    fn handle_of(&self, dh: u64, ino: u64) -> Result<Handle, i32> {
        match self.tables.handles.get(&dh) {
            Some(h) if h.ino == ino => Ok(*h),
            _ => Err(libc::EBADF),
        }
    }

    /// Checks a handle for a file operation: the client's, for this node,
    /// of the right kind and access mode.
    fn file_handle(&self, dh: u64, ino: u64, dir: bool, need: u32) -> Result<Handle, i32> {
        let h = self.handle_of(dh, ino)?;
        if h.dir != dir {
            return Err(if dir { libc::ENOTDIR } else { libc::EISDIR });
        }
        let acc = h.flags & libc::O_ACCMODE;
        let readable = acc == libc::O_RDONLY || acc == libc::O_RDWR;
        let writable = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        if (need & MAY_READ != 0 && !readable) || (need & MAY_WRITE != 0 && !writable) {
            return Err(libc::EBADF);
        }
        Ok(h)
    }

    /// Validates one parsed request against the client's tables and
    /// permissions, rewriting handles and clamping sizes in `req`. Records
    /// what a success will change, for the kernel's caches.
    fn check(
        &mut self,
        req: &mut [u8],
        changes: &mut Vec<Change>,
        release: &mut Option<u64>,
        open_fallback: &mut Option<(i32, bool)>,
    ) -> Result<(), Refuse> {
        let slot_payload = self.conn.region.slot_size() as usize - OUT_HEADER;
        let parsed = Request::parse(req, self.opts).map_err(|_| libc::EIO)?;
        let ino = parsed.header.nodeid;
        let c = self.conn.creds.clone();
        let ro = self.read_only();
        // Rewrites of the fixed argument after the header, applied once the
        // parse (which borrows `req`) is done.
        let mut rewrite: Option<Vec<u8>> = None;
        match parsed.op {
            Operation::Lookup { name } => {
                check_name(name)?;
                let d = self.dir_attr(ino)?;
                perm::permission(&c, &d, MAY_EXEC)?;
            }
            Operation::Getattr { mut arg } => {
                if arg.getattr_flags & GETATTR_FH != 0 {
                    arg.fh = self.handle_of(arg.fh, ino)?.fh;
                    rewrite = Some(arg.as_bytes().to_vec());
                }
            }
            Operation::Statx { mut arg } => {
                if arg.getattr_flags & GETATTR_FH != 0 {
                    arg.fh = self.handle_of(arg.fh, ino)?.fh;
                    rewrite = Some(arg.as_bytes().to_vec());
                }
            }
            Operation::Setattr { mut arg } => {
                if ro {
                    return Err(libc::EROFS);
                }
                let a = self.getattr(ino)?;
                let fh = if arg.valid & fattr::FH != 0 {
                    let h = self.handle_of(arg.fh, ino)?;
                    arg.fh = h.fh;
                    Some(h)
                } else {
                    None
                };
                // Only the kernel sets ctime and lock owners.
                arg.valid &= !(fattr::CTIME | fattr::LOCKOWNER);
                setattr_prepare(&c, &a, &mut arg, fh)?;
                // As the kernel with HANDLE_KILLPRIV_V2: a truncate without
                // CAP_FSETID, and any chown of a non-directory, clear the
                // set-id bits (the file system does it, told by this flag).
                let kill_on_size = arg.valid & fattr::SIZE != 0 && !c.capable(perm::cap::FSETID);
                let kill_on_chown = arg.valid & (fattr::UID | fattr::GID) != 0 && !perm::is_dir(&a);
                if kill_on_size || kill_on_chown {
                    arg.valid |= fattr::KILL_SUIDGID;
                }
                rewrite = Some(arg.as_bytes().to_vec());
                changes.push(Change::Data(ino));
            }
            Operation::Readlink => {}
            Operation::Symlink { name, target } => {
                check_name(name)?;
                if target.len() > efuse_bypass::wire::WALK_PATH_MAX {
                    return Err(libc::ENAMETOOLONG);
                }
                self.create_check(ino, name, ro)?;
                changes.push(Change::Entry(ino, name.as_bytes().to_vec()));
            }
            Operation::Mknod { arg, name } => {
                check_name(name)?;
                let kind = arg.mode & libc::S_IFMT;
                match kind {
                    libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK => {}
                    libc::S_IFCHR | libc::S_IFBLK if c.capable(perm::cap::MKNOD) => {}
                    libc::S_IFCHR | libc::S_IFBLK => return Err(libc::EPERM),
                    _ => return Err(libc::EINVAL),
                }
                self.create_check(ino, name, ro)?;
                changes.push(Change::Entry(ino, name.as_bytes().to_vec()));
            }
            Operation::Mkdir { name, .. } => {
                check_name(name)?;
                self.create_check(ino, name, ro)?;
                changes.push(Change::Entry(ino, name.as_bytes().to_vec()));
            }
            Operation::Unlink { name } | Operation::Rmdir { name } => {
                check_name(name)?;
                let d = self.dir_attr(ino)?;
                perm::permission(&c, &d, MAY_EXEC)?;
                let victim = self.peek(ino, name.as_bytes())?;
                if ro {
                    return Err(libc::EROFS);
                }
                perm::may_delete(&c, &d, &victim.attr)?;
                changes.push(Change::Entry(ino, name.as_bytes().to_vec()));
                changes.push(Change::Attr(victim.nodeid));
            }
            Operation::Rename { newdir, name, newname } => {
                self.rename_check(ino, name, newdir, newname, 0, ro, changes)?;
            }
            Operation::Rename2 { arg, name, newname } => {
                self.rename_check(ino, name, arg.newdir, newname, arg.flags, ro, changes)?;
            }
            Operation::Link { arg, name } => {
                check_name(name)?;
                if !self.holds(arg.oldnodeid) {
                    return Err(libc::ENOENT);
                }
                self.create_check(ino, name, ro)?;
                let src = self.getattr(arg.oldnodeid)?;
                perm::may_link(&c, &src, self.protected_hardlinks)?;
                changes.push(Change::Entry(ino, name.as_bytes().to_vec()));
                changes.push(Change::Attr(arg.oldnodeid));
            }
            Operation::Open { mut arg } => {
                let a = self.getattr(ino)?;
                let flags = arg.flags as i32;
                if perm::is_dir(&a) {
                    return Err(libc::EISDIR);
                }
                if perm::is_symlink(&a) {
                    return Err(libc::ELOOP);
                }
                if !perm::is_reg(&a) {
                    // Devices, FIFOs and sockets: the client opens those
                    // through the kernel.
                    return Err(libc::EOPNOTSUPP);
                }
                if flags & libc::O_DIRECTORY != 0 {
                    return Err(libc::ENOTDIR);
                }
                let need = open_mask(flags);
                if ro && need & MAY_WRITE != 0 {
                    return Err(libc::EROFS);
                }
                perm::permission(&c, &a, need)?;
                if flags & libc::O_NOATIME != 0 && !c.owner_or_capable(&a) {
                    return Err(libc::EPERM);
                }
                // As the kernel: these never reach a file system's OPEN.
                arg.flags &= !((libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY) as u32);
                if flags & libc::O_TRUNC != 0 && !c.capable(perm::cap::FSETID) {
                    arg.open_flags |= efuse_abi::consts::OPEN_KILL_SUIDGID;
                }
                rewrite = Some(arg.as_bytes().to_vec());
                *open_fallback = Some((arg.flags as i32, false));
                if flags & libc::O_TRUNC != 0 {
                    changes.push(Change::Data(ino));
                }
            }
            Operation::Opendir { mut arg } => {
                let a = self.dir_attr(ino)?;
                perm::permission(&c, &a, MAY_READ)?;
                arg.flags = libc::O_RDONLY as u32 | (arg.flags & libc::O_DIRECTORY as u32);
                rewrite = Some(arg.as_bytes().to_vec());
                *open_fallback = Some((libc::O_RDONLY, true));
            }
            Operation::Read { mut arg } => {
                arg.fh = self.file_handle(arg.fh, ino, false, MAY_READ)?.fh;
                arg.size = arg.size.min(slot_payload as u32).min(self.shared.negotiated.max_write);
                rewrite = Some(arg.as_bytes().to_vec());
            }
            Operation::Write { mut arg, data } => {
                if ro {
                    return Err(libc::EROFS);
                }
                arg.fh = self.file_handle(arg.fh, ino, false, MAY_WRITE)?.fh;
                if data.len() != arg.size as usize {
                    return Err(libc::EINVAL);
                }
                // A write without CAP_FSETID clears the set-id bits
                // (file_remove_privs; the file system does it, told by
                // this flag, as the kernel tells it).
                if !c.capable(perm::cap::FSETID) {
                    arg.write_flags |= efuse_abi::consts::write::KILL_SUIDGID;
                }
                rewrite = Some(arg.as_bytes().to_vec());
                changes.push(Change::Data(ino));
            }
            Operation::Statfs => {}
            Operation::Release { mut arg } => {
                let dh = arg.fh;
                let h = self.file_handle(dh, ino, false, 0)?;
                arg.fh = h.fh;
                arg.flags = h.flags as u32;
                // flock locks are the kernel's business: no owner to unlock.
                arg.release_flags &= efuse_abi::consts::release::FLUSH;
                rewrite = Some(arg.as_bytes().to_vec());
                *release = Some(dh);
                if h.stateless {
                    self.tables.handles.remove(&dh);
                    *release = None;
                    return Err(0);
                }
            }
            Operation::Releasedir { mut arg } => {
                let dh = arg.fh;
                let h = self.file_handle(dh, ino, true, 0)?;
                arg.fh = h.fh;
                arg.flags = h.flags as u32;
                rewrite = Some(arg.as_bytes().to_vec());
                *release = Some(dh);
                if h.stateless {
                    self.tables.handles.remove(&dh);
                    *release = None;
                    return Err(0);
                }
            }
            Operation::Fsync { mut arg } => {
                arg.fh = self.file_handle(arg.fh, ino, false, 0)?.fh;
                rewrite = Some(arg.as_bytes().to_vec());
            }
            Operation::Fsyncdir { mut arg } => {
                arg.fh = self.file_handle(arg.fh, ino, true, 0)?.fh;
                rewrite = Some(arg.as_bytes().to_vec());
            }
            Operation::Flush { mut arg } => {
                arg.fh = self.file_handle(arg.fh, ino, false, 0)?.fh;
                rewrite = Some(arg.as_bytes().to_vec());
            }
            Operation::Readdir { mut arg } | Operation::Readdirplus { mut arg } => {
                arg.fh = self.file_handle(arg.fh, ino, true, 0)?.fh;
                arg.size = arg.size.min(slot_payload as u32);
                rewrite = Some(arg.as_bytes().to_vec());
            }
            Operation::Fallocate { mut arg } => {
                if ro {
                    return Err(libc::EROFS);
                }
                arg.fh = self.file_handle(arg.fh, ino, false, MAY_WRITE)?.fh;
                rewrite = Some(arg.as_bytes().to_vec());
                changes.push(Change::Data(ino));
            }
            Operation::Lseek { mut arg } => {
                arg.fh = self.file_handle(arg.fh, ino, false, 0)?.fh;
                rewrite = Some(arg.as_bytes().to_vec());
            }
            Operation::Setxattr { name, .. } | Operation::Removexattr { name } => {
                if ro {
                    return Err(libc::EROFS);
                }
                let a = self.getattr(ino)?;
                perm::xattr_permission(&c, &a, name.as_bytes(), MAY_WRITE)?;
                changes.push(Change::Attr(ino));
            }
            Operation::Getxattr { mut arg, name } => {
                let a = self.getattr(ino)?;
                perm::xattr_permission(&c, &a, name.as_bytes(), MAY_READ)?;
                arg.size = arg.size.min((slot_payload - 8) as u32);
                rewrite = Some(arg.as_bytes().to_vec());
            }
            Operation::Listxattr { mut arg } => {
                arg.size = arg.size.min((slot_payload - 8) as u32);
                rewrite = Some(arg.as_bytes().to_vec());
            }
            Operation::Access { arg } => {
                let a = self.getattr(ino)?;
                let mask = arg.mask & (libc::R_OK | libc::W_OK | libc::X_OK) as u32;
                if ro && mask & libc::W_OK as u32 != 0 && !perm::is_symlink(&a) {
                    return Err(libc::EROFS);
                }
                // R_OK, W_OK and X_OK are MAY_READ, MAY_WRITE and MAY_EXEC.
                perm::permission(&c, &a, mask)?;
            }
            Operation::Create { mut arg, name } => {
                check_name(name)?;
                let d = self.dir_attr(ino)?;
                perm::permission(&c, &d, MAY_EXEC)?;
                match self.peek(ino, name.as_bytes()) {
                    // An existing name is opened, not created: the client
                    // walks to it and opens it (with its own checks).
                    Ok(_) => return Err(libc::EEXIST),
                    Err(libc::ENOENT) => {}
                    Err(e) => return Err(e),
                }
                if ro {
                    return Err(libc::EROFS);
                }
                perm::may_create(&c, &d)?;
                if arg.mode & libc::S_IFMT != 0 && arg.mode & libc::S_IFMT != libc::S_IFREG {
                    return Err(libc::EINVAL);
                }
                arg.mode = libc::S_IFREG | (arg.mode & 0o7777);
                arg.flags &= !(libc::O_NOCTTY as u32);
                rewrite = Some(arg.as_bytes().to_vec());
                changes.push(Change::Entry(ino, name.as_bytes().to_vec()));
            }
            _ => return Err(libc::ENOSYS),
        }
        if let Some(bytes) = rewrite {
            req[IN_HEADER..IN_HEADER + bytes.len()].copy_from_slice(&bytes);
        }
        Ok(())
    }

    fn create_check(&self, parent: u64, name: &OsStr, ro: bool) -> Result<(), i32> {
        let d = self.dir_attr(parent)?;
        perm::permission(&self.conn.creds, &d, MAY_EXEC)?;
        // As the kernel's lookup of the new name: an existing one is EEXIST
        // before any other refusal (read-only, write permission, a
        // directory as the source of a link).
        match self.peek(parent, name.as_bytes()) {
            Ok(_) => return Err(libc::EEXIST),
            Err(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        if ro {
            return Err(libc::EROFS);
        }
        perm::may_create(&self.conn.creds, &d)
    }

    #[allow(clippy::too_many_arguments)]
    fn rename_check(
        &self,
        olddir: u64,
        name: &OsStr,
        newdir: u64,
        newname: &OsStr,
        flags: u32,
        ro: bool,
        changes: &mut Vec<Change>,
    ) -> Result<(), i32> {
        check_name(name)?;
        check_name(newname)?;
        if !self.holds(newdir) {
            return Err(libc::ENOENT);
        }
        let c = &self.conn.creds;
        let od = self.dir_attr(olddir)?;
        perm::permission(c, &od, MAY_EXEC)?;
        let nd = self.dir_attr(newdir)?;
        perm::permission(c, &nd, MAY_EXEC)?;
        let src = self.peek(olddir, name.as_bytes())?;
        let dst = match self.peek(newdir, newname.as_bytes()) {
            Ok(e) => Some(e),
            Err(libc::ENOENT) => None,
            Err(e) => return Err(e),
        };
        if ro {
            return Err(libc::EROFS);
        }
        perm::may_delete(c, &od, &src.attr)?;
        match &dst {
            Some(d) => perm::may_delete(c, &nd, &d.attr)?,
            None => perm::may_create(c, &nd)?,
        }
        if olddir != newdir {
            // A directory that changes parent rewrites its "..".
            if perm::is_dir(&src.attr) {
                perm::permission(c, &src.attr, MAY_WRITE)?;
            }
            if flags & libc::RENAME_EXCHANGE != 0 {
                if let Some(d) = dst.as_ref().filter(|d| perm::is_dir(&d.attr)) {
                    perm::permission(c, &d.attr, MAY_WRITE)?;
                }
            }
        }
        changes.push(Change::Entry(olddir, name.as_bytes().to_vec()));
        changes.push(Change::Entry(newdir, newname.as_bytes().to_vec()));
        changes.push(Change::Attr(src.nodeid));
        if let Some(d) = dst {
            changes.push(Change::Attr(d.nodeid));
        }
        Ok(())
    }

    /// Drops the kernel's caches of what a bypass change touched, before
    /// the client learns the change is done, so a process using the mount
    /// sees it at once.
    fn invalidate(&self, changes: &[Change]) {
        let Some(conn) = &self.shared.connection else { return };
        let log = |what: &str, r: std::io::Result<bool>| {
            if let Err(e) = r {
                tracing::debug!("bypass: {what} invalidation failed: {e}");
            }
        };
        for ch in changes {
            match ch {
                Change::Data(ino) => log("inode", conn.inval_inode(*ino, 0, 0)),
                Change::Attr(ino) => log("attribute", conn.inval_inode(*ino, -1, 0)),
                Change::Entry(parent, name) => {
                    log("entry", conn.inval_entry(*parent, OsStr::from_bytes(name)));
                    log("directory", conn.inval_inode(*parent, -1, 0));
                }
            }
        }
    }

    /// The client is gone: release its handles and forget its lookups.
    fn cleanup(&mut self) {
        // The table stays for the other clients of these credentials (and,
        // a while, for the next one): only what it dropped is forgotten.
        self.drain_table();
        let handles: Vec<Handle> = self.tables.handles.drain().map(|(_, h)| h).collect();
        for h in handles {
            if h.stateless {
                continue;
            }
            let r = abi::ReleaseIn { fh: h.fh, flags: h.flags as u32, release_flags: 0, lock_owner: 0 };
            let op = if h.dir { Opcode::Releasedir } else { Opcode::Release };
            let out = self.internal(op, h.ino, &[r.as_bytes()]);
            if out.error != 0 {
                tracing::debug!(ino = h.ino, "bypass: release at disconnect: errno {}", -out.error);
            }
        }
        let lookups: Vec<(u64, Held)> = self.tables.lookups.drain().collect();
        for (nodeid, held) in lookups {
            self.fs_forget(nodeid, held.fs);
        }
    }
}

/// A WALK in progress, counted in its table (see [`Client::walking`]).
pub(super) struct WalkGuard(Arc<std::sync::atomic::AtomicU32>);

impl Drop for WalkGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `now` plus a reply's validity, in CLOCK_MONOTONIC ns.
pub(super) fn expiry(now: u64, secs: u64, nsec: u32) -> u64 {
    now.saturating_add(secs.saturating_mul(1_000_000_000)).saturating_add(nsec as u64)
}

/// SETATTR's checks (setattr_prepare, chown_ok, chgrp_ok), editing `arg`
/// as the kernel edits the attributes it sends.
fn setattr_prepare(c: &Creds, a: &abi::Attr, arg: &mut abi::SetattrIn, fh: Option<Handle>) -> Result<(), i32> {
    let v = arg.valid;
    if v & fattr::SIZE != 0 {
        if perm::is_dir(a) {
            return Err(libc::EISDIR);
        }
        match fh {
            Some(h) => {
                let acc = h.flags & libc::O_ACCMODE;
                if acc != libc::O_WRONLY && acc != libc::O_RDWR {
                    return Err(libc::EINVAL);
                }
            }
            None => perm::permission(c, a, MAY_WRITE)?,
        }
    }
    let chown_cap = c.capable(perm::cap::CHOWN);
    if v & fattr::UID != 0 && !(chown_cap || (c.owns(a) && arg.uid == a.uid)) {
        return Err(libc::EPERM);
    }
    if v & fattr::GID != 0 && !(chown_cap || (c.owns(a) && (arg.gid == a.gid || c.in_group(arg.gid)))) {
        return Err(libc::EPERM);
    }
    if v & fattr::MODE != 0 {
        if !c.owner_or_capable(a) {
            return Err(libc::EPERM);
        }
        // Also check the setgid bit: cleared for a group the caller is not in.
        let gid = if v & fattr::GID != 0 { arg.gid } else { a.gid };
        if !c.capable(perm::cap::FSETID) && !c.in_group(gid) {
            arg.mode &= !libc::S_ISGID;
        }
    }
    let explicit =
        (v & fattr::ATIME != 0 && v & fattr::ATIME_NOW == 0) || (v & fattr::MTIME != 0 && v & fattr::MTIME_NOW == 0);
    if explicit && !c.owner_or_capable(a) {
        return Err(libc::EPERM);
    }
    let now = v & (fattr::ATIME_NOW | fattr::MTIME_NOW) != 0;
    if now && !explicit && !c.owner_or_capable(a) {
        perm::permission(c, a, MAY_WRITE).map_err(|_| libc::EACCES)?;
    }
    // An empty SETATTR (or KILL_SUIDGID) clears suid/sgid: the kernel asks
    // for it on writes and chowns, so a client must be able to write.
    let kill = v & !fattr::FH == 0 || v & fattr::KILL_SUIDGID != 0;
    if kill && !c.owner_or_capable(a) && perm::permission(c, a, MAY_WRITE).is_err() {
        return Err(libc::EPERM);
    }
    Ok(())
}

/// MAY_* from open flags: the access mode, and O_TRUNC needs write.
fn open_mask(flags: i32) -> u32 {
    let mut m = match flags & libc::O_ACCMODE {
        libc::O_RDONLY => MAY_READ,
        libc::O_WRONLY => MAY_WRITE,
        _ => MAY_READ | MAY_WRITE,
    };
    if flags & libc::O_TRUNC != 0 {
        m |= MAY_WRITE;
    }
    m
}

/// A name a client may send: one component, not "." or "..", at most
/// NAME_MAX bytes. The kernel never sends others; a file system may not
/// expect them (".." at the root of a pass-through would leave it).
pub(super) fn check_name(name: &OsStr) -> Result<(), i32> {
    let b = name.as_bytes();
    if b.len() > 255 {
        return Err(libc::ENAMETOOLONG);
    }
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(libc::EINVAL);
    }
    Ok(())
}

/// What a bypass client may send; the rest (locks, ioctl, poll,
/// copy_file_range, ...) goes through the kernel.
const WHITELIST: &[Opcode] = &[
    Opcode::Lookup,
    Opcode::Getattr,
    Opcode::Setattr,
    Opcode::Readlink,
    Opcode::Symlink,
    Opcode::Mknod,
    Opcode::Mkdir,
    Opcode::Unlink,
    Opcode::Rmdir,
    Opcode::Rename,
    Opcode::Rename2,
    Opcode::Link,
    Opcode::Open,
    Opcode::Read,
    Opcode::Write,
    Opcode::Statfs,
    Opcode::Release,
    Opcode::Fsync,
    Opcode::Setxattr,
    Opcode::Getxattr,
    Opcode::Listxattr,
    Opcode::Removexattr,
    Opcode::Flush,
    Opcode::Opendir,
    Opcode::Readdir,
    Opcode::Readdirplus,
    Opcode::Releasedir,
    Opcode::Fsyncdir,
    Opcode::Access,
    Opcode::Create,
    Opcode::Fallocate,
    Opcode::Lseek,
    Opcode::Statx,
    Opcode::Forget,
];

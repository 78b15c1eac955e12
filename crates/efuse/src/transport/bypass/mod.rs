//! The bypass transport: the third way requests reach the session, beside
//! /dev/fuse and FUSE-over-io_uring. Applications whose client library
//! (`efuse run`) talks to the daemon directly send their file requests
//! through a shared-memory region instead of through the kernel; the daemon
//! serves them with the same [`Session`] and file system as kernel requests.
//!
//! - this file: the listener. One Unix socket per mount in the runtime
//!   directory ([`efuse_bypass::socket_name`]), one accept thread, the
//!   handshake (SO_PEERCRED, Hello, access rules, Welcome with the region).
//! - `client`: one serving thread per client: slots, validation of every
//!   request copy, the client's own tables of lookups and open handles,
//!   cache coherence with the kernel mount, cleanup at disconnect.
//! - `perm`: the kernel's permission rules (default_permissions), applied to
//!   the client's credentials.
//! - `tables`: the metadata tables, one per set of credentials, shared by
//!   the clients that have them.
//! - `walk`: the WALK opcode (a path resolved in one round trip).
//!
//! The protocol itself (region layout, slots, messages) lives in the
//! `efuse-bypass` crate, shared with the client library.

mod client;
mod perm;
mod tables;
mod walk;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use efuse_abi::consts::init;
use efuse_bypass::{Hello, Welcome, MAGIC, VERSION};
use zerocopy::{FromBytes, IntoBytes};

use crate::connection::Connection;
use crate::filesystem::Filesystem;
use crate::session::{Negotiated, Session};

/// Most clients served at once per file system; one thread each.
pub const MAX_CLIENTS: u64 = 64;
/// Slots per client region: as many of a client's threads can have a
/// request in flight at once.
pub const SLOTS: u32 = 8;
/// Buckets of each client's metadata table: 16,384 names and attributes
/// (8 MiB of shared memory, touched as it fills; with two buckets per name
/// a table three quarters full still keeps nearly every name).
pub const TABLE_BUCKETS: u32 = 4096;
/// How long a new connection may take to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(1);
/// Connections without a Hello yet, at most, per user and in all.
const PENDING_PER_UID: usize = 4;
const MAX_PENDING: usize = 64;
/// Clients one user may have connected at once: a quarter of all, so that
/// one user cannot take every place.
pub const MAX_CLIENTS_PER_UID: u32 = (MAX_CLIENTS / 4) as u32;
/// How often the accept thread looks at the stop flag.
const ACCEPT_POLL_MS: i32 = 200;

/// What the mount allows, for the handshake's checks.
#[derive(Debug, Clone, Copy)]
pub struct BypassOptions {
    /// Serve bypass clients (`--bypass on`, the default). Off: the socket
    /// still answers, refusing every client with EOPNOTSUPP, so a client
    /// library learns at once that it must go through the kernel.
    pub enabled: bool,
    /// The mount has allow_other: any user may connect, else only the owner.
    pub allow_other: bool,
    /// The mount is read-only: changes are answered EROFS.
    pub read_only: bool,
}

impl Default for BypassOptions {
    fn default() -> Self {
        BypassOptions { enabled: true, allow_other: false, read_only: false }
    }
}

/// Counters for `efuse stats`.
#[derive(Debug, Default)]
pub struct BypassStats {
    /// Clients connected now.
    pub clients: AtomicU64,
    /// Requests served since mount (WALK counts once).
    pub requests: AtomicU64,
    /// Metadata tables now (one per set of credentials of recent clients).
    pub tables: AtomicU64,
}

/// State every client's thread shares.
pub(crate) struct Shared {
    pub(crate) stats: Arc<BypassStats>,
    pub(crate) stop: AtomicBool,
    pub(crate) connection: Option<Connection>,
    pub(crate) opts: BypassOptions,
    pub(crate) negotiated: Negotiated,
    /// Uniques of the daemon's own requests: far above the kernel's (which
    /// count up from 0 in steps of 2), even, never 0, so the session's
    /// request tracking never confuses the two.
    unique: AtomicU64,
    /// Clients connected now, per uid.
    per_uid: Mutex<std::collections::HashMap<u32, u32>>,
    /// The metadata tables.
    tables: Arc<tables::Registry>,
    /// Requests to drop the idle tables, and how many the accept thread
    /// has carried out (see [`BypassHandle::drop_idle_tables`]).
    drop_asked: AtomicU64,
    drop_done: AtomicU64,
}

impl Shared {
    pub(crate) fn next_unique(&self) -> u64 {
        self.unique.fetch_add(2, Ordering::Relaxed)
    }

    fn clients_of(&self, uid: u32) -> u32 {
        self.per_uid.lock().unwrap_or_else(|p| p.into_inner()).get(&uid).copied().unwrap_or(0)
    }

    /// A client of `uid` starts being served.
    pub(crate) fn client_in(&self, uid: u32) {
        self.stats.clients.fetch_add(1, Ordering::AcqRel);
        *self.per_uid.lock().unwrap_or_else(|p| p.into_inner()).entry(uid).or_default() += 1;
    }

    /// A client of `uid` is gone.
    pub(crate) fn client_out(&self, uid: u32) {
        self.stats.clients.fetch_sub(1, Ordering::AcqRel);
        let mut m = self.per_uid.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&uid);
            }
        }
    }
}

/// A running listener; stops its threads and removes the socket when
/// dropped (or at [`BypassServer::stop`]).
pub struct BypassServer {
    path: PathBuf,
    shared: Arc<Shared>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl BypassServer {
    pub fn stats(&self) -> Arc<BypassStats> {
        self.shared.stats.clone()
    }

    /// A handle for the control socket's commands.
    pub fn handle(&self) -> BypassHandle {
        BypassHandle { shared: self.shared.clone() }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, disconnects every client (releasing what each held,
    /// through the session), and waits for the threads.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for BypassServer {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// What the control socket may ask of a running bypass server.
pub struct BypassHandle {
    shared: Arc<Shared>,
}

impl BypassHandle {
    /// Drops every metadata table, with the lookups it pinned, once no
    /// client is connected: the next process of each user starts cold, as
    /// after `echo 3 > /proc/sys/vm/drop_caches` for the kernel's caches
    /// (the bench's cold repetitions on a mount it does not remount). Waits
    /// for the clients to leave and the accept thread to drop the tables;
    /// false if that did not happen within `timeout`.
    pub fn drop_idle_tables(&self, timeout: Duration) -> bool {
        let t0 = Instant::now();
        // Clients that just hung up may still be giving their tables back.
        while self.shared.stats.clients.load(Ordering::Acquire) > 0 {
            if t0.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let want = self.shared.drop_asked.fetch_add(1, Ordering::AcqRel) + 1;
        while self.shared.drop_done.load(Ordering::Acquire) < want {
            if t0.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

/// Binds the bypass socket of the mount at `mountpoint` (absolute) and
/// serves it. Called after INIT, from a thread that is no worker (it stats
/// the mount point, which the workers answer).
pub fn start<F: Filesystem>(
    session: Arc<Session<F>>,
    connection: Option<Connection>,
    negotiated: Negotiated,
    mountpoint: &Path,
    opts: BypassOptions,
) -> io::Result<BypassServer> {
    let dir = crate::control::ensure_runtime_dir()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // Other users must reach the socket: search, but no listing. The
        // control sockets in it stay 0600.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
    }
    let path = dir.join(efuse_bypass::socket_name(mountpoint.as_os_str().as_bytes()));
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another daemon serves bypass clients of {} ({})", mountpoint.display(), path.display()),
            ));
        }
        let _ = std::fs::remove_file(&path);
    }
    let listener = std::os::unix::net::UnixListener::bind(&path)?;
    // Anyone may knock; the handshake decides who gets in.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
    let dev = std::fs::metadata(mountpoint).map(|m| std::os::unix::fs::MetadataExt::dev(&m))?;
    let shared = Arc::new(Shared {
        stats: Arc::default(),
        stop: AtomicBool::new(false),
        connection,
        opts,
        negotiated,
        unique: AtomicU64::new(1 << 62),
        per_uid: Mutex::default(),
        tables: Arc::default(),
        drop_asked: AtomicU64::new(0),
        drop_done: AtomicU64::new(0),
    });
    let accept = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("efuse-bypass".into())
            .spawn(move || accept_loop(session, listener, dev, shared))?
    };
    tracing::info!(socket = %path.display(), enabled = opts.enabled, "bypass socket ready");
    Ok(BypassServer { path, shared, accept: Some(accept) })
}

/// A connection that has not sent its whole Hello yet.
struct Pending {
    sock: OwnedFd,
    cred: libc::ucred,
    since: Instant,
    hello: [u8; std::mem::size_of::<Hello>()],
    got: usize,
}

/// Accepts connections and reads their Hellos without ever waiting on one
/// of them: a connection that sends nothing costs a pending entry for at
/// most [`HELLO_TIMEOUT`], and one user may hold only [`PENDING_PER_UID`]
/// of them, so nobody can keep other users' clients waiting.
fn accept_loop<F: Filesystem>(
    session: Arc<Session<F>>,
    listener: std::os::unix::net::UnixListener,
    dev: u64,
    shared: Arc<Shared>,
) {
    if let Err(e) = listener.set_nonblocking(true) {
        tracing::warn!("bypass: cannot make the socket non-blocking, no bypass clients: {e}");
        return;
    }
    let mut clients: Vec<std::thread::JoinHandle<()>> = Vec::new();
    let mut pending: Vec<Pending> = Vec::new();
    // Connected clients, watched for hang-ups: a second descriptor of each
    // socket, the flag its serving thread reads, and its doorbell to ring.
    let mut watched: Vec<(OwnedFd, Arc<AtomicBool>, Arc<efuse_bypass::Region>)> = Vec::new();
    while !shared.stop.load(Ordering::Acquire) {
        let mut fds = Vec::with_capacity(1 + pending.len() + watched.len());
        fds.push(libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        fds.extend(pending.iter().map(|p| libc::pollfd { fd: p.sock.as_raw_fd(), events: libc::POLLIN, revents: 0 }));
        fds.extend(watched.iter().map(|w| libc::pollfd { fd: w.0.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 }));
        let wait = pending
            .iter()
            .map(|p| HELLO_TIMEOUT.saturating_sub(p.since.elapsed()).as_millis() as i32 + 1)
            .min()
            .unwrap_or(ACCEPT_POLL_MS)
            .min(ACCEPT_POLL_MS);
        // A drop of the idle tables is waited for: no full poll interval.
        let wait =
            if shared.drop_asked.load(Ordering::Acquire) > shared.drop_done.load(Ordering::Acquire) { 0 } else { wait };
        // SAFETY: a live array of pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait) };
        if n < 0 {
            continue;
        }
        // Hellos (or hang-ups) of pending connections; done ones leave the
        // list (from the end, so that the indices still to visit stay put).
        // A client gone: its serving thread learns it now, not at its next
        // idle timeout, and leaves (its place counts against the limits).
        let gone: Vec<bool> = fds[1 + pending.len()..].iter().map(|f| f.revents != 0).collect();
        for k in (0..watched.len()).rev() {
            if gone[k] {
                let (_, hung, region) = watched.swap_remove(k);
                hung.store(true, Ordering::Release);
                region.header().doorbell.fetch_add(1, Ordering::SeqCst);
                efuse_bypass::futex_wake(&region.header().doorbell, 1);
            }
        }
        let ready: Vec<bool> = fds[1..1 + pending.len()].iter().map(|f| f.revents != 0).collect();
        let mut done: Vec<Pending> = Vec::new();
        for k in (0..pending.len()).rev() {
            let p = &mut pending[k];
            if ready[k] {
                // SAFETY: reads into the rest of this connection's buffer.
                let r = unsafe {
                    libc::recv(
                        p.sock.as_raw_fd(),
                        p.hello[p.got..].as_mut_ptr().cast(),
                        p.hello.len() - p.got,
                        libc::MSG_DONTWAIT,
                    )
                };
                if r > 0 {
                    p.got += r as usize;
                } else {
                    let e = io::Error::last_os_error();
                    if r == 0 || !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) {
                        tracing::debug!(pid = p.cred.pid, "bypass: a connection closed before its Hello");
                        pending.swap_remove(k);
                        continue;
                    }
                }
            }
            if p.got == p.hello.len() {
                done.push(pending.swap_remove(k));
            } else if p.since.elapsed() >= HELLO_TIMEOUT {
                tracing::info!(
                    pid = p.cred.pid,
                    uid = p.cred.uid,
                    "bypass: no Hello within {HELLO_TIMEOUT:?}; dropped"
                );
                pending.swap_remove(k);
            }
        }
        clients.retain(|h| !h.is_finished());
        // Tables idle too long go; entries changes removed while no client
        // drained them give their lookups back.
        let asked = shared.drop_asked.load(Ordering::Acquire);
        let drop_idle = asked > shared.drop_done.load(Ordering::Acquire);
        let unpinned = shared.tables.tick(&session.shared().changes, drop_idle);
        forget_nodes(&session, &shared, &unpinned);
        if drop_idle {
            shared.drop_done.store(asked, Ordering::Release);
        }
        shared.stats.tables.store(shared.tables.len() as u64, Ordering::Relaxed);
        for p in done {
            let (cred, hello) = (p.cred, p.hello);
            match handshake(&session, p.sock, cred, &hello, dev, &shared) {
                Ok(Some(c)) => {
                    // SAFETY: dup of the client's live socket; checked below.
                    let second = unsafe { libc::fcntl(c.sock.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
                    if second >= 0 {
                        // SAFETY: a fresh descriptor we own.
                        let second = unsafe { OwnedFd::from_raw_fd(second) };
                        watched.push((second, c.hung.clone(), c.region.clone()));
                    }
                    let shared2 = shared.clone();
                    let session2 = session.clone();
                    // Counted by the connecting process's uid (SO_PEERCRED).
                    let uid = cred.uid;
                    shared.client_in(uid);
                    let spawned = std::thread::Builder::new()
                        .name(format!("efuse-bypass-{}", c.creds.pid))
                        .spawn(move || client::serve(session2, c, shared2));
                    match spawned {
                        Ok(h) => clients.push(h),
                        Err(e) => {
                            shared.client_out(uid);
                            tracing::warn!("bypass: cannot start a client thread: {e}");
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::info!("bypass: handshake failed: {e}"),
            }
        }
        if fds[0].revents == 0 {
            continue;
        }
        // New connections: as many as are waiting.
        loop {
            // SAFETY: accept4 on our listener; the result is checked.
            let fd = unsafe {
                libc::accept4(
                    listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                )
            };
            if fd < 0 {
                let e = io::Error::last_os_error();
                if !matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::ECONNABORTED)) {
                    tracing::warn!("bypass: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
                break;
            }
            // SAFETY: a fresh descriptor we own.
            let sock = unsafe { OwnedFd::from_raw_fd(fd) };
            let Ok(cred) = efuse_bypass::client::peer_cred(fd) else { continue };
            let mine = pending.iter().filter(|p| p.cred.uid == cred.uid).count();
            if mine >= PENDING_PER_UID || pending.len() >= MAX_PENDING {
                tracing::info!(pid = cred.pid, uid = cred.uid, "bypass: too many connections without a Hello; dropped");
                continue;
            }
            pending.push(Pending {
                sock,
                cred,
                since: Instant::now(),
                hello: [0; std::mem::size_of::<Hello>()],
                got: 0,
            });
        }
    }
    for h in clients {
        let _ = h.join();
    }
    let pinned = shared.tables.clear(&session.shared().changes);
    forget_nodes(&session, &shared, &pinned);
}

/// Reads the Hello, decides, answers. Ok(None): refused (answered already).
fn handshake<F: Filesystem>(
    session: &Arc<Session<F>>,
    sock: OwnedFd,
    cred: libc::ucred,
    buf: &[u8],
    dev: u64,
    shared: &Arc<Shared>,
) -> io::Result<Option<client::Conn>> {
    let fd = sock.as_raw_fd();
    let refuse = |errno: i32, why: &str| -> io::Result<Option<client::Conn>> {
        tracing::info!(pid = cred.pid, uid = cred.uid, "bypass: refusing a client: {why}");
        let w = Welcome { magic: MAGIC, version: VERSION, error: -errno, ..Default::default() };
        let _ = efuse_bypass::client::send_with_fd(fd, w.as_bytes(), None);
        Ok(None)
    };
    let hello = match Hello::read_from_bytes(buf) {
        Ok(h) => h,
        Err(_) => return refuse(libc::EPROTO, "malformed Hello"),
    };
    if hello.magic != MAGIC || hello.version != VERSION {
        return refuse(libc::EPROTO, &format!("protocol {:#x} version {}", hello.magic, hello.version));
    }
    if !shared.opts.enabled {
        return refuse(libc::EOPNOTSUPP, "the mount runs with --bypass off");
    }
    // As the kernel's fuse_allow_current_process: without allow_other only
    // the user the mount was made for (its user_id and group_id) gets in.
    // SAFETY: getuid/getgid have no preconditions.
    let (owner_uid, owner_gid) = unsafe { (libc::getuid(), libc::getgid()) };
    if !shared.opts.allow_other && (cred.uid != owner_uid || cred.gid != owner_gid) {
        return refuse(libc::EACCES, "not the mount's owner, and the mount has no allow_other");
    }
    if shared.negotiated.flags & init::WRITEBACK_CACHE != 0 {
        return refuse(
            libc::EOPNOTSUPP,
            "the mount uses the writeback cache (dirty kernel pages hide from bypass reads)",
        );
    }
    if shared.stats.clients.load(Ordering::Acquire) >= MAX_CLIENTS {
        return refuse(libc::EAGAIN, "too many bypass clients");
    }
    if shared.clients_of(cred.uid) >= MAX_CLIENTS_PER_UID {
        return refuse(libc::EAGAIN, "too many bypass clients of this user");
    }
    let slot_size = shared.negotiated.max_write.max(4096) + 4096;
    let (memfd, region) = match efuse_bypass::Region::create(SLOTS, slot_size) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("bypass: cannot create a region: {e}");
            return refuse(libc::ENOMEM, "no region");
        }
    };
    // The ids and capabilities the kernel would check this process with.
    let Some(creds) = perm::Creds::of_process(cred.pid as u32) else {
        return refuse(libc::ESRCH, "its /proc status cannot be read");
    };
    // The process read from /proc must still be the one that connected:
    // one that exec'd a set-id program since (while a child kept the
    // socket) would lend its new ids to whoever sends the Hello.
    if creds.uid != cred.uid || creds.gid != cred.gid {
        return refuse(
            libc::EPERM,
            &format!(
                "its ids changed since it connected (uid {} gid {} then, fs ids {} {} now)",
                cred.uid, cred.gid, creds.uid, creds.gid
            ),
        );
    }
    let (table, freed) = shared.tables.lease(&creds, &session.shared().changes);
    // Direct reads need the table (the client opens only what it names).
    // The directory is handed only to a client that could reach it anyway:
    // one as privileged as the daemon (same ids, its groups and
    // capabilities), in the daemon's root and mount namespace, on a mount
    // that may be written. Any other client could use it for more than the
    // mount allows (names above it, ACLs, set-id programs without nosuid,
    // after the unmount), so it reads through the daemon.
    let direct = if table.is_some() && !shared.opts.read_only && may_have_the_backing_tree(cred.pid as u32, &creds) {
        session.fs().direct_reads()
    } else {
        None
    };
    forget_nodes(session, shared, &freed);
    shared.stats.tables.store(shared.tables.len() as u64, Ordering::Relaxed);
    let w = Welcome {
        magic: MAGIC,
        version: VERSION,
        error: 0,
        dev,
        slot_count: SLOTS,
        slot_size,
        max_io: shared.negotiated.max_write,
        flags: (if session.shared().flush_ignored() { efuse_bypass::welcome::NO_FLUSH } else { 0 })
            | (if session.fs().capabilities().reusable_opens { efuse_bypass::welcome::KEEP_OPENS } else { 0 })
            | (if direct.is_some() { efuse_bypass::welcome::DIRECT_READS } else { 0 }),
        table_buckets: if table.is_some() { TABLE_BUCKETS } else { 0 },
        _pad: 0,
    };
    let mut pass = vec![memfd.as_raw_fd()];
    pass.extend(table.as_ref().map(|l| l.table.fd()));
    pass.extend(direct.as_ref().map(|d| d.as_raw_fd()));
    efuse_bypass::client::send_with_fds(fd, w.as_bytes(), &pass)?;
    drop(memfd);
    drop(direct);
    tracing::info!(pid = cred.pid, uid = cred.uid, gid = cred.gid, "bypass: client connected");
    Ok(Some(client::Conn {
        sock,
        region: Arc::new(region),
        creds,
        peer_uid: cred.uid,
        hung: Arc::new(AtomicBool::new(false)),
        table,
    }))
}

/// Whether process `pid` (credentials `creds`) can reach whatever the
/// daemon can: credentials covering the daemon's, the same root directory
/// and the same mount namespace.
fn may_have_the_backing_tree(pid: u32, creds: &perm::Creds) -> bool {
    let same = |what: &str| {
        let a = std::fs::metadata(format!("/proc/self/{what}"));
        let b = std::fs::metadata(format!("/proc/{pid}/{what}"));
        matches!((a, b), (Ok(a), Ok(b)) if a.dev() == b.dev() && a.ino() == b.ino())
    };
    // SAFETY: getpid has no preconditions.
    let me = perm::Creds::of_process(unsafe { libc::getpid() } as u32);
    me.is_some_and(|me| creds.covers(&me)) && same("root") && same("ns/mnt")
}

/// Forgets one lookup of each of `nodes` in the file system (the lookups a
/// metadata table pinned for entries that went).
fn forget_nodes<F: Filesystem>(session: &Arc<Session<F>>, shared: &Shared, nodes: &[u64]) {
    if nodes.is_empty() {
        return;
    }
    let sink: Arc<dyn crate::reply::ReplySink> =
        Arc::new(crate::reply::MemorySink::for_session(session.shared().clone()));
    for &n in nodes {
        if n == 0 || n == efuse_abi::ROOT_ID {
            continue;
        }
        let f = efuse_abi::structs::ForgetIn { nlookup: 1 };
        let h = efuse_abi::structs::InHeader {
            len: (std::mem::size_of::<efuse_abi::structs::InHeader>() + std::mem::size_of_val(&f)) as u32,
            opcode: efuse_abi::Opcode::Forget as u32,
            unique: shared.next_unique(),
            nodeid: n,
            uid: 0,
            gid: 0,
            pid: 0,
            total_extlen: 0,
            padding: 0,
        };
        let mut buf = h.as_bytes().to_vec();
        buf.extend_from_slice(f.as_bytes());
        // FORGET has no reply: nothing reaches the sink.
        session.dispatch(&buf, &sink);
    }
}

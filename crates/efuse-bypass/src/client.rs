//! The client side of the protocol: connect to a daemon, send a request
//! through a slot of the region, wait for the reply.
//!
//! Written for use inside a preloaded library: [`Client::call`] allocates
//! nothing and takes no lock (slots are claimed with a compare-and-swap on
//! a bitmap in the region), so a signal handler that makes a file call in
//! the middle of another one gets a slot of its own. A forked child shares
//! the region and the socket with its parent, and with them the daemon's
//! state for the client (its lookups and open handles).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

use efuse_abi::structs::{InHeader, OutHeader};
use zerocopy::{FromBytes, IntoBytes};

use crate::{futex_wait, futex_wake, state, Hello, Region, Welcome, MAGIC, VERSION};

/// Polls of the slot's state before the client sleeps on it: long enough
/// to catch a daemon that answers from memory on the other CPU, short
/// enough to leave the CPU to the daemon when both share one.
const SPIN_POLLS: u32 = 2000;

/// A connection to the daemon of one mount.
pub struct Client {
    /// The socket (-1 once [`Client::disown`] closed it).
    sock: AtomicI32,
    region: Region,
    /// The metadata table of the client's credentials (read-only mapping).
    table: Option<crate::TableMap>,
    welcome: Welcome,
    /// Set by [`Client::disown`]: every call fails with Broken.
    dead: AtomicBool,
    /// The directory of direct reads ([`welcome::DIRECT_READS`]), -1 none.
    direct: AtomicI32,
}

/// How a call failed (not the file system's answer, which is the reply's
/// error field): the client should fall back to the kernel.
#[derive(Debug)]
pub enum CallError {
    /// The request does not fit in a slot.
    TooBig,
    /// The daemon is gone or answered nonsense.
    Broken,
}

impl Client {
    /// Connects to the bypass socket at `socket`, which must be served by
    /// a process of user `daemon_uid` for a mount whose st_dev is `dev`.
    pub fn connect(socket: &Path, daemon_uid: u32, dev: u64) -> io::Result<Client> {
        let path = socket.as_os_str().as_bytes();
        // SAFETY: sockaddr_un is plain data.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        if path.len() >= addr.sun_path.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bypass socket path too long"));
        }
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(path) {
            *d = *s as libc::c_char;
        }
        // SAFETY: plain socket calls on our own descriptor.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is ours.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let len = std::mem::size_of::<libc::sa_family_t>() + path.len() + 1;
        // SAFETY: addr is a valid sockaddr_un of `len` bytes.
        if unsafe { libc::connect(fd, &addr as *const _ as *const libc::sockaddr, len as libc::socklen_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let peer = peer_uid(fd)?;
        if peer != daemon_uid {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("bypass socket served by uid {peer}, the mount belongs to uid {daemon_uid}"),
            ));
        }
        let hello = Hello { magic: MAGIC, version: VERSION, flags: 0 };
        write_all(fd, hello.as_bytes())?;
        let mut buf = [0u8; std::mem::size_of::<Welcome>()];
        let mut fds = recv_with_fds(fd, &mut buf)?.into_iter();
        let (memfd, table_fd, direct_fd) = (fds.next(), fds.next(), fds.next());
        let welcome = Welcome::read_from_bytes(&buf).map_err(|_| broken("short welcome"))?;
        if welcome.magic != MAGIC || welcome.version != VERSION {
            return Err(broken("not an efuse bypass socket"));
        }
        if welcome.error != 0 {
            return Err(io::Error::from_raw_os_error(-welcome.error));
        }
        let memfd = memfd.ok_or_else(|| broken("welcome without a region"))?;
        if welcome.dev != dev {
            return Err(broken("the daemon serves another mount"));
        }
        if !crate::geometry_ok(welcome.slot_count, welcome.slot_size) || !crate::table_buckets_ok(welcome.table_buckets)
        {
            return Err(broken("bad region geometry"));
        }
        // SAFETY: fstat into a zeroed stat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(memfd.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if (st.st_size as usize) < crate::region_len(welcome.slot_count, welcome.slot_size) {
            return Err(broken("region smaller than announced"));
        }
        let region = Region::map(memfd.as_raw_fd(), welcome.slot_count, welcome.slot_size)?;
        if region.header().magic != MAGIC {
            return Err(broken("region without magic"));
        }
        // The metadata table of this client's credentials, read-only.
        let table = match (welcome.table_buckets, table_fd) {
            (0, _) => None,
            (b, Some(t)) => Some(crate::TableMap::map(t.as_raw_fd(), b, false)?),
            (_, None) => return Err(broken("welcome announces a table it does not pass")),
        };
        // Out of the program's way: a program picks low numbers for its own
        // redirections (`exec 3<&0`) and would close ours by them.
        let fd = move_high(sock.into_raw_fd());
        // The directory of direct reads, if announced and a directory.
        let direct = match direct_fd {
            Some(d) if welcome.flags & crate::welcome::DIRECT_READS != 0 && is_dir(d.as_raw_fd()) => {
                move_high(d.into_raw_fd())
            }
            _ => -1,
        };
        Ok(Client {
            sock: AtomicI32::new(fd),
            region,
            table,
            welcome,
            dead: AtomicBool::new(false),
            direct: AtomicI32::new(direct),
        })
    }

    /// What the daemon said at connection.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The metadata table the daemon publishes to this client (and to the
    /// other clients with its credentials), if any.
    pub fn table(&self) -> Option<crate::table::Table> {
        self.table.as_ref().map(|t| t.table())
    }

    /// The socket: kept open for the client's life; the daemon drops the
    /// client's state when it closes.
    pub fn socket_fd(&self) -> i32 {
        self.sock.load(Ordering::Acquire)
    }

    /// Gives up this process's access to the connection, leaving it to the
    /// other processes that share it (a forked parent): calls fail with
    /// Broken from now on, the region's mapping becomes private anonymous
    /// memory (a thread in the middle of a call sees zeroes, never a fault,
    /// and the shared region is out of this process's reach) and this
    /// process's copy of the socket is closed. For a process whose
    /// credentials changed: the daemon judged the connection by the old ones.
    pub fn disown(&self) {
        if self.dead.swap(true, Ordering::AcqRel) {
            return;
        }
        // Nothing better to do if it fails: the dead flag already stops
        // every call this process makes.
        let _ = self.region.detach();
        if let Some(t) = &self.table {
            let _ = t.detach();
        }
        for fd in [self.sock.swap(-1, Ordering::AcqRel), self.direct.swap(-1, Ordering::AcqRel)] {
            if fd >= 0 {
                // SAFETY: our own descriptor, closed once (the swap).
                unsafe { libc::close(fd) };
            }
        }
    }

    /// Closes the directory of direct reads: the process changed its root
    /// or its mount namespace, and the daemon gave the directory only to a
    /// process in its own (a descriptor above a chroot leads out of it).
    pub fn drop_direct(&self) {
        let fd = self.direct.swap(-1, Ordering::AcqRel);
        if fd >= 0 {
            // SAFETY: our own descriptor, closed once (the swap).
            unsafe { libc::close(fd) };
        }
    }

    /// The directory of direct reads ([`welcome::DIRECT_READS`]), if the
    /// daemon passed one and the client is not disowned.
    pub fn direct_dir(&self) -> Option<i32> {
        let fd = self.direct.load(Ordering::Acquire);
        (fd >= 0).then_some(fd)
    }

    /// Was [`Client::disown`] called?
    pub fn disowned(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Bytes of request a slot holds (header included).
    pub fn slot_size(&self) -> usize {
        self.region.slot_size() as usize
    }

    /// Sends one request (`opcode` on `nodeid`, arguments `args` laid one
    /// after the other) and hands the reply's error (0 or a negative errno)
    /// and payload to `on_reply`, whose result is returned. The payload is
    /// a view of shared memory, valid only during the call.
    pub fn call<R>(
        &self,
        opcode: u32,
        nodeid: u64,
        args: &[&[u8]],
        on_reply: impl FnOnce(i32, &[u8]) -> R,
    ) -> Result<R, CallError> {
        if self.disowned() {
            return Err(CallError::Broken);
        }
        let slot = self.claim();
        let _release = Release { client: self, slot };
        self.publish(slot, opcode, nodeid, args, 0)?;
        self.wait_reply(slot)?;
        let sh = self.region.slot(slot);
        let len = sh.len.load(Ordering::Acquire) as usize;
        let osize = std::mem::size_of::<OutHeader>();
        if len < osize || len > self.slot_size() {
            return Err(CallError::Broken);
        }
        // SAFETY: `len` bytes of the slot's data, which the daemon wrote
        // before it set REPLY and leaves alone until the slot is reused.
        let reply = unsafe { std::slice::from_raw_parts(self.region.data(slot), len) };
        let out = OutHeader::read_from_bytes(&reply[..osize]).map_err(|_| CallError::Broken)?;
        if out.error > 0 || out.error < -4095 {
            return Err(CallError::Broken);
        }
        Ok(on_reply(out.error, &reply[osize..]))
    }

    /// Sends a request whose reply nobody waits for (RELEASE, FORGET): the
    /// daemon frees the slot when it has served it
    /// ([`crate::slot_flags::NO_REPLY`]).
    pub fn post(&self, opcode: u32, nodeid: u64, args: &[&[u8]]) -> Result<(), CallError> {
        if self.disowned() {
            return Err(CallError::Broken);
        }
        let slot = self.claim();
        if let Err(e) = self.publish(slot, opcode, nodeid, args, crate::slot_flags::NO_REPLY) {
            drop(Release { client: self, slot });
            return Err(e);
        }
        Ok(())
    }

    /// Writes the request into `slot` and rings the doorbell.
    fn publish(&self, slot: u32, opcode: u32, nodeid: u64, args: &[&[u8]], flags: u32) -> Result<(), CallError> {
        let hsize = std::mem::size_of::<InHeader>();
        let total = hsize + args.iter().map(|a| a.len()).sum::<usize>();
        if total > self.slot_size() || args.len() > 7 {
            return Err(CallError::TooBig);
        }
        let header = InHeader {
            len: total as u32,
            opcode,
            unique: 0,
            nodeid,
            uid: 0,
            gid: 0,
            pid: 0,
            total_extlen: 0,
            padding: 0,
        };
        let mut parts: [&[u8]; 8] = [&[]; 8];
        parts[0] = header.as_bytes();
        parts[1..=args.len()].copy_from_slice(args);
        self.region.write_parts(slot, &parts[..=args.len()]).map_err(|_| CallError::TooBig)?;
        let sh = self.region.slot(slot);
        sh.len.store(total as u32, Ordering::Relaxed);
        sh.flags.store(flags, Ordering::Relaxed);
        sh.state.store(state::REQUEST, Ordering::Release);
        let h = self.region.header();
        h.doorbell.fetch_add(1, Ordering::SeqCst);
        if h.server_waiting.load(Ordering::SeqCst) != 0 {
            futex_wake(&h.doorbell, 1);
        }
        Ok(())
    }

    fn wait_reply(&self, slot: u32) -> Result<(), CallError> {
        let sh = self.region.slot(slot);
        for _ in 0..SPIN_POLLS {
            if sh.state.load(Ordering::Acquire) == state::REPLY {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        loop {
            sh.client_waiting.store(1, Ordering::SeqCst);
            let s = sh.state.load(Ordering::SeqCst);
            if s == state::REPLY {
                sh.client_waiting.store(0, Ordering::Relaxed);
                return Ok(());
            }
            futex_wait(&sh.state, s, Some(Duration::from_millis(200)));
            sh.client_waiting.store(0, Ordering::Relaxed);
            if self.disowned() {
                return Err(CallError::Broken);
            }
            if sh.state.load(Ordering::Acquire) == state::REPLY {
                return Ok(());
            }
            if !self.alive() {
                return Err(CallError::Broken);
            }
        }
    }

    /// Is the daemon still there (its end of the socket open)?
    pub fn alive(&self) -> bool {
        let fd = self.socket_fd();
        if fd < 0 || self.disowned() {
            return false;
        }
        let mut p = libc::pollfd { fd, events: 0, revents: 0 };
        // SAFETY: one pollfd, no wait.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        !(n > 0 && p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0)
    }

    fn claim(&self) -> u32 {
        let h = self.region.header();
        let n = self.region.slot_count();
        let all = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
        let mut spins = 0u32;
        loop {
            let cur = h.claimed.load(Ordering::Relaxed);
            let free = !cur & all;
            if free != 0 {
                let bit = free.trailing_zeros();
                if h.claimed.compare_exchange_weak(cur, cur | 1 << bit, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                    return bit;
                }
                continue;
            }
            // Every slot busy: more threads in calls than slots. Let them run.
            spins += 1;
            if spins < 100 {
                std::hint::spin_loop();
            } else {
                // SAFETY: no preconditions.
                unsafe { libc::sched_yield() };
            }
        }
    }
}

/// Where the library's own descriptors go: high, below the soft limit on
/// descriptors (64 under it, at least 64, at most 64 Ki).
pub fn high_fd_floor() -> i32 {
    // SAFETY: getrlimit fills a plain struct.
    let mut r: libc::rlimit = unsafe { std::mem::zeroed() };
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 { r.rlim_cur } else { 1024 };
    (soft.min(65536) as i64 - 64).max(64) as i32
}

/// Moves descriptor `fd` to the lowest free number at or above
/// [`high_fd_floor`] (close-on-exec); keeps it where it is if that fails.
fn move_high(fd: i32) -> i32 {
    // SAFETY: dup of our own descriptor; the old one is closed only on success.
    let high = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, high_fd_floor()) };
    if high < 0 {
        return fd;
    }
    // SAFETY: our own descriptor, now duplicated.
    unsafe { libc::close(fd) };
    high
}

impl Client {
    /// Whether `fd` is this client's socket or its directory of direct reads.
    pub fn owns_fd(&self, fd: i32) -> bool {
        fd >= 0 && (self.sock.load(Ordering::Acquire) == fd || self.direct.load(Ordering::Acquire) == fd)
    }

    /// This client's descriptors (socket, directory of direct reads).
    pub fn fds(&self) -> impl Iterator<Item = i32> {
        [self.sock.load(Ordering::Acquire), self.direct.load(Ordering::Acquire)].into_iter().filter(|fd| *fd >= 0)
    }

    /// The program is about to put something on number `fd` (dup2), one of
    /// this client's descriptors: it moves to another number first; the old
    /// one is the program's to replace. False if it could not move.
    pub fn relocate(&self, fd: i32) -> bool {
        let cell = if self.sock.load(Ordering::Acquire) == fd {
            &self.sock
        } else if self.direct.load(Ordering::Acquire) == fd {
            &self.direct
        } else {
            return false;
        };
        if fd < 0 {
            return false;
        }
        // SAFETY: dup of our own descriptor to a free number.
        let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, high_fd_floor()) };
        if new < 0 {
            return false;
        }
        if cell.compare_exchange(fd, new, Ordering::AcqRel, Ordering::Acquire).is_err() {
            // SAFETY: the duplicate nobody took.
            unsafe { libc::close(new) };
            return false;
        }
        true
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        for fd in [*self.sock.get_mut(), *self.direct.get_mut()] {
            if fd >= 0 {
                // SAFETY: our own descriptor, not closed by disown.
                unsafe { libc::close(fd) };
            }
        }
    }
}

/// Frees a slot when a call ends, however it ends.
struct Release<'a> {
    client: &'a Client,
    slot: u32,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        let sh = self.client.region.slot(self.slot);
        sh.state.store(state::FREE, Ordering::Release);
        self.client.region.header().claimed.fetch_and(!(1u64 << self.slot), Ordering::Release);
    }
}

fn is_dir(fd: i32) -> bool {
    // SAFETY: fstat into a zeroed stat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    unsafe { libc::fstat(fd, &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFDIR }
}

fn broken(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("bypass handshake: {what}"))
}

fn peer_uid(fd: i32) -> io::Result<u32> {
    peer_cred(fd).map(|c| c.uid)
}

/// The credentials of the process at the other end of Unix socket `fd`
/// (SO_PEERCRED: as they were when it connected).
pub fn peer_cred(fd: i32) -> io::Result<libc::ucred> {
    // SAFETY: ucred is plain data; getsockopt fills at most its size.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: as above, on a socket of the caller's.
    let rc = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERCRED, &mut cred as *mut _ as *mut libc::c_void, &mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

fn write_all(fd: i32, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: writes from a live buffer.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// Receives exactly `buf.len()` bytes, and the descriptor that came with
/// the first of them if any.
pub fn recv_with_fd(fd: i32, buf: &mut [u8]) -> io::Result<Option<OwnedFd>> {
    Ok(recv_with_fds(fd, buf)?.into_iter().next())
}

/// [`recv_with_fd`] keeping every descriptor passed, in order.
pub fn recv_with_fds(fd: i32, buf: &mut [u8]) -> io::Result<Vec<OwnedFd>> {
    let mut got = 0;
    let mut passed = Vec::new();
    while got < buf.len() {
        let mut iov = libc::iovec { iov_base: buf[got..].as_mut_ptr().cast(), iov_len: buf.len() - got };
        let mut cbuf = [0u64; 8];
        // SAFETY: msghdr is plain data.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf);
        // SAFETY: recvmsg into our buffers.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(broken("the daemon closed the connection"));
        }
        // SAFETY: walks the control messages recvmsg wrote.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let nfds = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<i32>();
                    let fds = libc::CMSG_DATA(c) as *const i32;
                    for k in 0..nfds {
                        passed.push(OwnedFd::from_raw_fd(fds.add(k).read_unaligned()));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        got += n as usize;
    }
    Ok(passed)
}

/// Sends `buf` with descriptor `pass` attached (daemon side of the
/// handshake).
pub fn send_with_fd(fd: i32, buf: &[u8], pass: Option<i32>) -> io::Result<()> {
    send_with_fds(fd, buf, pass.as_slice())
}

/// [`send_with_fd`] with up to four descriptors attached, in order.
pub fn send_with_fds(fd: i32, buf: &[u8], pass: &[i32]) -> io::Result<()> {
    if pass.len() > 4 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "at most four descriptors"));
    }
    let mut iov = libc::iovec { iov_base: buf.as_ptr() as *mut libc::c_void, iov_len: buf.len() };
    let mut cbuf = [0u64; 6];
    // SAFETY: msghdr is plain data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !pass.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        let bytes = std::mem::size_of_val(pass) as u32;
        // SAFETY: CMSG macros over our control buffer, big enough for four fds.
        unsafe {
            msg.msg_controllen = libc::CMSG_SPACE(bytes) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes) as usize;
            let data = libc::CMSG_DATA(c) as *mut i32;
            for (k, p) in pass.iter().enumerate() {
                data.add(k).write_unaligned(*p);
            }
        }
    }
    // SAFETY: sendmsg from our buffers.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if (n as usize) < buf.len() {
        write_all(fd, &buf[n as usize..])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// The stand-in daemon's handshake: accepts one client, reads its Hello
    /// and welcomes it with a region of 4 slots (device 42).
    fn welcome_one(listener: &UnixListener) -> (std::os::unix::net::UnixStream, Region) {
        let (conn, _) = listener.accept().expect("accept");
        let fd = conn.as_raw_fd();
        let mut hello = [0u8; std::mem::size_of::<Hello>()];
        // SAFETY: reads into our buffer.
        let n = unsafe { libc::recv(fd, hello.as_mut_ptr().cast(), hello.len(), libc::MSG_WAITALL) };
        assert_eq!(n as usize, hello.len());
        let (memfd, region) = Region::create(4, 8192).expect("region");
        let w = Welcome {
            magic: MAGIC,
            version: VERSION,
            error: 0,
            dev: 42,
            slot_count: 4,
            slot_size: 8192,
            max_io: 4096,
            flags: 0,
            table_buckets: 0,
            _pad: 0,
        };
        send_with_fd(fd, w.as_bytes(), Some(memfd.as_raw_fd())).expect("welcome");
        (conn, region)
    }

    /// Serves slot `i` of the stand-in daemon if it holds a request: its
    /// arguments echoed back, or for a posted request the slot freed.
    /// Some((posted, arguments)) when it served one.
    fn echo_slot(region: &Region, i: u32, buf: &mut Vec<u8>) -> Option<(bool, Vec<u8>)> {
        let sh = region.slot(i);
        sh.state.compare_exchange(state::REQUEST, state::SERVING, Ordering::Acquire, Ordering::Relaxed).ok()?;
        let len = sh.len.load(Ordering::Relaxed) as usize;
        region.copy_out(i, len, buf).expect("copy");
        let args = buf[std::mem::size_of::<InHeader>()..].to_vec();
        if sh.flags.load(Ordering::Relaxed) & crate::slot_flags::NO_REPLY != 0 {
            sh.state.store(state::FREE, Ordering::Release);
            region.header().claimed.fetch_and(!(1u64 << i), Ordering::Release);
            return Some((true, args));
        }
        let out = OutHeader { len: (16 + args.len()) as u32, error: 0, unique: 0 };
        let n = region.write_parts(i, &[out.as_bytes(), &args]).expect("fits");
        sh.len.store(n as u32, Ordering::Relaxed);
        sh.state.store(state::REPLY, Ordering::Release);
        futex_wake(&sh.state, 1);
        Some((false, args))
    }

    /// A stand-in daemon serves three calls and a posted request.
    #[test]
    fn a_call_goes_through_a_slot_and_comes_back() {
        let dir = std::env::temp_dir().join(format!("efuse-bypass-test-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        let sock = dir.join("t.bypass");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).expect("bind");
        let server = std::thread::spawn(move || {
            let (conn, region) = welcome_one(&listener);
            let mut served = 0;
            let mut buf = Vec::new();
            while served < 4 {
                let mut any = false;
                for i in 0..region.slot_count() {
                    if let Some((posted, args)) = echo_slot(&region, i, &mut buf) {
                        if posted {
                            assert_eq!(args, b"posted");
                        }
                        any = true;
                        served += 1;
                    }
                }
                if !any {
                    std::thread::yield_now();
                }
            }
            conn
        });
        let c = Client::connect(&sock, unsafe { libc::geteuid() }, 42).expect("connect");
        for word in [&b"one"[..], b"two", b"three"] {
            let got = c.call(1, 1, &[word], |e, p| (e, p.to_vec())).expect("call");
            assert_eq!(got, (0, word.to_vec()));
        }
        assert!(matches!(c.call(1, 1, &[&[0u8; 9000][..]], |_, _| ()), Err(CallError::TooBig)));
        // A posted request holds its slot until the daemon frees it.
        c.post(1, 1, &[b"posted"]).expect("post");
        let conn = server.join().expect("server");
        assert_eq!(c.region.header().claimed.load(Ordering::Acquire), 0);
        drop(conn);
        // The daemon is gone: a call fails instead of waiting forever. (A
        // child another test forks meanwhile may hold a copy of the daemon's
        // end for a moment: wait for it to go.)
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while c.alive() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!c.alive());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A stand-in daemon for one client: the handshake, then every request
    /// echoed back until the client's socket closes (all its holders gone).
    fn echo_server(listener: UnixListener) -> std::thread::JoinHandle<usize> {
        std::thread::spawn(move || {
            let (conn, region) = welcome_one(&listener);
            let fd = conn.as_raw_fd();
            let mut served = 0;
            let mut buf = Vec::new();
            loop {
                for i in 0..region.slot_count() {
                    if echo_slot(&region, i, &mut buf).is_some() {
                        served += 1;
                    }
                }
                let mut b = [0u8; 1];
                // SAFETY: a non-blocking peek into our buffer.
                let n = unsafe { libc::recv(fd, b.as_mut_ptr().cast(), 1, libc::MSG_DONTWAIT | libc::MSG_PEEK) };
                if n == 0 {
                    return served;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    }

    #[test]
    fn a_disowned_client_fails_its_calls_and_leaves_the_connection_to_the_other_holders() {
        let dir = std::env::temp_dir().join(format!("efuse-bypass-test3-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        let sock = dir.join("t.bypass");
        let _ = std::fs::remove_file(&sock);
        let server = echo_server(UnixListener::bind(&sock).expect("bind"));
        let c = Client::connect(&sock, unsafe { libc::geteuid() }, 42).expect("connect");
        assert_eq!(c.call(1, 1, &[b"before"], |e, p| (e, p.to_vec())).expect("call"), (0, b"before".to_vec()));
        // A forked child gives up its share (as after a credential change):
        // the parent keeps calling through the same connection.
        // SAFETY: the child only makes system calls and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            c.disown();
            let ok = matches!(c.call(1, 1, &[b"child"], |_, _| ()), Err(CallError::Broken))
                && c.socket_fd() == -1
                && c.region.header().magic == 0;
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child status {status:#x}");
        assert_eq!(c.call(1, 1, &[b"after"], |e, p| (e, p.to_vec())).expect("call"), (0, b"after".to_vec()));
        assert!(c.alive());
        // Now the parent gives it up too: the daemon sees the socket close.
        c.disown();
        assert!(matches!(c.call(1, 1, &[b"x"], |_, _| ()), Err(CallError::Broken)));
        assert!(matches!(c.post(1, 1, &[b"x"]), Err(CallError::Broken)));
        assert!(!c.alive());
        assert_eq!(c.region.header().magic, 0, "the shared region is still mapped");
        assert_eq!(server.join().expect("server"), 2);
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_wrong_device_or_user_is_refused() {
        let dir = std::env::temp_dir().join(format!("efuse-bypass-test2-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        let sock = dir.join("t.bypass");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).expect("bind");
        // Another uid than the peer's: refused before any message.
        let uid = unsafe { libc::geteuid() };
        let e = Client::connect(&sock, uid.wrapping_add(1), 42).err().expect("refused");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

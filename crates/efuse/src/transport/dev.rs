//! The /dev/fuse transport: one thread and one cloned descriptor per worker,
//! one request buffer per worker, reused for every request.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use efuse_abi::consts::ioctl::DEV_IOC_CLONE;
use efuse_abi::structs::OutHeader;
use efuse_abi::Opcode;
use zerocopy::IntoBytes;

use crate::filesystem::Filesystem;
use crate::reply::ReplySink;
use crate::session::{InitError, InitOutcome, Negotiated, Session, SessionShared, REQUEST_BUFFER_SIZE};
use crate::stats::Counters;

/// Where replies of one worker go: its /dev/fuse descriptor.
pub struct DevChannel {
    fd: Arc<OwnedFd>,
    shared: Arc<SessionShared>,
}

impl DevChannel {
    pub fn new(fd: OwnedFd, shared: Arc<SessionShared>) -> DevChannel {
        DevChannel { fd: Arc::new(fd), shared }
    }

    /// Reads one request into `buf`; Ok(None) means the connection is gone.
    fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            // SAFETY: read into a live, writable buffer of the given length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(Some(n as usize));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // Interrupted, or the request vanished before we read it.
                Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::ENOENT) => continue,
                // Unmounted, or aborted.
                Some(libc::ENODEV) | Some(libc::ECONNABORTED) => return Ok(None),
                _ => return Err(e),
            }
        }
    }
}

impl ReplySink for DevChannel {
    fn send(&self, _opcode: Opcode, unique: u64, error: i32, payload: &[IoSlice<'_>]) {
        let len = std::mem::size_of::<OutHeader>() + payload.iter().map(|p| p.len()).sum::<usize>();
        let header = OutHeader { len: len as u32, error, unique };
        let mut iov = [IoSlice::new(&[]); 8];
        iov[0] = IoSlice::new(header.as_bytes());
        let n = payload.len().min(iov.len() - 1);
        iov[1..=n].copy_from_slice(&payload[..n]);
        if payload.len() > n {
            tracing::error!("reply with {} parts exceeds the transport's limit", payload.len());
        }
        // SAFETY: IoSlice is ABI-compatible with iovec; all slices are live.
        let rc = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr().cast(), (n + 1) as libc::c_int) };
        self.shared.interrupts.remove(unique);
        if rc < 0 {
            let e = io::Error::last_os_error();
            // ENOENT: the request was interrupted and is gone; ENODEV: unmounted.
            if !matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENODEV)) {
                tracing::warn!(unique, "writing reply failed: {e}");
            }
        }
    }

    fn counters(&self) -> Option<&Counters> {
        Some(&self.shared.counters)
    }
}

fn clone_fd(session_fd: &OwnedFd) -> io::Result<OwnedFd> {
    let path = c"/dev/fuse";
    // SAFETY: open(2) on a static NUL-terminated path.
    let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let src: u32 = session_fd.as_raw_fd() as u32;
    // SAFETY: FUSE_DEV_IOC_CLONE reads one u32 (the session descriptor).
    if unsafe { libc::ioctl(fd.as_raw_fd(), DEV_IOC_CLONE as _, &src) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Reads and answers INIT (and a retried INIT) on the session descriptor.
/// Returns the channel of that descriptor, what was negotiated, and the
/// request buffer, to be reused by the first worker.
pub(crate) fn handshake<F: Filesystem>(
    session: &Arc<Session<F>>,
    fd: OwnedFd,
) -> Result<(Arc<DevChannel>, Negotiated, Vec<u8>), InitError> {
    let shared = session.shared().clone();
    let main = Arc::new(DevChannel::new(fd, shared));
    let mut buf = vec![0u8; REQUEST_BUFFER_SIZE];
    loop {
        let n = match main.read(&mut buf) {
            Ok(Some(n)) => n,
            Ok(None) => return Err(InitError::NotInit("end of connection".into())),
            Err(e) => return Err(InitError::NotInit(format!("read error: {e}"))),
        };
        let sink: Arc<dyn ReplySink> = main.clone();
        let connection = crate::connection::Connection::new(main.fd.clone());
        match session.handle_init(&buf[..n], &sink, Some(connection))? {
            InitOutcome::Done(negotiated) => return Ok((main, negotiated, buf)),
            InitOutcome::Retry => continue,
        }
    }
}

/// The session descriptor, for transports that issue commands on it.
pub(crate) fn session_fd(chan: &DevChannel) -> &Arc<OwnedFd> {
    &chan.fd
}

/// Starts `threads` workers, each on its own cloned descriptor (sharing the
/// session's if cloning is refused); the first reuses `buf`.
pub(crate) fn start_workers<F: Filesystem>(
    session: &Arc<Session<F>>,
    main: &Arc<DevChannel>,
    threads: usize,
    mut buf: Vec<u8>,
) -> Result<Vec<std::thread::JoinHandle<()>>, InitError> {
    let shared = session.shared().clone();
    let threads = threads.max(1);
    let mut workers = Vec::with_capacity(threads);
    let mut clone_failed = false;
    for i in 0..threads {
        let chan = if i == 0 {
            main.clone()
        } else {
            match clone_fd(&main.fd) {
                Ok(fd) => Arc::new(DevChannel::new(fd, shared.clone())),
                Err(e) => {
                    if !clone_failed {
                        tracing::warn!("FUSE_DEV_IOC_CLONE refused ({e}); workers share one descriptor");
                        clone_failed = true;
                    }
                    main.clone()
                }
            }
        };
        let session = session.clone();
        let mut wbuf = if i == 0 { std::mem::take(&mut buf) } else { vec![0u8; REQUEST_BUFFER_SIZE] };
        let handle = std::thread::Builder::new()
            .name(format!("efuse-dev-{i}"))
            .spawn(move || worker(session, chan, &mut wbuf))
            .map_err(|e| InitError::NotInit(format!("cannot start worker: {e}")))?;
        workers.push(handle);
    }
    Ok(workers)
}

fn worker<F: Filesystem>(session: Arc<Session<F>>, chan: Arc<DevChannel>, buf: &mut [u8]) {
    let sink: Arc<dyn ReplySink> = chan.clone();
    loop {
        match chan.read(buf) {
            Ok(Some(n)) => session.dispatch(&buf[..n], &sink),
            Ok(None) => break,
            Err(e) => {
                tracing::error!("reading /dev/fuse failed: {e}; worker stops");
                break;
            }
        }
        if session.shared().destroyed.load(Ordering::Acquire) {
            break;
        }
    }
}

//! The /dev/fuse transport: one thread and one cloned descriptor per worker,
//! one request buffer per worker, reused for every request.
//!
//! A request is read into its buffer at an offset chosen so that a WRITE's
//! data, which follows its two headers, starts on a page: a file system can
//! write it to a backing file opened with O_DIRECT without copying it first
//! ([`RequestBuf`]).

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use efuse_abi::consts::ioctl::DEV_IOC_CLONE;
use efuse_abi::structs::{InHeader, OutHeader, WriteIn};
use zerocopy::IntoBytes;

use crate::buffer::{AlignedBuf, ALIGN};
use crate::filesystem::Filesystem;
use crate::reply::{Reply, ReplySink};
use crate::session::{InitError, InitOutcome, Negotiated, Session, SessionShared, REQUEST_BUFFER_SIZE};

/// Bytes before a WRITE's data: `fuse_in_header` and `fuse_write_in`.
const WRITE_HEADERS: usize = std::mem::size_of::<InHeader>() + std::mem::size_of::<WriteIn>();

/// One worker's request buffer: `REQUEST_BUFFER_SIZE` bytes that start
/// `WRITE_HEADERS` bytes before a page boundary, so a WRITE's data lands
/// page-aligned (the kernel copies a request in one piece, headers first).
/// Every other request is just as contiguous; only its place moved.
pub(crate) struct RequestBuf {
    mem: AlignedBuf,
}

impl RequestBuf {
    const LEAD: usize = ALIGN - WRITE_HEADERS;

    fn new() -> io::Result<RequestBuf> {
        Ok(RequestBuf { mem: AlignedBuf::new(Self::LEAD + REQUEST_BUFFER_SIZE)? })
    }

    /// Where requests are read to.
    fn area(&mut self) -> &mut [u8] {
        &mut self.mem.as_mut_slice()[Self::LEAD..]
    }
}

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

/// Most iovecs one reply is written with; a reply in more parts is copied
/// into one buffer first (the header's length must equal what is written,
/// or the kernel rejects the reply and the request is never answered).
const MAX_IOVECS: usize = 8;

thread_local! {
    /// Where replies of many parts are coalesced; reused per thread.
    static COALESCE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl DevChannel {
    fn write_reply(&self, header: &OutHeader, payload: &[IoSlice<'_>]) -> io::Result<()> {
        let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
        iov[0] = IoSlice::new(header.as_bytes());
        let rc = if payload.len() < MAX_IOVECS {
            iov[1..=payload.len()].copy_from_slice(payload);
            // SAFETY: IoSlice is ABI-compatible with iovec; all slices are live.
            unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr().cast(), (payload.len() + 1) as libc::c_int) }
        } else {
            COALESCE.with(|c| {
                let mut owned = Vec::new();
                let mut guard = c.try_borrow_mut();
                let buf = match guard.as_deref_mut() {
                    Ok(b) => b,
                    Err(_) => &mut owned,
                };
                buf.clear();
                for p in payload {
                    buf.extend_from_slice(p);
                }
                let iov = [IoSlice::new(header.as_bytes()), IoSlice::new(buf)];
                // SAFETY: as above.
                unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr().cast(), 2) }
            })
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl ReplySink for DevChannel {
    fn send(&self, reply: &Reply<'_>) {
        let len = std::mem::size_of::<OutHeader>() + reply.payload.iter().map(|p| p.len()).sum::<usize>();
        let header = OutHeader { len: len as u32, error: reply.error, unique: reply.unique };
        if let Err(e) = self.write_reply(&header, reply.payload) {
            match e.raw_os_error() {
                // The request is gone (aborted or interrupted): take back what
                // the reply granted.
                Some(libc::ENOENT) => {
                    if let Some(g) = reply.grant.to_refused() {
                        self.shared.refused(g);
                    }
                }
                // Unmounted: nothing to take back, the session ends.
                Some(libc::ENODEV) => {}
                _ => tracing::warn!(unique = reply.unique, "writing reply failed: {e}"),
            }
        }
    }

    fn session(&self) -> Option<&SessionShared> {
        Some(&self.shared)
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
) -> Result<(Arc<DevChannel>, Negotiated, RequestBuf), InitError> {
    let shared = session.shared().clone();
    let main = Arc::new(DevChannel::new(fd, shared));
    let mut req = RequestBuf::new().map_err(|e| InitError::NotInit(format!("request buffer: {e}")))?;
    loop {
        let buf = req.area();
        let n = match main.read(buf) {
            Ok(Some(n)) => n,
            Ok(None) => return Err(InitError::NotInit("end of connection".into())),
            Err(e) => return Err(InitError::NotInit(format!("read error: {e}"))),
        };
        let sink: Arc<dyn ReplySink> = main.clone();
        let connection = crate::connection::Connection::new(main.fd.clone());
        match session.handle_init(&buf[..n], &sink, Some(connection))? {
            InitOutcome::Done(negotiated) => return Ok((main, negotiated, req)),
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
    buf: RequestBuf,
) -> Result<Vec<std::thread::JoinHandle<()>>, InitError> {
    let shared = session.shared().clone();
    let threads = threads.max(1);
    let mut workers = Vec::with_capacity(threads);
    let mut clone_failed = false;
    let mut first = Some(buf);
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
        let mut wbuf = match first.take() {
            Some(b) => b,
            None => RequestBuf::new().map_err(|e| InitError::NotInit(format!("request buffer: {e}")))?,
        };
        let handle = std::thread::Builder::new()
            .name(format!("efuse-dev-{i}"))
            .spawn(move || worker(session, chan, wbuf.area()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::{ReplyData, Responder};
    use efuse_abi::Opcode;
    use std::io::Read;

    /// A WRITE read into a worker's buffer has its data on a page boundary
    /// (what O_DIRECT on a backing file needs), through a real read(2).
    #[test]
    fn write_data_lands_page_aligned() {
        use efuse_abi::{Operation, ProtocolOptions, Request};
        let data = vec![0x5au8; 8192];
        let arg = WriteIn { size: data.len() as u32, ..Default::default() };
        let len = WRITE_HEADERS + data.len();
        let h = InHeader { len: len as u32, opcode: Opcode::Write as u32, unique: 9, nodeid: 2, ..Default::default() };
        let mut msg = h.as_bytes().to_vec();
        msg.extend_from_slice(arg.as_bytes());
        msg.extend_from_slice(&data);
        let mut fds = [0; 2];
        // SAFETY: pipe writes two fresh descriptors into the array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both are ours.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            std::fs::File::from(wr).write_all(&msg).unwrap();
        });
        let chan = DevChannel::new(rd, Arc::default());
        let mut req = RequestBuf::new().unwrap();
        let buf = req.area();
        let mut n = 0;
        while n < len {
            n += chan.read(&mut buf[n..]).unwrap().unwrap();
        }
        writer.join().unwrap();
        match Request::parse(&buf[..n], ProtocolOptions::default()).unwrap().op {
            Operation::Write { data: got, .. } => {
                assert_eq!(got, &data[..]);
                assert_eq!(got.as_ptr() as usize % ALIGN, 0, "WRITE data not page-aligned");
            }
            other => panic!("decoded {other:?}"),
        }
    }

    /// A reply in more parts than one writev takes is coalesced: the header's
    /// length is what is written, so the kernel accepts it.
    #[test]
    fn many_part_replies_are_written_whole() {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two fresh descriptors into the array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both are ours.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let chan: Arc<dyn ReplySink> = Arc::new(DevChannel::new(wr, Arc::default()));
        let parts: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 1 + i as usize]).collect();
        let slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        ReplyData::new(Responder::new(42, Opcode::Read, chan.clone())).data_vectored(&slices);
        drop(chan);
        let mut got = Vec::new();
        std::fs::File::from(rd).read_to_end(&mut got).unwrap();
        let want: Vec<u8> = parts.concat();
        let hdr = std::mem::size_of::<OutHeader>();
        assert_eq!(got.len(), hdr + want.len());
        let len = u32::from_ne_bytes(got[..4].try_into().unwrap()) as usize;
        assert_eq!(len, got.len(), "header length must equal the bytes written");
        assert_eq!(&got[hdr..], &want[..]);
    }
}

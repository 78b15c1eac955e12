//! Transports carry requests from the kernel to the session and replies back.
//!
//! - `dev`: N worker threads, each reading its own /dev/fuse descriptor cloned
//!   with FUSE_DEV_IOC_CLONE, so the kernel can hand requests to idle workers
//!   without one descriptor's lock in the way.
//! - `uring`: FUSE-over-io_uring (Linux 6.14+): ring queues per CPU, each
//!   served by a crew of threads pinned to that CPU (one available entry
//!   each, so a blocked handler holds back only its own request); /dev/fuse
//!   keeps one worker for what the kernel still sends there (INTERRUPT,
//!   FORGET).
//!
//! INIT always arrives on /dev/fuse and is answered there; which transport
//! serves the rest is settled by what INIT negotiated ([`run`]).

pub mod bypass;
pub mod dev;
pub mod uring;

use std::os::fd::OwnedFd;
use std::sync::Arc;

pub use dev::DevChannel;

use crate::filesystem::Filesystem;
use crate::session::{InitError, Negotiated, Session};
use efuse_abi::consts::init;

/// Which transport serves requests after INIT (`--transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportKind {
    /// io_uring when the kernel offers FUSE_OVER_IO_URING, else /dev/fuse.
    #[default]
    Auto,
    /// /dev/fuse worker threads.
    Dev,
    /// FUSE-over-io_uring; the mount fails when the kernel cannot do it.
    Uring,
}

impl std::str::FromStr for TransportKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(TransportKind::Auto),
            "dev" => Ok(TransportKind::Dev),
            "uring" => Ok(TransportKind::Uring),
            other => Err(format!("unknown transport {other:?} (auto, dev, uring)")),
        }
    }
}

/// How to serve requests.
#[derive(Debug, Clone, Copy)]
pub struct TransportConfig {
    /// /dev/fuse workers (the dev transport; uring keeps one).
    pub threads: usize,
    pub kind: TransportKind,
    /// Threads (each with one available ring entry) per online CPU's queue (uring).
    pub queue_depth: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            kind: TransportKind::Auto,
            queue_depth: uring::DEFAULT_QUEUE_DEPTH,
        }
    }
}

/// A session whose INIT is done and whose workers are running.
pub struct Running {
    pub negotiated: Negotiated,
    /// Threads serving requests (dev workers, or ring queues).
    pub threads: usize,
    /// "dev" or "uring", as `efuse stats` reports it.
    pub transport: &'static str,
    /// The connection's descriptor for the daemon's own messages (cache
    /// invalidations), e.g. for the bypass transport.
    pub connection: crate::connection::Connection,
    workers: Vec<std::thread::JoinHandle<()>>,
    uring: Option<uring::UringRunning>,
}

impl Running {
    /// Waits until every worker has stopped (unmount or abort). With uring,
    /// the /dev/fuse worker ends first (the connection is gone); the ring
    /// queues see their commands fail and are then told to stop in case one
    /// had no command left in the kernel to fail.
    pub fn join(self) {
        for w in self.workers {
            let _ = w.join();
        }
        if let Some(u) = self.uring {
            u.stop_and_join();
        }
    }
}

/// Whether the kernel lets this process use FUSE-over-io_uring now: the
/// module parameter `enable_uring` is `Y`, and this process may create an
/// io_uring at all. Err says why not, in one line.
///
/// The second check matters before INIT: once FUSE_OVER_IO_URING is
/// negotiated the kernel holds every request until a ring queue registers,
/// and only a failed registration turns that off again. A process that
/// cannot even create a ring (`kernel.io_uring_disabled`=1 for a user
/// outside `kernel.io_uring_group`, =2 for everyone, or a seccomp filter)
/// never registers, and its mount would hang; it must not ask.
pub fn uring_available() -> Result<(), String> {
    const PARAM: &str = "/sys/module/fuse/parameters/enable_uring";
    match std::fs::read_to_string(PARAM) {
        Ok(v) if v.trim() == "Y" || v.trim() == "1" => {}
        Ok(_) => return Err(format!("{PARAM} is N (as root: echo Y > {PARAM})")),
        Err(_) => {
            return Err("the kernel has no FUSE-over-io_uring (needs Linux 6.14+ with CONFIG_FUSE_IO_URING)".into())
        }
    }
    // The same ring shape the queues use (128-byte SQEs), as small as it gets.
    match io_uring::IoUring::<io_uring::squeue::Entry128, io_uring::cqueue::Entry>::builder().build(1) {
        Ok(_) => Ok(()),
        Err(e) => {
            let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
                .map(|v| format!(" (kernel.io_uring_disabled={})", v.trim()))
                .unwrap_or_default();
            Err(format!("this process may not create an io_uring: {e}{sysctl}"))
        }
    }
}

/// Answers INIT on `fd`, then starts the transport `config` asks for. The
/// session must have been created with `over_io_uring` set when `config`
/// may use uring (see [`wants_uring`]).
pub fn run<F: Filesystem>(
    session: Arc<Session<F>>,
    fd: OwnedFd,
    config: TransportConfig,
) -> Result<Running, InitError> {
    let (main, negotiated, buf) = dev::handshake(&session, fd)?;
    let connection = crate::connection::Connection::new(dev::session_fd(&main).clone());
    let offered = negotiated.flags & init::OVER_IO_URING != 0;
    let use_uring = match config.kind {
        TransportKind::Dev => false,
        TransportKind::Uring if !offered => {
            return Err(InitError::NotInit(
                "--transport uring: the kernel did not offer FUSE_OVER_IO_URING at INIT (needs Linux 6.14+, CONFIG_FUSE_IO_URING, enable_uring=Y)".into(),
            ))
        }
        TransportKind::Uring => true,
        TransportKind::Auto if offered => {
            tracing::info!("transport auto: uring (the kernel offers FUSE_OVER_IO_URING)");
            true
        }
        TransportKind::Auto => {
            let why = uring_available().err().unwrap_or_else(|| "the kernel did not offer it at INIT".into());
            tracing::info!("transport auto: dev, no FUSE-over-io_uring: {why}");
            false
        }
    };
    if use_uring {
        let fd = dev::session_fd(&main).clone();
        match uring::start(&session, fd, &negotiated, config.queue_depth) {
            Ok(u) => {
                // /dev/fuse still carries INTERRUPT and FORGET (and anything
                // sent before the ring was ready): one worker is enough.
                let workers = dev::start_workers(&session, &main, 1, buf)?;
                let threads = u.queues();
                tracing::info!(
                    queues = threads,
                    depth = config.queue_depth,
                    "transport uring: {threads} queue(s), a crew of {} pinned threads per online CPU",
                    config.queue_depth
                );
                return Ok(Running { negotiated, threads, transport: "uring", connection, workers, uring: Some(u) });
            }
            Err(e) if config.kind == TransportKind::Uring => {
                return Err(InitError::NotInit(format!("--transport uring: {e}")));
            }
            Err(e) => {
                // The kernel turns the ring off for this connection when a
                // registration fails, so requests come through /dev/fuse.
                tracing::warn!("transport auto: dev, registering the ring queues failed: {e}");
            }
        }
    }
    let threads = config.threads.max(1);
    let workers = dev::start_workers(&session, &main, threads, buf)?;
    tracing::info!(threads, "transport dev: {threads} worker(s), one /dev/fuse descriptor each");
    Ok(Running { negotiated, threads, transport: "dev", connection, workers, uring: None })
}

/// Whether a session for `config` should ask for FUSE_OVER_IO_URING at INIT.
/// Asking makes the kernel hold requests until the ring queues register, so
/// `auto` asks only when the module parameter allows it.
pub fn wants_uring(config: &TransportConfig) -> bool {
    match config.kind {
        TransportKind::Dev => false,
        TransportKind::Uring => true,
        TransportKind::Auto => uring_available().is_ok(),
    }
}

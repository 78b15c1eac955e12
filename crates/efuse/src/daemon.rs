//! Serving one file system at one mount point, from mount to unmount: the
//! sequence every efuse daemon runs.
//!
//! mount -> INIT -> workers + control socket -> ready -> wait for unmount or
//! a signal (SIGINT, SIGTERM, SIGHUP: unmount) -> workers end -> destroy.
//! If the daemon stops for any other reason while still mounted, it aborts its
//! connection and detaches the mount, so no stale mount is ever left behind.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::control::ControlServer;
use crate::filesystem::Filesystem;
use crate::mount::{self, MountOptions};
use crate::session::{Session, SessionConfig};
use crate::stats::StatsReport;
use crate::transport::{self, TransportConfig};

/// Everything `serve` needs besides the file system.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub mount: MountOptions,
    pub session: SessionConfig,
    pub transport: TransportConfig,
    /// eBPF counters and the Prometheus endpoint.
    pub observe: crate::observe::ObserveOptions,
    /// Accept bypass clients (`--bypass on`, the default); off: refuse them.
    pub bypass: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Mount(#[from] mount::MountError),
    #[error("mount point: {0}")]
    Path(std::io::Error),
    #[error("starting the session: {0}")]
    Init(#[from] crate::session::InitError),
    #[error("{0}")]
    Transport(String),
}

fn termination_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Mounts `fs` at `mountpoint` and serves it until unmounted. `ready` is
/// called once: with Ok when the mount answers requests, or with the error
/// that prevented it. Must be called before the process starts other threads
/// (it blocks termination signals for every thread it creates).
pub fn serve<F: Filesystem>(
    fs: F,
    mountpoint: &Path,
    opts: ServeOptions,
    ready: impl FnOnce(Result<(), String>),
) -> Result<(), ServeError> {
    let set = termination_signals();
    // SAFETY: blocks signals in this thread; threads spawned later inherit it.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    // SAFETY: a write to a closed pipe must be an error, not a signal.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };

    let mp = match mount::absolute_mountpoint(mountpoint) {
        Ok(p) => p,
        Err(e) => {
            ready(Err(format!("mount point {}: {e}", mountpoint.display())));
            return Err(ServeError::Path(e));
        }
    };
    let mut opts = opts;
    // A lock that must wait is answered later, and over FUSE-over-io_uring
    // its request holds a ring entry meanwhile; requests that arrive while
    // every entry of their CPU is taken wait in the kernel until an entry is
    // committed (a fresh registration does not take them), so many waiting
    // locks can hold back that CPU's other requests until a lock is granted.
    let caps = fs.capabilities();
    let daemon_locks = opts.session.features.daemon_locks && (caps.posix_locks || caps.flock_locks);
    match opts.transport.kind {
        transport::TransportKind::Auto if daemon_locks => {
            tracing::info!(
                "transport auto: dev, since locks are kept by the daemon (a waiting lock holds a ring entry)"
            );
            opts.transport.kind = transport::TransportKind::Dev;
        }
        transport::TransportKind::Uring if daemon_locks => tracing::warn!(
            "--transport uring with locks kept by the daemon: each waiting lock holds a ring entry, and many \
             of them on one CPU can hold back that CPU's other requests until a lock is granted"
        ),
        _ => {}
    }
    if opts.transport.kind == transport::TransportKind::Uring {
        if let Err(why) = transport::uring_available() {
            let msg = format!("--transport uring: {why}");
            ready(Err(msg.clone()));
            return Err(ServeError::Transport(msg));
        }
    }
    // Before mount(2), so the kernel-side counters see INIT too.
    let kernel_view = crate::observe::KernelView::load(opts.observe.bpf);
    let mounted = match mount::mount(&mp, &opts.mount) {
        Ok(m) => m,
        Err(e) => {
            ready(Err(e.to_string()));
            return Err(e.into());
        }
    };
    let connection = mount::find_mount(&mp).and_then(|m| m.connection());
    kernel_view.set_connection(connection);
    let privileged = mounted.privileged;
    let session_config =
        SessionConfig { over_io_uring: transport::wants_uring(&opts.transport), ..opts.session.clone() };
    let session = Arc::new(Session::new(fs, session_config));
    let running = match transport::run(session.clone(), mounted.fd, opts.transport) {
        Ok(r) => r,
        Err(e) => {
            cleanup(&mp, connection);
            ready(Err(e.to_string()));
            return Err(e.into());
        }
    };
    // After INIT (the workers answer the stat of the mount point it makes).
    let bypass_opts = transport::bypass::BypassOptions {
        enabled: opts.bypass,
        allow_other: opts.mount.allow_other,
        read_only: opts.mount.read_only,
    };
    let bypass = match transport::bypass::start(
        session.clone(),
        Some(running.connection.clone()),
        running.negotiated,
        &mp,
        bypass_opts,
    ) {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::warn!("bypass socket unavailable, bypass clients go through the kernel: {e}");
            None
        }
    };
    let bypass_stats = bypass.as_ref().map(|b| b.stats());
    let observability = Arc::new(crate::observe::Observability::new(session.shared().clone(), kernel_view));
    let control = {
        let shared = session.shared().clone();
        let obs = observability.clone();
        let threads = running.threads;
        let transport_name = running.transport;
        let fs_name = opts.session.fs_name.clone();
        let mp_s = mp.display().to_string();
        let bypass_handle = bypass.as_ref().map(|b| b.handle());
        let top = move |cmd: &str| match cmd {
            "top" => Some(serde_json::to_string(&obs.top()).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))),
            // The bypass's counterpart of drop_caches (the bench's cold runs).
            "drop-bypass-tables" => Some(match &bypass_handle {
                Some(h) if h.drop_idle_tables(std::time::Duration::from_secs(5)) => "{\"dropped\": true}".into(),
                Some(_) => {
                    "{\"error\": \"bypass clients stayed connected, or the tables were not dropped, within 5 s\"}"
                        .into()
                }
                None => "{\"dropped\": false}".into(),
            }),
            _ => None,
        };
        let served = session.clone();
        let stats = move || {
            let snap = shared.counters.snapshot();
            let report = StatsReport {
                transport: transport_name.into(),
                threads,
                fs: fs_name.clone(),
                mountpoint: mp_s.clone(),
                pid: std::process::id(),
                uptime_secs: shared.started.elapsed().as_secs_f64(),
                requests_total: snap.requests_total,
                undecodable: snap.undecodable,
                opcodes: snap.opcodes,
                paths: snap.paths,
                usage: served.fs().usage(),
                bypass_clients: bypass_stats.as_ref().map_or(0, |b| b.clients.load(Ordering::Relaxed)),
                bypass_requests: bypass_stats.as_ref().map_or(0, |b| b.requests.load(Ordering::Relaxed)),
                bypass_tables: bypass_stats.as_ref().map_or(0, |b| b.tables.load(Ordering::Relaxed)),
            };
            serde_json::to_string(&report).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
        };
        ControlServer::start_with(&mp, stats, top)
    };
    let control = match control {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("control socket unavailable, `efuse stats` will not work: {e}");
            None
        }
    };
    let metrics = opts.observe.metrics.and_then(|addr| {
        crate::metrics::MetricsServer::start(addr, observability.clone())
            .map_err(|e| tracing::warn!("--metrics {addr}: cannot serve metrics: {e}"))
            .ok()
    });
    tracing::info!(mountpoint = %mp.display(), privileged, "mounted");
    ready(Ok(()));

    let signal_mp: PathBuf = mp.clone();
    let _ = std::thread::Builder::new().name("efuse-signals".into()).spawn(move || loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: waits for one of the blocked signals in `set`.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        tracing::info!(signal = sig, "unmounting on signal");
        if let Err(e) = mount::unmount(&signal_mp, true) {
            tracing::warn!("unmount on signal failed: {e}");
        }
    });

    running.join();
    // Bypass clients give back what they held before the file system ends.
    if let Some(b) = bypass {
        b.stop();
    }
    if !session.shared().destroyed.load(Ordering::Acquire) {
        session.fs().destroy();
    }
    // Workers may also stop on an error while the mount is still there.
    cleanup(&mp, connection);
    drop(control);
    drop(metrics);
    observability.kernel.unload(); // detaches the BPF programs
    tracing::info!("session ended");
    Ok(())
}

/// Removes our mount if it is still present: abort the connection so nothing
/// waits on this daemon, then detach it.
fn cleanup(mp: &Path, connection: Option<u32>) {
    let Some(m) = mount::find_mount(mp) else { return };
    if m.connection() != connection || connection.is_none() {
        return; // not ours (someone mounted over it, or we never saw ours)
    }
    if let Some(c) = connection {
        let _ = mount::abort_connection(c);
    }
    if let Err(e) = mount::unmount(mp, true) {
        tracing::warn!("could not detach {}: {e}", mp.display());
    }
}

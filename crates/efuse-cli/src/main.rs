//! `efuse`: mount the efuse file systems, unmount them, read their counters.
//!
//! Exit codes: 0 ok, 1 runtime failure, 2 usage error. Errors are one line.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

mod top;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use efuse::daemon::{serve, ServeOptions};
use efuse::mount::{self, MountOptions};
use efuse::policy::{PassthroughMode, PathPolicy};
use efuse::session::SessionConfig;
use efuse::stats::StatsReport;
use efuse::transport::{TransportConfig, TransportKind};
use efuse::{CacheMode, CachePolicy, Features};
use efuse_fs::memfs::{MemFs, MemFsConfig};
use efuse_fs::stackfs::{StackFs, StackFsConfig};

/// Environment variable through which a background daemon reports readiness.
const READY_FD_ENV: &str = "EFUSE_READY_FD";
/// How long `efuse mount` waits for the daemon to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser)]
#[command(name = "efuse", version, about = "Fast user-space file systems: mount, unmount, observe.")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount a file system; returns once the mount is live (unless -f).
    #[command(subcommand)]
    Mount(MountCmd),
    /// Unmount; also cleans up after a daemon that died (aborts its connection).
    Umount {
        /// The mount point.
        mountpoint: PathBuf,
    },
    /// Per-opcode request and error counts since mount, from the daemon.
    Stats {
        /// The mount point.
        mountpoint: PathBuf,
        /// Print JSON (`transport`, `threads`, `requests_total`, `opcodes`, `paths`).
        #[arg(long)]
        json: bool,
    },
    /// Run a command with the bypass client library preloaded (it and its
    /// children): file calls under efuse mounts that offer the bypass go to
    /// the daemon through shared memory instead of through the kernel.
    #[command(after_help = "Environment:\n  \
        EFUSE_BYPASS=off         the library does nothing (every call goes to the kernel)\n  \
        EFUSE_BYPASS_LOG=PATH    one line per decision (or `stderr`)\n  \
        EFUSE_BYPASS_AFTER=N     a process connects at its (N+1)th path call on a mount (default 8; 0: first)\n  \
        EFUSE_PRELOAD=PATH       the library to preload (default: beside this binary)")]
    Run {
        /// Bypass only this mount (repeatable); default: every efuse mount
        /// whose daemon offers the bypass.
        #[arg(long = "mount", value_name = "MNT")]
        mounts: Vec<PathBuf>,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true, value_name = "CMD")]
        cmd: Vec<OsString>,
    },
    /// Benchmark suite: efuse beside ext4 and libfuse on the same disk, one run.
    Bench(efuse_bench::BenchArgs),
    /// One timed loop of `efuse bench`, in a process of its own (internal).
    #[command(name = "__bench-worker", hide = true)]
    BenchWorker {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Kernel-side view (eBPF): per-opcode requests/s, errors, p50/p99 latency,
    /// beside the daemon's counters; refreshed every second (q quits).
    Top {
        /// The mount point.
        mountpoint: PathBuf,
        /// Print one snapshot and exit.
        #[arg(long)]
        once: bool,
        /// With --once: print JSON (`source`, `requests_total`, `opcodes`, `context_switches`).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum MountCmd {
    /// An in-memory file system with a fixed capacity.
    Memfs {
        /// Where to mount (an existing directory).
        mountpoint: PathBuf,
        /// Capacity for file data, e.g. 512M, 4G (ENOSPC when full).
        #[arg(long, value_parser = parse_size, default_value = "1G")]
        size: u64,
        #[command(flatten)]
        common: CommonMount,
    },
    /// A pass-through of BACKING_DIR, served at MOUNTPOINT.
    Stackfs {
        /// The directory whose contents the mount shows.
        backing: PathBuf,
        /// Where to mount (an existing directory).
        mountpoint: PathBuf,
        /// Most O_PATH descriptors kept open for inodes; beyond it inodes are
        /// reopened from file handles (default: derived from RLIMIT_NOFILE).
        #[arg(long, value_name = "N")]
        max_open_handles: Option<usize>,
        /// Most descriptors kept open for open files and directories, however
        /// many the clients hold; beyond it they are reopened on demand
        /// (default: a quarter of RLIMIT_NOFILE).
        #[arg(long, value_name = "N")]
        max_open_files: Option<usize>,
        #[command(flatten)]
        common: CommonMount,
    },
}

/// `--locks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LockPlace {
    Kernel,
    Daemon,
}

/// `--profile`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Profile {
    /// Every acceleration the file system can keep exact.
    Default,
    /// Plain FUSE, as libfuse: 1 s TTLs, no keep_cache, no writeback cache,
    /// no readdirplus, no passthrough. The honest baseline.
    Plain,
}

#[derive(Args)]
struct CommonMount {
    /// default: every acceleration; plain: FUSE as libfuse does it (the baseline).
    #[arg(long, value_enum, default_value = "default")]
    profile: Profile,
    /// Name/attribute/data caching: auto (long and exact where changes are
    /// seen), none (TTL 0), always (long, nothing changes behind the mount).
    #[arg(long, value_name = "MODE", value_parser = parse_cache)]
    cache: Option<CacheMode>,
    /// Kernel passthrough of file I/O: auto (adaptive per open), on, off.
    #[arg(long, value_name = "MODE", value_parser = parse_passthrough)]
    passthrough: Option<PassthroughMode>,
    /// Use the kernel's writeback cache for buffered writes (turns passthrough off).
    #[arg(long)]
    writeback_cache: bool,
    /// Stateless opens: the kernel sends no OPEN/RELEASE (turns passthrough off).
    #[arg(long)]
    no_open: bool,
    /// Send OPENDIR/RELEASEDIR for every directory listing (default profile:
    /// directories are listed without them where listings are cached).
    #[arg(long)]
    open_dirs: bool,
    /// Where POSIX and flock locks live: kernel (default profile; no FLUSH on
    /// close) or daemon (plain profile; SETLK/SETLKW/GETLK reach the daemon).
    #[arg(long, value_enum, value_name = "WHERE")]
    locks: Option<LockPlace>,
    /// Worker threads, each with its own /dev/fuse descriptor (default: CPUs).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    /// How requests reach the daemon: auto (io_uring when the kernel offers
    /// it and locks stay in the kernel; the default, but dev with --profile
    /// plain), dev (/dev/fuse workers), uring (FUSE-over-io_uring, or fail).
    #[arg(long, value_name = "KIND", value_parser = parse_transport)]
    transport: Option<TransportKind>,
    /// Threads, each with one ring entry, per online CPU's queue (uring transport; default 8).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    queue_depth: Option<u16>,
    /// Mount options: allow_other, default_permissions, ro, debug, fsname=NAME.
    #[arg(short = 'o', value_name = "OPTS")]
    options: Vec<String>,
    /// Stay in the foreground (logs to stderr) instead of daemonizing.
    #[arg(short = 'f', long)]
    foreground: bool,
    /// eBPF kernel-side counters for `efuse top`: auto (load when root), off.
    #[arg(long, value_name = "MODE", value_parser = parse_bpf, default_value = "auto")]
    bpf: efuse::observe::BpfMode,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (binds only that address).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<std::net::SocketAddr>,
    /// Bypass clients (applications run with the efuse client library):
    /// on accepts them on the mount's bypass socket, off refuses them.
    #[arg(long, value_name = "on|off", value_parser = parse_on_off, default_value = "on", action = clap::ArgAction::Set)]
    bypass: bool,
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("{other:?}: expected on or off")),
    }
}

fn parse_bpf(s: &str) -> Result<efuse::observe::BpfMode, String> {
    s.parse()
}

fn parse_transport(s: &str) -> Result<TransportKind, String> {
    s.parse()
}

fn parse_cache(s: &str) -> Result<CacheMode, String> {
    s.parse()
}

fn parse_passthrough(s: &str) -> Result<PassthroughMode, String> {
    s.parse()
}

/// Kernel features for the chosen profile and flags.
fn features(common: &CommonMount) -> Features {
    let mut f = match common.profile {
        Profile::Default => Features::DEFAULT,
        Profile::Plain => Features::PLAIN,
    };
    if common.passthrough == Some(PassthroughMode::Off) {
        f.passthrough = false;
    } else if common.passthrough.is_some() {
        f.passthrough = true;
    }
    if common.writeback_cache {
        f.writeback_cache = true;
        f.passthrough = false;
    }
    if common.no_open {
        f.no_open = true;
        f.passthrough = false;
    }
    if common.open_dirs {
        f.no_opendir = false;
    }
    if let Some(l) = common.locks {
        f.daemon_locks = l == LockPlace::Daemon;
    }
    f
}

/// memfs's cache policy: everything passes through the mount, so long TTLs are exact.
fn memfs_cache(common: &CommonMount) -> CachePolicy {
    match (common.profile, common.cache) {
        (_, Some(CacheMode::None)) => CachePolicy::NONE,
        (_, Some(CacheMode::Auto | CacheMode::Always)) => CachePolicy::EXACT,
        (Profile::Plain, None) => CachePolicy::SHORT,
        (Profile::Default, None) => CachePolicy::EXACT,
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size (examples: 1073741824, 512M, 4G)"))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return Err(format!("unknown unit in '{s}' (use K, M, G or T)")),
    };
    let v = n.checked_mul(mult).ok_or_else(|| format!("'{s}' is too large"))?;
    if v < 1 << 20 {
        return Err(format!("'{s}' is smaller than the minimum of 1M"));
    }
    Ok(v)
}

fn init_logging(debug: bool) {
    let default = if debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("EFUSE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // A background daemon's stderr is its log file: colour only on a terminal.
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}

fn main() -> ExitCode {
    // A closed pipe ends the command quietly, as it does other tools
    // (`efuse stats M | head -1`); the daemon ignores SIGPIPE itself.
    // SAFETY: restores the default disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = match cli.cmd {
        Cmd::Mount(m) => cmd_mount(m),
        Cmd::Umount { mountpoint } => cmd_umount(&mountpoint),
        Cmd::Stats { mountpoint, json } => cmd_stats(&mountpoint, json),
        Cmd::Top { mountpoint, once, json } => top::run(&mountpoint, once, json),
        Cmd::Run { mounts, cmd } => cmd_run(&mounts, &cmd),
        Cmd::Bench(args) => std::env::current_exe().map_err(Into::into).and_then(|exe| efuse_bench::run(args, &exe)),
        Cmd::BenchWorker { args } => efuse_bench::worker::main(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("efuse: error: {e:#}");
            ExitCode::from(if e.is::<UsageError>() { 2 } else { 1 })
        }
    }
}

/// A mistake in the command line that clap cannot see (an `-o` option): exit 2.
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Mount options shared by all file systems, from `-o` lists.
fn mount_options(common: &CommonMount, fsname: &str) -> Result<(MountOptions, bool)> {
    let mut opts = MountOptions { fsname: fsname.to_string(), subtype: "efuse".into(), ..Default::default() };
    let mut debug = false;
    for list in &common.options {
        debug |= opts.parse_list(list).map_err(|e| UsageError(e.to_string()))?;
    }
    if opts.allow_other && !opts.default_permissions {
        // Other users' requests must be checked against the file's mode; the
        // kernel does that exactly and at no cost with default_permissions.
        opts.default_permissions = true;
    }
    Ok((opts, debug))
}

fn cmd_mount(m: MountCmd) -> Result<()> {
    let (common, mountpoint) = match &m {
        MountCmd::Memfs { common, mountpoint, .. } => (common, mountpoint),
        MountCmd::Stackfs { common, mountpoint, .. } => (common, mountpoint),
    };
    let fsname = match &m {
        MountCmd::Memfs { .. } => "memfs".to_string(),
        MountCmd::Stackfs { backing, .. } => {
            let b =
                std::fs::canonicalize(backing).with_context(|| format!("backing directory {}", backing.display()))?;
            if !b.is_dir() {
                bail!("backing directory {}: not a directory", b.display());
            }
            b.display().to_string().replace(',', "_")
        }
    };
    let (mount_opts, debug) = mount_options(common, &fsname)?;
    let mp = mount::absolute_mountpoint(mountpoint).with_context(|| format!("mount point {}", mountpoint.display()))?;
    if !mp.is_dir() {
        bail!("mount point {}: not an existing directory", mp.display());
    }
    if !common.foreground {
        return spawn_daemon(&mp);
    }
    init_logging(debug);
    let ready_fd = std::env::var(READY_FD_ENV).ok().and_then(|v| v.parse::<i32>().ok());
    std::env::remove_var(READY_FD_ENV);
    let ready = move |r: Result<(), String>| {
        if let Some(fd) = ready_fd {
            // SAFETY: the parent passed us this pipe's write end; we own it now.
            let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
            let msg = match &r {
                Ok(()) => "ok\n".to_string(),
                Err(e) => format!("error: {e}\n"),
            };
            let _ = f.write_all(msg.as_bytes());
        }
    };
    let kind = common.transport.unwrap_or(match common.profile {
        Profile::Plain => TransportKind::Dev,
        Profile::Default => TransportKind::Auto,
    });
    let mut transport = TransportConfig { kind, ..TransportConfig::default() };
    if let Some(n) = common.threads {
        transport.threads = n as usize;
    }
    if let Some(d) = common.queue_depth {
        transport.queue_depth = d as usize;
    }
    let session = SessionConfig { debug, fs_name: String::new(), features: features(common), ..Default::default() };
    let observe = efuse::observe::ObserveOptions { bpf: common.bpf, metrics: common.metrics };
    let bypass = common.bypass;
    let opts = |name: &str| ServeOptions {
        mount: mount_opts.clone(),
        session: SessionConfig { fs_name: name.into(), ..session.clone() },
        transport,
        observe: observe.clone(),
        bypass,
    };
    match m {
        MountCmd::Memfs { size, ref common, .. } => {
            let paths = PathPolicy {
                mode: PassthroughMode::Off,
                passthrough_granted: false,
                adaptive: common.profile == Profile::Default,
            };
            let fs =
                MemFs::new(MemFsConfig { capacity: size, cache: memfs_cache(common), paths, ..Default::default() });
            serve(fs, &mp, opts("memfs"), ready)?;
        }
        MountCmd::Stackfs { backing, max_open_handles, max_open_files, ref common, .. } => {
            let mut cfg = StackFsConfig::new(backing);
            cfg.max_open_handles = max_open_handles;
            cfg.max_open_files = max_open_files;
            cfg.plain = common.profile == Profile::Plain;
            cfg.cache = common.cache.unwrap_or(CacheMode::Auto);
            cfg.passthrough = match (common.profile, common.passthrough) {
                (_, Some(m)) => m,
                (Profile::Plain, None) => PassthroughMode::Off,
                (Profile::Default, None) => PassthroughMode::Auto,
            };
            let fs = match StackFs::new(cfg) {
                Ok(fs) => fs,
                Err(e) => {
                    ready(Err(e.to_string()));
                    return Err(e.into());
                }
            };
            serve(fs, &mp, opts("stackfs"), ready)?;
        }
    }
    Ok(())
}

/// Starts this same command in the foreground as a background process and
/// waits until it reports that the mount is live.
fn spawn_daemon(mp: &Path) -> Result<()> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors; the read end is close-on-exec.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), 0) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors we own.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on our own descriptor.
    unsafe { libc::fcntl(rd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    efuse::control::ensure_runtime_dir().context("runtime directory")?;
    let log_path = efuse::control::log_path(mp);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("log file {}", log_path.display()))?;
    let exe = std::env::current_exe().context("locating the efuse binary")?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut cmd = Command::new(exe);
    cmd.args(&args)
        .arg("--foreground")
        .env(READY_FD_ENV, wr.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; the daemon leaves our session so
    // a terminal hangup does not reach it.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the daemon")?;
    drop(wr);
    let mut reader = std::fs::File::from(rd);
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut msg = String::new();
    let mut buf = [0u8; 512];
    loop {
        let mut pfd = libc::pollfd { fd: reader.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("the daemon did not report ready within {}s; see {}", READY_TIMEOUT.as_secs(), log_path.display());
        }
        // SAFETY: poll one live pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32) };
        if rc <= 0 {
            continue;
        }
        let n = reader.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        msg.push_str(&String::from_utf8_lossy(&buf[..n]));
        if msg.ends_with('\n') {
            break;
        }
    }
    let msg = msg.trim();
    if msg == "ok" {
        return Ok(());
    }
    if let Some(e) = msg.strip_prefix("error: ") {
        let _ = child.wait();
        return Err(anyhow!("{e}"));
    }
    let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
    Err(anyhow!("the daemon exited before the mount was ready ({status}); see {}", log_path.display()))
}

fn daemon_pid(mp: &Path) -> Option<i32> {
    efuse::control::query(mp, "pid").ok()?.trim().parse().ok()
}

/// Whether `pid` still runs (an exited daemon may linger as a zombie until
/// its new parent reaps it: that counts as gone).
fn process_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the parenthesised command name.
    match stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()) {
        Some('Z') | Some('X') | None => false,
        Some(_) => true,
    }
}

fn cmd_umount(mountpoint: &Path) -> Result<()> {
    init_logging(false);
    let mp = mount::absolute_mountpoint(mountpoint).with_context(|| format!("mount point {}", mountpoint.display()))?;
    let m = mount::find_mount(&mp).ok_or_else(|| anyhow!("{} is not mounted", mp.display()))?;
    if !m.fstype.starts_with("fuse") {
        bail!("{} is a {} mount, not FUSE; efuse leaves it alone", mp.display(), m.fstype);
    }
    match daemon_pid(&mp) {
        Some(pid) => {
            mount::unmount(&mp, false).with_context(|| format!("unmounting {}", mp.display()))?;
            // Give the daemon a moment to finish; a lazily detached mount may
            // keep it serving open files, which is fine.
            let deadline = Instant::now() + Duration::from_secs(5);
            while process_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        None => {
            // No daemon answers: abort the connection so nothing waits on it,
            // then detach the mount.
            if let Some(c) = m.connection() {
                if let Err(e) = mount::abort_connection(c) {
                    // Detaching still frees the mount point; whatever waits
                    // on the dead daemon keeps waiting until it exits.
                    eprintln!(
                        "efuse: warning: no daemon answers for {}, and its FUSE connection cannot be aborted: {e}; detaching it anyway (lazy unmount)",
                        mp.display()
                    );
                }
            }
            if let Err(e) = mount::unmount(&mp, true) {
                // A daemon that was alive after all unmounts itself once its
                // connection is aborted, and may have been first.
                if mount::find_mount(&mp).is_some_and(|now| now.connection() == m.connection()) {
                    return Err(anyhow!("detaching {}: {e}", mp.display()));
                }
            }
            // The dead daemon's control socket, if it left one.
            efuse::control::remove_stale_sockets(&mp);
        }
    }
    Ok(())
}

/// The bypass client library: EFUSE_PRELOAD, or `libefuse_preload.so`
/// beside the efuse binary (both are built by `cargo build --release`).
fn preload_library() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("EFUSE_PRELOAD") {
        let p = PathBuf::from(p);
        if !p.is_absolute() || !p.is_file() {
            bail!("EFUSE_PRELOAD={} is not an absolute path to a file", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating the efuse binary")?;
    let lib = exe.with_file_name("libefuse_preload.so");
    if !lib.is_file() {
        bail!(
            "the bypass client library {} is missing (build it with `cargo build --release`, or set EFUSE_PRELOAD)",
            lib.display()
        );
    }
    Ok(lib)
}

/// `efuse run [--mount MNT]... -- CMD ARGS`: replaces this process with CMD
/// (its exit code is CMD's) with the library preloaded.
fn cmd_run(mounts: &[PathBuf], cmd: &[OsString]) -> Result<()> {
    let lib = preload_library()?;
    let mut points = Vec::new();
    for m in mounts {
        let mp = mount::absolute_mountpoint(m).with_context(|| format!("mount point {}", m.display()))?;
        match mount::find_mount(&mp) {
            None => return Err(UsageError(format!("--mount {}: not a mount point", mp.display())).into()),
            Some(i) if !i.fstype.starts_with("fuse") => {
                return Err(UsageError(format!("--mount {}: a {} mount, not efuse", mp.display(), i.fstype)).into())
            }
            Some(_) => points.push(mp.into_os_string()),
        }
    }
    let (prog, args) = cmd.split_first().ok_or_else(|| UsageError("efuse run: no command given".into()))?;
    let mut preload = lib.into_os_string();
    if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|v| !v.is_empty()) {
        preload.push(":");
        preload.push(old);
    }
    let mut c = Command::new(prog);
    c.args(args).env("LD_PRELOAD", preload);
    if !points.is_empty() {
        c.env("EFUSE_BYPASS_MOUNTS", points.join(std::ffi::OsStr::new(":")));
    }
    let err = c.exec();
    if err.kind() == std::io::ErrorKind::NotFound {
        bail!("efuse run: {}: command not found", Path::new(prog).display());
    }
    Err(anyhow!("efuse run: {}: {err}", Path::new(prog).display()))
}

fn cmd_stats(mountpoint: &Path, json: bool) -> Result<()> {
    let mp = mount::absolute_mountpoint(mountpoint).with_context(|| format!("mount point {}", mountpoint.display()))?;
    let text = match efuse::control::query(&mp, "stats") {
        Ok(t) => t,
        Err(e) => match mount::find_mount(&mp) {
            None => bail!("{} is not mounted", mp.display()),
            Some(m) if !m.fstype.starts_with("fuse") => bail!("{} is a {} mount, not efuse", mp.display(), m.fstype),
            Some(_) => bail!("{e}; is the daemon alive? (`efuse umount {}` cleans up a dead one)", mp.display()),
        },
    };
    let report: StatsReport = serde_json::from_str(&text).with_context(|| format!("daemon answered: {text}"))?;
    if json {
        println!("{text}");
        return Ok(());
    }
    println!(
        "{} on {} (pid {}, up {:.1}s, transport {}, {} threads)",
        report.fs, report.mountpoint, report.pid, report.uptime_secs, report.transport, report.threads
    );
    println!("{:<20} {:>12} {:>10}", "OPCODE", "REQUESTS", "ERRORS");
    let mut ops: Vec<_> = report.opcodes.iter().collect();
    ops.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
    for (name, c) in ops {
        println!("{:<20} {:>12} {:>10}", name, c.count, c.errors);
    }
    println!("{:<20} {:>12}", "TOTAL", report.requests_total);
    println!(
        "opens: {} cached, {} direct, {} passthrough; undecodable requests: {}",
        report.paths.cached, report.paths.direct, report.paths.passthrough, report.undecodable
    );
    let u = report.usage;
    let held: Vec<String> = [(u.inodes, "inodes"), (u.data_bytes, "bytes of data"), (u.descriptors, "descriptors")]
        .iter()
        .filter_map(|(n, what)| n.map(|n| format!("{n} {what}")))
        .collect();
    if !held.is_empty() {
        println!("holds: {}", held.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert!(parse_size("10").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn allow_other_implies_default_permissions() {
        let common = CommonMount {
            profile: Profile::Default,
            cache: None,
            passthrough: None,
            writeback_cache: false,
            no_open: false,
            open_dirs: false,
            locks: None,
            threads: None,
            transport: None,
            queue_depth: None,
            options: vec!["allow_other".into()],
            foreground: true,
            bpf: efuse::observe::BpfMode::Auto,
            metrics: None,
            bypass: true,
        };
        let (o, debug) = mount_options(&common, "x").unwrap();
        assert!(o.allow_other && o.default_permissions && !debug);
    }
}

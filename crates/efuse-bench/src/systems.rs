//! The file systems the bench puts side by side, and mounting them.
//!
//! Every mount the bench makes is recorded in [`Mounts`]; whatever happens
//! (a failed step, an error, a panic, Ctrl-C), everything recorded there is
//! unmounted before the bench returns, by force if a daemon does not answer.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::exec;

/// Where libfuse's example sources are (Debian's libfuse3-dev).
pub const LIBFUSE_EXAMPLES: &str = "/usr/share/doc/libfuse3-dev/examples";

/// One system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum System {
    /// The work directory itself: the limit.
    Ext4,
    /// libfuse's passthrough_ll with its default options (cache=auto: 1 s TTLs).
    Libfuse,
    /// passthrough_ll with `-o cache=always` (1-day TTLs, keep_cache): its best case.
    LibfuseCache,
    /// libfuse's passthrough_hp (3.17+, given with `--libfuse-hp`) with
    /// kernel passthrough, over /dev/fuse: libfuse's strongest pass-through.
    LibfuseHp,
    /// The same over FUSE-over-io_uring (`-o io_uring`).
    LibfuseHpUring,
    /// `efuse mount stackfs --profile plain`: plain FUSE.
    EfusePlain,
    /// `efuse mount stackfs`: the default profile (transport auto: io_uring
    /// when the kernel offers it).
    Efuse,
    /// `efuse mount stackfs --transport dev`: the default profile on
    /// /dev/fuse workers, to set the transports side by side.
    EfuseDev,
    /// `efuse mount stackfs --passthrough off` (on request, `--systems`):
    /// the adaptive cached/direct choice without passthrough.
    EfuseNoPassthrough,
    /// `efuse mount stackfs --no-open` (on request): stateless opens.
    EfuseNoOpen,
    /// `efuse mount memfs`: in memory (datasets are copied in).
    Memfs,
    /// `efuse mount stackfs` with every program of the workload run under
    /// `efuse run`: the kernel bypass (preloaded client library).
    EfuseBypass,
    /// `efuse mount memfs` under `efuse run`.
    MemfsBypass,
}

impl System {
    pub const ALL: [System; 9] = [
        System::Ext4,
        System::Libfuse,
        System::LibfuseCache,
        System::LibfuseHp,
        System::LibfuseHpUring,
        System::EfusePlain,
        System::Efuse,
        System::EfuseDev,
        System::Memfs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            System::Ext4 => "ext4",
            System::Libfuse => "libfuse",
            System::LibfuseCache => "libfuse-cache",
            System::LibfuseHp => "libfuse-hp",
            System::LibfuseHpUring => "libfuse-hp-uring",
            System::EfusePlain => "efuse-plain",
            System::Efuse => "efuse",
            System::EfuseDev => "efuse-dev",
            System::EfuseNoPassthrough => "efuse-nopt",
            System::EfuseNoOpen => "efuse-noopen",
            System::Memfs => "memfs",
            System::EfuseBypass => "efuse-bypass",
            System::MemfsBypass => "memfs-bypass",
        }
    }

    /// Systems run only when named with `--systems`.
    pub const ON_REQUEST: [System; 4] =
        [System::EfuseNoPassthrough, System::EfuseNoOpen, System::EfuseBypass, System::MemfsBypass];

    pub fn parse(s: &str) -> Option<System> {
        System::ALL.into_iter().chain(System::ON_REQUEST).find(|x| x.name() == s)
    }

    pub fn is_fuse(self) -> bool {
        self != System::Ext4
    }

    /// Whether `efuse stats` can be read from it.
    pub fn is_efuse(self) -> bool {
        matches!(
            self,
            System::EfusePlain
                | System::Efuse
                | System::EfuseDev
                | System::EfuseNoPassthrough
                | System::EfuseNoOpen
                | System::Memfs
                | System::EfuseBypass
                | System::MemfsBypass
        )
    }

    /// Whether it shows the shared backing directory (memfs does not).
    pub fn shows_backing(self) -> bool {
        !matches!(self, System::Memfs | System::MemfsBypass)
    }

    /// What the programs of a workload run under on this system, mounted
    /// at `mp`: `efuse run --mount MP --` for the bypass systems.
    pub fn wrapper(self, efuse_exe: &Path, mp: &Path) -> Vec<std::ffi::OsString> {
        match self {
            System::EfuseBypass | System::MemfsBypass => {
                vec![efuse_exe.into(), "run".into(), "--mount".into(), mp.into(), "--".into()]
            }
            _ => Vec::new(),
        }
    }

    /// Whether it is libfuse's passthrough_hp (needs `--libfuse-hp`).
    pub fn is_libfuse_hp(self) -> bool {
        matches!(self, System::LibfuseHp | System::LibfuseHpUring)
    }

    /// Whether its daemon is a libfuse example run in the foreground as
    /// the bench's child.
    pub fn is_libfuse(self) -> bool {
        matches!(self, System::Libfuse | System::LibfuseCache | System::LibfuseHp | System::LibfuseHpUring)
    }
}

/// Options given to passthrough_hp besides the mount's: its strongest
/// configuration (kernel passthrough and its default day-long caching are on
/// unless told otherwise; see bench/README.md).
pub const LIBFUSE_HP_ARGS: [&str; 2] = ["--foreground", "--clone-fd"];

/// What `passthrough_hp --help` must list for the bench to use it.
const LIBFUSE_HP_NEEDS: [&str; 3] = ["--nopassthrough", "--clone-fd", "--foreground"];

/// What a passthrough_hp binary offers, from its `--help`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HpFeatures {
    /// libfuse's `-o io_uring` (FUSE-over-io_uring, libfuse 3.18+).
    pub io_uring: bool,
}

/// Checks `passthrough_hp --help` output: the options the bench passes
/// must be there.
pub fn parse_hp_help(help: &str) -> Result<HpFeatures> {
    let missing: Vec<&str> = LIBFUSE_HP_NEEDS.iter().copied().filter(|o| !help.contains(o)).collect();
    if !missing.is_empty() {
        bail!(
            "its --help lists no {}: not libfuse's passthrough_hp (example/passthrough_hp.cc, libfuse 3.17 or later)",
            missing.join(", ")
        );
    }
    let io_uring = help.lines().any(|l| l.split_whitespace().take(2).eq(["-o", "io_uring"]));
    Ok(HpFeatures { io_uring })
}

/// Checks that `exe` is a runnable passthrough_hp and says what it offers.
pub fn probe_libfuse_hp(exe: &Path) -> Result<HpFeatures> {
    let meta = std::fs::metadata(exe).with_context(|| format!("--libfuse-hp {}", exe.display()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        bail!("--libfuse-hp {}: not an executable file", exe.display());
    }
    let out = exec::run(Command::new(exe).arg("--help"), Duration::from_secs(15))
        .with_context(|| format!("--libfuse-hp {}: `--help` failed", exe.display()))?;
    parse_hp_help(&out.stdout).with_context(|| format!("--libfuse-hp {}", exe.display()))
}

/// The libfuse a binary is linked against, from ldd: "PATH (libfuse X.Y.Z)".
pub fn linked_libfuse(exe: &Path) -> String {
    let Ok(out) = exec::run(Command::new("ldd").arg(exe), Duration::from_secs(15)) else {
        return "unknown (ldd failed)".into();
    };
    let Some(lib) = out
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("libfuse3.so"))
        .and_then(|l| l.split("=>").nth(1))
        .and_then(|r| r.split_whitespace().next())
    else {
        return "unknown (ldd shows no libfuse3)".into();
    };
    let real = std::fs::canonicalize(lib).unwrap_or_else(|_| PathBuf::from(lib));
    let name = real.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match name.strip_prefix("libfuse3.so.") {
        Some(v) if v.contains('.') => format!("libfuse {v} ({})", real.display()),
        _ => real.display().to_string(),
    }
}

/// What a libfuse daemon's FUSE_INIT report (`FUSE_INIT_STATUS=1`, libfuse
/// 3.19+) says was negotiated; None when the log holds no report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitStatus {
    pub passthrough: bool,
    /// "on", or why not ("off:not_offered", "off:start_failed:...").
    pub io_uring: String,
}

pub fn parse_init_status(log: &str) -> Option<InitStatus> {
    let lines: Vec<&str> = log.lines().filter_map(|l| l.trim().strip_prefix("FUSE_INIT: ")).collect();
    let uring = lines.iter().find_map(|l| l.strip_prefix("io_uring="))?;
    Some(InitStatus {
        passthrough: lines.iter().any(|l| l.trim() == "FUSE_CAP_PASSTHROUGH"),
        io_uring: uring.trim().to_string(),
    })
}

/// How to mount the systems: the programs and directories involved.
pub struct MountPlan {
    pub efuse_exe: PathBuf,
    /// The built passthrough_ll, or why it could not be built.
    pub libfuse_exe: Result<PathBuf, String>,
    /// passthrough_hp as given with `--libfuse-hp`, or why there is none.
    pub libfuse_hp_exe: Result<PathBuf, String>,
    pub backing: PathBuf,
    pub mnt_root: PathBuf,
    pub logs: PathBuf,
    pub memfs_size: String,
    /// How long a mount may take ([`MOUNT_TIMEOUT`]; shorter in tests).
    pub mount_timeout: Duration,
}

/// Whether a passthrough_hp mount negotiated what its system's name says;
/// Ok carries a line for the report.
fn check_hp_init(s: System, status: Option<InitStatus>) -> Result<String> {
    let Some(st) = status else {
        return Ok(format!(
            "{}: negotiation not verified (this libfuse writes no FUSE_INIT report; 3.19+ does)",
            s.name()
        ));
    };
    if !st.passthrough {
        bail!(
            "{}: passthrough_hp did not negotiate FUSE_PASSTHROUGH (it needs root and Linux 6.9+), so it is not \
             the system its name says",
            s.name()
        );
    }
    if s == System::LibfuseHpUring && st.io_uring != "on" {
        bail!(
            "{}: libfuse did not start FUSE-over-io_uring (FUSE_INIT: io_uring={}); it needs Linux 6.14+ with \
             /sys/module/fuse/parameters/enable_uring = Y",
            s.name(),
            st.io_uring
        );
    }
    Ok(format!("{}: FUSE_INIT negotiated passthrough, io_uring={}", s.name(), st.io_uring))
}

impl MountPlan {
    pub fn mountpoint(&self, s: System) -> PathBuf {
        match s {
            System::Ext4 => self.backing.clone(),
            _ => self.mnt_root.join(s.name()),
        }
    }

    /// The command that mounts `s` (None for ext4), as the report shows it.
    pub fn mount_command(&self, s: System) -> Option<Command> {
        let mp = self.mountpoint(s);
        match s {
            System::Ext4 => None,
            System::Libfuse | System::LibfuseCache => {
                let exe = self.libfuse_exe.clone().unwrap_or_else(|_| PathBuf::from("passthrough_ll"));
                let mut c = Command::new(exe);
                c.arg("-f").arg("-o").arg(format!("source={}", self.backing.display()));
                if s == System::LibfuseCache {
                    c.arg("-o").arg("cache=always");
                }
                c.arg(&mp);
                Some(c)
            }
            System::LibfuseHp | System::LibfuseHpUring => {
                let exe = self.libfuse_hp_exe.clone().unwrap_or_else(|_| PathBuf::from("passthrough_hp"));
                let mut c = Command::new(exe);
                c.args(LIBFUSE_HP_ARGS);
                if s == System::LibfuseHpUring {
                    c.arg("-o").arg("io_uring");
                }
                c.arg(&self.backing).arg(&mp);
                Some(c)
            }
            System::EfusePlain
            | System::Efuse
            | System::EfuseDev
            | System::EfuseNoPassthrough
            | System::EfuseNoOpen
            | System::EfuseBypass => {
                let mut c = Command::new(&self.efuse_exe);
                c.arg("mount").arg("stackfs").arg(&self.backing).arg(&mp);
                if s == System::EfusePlain {
                    c.arg("--profile").arg("plain");
                }
                if s == System::EfuseDev {
                    c.arg("--transport").arg("dev");
                }
                if s == System::EfuseNoPassthrough {
                    c.arg("--passthrough").arg("off");
                }
                if s == System::EfuseNoOpen {
                    c.arg("--no-open");
                }
                Some(c)
            }
            System::Memfs | System::MemfsBypass => {
                let mut c = Command::new(&self.efuse_exe);
                c.arg("mount").arg("memfs").arg(&mp).arg("--size").arg(&self.memfs_size);
                Some(c)
            }
        }
    }
}

/// A live mount of one system.
struct Live {
    system: System,
    mountpoint: PathBuf,
    /// The libfuse daemon (run in the foreground as our child).
    child: Option<Child>,
    /// The daemon's process id (efuse: from `efuse stats`), if known.
    pid: Option<u32>,
}

/// Every mount the bench made and has not yet unmounted.
pub struct Mounts {
    live: Vec<Live>,
    efuse_exe: PathBuf,
    /// What each passthrough_hp mount's FUSE_INIT report said (first mount).
    pub init_notes: Vec<(System, String)>,
}

/// How long a mount may take before it is declared failed.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);
const UMOUNT_TIMEOUT: Duration = Duration::from_secs(30);

impl Mounts {
    pub fn new(efuse_exe: &Path) -> Mounts {
        Mounts { live: Vec::new(), efuse_exe: efuse_exe.to_path_buf(), init_notes: Vec::new() }
    }

    /// Mounts `s` at its mount point; returns the directory the workloads use.
    pub fn mount(&mut self, plan: &MountPlan, s: System) -> Result<PathBuf> {
        let mp = plan.mountpoint(s);
        if !s.is_fuse() {
            return Ok(mp);
        }
        std::fs::create_dir_all(&mp).with_context(|| format!("creating {}", mp.display()))?;
        if efuse::mount::find_mount(&mp).is_some() {
            bail!("{} is already mounted (left over from another run?); unmount it first", mp.display());
        }
        let mut cmd = plan.mount_command(s).ok_or_else(|| anyhow!("no mount command for {}", s.name()))?;
        match s {
            _ if s.is_libfuse() => {
                let exe = if s.is_libfuse_hp() { &plan.libfuse_hp_exe } else { &plan.libfuse_exe };
                let exe = exe.as_ref().map_err(|e| anyhow!("{} unavailable: {e}", s.name()))?;
                if !exe.exists() {
                    bail!("{} does not exist", exe.display());
                }
                let log_path = plan.logs.join(format!("{}.log", s.name()));
                let log =
                    std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
                let line = exec::display(&cmd);
                // The libfuse daemons keep an O_PATH descriptor per inode the
                // kernel knows: a 50,000-entry tree needs more than the usual limit.
                let nofile = nofile_limit();
                // SAFETY: setrlimit is async-signal-safe; it runs in the child
                // between fork and exec and touches nothing else.
                unsafe {
                    cmd.pre_exec(move || {
                        let lim = libc::rlimit { rlim_cur: nofile, rlim_max: nofile };
                        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                            // No CAP_SYS_RESOURCE: the soft limit up to the hard one.
                            let mut cur = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) == 0 {
                                cur.rlim_cur = cur.rlim_max;
                                libc::setrlimit(libc::RLIMIT_NOFILE, &cur);
                            }
                        }
                        Ok(())
                    });
                }
                if s.is_libfuse_hp() {
                    // libfuse 3.19+ then logs what FUSE_INIT negotiated.
                    cmd.env("FUSE_INIT_STATUS", "1");
                }
                // Its own process group: Ctrl-C reaches the bench, which unmounts in order.
                let child = cmd
                    .process_group(0)
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()
                    .with_context(|| format!("starting `{line}`"))?;
                let pid = Some(child.id());
                self.live.push(Live { system: s, mountpoint: mp.clone(), child: Some(child), pid });
                // The foreground daemon mounts, then serves: wait for the mount.
                let deadline = Instant::now() + plan.mount_timeout;
                loop {
                    if efuse::mount::find_mount(&mp).is_some_and(|m| m.fstype.starts_with("fuse")) {
                        break;
                    }
                    let exited =
                        self.live.last_mut().and_then(|l| l.child.as_mut()).and_then(|c| c.try_wait().ok()).flatten();
                    if let Some(st) = exited {
                        self.live.pop();
                        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                        bail!("`{line}` exited ({st}) before mounting: {}", exec::one_line(&log));
                    }
                    if Instant::now() > deadline {
                        self.unmount_last_forced();
                        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                        bail!(
                            "`{line}` did not mount within {}s (killed): {}",
                            plan.mount_timeout.as_secs(),
                            exec::one_line(&log)
                        );
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                // The first request waits for FUSE_INIT: once it is
                // answered the daemon has served, and logged, INIT.
                let conn = efuse::mount::find_mount(&mp).and_then(|m| m.connection());
                let first = exec::guarded(plan.mount_timeout, conn, || {
                    std::fs::metadata(&mp).with_context(|| format!("stat {}", mp.display()))
                });
                if let Err(e) = first {
                    self.unmount_last_forced();
                    return Err(e.context(format!("`{line}` mounted but does not answer")));
                }
                if s.is_libfuse_hp() {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    match check_hp_init(s, parse_init_status(&log)) {
                        Ok(note) => {
                            if !self.init_notes.iter().any(|(x, _)| *x == s) {
                                self.init_notes.push((s, note));
                            }
                        }
                        Err(e) => {
                            let _ = self.unmount(s);
                            return Err(e);
                        }
                    }
                }
            }
            _ => {
                // `efuse mount` returns once the mount is live, daemon in the background.
                let r = exec::run(&mut cmd, plan.mount_timeout);
                if efuse::mount::find_mount(&mp).is_some() {
                    self.live.push(Live { system: s, mountpoint: mp.clone(), child: None, pid: None });
                }
                r?;
                if efuse::mount::find_mount(&mp).is_none() {
                    bail!("`{}` succeeded but {} is not mounted", exec::display(&cmd), mp.display());
                }
                let stats =
                    exec::run(Command::new(&plan.efuse_exe).arg("stats").arg(&mp).arg("--json"), plan.mount_timeout)?;
                let pid = serde_json::from_str::<serde_json::Value>(&stats.stdout)
                    .ok()
                    .and_then(|v| v.get("pid")?.as_u64())
                    .and_then(|p| u32::try_from(p).ok())
                    .ok_or_else(|| anyhow!("`efuse stats {} --json` names no daemon pid", mp.display()))?;
                if let Some(l) = self.live.last_mut() {
                    l.pid = Some(pid);
                }
            }
        }
        Ok(mp)
    }

    /// The process serving `s`'s mount (None for ext4).
    pub fn daemon_pid(&self, s: System) -> Option<u32> {
        self.live.iter().rev().find(|l| l.system == s)?.pid
    }

    /// The FUSE connection number of `s`'s mount, for the watchdog.
    pub fn connection(&self, s: System) -> Option<u32> {
        let l = self.live.iter().rev().find(|l| l.system == s)?;
        efuse::mount::find_mount(&l.mountpoint)?.connection()
    }

    /// Unmounts `s` if it is mounted; forced (connection aborted, lazy
    /// unmount) when the orderly way fails. Errors say what was tried.
    pub fn unmount(&mut self, s: System) -> Result<()> {
        let Some(i) = self.live.iter().rposition(|l| l.system == s) else { return Ok(()) };
        let live = self.live.remove(i);
        unmount_live(live, &self.efuse_exe)
    }

    fn unmount_last_forced(&mut self) {
        if let Some(l) = self.live.pop() {
            force_unmount(l);
        }
    }

    /// Unmounts everything still mounted; returns the errors, if any.
    pub fn unmount_all(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        while let Some(l) = self.live.pop() {
            let name = l.system.name();
            if let Err(e) = unmount_live(l, &self.efuse_exe) {
                errors.push(format!("{name}: {e:#}"));
            }
        }
        errors
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for e in self.unmount_all() {
            eprintln!("efuse bench: cleanup: {e}");
        }
    }
}

fn unmount_live(mut live: Live, efuse_exe: &Path) -> Result<()> {
    let mp = live.mountpoint.clone();
    if efuse::mount::find_mount(&mp).is_none() {
        // Already gone (the daemon unmounted itself): reap a libfuse child.
        force_unmount(live);
        return Ok(());
    }
    let orderly: Result<()> = match live.child.as_mut() {
        Some(child) => {
            // libfuse: unmount, then the foreground daemon exits by itself.
            let r = efuse::mount::unmount(&mp, false).with_context(|| format!("umount {}", mp.display()));
            r.and_then(|()| {
                let st = wait_child(child, Duration::from_secs(10));
                if st.is_none() {
                    bail!("the libfuse daemon did not exit within 10 s of the unmount");
                }
                Ok(())
            })
        }
        None => exec::run(Command::new(efuse_exe).arg("umount").arg(&mp), UMOUNT_TIMEOUT).map(|_| ()),
    };
    match orderly {
        Ok(()) if efuse::mount::find_mount(&mp).is_none() => Ok(()),
        Ok(()) => {
            force_unmount(live);
            Err(anyhow!("{} was still mounted after unmounting; forced", mp.display()))
        }
        Err(e) => {
            force_unmount(live);
            Err(e
                .context(format!("orderly unmount of {} failed; aborted the connection and detached it", mp.display())))
        }
    }
}

/// Aborts the connection, detaches the mount, kills a libfuse child.
fn force_unmount(mut live: Live) {
    if let Some(m) = efuse::mount::find_mount(&live.mountpoint) {
        if let Some(c) = m.connection() {
            let _ = efuse::mount::abort_connection(c);
        }
        let _ = efuse::mount::unmount(&live.mountpoint, true);
    }
    if let Some(child) = live.child.as_mut() {
        if wait_child(child, Duration::from_secs(2)).is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    use wait_timeout::ChildExt;
    child.wait_timeout(timeout).ok().flatten()
}

/// The open-file limit given to passthrough_ll: the kernel's maximum (root may raise it).
pub fn nofile_limit() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(1 << 20)
}

/// The bench's own hard limit on open files.
pub fn nofile_hard() -> u64 {
    let mut cur = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) } == 0 {
        cur.rlim_max
    } else {
        0
    }
}

/// Detaches FUSE mounts under `mnt_root` left by a bench that was killed
/// before it could clean up; returns the mount points it detached.
pub fn clear_stale(mnt_root: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut cleared = Vec::new();
    for m in efuse::mount::parse_mountinfo(&text).into_iter().rev() {
        if m.mountpoint.starts_with(mnt_root) && m.fstype.starts_with("fuse") {
            if let Some(c) = m.connection() {
                let _ = efuse::mount::abort_connection(c);
            }
            if efuse::mount::unmount(&m.mountpoint, true).is_ok() {
                cleared.push(m.mountpoint);
            }
        }
    }
    cleared
}

/// Builds libfuse's passthrough_ll example into `build_dir` from the sources
/// Debian's libfuse3-dev ships (never copied into the repository).
pub fn build_libfuse(build_dir: &Path) -> Result<PathBuf> {
    let src = Path::new(LIBFUSE_EXAMPLES).join("passthrough_ll.c");
    if !src.exists() {
        bail!("{} is missing (apt-get install libfuse3-dev)", src.display());
    }
    std::fs::create_dir_all(build_dir)?;
    let flags = exec::run(Command::new("pkg-config").args(["fuse3", "--cflags", "--libs"]), Duration::from_secs(30))?;
    let exe = build_dir.join("passthrough_ll");
    let mut cc = Command::new("gcc");
    cc.args(["-Wall", "-O2"]).arg(&src).args(flags.stdout.split_whitespace()).arg("-o").arg(&exe);
    exec::run(&mut cc, Duration::from_secs(120))?;
    Ok(exe)
}

/// The libfuse version pkg-config reports.
pub fn libfuse_version() -> String {
    exec::run(Command::new("pkg-config").args(["--modversion", "fuse3"]), Duration::from_secs(10))
        .map(|o| o.stdout.trim().to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// Installs what the bench needs if it is missing; returns what it installed.
pub fn ensure_prerequisites(log: &mut dyn FnMut(String)) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    let have = |prog: &str| {
        exec::run(Command::new("sh").arg("-c").arg(format!("command -v {prog}")), Duration::from_secs(10)).is_ok()
    };
    for (prog, pkg) in [
        ("gcc", "gcc"),
        ("pkg-config", "pkg-config"),
        ("fio", "fio"),
        ("tar", "tar"),
        ("find", "findutils"),
        ("grep", "grep"),
        ("git", "git"),
    ] {
        if !have(prog) {
            missing.push(pkg.to_string());
        }
    }
    let fuse_dev = exec::run(Command::new("pkg-config").args(["--exists", "fuse3"]), Duration::from_secs(10)).is_ok()
        && Path::new(LIBFUSE_EXAMPLES).join("passthrough_ll.c").exists();
    if !fuse_dev {
        missing.push("libfuse3-dev".into());
    }
    if missing.is_empty() {
        return Ok(missing);
    }
    log(format!("installing missing prerequisites: apt-get install -y {}", missing.join(" ")));
    let install = |m: &[String]| {
        let mut c = Command::new("apt-get");
        c.args(["install", "-y", "-q"]).args(m).env("DEBIAN_FRONTEND", "noninteractive");
        exec::run(&mut c, Duration::from_secs(600))
    };
    if install(&missing).is_err() {
        exec::run(Command::new("apt-get").args(["update", "-q"]), Duration::from_secs(600))?;
        install(&missing)?;
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELP_3_19: &str = "Usage: passthrough_hp --help
options:
      --foreground       Run in foreground
      --nocache          Disable attribute all caching
      --nopassthrough    Do not use pass-through mode for read/write
      --clone-fd         use separate fuse device fd for each thread
Fuse lowlevel options:
    -o allow_other         allow access by all users
    -o io_uring            enable io-uring
    -o io_uring_q_depth=<n> io-uring queue depth
";

    #[test]
    fn reads_passthrough_hp_help() {
        assert_eq!(parse_hp_help(HELP_3_19).unwrap(), HpFeatures { io_uring: true });
        let no_uring: String = HELP_3_19.lines().filter(|l| !l.contains("io_uring")).collect::<Vec<_>>().join("\n");
        assert_eq!(parse_hp_help(&no_uring).unwrap(), HpFeatures { io_uring: false });
        let e = parse_hp_help("usage: passthrough_ll [options] <mountpoint>").unwrap_err().to_string();
        assert!(e.contains("not libfuse's passthrough_hp") && e.contains("--nopassthrough"), "{e}");
    }

    #[test]
    fn reads_the_init_report() {
        let log = "fuse: something\nFUSE_INIT: FUSE_CAP_ASYNC_READ\nFUSE_INIT: FUSE_CAP_PASSTHROUGH\n\
                   FUSE_INIT: io_uring=off:not_offered\nFUSE_INIT: max_write=4194304\n";
        let st = parse_init_status(log).unwrap();
        assert_eq!(st, InitStatus { passthrough: true, io_uring: "off:not_offered".into() });
        assert!(check_hp_init(System::LibfuseHp, Some(st.clone())).is_ok());
        let e = check_hp_init(System::LibfuseHpUring, Some(st)).unwrap_err().to_string();
        assert!(e.contains("io_uring=off:not_offered") && e.contains("enable_uring"), "{e}");
        let no_pt = parse_init_status("FUSE_INIT: io_uring=on\n").unwrap();
        assert!(check_hp_init(System::LibfuseHpUring, Some(no_pt)).unwrap_err().to_string().contains("PASSTHROUGH"));
        assert_eq!(parse_init_status("no report here\n"), None);
        assert!(check_hp_init(System::LibfuseHp, None).unwrap().contains("not verified"));
    }

    fn plan(dir: &Path, hp: Result<PathBuf, String>) -> MountPlan {
        MountPlan {
            efuse_exe: PathBuf::from("efuse"),
            libfuse_exe: Err("not built".into()),
            libfuse_hp_exe: hp,
            backing: dir.join("backing"),
            mnt_root: dir.join("mnt"),
            logs: dir.to_path_buf(),
            memfs_size: "1G".into(),
            mount_timeout: Duration::from_secs(1),
        }
    }

    fn script(dir: &Path, body: &str) -> PathBuf {
        let p = dir.join("fake_passthrough_hp");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn the_command_lines_are_as_documented() {
        let d = crate::TestDir::new("cmdline");
        let p = plan(&d.0, Ok(PathBuf::from("/opt/passthrough_hp")));
        let line = |s| exec::display(&p.mount_command(s).unwrap()).replace(&d.0.display().to_string(), "W");
        assert_eq!(line(System::LibfuseHp), "/opt/passthrough_hp --foreground --clone-fd W/backing W/mnt/libfuse-hp");
        assert_eq!(
            line(System::LibfuseHpUring),
            "/opt/passthrough_hp --foreground --clone-fd -o io_uring W/backing W/mnt/libfuse-hp-uring"
        );
    }

    #[test]
    fn a_peer_that_cannot_mount_fails_fast_and_clearly() {
        let d = crate::TestDir::new("peer");
        let mut mounts = Mounts::new(Path::new("efuse"));
        // No binary given.
        let e = mounts.mount(&plan(&d.0, Err("no --libfuse-hp PATH".into())), System::LibfuseHp).unwrap_err();
        assert!(e.to_string().contains("libfuse-hp unavailable: no --libfuse-hp PATH"), "{e}");
        // A binary that is gone.
        let e = mounts.mount(&plan(&d.0, Ok(d.0.join("gone"))), System::LibfuseHp).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        // One that exits: its status and its words.
        let t = Instant::now();
        let exe = script(&d.0, "echo 'fuse: device not found' >&2; exit 3");
        let e = mounts.mount(&plan(&d.0, Ok(exe)), System::LibfuseHp).unwrap_err().to_string();
        assert!(e.contains("before mounting") && e.contains("device not found"), "{e}");
        // One that never mounts: killed at the time limit.
        let exe = script(&d.0, "echo waiting >&2; exec sleep 60");
        let e = mounts.mount(&plan(&d.0, Ok(exe)), System::LibfuseHpUring).unwrap_err().to_string();
        assert!(e.contains("did not mount within 1s") && e.contains("waiting"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(20), "took {:?}", t.elapsed());
        assert!(mounts.live.is_empty(), "nothing left behind");
        assert!(probe_libfuse_hp(&d.0.join("gone")).is_err());
        let e = probe_libfuse_hp(&script(&d.0, "echo usage: something else")).unwrap_err();
        assert!(format!("{e:#}").contains("not libfuse's passthrough_hp"), "{e:#}");
    }
}

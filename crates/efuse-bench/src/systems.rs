//! The file systems the bench puts side by side, and mounting them.
//!
//! Every mount the bench makes is recorded in [`Mounts`]; whatever happens
//! (a failed step, an error, a panic, Ctrl-C), everything recorded there is
//! unmounted before the bench returns, by force if a daemon does not answer.

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
}

impl System {
    pub const ALL: [System; 7] = [
        System::Ext4,
        System::Libfuse,
        System::LibfuseCache,
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
            System::EfusePlain => "efuse-plain",
            System::Efuse => "efuse",
            System::EfuseDev => "efuse-dev",
            System::EfuseNoPassthrough => "efuse-nopt",
            System::EfuseNoOpen => "efuse-noopen",
            System::Memfs => "memfs",
        }
    }

    /// Systems run only when named with `--systems`.
    pub const ON_REQUEST: [System; 2] = [System::EfuseNoPassthrough, System::EfuseNoOpen];

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
        )
    }

    /// Whether it shows the shared backing directory (memfs does not).
    pub fn shows_backing(self) -> bool {
        self != System::Memfs
    }
}

/// How to mount the systems: the programs and directories involved.
pub struct MountPlan {
    pub efuse_exe: PathBuf,
    /// The built passthrough_ll, or why it could not be built.
    pub libfuse_exe: Result<PathBuf, String>,
    pub backing: PathBuf,
    pub mnt_root: PathBuf,
    pub logs: PathBuf,
    pub memfs_size: String,
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
            System::EfusePlain
            | System::Efuse
            | System::EfuseDev
            | System::EfuseNoPassthrough
            | System::EfuseNoOpen => {
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
            System::Memfs => {
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
}

/// Every mount the bench made and has not yet unmounted.
pub struct Mounts {
    live: Vec<Live>,
    efuse_exe: PathBuf,
}

const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);
const UMOUNT_TIMEOUT: Duration = Duration::from_secs(30);

impl Mounts {
    pub fn new(efuse_exe: &Path) -> Mounts {
        Mounts { live: Vec::new(), efuse_exe: efuse_exe.to_path_buf() }
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
            System::Libfuse | System::LibfuseCache => {
                let exe = plan.libfuse_exe.as_ref().map_err(|e| anyhow!("libfuse passthrough_ll unavailable: {e}"))?;
                if !exe.exists() {
                    bail!("{} does not exist", exe.display());
                }
                let log = plan.logs.join(format!("{}.log", s.name()));
                let log = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
                let line = exec::display(&cmd);
                // passthrough_ll keeps an O_PATH descriptor per inode the kernel
                // knows: a 50,000-entry tree needs more than the usual limit.
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
                // Its own process group: Ctrl-C reaches the bench, which unmounts in order.
                let child = cmd
                    .process_group(0)
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()
                    .with_context(|| format!("starting `{line}`"))?;
                self.live.push(Live { system: s, mountpoint: mp.clone(), child: Some(child) });
                // The foreground daemon mounts, then serves: wait for the mount.
                let deadline = Instant::now() + MOUNT_TIMEOUT;
                loop {
                    if efuse::mount::find_mount(&mp).is_some_and(|m| m.fstype.starts_with("fuse")) {
                        break;
                    }
                    let exited =
                        self.live.last_mut().and_then(|l| l.child.as_mut()).and_then(|c| c.try_wait().ok()).flatten();
                    if let Some(st) = exited {
                        self.live.pop();
                        let log =
                            std::fs::read_to_string(plan.logs.join(format!("{}.log", s.name()))).unwrap_or_default();
                        bail!("`{line}` exited ({st}) before mounting: {}", exec::one_line(&log));
                    }
                    if Instant::now() > deadline {
                        self.unmount_last_forced();
                        bail!("`{line}` did not mount within {}s", MOUNT_TIMEOUT.as_secs());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            _ => {
                // `efuse mount` returns once the mount is live, daemon in the background.
                let r = exec::run(&mut cmd, MOUNT_TIMEOUT);
                if efuse::mount::find_mount(&mp).is_some() {
                    self.live.push(Live { system: s, mountpoint: mp.clone(), child: None });
                }
                r?;
                if efuse::mount::find_mount(&mp).is_none() {
                    bail!("`{}` succeeded but {} is not mounted", exec::display(&cmd), mp.display());
                }
            }
        }
        Ok(mp)
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
                    bail!("passthrough_ll did not exit after the unmount");
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
    for (prog, pkg) in
        [("gcc", "gcc"), ("pkg-config", "pkg-config"), ("fio", "fio"), ("tar", "tar"), ("find", "findutils")]
    {
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

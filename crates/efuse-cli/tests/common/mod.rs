//! Shared harness for the end-to-end tests: skip-or-fail policy for root,
//! /dev/fuse and tools, external commands with hard timeouts, and the
//! `Mounted` guard that mounts an efuse file system beside an ext4 reference
//! directory and never leaves the mount (or its daemon) behind.
//!
//! Every step that touches a mount is bounded in time: a hung FUSE daemon must
//! fail one test, not hang CI. Steps are external commands run with a hard
//! timeout (in-process work, like the differential engine, runs on a watched
//! thread). When a step times out the test panics, and the guard's `Drop`
//! unmounts (aborting the FUSE connection if it has to), which also releases
//! anything still blocked in the mount.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Default bound for one external step.
pub const STEP: Duration = Duration::from_secs(60);
/// Bound for `efuse mount` and `efuse umount`.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);

/// The `efuse` binary cargo built for this test run.
pub fn efuse_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_efuse"))
}

/// True when the `CI` environment variable says we run in CI, where nothing may skip.
pub fn in_ci() -> bool {
    match std::env::var("CI") {
        Ok(v) => !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"),
        Err(_) => false,
    }
}

/// Skips (prints why, returns false) or, under CI, fails the test.
pub fn skip(test: &str, why: &str) -> bool {
    if in_ci() {
        panic!("{test}: {why}, and CI is set: CI must run this test, not skip it");
    }
    // Straight to fd 2: libtest captures print!/eprint!, and a skip must be seen.
    let _ = writeln!(std::io::stderr().lock(), "SKIP {test}: {why}");
    false
}

/// True when we can mount FUSE file systems: root and /dev/fuse (and, when
/// the tests run with the uring transport, FUSE-over-io_uring).
pub fn require_fuse(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !(root && Path::new("/dev/fuse").exists()) {
        return skip(test, "needs root and /dev/fuse (run as root, e.g. in CI)");
    }
    if test_transport().as_deref() == Some("uring") {
        return require_uring(test);
    }
    true
}

/// The transport every mount of this test binary uses (unless a test names
/// one): `EFUSE_TEST_TRANSPORT` (auto, dev, uring) if set, else uring for the
/// `uring` test binary and dev for the others, so both stay covered where
/// `auto` would pick uring.
pub fn test_transport() -> Option<String> {
    match std::env::var("EFUSE_TEST_TRANSPORT") {
        Ok(t) if !t.is_empty() => Some(t),
        _ if env!("CARGO_CRATE_NAME") == "uring" => Some("uring".into()),
        _ => Some("dev".into()),
    }
}

/// Extra mount arguments for every mount of this test binary: the suites are
/// compiled again under other names to run in other profiles
/// (tests/profile_plain.rs, tests/passthrough_off.rs); `EFUSE_TEST_MOUNT_ARGS`
/// (space-separated) adds more to any binary.
pub fn test_mount_args() -> Vec<String> {
    let mut args: Vec<String> = match env!("CARGO_CRATE_NAME") {
        "profile_plain" => vec!["--profile".into(), "plain".into()],
        "passthrough_off" => vec!["--passthrough".into(), "off".into()],
        "writeback" => vec!["--writeback-cache".into()],
        _ => Vec::new(),
    };
    if let Ok(extra) = std::env::var("EFUSE_TEST_MOUNT_ARGS") {
        args.extend(extra.split_whitespace().map(String::from));
    }
    args
}

/// True when the kernel can serve FUSE over io_uring (Linux 6.14+ with
/// CONFIG_FUSE_IO_URING and `enable_uring=Y`; scripts/setup.sh turns it on).
pub fn require_uring(test: &str) -> bool {
    const PARAM: &str = "/sys/module/fuse/parameters/enable_uring";
    match fs::read_to_string(PARAM) {
        Ok(v) if v.trim() == "Y" => true,
        Ok(_) => skip(test, &format!("needs FUSE-over-io_uring: {PARAM} is N (scripts/setup.sh sets it as root)")),
        Err(_) => skip(test, "needs FUSE-over-io_uring: the kernel lacks it (Linux 6.14+, CONFIG_FUSE_IO_URING)"),
    }
}

/// True when every tool is on PATH; otherwise skips (or fails under CI).
pub fn require_tools(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| which(t).is_none()).collect();
    if missing.is_empty() {
        true
    } else {
        skip(test, &format!("needs {} on PATH (CI installs them via .ci/run)", missing.join(", ")))
    }
}

pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| p.is_file())
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A name part unique within this process: the counter, plus the counter's
/// address, since a test binary may compile this module more than once
/// (tests/uring.rs includes other suites, each with its own copy).
fn unique_suffix() -> String {
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    format!("{}-{:x}-{n}", std::process::id(), &UNIQUE as *const AtomicU64 as usize & 0xffff_ffff)
}

/// A fresh, empty directory under the system temp dir (/tmp, ext4 here).
pub fn unique_dir(tag: &str) -> PathBuf {
    let tag: String = tag.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    let dir = std::env::temp_dir().join(format!("efuse-{tag}-{}", unique_suffix()));
    if dir.exists() {
        let _ = fs::remove_dir_all(&dir);
    }
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// A `unique_dir` removed on drop, also when the test panics (ext4 only: never
/// use it for a directory that has a mount inside).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        TempDir(unique_dir(tag))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if fs::remove_dir_all(&self.0).is_err() {
            // Mode 000 directories stop a non-root remove; open them up and retry.
            let _ = Cmd::new("chmod").args(["-R", "u+rwx"]).arg(&self.0).timeout(Duration::from_secs(20)).try_run();
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// What a finished external command produced.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub what: String,
}

impl Output {
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics with the command, status and stderr unless it exited 0.
    pub fn expect_ok(self) -> Output {
        if !self.ok() {
            panic!(
                "command failed ({}): {}\nstdout:\n{}\nstderr:\n{}",
                self.status, self.what, self.stdout, self.stderr
            );
        }
        self
    }
}

/// One external command with a hard timeout.
///
/// stdout and stderr go to files, not pipes: a daemon forked by the command
/// (as `efuse mount` does) inherits them, and must not keep us waiting for EOF.
/// The command runs in its own process group so a timeout kills all of it.
pub struct Cmd {
    program: PathBuf,
    args: Vec<String>,
    cwd: Option<PathBuf>,
    env: Vec<(String, String)>,
    timeout: Duration,
    stdin: Option<Vec<u8>>,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Cmd {
        Cmd {
            program: PathBuf::from(program.as_ref()),
            args: Vec::new(),
            cwd: None,
            env: Vec::new(),
            timeout: STEP,
            stdin: None,
        }
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Cmd {
        self.args.push(a.as_ref().to_string_lossy().into_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for a in args {
            self.args.push(a.as_ref().to_string_lossy().into_owned());
        }
        self
    }

    pub fn cwd(mut self, dir: &Path) -> Cmd {
        self.cwd = Some(dir.to_path_buf());
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Cmd {
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    pub fn timeout(mut self, t: Duration) -> Cmd {
        self.timeout = t;
        self
    }

    pub fn stdin(mut self, data: &[u8]) -> Cmd {
        self.stdin = Some(data.to_vec());
        self
    }

    pub fn describe(&self) -> String {
        let mut s = self.program.display().to_string();
        for a in &self.args {
            s.push(' ');
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
                s.push_str(&format!("{a:?}"));
            } else {
                s.push_str(a);
            }
        }
        if let Some(d) = &self.cwd {
            s.push_str(&format!("   (in {})", d.display()));
        }
        s
    }

    /// Runs the command; Err on spawn failure or timeout (the group is killed).
    pub fn try_run(&self) -> Result<Output, String> {
        let what = self.describe();
        let base = std::env::temp_dir().join(format!("efuse-out-{}", unique_suffix()));
        let out_path = base.with_extension("stdout");
        let err_path = base.with_extension("stderr");
        let out_file = fs::File::create(&out_path).map_err(|e| format!("{}: {e}", out_path.display()))?;
        let err_file = fs::File::create(&err_path).map_err(|e| format!("{}: {e}", err_path.display()))?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args).stdout(out_file).stderr(err_file).process_group(0);
        cmd.stdin(if self.stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        if let Some(d) = &self.cwd {
            cmd.current_dir(d);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let cleanup = || {
            let _ = fs::remove_file(&out_path);
            let _ = fs::remove_file(&err_path);
        };
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                cleanup();
                return Err(format!("cannot run {what}: {e}"));
            }
        };
        if let (Some(data), Some(mut pipe)) = (self.stdin.clone(), child.stdin.take()) {
            // A writer thread: a stuck reader must not block the timeout loop.
            thread::spawn(move || {
                let _ = pipe.write_all(&data);
            });
        }
        let start = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if start.elapsed() >= self.timeout => {
                    kill_group(child.id());
                    let _ = child.wait();
                    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
                    let stdout = fs::read_to_string(&out_path).unwrap_or_default();
                    cleanup();
                    return Err(format!(
                        "TIMEOUT after {:?}: {what}\nstdout:\n{}\nstderr:\n{}",
                        self.timeout,
                        tail(&stdout, 4000),
                        tail(&stderr, 4000)
                    ));
                }
                Ok(None) => {
                    thread::sleep(Duration::from_millis(5).max(start.elapsed() / 50).min(Duration::from_millis(50)))
                }
                Err(e) => {
                    kill_group(child.id());
                    cleanup();
                    return Err(format!("wait for {what}: {e}"));
                }
            }
        };
        let stdout = String::from_utf8_lossy(&fs::read(&out_path).unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&fs::read(&err_path).unwrap_or_default()).into_owned();
        cleanup();
        Ok(Output { status, stdout, stderr, what })
    }

    /// Runs the command; panics (failing the test) on timeout.
    pub fn run(&self) -> Output {
        self.try_run().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs the command, panics unless it exits 0, returns stdout.
    pub fn ok(&self) -> String {
        self.run().expect_ok().stdout
    }
}

fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut i = s.len() - n;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

fn kill_group(pid: u32) {
    // SAFETY: plain syscall; the group is the child we spawned with process_group(0).
    unsafe {
        libc::killpg(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// `cmd args` in `cwd` with a hard timeout; panics with the command and its
/// stderr if it does not finish in time. The exit status is the caller's to judge.
pub fn run(cmd: &str, args: &[&str], cwd: Option<&Path>, timeout: Duration) -> Output {
    let mut c = Cmd::new(cmd).args(args).timeout(timeout);
    if let Some(d) = cwd {
        c = c.cwd(d);
    }
    c.run()
}

/// `bash -c script` in `cwd` with a timeout (pipefail on).
pub fn sh(script: &str, cwd: &Path) -> Cmd {
    Cmd::new("bash").arg("-o").arg("pipefail").arg("-c").arg(script).cwd(cwd)
}

/// Runs `f` on a helper thread and waits at most `limit` for it: in-process
/// work on a mount (a held file's reads and writes) must not hang the test.
/// On timeout the test panics; the `Mounted` guard then aborts the
/// connection, which frees the thread if the mount held it. A panic of `f`
/// is the test's.
pub fn bounded<T: Send + 'static>(what: &str, limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = thread::Builder::new()
        .name(what.chars().take(15).collect())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    match rx.recv_timeout(limit) {
        Ok(v) => {
            let _ = worker.join();
            v
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => panic!("{what}: ended without a result"),
        },
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("TIMEOUT after {limit:?}: {what} (the mount looks hung)")
        }
    }
}

/// Makes the kernel drop every unused dentry and inode, system-wide
/// (`vm.drop_caches` = 2, root only): a FUSE daemon then gets FORGET for
/// every inode nothing uses any more. A one-shot action, not a setting.
pub fn drop_dentries_and_inodes() {
    if let Err(e) = fs::write("/proc/sys/vm/drop_caches", "2") {
        panic!("drop_caches: {e} (needs root)");
    }
}

/// Polls `cond` until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// The mount entry for `mnt` in /proc/self/mountinfo: (device "major:minor", fstype).
pub fn mount_entry(mnt: &Path) -> Option<(String, String)> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mnt.to_string_lossy().replace(' ', "\\040");
    // The last matching line is the top of the stack if something is mounted twice.
    info.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() < 7 || fields[4] != want {
            return None;
        }
        let sep = fields.iter().position(|f| *f == "-")?;
        Some((fields[2].to_string(), fields.get(sep + 1)?.to_string()))
    })
}

pub fn is_fuse_mounted(mnt: &Path) -> bool {
    matches!(mount_entry(mnt), Some((_, ty)) if ty.starts_with("fuse"))
}

/// Which file system a `Mounted` guard serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fs {
    Memfs,
    Stackfs,
}

impl Fs {
    pub fn name(self) -> &'static str {
        match self {
            Fs::Memfs => "memfs",
            Fs::Stackfs => "stackfs",
        }
    }
}

/// How to mount: extra CLI arguments and an optional wrapper (e.g. prlimit).
#[derive(Clone, Debug, Default)]
pub struct MountSpec {
    pub args: Vec<String>,
    pub wrapper: Vec<String>,
}

impl MountSpec {
    pub fn arg(mut self, a: &str) -> MountSpec {
        self.args.push(a.to_string());
        self
    }

    pub fn wrapper(mut self, w: &[&str]) -> MountSpec {
        self.wrapper = w.iter().map(|s| s.to_string()).collect();
        self
    }
}

/// A live efuse mount in a fresh temp directory, with an ext4 reference
/// directory beside it. Drop unmounts (forcibly if it must) and removes the dirs.
///
/// Layout under `root`: `mnt/` (the mount point), `ref/` (plain ext4, the
/// expected behaviour), `backing/` (stackfs only), `scratch/` (ext4 work space).
pub struct Mounted {
    pub fs: Fs,
    pub root: PathBuf,
    pub mnt: PathBuf,
    pub reference: PathBuf,
    pub backing: Option<PathBuf>,
    pub scratch: PathBuf,
    test: String,
}

impl Mounted {
    pub fn new(fs: Fs, test: &str) -> Mounted {
        Mounted::with(fs, test, MountSpec::default(), |_| {})
    }

    /// Mounts `fs`; `prepare` may fill the backing dir (stackfs) before mounting.
    pub fn with(fs: Fs, test: &str, spec: MountSpec, prepare: impl FnOnce(&Path)) -> Mounted {
        let root = unique_dir(test);
        let m = Mounted {
            fs,
            mnt: root.join("mnt"),
            reference: root.join("ref"),
            backing: (fs == Fs::Stackfs).then(|| root.join("backing")),
            scratch: root.join("scratch"),
            root,
            test: test.to_string(),
        };
        for d in [&m.mnt, &m.reference, &m.scratch].into_iter().chain(m.backing.as_ref()) {
            fs::create_dir_all(d).unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
        }
        if let Some(b) = &m.backing {
            prepare(b);
        }
        // From here on the guard exists, so a failed or half-done mount is cleaned up.
        m.mount(&spec);
        m
    }

    /// Mounts again at the same mount point (after an unmount) with `spec`.
    pub fn remount(&self, spec: &MountSpec) {
        assert!(mount_entry(&self.mnt).is_none(), "{}: remount over a live mount", self.test);
        self.mount(spec);
    }

    fn mount(&self, spec: &MountSpec) {
        let (m, test) = (self, &self.test);
        let mut cmd: Vec<String> = spec.wrapper.clone();
        cmd.push(efuse_bin().display().to_string());
        cmd.push("mount".into());
        cmd.push(m.fs.name().into());
        if let Some(b) = &m.backing {
            cmd.push(b.display().to_string());
        }
        cmd.push(m.mnt.display().to_string());
        cmd.extend(spec.args.iter().cloned());
        for a in test_mount_args() {
            // A scenario's own choice (e.g. --profile) wins over the binary's.
            let flag = a.starts_with("--");
            if flag && spec.args.iter().any(|s| s == &a) {
                continue;
            }
            cmd.push(a);
        }
        if let Some(t) = test_transport() {
            if !spec.args.iter().any(|a| a == "--transport" || a.starts_with("--transport=")) {
                cmd.extend(["--transport".to_string(), t]);
            }
        }
        let out = Cmd::new(&cmd[0]).args(&cmd[1..]).timeout(MOUNT_TIMEOUT).run();
        if !out.ok() {
            panic!(
                "{test}: mount failed ({}): {}\nstdout:\n{}\nstderr:\n{}",
                out.status, out.what, out.stdout, out.stderr
            );
        }
        // `efuse mount` promises the mount is live when it returns.
        assert!(
            is_fuse_mounted(&m.mnt),
            "{test}: `{}` exited 0 but {} is not a FUSE mount in /proc/self/mountinfo\nstderr:\n{}",
            out.what,
            m.mnt.display(),
            out.stderr
        );
    }

    /// `efuse stats MNT --json`, parsed.
    pub fn stats(&self) -> serde_json::Value {
        let out = Cmd::new(efuse_bin()).arg("stats").arg(&self.mnt).arg("--json").timeout(Duration::from_secs(20)).ok();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("efuse stats --json printed invalid JSON ({e}):\n{out}"))
    }

    /// Both sides of a scenario: (mount, ext4 reference).
    pub fn sides(&self) -> [(&'static str, PathBuf); 2] {
        [(self.fs.name(), self.mnt.clone()), ("ext4", self.reference.clone())]
    }

    /// Unmounts; returns a description of what it had to do when the polite way failed.
    fn unmount(&self) -> Result<(), String> {
        if mount_entry(&self.mnt).is_none() {
            return Ok(());
        }
        let polite = Cmd::new(efuse_bin()).arg("umount").arg(&self.mnt).timeout(MOUNT_TIMEOUT).try_run();
        let polite_ok = matches!(&polite, Ok(o) if o.ok());
        if polite_ok && mount_entry(&self.mnt).is_none() {
            return Ok(());
        }
        let why = match polite {
            Ok(o) => format!("efuse umount exited {}: {}", o.status, o.stderr.trim()),
            Err(e) => e,
        };
        force_unmount(&self.mnt);
        if mount_entry(&self.mnt).is_some() {
            return Err(format!("{why}; forced unmount did not work either"));
        }
        Err(format!("{why}; aborted the FUSE connection and lazily unmounted"))
    }
}

/// Aborts the FUSE connection of `mnt` and lazily unmounts it.
pub fn force_unmount(mnt: &Path) {
    if let Some((dev, ty)) = mount_entry(mnt) {
        if ty.starts_with("fuse") {
            let conns = Path::new("/sys/fs/fuse/connections");
            if fs::read_dir(conns).map(|mut d| d.next().is_none()).unwrap_or(true) {
                // fusectl is not always mounted; the abort file lives there.
                let _ = Cmd::new("mount")
                    .args(["-t", "fusectl", "none"])
                    .arg(conns)
                    .timeout(Duration::from_secs(10))
                    .try_run();
            }
            if let Some(minor) = dev.strip_prefix("0:") {
                let _ = fs::write(conns.join(minor).join("abort"), "1");
            }
        }
        let _ = Cmd::new("umount").arg("-l").arg(mnt).timeout(Duration::from_secs(20)).try_run();
    }
}

fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name; Z is a zombie.
        Ok(stat) => !stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// The pid of the efuse daemon serving `mnt`: an efuse process whose command line names it.
pub fn daemon_pid(mnt: &Path) -> Option<u32> {
    let want = mnt.as_os_str().as_encoded_bytes();
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_efuse = args.first().is_some_and(|a0| a0.ends_with(b"efuse"));
        (is_efuse && args.contains(&want) && !args.contains(&&b"umount"[..])).then_some(pid)
    })
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let daemon = daemon_pid(&self.mnt);
        let result = self.unmount();
        let still_mounted = mount_entry(&self.mnt).is_some();
        if !still_mounted {
            let _ = fs::remove_dir_all(&self.root);
        }
        let mut msg = match (&result, still_mounted) {
            (_, true) => Some(format!("{}: {} IS STILL MOUNTED", self.test, self.mnt.display())),
            (Err(e), false) => Some(format!("{}: unmount of {} needed force: {e}", self.test, self.mnt.display())),
            (Ok(()), false) => None,
        };
        // The daemon should exit once unmounted; one that lingers is ours (the
        // test started it) and must not outlive the test.
        if let Some(pid) = daemon {
            if !wait_until(Duration::from_secs(10), || !alive(pid)) {
                // SAFETY: plain syscall on the pid of the daemon this test mounted.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                let m = format!("{}: daemon pid {pid} still ran 10 s after unmount; killed it", self.test);
                msg = Some(msg.map_or(m.clone(), |prev| format!("{prev}; {m}")));
            }
        }
        if let Some(msg) = msg {
            eprintln!("{msg}");
            // A clean test whose unmount misbehaves is still a failure, but never
            // panic while already unwinding (that would abort the test binary).
            if !thread::panicking() {
                panic!("{msg}");
            }
        }
    }
}

/// A background process (e.g. a lock holder) killed with its group on drop.
pub struct Background {
    child: std::process::Child,
}

impl Background {
    pub fn spawn(program: &str, args: &[&str], cwd: &Path) -> Background {
        let child = Command::new(program)
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        Background { child }
    }

    /// Waits for exit up to `limit`; None on timeout.
    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if start.elapsed() > limit {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            kill_group(self.child.id());
            let _ = self.child.wait();
        }
    }
}

/// Panics with both transcripts and the first differing line when they differ.
pub fn assert_same(what: &str, fs_name: &str, got: &str, ext4: &str) {
    if got == ext4 {
        return;
    }
    let g: Vec<&str> = got.lines().collect();
    let e: Vec<&str> = ext4.lines().collect();
    let i = g.iter().zip(&e).position(|(a, b)| a != b).unwrap_or(g.len().min(e.len()));
    panic!(
        "{what}: {fs_name} differs from ext4 at line {}:\n  {fs_name}: {:?}\n  ext4:  {:?}\n--- {fs_name} ---\n{}\n--- ext4 ---\n{}",
        i + 1,
        g.get(i),
        e.get(i),
        tail(got, 6000),
        tail(ext4, 6000)
    );
}

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

/// True when the test runs as root (it switches credentials); otherwise skips.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    skip(test, "needs root (run as root, e.g. in CI)")
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

/// True in the bypass suite (tests/bypass_suite.rs): every program the tests
/// start, except the efuse binary itself, runs under `efuse run --` (`Cmd`,
/// `Background`), in-process work on a mount runs in a child started so
/// (`run_self_under_bypass`), and every mount must have served bypass
/// requests by the end of its test (`Mounted`'s drop).
pub fn bypass_suite() -> bool {
    env!("CARGO_CRATE_NAME") == "bypass_suite"
}

/// In the child `run_self_under_bypass` starts: the directory under test
/// and the ext4 reference directory its in-process work runs on.
pub fn bypass_child_dirs() -> Option<(PathBuf, PathBuf)> {
    let t = std::env::var_os("EFUSE_SUITE_CHILD_TEST_DIR")?;
    let r = std::env::var_os("EFUSE_SUITE_CHILD_REF_DIR")?;
    Some((PathBuf::from(t), PathBuf::from(r)))
}

/// In-process work on a mount (the differential engine calls libc itself)
/// is preloaded only in a process started under `efuse run`: runs `test`
/// (a module path inside this binary, e.g. "differential::memfs_...") again
/// in this test binary started so, told `bypass_child_dirs`. Panics unless
/// the child ran that one test and it passed; returns its output.
pub fn run_self_under_bypass(test: &str, test_dir: &Path, ref_dir: &Path, timeout: Duration) -> Output {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{test}: locating this test binary: {e}"));
    let out = Cmd::new(exe)
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env("EFUSE_SUITE_CHILD_TEST_DIR", &test_dir.to_string_lossy())
        .env("EFUSE_SUITE_CHILD_REF_DIR", &ref_dir.to_string_lossy())
        .timeout(timeout)
        .run();
    let all = format!("{}\n{}", out.stdout, out.stderr);
    assert!(
        out.ok() && all.contains("test result: ok. 1 passed"),
        "{test} under efuse run ({}): exited {}:\n{}",
        out.what,
        out.status,
        tail(&all, 8000)
    );
    out
}

/// Does this command line run the efuse binary (itself, or through a
/// wrapper such as setpriv or prlimit)? That one is never preloaded: it is
/// the daemon, or a client of its control socket.
fn runs_efuse(program: &Path, args: &[String]) -> bool {
    let is_efuse = |p: &Path| p.file_name() == Some(OsStr::new("efuse"));
    is_efuse(program) || args.iter().any(|a| is_efuse(Path::new(a)))
}

/// Extra mount arguments for every mount of this test binary: the suites are
/// compiled again under other names to run in other profiles
/// (tests/profile_plain.rs, tests/passthrough_off.rs, tests/writeback.rs,
/// tests/no_open.rs); `EFUSE_TEST_MOUNT_ARGS`
/// (space-separated) adds more to any binary.
pub fn test_mount_args() -> Vec<String> {
    let mut args: Vec<String> = match env!("CARGO_CRATE_NAME") {
        "profile_plain" => vec!["--profile".into(), "plain".into()],
        "passthrough_off" => vec!["--passthrough".into(), "off".into()],
        "writeback" => vec!["--writeback-cache".into()],
        "no_open" => vec!["--no-open".into()],
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
            let _ = Cmd::new("chmod")
                .args(["-R", "u+rwx"])
                .arg(&self.0)
                .timeout(Duration::from_secs(20))
                .kernel_only()
                .try_run();
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
    env_remove: Vec<String>,
    timeout: Duration,
    stdin: Option<Vec<u8>>,
    umask: Option<u32>,
    /// Start it under `efuse run` (the bypass suite's default, see `bypass_suite`).
    bypass: bool,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Cmd {
        Cmd {
            program: PathBuf::from(program.as_ref()),
            args: Vec::new(),
            cwd: None,
            env: Vec::new(),
            env_remove: Vec::new(),
            timeout: STEP,
            stdin: None,
            umask: None,
            bypass: bypass_suite(),
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

    /// Runs the command without `k` in its environment.
    pub fn env_remove(mut self, k: &str) -> Cmd {
        self.env_remove.push(k.to_string());
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

    /// Runs the command with this umask instead of the test process's (which
    /// is one per process, shared by every test thread, so never changed).
    pub fn umask(mut self, mask: u32) -> Cmd {
        self.umask = Some(mask);
        self
    }

    /// Runs the program as it is, never under `efuse run`: the harness's own
    /// cleanup (forced unmounts, removing a test directory) must not depend
    /// on the daemon it cleans up after.
    pub fn kernel_only(mut self) -> Cmd {
        self.bypass = false;
        self
    }

    /// The program and arguments as started: in the bypass suite, every
    /// program but the efuse binary itself runs under `efuse run --`.
    fn command_line(&self) -> (PathBuf, Vec<String>) {
        if self.bypass && !runs_efuse(&self.program, &self.args) {
            let mut args = vec!["run".to_string(), "--".to_string(), self.program.display().to_string()];
            args.extend(self.args.iter().cloned());
            return (efuse_bin(), args);
        }
        (self.program.clone(), self.args.clone())
    }

    pub fn describe(&self) -> String {
        let (program, args) = self.command_line();
        let mut s = program.display().to_string();
        for a in &args {
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
        let (program, args) = self.command_line();
        let mut cmd = Command::new(&program);
        cmd.args(&args).stdout(out_file).stderr(err_file).process_group(0);
        cmd.stdin(if self.stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        if let Some(d) = &self.cwd {
            cmd.current_dir(d);
        }
        for k in &self.env_remove {
            cmd.env_remove(k);
        }
        if self.bypass && bypass_suite() {
            // Every process of the suite connects at its first call on the
            // mount, however little it does there: all of them are served.
            cmd.env("EFUSE_BYPASS_AFTER", "0");
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(mask) = self.umask {
            // SAFETY: umask is async-signal-safe and cannot fail; nothing else
            // runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    libc::umask(mask as libc::mode_t);
                    Ok(())
                });
            }
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

/// How to mount: extra CLI arguments, an optional wrapper (e.g. prlimit),
/// and optionally a regular user to mount as (through fusermount3).
#[derive(Clone, Debug, Default)]
pub struct MountSpec {
    pub args: Vec<String>,
    pub wrapper: Vec<String>,
    pub user: Option<User>,
    /// Environment for the mount command (e.g. XDG_RUNTIME_DIR).
    pub env: Vec<(String, String)>,
    /// The umask `efuse mount` (and so the daemon it forks) starts with;
    /// None: the test process's.
    pub umask: Option<u32>,
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

    pub fn umask(mut self, mask: u32) -> MountSpec {
        self.umask = Some(mask);
        self
    }

    /// Mount (and use, read stats, unmount) as `user`: the mount's
    /// directories are theirs, and a copy of the efuse binary they can run
    /// sits in the test directory.
    pub fn user(mut self, user: User) -> MountSpec {
        self.user = Some(user);
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> MountSpec {
        self.env.push((k.to_string(), v.to_string()));
        self
    }
}

/// A regular user the tests act as. Commands run through `setpriv` (real
/// and effective ids, no supplementary groups, no capabilities left), with
/// root's XDG_RUNTIME_DIR removed, as for a user started by runuser.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

/// `nobody`, present on every Debian system.
pub const NOBODY: User = User { uid: 65534, gid: 65534 };

impl User {
    /// `program` as this user (add arguments to the returned command), in /:
    /// `Cmd::cwd` changes directory before the ids change, as root, which a
    /// FUSE mount of another user refuses.
    pub fn cmd(self, program: impl AsRef<OsStr>) -> Cmd {
        Cmd::new("setpriv")
            .arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--clear-groups")
            .arg("--")
            .arg(program)
            .cwd(Path::new("/"))
            .env_remove("XDG_RUNTIME_DIR")
    }

    /// `bash -c script` as this user, in `cwd` (pipefail on).
    pub fn sh(self, script: &str, cwd: &Path) -> Cmd {
        let script = format!("cd -- \"$EFUSE_TEST_CWD\" || exit 1\n{script}");
        self.cmd("bash").arg("-o").arg("pipefail").arg("-c").arg(script).env("EFUSE_TEST_CWD", &cwd.to_string_lossy())
    }

    /// Gives `path` (recursively) to this user.
    pub fn chown(self, path: &Path) {
        Cmd::new("chown").arg("-R").arg(format!("{}:{}", self.uid, self.gid)).arg(path).timeout(STEP).ok();
    }
}

/// A copy of the efuse binary under `dir` that any user can run (the build
/// tree may sit in root's private home).
pub fn efuse_bin_for_users(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin_dir = dir.join("bin");
    fs::create_dir_all(&bin_dir).unwrap_or_else(|e| panic!("create {}: {e}", bin_dir.display()));
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
    fs::set_permissions(&bin_dir, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", bin_dir.display()));
    let bin = bin_dir.join("efuse");
    fs::copy(efuse_bin(), &bin).unwrap_or_else(|e| panic!("copy efuse to {}: {e}", bin.display()));
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", bin.display()));
    bin
}

/// While alive, /dev/fuse is open to every user (mode 0666, as distributions
/// ship it), so regular users can mount through fusermount3. The last guard
/// of this process puts back the exact previous mode, also when a test
/// panics. Processes hold an exclusive lock on a file beside it while they
/// change the mode, so one test binary never restores it under another.
pub struct DevFuseForUsers(());

struct DevFuseState {
    holders: usize,
    previous: u32,
    _lock: fs::File,
}

static DEV_FUSE: std::sync::Mutex<Option<DevFuseState>> = std::sync::Mutex::new(None);

impl DevFuseForUsers {
    pub fn grant() -> DevFuseForUsers {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::PermissionsExt;
        let mut state = DEV_FUSE.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = state.as_mut() {
            s.holders += 1;
            return DevFuseForUsers(());
        }
        let lock_path = std::env::temp_dir().join("efuse-tests-dev-fuse-mode.lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", lock_path.display()));
        let start = Instant::now();
        // SAFETY: flock on a descriptor we own; LOCK_NB so the wait stays bounded.
        while unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            if start.elapsed() > Duration::from_secs(600) {
                panic!("another test process held {} for 10 minutes", lock_path.display());
            }
            thread::sleep(Duration::from_millis(100));
        }
        let previous =
            fs::metadata("/dev/fuse").unwrap_or_else(|e| panic!("stat /dev/fuse: {e}")).permissions().mode() & 0o7777;
        fs::set_permissions("/dev/fuse", fs::Permissions::from_mode((previous & !0o777) | 0o666))
            .unwrap_or_else(|e| panic!("chmod /dev/fuse: {e}"));
        *state = Some(DevFuseState { holders: 1, previous, _lock: lock });
        DevFuseForUsers(())
    }
}

impl Drop for DevFuseForUsers {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let mut state = DEV_FUSE.lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = state.as_mut() else { return };
        s.holders -= 1;
        if s.holders > 0 {
            return;
        }
        if let Err(e) = fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(s.previous)) {
            eprintln!("RESTORING /dev/fuse TO MODE {:o} FAILED: {e}", s.previous);
        }
        // Dropping the state closes the lock file: the next process may go.
        *state = None;
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
    /// The user who mounted it (None: root).
    pub user: Option<User>,
    /// The efuse binary that user runs.
    pub bin: PathBuf,
    /// The environment the mount command had; stats and umount get it too.
    env: Vec<(String, String)>,
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
            bin: match spec.user {
                Some(_) => efuse_bin_for_users(&root),
                None => efuse_bin(),
            },
            user: spec.user,
            env: spec.env.clone(),
            root,
            test: test.to_string(),
        };
        for d in [&m.mnt, &m.reference, &m.scratch].into_iter().chain(m.backing.as_ref()) {
            fs::create_dir_all(d).unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
        }
        if let Some(b) = &m.backing {
            prepare(b);
        }
        if let Some(u) = m.user {
            for d in [&m.mnt, &m.reference, &m.scratch].into_iter().chain(m.backing.as_ref()) {
                u.chown(d);
            }
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
        cmd.push(m.bin.display().to_string());
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
        let mut c = match m.user {
            Some(u) => u.cmd(&cmd[0]),
            None => Cmd::new(&cmd[0]),
        };
        for (k, v) in &m.env {
            c = c.env(k, v);
        }
        if let Some(mask) = spec.umask {
            c = c.umask(mask);
        }
        let out = c.args(&cmd[1..]).timeout(MOUNT_TIMEOUT).run();
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

    /// The efuse binary, run as the user who mounted (root if nobody else),
    /// in the environment the mount had.
    pub fn efuse(&self) -> Cmd {
        let mut c = match self.user {
            Some(u) => u.cmd(&self.bin),
            None => Cmd::new(&self.bin),
        };
        for (k, v) in &self.env {
            c = c.env(k, v);
        }
        c
    }

    /// `efuse stats MNT --json`, parsed.
    pub fn stats(&self) -> serde_json::Value {
        self.stats_with(self.efuse())
    }

    /// `efuse stats MNT --json` run by `efuse` (e.g. with another environment), parsed.
    pub fn stats_with(&self, efuse: Cmd) -> serde_json::Value {
        let out = efuse.arg("stats").arg(&self.mnt).arg("--json").timeout(Duration::from_secs(20)).ok();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("efuse stats --json printed invalid JSON ({e}):\n{out}"))
    }

    /// The daemon's `bypass_requests` (requests served through the bypass
    /// socket since the mount), without panicking.
    pub fn bypass_requests(&self) -> Result<u64, String> {
        let out = self.efuse().arg("stats").arg(&self.mnt).arg("--json").timeout(Duration::from_secs(20)).try_run()?;
        if !out.ok() {
            return Err(format!("{} exited {}: {}", out.what, out.status, out.stderr.trim()));
        }
        let v: serde_json::Value =
            serde_json::from_str(&out.stdout).map_err(|e| format!("efuse stats --json: {e}: {}", out.stdout))?;
        v["bypass_requests"].as_u64().ok_or_else(|| format!("no bypass_requests in efuse stats --json: {v}"))
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
        let polite = self.efuse().arg("umount").arg(&self.mnt).timeout(MOUNT_TIMEOUT).try_run();
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
                    .kernel_only()
                    .try_run();
            }
            if let Some(minor) = dev.strip_prefix("0:") {
                let _ = fs::write(conns.join(minor).join("abort"), "1");
            }
        }
        let _ = Cmd::new("umount").arg("-l").arg(mnt).timeout(Duration::from_secs(20)).kernel_only().try_run();
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
        // The bypass suite must prove the bypass served its programs: a test
        // that passed with no bypass request ran them through the kernel only.
        let unserved = if bypass_suite() && !thread::panicking() && is_fuse_mounted(&self.mnt) {
            match self.bypass_requests() {
                Ok(0) => Some(format!(
                    "{}: the bypass served no request on {} (bypass_requests 0): everything went through the kernel",
                    self.test,
                    self.mnt.display()
                )),
                Ok(_) => None,
                Err(e) => Some(format!("{}: reading bypass_requests: {e}", self.test)),
            }
        } else {
            None
        };
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
        if let Some(u) = unserved {
            msg = Some(msg.map_or(u.clone(), |prev| format!("{u}; {prev}")));
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
        let mut argv: Vec<&OsStr> = Vec::new();
        let bin = efuse_bin();
        if bypass_suite() {
            argv.extend([bin.as_os_str(), OsStr::new("run"), OsStr::new("--")]);
        }
        argv.push(OsStr::new(program));
        argv.extend(args.iter().map(OsStr::new));
        let child = Command::new(argv[0])
            .args(&argv[1..])
            .env("EFUSE_BYPASS_AFTER", "0")
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

/// xorshift64* (Vigna): small, fast, and the same sequence everywhere, so a
/// seed replays a random test exactly.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03 | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

/// A number from the environment (decimal or 0x-hex), or `default` when unset.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}"))
        }
        Err(_) => default,
    }
}

/// This thread's errno after a failed libc call.
pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The symbolic name of an errno value, as the transcripts print it.
pub fn errno_name(e: i32) -> String {
    let names: &[(i32, &str)] = &[
        (libc::EPERM, "EPERM"),
        (libc::ENOENT, "ENOENT"),
        (libc::EINTR, "EINTR"),
        (libc::EIO, "EIO"),
        (libc::ENXIO, "ENXIO"),
        (libc::E2BIG, "E2BIG"),
        (libc::EBADF, "EBADF"),
        (libc::EAGAIN, "EAGAIN"),
        (libc::EACCES, "EACCES"),
        (libc::EFAULT, "EFAULT"),
        (libc::EBUSY, "EBUSY"),
        (libc::EEXIST, "EEXIST"),
        (libc::EXDEV, "EXDEV"),
        (libc::ENODEV, "ENODEV"),
        (libc::ENOTDIR, "ENOTDIR"),
        (libc::EISDIR, "EISDIR"),
        (libc::EINVAL, "EINVAL"),
        (libc::EMFILE, "EMFILE"),
        (libc::ETXTBSY, "ETXTBSY"),
        (libc::EFBIG, "EFBIG"),
        (libc::ENOSPC, "ENOSPC"),
        (libc::ESPIPE, "ESPIPE"),
        (libc::EROFS, "EROFS"),
        (libc::EMLINK, "EMLINK"),
        (libc::ERANGE, "ERANGE"),
        (libc::ENAMETOOLONG, "ENAMETOOLONG"),
        (libc::ENOSYS, "ENOSYS"),
        (libc::ENOTEMPTY, "ENOTEMPTY"),
        (libc::ELOOP, "ELOOP"),
        (libc::ENODATA, "ENODATA"),
        (libc::EOPNOTSUPP, "EOPNOTSUPP"),
        (libc::ENOTCONN, "ENOTCONN"),
        (libc::EOVERFLOW, "EOVERFLOW"),
        (libc::ESTALE, "ESTALE"),
        (libc::EDQUOT, "EDQUOT"),
    ];
    names.iter().find(|(n, _)| *n == e).map(|(_, s)| s.to_string()).unwrap_or_else(|| format!("errno {e}"))
}

/// Where two byte strings first differ, for a mismatch report.
pub fn first_difference(a: &[u8], b: &[u8]) -> String {
    let i = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
    let show = |d: &[u8]| {
        let end = (i + 16).min(d.len());
        d[i.min(end)..end].iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    format!("lengths {} vs {}, first difference at byte {i}: test {} vs ext4 {}", a.len(), b.len(), show(a), show(b))
}

/// Runs in-process work that touches a mount on a helper thread and fails the
/// test when the work's progress counter stands still for `stall` (a hung
/// mount), leaving the unmount to the `Mounted` guard; `context` (e.g. the
/// seed) goes into that failure. A panic of the work is the test's panic.
pub fn watch_progress<F>(label: &str, stall: Duration, context: &str, work: F)
where
    F: FnOnce(&AtomicU64) + Send + 'static,
{
    let progress = std::sync::Arc::new(AtomicU64::new(0));
    let p = progress.clone();
    let worker = thread::Builder::new()
        .name(format!("watched {label}"))
        .spawn(move || work(&p))
        .unwrap_or_else(|e| panic!("{label}: spawn worker thread: {e}"));
    let mut last = (0, Instant::now());
    while !worker.is_finished() {
        thread::sleep(Duration::from_millis(50));
        let now = progress.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > stall {
            panic!("{label}: no progress for {stall:?} at step #{now} ({context}): the mount looks hung");
        }
    }
    if let Err(panic) = worker.join() {
        std::panic::resume_unwind(panic);
    }
}

//! memfs and stackfs mounted, used, observed and unmounted by a regular user
//! through fusermount3, as on a desktop: the tests run as root, open
//! /dev/fuse to every user for their duration (mode 0666, as distributions
//! ship it; the exact previous mode comes back afterwards, also on panic),
//! and act as `nobody` through setpriv.
//!
//! Also: a mount fusermount3 refuses fails with its own words; `--transport
//! auto` falls back to /dev/fuse when the user may not create an io_uring
//! (asking for FUSE-over-io_uring at INIT would otherwise hang the mount);
//! `efuse umount` cleans up after a dead and after a stopped daemon.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use common::{
    assert_same, daemon_pid, force_unmount, is_fuse_mounted, require_fuse, require_tools, skip, wait_until, Background,
    Cmd, DevFuseForUsers, Fs, MountSpec, Mounted, TempDir, User, NOBODY,
};

/// One test at a time: one of them changes kernel.io_uring_disabled, which
/// the transport another one expects depends on.
static SERIAL: Mutex<()> = Mutex::new(());

/// What these tests need besides root and /dev/fuse: setpriv, and a
/// fusermount3 that can mount for a regular user.
fn require_user_mounts(test: &str) -> bool {
    if !require_fuse(test) || !require_tools(test, &["setpriv", "fusermount3", "bash"]) {
        return false;
    }
    let setuid = common::which("fusermount3")
        .and_then(|p| fs::metadata(p).ok())
        .is_some_and(|m| m.permissions().mode() & 0o4000 != 0);
    if !setuid {
        return skip(test, "fusermount3 is not setuid root (the fuse3 package installs it so)");
    }
    true
}

/// Real programs on a mount, the same script on the ext4 reference; the
/// transcript includes owners, so files must come out as the user's.
const USE_IT: &str = r#"set -e
seq 1 150000 > ../scratch/big
mkdir -p d/e/f
cp ../scratch/big d/e/copy
cmp ../scratch/big d/e/copy
printf 'written by uid %s\n' "$(id -u)" > note
cat note
cp -r d d2
ls -1 . d2 d2/e
rm -r d
echo again >> note
cat note
ls -1
stat -c '%n %s %u %g %a' note d2/e/copy
find . | sort
"#;

fn use_as_user(m: &Mounted, user: User) {
    let got = user.sh(USE_IT, &m.mnt).ok();
    let want = user.sh(USE_IT, &m.reference).ok();
    assert_same("programs as a regular user", m.fs.name(), &got, &want);
    assert!(got.contains(&format!("written by uid {}", user.uid)), "{got}");
}

/// True when a fresh process of this user may use FUSE-over-io_uring
/// (the module parameter, and io_uring itself allowed for non-root).
fn uring_for_users() -> bool {
    let enabled = fs::read_to_string("/sys/module/fuse/parameters/enable_uring").is_ok_and(|v| v.trim() == "Y");
    let disabled = fs::read_to_string("/proc/sys/kernel/io_uring_disabled").map(|v| v.trim().to_string());
    enabled && matches!(disabled.as_deref(), Ok("0") | Err(_))
}

fn uid_of(pid: u64) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().nth(1)?.parse().ok()
}

fn alive(pid: u64) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')))
}

/// Unmounts as the user with `efuse umount`, then checks the mount is gone
/// and the daemon `pid` exited.
fn umount_as_user(m: &Mounted, pid: u64) {
    let out = m.efuse().arg("umount").arg(&m.mnt).timeout(common::MOUNT_TIMEOUT).run();
    assert!(out.ok(), "efuse umount as uid {:?} failed ({}): {}", m.user, out.status, out.stderr);
    assert!(!is_fuse_mounted(&m.mnt), "{} is still mounted after efuse umount", m.mnt.display());
    assert!(wait_until(Duration::from_secs(10), || !alive(pid)), "daemon {pid} still runs 10 s after efuse umount");
}

/// The daemon's log: the log file in one of `dirs` that names the mount.
fn daemon_log(dirs: &[PathBuf], mnt: &Path) -> (PathBuf, String) {
    let want = mnt.display().to_string();
    dirs.iter()
        .filter_map(|d| fs::read_dir(d).ok())
        .flat_map(|entries| entries.flatten().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .find_map(|p| {
            let text = fs::read_to_string(&p).ok()?;
            text.contains(&want).then_some((p, text))
        })
        .unwrap_or_else(|| panic!("no daemon log for {want} in {dirs:?}"))
}

/// A private runtime directory for the user (what XDG_RUNTIME_DIR names in
/// a login session), removed with everything in it on drop.
fn user_runtime_dir(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap_or_else(|e| panic!("{e}"));
    NOBODY.chown(dir.path());
    dir
}

/// The stats a separate invocation reads: this daemon, this user, this file system.
fn check_stats(m: &Mounted, stats: &serde_json::Value, transport: &str) -> u64 {
    assert_eq!(stats["fs"], m.fs.name(), "{stats}");
    assert_eq!(stats["mountpoint"], m.mnt.display().to_string(), "{stats}");
    assert_eq!(stats["transport"], transport, "{stats}");
    let pid = stats["pid"].as_u64().unwrap_or_else(|| panic!("no pid in {stats}"));
    assert_eq!(uid_of(pid), m.user.map(|u| u.uid), "daemon {pid} should run as the user who mounted");
    for op in ["MKDIR", "CREATE", "WRITE", "READ", "UNLINK", "RMDIR"] {
        let n = stats["opcodes"][op]["count"].as_u64().unwrap_or(0);
        assert!(n > 0, "{op} count is {n} after the programs ran: {stats}");
    }
    pid
}

#[test]
fn memfs_as_a_regular_user() {
    let test = "memfs_as_a_regular_user";
    if !require_user_mounts(test) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let _dev = DevFuseForUsers::grant();
    // No XDG_RUNTIME_DIR (as after runuser or setpriv): the private fallback.
    let spec = MountSpec::default().user(NOBODY).arg("--transport").arg("auto").arg("--size").arg("64M");
    let m = Mounted::with(Fs::Memfs, test, spec, |_| {});
    use_as_user(&m, NOBODY);
    // Another shell of the same user, whose environment names a runtime
    // directory the mounting one did not have, still finds the daemon.
    let xdg = user_runtime_dir("unpriv-xdg");
    let stats = m.stats_with(m.efuse().env("XDG_RUNTIME_DIR", &xdg.path().display().to_string()));
    let transport = if uring_for_users() { "uring" } else { "dev" };
    let pid = check_stats(&m, &stats, transport);
    // Root finds a regular user's daemon too (and would not take it for dead).
    let as_root = m.stats_with(Cmd::new(&m.bin));
    assert_eq!(as_root["pid"].as_u64(), Some(pid), "root reading stats of the user's mount: {as_root}");
    // The fallback keeps socket and log private: the user's own directory, mode 0700.
    let fallbacks =
        [PathBuf::from(format!("/run/user/{}/efuse", NOBODY.uid)), PathBuf::from(format!("/tmp/efuse-{}", NOBODY.uid))];
    let (log, _) = daemon_log(&fallbacks, &m.mnt);
    let dir = log.parent().unwrap_or(Path::new("/"));
    let meta = fs::symlink_metadata(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    use std::os::unix::fs::MetadataExt;
    assert!(meta.is_dir() && meta.uid() == NOBODY.uid, "{} must be the user's directory", dir.display());
    assert_eq!(meta.mode() & 0o777, 0o700, "{} must be private", dir.display());
    umount_as_user(&m, pid);
    let _ = fs::remove_file(&log);
    let _ = fs::remove_dir(dir); // only when nothing else of the user's is in it
}

#[test]
fn stackfs_as_a_regular_user() {
    let test = "stackfs_as_a_regular_user";
    if !require_user_mounts(test) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let _dev = DevFuseForUsers::grant();
    let xdg = user_runtime_dir("unpriv-xdg");
    let xdg_s = xdg.path().display().to_string();
    let spec = MountSpec::default().user(NOBODY).arg("--transport").arg("dev").env("XDG_RUNTIME_DIR", &xdg_s);
    let m = Mounted::with(Fs::Stackfs, test, spec, |b| {
        fs::write(b.join("before"), "from the backing directory\n").unwrap_or_else(|e| panic!("{e}"));
    });
    let backing = m.backing.clone().unwrap_or_else(|| panic!("stackfs has a backing directory"));
    let seen = NOBODY.sh("cat before; rm before", &m.mnt).ok();
    assert_eq!(seen, "from the backing directory\n");
    assert!(!backing.join("before").exists(), "rm through the mount left the backing file");
    use_as_user(&m, NOBODY);
    // What the mount wrote is in the backing directory, owned by the user.
    let listing = NOBODY.sh("stat -c '%n %u' note d2/e/copy", &backing).ok();
    assert_eq!(listing, format!("note {0}\nd2/e/copy {0}\n", NOBODY.uid));
    // A change behind the mount shows through it: without fanotify (root
    // only), inotify keeps the long-lived caches exact.
    NOBODY.sh("cat note >/dev/null", &m.mnt).ok();
    NOBODY.sh("echo behind > note", &backing).ok();
    let fresh = wait_until(Duration::from_secs(2), || NOBODY.sh("cat note", &m.mnt).run().stdout == "behind\n");
    assert!(fresh, "a change in the backing directory did not show through the mount within 2 s");
    let stats = m.stats();
    let pid = check_stats(&m, &stats, "dev");
    assert_eq!(stats["paths"]["passthrough"], 0, "passthrough needs CAP_SYS_ADMIN: {stats}");
    // Each privilege the daemon lacks costs one log line, not the mount.
    let (log_path, log) = daemon_log(&[xdg.path().join("efuse")], &m.mnt);
    for (what, line) in [
        ("eBPF", "eBPF kernel-side counters unavailable"),
        ("passthrough", "passthrough off: registering backing files needs CAP_SYS_ADMIN"),
        ("fanotify", "caches kept exact by inotify"),
        ("file handles", "file handles unavailable"),
    ] {
        assert_eq!(
            log.matches(line).count(),
            1,
            "{what}: expected one line containing {line:?} in {}:\n{log}",
            log_path.display()
        );
    }
    umount_as_user(&m, pid);
}

/// Runs `efuse mount memfs MNT ARGS` as the user (its runtime directory
/// `xdg`), expecting fusermount3 to refuse; returns what fusermount3 said.
/// Whatever mounts by mistake is removed.
fn refused(bin: &Path, xdg: &Path, mnt: &Path, args: &[&str]) -> String {
    let out = NOBODY
        .cmd(bin)
        .env("XDG_RUNTIME_DIR", &xdg.display().to_string())
        .arg("mount")
        .arg("memfs")
        .arg(mnt)
        .args(args)
        .timeout(common::MOUNT_TIMEOUT)
        .run();
    let mounted = is_fuse_mounted(mnt);
    let daemon = daemon_pid(mnt);
    if mounted {
        force_unmount(mnt);
    }
    if let Some(pid) = daemon {
        // SAFETY: plain syscall on the daemon this test started.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    assert!(!mounted, "{} was mounted although fusermount3 should refuse: {}", mnt.display(), out.stderr);
    assert!(daemon.is_none(), "a daemon stayed behind after a refused mount");
    assert_eq!(out.code(), Some(1), "exit code of a refused mount: {}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one error line, got: {}", out.stderr);
    let prefix = format!("efuse: error: fusermount3 refused to mount {}: fusermount3: ", mnt.display());
    assert!(lines[0].starts_with(&prefix), "expected {prefix:?}..., got: {}", lines[0]);
    lines[0][prefix.len()..].to_string()
}

#[test]
fn refused_mounts_say_what_fusermount3_said() {
    let test = "refused_mounts_say_what_fusermount3_said";
    if !require_user_mounts(test) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let _dev = DevFuseForUsers::grant();
    let dir = TempDir::new(test);
    let bin = common::efuse_bin_for_users(dir.path());
    let xdg = user_runtime_dir("unpriv-xdg");
    let own = dir.path().join("own");
    fs::create_dir(&own).unwrap_or_else(|e| panic!("{e}"));
    NOBODY.chown(&own);
    // allow_other needs user_allow_other in /etc/fuse.conf.
    let conf = fs::read_to_string("/etc/fuse.conf").unwrap_or_default();
    if conf.lines().any(|l| l.trim() == "user_allow_other") {
        eprintln!("{test}: /etc/fuse.conf allows allow_other; that refusal cannot be shown here");
    } else {
        let said = refused(&bin, xdg.path(), &own, &["-o", "allow_other"]);
        assert!(said.contains("user_allow_other") && said.contains("/etc/fuse.conf"), "{said}");
    }
    // A mount point the user does not own and cannot write.
    let roots = dir.path().join("roots");
    fs::create_dir(&roots).unwrap_or_else(|e| panic!("{e}"));
    fs::set_permissions(&roots, fs::Permissions::from_mode(0o755)).unwrap_or_else(|e| panic!("{e}"));
    let said = refused(&bin, xdg.path(), &roots, &[]);
    assert!(said.contains(&roots.display().to_string()), "fusermount3 names the mount point: {said}");
}

/// Sets a sysctl for its lifetime; puts the exact previous value back on drop.
struct Sysctl {
    path: PathBuf,
    previous: String,
}

impl Sysctl {
    fn set(path: &str, value: &str) -> Option<Sysctl> {
        let previous = fs::read_to_string(path).ok()?;
        fs::write(path, value).unwrap_or_else(|e| panic!("write {value} to {path}: {e}"));
        Some(Sysctl { path: PathBuf::from(path), previous })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Err(e) = fs::write(&self.path, self.previous.trim()) {
            eprintln!("RESTORING {} TO {} FAILED: {e}", self.path.display(), self.previous.trim());
        }
    }
}

#[test]
fn auto_transport_falls_back_when_the_user_may_not_use_io_uring() {
    let test = "auto_transport_falls_back_when_the_user_may_not_use_io_uring";
    if !require_user_mounts(test) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let _dev = DevFuseForUsers::grant();
    // io_uring for root and members of kernel.io_uring_group only (Linux 6.6+);
    // root's tests elsewhere are not affected.
    let sysctl = Sysctl::set("/proc/sys/kernel/io_uring_disabled", "1");
    if sysctl.is_none() {
        eprintln!("{test}: kernel.io_uring_disabled does not exist; checking auto alone");
    }
    let xdg = user_runtime_dir("unpriv-xdg");
    let spec = MountSpec::default()
        .user(NOBODY)
        .arg("--transport")
        .arg("auto")
        .env("XDG_RUNTIME_DIR", &xdg.path().display().to_string());
    let m = Mounted::with(Fs::Memfs, test, spec, |_| {});
    drop(sysctl);
    // With the ring asked for at INIT and never registered, every request
    // would wait for it: the programs would time out here.
    use_as_user(&m, NOBODY);
    let stats = m.stats();
    let pid = check_stats(&m, &stats, "dev");
    umount_as_user(&m, pid);
}

#[test]
fn umount_as_a_regular_user_cleans_up_after_a_dead_or_stopped_daemon() {
    let test = "umount_as_a_regular_user_cleans_up_after_a_dead_or_stopped_daemon";
    if !require_user_mounts(test) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let _dev = DevFuseForUsers::grant();
    let xdg = user_runtime_dir("unpriv-xdg");
    for signal in [libc::SIGKILL, libc::SIGSTOP] {
        // The dev transport: a connection abort does not end requests a
        // stopped daemon holds in its io_uring queues (see README).
        let spec = MountSpec::default()
            .user(NOBODY)
            .arg("--transport")
            .arg("dev")
            .env("XDG_RUNTIME_DIR", &xdg.path().display().to_string());
        let m = Mounted::with(Fs::Memfs, test, spec, |_| {});
        NOBODY.sh("echo x > f", &m.mnt).ok();
        let pid = m.stats()["pid"].as_u64().unwrap_or_else(|| panic!("no pid in stats"));
        // SAFETY: plain syscall on the daemon this test started.
        unsafe { libc::kill(pid as libc::pid_t, signal) };
        // A program that waits on the stopped daemon (it fails at once on a dead one).
        let target = m.mnt.join("nothing-here").display().to_string();
        let mut waiter = Background::spawn(
            "setpriv",
            &["--reuid=65534", "--regid=65534", "--clear-groups", "--", "stat", &target],
            Path::new("/"),
        );
        std::thread::sleep(Duration::from_millis(300));
        let out = m.efuse().arg("umount").arg(&m.mnt).timeout(common::MOUNT_TIMEOUT).run();
        assert!(out.ok(), "efuse umount after signal {signal} failed ({}): {}", out.status, out.stderr);
        assert!(!is_fuse_mounted(&m.mnt), "still mounted after efuse umount (signal {signal})");
        // The user aborted their own connection: the waiter is released.
        assert!(
            waiter.wait(Duration::from_secs(10)).is_some(),
            "a program waiting on the stopped daemon was not released by efuse umount"
        );
        // SAFETY: plain syscall on the daemon this test started.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        assert!(wait_until(Duration::from_secs(10), || !alive(pid)), "daemon {pid} survived SIGKILL");
        drop(m);
    }
}

//! The daemon killed mid-write (SIGKILL, no chance to clean up): a writer
//! appends 64 KiB records, each followed by fsync, and counts the bytes fsync
//! acknowledged. Then:
//!
//! - the writer gets an error promptly (ENOTCONN, or ECONNABORTED for the
//!   request the kill cut short; over io_uring also ECANCELED for a request
//!   the kernel was handing to the dying daemon's ring), and so do other
//!   processes using the mount;
//! - `efuse umount` cleans the dead mount up and a new mount at the same
//!   mount point works;
//! - stackfs: every byte fsync acknowledged is in the backing file, right,
//!   and so is every byte of a completed write(2) (no writeback cache here:
//!   a write returns once the backing file has it);
//! - memfs: the data died with the daemon, by design (README says so), and
//!   nothing hangs.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{require_fuse, require_uring, Cmd, Fs, MountSpec, Mounted};

const RECORD: usize = 64 * 1024;
/// The writer stops here if the kill never lands (it must, long before).
const MAX_RECORDS: u64 = 2048;
/// Records acknowledged before the kill.
const BEFORE_KILL: u64 = 8;
/// How long the writer, a stat or an ls may take to see the daemon is gone.
const PROMPT: Duration = Duration::from_secs(10);

/// Record `i`: its index, then bytes derived from it (xorshift64).
fn record(i: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(RECORD);
    v.extend_from_slice(&i.to_le_bytes());
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while v.len() < RECORD {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

/// How the writer stopped.
#[derive(Debug)]
struct WriterEnd {
    /// Bytes fsync acknowledged.
    acked: u64,
    /// Bytes of completed write(2) calls.
    written: u64,
    /// The failing call and its error; None if it wrote every record.
    error: Option<(&'static str, std::io::Error)>,
    at: Instant,
}

fn writer(path: PathBuf, acked: Arc<AtomicU64>) -> WriterEnd {
    let mut written = 0;
    let end = |error, written| WriterEnd { acked: acked.load(Ordering::SeqCst), written, error, at: Instant::now() };
    let mut f = match fs::OpenOptions::new().write(true).create(true).truncate(true).open(&path) {
        Ok(f) => f,
        Err(e) => return end(Some(("open", e)), 0),
    };
    for i in 0..MAX_RECORDS {
        if let Err(e) = f.write_all(&record(i)) {
            return end(Some(("write", e)), written);
        }
        written += RECORD as u64;
        if let Err(e) = f.sync_all() {
            return end(Some(("fsync", e)), written);
        }
        acked.store((i + 1) * RECORD as u64, Ordering::SeqCst);
    }
    end(None, written)
}

/// A process that is neither running nor a zombie is gone.
fn gone(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => true,
    }
}

/// `cmd args` on the dead mount must fail at once, with the connection's
/// error (`uring`: also ECANCELED while the dead daemon's rings are torn down).
fn fails_promptly(test: &str, program: &str, args: &[&Path], uring: bool) {
    let start = Instant::now();
    let out = Cmd::new(program).args(args).timeout(PROMPT).run();
    let took = start.elapsed();
    assert!(!out.ok(), "{test}: `{}` succeeded on a mount whose daemon is dead:\n{}", out.what, out.stdout);
    let err = out.stderr.trim();
    assert!(
        err.contains("Transport endpoint is not connected")
            || err.contains("Software caused connection abort")
            || (uring && err.contains("Operation canceled")),
        "{test}: `{}` failed with an unexpected error: {err}",
        out.what
    );
    println!("{test}: `{program}` failed in {took:?}: {err}");
}

/// Compares the first `acked` bytes of `file` with the records written.
fn check_kept(test: &str, file: &Path, acked: u64) {
    let data = fs::read(file).unwrap_or_else(|e| panic!("{test}: read {}: {e}", file.display()));
    assert!(
        data.len() as u64 >= acked,
        "{test}: {} holds {} bytes, but fsync acknowledged {acked}",
        file.display(),
        data.len()
    );
    for (i, chunk) in data[..acked as usize].chunks(RECORD).enumerate() {
        assert!(chunk == record(i as u64).as_slice(), "{test}: acknowledged record {i} of {} is wrong", file.display());
    }
}

fn kill_mid_write(fs_kind: Fs, test: &str, args: &[&str]) {
    if !require_fuse(test) {
        return;
    }
    if args.contains(&"uring") && !require_uring(test) {
        return;
    }
    let mut spec = MountSpec::default();
    for a in args {
        spec = spec.arg(a);
    }
    let m = Mounted::with(fs_kind, test, spec.clone(), |_| {});
    let pid = common::daemon_pid(&m.mnt).unwrap_or_else(|| panic!("{test}: no daemon found for {}", m.mnt.display()));

    let acked = Arc::new(AtomicU64::new(0));
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let (path, acked) = (m.mnt.join("data"), acked.clone());
        std::thread::spawn(move || {
            let _ = tx.send(writer(path, acked));
        });
    }
    let waited =
        common::wait_until(Duration::from_secs(30), || acked.load(Ordering::SeqCst) >= BEFORE_KILL * RECORD as u64);
    assert!(waited, "{test}: the writer did not get {BEFORE_KILL} records acknowledged in 30 s");
    // SAFETY: plain syscall on the pid of the daemon this test mounted.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0, "{test}: kill {pid}");
    let killed = Instant::now();

    let end = rx
        .recv_timeout(PROMPT)
        .unwrap_or_else(|_| panic!("{test}: the writer saw no error within {PROMPT:?} of the daemon's SIGKILL (hung)"));
    let (call, err) = end
        .error
        .unwrap_or_else(|| panic!("{test}: the writer wrote all {MAX_RECORDS} records; the kill did not reach it"));
    // ENOTCONN once the connection is gone; ECONNABORTED for a request the
    // abort found queued or in the daemon's hands; ECANCELED (uring) for one
    // the kernel was handing to a ring of the dying daemon.
    let code = err.raw_os_error();
    // The transport named here, or the one every mount of this run uses.
    let uring = args.contains(&"uring")
        || (!args.contains(&"--transport") && common::test_transport().as_deref() == Some("uring"));
    assert!(
        code == Some(libc::ENOTCONN) || code == Some(libc::ECONNABORTED) || (uring && code == Some(libc::ECANCELED)),
        "{test}: the writer's {call} failed with {err}, not ENOTCONN/ECONNABORTED{}",
        if uring { "/ECANCELED" } else { "" }
    );
    println!(
        "{test}: {call} failed {:?} after the kill with {err}; {} bytes ({} records) acknowledged by fsync, {} written",
        end.at.saturating_duration_since(killed),
        end.acked,
        end.acked / RECORD as u64,
        end.written
    );
    assert!(end.acked >= BEFORE_KILL * RECORD as u64);
    assert!(common::wait_until(Duration::from_secs(10), || gone(pid)), "{test}: daemon {pid} survived SIGKILL");

    // Everyone else using the mount fails at once too.
    fails_promptly(test, "stat", &[&m.mnt], uring);
    fails_promptly(test, "ls", &[&m.mnt], uring);
    fails_promptly(test, "cat", &[&m.mnt.join("data")], uring);

    // `efuse umount` cleans the dead mount up; the mount point takes a new mount.
    let out = Cmd::new(common::efuse_bin()).arg("umount").arg(&m.mnt).timeout(common::MOUNT_TIMEOUT).run();
    assert!(out.ok(), "{test}: efuse umount of the dead mount: {}\n{}", out.status, out.stderr);
    assert!(common::mount_entry(&m.mnt).is_none(), "{test}: still mounted after efuse umount");
    m.remount(&spec);
    match fs_kind {
        Fs::Stackfs => {
            check_kept(test, &m.backing.clone().unwrap().join("data"), end.acked);
            check_kept(test, &m.backing.clone().unwrap().join("data"), end.written);
            // And through the new mount.
            let mnt = m.mnt.clone();
            let t = test.to_string();
            common::bounded("read after remount", common::STEP, move || check_kept(&t, &mnt.join("data"), end.written));
        }
        Fs::Memfs => {
            // In memory only: the new daemon starts empty.
            let out = Cmd::new("ls").arg("-A").arg(&m.mnt).timeout(PROMPT).run();
            assert!(
                out.ok() && out.stdout.trim().is_empty(),
                "{test}: memfs after remount: {}{}",
                out.stdout,
                out.stderr
            );
        }
    }
    let out = Cmd::new("touch").arg(m.mnt.join("after")).timeout(PROMPT).run();
    assert!(out.ok(), "{test}: the new mount does not work: {}", out.stderr);
}

#[test]
fn stackfs_daemon_killed_mid_write() {
    kill_mid_write(Fs::Stackfs, "stackfs_daemon_killed_mid_write", &[]);
}

#[test]
fn stackfs_passthrough_off_daemon_killed_mid_write() {
    kill_mid_write(Fs::Stackfs, "stackfs_passthrough_off_daemon_killed_mid_write", &["--passthrough", "off"]);
}

#[test]
fn stackfs_uring_daemon_killed_mid_write() {
    kill_mid_write(Fs::Stackfs, "stackfs_uring_daemon_killed_mid_write", &["--transport", "uring"]);
}

#[test]
fn memfs_daemon_killed_mid_write() {
    kill_mid_write(Fs::Memfs, "memfs_daemon_killed_mid_write", &[]);
}

#[test]
fn memfs_uring_daemon_killed_mid_write() {
    kill_mid_write(Fs::Memfs, "memfs_uring_daemon_killed_mid_write", &["--transport", "uring"]);
}

//! The FUSE-over-io_uring transport under the end-to-end suites: this binary
//! compiles the e2e, differential and fio suites again, and the harness mounts
//! everything in it with `--transport uring` (`common::test_transport`: the
//! crate name is `uring`). Every other test binary runs with uring too when
//! `EFUSE_TEST_TRANSPORT=uring` is set.
//!
//! Tests skip, saying why, when the kernel cannot do FUSE over io_uring
//! (before Linux 6.14, no CONFIG_FUSE_IO_URING, or
//! /sys/module/fuse/parameters/enable_uring not `Y`); under `CI` they must
//! run (scripts/setup.sh turns enable_uring on).
//!
//! Beside the suites: the daemon reports the transport it uses, and a
//! request that blocks (a SETLKW waiting for a lock) does not hold up the
//! requests queued behind it on the same CPU's ring queue.

// The suites, as they are; each one's `mod common;` resolves to tests/common,
// so the harness is compiled once per suite (it keeps names unique across copies).
#![allow(clippy::duplicate_mod)]

#[path = "differential.rs"]
mod differential;
#[path = "e2e.rs"]
mod e2e;
#[path = "fio.rs"]
mod fio;

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{require_fuse, require_tools, wait_until, Background, Cmd, Fs, MountSpec, Mounted};

#[test]
fn uring_stats_report_the_transport() {
    let test = "uring_stats_report_the_transport";
    if !require_fuse(test) {
        return;
    }
    // `auto` picks uring when the kernel offers it, except when the daemon
    // keeps the locks (`--locks daemon`, the plain profile): a waiting lock
    // would hold a ring entry. `dev` keeps /dev/fuse.
    let cases: [(Fs, &[&str], &str); 5] = [
        (Fs::Memfs, &["--transport", "uring"], "uring"),
        (Fs::Stackfs, &["--transport", "auto"], "uring"),
        (Fs::Memfs, &["--transport", "dev"], "dev"),
        (Fs::Stackfs, &["--profile", "plain", "--transport", "auto"], "dev"),
        (Fs::Memfs, &["--locks", "daemon", "--transport", "auto"], "dev"),
    ];
    for (fs_kind, args, want) in cases {
        let spec = args.iter().fold(MountSpec::default(), |s, a| s.arg(a));
        let m = Mounted::with(fs_kind, test, spec, |_| {});
        common::sh("echo hi > f && cat f && ls -l >/dev/null", &m.mnt).ok();
        let v = m.stats();
        assert_eq!(v["transport"].as_str(), Some(want), "{test}: {} {args:?}: stats: {v}", fs_kind.name());
    }
}

/// `dd` of `file` with O_DIRECT pinned to `cpu`, so its requests go to that
/// CPU's ring queue; returns how long it took.
fn direct_read(cpu: &str, file: &Path, cwd: &Path) -> Duration {
    let start = Instant::now();
    Cmd::new("taskset")
        .args(["-c", cpu, "dd", "bs=4k", "count=64", "iflag=direct", "of=/dev/null"])
        .arg(format!("if={}", file.display()))
        .cwd(cwd)
        .timeout(Duration::from_secs(30))
        .ok();
    start.elapsed()
}

const LOCK: &str = "import fcntl, os, sys, time
f = open(sys.argv[1], 'r+')
fcntl.lockf(f, fcntl.LOCK_EX)
open(sys.argv[2], 'w').close()
time.sleep(float(sys.argv[3]))
";

/// A SETLKW that must wait (locks kept by the daemon) leaves its ring queue
/// free: O_DIRECT reads of another file from the same CPU finish while it
/// waits, the waiter gets the lock once it is released, and a waiter killed
/// while blocked (INTERRUPT) does not wedge the queue or the unmount.
#[test]
fn uring_blocked_setlkw_does_not_stall_reads() {
    let test = "uring_blocked_setlkw_does_not_stall_reads";
    if !require_fuse(test) || !require_tools(test, &["python3", "taskset", "dd"]) {
        return;
    }
    let spec =
        MountSpec::default().arg("--transport").arg("uring").arg("--locks").arg("daemon").arg("--cache").arg("none");
    let m = Mounted::with(Fs::Memfs, test, spec, |_| {});
    let (lock, data) = (m.mnt.join("lock"), m.mnt.join("data"));
    std::fs::write(&lock, b"x").expect("create lock file");
    std::fs::write(&data, vec![7u8; 256 * 1024]).expect("create data file");
    let marker = |name: &str| m.scratch.join(name);
    let arg = |p: &Path| p.display().to_string();

    let _holder = Background::spawn(
        "taskset",
        &["-c", "0", "python3", "-c", LOCK, &arg(&lock), &arg(&marker("held")), "60"],
        &m.scratch,
    );
    assert!(wait_until(Duration::from_secs(10), || marker("held").exists()), "{test}: the holder never got the lock");
    let mut waiter = Background::spawn(
        "taskset",
        &["-c", "0", "python3", "-c", LOCK, &arg(&lock), &arg(&marker("got")), "0"],
        &m.scratch,
    );
    let victim = Background::spawn(
        "taskset",
        &["-c", "0", "python3", "-c", LOCK, &arg(&lock), &arg(&marker("victim")), "0"],
        &m.scratch,
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(!marker("got").exists(), "{test}: the waiter got a lock that is held");

    // Reads from the waiters' CPU: each is a round trip through queue 0.
    for _ in 0..5 {
        let took = direct_read("0", &data, &m.scratch);
        assert!(
            took < Duration::from_secs(5),
            "{test}: 256 KiB of O_DIRECT reads took {took:?} behind a blocked SETLKW"
        );
    }
    assert!(!marker("got").exists(), "{test}: the waiter got a lock that is still held");

    // A waiter killed while blocked: the kernel interrupts its SETLKW.
    drop(victim);
    let took = direct_read("0", &data, &m.scratch);
    assert!(took < Duration::from_secs(5), "{test}: reads after an interrupted SETLKW took {took:?}");

    drop(_holder);
    assert!(waiter.wait(Duration::from_secs(10)).is_some(), "{test}: the waiter never got the released lock");
    assert!(marker("got").exists(), "{test}: the waiter exited without the lock");
    let v = m.stats();
    assert_eq!(v["transport"].as_str(), Some("uring"), "{test}: stats: {v}");
    let setlkw = v["opcodes"]["SETLKW"]["count"].as_u64().unwrap_or(0);
    assert!(setlkw >= 2, "{test}: the blocking locks never reached the daemon (SETLKW {setlkw}): {v}");
}

//! Data integrity under fio: random read/write with crc32c verification on
//! memfs and stackfs, buffered and with O_DIRECT (which bypasses the page
//! cache, so every verified block has made the round trip through the
//! daemon). Every block fio reads back must carry the checksum it wrote.

mod common;

use std::time::Duration;

use common::{require_fuse, require_tools, Cmd, Fs, MountSpec, Mounted};

const FIO_TIMEOUT: Duration = Duration::from_secs(300);
const JOBS: usize = 2;

/// Runs a verifying fio job in the mount and requires a clean result.
fn fio_verify(test: &str, fs_kind: Fs, extra: &[&str]) {
    if !require_fuse(test) || !require_tools(test, &["fio"]) {
        return;
    }
    // memfs must hold 2 x 64 MiB of job files plus slack.
    let spec = match fs_kind {
        Fs::Memfs => MountSpec::default().arg("--size").arg(&(1u64 << 30).to_string()),
        Fs::Stackfs => MountSpec::default(),
    };
    let m = Mounted::with(fs_kind, test, spec, |_| {});
    let out = Cmd::new("fio")
        .args([
            "--name=v",
            "--rw=randrw",
            "--bs=4k",
            "--size=64M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--numjobs=2",
            "--ioengine=psync",
            "--randseed=1234",
        ])
        .arg(format!("--directory={}", m.mnt.display()))
        .args(extra)
        .cwd(&m.scratch)
        .timeout(FIO_TIMEOUT)
        .run();
    let all = format!("{}\n{}", out.stdout, out.stderr);
    assert!(out.ok(), "{test}: fio exited {}: {}\n{all}", out.status, out.what);
    let lower = all.to_lowercase();
    for bad in ["verify failed", "bad magic", "bad header", "verify: bad", "crc32c: verify", "fio: pid=", "io_u error"]
    {
        assert!(!lower.contains(bad), "{test}: fio reported a verify/io error ({bad:?}):\n{all}");
    }
    let clean_jobs = all.lines().filter(|l| l.contains("err= 0:")).count();
    assert_eq!(clean_jobs, JOBS, "{test}: expected {JOBS} jobs reporting err= 0:\n{all}");
}

#[test]
fn memfs_fio_randrw_crc32c_verify() {
    fio_verify("memfs_fio_randrw_crc32c_verify", Fs::Memfs, &[]);
}

#[test]
fn memfs_fio_randrw_crc32c_verify_direct_io() {
    fio_verify("memfs_fio_randrw_crc32c_verify_direct_io", Fs::Memfs, &["--direct=1"]);
}

#[test]
fn stackfs_fio_randrw_crc32c_verify() {
    fio_verify("stackfs_fio_randrw_crc32c_verify", Fs::Stackfs, &[]);
}

#[test]
fn stackfs_fio_randrw_crc32c_verify_direct_io() {
    fio_verify("stackfs_fio_randrw_crc32c_verify_direct_io", Fs::Stackfs, &["--direct=1"]);
}

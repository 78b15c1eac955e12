//! The request-rate microbenchmark: how many FUSE requests per second a
//! transport carries, and how long each waits, with the kernel's caches out of
//! the way.
//!
//! memfs is mounted with `--cache none` (every stat is a LOOKUP round trip)
//! once per transport (`dev`: /dev/fuse workers; `uring`: FUSE-over-io_uring),
//! and 1 and 2 client threads run for a fixed time:
//! - `stat`: stat(2) of names never stat'ed before in the run (round robin
//!   over a prepared set larger than what one run reaches twice in a row);
//! - `read4k`: 4 KiB O_DIRECT preads at random aligned offsets of a 64 MiB file
//!   (memfs answers O_DIRECT opens with FOPEN_DIRECT_IO: one READ per call).
//!
//! Each operation is timed on its own (CLOCK_MONOTONIC); ops/s is the total
//! over the wall time, p50/p99 are exact order statistics of all samples.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

use crate::exec;

/// Files the stat clients walk over.
const STAT_FILES: usize = 20_000;
/// Size of the file the read clients read.
const READ_FILE: u64 = 64 << 20;

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct RateResult {
    pub transport: String,
    pub workload: String,
    pub threads: usize,
    pub ops_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// FUSE requests the daemon served during the run (from `efuse stats`).
    pub requests: u64,
}

/// Whether the kernel can run FUSE-over-io_uring here.
pub fn uring_enabled() -> bool {
    std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring").map(|s| s.trim() == "Y").unwrap_or(false)
}

fn requests_total(efuse: &Path, mnt: &Path) -> Result<u64> {
    let out = exec::run(Command::new(efuse).arg("stats").arg(mnt).arg("--json"), Duration::from_secs(20))?;
    let v: serde_json::Value = serde_json::from_str(&out.stdout).context("efuse stats --json")?;
    v["requests_total"].as_u64().ok_or_else(|| anyhow!("efuse stats: no requests_total"))
}

/// Runs `threads` clients of `op` for `secs`, returning per-op latencies (ns)
/// and the wall time.
fn drive(threads: usize, secs: f64, op: impl Fn(usize, u64) -> Result<()> + Sync) -> Result<(Vec<u64>, f64)> {
    let stop = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let results: Vec<Result<Vec<u64>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let op = &op;
                s.spawn(move || {
                    let mut lat = Vec::with_capacity(1 << 20);
                    let mut i = 0u64;
                    while Instant::now() < stop && !crate::interrupted() {
                        let t0 = Instant::now();
                        op(t, i)?;
                        lat.push(t0.elapsed().as_nanos() as u64);
                        i += 1;
                    }
                    Ok(lat)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("client thread panicked")))).collect()
    });
    let wall = start.elapsed().as_secs_f64();
    let mut all = Vec::new();
    for r in results {
        all.extend(r?);
    }
    Ok((all, wall))
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64 / 1000.0
}

fn stat_path(dir: &Path, i: usize) -> CString {
    // Paths are built by the bench from ASCII names: no NUL inside.
    CString::new(dir.join(format!("s{i:05}")).as_os_str().as_bytes()).unwrap_or_default()
}

/// Measures one transport: mounts memfs, prepares files, runs every
/// (workload, threads) pair, unmounts.
fn measure_transport(
    efuse: &Path,
    work: &Path,
    transport: &str,
    secs: f64,
    reps: u32,
    log: &mut dyn FnMut(String),
) -> Result<Vec<RateResult>> {
    let mnt = work.join(format!("rate-{transport}"));
    std::fs::create_dir_all(&mnt).with_context(|| format!("creating {}", mnt.display()))?;
    if efuse::mount::find_mount(&mnt).is_some() {
        bail!("{} is already mounted; unmount it first", mnt.display());
    }
    let mut mount = Command::new(efuse);
    mount.args(["mount", "memfs"]).arg(&mnt).args(["--size", "1G", "--cache", "none", "--transport", transport]);
    exec::run(&mut mount, Duration::from_secs(60)).with_context(|| format!("mounting memfs with {transport}"))?;
    let conn = efuse::mount::find_mount(&mnt).and_then(|m| m.connection());
    let result = exec::guarded(Duration::from_secs(600), conn, || {
        let dir = mnt.join("s");
        std::fs::create_dir_all(&dir)?;
        for i in 0..STAT_FILES {
            std::fs::write(dir.join(format!("s{i:05}")), b"x")?;
        }
        let data = mnt.join("data");
        let block = vec![0x5au8; 1 << 20];
        let mut f = std::fs::File::create(&data)?;
        for _ in 0..(READ_FILE >> 20) {
            std::io::Write::write_all(&mut f, &block)?;
        }
        drop(f);
        let paths: Vec<CString> = (0..STAT_FILES).map(|i| stat_path(&dir, i)).collect();
        let mut out = Vec::new();
        for workload in ["stat", "read4k"] {
            for threads in [1usize, 2] {
                let mut runs = Vec::new();
                for _ in 0..reps {
                    let before = requests_total(efuse, &mnt)?;
                    let (mut lat, wall) = match workload {
                        "stat" => drive(threads, secs, |t, i| {
                            // Each thread walks its own half, never the same name twice in a row.
                            let n = (t * STAT_FILES / 2 + (i as usize)) % STAT_FILES;
                            // SAFETY: stat(2) on a NUL-terminated path into a local buffer.
                            let mut st: libc::stat = unsafe { std::mem::zeroed() };
                            if unsafe { libc::stat(paths[n].as_ptr(), &mut st) } != 0 {
                                bail!("stat {}: {}", paths[n].to_string_lossy(), std::io::Error::last_os_error());
                            }
                            Ok(())
                        })?,
                        _ => {
                            let cpath = CString::new(data.as_os_str().as_bytes())?;
                            let fds: Vec<i32> = (0..threads)
                                .map(|_| {
                                    // SAFETY: open(2) on a NUL-terminated path.
                                    let fd = unsafe { libc::open(cpath.as_ptr(), libc::O_RDONLY | libc::O_DIRECT) };
                                    if fd < 0 {
                                        Err(anyhow!("open O_DIRECT: {}", std::io::Error::last_os_error()))
                                    } else {
                                        Ok(fd)
                                    }
                                })
                                .collect::<Result<_>>()?;
                            let r = drive(threads, secs, |t, i| {
                                // O_DIRECT needs an aligned buffer: one 4 KiB page per call, on the stack.
                                #[repr(C, align(4096))]
                                struct Page([u8; 4096]);
                                let mut page = Page([0; 4096]);
                                let x = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (t as u64) << 40) >> 11;
                                let off = (x % (READ_FILE / 4096)) * 4096;
                                // SAFETY: pread into a live, aligned 4 KiB buffer.
                                let n = unsafe { libc::pread(fds[t], page.0.as_mut_ptr().cast(), 4096, off as i64) };
                                if n != 4096 {
                                    bail!("pread at {off}: {n} ({})", std::io::Error::last_os_error());
                                }
                                Ok(())
                            });
                            for fd in fds {
                                // SAFETY: closing descriptors we opened.
                                unsafe { libc::close(fd) };
                            }
                            r?
                        }
                    };
                    let requests = requests_total(efuse, &mnt)?.saturating_sub(before);
                    lat.sort_unstable();
                    runs.push(RateResult {
                        transport: transport.to_string(),
                        workload: workload.to_string(),
                        threads,
                        ops_per_sec: lat.len() as f64 / wall,
                        p50_us: percentile(&lat, 0.50),
                        p99_us: percentile(&lat, 0.99),
                        requests,
                    });
                }
                // Median repetition by throughput.
                runs.sort_by(|a, b| a.ops_per_sec.total_cmp(&b.ops_per_sec));
                let median = runs.swap_remove(runs.len() / 2);
                out.push(median);
            }
        }
        Ok(out)
    });
    let mut umount = Command::new(efuse);
    umount.arg("umount").arg(&mnt);
    if let Err(e) = exec::run(&mut umount, Duration::from_secs(60)) {
        log(format!("unmounting {}: {e:#}; aborting it", mnt.display()));
        if let Some(c) = efuse::mount::find_mount(&mnt).and_then(|m| m.connection()) {
            let _ = efuse::mount::abort_connection(c);
        }
        let _ = efuse::mount::unmount(&mnt, true);
    }
    result
}

/// Runs the microbenchmark for every available transport.
pub fn run(efuse: &Path, work: &Path, quick: bool, log: &mut dyn FnMut(String)) -> Result<Vec<RateResult>> {
    let (secs, reps) = if quick { (1.0, 1) } else { (4.0, 3) };
    let mut transports = vec!["dev"];
    if uring_enabled() {
        transports.push("uring");
    } else {
        log("request-rate: FUSE-over-io_uring is off (/sys/module/fuse/parameters/enable_uring); measuring dev only"
            .into());
    }
    let mut out = Vec::new();
    for t in transports {
        out.extend(measure_transport(efuse, work, t, secs, reps, log)?);
    }
    Ok(out)
}

/// The markdown table of the results, with uring's ratio to dev.
pub fn markdown(results: &[RateResult]) -> String {
    let mut s = String::from(
        "| workload | threads | transport | ops/s | p50 µs | p99 µs | FUSE requests | ops/s vs dev |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        let dev = results
            .iter()
            .find(|d| d.transport == "dev" && d.workload == r.workload && d.threads == r.threads)
            .map(|d| d.ops_per_sec);
        let ratio = dev.filter(|d| *d > 0.0).map(|d| format!("{:.2}x", r.ops_per_sec / d)).unwrap_or_default();
        s.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.1} | {:.1} | {} | {} |\n",
            r.workload, r.threads, r.transport, r.ops_per_sec, r.p50_us, r.p99_us, r.requests, ratio
        ));
    }
    s
}

/// Where the rate results go beside the main report.
pub fn out_paths(out: &Path) -> (PathBuf, PathBuf) {
    (out.join("transport.md"), out.join("transport.json"))
}

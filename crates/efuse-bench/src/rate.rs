//! The request-rate microbenchmark: how many FUSE requests per second a
//! transport carries, how long each waits, and what each costs the daemon,
//! with the kernel's caches out of the way.
//!
//! memfs is mounted with `--cache none` (entry and attribute timeouts 0)
//! once per transport (`dev`: /dev/fuse workers; `uring`: FUSE-over-io_uring),
//! both mounts live at once, and 1, 2 and 4 client threads run each
//! operation for a fixed time, the transports taking turns within each
//! repetition:
//! - `stat`: stat(2) of a path `s/NAME` (LOOKUP of `s`, LOOKUP of the name,
//!   GETATTR: uncached metadata as a program sees it);
//! - `lookup`: readlinkat(2) of a regular file's name relative to an open
//!   directory (one LOOKUP; EINVAL without another request);
//! - `getattr`: fstat(2) of an open file (one GETATTR);
//! - `open`: openat(2) of a name relative to an open directory and close
//!   (LOOKUP and OPEN waited for; RELEASE follows without a wait);
//! - `read4k`: 4 KiB O_DIRECT preads at random aligned offsets of a 64 MiB file
//!   (memfs answers O_DIRECT opens with FOPEN_DIRECT_IO: one READ per call).
//!
//! Names are walked round robin over a prepared set larger than what a run
//! reaches twice in a row. Each operation is timed on its own
//! (CLOCK_MONOTONIC); ops/s is the total over the wall time, p50/p99 are exact
//! order statistics of all samples; requests per operation come from the
//! daemon's counters, its CPU time from /proc/PID/stat and its threads'
//! context switches (voluntary: waiting for work; involuntary: preempted)
//! from /proc/PID/task/*/status.

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
    pub requests_per_op: f64,
    /// The daemon's CPU time (user + system) over the run, per request.
    pub daemon_cpu_us_per_request: f64,
    /// The daemon's threads' voluntary context switches (blocking, e.g.
    /// waiting for the next request) per request served.
    pub daemon_sleeps_per_request: f64,
    /// The daemon's threads' involuntary context switches (preempted, e.g.
    /// by the client its reply woke) per request served.
    pub daemon_preempted_per_request: f64,
}

/// Whether the kernel can run FUSE-over-io_uring here.
pub fn uring_enabled() -> bool {
    std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring").map(|s| s.trim() == "Y").unwrap_or(false)
}

/// `efuse stats --json` of the mount.
fn stats_json(efuse: &Path, mnt: &Path) -> Result<serde_json::Value> {
    let out = exec::run(Command::new(efuse).arg("stats").arg(mnt).arg("--json"), Duration::from_secs(20))?;
    serde_json::from_str(&out.stdout).context("efuse stats --json")
}

fn requests_total(efuse: &Path, mnt: &Path) -> Result<u64> {
    stats_json(efuse, mnt)?["requests_total"].as_u64().ok_or_else(|| anyhow!("efuse stats: no requests_total"))
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

fn per_request(n: u64, requests: u64) -> f64 {
    if requests == 0 {
        0.0
    } else {
        n as f64 / requests as f64
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64 / 1000.0
}

/// The client operations measured, each chosen to cost a known set of
/// requests with `--cache none` (the table reports requests per operation).
pub const WORKLOADS: [&str; 5] = ["stat", "lookup", "getattr", "open", "read4k"];
/// Client threads per run.
pub const THREADS: [usize; 3] = [1, 2, 4];

/// The daemon's CPU time so far (user + system, all threads, exited ones
/// included), from /proc/PID/stat.
fn daemon_cpu_secs(pid: u32) -> Result<f64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow!("/proc/{pid}/stat: no ')'"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
    let ticks: u64 = f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// The daemon's context switches so far, summed over its live threads:
/// (voluntary, involuntary). A thread that exits during a run takes its
/// counts with it, which only undercounts.
fn daemon_switches(pid: u32) -> Result<(u64, u64)> {
    let threads = efuse::observe::process_threads(&pid.to_string());
    if threads.is_empty() {
        bail!("no threads of process {pid} in /proc/{pid}/task");
    }
    Ok(threads.iter().fold((0, 0), |(v, n), t| (v + t.voluntary, n + t.involuntary)))
}

fn daemon_pid(efuse: &Path, mnt: &Path) -> Result<u32> {
    stats_json(efuse, mnt)?["pid"].as_u64().map(|p| p as u32).ok_or_else(|| anyhow!("efuse stats: no pid"))
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| anyhow!("{} holds a NUL byte", p.display()))
}

fn errno_err(what: &str) -> anyhow::Error {
    anyhow!("{what}: {}", std::io::Error::last_os_error())
}

/// Runs one (workload, threads) pair once on a prepared mount.
fn measure_once(workload: &str, threads: usize, secs: f64, mnt: &Path, names: &[CString]) -> Result<(Vec<u64>, f64)> {
    let dir = cstr(&mnt.join("s"))?;
    let data = cstr(&mnt.join("data"))?;
    // Per-thread descriptors: the stat directory (for the *at calls) and the
    // data file (O_DIRECT for read4k).
    let mut fds: Vec<i32> = Vec::new();
    let close_all = |fds: &[i32]| {
        for &fd in fds {
            // SAFETY: closing descriptors this function opened.
            unsafe { libc::close(fd) };
        }
    };
    for _ in 0..threads {
        let (path, flags) = match workload {
            "read4k" => (&data, libc::O_RDONLY | libc::O_DIRECT),
            "getattr" => (&data, libc::O_RDONLY),
            _ => (&dir, libc::O_RDONLY | libc::O_DIRECTORY),
        };
        // SAFETY: open(2) on a NUL-terminated path.
        let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
        if fd < 0 {
            let e = errno_err("open");
            close_all(&fds);
            return Err(e);
        }
        fds.push(fd);
    }
    let stat_paths: Vec<CString> = if workload == "stat" {
        names
            .iter()
            .map(|n| cstr(&mnt.join("s").join(std::ffi::OsStr::from_bytes(n.as_bytes()))))
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    let n = names.len();
    let r = drive(threads, secs, |t, i| {
        // Each thread walks its own part of the names, never the same name twice in a row.
        let name = &names[(t * n / threads + i as usize) % n];
        match workload {
            "stat" => {
                let path = &stat_paths[(t * n / threads + i as usize) % n];
                // SAFETY: stat(2) on a NUL-terminated path into a local buffer.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                if unsafe { libc::stat(path.as_ptr(), &mut st) } != 0 {
                    bail!("stat: {}", std::io::Error::last_os_error());
                }
            }
            "lookup" => {
                // readlinkat(2) of a regular file resolves the name (one
                // LOOKUP) and fails with EINVAL without another request.
                let mut buf = [0u8; 16];
                // SAFETY: readlinkat(2) relative to an open directory into a local buffer.
                let n = unsafe { libc::readlinkat(fds[t], name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
                let errno = std::io::Error::last_os_error().raw_os_error();
                if n >= 0 || errno != Some(libc::EINVAL) {
                    bail!("readlinkat of a regular file: {n} ({})", std::io::Error::last_os_error());
                }
            }
            "getattr" => {
                // SAFETY: fstat(2) of an open descriptor into a local buffer.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                if unsafe { libc::fstat(fds[t], &mut st) } != 0 {
                    return Err(errno_err("fstat"));
                }
            }
            "open" => {
                // SAFETY: openat(2) relative to an open directory; the descriptor is closed at once.
                let fd = unsafe { libc::openat(fds[t], name.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
                if fd < 0 {
                    return Err(errno_err("openat"));
                }
                // SAFETY: closing the descriptor just opened.
                unsafe { libc::close(fd) };
            }
            _ => {
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
            }
        }
        Ok(())
    });
    close_all(&fds);
    r
}

/// One transport's memfs mount, prepared for the clients.
struct Prepared {
    transport: &'static str,
    mnt: PathBuf,
    pid: u32,
    names: Vec<CString>,
}

/// Mounts memfs with `transport` at `work/rate-TRANSPORT` and writes the
/// files the clients use. On error the mount (if made) is left for
/// [`unmount_all`].
fn mount_transport(efuse: &Path, work: &Path, transport: &'static str, mounted: &mut Vec<PathBuf>) -> Result<Prepared> {
    let mnt = work.join(format!("rate-{transport}"));
    std::fs::create_dir_all(&mnt).with_context(|| format!("creating {}", mnt.display()))?;
    if efuse::mount::find_mount(&mnt).is_some() {
        bail!("{} is already mounted; unmount it first", mnt.display());
    }
    let mut mount = Command::new(efuse);
    mount.args(["mount", "memfs"]).arg(&mnt).args(["--size", "1G", "--cache", "none", "--transport", transport]);
    exec::run(&mut mount, Duration::from_secs(60)).with_context(|| format!("mounting memfs with {transport}"))?;
    mounted.push(mnt.clone());
    let conn = efuse::mount::find_mount(&mnt).and_then(|m| m.connection());
    exec::guarded(Duration::from_secs(600), conn, || {
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
        let names: Vec<CString> =
            (0..STAT_FILES).map(|i| CString::new(format!("s{i:05}")).unwrap_or_default()).collect();
        let pid = daemon_pid(efuse, &mnt)?;
        Ok(Prepared { transport, mnt: mnt.clone(), pid, names })
    })
}

/// One repetition of (workload, threads) on a prepared mount.
fn measure_rep(efuse: &Path, p: &Prepared, workload: &str, threads: usize, secs: f64) -> Result<RateResult> {
    let conn = efuse::mount::find_mount(&p.mnt).and_then(|m| m.connection());
    exec::guarded(Duration::from_secs(120), conn, || {
        let before = requests_total(efuse, &p.mnt)?;
        let cpu_before = daemon_cpu_secs(p.pid)?;
        let sw_before = daemon_switches(p.pid)?;
        let (mut lat, wall) = measure_once(workload, threads, secs, &p.mnt, &p.names)?;
        let cpu = daemon_cpu_secs(p.pid)? - cpu_before;
        let sw_after = daemon_switches(p.pid)?;
        // The stats call itself is one request to the daemon's control
        // socket, not a FUSE request: nothing to subtract.
        let requests = requests_total(efuse, &p.mnt)?.saturating_sub(before);
        lat.sort_unstable();
        Ok(RateResult {
            transport: p.transport.to_string(),
            workload: workload.to_string(),
            threads,
            ops_per_sec: lat.len() as f64 / wall,
            p50_us: percentile(&lat, 0.50),
            p99_us: percentile(&lat, 0.99),
            requests,
            requests_per_op: if lat.is_empty() { 0.0 } else { requests as f64 / lat.len() as f64 },
            daemon_cpu_us_per_request: if requests == 0 { 0.0 } else { cpu * 1e6 / requests as f64 },
            daemon_sleeps_per_request: per_request(sw_after.0.saturating_sub(sw_before.0), requests),
            daemon_preempted_per_request: per_request(sw_after.1.saturating_sub(sw_before.1), requests),
        })
    })
}

/// Unmounts every mount this benchmark made (aborting one that will not go).
fn unmount_all(efuse: &Path, mounted: &[PathBuf], log: &mut dyn FnMut(String)) {
    for mnt in mounted {
        let mut umount = Command::new(efuse);
        umount.arg("umount").arg(mnt);
        if let Err(e) = exec::run(&mut umount, Duration::from_secs(60)) {
            log(format!("unmounting {}: {e:#}; aborting it", mnt.display()));
            if let Some(c) = efuse::mount::find_mount(mnt).and_then(|m| m.connection()) {
                let _ = efuse::mount::abort_connection(c);
            }
            let _ = efuse::mount::unmount(mnt, true);
        }
    }
}

/// Mounts one memfs per transport, then runs every (workload, threads)
/// pair `reps` times with the transports taking turns within each
/// repetition (dev, uring, dev, uring, ...), so that whatever drifts over
/// the run (the host behind this machine, background work) weighs on both
/// alike; reports the median repetition of each by throughput.
fn measure_all(
    efuse: &Path,
    work: &Path,
    transports: &[&'static str],
    secs: f64,
    reps: u32,
    log: &mut dyn FnMut(String),
) -> Result<Vec<RateResult>> {
    let mut mounted = Vec::new();
    let result = (|| {
        let mut prepared = Vec::new();
        for t in transports {
            prepared.push(mount_transport(efuse, work, t, &mut mounted)?);
        }
        let mut out = Vec::new();
        for workload in WORKLOADS {
            for threads in THREADS {
                let mut runs: Vec<Vec<RateResult>> = vec![Vec::new(); prepared.len()];
                for _ in 0..reps {
                    for (i, p) in prepared.iter().enumerate() {
                        if crate::interrupted() {
                            bail!("interrupted");
                        }
                        runs[i].push(measure_rep(efuse, p, workload, threads, secs)?);
                    }
                }
                for mut r in runs {
                    // Median repetition by throughput.
                    r.sort_by(|a, b| a.ops_per_sec.total_cmp(&b.ops_per_sec));
                    let m = r.swap_remove(r.len() / 2);
                    log(format!(
                        "transport-rate {} {} x{}: {:.0} ops/s, p50 {:.1} µs",
                        m.transport, m.workload, m.threads, m.ops_per_sec, m.p50_us
                    ));
                    out.push(m);
                }
            }
        }
        // Grouped by transport, as the table reads.
        out.sort_by_key(|r| transports.iter().position(|t| *t == r.transport));
        Ok(out)
    })();
    unmount_all(efuse, &mounted, log);
    result
}

/// Runs the microbenchmark for every available transport.
pub fn run(efuse: &Path, work: &Path, quick: bool, log: &mut dyn FnMut(String)) -> Result<Vec<RateResult>> {
    let (secs, reps) = if quick { (0.5, 1) } else { (2.0, 3) };
    let mut transports = vec!["dev"];
    if uring_enabled() {
        transports.push("uring");
    } else {
        log("request-rate: FUSE-over-io_uring is off (/sys/module/fuse/parameters/enable_uring); measuring dev only"
            .into());
    }
    measure_all(efuse, work, &transports, secs, reps, log)
}

/// The markdown table of the results, with uring's ratio to dev.
pub fn markdown(results: &[RateResult]) -> String {
    let mut s = String::from(
        "| workload | threads | transport | ops/s | p50 µs | p99 µs | requests/op | daemon CPU µs/request | daemon sleeps/request | daemon preempted/request | ops/s vs dev |\n\
         |---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        let dev = results
            .iter()
            .find(|d| d.transport == "dev" && d.workload == r.workload && d.threads == r.threads)
            .map(|d| d.ops_per_sec);
        let ratio = dev.filter(|d| *d > 0.0).map(|d| format!("{:.2}x", r.ops_per_sec / d)).unwrap_or_default();
        s.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.2} | {:.1} | {:.2} | {:.2} | {} |\n",
            r.workload,
            r.threads,
            r.transport,
            r.ops_per_sec,
            r.p50_us,
            r.p99_us,
            r.requests_per_op,
            r.daemon_cpu_us_per_request,
            r.daemon_sleeps_per_request,
            r.daemon_preempted_per_request,
            ratio
        ));
    }
    s
}

/// Where the rate results go beside the main report.
pub fn out_paths(out: &Path) -> (PathBuf, PathBuf) {
    (out.join("transport.md"), out.join("transport.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_switches_are_counted() {
        let pid = std::process::id();
        assert!(daemon_switches(pid).is_ok(), "reading our own /proc");
        // This thread's own count: the process's sum drops when another
        // test's thread exits meanwhile.
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        let mine =
            || efuse::observe::process_threads(&pid.to_string()).iter().find(|t| t.tid == tid).map(|t| t.voluntary);
        let v0 = mine().expect("this thread in /proc");
        std::thread::sleep(std::time::Duration::from_millis(5));
        let v1 = mine().expect("this thread in /proc");
        assert!(v1 > v0, "sleeping is a voluntary switch: {v0} -> {v1}");
    }

    #[test]
    fn per_request_of_nothing_is_zero() {
        assert_eq!(per_request(5, 0), 0.0);
        assert_eq!(per_request(3, 2), 1.5);
    }
}

//! stress-ng's file system stressors, one instance each, all at once, on an
//! ext4 directory, on memfs and on stackfs: the mounts must give no error
//! (and skip no stressor) that ext4 does not give too.
//!
//! While the load runs, a canary keeps creating, renaming, reading and
//! removing files on the mount: a daemon out of descriptors (stackfs before
//! open files' descriptors were bounded: the open stressor alone holds
//! thousands of files) fails it. Afterwards, once stress-ng's files are gone
//! and the kernel has forgotten its inodes (`drop_caches` sends FORGET), the
//! daemon must be back where it started: the same inode count and memfs's
//! same data bytes, exactly, and its memory (VmRSS) within a stated margin.
//!
//! CI runs each for 10 s; `EFUSE_STRESS_SECS=60` runs longer.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{require_fuse, require_tools, Cmd, Fs, MountSpec, Mounted, TempDir};

/// The stressors, one instance each (stress-ng 0.15, Debian 12).
const STRESSORS: [&str; 14] = [
    "dir",
    "dentry",
    "rename",
    "link",
    "symlink",
    "hdd",
    "flock",
    "fcntl",
    "fallocate",
    "xattr",
    "seek",
    "sync-file",
    "open",
    "utime",
];

/// Sizes that keep memfs's share of the load in memory modest (the same on
/// every side, so the comparison stays fair).
const SIZES: [&str; 8] =
    ["--hdd-bytes", "128M", "--fallocate-bytes", "64M", "--sync-file-bytes", "64M", "--seek-size", "64M"];

/// The stackfs daemon's descriptor limit during the run: fixed, so the run
/// means the same on every machine (the open stressor alone holds more files
/// than this).
const STACKFS_NOFILE: u64 = 1024;

/// How far VmRSS may stay above its baseline once the load is over: 32 MiB,
/// and 1 MiB more per second of load. Freed memory goes back to the system
/// only in whole free pages (memfs has glibc trim its arenas after freeing
/// file data: a 10 s run kept 364 MiB before that, 7 MiB after), so pages
/// that still hold a few live small allocations stay resident in each
/// thread's arena, and the more inodes a run made (the longer it ran), the
/// more such pages; hash tables keep the capacity they grew to; each worker
/// keeps an I/O buffer as large as the largest request (1 MiB). Measured on
/// top of a 21 MiB baseline: 4-7 MiB after 10 s runs, 32-60 MiB (memfs) and
/// 45 MiB (stackfs) after 60 s runs; five 15 s rounds of the open stressor
/// on one memfs mount kept 35-38 MiB, not growing round over round, as a
/// leak would. Leaks of what a file system counts (inodes, data, descriptors)
/// are caught exactly by the checks before this one.
fn rss_margin_kib(secs: u64) -> u64 {
    (32 + secs) * 1024
}

fn stress_secs() -> u64 {
    std::env::var("EFUSE_STRESS_SECS").ok().and_then(|s| s.parse().ok()).filter(|&s| s > 0).unwrap_or(10)
}

/// One stressor's line of stress-ng's metrics.
#[derive(Debug, Clone)]
struct Metric {
    bogo_ops: u64,
    real_secs: f64,
}

/// What one stress-ng run said.
#[derive(Debug, Default)]
struct Run {
    exit: Option<i32>,
    /// `fail` and `error` lines, by stressor ("" when the line names none).
    problems: BTreeMap<String, Vec<String>>,
    /// Stressors that said they skip.
    skipped: BTreeSet<String>,
    metrics: BTreeMap<String, Metric>,
    secs: f64,
    output: String,
}

/// The parts of `stress-ng: LEVEL: [PID] REST`.
fn split_line(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix("stress-ng:")?.trim_start();
    let (level, rest) = rest.split_once(':')?;
    let rest = rest.trim_start();
    let rest = match rest.strip_prefix('[') {
        Some(r) => r.split_once(']').map(|(_, r)| r.trim_start()).unwrap_or(r),
        None => rest,
    };
    Some((level.trim(), rest))
}

fn parse(output: &str) -> Run {
    let mut run = Run { output: output.to_string(), ..Run::default() };
    for line in output.lines() {
        let Some((level, rest)) = split_line(line) else { continue };
        let stressor = rest.split_once(':').map(|(s, _)| s.trim()).filter(|s| STRESSORS.contains(s)).unwrap_or("");
        match level {
            "fail" | "error" => {
                run.problems.entry(stressor.to_string()).or_default().push(rest.to_string());
            }
            "info" if rest.starts_with("failed:") || rest.contains("unsuccessful run") => {
                run.problems.entry(String::new()).or_default().push(rest.to_string());
            }
            "info" | "debug" if rest.contains("skipping stressor") => {
                run.skipped.insert(stressor.to_string());
            }
            "metrc" => {
                let t: Vec<&str> = rest.split_whitespace().collect();
                if t.len() == 7 && STRESSORS.contains(&t[0]) {
                    if let (Ok(bogo_ops), Ok(real_secs)) = (t[1].parse(), t[2].parse()) {
                        run.metrics.insert(t[0].to_string(), Metric { bogo_ops, real_secs });
                    }
                }
            }
            _ => {}
        }
    }
    run
}

/// Runs every stressor in `dir` for `secs` seconds.
fn stress(dir: &Path, secs: u64) -> Run {
    let mut args: Vec<String> = Vec::new();
    for s in STRESSORS {
        args.extend([format!("--{s}"), "1".into()]);
    }
    args.extend(SIZES.iter().map(|s| s.to_string()));
    args.extend(["--timeout".into(), format!("{secs}s"), "--metrics-brief".into(), "--temp-path".into()]);
    args.push(dir.display().to_string());
    let start = Instant::now();
    // stress-ng overruns its --timeout by a few seconds while stressors finish.
    let out = Cmd::new("stress-ng").args(&args).cwd(dir).timeout(Duration::from_secs(secs * 3 + 120)).run();
    let mut run = parse(&format!("{}{}", out.stdout, out.stderr));
    run.exit = out.code();
    run.secs = start.elapsed().as_secs_f64();
    run
}

/// Keeps working on the mount while the load runs; remembers the first
/// failure and the most descriptors the daemon held.
struct Canary {
    stop: Arc<AtomicBool>,
    failure: Arc<Mutex<Option<String>>>,
    max_fds: Arc<AtomicUsize>,
    rounds: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Canary {
    fn start(dir: PathBuf, daemon: u32) -> Canary {
        let stop = Arc::new(AtomicBool::new(false));
        let failure = Arc::new(Mutex::new(None));
        let max_fds = Arc::new(AtomicUsize::new(0));
        let rounds = Arc::new(AtomicUsize::new(0));
        let (s, f, m, r) = (stop.clone(), failure.clone(), max_fds.clone(), rounds.clone());
        let thread = std::thread::spawn(move || {
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                if let Ok(d) = fs::read_dir(format!("/proc/{daemon}/fd")) {
                    m.fetch_max(d.count(), Ordering::Relaxed);
                }
                let round = || -> std::io::Result<()> {
                    let d = dir.join(format!("c{i}"));
                    fs::create_dir(&d)?;
                    fs::write(d.join("a"), format!("canary {i}"))?;
                    fs::rename(d.join("a"), d.join("b"))?;
                    let got = fs::read_to_string(d.join("b"))?;
                    if got != format!("canary {i}") {
                        return Err(std::io::Error::other(format!("read back {got:?}")));
                    }
                    fs::remove_file(d.join("b"))?;
                    fs::remove_dir(&d)
                };
                if let Err(e) = round() {
                    f.lock().unwrap().get_or_insert(format!("round {i}: {e}"));
                }
                r.fetch_add(1, Ordering::Relaxed);
                i += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Canary { stop, failure, max_fds, rounds, thread: Some(thread) }
    }

    /// Stops it; returns (first failure, most daemon descriptors seen, rounds).
    fn finish(mut self) -> (Option<String>, usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // Its round is short unless the mount hangs; the guard handles that.
            let done = common::wait_until(Duration::from_secs(30), || t.is_finished());
            assert!(done, "the canary did not finish within 30 s of the load: the mount looks hung");
            let _ = t.join();
        }
        let failure = self.failure.lock().unwrap().take();
        (failure, self.max_fds.load(Ordering::Relaxed), self.rounds.load(Ordering::Relaxed))
    }
}

/// What the daemon holds: (inodes, data bytes, VmRSS KiB, open descriptors).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Held {
    inodes: Option<u64>,
    data_bytes: Option<u64>,
    rss_kib: u64,
    fds: usize,
}

fn held(m: &Mounted, pid: u32) -> Held {
    let stats = m.stats();
    let usage = &stats["usage"];
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for daemon {pid}"));
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    Held { inodes: usage["inodes"].as_u64(), data_bytes: usage["data_bytes"].as_u64(), rss_kib, fds }
}

/// Makes the kernel drop every unused dentry and inode (FORGET for ours)
/// until the daemon's inode count reaches `want` or 20 s pass; the count reached.
fn forget_all(m: &Mounted, pid: u32, want: Option<u64>) -> Held {
    let start = Instant::now();
    loop {
        common::drop_dentries_and_inodes();
        std::thread::sleep(Duration::from_millis(200));
        let h = held(m, pid);
        let done = match want {
            Some(w) => h.inodes.is_some_and(|n| n <= w),
            None => true,
        };
        if done || start.elapsed() > Duration::from_secs(20) {
            return h;
        }
    }
}

fn report(label: &str, run: &Run) {
    println!("{label}: stress-ng exited {:?} after {:.1} s", run.exit, run.secs);
    println!("  {:<10} {:>12} {:>9} {:>12}", "stressor", "bogo ops", "secs", "ops/s");
    for (name, m) in &run.metrics {
        let rate = if m.real_secs > 0.0 { m.bogo_ops as f64 / m.real_secs } else { 0.0 };
        println!("  {:<10} {:>12} {:>9.2} {:>12.2}", name, m.bogo_ops, m.real_secs, rate);
    }
    for (s, lines) in &run.problems {
        for l in lines {
            println!("  problem [{}]: {l}", if s.is_empty() { "-" } else { s });
        }
    }
    if !run.skipped.is_empty() {
        println!("  skipped: {:?}", run.skipped);
    }
}

/// Differences of `run` from the ext4 run, as lines; empty when none.
fn differences(fs_name: &str, run: &Run, ext4: &Run) -> Vec<String> {
    let mut out = Vec::new();
    for (stressor, lines) in &run.problems {
        if !ext4.problems.contains_key(stressor) {
            let who = if stressor.is_empty() { "stress-ng" } else { stressor };
            out.push(format!("{who} on {fs_name} (not on ext4): {}", lines.join(" | ")));
        }
    }
    for s in run.skipped.difference(&ext4.skipped) {
        out.push(format!("{s} skipped on {fs_name}, not on ext4"));
    }
    if run.exit != Some(0) && ext4.exit == Some(0) && out.is_empty() {
        out.push(format!("stress-ng exited {:?} on {fs_name}, 0 on ext4", run.exit));
    }
    for s in STRESSORS {
        if ext4.metrics.contains_key(s) && !run.metrics.contains_key(s) {
            out.push(format!("{s}: no metrics on {fs_name} (did it run?)"));
        }
    }
    out
}

/// The ext4 run every mount is compared with, made once per test binary.
fn ext4_run(secs: u64) -> &'static Run {
    static EXT4: std::sync::OnceLock<Run> = std::sync::OnceLock::new();
    EXT4.get_or_init(|| {
        let dir = TempDir::new("stress-ext4");
        let run = stress(dir.path(), secs);
        report("ext4", &run);
        assert!(!run.metrics.is_empty(), "stress-ng printed no metrics on ext4:\n{}", run.output);
        run
    })
}

fn stress_mount(fs_kind: Fs, test: &str) {
    if !require_fuse(test) || !require_tools(test, &["stress-ng", "prlimit"]) {
        return;
    }
    let secs = stress_secs();
    // One run at a time: two loads at once would measure each other.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let ext4 = ext4_run(secs);

    let nofile = format!("--nofile={STACKFS_NOFILE}:{STACKFS_NOFILE}");
    let spec = match fs_kind {
        Fs::Stackfs => MountSpec::default().wrapper(&["prlimit", &nofile]),
        Fs::Memfs => MountSpec::default(),
    };
    let m = Mounted::with(fs_kind, test, spec, |_| {});
    let pid = common::daemon_pid(&m.mnt).unwrap_or_else(|| panic!("{test}: no daemon for {}", m.mnt.display()));
    let before = forget_all(&m, pid, None);
    println!("{test}: before the load: {before:?}");

    let dir = m.mnt.join("stress");
    let canary_dir = m.mnt.join("canary");
    fs::create_dir(&dir).unwrap();
    fs::create_dir(&canary_dir).unwrap();
    let canary = Canary::start(canary_dir.clone(), pid);
    let run = stress(&dir, secs);
    let (canary_failure, max_fds, rounds) = canary.finish();
    report(fs_kind.name(), &run);
    println!("{test}: canary: {rounds} rounds; the daemon held at most {max_fds} descriptors");

    let diffs = differences(fs_kind.name(), &run, ext4);
    assert!(
        diffs.is_empty(),
        "{test}: stress-ng on {} differs from ext4:\n  {}\n--- {} output ---\n{}",
        fs_kind.name(),
        diffs.join("\n  "),
        fs_kind.name(),
        run.output
    );
    assert!(canary_failure.is_none(), "{test}: work beside the load failed: {}", canary_failure.unwrap_or_default());
    if fs_kind == Fs::Stackfs {
        assert!(
            (max_fds as u64) < STACKFS_NOFILE,
            "{test}: the daemon reached {max_fds} descriptors of its {STACKFS_NOFILE}"
        );
    }

    // The load's files go, the kernel forgets: the daemon is back at its baseline.
    let out = Cmd::new("rm").arg("-rf").arg(&dir).arg(&canary_dir).timeout(common::STEP).run();
    assert!(out.ok(), "{test}: rm -rf after the load: {}", out.stderr);
    let after = forget_all(&m, pid, before.inodes);
    println!("{test}: after the load and FORGET: {after:?}");
    assert!(before.inodes.is_some(), "{test}: {} reports no inode count", fs_kind.name());
    assert_eq!(after.inodes, before.inodes, "{test}: inodes still held after the load (leaked lookups?)");
    assert_eq!(after.data_bytes, before.data_bytes, "{test}: data bytes not back to the baseline");
    assert_eq!(after.fds, before.fds, "{test}: descriptors not back to the baseline");
    // memfs trims its allocator a moment after the data goes: give it time.
    let mut rss = after.rss_kib;
    let margin = rss_margin_kib(secs);
    common::wait_until(Duration::from_secs(5), || {
        rss = held(&m, pid).rss_kib;
        rss <= before.rss_kib + margin
    });
    println!(
        "{test}: VmRSS {} KiB before, {rss} KiB after ({:+} KiB)",
        before.rss_kib,
        rss as i64 - before.rss_kib as i64
    );
    assert!(
        rss <= before.rss_kib + margin,
        "{test}: VmRSS {rss} KiB after the load, {} KiB before: more than {margin} KiB kept",
        before.rss_kib
    );
}

#[test]
fn memfs_stress_ng_like_ext4_and_back_to_baseline() {
    stress_mount(Fs::Memfs, "memfs_stress_ng_like_ext4_and_back_to_baseline");
}

#[test]
fn stackfs_stress_ng_like_ext4_and_back_to_baseline() {
    stress_mount(Fs::Stackfs, "stackfs_stress_ng_like_ext4_and_back_to_baseline");
}

#[test]
fn stress_ng_output_is_understood() {
    let out = "stress-ng: info:  [11823] dispatching hogs: 1 dir, 1 open\n\
        stress-ng: fail:  [11830] xattr: setxattr failed, errno=28 (No space left on device)\n\
        stress-ng: info:  [11831] open: skipping stressor, not supported\n\
        stress-ng: metrc: [11823] stressor       bogo ops real time  usr time  sys time   bogo ops/s     bogo ops/s\n\
        stress-ng: metrc: [11823] dir                 418     10.93      0.01      0.35        38.25        1139.39\n\
        stress-ng: metrc: [11823] dentry           8113598.21 nanosecs per file creation (geometic mean of 1 instances)\n\
        stress-ng: error: [11823] something without a stressor\n\
        stress-ng: info:  [11823] unsuccessful run completed in 10.06s\n";
    let run = parse(out);
    assert_eq!(run.metrics.len(), 1);
    assert_eq!(run.metrics["dir"].bogo_ops, 418);
    assert_eq!(run.problems["xattr"], ["xattr: setxattr failed, errno=28 (No space left on device)"]);
    assert_eq!(run.problems[""].len(), 2);
    assert!(run.skipped.contains("open"));
    let clean = parse("stress-ng: metrc: [1] dir 418 10.93 0.01 0.35 38.25 1139.39\n");
    let d = differences("memfs", &run, &clean);
    assert_eq!(d.len(), 3, "{d:?}");
    assert!(differences("memfs", &clean, &run).is_empty());
}

//! `efuse bench`: the benchmark suite. Puts efuse (plain and default
//! profiles, stackfs and memfs) beside ext4 and libfuse's passthrough_ll on
//! the same disk in one run, and writes tables, raw numbers and charts.
//!
//! What it is for: honest side-by-side numbers, each with its ratio to ext4
//! and, for efuse, the FUSE requests each workload cost. What it is not for:
//! asserting behaviour (that is what the tests are for).
//!
//! Method (see bench/README.md): datasets are made once in a backing
//! directory on the disk under test; for each workload, every system is
//! measured N times (median reported), the repetitions interleaved across
//! systems (rep 1 on each system in turn, then rep 2, ...), each on a mount
//! over that directory made for it (memfs: mounted and filled once per
//! workload). Every external command has a time limit; whatever fails is
//! reported with the step that failed, and nothing is left mounted.

mod charts;
mod counts;
mod datasets;
mod exec;
mod rate;
mod report;
mod scale;
mod systems;
pub mod worker;
mod workloads;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use report::{Meta, Requests, Results, StatsSnapshot, SystemRun, TopSnapshot, WorkloadResult};
use scale::Scale;
use systems::{MountPlan, Mounts, System};
use workloads::{Figures, RepEnv, Workload};

/// `efuse bench` options.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Smaller datasets, one repetition, short fio runs (a few minutes).
    #[arg(long)]
    pub quick: bool,
    /// Where results.md, results.json and the charts are written.
    #[arg(long, value_name = "DIR", default_value = "bench/results")]
    pub out: PathBuf,
    /// Work directory for datasets and mount points, on the disk to measure
    /// (default: /tmp/efuse-bench).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Run only the workloads whose name contains one of these
    /// (comma-separated, e.g. `fio-w1,find`).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub only: Vec<String>,
    /// Systems to run, comma-separated (default: all): ext4, libfuse,
    /// libfuse-cache, libfuse-hp, libfuse-hp-uring, efuse-plain, efuse,
    /// efuse-dev, memfs, efuse-bypass, memfs-bypass (the last two: under
    /// `efuse run`). ext4 is always included.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub systems: Vec<String>,
    /// An already built passthrough_hp (libfuse 3.17+, example/passthrough_hp)
    /// for the systems libfuse-hp and libfuse-hp-uring; the bench does not
    /// build it. Without it those two are skipped.
    #[arg(long, value_name = "PATH")]
    pub libfuse_hp: Option<PathBuf>,
    /// Repetitions per workload and system (default: 3, or 1 with --quick),
    /// interleaved: repetition 1 on every system in turn, then repetition 2.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub reps: Option<u32>,
    /// Seconds per fio run (default: 10, or 2 with --quick).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u32).range(1..=3600))]
    pub fio_runtime: Option<u32>,
    /// Delete the work directory (datasets) afterwards instead of keeping it
    /// for the next run.
    #[arg(long)]
    pub clean: bool,
    /// After the timed repetitions, one more of each system, untimed, with
    /// the machine's system calls (eBPF, every process; as root) and
    /// context switches (/proc/stat) counted, reported beside the timings
    #[arg(long)]
    pub count: bool,
    /// The efuse binary that mounts the efuse systems (default: this one),
    /// e.g. an earlier build, to measure two builds with the same method.
    #[arg(long, value_name = "PATH")]
    pub daemon: Option<PathBuf>,
}

static INTERRUPTED: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

/// Whether Ctrl-C (or SIGTERM) arrived; long loops check it.
pub(crate) fn interrupted() -> bool {
    INTERRUPTED.get().is_some_and(|f| f.load(Ordering::Relaxed))
}

fn install_signal_flag() {
    let flag = INTERRUPTED.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP] {
        let _ = signal_hook::flag::register(sig, Arc::clone(flag));
    }
}

/// Runs the suite; `efuse_exe` is the efuse binary used to mount.
pub fn run(args: BenchArgs, efuse_exe: &Path) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("efuse bench needs root (mount(2), /proc/sys/vm/drop_caches)");
    }
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is missing: this kernel cannot run FUSE");
    }
    install_signal_flag();
    let started = Instant::now();
    let load_start = loadavg();
    let mut scale = if args.quick { Scale::quick() } else { Scale::full() };
    if let Some(r) = args.reps {
        scale.reps = r;
    }
    if let Some(t) = args.fio_runtime {
        scale.fio_runtime_s = t;
    }
    // A peer that cannot run fails the bench here, before anything is made.
    let hp = match &args.libfuse_hp {
        Some(p) => {
            let exe = std::fs::canonicalize(p).with_context(|| format!("--libfuse-hp {}", p.display()))?;
            let features = systems::probe_libfuse_hp(&exe)?;
            Some(HpPeer { exe, io_uring: features.io_uring, kernel_uring: rate::uring_enabled() })
        }
        None => None,
    };
    let (systems, mut skipped) = select_systems(&args.systems, hp.as_ref())?;
    let workloads: Vec<Workload> = Workload::all(&scale)
        .into_iter()
        .filter(|w| args.only.is_empty() || args.only.iter().any(|o| w.name.contains(o.as_str())))
        .collect();
    let rate_wanted = args.only.is_empty() || args.only.iter().any(|o| "transport-rate".contains(o.as_str()));
    if workloads.is_empty() && !rate_wanted {
        bail!("--only {} matches no workload", args.only.join(","));
    }
    let daemon_exe = match &args.daemon {
        Some(p) => std::fs::canonicalize(p).with_context(|| format!("--daemon {}", p.display()))?,
        None => efuse_exe.to_path_buf(),
    };
    let efuse_exe = daemon_exe.as_path();

    let work = args.dir.clone().unwrap_or_else(|| PathBuf::from("/tmp/efuse-bench"));
    std::fs::create_dir_all(&work).with_context(|| format!("creating work dir {}", work.display()))?;
    let work = std::fs::canonicalize(&work)?;
    let (backing, mnt_root, logs) = (work.join("backing"), work.join("mnt"), work.join("logs"));
    for d in [&backing, &mnt_root, &logs] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    exec::set_scratch_dir(&logs);
    for m in systems::clear_stale(&mnt_root) {
        eprintln!("efuse bench: detached {} (left mounted by an earlier, killed run)", m.display());
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating output dir {}", args.out.display()))?;
    let out = std::fs::canonicalize(&args.out)?;

    let say = |s: String| eprintln!("efuse bench: {s}");
    let installed = systems::ensure_prerequisites(&mut |s| say(s))?;
    let libfuse_exe = if systems.iter().any(|s| matches!(s, System::Libfuse | System::LibfuseCache)) {
        say("building libfuse's passthrough_ll from Debian's example sources".into());
        systems::build_libfuse(&work.join("build")).map_err(|e| format!("{e:#}"))
    } else {
        Err("not selected".into())
    };
    if let Err(e) = &libfuse_exe {
        if systems.contains(&System::Libfuse) {
            say(format!("libfuse build failed; its runs will be reported as failed: {e}"));
        }
    }
    let plan = MountPlan {
        efuse_exe: efuse_exe.to_path_buf(),
        libfuse_exe,
        libfuse_hp_exe: hp.as_ref().map(|h| h.exe.clone()).ok_or_else(|| "no --libfuse-hp PATH".to_string()),
        backing: backing.clone(),
        mnt_root,
        logs: logs.clone(),
        memfs_size: scale.memfs_size.to_string(),
        mount_timeout: systems::MOUNT_TIMEOUT,
    };

    // Datasets, once, before anything is mounted.
    let used: Vec<&str> =
        workloads.iter().flat_map(|w| w.datasets().iter().chain(w.outside_datasets()).copied()).collect();
    let wanted = datasets::with_dependencies(&used);
    let t = Instant::now();
    let made = datasets::prepare(&scale, &backing, &work, &wanted, &mut |s| say(s)).context("preparing datasets")?;
    say(format!("datasets ready in {:.0} s", t.elapsed().as_secs_f64()));

    let mut mounts = Mounts::new(efuse_exe);
    let total = workloads.len() as u64 * systems.len() as u64 * u64::from(scale.reps);
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} {wide_msg}")
            .map_err(|e| anyhow!("{e}"))?
            .progress_chars("=> "),
    );
    let mut results = Vec::new();
    for w in &workloads {
        if w.cache == workloads::CacheState::Cold && !interrupted() {
            // Below the guest's page cache the virtual disk may have a cache
            // of its own, which drop_caches cannot reach: the first system
            // to read a dataset (ext4) would pay its misses alone. One read
            // of the dataset first puts every system in the same place.
            pb.set_message(format!("{}: reading its dataset once (disk cache)", w.name));
            let mut buf = vec![0u8; 1 << 20];
            for set in w.datasets() {
                if let Err(e) = guarded_read(&backing.join(set), &mut buf) {
                    say(format!("{}: reading {set} once beforehand failed: {e:#}", w.name));
                }
            }
        }
        let ctx =
            RunCtx { scale: &scale, plan: &plan, work: &work, made: &made, logs: &logs, pb: &pb, count: args.count };
        let runs = run_workload(w, &systems, &ctx, &mut mounts);
        for run in runs.iter().filter(|r| r.error.is_none()) {
            log_line(&pb, format!("{:<18} {:<16} {} ({:.0} s)", w.name, run.system, headline(w, run), run.elapsed_s));
        }
        results.push(WorkloadResult { workload: w.clone(), runs });
        if interrupted() {
            break;
        }
    }
    pb.finish_and_clear();
    let cleanup_errors = mounts.unmount_all();
    let init_notes: Vec<String> = mounts.init_notes.iter().map(|(_, n)| n.clone()).collect();

    // The transports' request rate (memfs, --cache none), beside the workloads.
    let rate = if rate_wanted && !interrupted() {
        say("transport-rate: stat, lookup, getattr, open and 4 KiB O_DIRECT read storms, dev vs uring, 1, 2 and 4 \
             threads"
            .into());
        match rate::run(efuse_exe, &work, args.quick, &mut |s| say(s)) {
            Ok(r) => Some(r),
            Err(e) => {
                say(format!("FAILED transport-rate: {e:#}"));
                None
            }
        }
    } else {
        None
    };

    let mut notes = vec![
        "ext4 is the backing directory itself; the libfuse examples and efuse stackfs mount that same directory; \
         memfs gets a copy of each workload's dataset (copied in, untimed, after mounting)."
            .to_string(),
        "Workloads run one after another. Within a workload the repetitions are interleaved across systems, round \
         robin: repetition 1 on ext4, then on each other system in the order of the tables, then repetition 2 on \
         each, and so on, so that what drifts with time (the host's cache behind a virtual disk, background \
         writeback) reaches every system alike rather than all repetitions of one. Each repetition of a system \
         over the backing directory has a mount of its own (mounted before it, unmounted after it), so one of \
         them is mounted at a time; memfs is mounted and filled once per workload and stays mounted through its \
         repetitions while the others take their turns. Every repetition starts from the same cache state on \
         every system, stated per workload: **cold** (`sync; echo 3 > /proc/sys/vm/drop_caches`, then the FUSE \
         system mounted fresh; memfs: caches dropped only, since remounting would empty it, and on memfs-bypass \
         the daemon's bypass metadata tables dropped too) or **warm** (`sync`, \
         then everything the workload reads read once through the system, untimed; fio with \
         `--invalidate=0`). Same `direct=` for every system."
            .to_string(),
    ];
    notes.append(&mut skipped);
    if !made.made_now.is_empty() {
        notes.push(format!(
            "Datasets made by this run: {}. The disk may still have been writing them back during the first \
             repetitions of the first workloads that use them; a later run with the same `--dir` reuses them.",
            made.made_now.join(", ")
        ));
    }
    notes.extend(init_notes);
    let direct_failed = |sys: &str| {
        results.iter().any(|w: &WorkloadResult| {
            matches!(w.workload.kind, workloads::Kind::Fio { direct: true, .. })
                && w.run(sys).is_some_and(|r| r.error.as_deref().is_some_and(|e| e.contains("Invalid argument")))
        })
    };
    if direct_failed("libfuse") || direct_failed("libfuse-cache") {
        notes.push(
            "libfuse's passthrough_ll opens the backing file with the caller's flags, O_DIRECT included, and writes \
             from its unaligned request buffer, so with fio `direct=1` its writes fail with EINVAL: its direct=1 runs \
             are reported as failed. No passthrough_ll option changes that."
                .into(),
        );
    }
    if systems.iter().any(|s| s.is_libfuse()) {
        notes.push(format!(
            "The libfuse examples keep one O_PATH descriptor per inode the kernel holds, so the bench starts them with \
             RLIMIT_NOFILE raised to {} (fs.nr_open), or to the hard limit ({}) where it may not raise that \
             (no CAP_SYS_RESOURCE); on a tree with more inodes than that, their calls fail with EMFILE (\"Too many \
             open files\"). efuse daemons keep the bench's own limit (stackfs bounds its descriptors itself).",
            systems::nofile_limit(),
            systems::nofile_hard()
        ));
    }
    let scale_ref = &scale;
    let direct_cached: Vec<String> = results
        .iter()
        .filter_map(|w| match w.workload.kind {
            workloads::Kind::Fio { n, direct: true } => Some((w, n)),
            _ => None,
        })
        .flat_map(|(w, n)| {
            w.runs
                .iter()
                .filter(move |r| r.ok && workloads::went_through_page_cache(scale_ref, n, &r.median))
                .map(move |r| format!("{} on {}", w.workload.name, r.system))
        })
        .collect();
    if !direct_cached.is_empty() {
        notes.push(format!(
            "`(cached)` marks a direct=1 run after which more than a tenth of the dataset sat in the backing files' \
             page cache (the workload starts cold, so it got there during the run): that system does not do direct \
             I/O on its backing file, so its figure is page-cache speed, not comparable with ext4's direct I/O. \
             Here: {}.",
            direct_cached.join(", ")
        ));
    }
    let load_end = loadavg();
    notes.push(format!(
        "Load average (1, 5, 15 min) at the start: {load_start}; at the end: {load_end}. The bench itself keeps \
         about 1-2 CPUs busy; more than that means other work shared the machine and the numbers carry its noise."
    ));
    if interrupted() {
        notes.push("**The run was interrupted; the results are partial.**".into());
    }
    for e in &cleanup_errors {
        notes.push(format!("Cleanup problem: {e}"));
    }
    let meta =
        collect_meta(&args, &scale, &plan, &systems, &work, &made, installed, started.elapsed().as_secs_f64(), notes);
    let mut res = Results { meta, results };
    let json_path = out.join("results.json");
    let chart_result = charts::draw_all(&res, &out);
    let charts = match chart_result {
        Ok(c) => c,
        Err(e) => {
            res.meta.notes.push(format!("No charts: {e:#}"));
            Vec::new()
        }
    };
    res.meta.duration_s = started.elapsed().as_secs_f64();
    std::fs::write(&json_path, serde_json::to_string_pretty(&res)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let md_path = out.join("results.md");
    let mut md = report::markdown(&res, &charts);
    if let Some(r) = &rate {
        md.push_str("\n## Transports: request rate with the kernel caches out of the way\n\n");
        md.push_str(
            "memfs mounted with `--cache none` (entry and attribute timeouts 0) once per transport, both mounted at \
             once, the transports taking turns within each repetition (dev, uring, dev, uring, ...); in-process \
             clients for 2 s (0.5 s with --quick), median of the repetitions by ops/s. `stat`: stat(2) of `s/NAME` \
             (LOOKUP, LOOKUP, GETATTR); `lookup`: readlinkat(2) of a regular file relative to an open \
             directory (LOOKUP, then EINVAL); \
             `getattr`: fstat(2) of an open file (GETATTR); `open`: openat(2) + close (LOOKUP and OPEN waited \
             for, RELEASE not); `read4k`: 4 KiB O_DIRECT preads at random offsets of a 64 MiB file (READ). p50/p99 \
             are per operation, measured by the client (the round trip as a program sees it); daemon CPU is its \
             user + system time over the run (/proc/PID/stat) divided by the requests served; daemon sleeps and \
             preempted are its threads' voluntary and involuntary context switches (/proc/PID/task/*/status) \
             per request.\n\n",
        );
        md.push_str(&rate::markdown(r));
        let (_, json) = rate::out_paths(&out);
        std::fs::write(&json, serde_json::to_string_pretty(r)?)
            .with_context(|| format!("writing {}", json.display()))?;
    }
    std::fs::write(&md_path, md).with_context(|| format!("writing {}", md_path.display()))?;
    if args.clean {
        let _ = std::fs::remove_dir_all(&work);
    }
    let failed: Vec<String> = res
        .results
        .iter()
        .flat_map(|w| w.runs.iter().filter(|r| !r.ok).map(move |r| format!("{} on {}", w.workload.name, r.system)))
        .collect();
    say(format!(
        "done in {:.0} s; wrote {}, {}{}",
        res.meta.duration_s,
        md_path.display(),
        json_path.display(),
        if charts.is_empty() { String::new() } else { format!(" and {} chart(s)", charts.len()) }
    ));
    if !failed.is_empty() {
        say(format!("{} run(s) failed (see results.md): {}", failed.len(), failed.join(", ")));
    }
    if interrupted() {
        bail!("interrupted; partial results written");
    }
    if !cleanup_errors.is_empty() {
        bail!("cleanup: {}", cleanup_errors.join("; "));
    }
    Ok(())
}

/// The passthrough_hp given with `--libfuse-hp`, and where its io_uring can run.
struct HpPeer {
    exe: PathBuf,
    /// Its libfuse has `-o io_uring`.
    io_uring: bool,
    /// The kernel offers FUSE-over-io_uring (enable_uring = Y).
    kernel_uring: bool,
}

/// Why `s` cannot run here, if it cannot (a passthrough_hp system without
/// the binary, or without io_uring in it or in the kernel).
fn unavailable(s: System, hp: Option<&HpPeer>) -> Option<String> {
    if !s.is_libfuse_hp() {
        return None;
    }
    let Some(hp) = hp else {
        return Some(format!(
            "{} needs --libfuse-hp PATH (an already built passthrough_hp of libfuse 3.17+; the bench does not build it)",
            s.name()
        ));
    };
    if s == System::LibfuseHpUring && !hp.io_uring {
        return Some(format!(
            "{}: {} has no `-o io_uring` (libfuse 3.18+ built with liburing)",
            s.name(),
            hp.exe.display()
        ));
    }
    if s == System::LibfuseHpUring && !hp.kernel_uring {
        return Some(format!(
            "{}: this kernel does not offer FUSE-over-io_uring (/sys/module/fuse/parameters/enable_uring is not Y)",
            s.name()
        ));
    }
    None
}

/// The systems to run, and a note for each default system left out. A
/// system named with `--systems` that cannot run is an error.
fn select_systems(list: &[String], hp: Option<&HpPeer>) -> Result<(Vec<System>, Vec<String>)> {
    if list.is_empty() {
        let mut notes = Vec::new();
        let mut v = Vec::new();
        for s in System::ALL {
            match unavailable(s, hp) {
                Some(why) => notes.push(format!("Skipped: {why}.")),
                None => v.push(s),
            }
        }
        return Ok((v, notes));
    }
    let mut v = vec![System::Ext4];
    for name in list {
        let s = System::parse(name.trim()).ok_or_else(|| {
            anyhow!(
                "unknown system '{name}' (choose from {})",
                System::ALL.iter().chain(&System::ON_REQUEST).map(|s| s.name()).collect::<Vec<_>>().join(", ")
            )
        })?;
        if let Some(why) = unavailable(s, hp) {
            bail!("--systems {}: {why}", s.name());
        }
        if !v.contains(&s) {
            v.push(s);
        }
    }
    v.sort();
    Ok((v, Vec::new()))
}

fn headline(w: &Workload, run: &SystemRun) -> String {
    w.metrics
        .iter()
        .filter(|m| m.chart.is_some())
        .filter_map(|m| run.median.get(m.key).map(|v| format!("{} {}", report::fmt_num(*v), m.label)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `efuse top --once --json`: the kernel-side view (eBPF), cumulative since mount.
fn read_top(efuse_exe: &Path, mp: &Path) -> Result<TopSnapshot> {
    let out =
        exec::run(Command::new(efuse_exe).arg("top").arg(mp).arg("--once").arg("--json"), Duration::from_secs(15))?;
    TopSnapshot::parse(&out.stdout).with_context(|| format!("parsing `efuse top --once --json`: {}", out.stdout.trim()))
}

fn read_stats(efuse_exe: &Path, mp: &Path) -> Result<StatsSnapshot> {
    let out = exec::run(Command::new(efuse_exe).arg("stats").arg(mp).arg("--json"), Duration::from_secs(15))?;
    StatsSnapshot::parse(&out.stdout).with_context(|| format!("parsing `efuse stats --json`: {}", out.stdout.trim()))
}

/// Copies a workload's datasets from the backing directory into memfs.
fn populate(backing: &Path, root: &Path, sets: &[&str]) -> Result<()> {
    for set in sets {
        let dst = root.join(set);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("mkdir {}", parent.display()))?;
        }
        let mut cp = Command::new("cp");
        cp.arg("-a").arg(backing.join(set)).arg(&dst);
        exec::run(&mut cp, Duration::from_secs(1800))?;
    }
    Ok(())
}

/// Reads a dataset on ext4 (outside every system) whole, with a time limit.
fn guarded_read(path: &Path, buf: &mut [u8]) -> Result<u64> {
    exec::guarded(Duration::from_secs(1800), None, || workloads::read_all(path, buf))
}

/// What every (workload, repetition, system) step shares.
struct RunCtx<'a> {
    scale: &'a Scale,
    plan: &'a MountPlan,
    work: &'a Path,
    made: &'a datasets::Made,
    logs: &'a Path,
    pb: &'a ProgressBar,
    /// One counted, untimed repetition after the timed ones (`--count`).
    count: bool,
}

/// What one system gathers over one workload's repetitions, which are
/// interleaved with the other systems' (see [`run_workload`]).
struct Tally {
    system: System,
    reps: Vec<Figures>,
    deltas: Vec<StatsSnapshot>,
    switches: Vec<f64>,
    top_last: Option<TopSnapshot>,
    commands: Vec<String>,
    /// The first failure, with its step; the system runs no more repetitions.
    error: Option<String>,
    /// Repetitions started (finished or failed).
    started: u32,
    /// Time spent in its own steps (mount, fill, caches, repetition, unmount).
    elapsed: Duration,
    /// memfs: its mount, filled with the workload's dataset, kept across its
    /// repetitions (remounting would empty it).
    kept: Option<PathBuf>,
    /// The counted repetition (`--count`).
    counted: Option<counts::Counted>,
}

impl Tally {
    fn new(system: System) -> Tally {
        Tally {
            system,
            reps: Vec::new(),
            deltas: Vec::new(),
            switches: Vec::new(),
            top_last: None,
            commands: Vec::new(),
            error: None,
            started: 0,
            elapsed: Duration::ZERO,
            kept: None,
            counted: None,
        }
    }

    fn fail(&mut self, e: String) {
        self.error = Some(match self.error.take() {
            Some(prev) => format!("{prev}; {e}"),
            None => e,
        });
    }

    fn finish(self) -> SystemRun {
        let mut requests = Requests::from_deltas(&self.deltas);
        if let Some(q) = requests.as_mut() {
            if !self.switches.is_empty() {
                q.context_switches_per_rep = Some(self.switches.iter().sum::<f64>() / self.switches.len() as f64);
            }
            if let Some(t) = &self.top_last {
                q.kernel_source = Some(t.source.clone());
                let mut ops: Vec<_> =
                    t.opcodes.iter().filter_map(|(k, (n, p50, p99))| Some((k, *n, (*p50)?, (*p99)?))).collect();
                ops.sort_by_key(|o| std::cmp::Reverse(o.1));
                q.kernel_latency = ops.into_iter().take(3).map(|(k, _, p50, p99)| (k.clone(), p50, p99)).collect();
            }
        }
        let mut run = SystemRun::finish(self.system.name(), self.reps, self.error, requests, self.commands);
        run.elapsed_s = self.elapsed.as_secs_f64();
        run.counted = self.counted;
        run
    }
}

/// The order of one workload's steps: repetition by repetition, every
/// system in turn within each (rep 1 of ext4, of the next system, ..., then
/// rep 2 of each), so that whatever drifts with time (the host's cache
/// behind a virtual disk, background writeback) falls on every system alike
/// instead of on whichever system's repetitions ran in a bad minute.
fn step_order(reps: u32, systems: usize) -> impl Iterator<Item = (u32, usize)> {
    (0..reps).flat_map(move |r| (0..systems).map(move |i| (r, i)))
}

/// One workload on every system, repetitions interleaved ([`step_order`]).
/// Each repetition of a system that shows the backing directory gets a
/// mount of its own (mounted before, unmounted after), so only one of them
/// is mounted at a time: they all stack over the same directory, and a
/// mount left idle would keep its daemon's descriptors and its kernel
/// caches (a day long for some) over files the others change. memfs shows
/// no backing directory: it is mounted and filled once, at its first
/// repetition, and kept until its last. A system that fails records the
/// step and stops; the others go on. Nothing stays mounted when it returns.
fn run_workload(w: &Workload, systems: &[System], ctx: &RunCtx, mounts: &mut Mounts) -> Vec<SystemRun> {
    let mut tallies: Vec<Tally> = systems.iter().map(|&s| Tally::new(s)).collect();
    for (rep, i) in step_order(ctx.scale.reps, tallies.len()) {
        if interrupted() {
            break;
        }
        let t = &mut tallies[i];
        if t.error.is_none() {
            ctx.pb.set_message(format!("{} rep {}/{} on {}", w.name, rep + 1, ctx.scale.reps, t.system.name()));
            let started = Instant::now();
            t.started += 1;
            let mut step = "mount";
            if let Err(e) = run_rep(w, rep, t, ctx, mounts, &mut step, false) {
                t.fail(format!("{step}: {e:#}"));
                t.kept = None;
            }
            if t.kept.is_none() || t.error.is_some() {
                if let Err(e) = mounts.unmount(t.system) {
                    t.fail(format!("unmount: {e:#}"));
                }
            }
            t.elapsed += started.elapsed();
            if let Some(e) = &t.error {
                log_line(ctx.pb, format!("FAILED {} on {} (rep {}): {e}", w.name, t.system.name(), rep + 1));
            }
        }
        ctx.pb.inc(1);
    }
    if ctx.count && !interrupted() {
        for t in tallies.iter_mut().filter(|t| t.error.is_none() && !t.reps.is_empty()) {
            ctx.pb.set_message(format!("{} counted rep on {}", w.name, t.system.name()));
            let started = Instant::now();
            let mut step = "mount";
            // A failure here costs the counts only, not the timings.
            if let Err(e) = run_rep(w, ctx.scale.reps, t, ctx, mounts, &mut step, true) {
                log_line(
                    ctx.pb,
                    format!("counted repetition of {} on {} failed: {step}: {e:#}", w.name, t.system.name()),
                );
                t.kept = None;
                let _ = mounts.unmount(t.system);
            } else if t.kept.is_none() {
                let _ = mounts.unmount(t.system);
            }
            t.elapsed += started.elapsed();
        }
    }
    for t in &mut tallies {
        if t.kept.take().is_some() {
            let started = Instant::now();
            if let Err(e) = mounts.unmount(t.system) {
                t.fail(format!("unmount: {e:#}"));
            }
            t.elapsed += started.elapsed();
        }
        if interrupted() && t.started > 0 && t.error.is_none() && (t.reps.len() as u32) < ctx.scale.reps {
            t.fail(format!("interrupted after {} of {} repetitions", t.reps.len(), ctx.scale.reps));
        }
    }
    // A system the interruption reached before its first repetition is left out, as before.
    tallies.into_iter().filter(|t| t.started > 0).map(Tally::finish).collect()
}

/// Prints a line above the progress bar (plainly when there is no terminal:
/// a hidden bar swallows println).
fn log_line(pb: &ProgressBar, line: String) {
    if pb.is_hidden() {
        eprintln!("efuse bench: {line}");
    } else {
        pb.println(line);
    }
}

/// Repetition `rep` of `w` on `t.system`: mount (or reuse memfs's), put the
/// caches into the workload's state, measure, read the stats. `step` names
/// what was under way when it fails. The caller unmounts.
fn run_rep(
    w: &Workload,
    rep: u32,
    t: &mut Tally,
    ctx: &RunCtx,
    mounts: &mut Mounts,
    step: &mut &'static str,
    counted: bool,
) -> Result<()> {
    let (s, scale, plan) = (t.system, ctx.scale, ctx.plan);
    let cold = w.cache == workloads::CacheState::Cold;
    let root = match &t.kept {
        Some(root) => root.clone(),
        None => {
            if cold && s.is_fuse() && s.shows_backing() {
                // Cold: nothing cached and a fresh daemon. This system is
                // not mounted now, so dropping the caches first leaves it
                // nothing; the mount below starts from there.
                *step = "cold caches (drop caches, then mount)";
                workloads::drop_caches()?;
            }
            *step = "mount";
            let root = mounts.mount(plan, s)?;
            if !s.shows_backing() {
                *step = "copying the dataset into memfs";
                populate(&plan.backing, &root, w.datasets())?;
                t.kept = Some(root.clone());
            }
            root
        }
    };
    if interrupted() {
        bail!("interrupted");
    }
    // The repetition's environment, with the list its commands go to (the
    // warm-up's are not reported).
    let mut scratch_cmds = Vec::new();
    let mut cmds = Vec::new();
    let backing = s.shows_backing().then_some(plan.backing.as_path());
    let daemon = mounts.daemon_pid(s);
    let wrap = s.wrapper(&plan.efuse_exe, &root);
    let rep_env = |commands| RepEnv {
        root: &root,
        backing,
        scale,
        work: ctx.work,
        made: ctx.made,
        scratch: ctx.logs,
        commands,
        daemon,
        efuse_exe: &plan.efuse_exe,
        wrap: &wrap,
    };
    match w.cache {
        workloads::CacheState::Cold => {
            // ext4, and memfs (which a remount would empty): caches dropped only.
            if !(s.is_fuse() && s.shows_backing()) {
                *step = "cold caches (drop caches)";
                workloads::drop_caches()?;
                if !s.wrapper(&plan.efuse_exe, &root).is_empty() {
                    // The bypass's metadata tables outlive the processes
                    // that filled them, as the kernel's dentries do: dropped
                    // too.
                    *step = "cold caches (drop the bypass's metadata tables)";
                    drop_bypass_tables(&root)?;
                }
            }
        }
        workloads::CacheState::Warm => {
            *step = "warming the caches";
            workloads::sync_all()?;
            let mut env = rep_env(&mut scratch_cmds);
            exec::guarded(w.rep_timeout(scale), mounts.connection(s), || w.warm_up(&mut env))?;
        }
    }
    if counted {
        *step = "counted repetition";
        let mut counted_cmds = Vec::new();
        let mut env = rep_env(&mut counted_cmds);
        let counter = counts::Counter::start();
        exec::guarded(w.rep_timeout(scale), mounts.connection(s), || w.run_rep(&mut env))
            .context("the counted repetition")?;
        t.counted = Some(counter.stop());
        return Ok(());
    }
    *step = "efuse stats (before)";
    let before = if s.is_efuse() { Some(read_stats(&plan.efuse_exe, &root)?) } else { None };
    let top_before = if s.is_efuse() { read_top(&plan.efuse_exe, &root).ok() } else { None };
    *step = "workload";
    let mut env = rep_env(&mut cmds);
    let figures = exec::guarded(w.rep_timeout(scale), mounts.connection(s), || w.run_rep(&mut env))
        .with_context(|| format!("repetition {}", rep + 1))?;
    if t.commands.is_empty() {
        t.commands = cmds;
    }
    t.reps.push(figures);
    *step = "efuse stats (after)";
    if let Some(b) = before {
        t.deltas.push(read_stats(&plan.efuse_exe, &root)?.since(&b));
    }
    if let (Some(b), Ok(a)) = (top_before, read_top(&plan.efuse_exe, &root)) {
        t.switches.push(a.context_switches.saturating_sub(b.context_switches) as f64);
        t.top_last = Some(a);
    }
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn cmd_stdout(prog: &str, args: &[&str]) -> String {
    exec::run(Command::new(prog).args(args), Duration::from_secs(15))
        .map(|o| o.stdout.trim().to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

fn collect_meta(
    args: &BenchArgs,
    scale: &Scale,
    plan: &MountPlan,
    systems: &[System],
    work: &Path,
    made: &datasets::Made,
    installed: Vec<String>,
    duration_s: f64,
    notes: Vec<String>,
) -> Meta {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or_else(|| "unknown".into(), |(_, v)| v.trim().to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map_or_else(|| "unknown".into(), |k| format!("{:.1} GiB", k / 1048576.0));
    let disk = cmd_stdout("findmnt", &["-no", "SOURCE,FSTYPE,OPTIONS", "--target", &work.display().to_string()]);
    let mut command_line = String::from("efuse bench");
    if args.quick {
        command_line.push_str(" --quick");
    }
    command_line.push_str(&format!(" --out {}", args.out.display()));
    if let Some(d) = &args.dir {
        command_line.push_str(&format!(" --dir {}", d.display()));
    }
    if !args.only.is_empty() {
        command_line.push_str(&format!(" --only {}", args.only.join(",")));
    }
    if !args.systems.is_empty() {
        command_line.push_str(&format!(" --systems {}", args.systems.join(",")));
    }
    if let Some(r) = args.reps {
        command_line.push_str(&format!(" --reps {r}"));
    }
    if let Some(t) = args.fio_runtime {
        command_line.push_str(&format!(" --fio-runtime {t}"));
    }
    if args.count {
        command_line.push_str(" --count");
    }
    if let Some(p) = &args.libfuse_hp {
        command_line.push_str(&format!(" --libfuse-hp {}", p.display()));
    }
    let systems = systems
        .iter()
        .map(|&s| {
            let how = match plan.mount_command(s) {
                None => format!("(the work directory itself: {})", plan.backing.display()),
                Some(c) => exec::display(&c),
            };
            (s.name().to_string(), how)
        })
        .collect();
    Meta {
        date_utc: cmd_stdout("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]),
        host: cmd_stdout("hostname", &[]),
        kernel: cmd_stdout("uname", &["-srvm"]),
        cpu,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory,
        disk,
        work_dir: work.display().to_string(),
        efuse: cmd_stdout(&plan.efuse_exe.display().to_string(), &["--version"]),
        fio: cmd_stdout("fio", &["--version"]),
        libfuse: format!("{} (passthrough_ll example, built with gcc -O2)", systems::libfuse_version()),
        libfuse_hp: plan
            .libfuse_hp_exe
            .as_ref()
            .map(|p| format!("{} linked against {}", p.display(), systems::linked_libfuse(p)))
            .unwrap_or_else(|e| format!("not run ({e})")),
        datasets: made.clone(),
        command_line,
        installed,
        duration_s,
        scale: scale.clone(),
        scale_text: scale.describe(),
        systems,
        notes,
    }
}

/// A directory under the system's temporary directory, removed when dropped.
#[cfg(test)]
pub(crate) struct TestDir(pub PathBuf);

#[cfg(test)]
impl TestDir {
    pub fn new(tag: &str) -> TestDir {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("efuse-bench-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("creating a test directory");
        TestDir(p)
    }
}

#[cfg(test)]
impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Asks the daemon of the mount at `mp` to drop its idle bypass metadata
/// tables. A daemon that does not know the command (an earlier build, see
/// `--daemon`) keeps no table across processes: nothing to drop.
fn drop_bypass_tables(mp: &Path) -> Result<()> {
    let answer = efuse::control::query(mp, "drop-bypass-tables")
        .with_context(|| format!("asking the daemon of {} to drop its bypass tables", mp.display()))?;
    if answer.contains("\"dropped\"") || answer.contains("unknown command") {
        return Ok(());
    }
    bail!("the daemon of {} did not drop its bypass tables: {}", mp.display(), answer.trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied())).map(|c| c.bench)
    }

    #[test]
    fn parses_the_flags() {
        let a = parse(&["--quick", "--libfuse-hp", "/opt/hp", "--systems", "libfuse-hp,efuse", "--only", "grep,git"])
            .unwrap();
        assert!(a.quick);
        assert_eq!(a.libfuse_hp.as_deref(), Some(Path::new("/opt/hp")));
        assert_eq!(a.systems, ["libfuse-hp", "efuse"]);
        assert_eq!(a.only, ["grep", "git"]);
        let a = parse(&[]).unwrap();
        assert!(a.libfuse_hp.is_none() && !a.quick && a.systems.is_empty());
        assert_eq!(a.out, Path::new("bench/results"));
        assert!(parse(&["--libfuse-hp"]).is_err(), "the flag takes a path");
        assert!(parse(&["--reps", "0"]).is_err());
    }

    fn hp(io_uring: bool, kernel_uring: bool) -> HpPeer {
        HpPeer { exe: PathBuf::from("/opt/passthrough_hp"), io_uring, kernel_uring }
    }

    #[test]
    fn repetitions_go_round_robin() {
        let order: Vec<(u32, usize)> = step_order(3, 2).collect();
        assert_eq!(order, [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]);
        assert_eq!(step_order(0, 4).count(), 0);
    }

    /// ext4 needs no mount and no root: two of its repetitions of a real
    /// workload run interleaved with a system whose mount fails; the failure
    /// is recorded once, with its step, and ext4 goes on.
    #[test]
    fn a_failed_system_stops_and_the_others_go_on() {
        let d = TestDir::new("interleave");
        let mut scale = Scale::quick();
        scale.reps = 2;
        scale.find_entries = 4;
        let backing = d.0.join("backing");
        std::fs::create_dir_all(backing.join(datasets::TREE)).unwrap();
        for i in 0..scale.find_entries {
            std::fs::write(backing.join(datasets::TREE).join(format!("f{i}")), b"x").unwrap();
        }
        let logs = d.0.join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        let plan = MountPlan {
            efuse_exe: d.0.join("no-such-efuse"),
            libfuse_exe: Err("not built".into()),
            libfuse_hp_exe: Err("none".into()),
            backing,
            mnt_root: d.0.join("mnt"),
            logs: logs.clone(),
            memfs_size: "1G".into(),
            mount_timeout: Duration::from_secs(5),
        };
        let w = Workload::all(&scale).into_iter().find(|w| w.name == "find-warm").unwrap();
        let made = datasets::Made::default();
        let pb = ProgressBar::hidden();
        let ctx = RunCtx { scale: &scale, plan: &plan, work: &d.0, made: &made, logs: &logs, pb: &pb, count: false };
        let mut mounts = Mounts::new(&plan.efuse_exe);
        let runs = run_workload(&w, &[System::Ext4, System::Memfs], &ctx, &mut mounts);
        assert_eq!(runs.len(), 2);
        let (ext4, memfs) = (&runs[0], &runs[1]);
        assert!(ext4.ok, "{:?}", ext4.error);
        assert_eq!(ext4.reps.len(), 2);
        assert!(ext4.median.get("ops_per_s").is_some_and(|v| *v > 0.0));
        assert!(!memfs.ok && memfs.reps.is_empty());
        let e = memfs.error.as_deref().unwrap_or_default();
        assert!(e.starts_with("mount: ") && !e.contains("; "), "one failure, with its step: {e}");
        assert_eq!(mounts.unmount_all(), Vec::<String>::new());
    }

    #[test]
    fn libfuse_hp_systems_need_the_flag() {
        // Default list without the flag: both skipped, each with a note.
        let (v, notes) = select_systems(&[], None).unwrap();
        assert!(v.contains(&System::Libfuse) && !v.iter().any(|s| s.is_libfuse_hp()));
        assert_eq!(notes.len(), 2);
        assert!(notes.iter().all(|n| n.contains("--libfuse-hp PATH")), "{notes:?}");
        // Asked for by name without the flag: a clear error.
        let e = select_systems(&["libfuse-hp".into()], None).unwrap_err().to_string();
        assert!(e.contains("libfuse-hp needs --libfuse-hp PATH"), "{e}");
        // With the flag: both run.
        let (v, notes) = select_systems(&[], Some(&hp(true, true))).unwrap();
        assert!(v.contains(&System::LibfuseHp) && v.contains(&System::LibfuseHpUring));
        assert!(notes.is_empty());
        // io_uring missing in the binary or the kernel: only the uring one is left out.
        for peer in [hp(false, true), hp(true, false)] {
            let (v, notes) = select_systems(&[], Some(&peer)).unwrap();
            assert!(v.contains(&System::LibfuseHp) && !v.contains(&System::LibfuseHpUring));
            assert_eq!(notes.len(), 1);
            assert!(select_systems(&["libfuse-hp-uring".into()], Some(&peer)).is_err());
        }
        let (v, _) = select_systems(&["efuse".into(), "libfuse-hp".into()], Some(&hp(true, true))).unwrap();
        assert_eq!(v, [System::Ext4, System::LibfuseHp, System::Efuse]);
        assert!(select_systems(&["nonesuch".into()], None).is_err());
    }
}

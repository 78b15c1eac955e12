//! The workloads: what each one runs on a system's directory, and what it
//! measures. One call of [`Workload::run_rep`] is one timed repetition.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::datasets::{self, Rng};
use crate::exec;
use crate::scale::{FioShape, Scale};

/// Which chart a workload's bars go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Group {
    Fio,
    Metadata,
    Tree,
    Sequential,
}

impl Group {
    pub const ALL: [Group; 4] = [Group::Fio, Group::Metadata, Group::Tree, Group::Sequential];

    pub fn title(self) -> &'static str {
        match self {
            Group::Fio => "fio randrw 70:30 (eFUSE W1-W3)",
            Group::Metadata => "metadata storms",
            Group::Tree => "trees: find, untar, rm -r",
            Group::Sequential => "sequential 1 MiB",
        }
    }

    pub fn file_stem(self) -> &'static str {
        match self {
            Group::Fio => "fio",
            Group::Metadata => "metadata",
            Group::Tree => "tree",
            Group::Sequential => "sequential",
        }
    }
}

/// One measured quantity. Rates are higher-better and get a ratio to ext4.
#[derive(Clone, Debug, Serialize)]
pub struct Metric {
    pub key: &'static str,
    pub label: &'static str,
    /// Higher is better (a rate); otherwise a duration.
    pub rate: bool,
    /// The bar label on the group's chart, for the metrics charted.
    pub chart: Option<String>,
}

fn rate(key: &'static str, label: &'static str, chart: Option<String>) -> Metric {
    Metric { key, label, rate: true, chart }
}

fn secs(key: &'static str, label: &'static str) -> Metric {
    Metric { key, label, rate: false, chart: None }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Kind {
    Fio { n: u8, direct: bool },
    CatStorm,
    OpenLoop,
    StatStorm,
    FindCold,
    FindWarm,
    UntarRm,
    Sequential,
}

/// A workload as the runner sees it.
#[derive(Clone, Debug, Serialize)]
pub struct Workload {
    pub name: String,
    pub kind: Kind,
    pub group: Group,
    pub description: String,
    pub metrics: Vec<Metric>,
}

/// What a repetition may use.
pub struct RepEnv<'a> {
    /// The system's directory (ext4: the backing dir; FUSE: the mount point).
    pub root: &'a Path,
    pub scale: &'a Scale,
    pub tarball: &'a Path,
    /// Where fio's JSON and find's output go.
    pub scratch: &'a Path,
    /// Commands run, for the report.
    pub commands: &'a mut Vec<String>,
}

pub type Figures = BTreeMap<String, f64>;

impl Workload {
    pub fn all(scale: &Scale) -> Vec<Workload> {
        let mut v = Vec::new();
        for n in 1..=3u8 {
            let shape = fio_shape(scale, n);
            for direct in [true, false] {
                let mode = if direct { "direct" } else { "buffered" };
                let label = format!("W{n} {mode}");
                let chart_iops = (shape.block_kib < 1024).then(|| label.clone());
                let chart_bw = (shape.block_kib >= 1024).then(|| label.clone());
                v.push(Workload {
                    name: format!("fio-w{n}-{mode}"),
                    kind: Kind::Fio { n, direct },
                    group: Group::Fio,
                    description: format!(
                        "fio randrw 70:30, {} x {} file(s), bs {}, {} jobs x iodepth {}, libaio, {}",
                        shape.files,
                        crate::scale::human_kib(shape.file_kib),
                        crate::scale::human_kib(shape.block_kib),
                        shape.jobs,
                        shape.iodepth,
                        if direct { "direct=1" } else { "buffered (direct=0)" }
                    ),
                    metrics: vec![
                        rate("iops", "IOPS (r+w)", chart_iops),
                        rate("mibps", "MiB/s (r+w)", chart_bw),
                        rate("read_iops", "read IOPS", None),
                        rate("write_iops", "write IOPS", None),
                        rate("read_mibps", "read MiB/s", None),
                        rate("write_mibps", "write MiB/s", None),
                    ],
                });
            }
        }
        v.push(Workload {
            name: "cat-storm".into(),
            kind: Kind::CatStorm,
            group: Group::Metadata,
            description: format!(
                "bt-fuse's cat storm: one {}-byte file read by {} fresh `cat` processes",
                scale.small_file_bytes, scale.cat_runs
            ),
            metrics: vec![rate("ops_per_s", "cats/s", Some("cat storm".into())), secs("seconds", "wall s")],
        });
        v.push(Workload {
            name: "open-read-close".into(),
            kind: Kind::OpenLoop,
            group: Group::Metadata,
            description: format!("{} x open/read/close of one small file, in the bench's process", scale.open_loops),
            metrics: vec![rate("ops_per_s", "opens/s", Some("open/read/close".into())), secs("seconds", "wall s")],
        });
        v.push(Workload {
            name: "stat-storm".into(),
            kind: Kind::StatStorm,
            group: Group::Metadata,
            description: format!(
                "stat(2) of {} files in 100 directories, {} passes, in process, caches dropped first",
                scale.stat_files, scale.stat_passes
            ),
            metrics: vec![rate("ops_per_s", "stats/s", Some("stat storm".into())), secs("seconds", "wall s")],
        });
        v.push(Workload {
            name: "find-cold".into(),
            kind: Kind::FindCold,
            group: Group::Tree,
            description: format!(
                "`find` over {} entries after dropping caches and remounting (memfs: caches dropped, not remounted)",
                scale.find_entries
            ),
            metrics: vec![rate("ops_per_s", "entries/s", Some("find cold".into())), secs("seconds", "wall s")],
        });
        v.push(Workload {
            name: "find-warm".into(),
            kind: Kind::FindWarm,
            group: Group::Tree,
            description: format!("`find` over {} entries, after one untimed warm-up find", scale.find_entries),
            metrics: vec![rate("ops_per_s", "entries/s", Some("find warm".into())), secs("seconds", "wall s")],
        });
        v.push(Workload {
            name: "untar-rm".into(),
            kind: Kind::UntarRm,
            group: Group::Tree,
            description: format!(
                "`tar -xf` of a {}-file, ~{} MiB tarball (on ext4) into the system, `sync` (untimed), then `rm -r` of it",
                scale.tar_files, scale.tar_target_mib
            ),
            metrics: vec![
                rate("untar_files_per_s", "untar files/s", Some("untar".into())),
                secs("untar_s", "untar s"),
                rate("rm_files_per_s", "rm files/s", Some("rm -r".into())),
                secs("rm_s", "rm s"),
            ],
        });
        v.push(Workload {
            name: "sequential".into(),
            kind: Kind::Sequential,
            group: Group::Sequential,
            description: format!(
                "write {} MiB in 1 MiB blocks then fsync (timed together); drop caches; read it back in 1 MiB blocks",
                scale.seq_mib
            ),
            metrics: vec![
                rate("write_mibps", "write MiB/s", Some("write+fsync".into())),
                rate("read_mibps", "read MiB/s", Some("read (cold)".into())),
                secs("write_s", "write s"),
                secs("read_s", "read s"),
            ],
        });
        v
    }

    /// Subdirectories of the backing directory this workload reads.
    pub fn datasets(&self) -> &'static [&'static str] {
        match self.kind {
            Kind::Fio { n: 1, .. } => &[datasets::FIO_W1],
            Kind::Fio { n: 2, .. } => &[datasets::FIO_W2],
            Kind::Fio { .. } => &[datasets::FIO_W3],
            Kind::CatStorm | Kind::OpenLoop => &[datasets::SMALL],
            Kind::StatStorm => &[datasets::STAT],
            Kind::FindCold | Kind::FindWarm => &[datasets::TREE],
            Kind::UntarRm | Kind::Sequential => &[],
        }
    }

    /// Whether caches are dropped before each repetition.
    pub fn drop_caches_first(&self) -> bool {
        matches!(self.kind, Kind::Fio { .. } | Kind::StatStorm | Kind::FindCold)
    }

    /// Whether FUSE systems are remounted before each repetition.
    pub fn remount_each_rep(&self) -> bool {
        self.kind == Kind::FindCold
    }

    /// Whether one untimed run precedes the repetitions.
    pub fn warm_up(&self) -> bool {
        self.kind == Kind::FindWarm
    }

    /// The longest one repetition may take before it is declared hung.
    pub fn rep_timeout(&self, scale: &Scale) -> Duration {
        match self.kind {
            Kind::Fio { .. } => Duration::from_secs(scale.fio_runtime_s as u64 + 300),
            _ => Duration::from_secs(1800),
        }
    }

    /// One timed repetition.
    pub fn run_rep(&self, env: &mut RepEnv) -> Result<Figures> {
        match self.kind {
            Kind::Fio { n, direct } => run_fio(env, n, direct),
            Kind::CatStorm => cat_storm(env),
            Kind::OpenLoop => open_loop(env),
            Kind::StatStorm => stat_storm(env),
            Kind::FindCold | Kind::FindWarm => find(env),
            Kind::UntarRm => untar_rm(env),
            Kind::Sequential => sequential(env),
        }
    }
}

fn fio_shape(scale: &Scale, n: u8) -> &FioShape {
    match n {
        1 => &scale.w1,
        2 => &scale.w2,
        _ => &scale.w3,
    }
}

fn figures(pairs: &[(&str, f64)]) -> Figures {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn check_interrupt() -> Result<()> {
    if crate::interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// The fio command for workload `n`, writing its JSON to `json`.
pub fn fio_command(scale: &Scale, n: u8, direct: bool, dir: &Path, json: &Path) -> Command {
    let s = fio_shape(scale, n);
    let mut c = Command::new("fio");
    c.arg(format!("--name=w{n}"))
        .arg(format!("--directory={}", dir.display()))
        .arg(format!("--filename_format=w{n}.$filenum"))
        .arg(format!("--nrfiles={}", s.files))
        .arg(format!("--filesize={}k", s.file_kib))
        .arg(format!("--size={}k", s.file_kib * s.files as u64))
        .arg("--rw=randrw")
        .arg("--rwmixread=70")
        .arg(format!("--bs={}k", s.block_kib))
        .arg("--ioengine=libaio")
        .arg(format!("--iodepth={}", s.iodepth))
        .arg(format!("--numjobs={}", s.jobs))
        .arg(format!("--direct={}", u8::from(direct)))
        .arg("--time_based")
        .arg(format!("--runtime={}", scale.fio_runtime_s))
        .arg("--group_reporting")
        .arg("--output-format=json")
        .arg(format!("--output={}", json.display()));
    c
}

fn run_fio(env: &mut RepEnv, n: u8, direct: bool) -> Result<Figures> {
    let dir = env.root.join(match n {
        1 => datasets::FIO_W1,
        2 => datasets::FIO_W2,
        _ => datasets::FIO_W3,
    });
    let json = env.scratch.join(format!("fio-w{n}.json"));
    let _ = std::fs::remove_file(&json);
    let mut cmd = fio_command(env.scale, n, direct, &dir, &json);
    env.commands.push(exec::display(&cmd));
    exec::run(&mut cmd, Duration::from_secs(env.scale.fio_runtime_s as u64 + 240))?;
    let text = std::fs::read_to_string(&json).with_context(|| format!("reading fio's {}", json.display()))?;
    parse_fio(&text)
}

/// Read and write IOPS and MiB/s from fio's `--output-format=json` (one
/// group-reported job).
pub fn parse_fio(text: &str) -> Result<Figures> {
    // fio may print warnings before the JSON object.
    let start = text.find('{').context("fio wrote no JSON")?;
    let v: serde_json::Value = serde_json::from_str(&text[start..]).context("parsing fio's JSON")?;
    let job = v.get("jobs").and_then(|j| j.get(0)).context("fio's JSON has no jobs")?;
    let err = job.get("error").and_then(|e| e.as_i64()).unwrap_or(0);
    if err != 0 {
        bail!("fio job failed with error {err} ({})", std::io::Error::from_raw_os_error(err as i32));
    }
    let get = |dir: &str, k: &str| job.get(dir).and_then(|d| d.get(k)).and_then(|x| x.as_f64()).unwrap_or(0.0);
    let (ri, wi) = (get("read", "iops"), get("write", "iops"));
    // fio's "bw" is KiB/s.
    let (rb, wb) = (get("read", "bw") / 1024.0, get("write", "bw") / 1024.0);
    if ri + wi <= 0.0 {
        bail!("fio did no I/O");
    }
    Ok(figures(&[
        ("iops", ri + wi),
        ("mibps", rb + wb),
        ("read_iops", ri),
        ("write_iops", wi),
        ("read_mibps", rb),
        ("write_mibps", wb),
    ]))
}

fn cat_storm(env: &mut RepEnv) -> Result<Figures> {
    let path = env.root.join(datasets::SMALL_FILE);
    let n = env.scale.cat_runs;
    env.commands.push(format!("{n} x `cat {} > /dev/null` (a fresh process each)", path.display()));
    let t = Instant::now();
    for i in 0..n {
        if i % 256 == 0 {
            check_interrupt()?;
        }
        exec::run_quiet(Command::new("cat").arg(&path), Duration::from_secs(10))
            .with_context(|| format!("cat #{i}"))?;
    }
    let s = t.elapsed().as_secs_f64();
    Ok(figures(&[("ops_per_s", n as f64 / s), ("seconds", s)]))
}

fn open_loop(env: &mut RepEnv) -> Result<Figures> {
    let path = env.root.join(datasets::SMALL_FILE);
    let n = env.scale.open_loops;
    let want = env.scale.small_file_bytes;
    env.commands.push(format!("{n} x open/read({want} B)/close of {} (in process)", path.display()));
    let mut buf = vec![0u8; want.max(1)];
    let t = Instant::now();
    for i in 0..n {
        if i % 4096 == 0 {
            check_interrupt()?;
        }
        let mut f = File::open(&path).with_context(|| format!("open #{i} of {}", path.display()))?;
        let got = f.read(&mut buf).with_context(|| format!("read #{i}"))?;
        if got != want && i == 0 {
            bail!("read {got} bytes of {}, expected {want}", path.display());
        }
    }
    let s = t.elapsed().as_secs_f64();
    Ok(figures(&[("ops_per_s", n as f64 / s), ("seconds", s)]))
}

fn stat_storm(env: &mut RepEnv) -> Result<Figures> {
    let paths: Vec<PathBuf> = datasets::stat_paths(env.scale).into_iter().map(|p| env.root.join(p)).collect();
    let passes = env.scale.stat_passes;
    env.commands.push(format!(
        "{passes} passes of stat(2) over {} files under {} (in process)",
        paths.len(),
        env.root.join(datasets::STAT).display()
    ));
    let t = Instant::now();
    for _ in 0..passes {
        check_interrupt()?;
        for p in &paths {
            std::fs::metadata(p).with_context(|| format!("stat {}", p.display()))?;
        }
    }
    let s = t.elapsed().as_secs_f64();
    Ok(figures(&[("ops_per_s", (paths.len() as u64 * passes as u64) as f64 / s), ("seconds", s)]))
}

fn find(env: &mut RepEnv) -> Result<Figures> {
    let dir = env.root.join(datasets::TREE);
    let out = env.scratch.join("find.out");
    let mut cmd = Command::new("find");
    cmd.arg(&dir);
    env.commands.push(format!("{} > find.out", exec::display(&cmd)));
    let t = Instant::now();
    exec::run_to(&mut cmd, Duration::from_secs(1800), Some(&out))?;
    let s = t.elapsed().as_secs_f64();
    let text = std::fs::read(&out)?;
    let lines = text.iter().filter(|&&b| b == b'\n').count() as u64;
    let want = env.scale.find_entries as u64 + 1;
    if lines != want {
        bail!("find listed {lines} entries, expected {want}");
    }
    Ok(figures(&[("ops_per_s", lines as f64 / s), ("seconds", s)]))
}

fn sync_all() -> Result<()> {
    exec::run(&mut Command::new("sync"), Duration::from_secs(600)).map(|_| ())
}

fn untar_rm(env: &mut RepEnv) -> Result<Figures> {
    let dir = env.root.join("untar");
    if dir.exists() {
        exec::run(Command::new("rm").arg("-rf").arg(&dir), Duration::from_secs(1800))?;
    }
    std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    sync_all()?;
    let mut tar = Command::new("tar");
    tar.arg("-xf").arg(env.tarball).arg("-C").arg(&dir);
    env.commands.push(exec::display(&tar));
    let t = Instant::now();
    exec::run(&mut tar, Duration::from_secs(1800))?;
    let untar_s = t.elapsed().as_secs_f64();
    sync_all()?;
    check_interrupt()?;
    let mut rm = Command::new("rm");
    rm.arg("-r").arg(&dir);
    env.commands.push(exec::display(&rm));
    let t = Instant::now();
    exec::run(&mut rm, Duration::from_secs(1800))?;
    let rm_s = t.elapsed().as_secs_f64();
    if dir.exists() {
        bail!("{} still exists after rm -r", dir.display());
    }
    sync_all()?;
    let files = env.scale.tar_files as f64;
    Ok(figures(&[
        ("untar_files_per_s", files / untar_s),
        ("untar_s", untar_s),
        ("rm_files_per_s", files / rm_s),
        ("rm_s", rm_s),
    ]))
}

/// Writes "3" to /proc/sys/vm/drop_caches after a sync.
pub fn drop_caches() -> Result<()> {
    sync_all()?;
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("echo 3 > /proc/sys/vm/drop_caches (needs root)")
}

fn sequential(env: &mut RepEnv) -> Result<Figures> {
    let path = env.root.join("seq.dat");
    let blocks = env.scale.seq_mib;
    env.commands.push(format!(
        "write {blocks} x 1 MiB to {p} + fsync; sync; echo 3 > /proc/sys/vm/drop_caches; read {p} in 1 MiB blocks (in process)",
        p = path.display()
    ));
    let mut buf = vec![0u8; 1 << 20];
    Rng::new(42).fill(&mut buf);
    let t = Instant::now();
    {
        let mut f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        for i in 0..blocks {
            if i % 64 == 0 {
                check_interrupt()?;
            }
            f.write_all(&buf).with_context(|| format!("writing block {i} of {}", path.display()))?;
        }
        f.sync_all().with_context(|| format!("fsync {}", path.display()))?;
    }
    let write_s = t.elapsed().as_secs_f64();
    drop_caches()?;
    let t = Instant::now();
    let mut total = 0u64;
    {
        let mut f = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        loop {
            let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total.is_multiple_of(64 << 20) {
                check_interrupt()?;
            }
        }
    }
    let read_s = t.elapsed().as_secs_f64();
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    if total != blocks << 20 {
        bail!("read back {total} bytes, wrote {}", blocks << 20);
    }
    let mib = blocks as f64;
    Ok(figures(&[
        ("write_mibps", mib / write_s),
        ("read_mibps", mib / read_s),
        ("write_s", write_s),
        ("read_s", read_s),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fio_json() {
        let text = r#"note: a warning line
{"fio version":"fio-3.33","jobs":[{"jobname":"w1","error":0,
 "read":{"iops":700.5,"bw":2802},"write":{"iops":300.0,"bw":1200}}]}"#;
        let f = parse_fio(text).unwrap();
        assert_eq!(f["iops"], 1000.5);
        assert!((f["read_mibps"] - 2802.0 / 1024.0).abs() < 1e-9);
        let failed = r#"{"jobs":[{"error":5,"read":{"iops":0},"write":{"iops":0}}]}"#;
        assert!(parse_fio(failed).is_err());
    }

    #[test]
    fn every_workload_charts_something() {
        for w in Workload::all(&Scale::quick()) {
            assert!(w.metrics.iter().any(|m| m.chart.is_some()), "{}", w.name);
        }
    }
}

//! The workloads: what each one runs on a system's directory, and what it
//! measures. One call of [`Workload::run_rep`] is one timed repetition.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::datasets;
use crate::exec;
use crate::scale::{FioShape, Scale};
use crate::worker;

/// Which chart a workload's bars go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Group {
    Fio,
    Metadata,
    Tree,
    Source,
    Sequential,
}

impl Group {
    pub const ALL: [Group; 5] = [Group::Fio, Group::Metadata, Group::Tree, Group::Source, Group::Sequential];

    pub fn title(self) -> &'static str {
        match self {
            Group::Fio => "fio randrw 70:30 (eFUSE W1-W3)",
            Group::Metadata => "metadata storms",
            Group::Tree => "trees: find, untar, rm -r",
            Group::Source => "a source tree: grep -r, untar, cp -r, git status",
            Group::Sequential => "sequential 1 MiB",
        }
    }

    pub fn file_stem(self) -> &'static str {
        match self {
            Group::Fio => "fio",
            Group::Metadata => "metadata",
            Group::Tree => "tree",
            Group::Source => "source",
            Group::Sequential => "sequential",
        }
    }
}

/// What is in the caches when a repetition starts: the same on every
/// system, prepared by the runner before each repetition (untimed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum CacheState {
    /// Nothing cached: `sync; echo 3 > /proc/sys/vm/drop_caches` with the
    /// FUSE system unmounted, then mounted fresh (memfs: caches dropped but
    /// not remounted, which would empty it). ext4: caches dropped.
    Cold,
    /// `sync`, then everything the workload reads read once through the
    /// system under test (or the workload run once, untimed); fio keeps the
    /// page cache it finds (`--invalidate=0`).
    Warm,
}

impl CacheState {
    pub fn label(self) -> &'static str {
        match self {
            CacheState::Cold => "cold",
            CacheState::Warm => "warm",
        }
    }
}

/// How a warm workload's caches are warmed before each repetition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Warming {
    /// Read (whole, buffered) every file under these dataset paths, relative
    /// to the system's directory, and list every directory on the way.
    ReadDatasets(&'static [&'static str]),
    /// Read the tarball in the work directory (on ext4, outside the systems).
    ReadTarball(&'static str),
    /// Run the workload once, untimed (what it touches is what it reads).
    RunOnce,
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

/// A figure reported as it is (no ratio, no chart).
fn info(key: &'static str, label: &'static str) -> Metric {
    Metric { key, label, rate: false, chart: None }
}

/// The direct=1 fio figure: MiB of the dataset in the backing files' page
/// cache after the run.
pub const BACKING_CACHED: &str = "backing_cached_mib";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Kind {
    Fio { n: u8, direct: bool },
    CatStorm,
    OpenLoop,
    StatStorm,
    StatStormWarm,
    FindCold,
    FindWarm,
    UntarRm,
    GrepR,
    UntarSrc,
    CpR,
    GitStatus,
    SeqWrite,
    SeqRead,
}

/// A workload as the runner sees it.
#[derive(Clone, Debug, Serialize)]
pub struct Workload {
    pub name: String,
    pub kind: Kind,
    pub group: Group,
    pub description: String,
    /// The caches' state at the start of each repetition, on every system.
    pub cache: CacheState,
    /// For the report: what that state is for this workload, and why.
    pub cache_note: String,
    pub metrics: Vec<Metric>,
}

/// What a repetition may use.
pub struct RepEnv<'a> {
    /// The system's directory (ext4: the backing dir; FUSE: the mount point).
    pub root: &'a Path,
    /// The backing directory the system shows (ext4 and stackfs-like
    /// systems; None for memfs), to look at the backing files' page cache.
    pub backing: Option<&'a Path>,
    pub scale: &'a Scale,
    /// The work directory: the tarballs live there (on ext4).
    pub work: &'a Path,
    /// What the machine-dependent datasets turned out to hold.
    pub made: &'a datasets::Made,
    /// Where fio's JSON and find's output go.
    pub scratch: &'a Path,
    /// Commands run, for the report.
    pub commands: &'a mut Vec<String>,
    /// The FUSE daemon's process (None for ext4), to wait for it to let go
    /// of removed files.
    pub daemon: Option<u32>,
    /// The efuse binary (for the bench worker, [`crate::worker`]).
    pub efuse_exe: &'a Path,
    /// What every program a repetition runs is started under (the bypass
    /// systems: `efuse run --mount MNT --`); empty: nothing.
    pub wrap: &'a [std::ffi::OsString],
}

impl RepEnv<'_> {
    /// A command running `prog` under the system's wrapper.
    pub fn command(&self, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        crate::worker::wrapped(self.wrap, prog.as_ref())
    }
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
                let mut metrics = vec![
                    rate("iops", "IOPS (r+w)", chart_iops),
                    rate("mibps", "MiB/s (r+w)", chart_bw),
                    rate("read_iops", "read IOPS", None),
                    rate("write_iops", "write IOPS", None),
                    rate("read_mibps", "read MiB/s", None),
                    rate("write_mibps", "write MiB/s", None),
                ];
                let (cache, cache_note) = if direct {
                    metrics.push(info(BACKING_CACHED, "backing page cache after (MiB)"));
                    (
                        CacheState::Cold,
                        "cold: direct I/O should not use the page cache, so every system starts with none and a \
                         fresh daemon. After each run the bench measures how much of the dataset sits in the \
                         backing files' page cache (mincore): a system that does not do direct I/O on its backing \
                         file shows it there, and its figure is marked `(cached)`"
                            .to_string(),
                    )
                } else {
                    (
                        CacheState::Warm,
                        "warm: the dataset fits in memory, so every system has it read through itself once \
                         (untimed) and fio keeps what is cached (`--invalidate=0`); this measures page-cache-served \
                         random I/O on every system alike"
                            .to_string(),
                    )
                };
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
                    cache,
                    cache_note,
                    metrics,
                });
            }
        }
        let warm_file = "warm: the file read once through the system before each repetition (untimed)".to_string();
        v.push(Workload {
            name: "cat-storm".into(),
            kind: Kind::CatStorm,
            group: Group::Metadata,
            description: format!(
                "bt-fuse's cat storm: one {}-byte file read by {} fresh `cat` processes",
                scale.small_file_bytes, scale.cat_runs
            ),
            cache: CacheState::Warm,
            cache_note: warm_file.clone(),
            metrics: vec![rate("ops_per_s", "cats/s", Some("cat storm".into())), secs("seconds", "wall s")],
        });
        v.push(Workload {
            name: "open-read-close".into(),
            kind: Kind::OpenLoop,
            group: Group::Metadata,
            description: format!("{} x open/read/close of one small file, in one process", scale.open_loops),
            cache: CacheState::Warm,
            cache_note: warm_file,
            metrics: vec![rate("ops_per_s", "opens/s", Some("open/read/close".into())), secs("seconds", "wall s")],
        });
        v.push(Workload {
            name: "stat-storm".into(),
            kind: Kind::StatStorm,
            group: Group::Metadata,
            description: format!(
                "stat(2) of {} files in 100 directories, {} passes, in one process",
                scale.stat_files, scale.stat_passes
            ),
            cache: CacheState::Cold,
            cache_note: "cold at the first pass; the later passes find what each system's own caching kept".into(),
            metrics: vec![rate("ops_per_s", "stats/s", Some("stat storm".into())), secs("seconds", "wall s")],
        });
        v.push(Workload {
            name: "stat-storm-warm".into(),
            kind: Kind::StatStormWarm,
            group: Group::Metadata,
            description: format!(
                "stat(2) of {} files in 100 directories, {} passes, in one process",
                scale.stat_files,
                scale.stat_passes * 10
            ),
            cache: CacheState::Warm,
            cache_note: "warm: the same passes run once before each repetition, untimed, in another process".into(),
            metrics: vec![rate("ops_per_s", "stats/s", Some("stat storm (warm)".into())), secs("seconds", "wall s")],
        });
        v.push(Workload {
            name: "find-cold".into(),
            kind: Kind::FindCold,
            group: Group::Tree,
            description: format!("`find` over {} entries", scale.find_entries),
            cache: CacheState::Cold,
            cache_note: "cold: every directory listed and every name looked up from scratch".into(),
            metrics: vec![rate("ops_per_s", "entries/s", Some("find cold".into())), secs("seconds", "wall s")],
        });
        v.push(Workload {
            name: "find-warm".into(),
            kind: Kind::FindWarm,
            group: Group::Tree,
            description: format!("`find` over {} entries", scale.find_entries),
            cache: CacheState::Warm,
            cache_note: "warm: one untimed `find` before each repetition".into(),
            metrics: vec![rate("ops_per_s", "entries/s", Some("find warm".into())), secs("seconds", "wall s")],
        });
        v.push(Workload {
            name: "untar-rm".into(),
            kind: Kind::UntarRm,
            group: Group::Tree,
            description: format!(
                "`tar -xf` of a generated {}-file, ~{} MiB tarball (on ext4) into the system, `sync` (untimed), \
                 then `rm -r` of it, timed until the daemon has closed its descriptors on the removed files \
                 (the backing file system frees them only then; on ext4 `rm` does it itself)",
                scale.tar_files, scale.tar_target_mib
            ),
            cache: CacheState::Warm,
            cache_note: "warm source: `sync`, then the tarball (on ext4, outside every system) read once before \
                         each repetition, so every system unpacks from memory; the target directory is new. `rm -r` \
                         starts right after the untar and a `sync`, with the tree as the untar left it"
                .into(),
            metrics: vec![
                rate("untar_files_per_s", "untar files/s", Some("untar".into())),
                secs("untar_s", "untar s"),
                rate("rm_files_per_s", "rm files/s", Some("rm -r".into())),
                secs("rm_s", "rm s"),
            ],
        });
        let src = format!("a copy of up to {} regular files of {}", scale.src_files, datasets::HEADERS_DIR);
        v.push(Workload {
            name: "grep-r".into(),
            kind: Kind::GrepR,
            group: Group::Source,
            description: format!(
                "`grep -r -l -F` of a string found in {} files only, over {src} (every file read whole)",
                datasets::NEEDLE_FILES
            ),
            cache: CacheState::Warm,
            cache_note: "warm: every file of the tree read once through the system before each repetition \
                         (a search run again over a tree in memory)"
                .into(),
            metrics: vec![rate("files_per_s", "files/s", Some("grep -r".into())), secs("seconds", "wall s")],
        });
        v.push(Workload {
            name: "untar-src".into(),
            kind: Kind::UntarSrc,
            group: Group::Source,
            description: format!(
                "`tar -xf` of {src}, packed with tar at bench time (tarball on ext4), into the system; the \
                 extracted files are counted and removed afterwards (untimed)"
            ),
            cache: CacheState::Warm,
            cache_note: "warm source: `sync`, then the tarball (on ext4, outside every system) read once before \
                         each repetition; the target directory is new"
                .into(),
            metrics: vec![rate("files_per_s", "files/s", Some("untar (headers)".into())), secs("seconds", "wall s")],
        });
        v.push(Workload {
            name: "cp-r".into(),
            kind: Kind::CpR,
            group: Group::Source,
            description: format!(
                "`cp -r` of {src} to a new directory of the same system; the copy is counted and removed \
                 afterwards (untimed)"
            ),
            cache: CacheState::Warm,
            cache_note: "warm source: `sync`, then every file of the tree read once through the system before \
                         each repetition; the target directory is new"
                .into(),
            metrics: vec![rate("files_per_s", "files/s", Some("cp -r".into())), secs("seconds", "wall s")],
        });
        v.push(Workload {
            name: "git-status".into(),
            kind: Kind::GitStatus,
            group: Group::Source,
            description: format!(
                "`git --no-optional-locks status --porcelain` in a clean repository of {src} (init, add and \
                 commit when the dataset is made; `core.checkStat minimal`, no ctime, so another file \
                 system's inode numbers do not make files look changed); the output must be empty"
            ),
            cache: CacheState::Warm,
            cache_note: "warm: one untimed `git status` before each repetition (a developer's second `git status`)"
                .into(),
            metrics: vec![rate("files_per_s", "files/s", Some("git status".into())), secs("seconds", "wall s")],
        });
        v.push(Workload {
            name: "sequential-write".into(),
            kind: Kind::SeqWrite,
            group: Group::Sequential,
            description: format!(
                "write a new {} MiB file in 1 MiB blocks, then fsync (timed together); removed afterwards",
                scale.seq_mib
            ),
            cache: CacheState::Cold,
            cache_note: "cold (nothing to read; no dirty data from before)".into(),
            metrics: vec![rate("write_mibps", "write MiB/s", Some("write+fsync".into())), secs("write_s", "write s")],
        });
        v.push(Workload {
            name: "sequential-read".into(),
            kind: Kind::SeqRead,
            group: Group::Sequential,
            description: format!("read a {} MiB file in 1 MiB blocks", scale.seq_mib),
            cache: CacheState::Cold,
            cache_note: "cold: every byte comes from the disk (memfs: from the daemon's memory)".into(),
            metrics: vec![rate("read_mibps", "read MiB/s", Some("read (cold)".into())), secs("read_s", "read s")],
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
            Kind::StatStorm | Kind::StatStormWarm => &[datasets::STAT],
            Kind::FindCold | Kind::FindWarm => &[datasets::TREE],
            Kind::GrepR | Kind::CpR => &[datasets::SRC_TREE],
            Kind::GitStatus => &[datasets::GIT_REPO],
            Kind::SeqRead => &[datasets::SEQ],
            Kind::UntarRm | Kind::UntarSrc | Kind::SeqWrite => &[],
        }
    }

    /// Datasets kept outside the systems (tarballs in the work directory).
    pub fn outside_datasets(&self) -> &'static [&'static str] {
        match self.kind {
            Kind::UntarRm => &[datasets::TARBALL],
            Kind::UntarSrc => &[datasets::SRC_TARBALL],
            _ => &[],
        }
    }

    /// How a warm workload is warmed (None when it starts cold).
    pub fn warming(&self) -> Option<Warming> {
        if self.cache == CacheState::Cold {
            return None;
        }
        Some(match self.kind {
            Kind::UntarRm => Warming::ReadTarball(datasets::TARBALL),
            Kind::UntarSrc => Warming::ReadTarball(datasets::SRC_TARBALL),
            Kind::FindWarm | Kind::GitStatus | Kind::StatStormWarm => Warming::RunOnce,
            _ => Warming::ReadDatasets(self.datasets()),
        })
    }

    /// The cache state as the report states it.
    pub fn cache_text(&self) -> String {
        let how = match self.cache {
            CacheState::Cold => {
                "before each repetition `sync; echo 3 > /proc/sys/vm/drop_caches` runs with the FUSE system \
                 unmounted, and it is mounted fresh (memfs: caches dropped, not remounted, which would empty it; \
                 ext4: caches dropped)"
            }
            CacheState::Warm => {
                "before each repetition `sync`, then the warming below, on every system, untimed; fio runs with \
                 `--invalidate=0`"
            }
        };
        format!("**{}** ({how}). Here: {}.", self.cache.label(), self.cache_note)
    }

    /// The longest one repetition may take before it is declared hung.
    pub fn rep_timeout(&self, scale: &Scale) -> Duration {
        match self.kind {
            Kind::Fio { .. } => Duration::from_secs(scale.fio_runtime_s as u64 + 300),
            _ => Duration::from_secs(1800),
        }
    }

    /// Warms the caches for the next repetition (a warm workload), untimed.
    pub fn warm_up(&self, env: &mut RepEnv) -> Result<()> {
        match self.warming() {
            None => Ok(()),
            Some(Warming::RunOnce) => self.run_rep(env).map(|_| ()),
            Some(Warming::ReadDatasets(sets)) if !env.wrap.is_empty() => {
                // A bypass system: read through it as its programs will,
                // under `efuse run`, so that its metadata tables are warm as
                // the kernel's caches are after a read through the mount.
                for set in sets {
                    let job = crate::worker::Job::ReadTree { path: env.root.join(set) };
                    crate::worker::run(env, &job, self.rep_timeout(env.scale))?;
                }
                Ok(())
            }
            Some(Warming::ReadDatasets(sets)) => {
                let mut buf = vec![0u8; 1 << 20];
                for set in sets {
                    read_all(&env.root.join(set), &mut buf)?;
                }
                Ok(())
            }
            Some(Warming::ReadTarball(name)) => {
                read_all(&datasets::tarball_path(env.work, name), &mut vec![0u8; 1 << 20]).map(|_| ())
            }
        }
    }

    /// One timed repetition.
    pub fn run_rep(&self, env: &mut RepEnv) -> Result<Figures> {
        match self.kind {
            Kind::Fio { n, direct } => run_fio(env, n, direct, self.cache),
            Kind::CatStorm => cat_storm(env),
            Kind::OpenLoop => open_loop(env),
            Kind::StatStorm => stat_storm(env, env.scale.stat_passes),
            // Warm passes are short: ten times as many, for a figure above
            // the noise.
            Kind::StatStormWarm => stat_storm(env, env.scale.stat_passes * 10),
            Kind::FindCold | Kind::FindWarm => find(env),
            Kind::UntarRm => untar_rm(env),
            Kind::GrepR => grep_r(env),
            Kind::UntarSrc => untar_src(env),
            Kind::CpR => cp_r(env),
            Kind::GitStatus => git_status(env),
            Kind::SeqWrite => seq_write(env),
            Kind::SeqRead => seq_read(env),
        }
    }
}

/// Reads every regular file under `path` (or `path` itself) whole, listing
/// each directory and stat'ing each entry on the way; returns the bytes read.
pub fn read_all(path: &Path, buf: &mut [u8]) -> Result<u64> {
    let meta = std::fs::symlink_metadata(path).with_context(|| format!("stat {}", path.display()))?;
    if meta.is_dir() {
        let mut total = 0;
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("listing {}", path.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("listing {}", path.display()))?;
        entries.sort();
        for e in entries {
            total += read_all(&e, buf)?;
        }
        return Ok(total);
    }
    if !meta.is_file() {
        return Ok(0);
    }
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut total = 0u64;
    loop {
        let n = f.read(buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
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

/// The fio command for workload `n`, writing its JSON to `json`. A warm run
/// keeps the page cache it finds (`--invalidate=0`); fio's default would drop
/// the pages of the file it opens, which on a FUSE mount are the FUSE file's
/// while the backing file's stay: cold ext4 against warm backing files.
pub fn fio_command(scale: &Scale, n: u8, direct: bool, cache: CacheState, dir: &Path, json: &Path) -> Command {
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
        .arg(format!("--invalidate={}", u8::from(cache == CacheState::Cold)))
        .arg("--time_based")
        .arg(format!("--runtime={}", scale.fio_runtime_s))
        .arg("--group_reporting")
        .arg("--output-format=json")
        .arg(format!("--output={}", json.display()));
    c
}

fn run_fio(env: &mut RepEnv, n: u8, direct: bool, cache: CacheState) -> Result<Figures> {
    let set = match n {
        1 => datasets::FIO_W1,
        2 => datasets::FIO_W2,
        _ => datasets::FIO_W3,
    };
    let dir = env.root.join(set);
    let json = env.scratch.join(format!("fio-w{n}.json"));
    let _ = std::fs::remove_file(&json);
    let cmd = fio_command(env.scale, n, direct, cache, &dir, &json);
    let mut cmd = worker::rewrap(env.wrap, cmd);
    env.commands.push(exec::display(&cmd));
    exec::run(&mut cmd, Duration::from_secs(env.scale.fio_runtime_s as u64 + 240))?;
    let text = std::fs::read_to_string(&json).with_context(|| format!("reading fio's {}", json.display()))?;
    let mut figures = parse_fio(&text)?;
    if let (true, Some(backing)) = (direct, env.backing) {
        let shape = fio_shape(env.scale, n);
        let prefix = format!("w{n}");
        let mut cached = 0u64;
        for i in 0..shape.files {
            cached += datasets::resident_bytes(&backing.join(set).join(datasets::fio_file_name(&prefix, i)))?;
        }
        figures.insert(BACKING_CACHED.into(), cached as f64 / 1048576.0);
    }
    Ok(figures)
}

/// Whether a direct=1 run's figures show it went through the backing page
/// cache: more than a tenth of the dataset cached there afterwards.
pub fn went_through_page_cache(scale: &Scale, n: u8, figures: &Figures) -> bool {
    let s = fio_shape(scale, n);
    let dataset_mib = (s.files as u64 * s.file_kib) as f64 / 1024.0;
    figures.get(BACKING_CACHED).is_some_and(|&c| c > dataset_mib / 10.0)
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
    env.commands
        .push(format!("{n} x `cat {} > /dev/null` (a fresh process each, started by one process)", path.display()));
    worker::run(env, &worker::Job::CatStorm { path, n: n.into() }, Duration::from_secs(1800))
}

fn open_loop(env: &mut RepEnv) -> Result<Figures> {
    let path = env.root.join(datasets::SMALL_FILE);
    let n = env.scale.open_loops;
    let want = env.scale.small_file_bytes;
    env.commands.push(format!("{n} x open/read({want} B)/close of {} (one process)", path.display()));
    let job = worker::Job::OpenLoop { path, n: n.into(), want };
    worker::run(env, &job, Duration::from_secs(1800))
}

fn stat_storm(env: &mut RepEnv, passes: u32) -> Result<Figures> {
    let paths: Vec<PathBuf> = datasets::stat_paths(env.scale).into_iter().map(|p| env.root.join(p)).collect();
    env.commands.push(format!(
        "{passes} passes of stat(2) over {} files under {} (one process)",
        paths.len(),
        env.root.join(datasets::STAT).display()
    ));
    let list = env.scratch.join("stat-storm.list");
    worker::write_list(&list, &paths)?;
    worker::run(env, &worker::Job::StatStorm { list, passes }, Duration::from_secs(1800))
}

fn find(env: &mut RepEnv) -> Result<Figures> {
    let dir = env.root.join(datasets::TREE);
    let out = env.scratch.join("find.out");
    let mut cmd = env.command("find");
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

/// `sync`, with a time limit.
pub fn sync_all() -> Result<()> {
    exec::run(&mut Command::new("sync"), Duration::from_secs(600)).map(|_| ())
}

fn untar_rm(env: &mut RepEnv) -> Result<Figures> {
    let dir = env.root.join("untar");
    remove_tree(&dir)?;
    let baseline = fds_before(env)?;
    std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    sync_all()?;
    let mut tar = env.command("tar");
    tar.arg("-xf").arg(datasets::tarball_path(env.work, datasets::TARBALL)).arg("-C").arg(&dir);
    env.commands.push(exec::display(&tar));
    let t = Instant::now();
    exec::run(&mut tar, Duration::from_secs(1800))?;
    let untar_s = t.elapsed().as_secs_f64();
    sync_all()?;
    check_interrupt()?;
    let mut rm = env.command("rm");
    rm.arg("-r").arg(&dir);
    env.commands.push(exec::display(&rm));
    let t = Instant::now();
    exec::run(&mut rm, Duration::from_secs(1800))?;
    wait_released(env, baseline)?;
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

fn seq_write(env: &mut RepEnv) -> Result<Figures> {
    let path = env.root.join("seq-write.dat");
    let blocks = env.scale.seq_mib;
    env.commands.push(format!("write {blocks} x 1 MiB to {} + fsync (one process)", path.display()));
    let baseline = fds_before(env)?;
    let figures = worker::run(env, &worker::Job::SeqWrite { path: path.clone(), blocks }, Duration::from_secs(1800))?;
    let size = std::fs::metadata(&path).with_context(|| format!("stat {}", path.display()))?.len();
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    wait_released(env, baseline)?;
    if size != blocks << 20 {
        bail!("{} holds {size} bytes after writing {}", path.display(), blocks << 20);
    }
    Ok(figures)
}

fn seq_read(env: &mut RepEnv) -> Result<Figures> {
    let path = env.root.join(datasets::SEQ_FILE);
    let want = env.scale.seq_mib << 20;
    env.commands.push(format!("read {} in 1 MiB blocks (one process)", path.display()));
    worker::run(env, &worker::Job::SeqRead { path, want }, Duration::from_secs(1800))
}

/// Descriptors process `pid` holds on removed files and directories under
/// `backing`: those whose target `/proc/PID/fd` shows with " (deleted)"
/// appended. Descriptors of files that still exist are not counted: a
/// pass-through daemon keeps bounded caches of them (an `O_PATH` descriptor
/// per inode the kernel holds, descriptors of open files), whose size
/// moves with whatever the workload looked up or read, and they hold no
/// space a removal should free.
fn removed_fds(pid: u32, backing: &Path) -> Result<usize> {
    use std::os::unix::ffi::OsStrExt;
    let dir = format!("/proc/{pid}/fd");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        // A descriptor closed while we look is simply not counted.
        let Ok(e) = e else { continue };
        let Ok(target) = std::fs::read_link(e.path()) else { continue };
        if target.starts_with(backing) && target.as_os_str().as_bytes().ends_with(b" (deleted)") {
            n += 1;
        }
    }
    Ok(n)
}

/// How long a daemon may take to close the descriptors of files removed
/// through it.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(60);

/// The daemon's descriptors on removed files of the backing directory now
/// (None for ext4 and memfs), for [`wait_released`].
fn fds_before(env: &RepEnv) -> Result<Option<usize>> {
    match (env.daemon, env.backing) {
        (Some(pid), Some(backing)) => removed_fds(pid, backing).map(Some),
        _ => Ok(None),
    }
}

/// A pass-through daemon holds a descriptor for each inode the kernel
/// knows. A file removed through it is freed on the backing file system
/// (its blocks released: on a disk mounted with `discard`, a synchronous
/// discard) only when the daemon closes that descriptor, after the kernel's
/// FORGET, i.e. after `rm` returned; on ext4 `rm` itself does that work.
/// Waits until the daemon holds no more descriptors of removed files under
/// the backing directory than `baseline`, so removal is measured to the
/// same point on every system (and no system carries it into its next
/// timed run).
fn wait_released(env: &RepEnv, baseline: Option<usize>) -> Result<()> {
    let (Some(pid), Some(backing), Some(base)) = (env.daemon, env.backing, baseline) else { return Ok(()) };
    let deadline = Instant::now() + RELEASE_TIMEOUT;
    loop {
        let now = removed_fds(pid, backing)?;
        if now <= base {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the daemon (pid {pid}) still holds {now} descriptors of removed files under {} {} s after the \
                 removal; it held {base} before the files were made",
                backing.display(),
                RELEASE_TIMEOUT.as_secs()
            );
        }
        check_interrupt()?;
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Regular files under `dir` (not following links).
fn count_files(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        let t = e.file_type().with_context(|| format!("stat {}", e.path().display()))?;
        if t.is_dir() {
            n += count_files(&e.path())?;
        } else if t.is_file() {
            n += 1;
        }
    }
    Ok(n)
}

/// Removes `dir` if it exists (clean-up, untimed).
fn remove_tree(dir: &Path) -> Result<()> {
    if dir.exists() {
        exec::run(Command::new("rm").arg("-rf").arg(dir), Duration::from_secs(1800))?;
    }
    Ok(())
}

fn grep_r(env: &mut RepEnv) -> Result<Figures> {
    let dir = env.root.join(datasets::SRC_TREE);
    let out = env.scratch.join("grep.out");
    let mut cmd = env.command("grep");
    cmd.args(["-r", "-l", "-F", datasets::NEEDLE]).arg(&dir).env("LC_ALL", "C");
    env.commands.push(format!("LC_ALL=C {} > grep.out", exec::display(&cmd)));
    let t = Instant::now();
    exec::run_to(&mut cmd, Duration::from_secs(1800), Some(&out))?;
    let s = t.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
    let found = text.lines().count();
    let want = datasets::needle_indexes(env.made.src_files as usize).len();
    if found != want {
        bail!("grep found the string in {found} files, expected {want}");
    }
    Ok(figures(&[("files_per_s", env.made.src_files as f64 / s), ("seconds", s)]))
}

fn untar_src(env: &mut RepEnv) -> Result<Figures> {
    let dir = env.root.join("untar-src");
    remove_tree(&dir)?;
    let baseline = fds_before(env)?;
    std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    sync_all()?;
    let mut tar = env.command("tar");
    tar.arg("-xf").arg(datasets::tarball_path(env.work, datasets::SRC_TARBALL)).arg("-C").arg(&dir);
    source_tree_made(env, tar, &dir, baseline)
}

fn cp_r(env: &mut RepEnv) -> Result<Figures> {
    let (src, dst) = (env.root.join(datasets::SRC_TREE), env.root.join("cp-dst"));
    remove_tree(&dst)?;
    let baseline = fds_before(env)?;
    sync_all()?;
    let mut cp = env.command("cp");
    cp.arg("-r").arg(&src).arg(&dst);
    source_tree_made(env, cp, &dst, baseline)
}

/// Times `cmd`, which makes a copy of the source tree at `dir`; then
/// (untimed) counts the copy, removes it and waits until the daemon let go
/// of its files (`baseline`: see [`fds_before`]), so that what a daemon
/// frees after `rm` returns does not land in the next timed run.
fn source_tree_made(env: &mut RepEnv, mut cmd: Command, dir: &Path, baseline: Option<usize>) -> Result<Figures> {
    env.commands.push(exec::display(&cmd));
    let t = Instant::now();
    exec::run(&mut cmd, Duration::from_secs(1800))?;
    let s = t.elapsed().as_secs_f64();
    let got = count_files(dir)?;
    remove_tree(dir)?;
    wait_released(env, baseline)?;
    sync_all()?;
    if got != env.made.src_files as u64 {
        bail!("`{}` made {got} files, the source tree holds {}", exec::display(&cmd), env.made.src_files);
    }
    Ok(figures(&[("files_per_s", env.made.src_files as f64 / s), ("seconds", s)]))
}

fn git_status(env: &mut RepEnv) -> Result<Figures> {
    let repo = env.root.join(datasets::GIT_REPO);
    // --no-optional-locks: a status that finds something to refresh must not
    // rewrite the index the next system reads.
    let mut cmd = datasets::git(&repo);
    cmd.args(["--no-optional-locks", "status", "--porcelain"]);
    let mut cmd = worker::rewrap(env.wrap, cmd);
    env.commands.push(exec::display(&cmd));
    let t = Instant::now();
    let out = exec::run(&mut cmd, Duration::from_secs(1800))?;
    let s = t.elapsed().as_secs_f64();
    if !out.stdout.trim().is_empty() {
        bail!("git status found changes in a clean repository: {}", exec::one_line(&out.stdout));
    }
    Ok(figures(&[("files_per_s", env.made.src_files as f64 / s), ("seconds", s)]))
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

    /// Only descriptors of removed files count, and only under the directory.
    #[test]
    fn removed_descriptors_are_told_from_live_ones() {
        let dir = std::env::temp_dir().join(format!("efuse-bench-removed-fds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let me = std::process::id();
        let base = removed_fds(me, &dir).unwrap();
        assert_eq!(base, 0);
        std::fs::write(dir.join("live"), b"x").unwrap();
        std::fs::write(dir.join("sub/gone"), b"x").unwrap();
        let live = File::open(dir.join("live")).unwrap();
        let gone = File::open(dir.join("sub/gone")).unwrap();
        let gone_dir = File::open(dir.join("sub")).unwrap();
        assert_eq!(removed_fds(me, &dir).unwrap(), 0, "live files are not counted");
        std::fs::remove_file(dir.join("sub/gone")).unwrap();
        assert_eq!(removed_fds(me, &dir).unwrap(), 1);
        std::fs::remove_dir(dir.join("sub")).unwrap();
        assert_eq!(removed_fds(me, &dir).unwrap(), 2, "a removed directory counts too");
        assert_eq!(removed_fds(me, &dir.join("elsewhere")).unwrap(), 0, "only under the directory asked");
        drop((gone, gone_dir));
        assert_eq!(removed_fds(me, &dir).unwrap(), 0);
        drop(live);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_workload_charts_something() {
        for w in Workload::all(&Scale::quick()) {
            assert!(w.metrics.iter().any(|m| m.chart.is_some()), "{}", w.name);
        }
    }

    fn arg_of(c: &Command, prefix: &str) -> Option<String> {
        c.get_args().map(|a| a.to_string_lossy().into_owned()).find(|a| a.starts_with(prefix))
    }

    #[test]
    fn every_workload_states_its_cache() {
        let scale = Scale::quick();
        let all = Workload::all(&scale);
        let names: Vec<&str> = all.iter().map(|w| w.name.as_str()).collect();
        for want in ["grep-r", "untar-src", "cp-r", "git-status", "sequential-write", "sequential-read"] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        for w in &all {
            let text = w.cache_text();
            assert!(text.starts_with(&format!("**{}**", w.cache.label())), "{}: {text}", w.name);
            assert!(w.cache_note.starts_with(w.cache.label()), "{}: {}", w.name, w.cache_note);
            assert_eq!(w.warming().is_some(), w.cache == CacheState::Warm, "{}", w.name);
            if let Kind::Fio { n, direct } = w.kind {
                // direct=1 starts cold and is checked for page-cache use;
                // buffered starts warm and fio must not drop what it finds.
                assert_eq!(w.cache, if direct { CacheState::Cold } else { CacheState::Warm }, "{}", w.name);
                assert_eq!(w.metrics.iter().any(|m| m.key == BACKING_CACHED), direct, "{}", w.name);
                let c = fio_command(&scale, n, direct, w.cache, Path::new("/d"), Path::new("/j"));
                let want = if direct { "--invalidate=1" } else { "--invalidate=0" };
                assert_eq!(arg_of(&c, "--invalidate=").as_deref(), Some(want), "{}", w.name);
                assert_eq!(arg_of(&c, "--direct=").as_deref(), Some(if direct { "--direct=1" } else { "--direct=0" }));
            }
        }
        let by = |n: &str| all.iter().find(|w| w.name == n).map(|w| (w.cache, w.warming()));
        assert_eq!(by("find-cold"), Some((CacheState::Cold, None)));
        assert_eq!(by("find-warm"), Some((CacheState::Warm, Some(Warming::RunOnce))));
        assert_eq!(by("git-status"), Some((CacheState::Warm, Some(Warming::RunOnce))));
        assert_eq!(by("stat-storm"), Some((CacheState::Cold, None)));
        assert_eq!(by("grep-r"), Some((CacheState::Warm, Some(Warming::ReadDatasets(&[datasets::SRC_TREE])))));
        assert_eq!(by("untar-src"), Some((CacheState::Warm, Some(Warming::ReadTarball(datasets::SRC_TARBALL)))));
        assert_eq!(by("sequential-read"), Some((CacheState::Cold, None)));
    }

    #[test]
    fn direct_runs_through_the_page_cache_are_told_apart() {
        let scale = Scale::quick();
        let mib = |v: f64| Figures::from([(BACKING_CACHED.to_string(), v)]);
        // W1 quick: 256 MiB; a tenth of it is the line.
        assert!(!went_through_page_cache(&scale, 1, &mib(0.0)));
        assert!(!went_through_page_cache(&scale, 1, &mib(20.0)));
        assert!(went_through_page_cache(&scale, 1, &mib(100.0)));
        assert!(!went_through_page_cache(&scale, 1, &Figures::new()), "memfs has no backing figure");
    }

    #[test]
    fn read_all_reads_every_file() {
        let d = crate::TestDir::new("readall");
        std::fs::create_dir_all(d.0.join("a/b")).unwrap();
        std::fs::write(d.0.join("a/x"), vec![1u8; 5000]).unwrap();
        std::fs::write(d.0.join("a/b/y"), vec![2u8; 3_000_000]).unwrap();
        std::os::unix::fs::symlink("/dev/zero", d.0.join("a/link")).unwrap();
        let mut buf = vec![0u8; 4096];
        assert_eq!(read_all(&d.0, &mut buf).unwrap(), 3_005_000, "links are not followed");
        assert_eq!(read_all(&d.0.join("a/x"), &mut buf).unwrap(), 5000);
        assert!(read_all(&d.0.join("missing"), &mut buf).is_err());
    }
}

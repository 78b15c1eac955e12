//! The timed loops of the workloads that make their own file calls (open/
//! read/close, stat storm, sequential write and read) or start processes
//! (the cat storm), run in a child process: `efuse __bench-worker JOB ARGS...`, which prints its figures as
//! JSON. Every system runs them the same way; the bypass systems run the
//! child under `efuse run`, so the preloaded client library serves its calls
//! as it would an application's. Only the loop is timed, inside the child:
//! starting the process is not.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::datasets::Rng;
use crate::exec;
use crate::workloads::{Figures, RepEnv};

/// One loop.
#[derive(Debug, Clone, PartialEq)]
pub enum Job {
    /// `n` times: open `path`, read up to `want` bytes once, close.
    OpenLoop { path: PathBuf, n: u64, want: usize },
    /// `passes` passes of stat(2) over the paths listed in `list`, one per line.
    StatStorm { list: PathBuf, passes: u32 },
    /// Write `blocks` MiB of pseudo-random data to `path`, then fsync.
    SeqWrite { path: PathBuf, blocks: u64 },
    /// Read `path` whole in 1 MiB reads; it must hold `want` bytes.
    SeqRead { path: PathBuf, want: u64 },
    /// `n` times: a fresh `cat path > /dev/null`, one after the other.
    CatStorm { path: PathBuf, n: u64 },
    /// Reads every file under `path` whole (a warming, untimed).
    ReadTree { path: PathBuf },
}

impl Job {
    fn args(&self) -> Vec<OsString> {
        let s = |x: &dyn ToString| OsString::from(x.to_string());
        match self {
            Job::OpenLoop { path, n, want } => vec!["open-loop".into(), path.into(), s(n), s(want)],
            Job::StatStorm { list, passes } => vec!["stat-storm".into(), list.into(), s(passes)],
            Job::SeqWrite { path, blocks } => vec!["seq-write".into(), path.into(), s(blocks)],
            Job::SeqRead { path, want } => vec!["seq-read".into(), path.into(), s(want)],
            Job::CatStorm { path, n } => vec!["cat-storm".into(), path.into(), s(n)],
            Job::ReadTree { path } => vec!["read-tree".into(), path.into()],
        }
    }

    fn parse(args: &[OsString]) -> Result<Job> {
        fn num<T: std::str::FromStr>(a: Option<&OsString>, what: &str) -> Result<T> {
            a.and_then(|a| a.to_str()).and_then(|a| a.parse().ok()).with_context(|| format!("{what}: not a number"))
        }
        let path = |a: Option<&OsString>| a.map(PathBuf::from).context("missing path");
        let job = args.first().and_then(|a| a.to_str()).unwrap_or("");
        Ok(match job {
            "open-loop" => Job::OpenLoop {
                path: path(args.get(1))?,
                n: num(args.get(2), "count")?,
                want: num(args.get(3), "bytes")?,
            },
            "stat-storm" => Job::StatStorm { list: path(args.get(1))?, passes: num(args.get(2), "passes")? },
            "seq-write" => Job::SeqWrite { path: path(args.get(1))?, blocks: num(args.get(2), "blocks")? },
            "seq-read" => Job::SeqRead { path: path(args.get(1))?, want: num(args.get(2), "bytes")? },
            "cat-storm" => Job::CatStorm { path: path(args.get(1))?, n: num(args.get(2), "count")? },
            "read-tree" => Job::ReadTree { path: path(args.get(1))? },
            other => {
                bail!("unknown bench job '{other}' (open-loop, stat-storm, seq-write, seq-read, cat-storm, read-tree)")
            }
        })
    }

    /// Runs the loop in this process; returns (figure name, value) pairs.
    fn run(&self) -> Result<Vec<(&'static str, f64)>> {
        match self {
            Job::OpenLoop { path, n, want } => {
                let mut buf = vec![0u8; (*want).max(1)];
                let t = Instant::now();
                for i in 0..*n {
                    let mut f = File::open(path).with_context(|| format!("open #{i} of {}", path.display()))?;
                    let got = f.read(&mut buf).with_context(|| format!("read #{i}"))?;
                    if got != *want && i == 0 {
                        bail!("read {got} bytes of {}, expected {want}", path.display());
                    }
                }
                let s = t.elapsed().as_secs_f64();
                Ok(vec![("ops_per_s", *n as f64 / s), ("seconds", s)])
            }
            Job::StatStorm { list, passes } => {
                let f = File::open(list).with_context(|| format!("opening {}", list.display()))?;
                let paths: Vec<PathBuf> =
                    std::io::BufReader::new(f).lines().map(|l| l.map(PathBuf::from)).collect::<Result<_, _>>()?;
                // stat(2) itself, as the workload says (Rust's metadata() is
                // statx asking for the birth time too).
                use std::os::unix::ffi::OsStrExt;
                let cpaths: Vec<std::ffi::CString> = paths
                    .iter()
                    .map(|p| std::ffi::CString::new(p.as_os_str().as_bytes()))
                    .collect::<Result<_, _>>()
                    .context("a path with a NUL byte")?;
                // SAFETY: stat is plain data.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                let t = Instant::now();
                for _ in 0..*passes {
                    for (c, p) in cpaths.iter().zip(&paths) {
                        // SAFETY: a NUL-terminated path and a live stat buffer.
                        if unsafe { libc::stat(c.as_ptr(), &mut st) } != 0 {
                            let e = std::io::Error::last_os_error();
                            bail!("stat {}: {e}", p.display());
                        }
                    }
                }
                let s = t.elapsed().as_secs_f64();
                Ok(vec![("ops_per_s", (paths.len() as u64 * *passes as u64) as f64 / s), ("seconds", s)])
            }
            Job::SeqWrite { path, blocks } => {
                let mut buf = vec![0u8; 1 << 20];
                Rng::new(42).fill(&mut buf);
                let t = Instant::now();
                let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
                for i in 0..*blocks {
                    f.write_all(&buf).with_context(|| format!("writing block {i} of {}", path.display()))?;
                }
                f.sync_all().with_context(|| format!("fsync {}", path.display()))?;
                drop(f);
                let s = t.elapsed().as_secs_f64();
                Ok(vec![("write_mibps", *blocks as f64 / s), ("write_s", s)])
            }
            Job::CatStorm { path, n } => {
                let t = Instant::now();
                for i in 0..*n {
                    let st = std::process::Command::new("cat")
                        .arg(path)
                        .stdout(std::process::Stdio::null())
                        .status()
                        .with_context(|| format!("starting cat #{i}"))?;
                    if !st.success() {
                        bail!("cat #{i} of {}: {st}", path.display());
                    }
                }
                let s = t.elapsed().as_secs_f64();
                Ok(vec![("ops_per_s", *n as f64 / s), ("seconds", s)])
            }
            Job::ReadTree { path } => {
                let n = crate::workloads::read_all(path, &mut vec![0u8; 1 << 20])?;
                Ok(vec![("bytes", n as f64)])
            }
            Job::SeqRead { path, want } => {
                let mut buf = vec![0u8; 1 << 20];
                let t = Instant::now();
                let mut total = 0u64;
                let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
                loop {
                    let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let s = t.elapsed().as_secs_f64();
                if total != *want {
                    bail!("read {total} bytes of {}, expected {want}", path.display());
                }
                Ok(vec![("read_mibps", (want >> 20) as f64 / s), ("read_s", s)])
            }
        }
    }
}

/// `efuse __bench-worker JOB ARGS...`: runs one job, prints its figures as
/// one JSON object on stdout.
pub fn main(args: &[OsString]) -> Result<()> {
    let job = Job::parse(args)?;
    let figures: Figures = job.run()?.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    println!("{}", serde_json::to_string(&figures)?);
    Ok(())
}

/// Runs `job` in a child process (under the system's wrapper, if any) and
/// returns its figures.
pub fn run(env: &RepEnv, job: &Job, timeout: Duration) -> Result<Figures> {
    let mut cmd = env.command(env.efuse_exe.as_os_str());
    cmd.arg("__bench-worker").args(job.args());
    let out = exec::run(&mut cmd, timeout)?;
    let line = out.stdout.lines().last().unwrap_or("");
    serde_json::from_str(line).with_context(|| format!("bench worker printed {:?}", exec::one_line(&out.stdout)))
}

/// Writes `paths` one per line to `file`, for [`Job::StatStorm`].
pub fn write_list(file: &Path, paths: &[PathBuf]) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let mut text = Vec::new();
    for p in paths {
        let b = p.as_os_str().as_bytes();
        if b.contains(&b'\n') {
            bail!("{}: a path with a newline cannot be listed", p.display());
        }
        text.extend_from_slice(b);
        text.push(b'\n');
    }
    std::fs::write(file, text).with_context(|| format!("writing {}", file.display()))
}

/// The program a wrapped command runs: `wrap` followed by `prog`.
pub fn wrapped(wrap: &[OsString], prog: &OsStr) -> std::process::Command {
    match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = std::process::Command::new(first);
            c.args(rest).arg(prog);
            c
        }
        None => std::process::Command::new(prog),
    }
}

/// `cmd` (program, arguments, environment, directory) under `wrap`.
pub fn rewrap(wrap: &[OsString], cmd: std::process::Command) -> std::process::Command {
    if wrap.is_empty() {
        return cmd;
    }
    let mut c = wrapped(wrap, cmd.get_program());
    c.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        c.current_dir(d);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_survive_their_command_line() {
        for job in [
            Job::OpenLoop { path: "/m/a b".into(), n: 100_000, want: 4096 },
            Job::StatStorm { list: "/s/list".into(), passes: 5 },
            Job::SeqWrite { path: "/m/w".into(), blocks: 2048 },
            Job::SeqRead { path: "/m/r".into(), want: 1 << 31 },
            Job::CatStorm { path: "/m/c".into(), n: 10_000 },
            Job::ReadTree { path: "/m/t".into() },
        ] {
            assert_eq!(Job::parse(&job.args()).unwrap(), job);
        }
        assert!(Job::parse(&["open-loop".into(), "/p".into(), "x".into(), "1".into()]).is_err());
        assert!(Job::parse(&["nope".into()]).is_err());
    }

    #[test]
    fn jobs_measure_real_files() {
        let dir = std::env::temp_dir().join(format!("efuse-bench-worker-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("f");
        std::fs::write(&f, vec![7u8; 4096]).unwrap();
        let r = Job::OpenLoop { path: f.clone(), n: 10, want: 4096 }.run().unwrap();
        assert_eq!(r[0].0, "ops_per_s");
        assert!(Job::OpenLoop { path: f.clone(), n: 1, want: 8192 }.run().is_err());
        let w = dir.join("w");
        Job::SeqWrite { path: w.clone(), blocks: 2 }.run().unwrap();
        assert_eq!(std::fs::metadata(&w).unwrap().len(), 2 << 20);
        assert!(Job::SeqRead { path: w.clone(), want: 2 << 20 }.run().is_ok());
        assert!(Job::SeqRead { path: w, want: 1 << 20 }.run().is_err());
        assert_eq!(Job::CatStorm { path: f.clone(), n: 3 }.run().unwrap()[0].0, "ops_per_s");
        assert!(Job::CatStorm { path: dir.join("missing"), n: 1 }.run().is_err());
        assert_eq!(Job::ReadTree { path: dir.clone() }.run().unwrap(), vec![("bytes", (4096 + (2 << 20)) as f64)]);
        let list = dir.join("list");
        write_list(&list, &[f.clone(), dir.join("missing")]).unwrap();
        assert!(Job::StatStorm { list, passes: 1 }.run().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn wrapping_puts_the_wrapper_first() {
        let c = wrapped(&["efuse".into(), "run".into(), "--".into()], OsStr::new("cat"));
        assert_eq!(c.get_program(), "efuse");
        assert_eq!(c.get_args().collect::<Vec<_>>(), ["run", "--", "cat"]);
        assert_eq!(wrapped(&[], OsStr::new("cat")).get_program(), "cat");
        let mut git = std::process::Command::new("git");
        git.arg("status").env("A", "1").current_dir("/");
        let c = rewrap(&["efuse".into(), "run".into(), "--".into()], git);
        assert_eq!(c.get_args().collect::<Vec<_>>(), ["run", "--", "git", "status"]);
        assert_eq!(c.get_envs().collect::<Vec<_>>(), [(OsStr::new("A"), Some(OsStr::new("1")))]);
        assert_eq!(c.get_current_dir(), Some(Path::new("/")));
    }
}

//! The data every workload reads, made once in the backing directory before
//! anything is mounted, so that every system sees the same bytes.
//!
//! A dataset is remade only when its parameters change (a marker file in the
//! work directory records what was made), so a second run starts sooner.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::exec;
use crate::scale::{FioShape, Scale};

/// Datasets by name: the subdirectory of the backing directory they live in.
pub const FIO_W1: &str = "fio/w1";
pub const FIO_W2: &str = "fio/w2";
pub const FIO_W3: &str = "fio/w3";
pub const SMALL: &str = "small";
pub const STAT: &str = "stat";
pub const TREE: &str = "tree";
/// The sequential read's file.
pub const SEQ: &str = "seq";
pub const SEQ_FILE: &str = "seq/file";
/// A copy of (part of) the system's C headers: `grep -r`, `cp -r`.
pub const SRC_TREE: &str = "src";
/// The same files committed to a git repository: `git status`.
pub const GIT_REPO: &str = "git";
/// The source tree packed with tar, kept in the work directory (on ext4,
/// outside every system): the real untar. Not a backing subdirectory.
pub const SRC_TARBALL: &str = "src-tarball";
/// The generated tarball of `untar-rm`, in the work directory.
pub const TARBALL: &str = "tarball";

/// Where the source tree's files come from.
pub const HEADERS_DIR: &str = "/usr/include";
/// The string `grep -r` looks for: planted in [`NEEDLE_FILES`] files of the
/// source tree, found nowhere else.
pub const NEEDLE: &str = "efuse-bench-needle-4f2a9c";
pub const NEEDLE_FILES: usize = 3;

/// The one small file of the cat storm and the open/read/close loop.
pub const SMALL_FILE: &str = "small/file";

/// The order datasets are made in: a later one may be made from an earlier one.
const ORDER: [&str; 11] = [FIO_W1, FIO_W2, FIO_W3, SMALL, STAT, TREE, SEQ, SRC_TREE, GIT_REPO, SRC_TARBALL, TARBALL];

/// What the datasets turned out to hold, where that depends on the machine.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Made {
    /// Regular files in the source tree (and the git repository's work tree).
    pub src_files: u32,
    /// Their total size in bytes.
    pub src_bytes: u64,
    /// The datasets made (not reused) by this run.
    pub made_now: Vec<String>,
}

/// A fast deterministic generator: datasets are the same on every run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}

fn write_file(path: &Path, bytes: u64, rng: &mut Rng, buf: &mut [u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).with_context(|| format!("writing {}", path.display()))?;
        left -= n as u64;
    }
    Ok(())
}

/// The names fio gives the files of one workload (`--filename_format=wN.$filenum`).
pub fn fio_file_name(prefix: &str, i: u32) -> String {
    format!("{prefix}.{i}")
}

/// The relative paths of the stat storm's files.
pub fn stat_paths(scale: &Scale) -> Vec<PathBuf> {
    (0..scale.stat_files).map(|i| PathBuf::from(format!("{STAT}/d{:02}/f{i:05}", i % 100))).collect()
}

/// Where the tree's entries go: top/sub directories, then files, `entries` in all.
fn tree_layout(entries: u32) -> (Vec<String>, Vec<String>) {
    let (tops, subs) = (20u32, 25u32);
    let mut dirs = Vec::new();
    for t in 0..tops {
        dirs.push(format!("{TREE}/t{t:02}"));
        for s in 0..subs {
            dirs.push(format!("{TREE}/t{t:02}/s{s:02}"));
        }
    }
    let leaves: Vec<&String> = dirs.iter().filter(|d| d.matches('/').count() == 2).collect();
    let nfiles = entries.saturating_sub(dirs.len() as u32);
    let files = (0..nfiles).map(|i| format!("{}/f{i:05}", leaves[i as usize % leaves.len()])).collect();
    (dirs, files)
}

/// The datasets to make for workloads that read `wanted`, with what they
/// are made from, in the order they must be made.
pub fn with_dependencies(wanted: &[&str]) -> Vec<&'static str> {
    let needs_src = wanted.iter().any(|w| [SRC_TREE, GIT_REPO, SRC_TARBALL].contains(w));
    ORDER.into_iter().filter(|d| wanted.contains(d) || (*d == SRC_TREE && needs_src)).collect()
}

/// Where the two tarballs live (in the work directory, outside every system).
pub fn tarball_path(work: &Path, name: &str) -> PathBuf {
    match name {
        SRC_TARBALL => work.join("src.tar"),
        _ => work.join("untar.tar"),
    }
}

/// Makes every dataset in `wanted` under `backing` (tarballs in `work`);
/// `log` hears progress. Datasets another one is made from must come first
/// ([`with_dependencies`]).
pub fn prepare(
    scale: &Scale,
    backing: &Path,
    work: &Path,
    wanted: &[&str],
    log: &mut dyn FnMut(String),
) -> Result<Made> {
    let mut made = Made::default();
    let marker_path = work.join("prepared.json");
    let mut marker: BTreeMap<String, String> =
        fs::read_to_string(&marker_path).ok().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default();
    let mut buf = vec![0u8; 1 << 20];
    let fio_shape = |n: &str| -> Option<(&FioShape, &str)> {
        match n {
            FIO_W1 => Some((&scale.w1, "w1")),
            FIO_W2 => Some((&scale.w2, "w2")),
            FIO_W3 => Some((&scale.w3, "w3")),
            _ => None,
        }
    };
    // The headers are listed whenever the source tree is wanted: their
    // count and size are part of its parameters (a changed headers
    // directory remakes it).
    let sources = if wanted.contains(&SRC_TREE) {
        let list = select_sources(Path::new(HEADERS_DIR), scale.src_files)?;
        if list.len() < 100 {
            bail!(
                "{HEADERS_DIR} has only {} regular files; the source-tree workloads need a few thousand \
                 (apt-get install linux-libc-dev libc6-dev)",
                list.len()
            );
        }
        made.src_files = list.len() as u32;
        made.src_bytes = list.iter().map(|(_, n)| n).sum();
        Some(list)
    } else {
        None
    };
    let src_params = format!("{}f-{}B", made.src_files, made.src_bytes);
    for &name in wanted {
        let params = match name {
            FIO_W1 | FIO_W2 | FIO_W3 => fio_shape(name).map(|(s, _)| format!("{}x{}K", s.files, s.file_kib)),
            SMALL => Some(format!("{}B", scale.small_file_bytes)),
            STAT => Some(format!("{}", scale.stat_files)),
            TREE => Some(format!("{}", scale.find_entries)),
            SEQ => Some(format!("{}M", scale.seq_mib)),
            SRC_TREE | GIT_REPO | SRC_TARBALL => Some(src_params.clone()),
            TARBALL => Some(format!("{}f-{}M", scale.tar_files, scale.tar_target_mib)),
            _ => None,
        };
        let Some(params) = params else { continue };
        let target = match name {
            SRC_TARBALL | TARBALL => tarball_path(work, name),
            _ => backing.join(name),
        };
        if marker.get(name) == Some(&params) && target.exists() {
            continue;
        }
        log(format!("preparing dataset {name} ({params})"));
        marker.remove(name);
        let _ = fs::write(&marker_path, serde_json::to_string(&marker)?);
        if target.is_dir() {
            fs::remove_dir_all(&target).with_context(|| format!("removing old {}", target.display()))?;
        } else if target.exists() {
            fs::remove_file(&target).with_context(|| format!("removing old {}", target.display()))?;
        }
        let mut rng = Rng::new(name.len() as u64 * 7919 + params.len() as u64);
        match name {
            FIO_W1 | FIO_W2 | FIO_W3 => {
                let Some((shape, prefix)) = fio_shape(name) else { continue };
                fs::create_dir_all(&target)?;
                for i in 0..shape.files {
                    write_file(&target.join(fio_file_name(prefix, i)), shape.file_kib << 10, &mut rng, &mut buf)?;
                }
            }
            SMALL => {
                fs::create_dir_all(&target)?;
                write_file(&backing.join(SMALL_FILE), scale.small_file_bytes as u64, &mut rng, &mut buf)?;
            }
            STAT => {
                for d in 0..100 {
                    fs::create_dir_all(target.join(format!("d{d:02}")))?;
                }
                for p in stat_paths(scale) {
                    write_file(&backing.join(p), 64, &mut rng, &mut buf)?;
                }
            }
            TREE => {
                let (dirs, files) = tree_layout(scale.find_entries);
                fs::create_dir_all(&target)?;
                for d in dirs {
                    fs::create_dir_all(backing.join(d))?;
                }
                for f in files {
                    File::create(backing.join(&f)).with_context(|| format!("creating {f}"))?;
                }
            }
            SEQ => {
                fs::create_dir_all(&target)?;
                write_file(&backing.join(SEQ_FILE), scale.seq_mib << 20, &mut rng, &mut buf)?;
            }
            SRC_TREE => {
                let Some(list) = &sources else { continue };
                let files: Vec<PathBuf> = list.iter().map(|(p, _)| p.clone()).collect();
                copy_files(Path::new(HEADERS_DIR), &files, &target)?;
                plant_needle(&target, &files)?;
            }
            GIT_REPO => {
                copy_tree(&backing.join(SRC_TREE), &target)?;
                make_git_repo(&target)?;
            }
            SRC_TARBALL => {
                let mut tar = Command::new("tar");
                tar.arg("-cf").arg(&target).arg("-C").arg(backing).arg(SRC_TREE);
                exec::run(&mut tar, Duration::from_secs(1800))?;
            }
            TARBALL => make_tarball(scale, work, &target, &mut rng, &mut buf)?,
            _ => {}
        }
        marker.insert(name.to_string(), params);
        fs::write(&marker_path, serde_json::to_string_pretty(&marker)?)?;
        made.made_now.push(name.to_string());
    }
    Ok(made)
}

/// Regular files under `root` (relative paths, with their sizes), in sorted
/// walk order, at most `max`: the same selection on every run of a machine.
/// Symbolic links and special files are left out.
pub fn select_sources(root: &Path, max: u32) -> Result<Vec<(PathBuf, u64)>> {
    fn walk(root: &Path, rel: &Path, max: usize, out: &mut Vec<(PathBuf, u64)>) -> Result<()> {
        let dir = root.join(rel);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        names.sort();
        for name in names {
            if out.len() >= max {
                return Ok(());
            }
            let rel = rel.join(&name);
            let Ok(meta) = fs::symlink_metadata(root.join(&rel)) else { continue };
            if meta.is_dir() {
                walk(root, &rel, max, out)?;
            } else if meta.is_file() {
                out.push((rel, meta.len()));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, Path::new(""), max as usize, &mut out)?;
    Ok(out)
}

/// Copies `files` (relative to `from`) to the same places under `to`.
fn copy_files(from: &Path, files: &[PathBuf], to: &Path) -> Result<()> {
    fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for f in files {
        let dst = to.join(f);
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        fs::copy(from.join(f), &dst)
            .with_context(|| format!("copying {} to {}", from.join(f).display(), dst.display()))?;
    }
    Ok(())
}

/// Copies the directory tree `from` to `to` (directories and regular files).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let files: Vec<PathBuf> = select_sources(from, u32::MAX)?.into_iter().map(|(p, _)| p).collect();
    copy_files(from, &files, to)
}

/// Which of `n` files get the needle: three spread over the tree.
pub fn needle_indexes(n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (1..=NEEDLE_FILES).map(|k| k * n / (NEEDLE_FILES + 1)).filter(|&i| i < n).collect();
    v.dedup();
    v
}

/// Appends a comment holding [`NEEDLE`] to the chosen files.
fn plant_needle(dir: &Path, files: &[PathBuf]) -> Result<()> {
    for i in needle_indexes(files.len()) {
        let path = dir.join(&files[i]);
        let mut f =
            fs::OpenOptions::new().append(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "\n/* {NEEDLE} */").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// A git command that reads no configuration but the repository's own.
pub fn git(repo: &Path) -> Command {
    let mut c = Command::new("git");
    c.arg("-C").arg(repo).env("GIT_CONFIG_NOSYSTEM", "1").env("GIT_CONFIG_GLOBAL", "/dev/null");
    c
}

/// `git init`, add and commit of everything in `dir`. The repository checks
/// only whole-second mtimes and sizes (`core.checkStat minimal`, no ctime):
/// the same files seen through another file system (other inode and device
/// numbers, memfs's copies' ctimes) are then clean, as they are on the file
/// system that made them, and `git status` compares stat data, not content.
fn make_git_repo(dir: &Path) -> Result<()> {
    let t = Duration::from_secs(600);
    // Files as old as the index would be "racily clean" and re-read by
    // every `git status`: let the clock move past them first.
    std::thread::sleep(Duration::from_millis(1100));
    exec::run(git(dir).args(["init", "-q", "-b", "main"]), t)?;
    for (k, v) in [
        ("core.checkStat", "minimal"),
        ("core.trustCtime", "false"),
        ("gc.auto", "0"),
        ("user.name", "efuse bench"),
        ("user.email", "bench@efuse.invalid"),
        ("commit.gpgSign", "false"),
    ] {
        exec::run(git(dir).args(["config", k, v]), t)?;
    }
    exec::run(git(dir).args(["add", "-A"]), t)?;
    exec::run(git(dir).args(["commit", "-q", "-m", "dataset"]), t)?;
    let out = exec::run(git(dir).args(["--no-optional-locks", "status", "--porcelain"]), t)?;
    if !out.stdout.trim().is_empty() {
        bail!("the new repository in {} is not clean: {}", dir.display(), exec::one_line(&out.stdout));
    }
    Ok(())
}

/// Bytes of `path` in the page cache (mincore(2)).
pub fn resident_bytes(path: &Path) -> Result<u64> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(0);
    }
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let pages = len.div_ceil(page) as usize;
    // SAFETY: a fresh read-only shared mapping of a file we hold open; no
    // page of it is touched (mincore only asks about residency), and it is
    // unmapped below whatever mincore answers.
    let addr =
        unsafe { libc::mmap(std::ptr::null_mut(), len as usize, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0) };
    if addr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("mmap {}", path.display()));
    }
    let mut vec = vec![0u8; pages];
    // SAFETY: `addr` maps `len` bytes; `vec` has one byte per page of it.
    let rc = unsafe { libc::mincore(addr, len as usize, vec.as_mut_ptr()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { libc::munmap(addr, len as usize) };
    if rc != 0 {
        return Err(err).with_context(|| format!("mincore {}", path.display()));
    }
    Ok(vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * page)
}

/// ~`tar_files` files of varied size (80% under 8 KiB, 19% 8-32 KiB, 1%
/// 128-512 KiB, scaled to the target total) in nested directories.
fn make_tarball(scale: &Scale, work: &Path, tarball: &Path, rng: &mut Rng, buf: &mut [u8]) -> Result<()> {
    let src = work.join("tarsrc");
    if src.exists() {
        fs::remove_dir_all(&src)?;
    }
    let leaves = (scale.tar_files / 30).max(1);
    let avg_bytes = 0.80 * 4096.0 + 0.19 * 20480.0 + 0.01 * 327_680.0;
    let factor = (scale.tar_target_mib as f64 * 1048576.0) / (scale.tar_files as f64 * avg_bytes);
    for i in 0..scale.tar_files {
        let leaf = i % leaves;
        let dir = src.join(format!("src/a{:02}/b{:02}/c{:03}", leaf % 10, (leaf / 10) % 10, leaf / 100));
        if i < leaves {
            fs::create_dir_all(&dir)?;
        }
        let r = rng.next() % 100;
        let size = match r {
            0..=79 => rng.range(0, 8 << 10),
            80..=98 => rng.range(8 << 10, 32 << 10),
            _ => rng.range(128 << 10, 512 << 10),
        };
        let size = (size as f64 * factor) as u64;
        write_file(&dir.join(format!("file{i:05}.dat")), size, rng, buf)?;
    }
    let mut tar = Command::new("tar");
    tar.arg("-cf").arg(tarball).arg("-C").arg(&src).arg("src");
    exec::run(&mut tar, Duration::from_secs(1800))?;
    fs::remove_dir_all(&src)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_has_exactly_the_entries_asked_for() {
        let (d, f) = tree_layout(50_000);
        assert_eq!(d.len() + f.len(), 50_000);
        let (d, f) = tree_layout(10_000);
        assert_eq!(d.len() + f.len(), 10_000);
    }

    #[test]
    fn sources_are_sorted_limited_regular_files() {
        let d = crate::TestDir::new("sources");
        for f in ["b/z.h", "b/a.h", "a.h", "c/d/e.h"] {
            let p = d.0.join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, f).unwrap();
        }
        std::os::unix::fs::symlink("a.h", d.0.join("b/link.h")).unwrap();
        let all = select_sources(&d.0, 100).unwrap();
        let names: Vec<String> = all.iter().map(|(p, _)| p.display().to_string()).collect();
        assert_eq!(names, ["a.h", "b/a.h", "b/z.h", "c/d/e.h"], "sorted walk, no symbolic link");
        assert_eq!(all[3].1, 7);
        assert_eq!(select_sources(&d.0, 2).unwrap().len(), 2);
    }

    #[test]
    fn the_needle_goes_into_three_files() {
        assert_eq!(needle_indexes(2000), [500, 1000, 1500]);
        assert_eq!(needle_indexes(7990).len(), NEEDLE_FILES);
        assert!(needle_indexes(2).iter().all(|&i| i < 2));
        assert!(needle_indexes(0).is_empty());
        let d = crate::TestDir::new("needle");
        let files: Vec<PathBuf> = (0..8).map(|i| PathBuf::from(format!("f{i}"))).collect();
        for f in &files {
            fs::write(d.0.join(f), "int x;\n").unwrap();
        }
        plant_needle(&d.0, &files).unwrap();
        let hits = files.iter().filter(|f| fs::read_to_string(d.0.join(f)).unwrap().contains(NEEDLE)).count();
        assert_eq!(hits, needle_indexes(8).len());
    }

    #[test]
    fn dependencies_come_first() {
        assert_eq!(with_dependencies(&[GIT_REPO]), [SRC_TREE, GIT_REPO]);
        assert_eq!(with_dependencies(&[TARBALL, SRC_TARBALL, FIO_W1]), [FIO_W1, SRC_TREE, SRC_TARBALL, TARBALL]);
        assert_eq!(with_dependencies(&[STAT, STAT]), [STAT]);
    }

    #[test]
    fn the_git_repository_is_clean() {
        let d = crate::TestDir::new("git");
        fs::create_dir_all(d.0.join("sub")).unwrap();
        fs::write(d.0.join("a.h"), "a").unwrap();
        fs::write(d.0.join("sub/b.h"), "b").unwrap();
        make_git_repo(&d.0).unwrap();
        let out = exec::run(git(&d.0).args(["ls-files"]), Duration::from_secs(30)).unwrap();
        assert_eq!(out.stdout.lines().count(), 2);
        // A copy elsewhere (other inode numbers and ctimes, same mtimes) is clean too.
        let copy = crate::TestDir::new("git-copy");
        exec::run(Command::new("cp").arg("-a").arg(d.0.join(".")).arg(&copy.0), Duration::from_secs(30)).unwrap();
        let st =
            exec::run(git(&copy.0).args(["--no-optional-locks", "status", "--porcelain"]), Duration::from_secs(30));
        assert_eq!(st.unwrap().stdout, "");
        fs::write(copy.0.join("a.h"), "changed").unwrap();
        let st =
            exec::run(git(&copy.0).args(["--no-optional-locks", "status", "--porcelain"]), Duration::from_secs(30));
        assert!(st.unwrap().stdout.contains("a.h"), "a change is seen");
    }

    #[test]
    fn resident_bytes_follows_the_page_cache() {
        let d = crate::TestDir::new("resident");
        let p = d.0.join("f");
        fs::write(&p, vec![7u8; 1 << 20]).unwrap();
        let f = File::open(&p).unwrap();
        f.sync_all().unwrap();
        // SAFETY: advice on a descriptor we hold; it changes no data.
        assert_eq!(unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
        let before = resident_bytes(&p).unwrap();
        assert!(before < 1 << 19, "{before} bytes still cached after DONTNEED");
        assert_eq!(fs::read(&p).unwrap().len(), 1 << 20);
        assert_eq!(resident_bytes(&p).unwrap(), 1 << 20);
        fs::write(d.0.join("empty"), b"").unwrap();
        assert_eq!(resident_bytes(&d.0.join("empty")).unwrap(), 0);
    }

    #[test]
    fn rng_is_deterministic_and_fills_odd_lengths() {
        let (mut a, mut b) = (Rng::new(3), Rng::new(3));
        let (mut x, mut y) = ([0u8; 13], [0u8; 13]);
        a.fill(&mut x);
        b.fill(&mut y);
        assert_eq!(x, y);
        assert!(x.iter().any(|&v| v != 0));
    }
}

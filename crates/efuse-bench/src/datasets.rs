//! The data every workload reads, made once in the backing directory before
//! anything is mounted, so that every system sees the same bytes.
//!
//! A dataset is remade only when its parameters change (a marker file in the
//! work directory records what was made), so a second run starts sooner.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::exec;
use crate::scale::{FioShape, Scale};

/// Datasets by name: the subdirectory of the backing directory they live in.
pub const FIO_W1: &str = "fio/w1";
pub const FIO_W2: &str = "fio/w2";
pub const FIO_W3: &str = "fio/w3";
pub const SMALL: &str = "small";
pub const STAT: &str = "stat";
pub const TREE: &str = "tree";

/// The one small file of the cat storm and the open/read/close loop.
pub const SMALL_FILE: &str = "small/file";

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

/// Makes every dataset under `backing` and the tarball at `tarball`; `log` hears progress.
pub fn prepare(
    scale: &Scale,
    backing: &Path,
    work: &Path,
    tarball: &Path,
    wanted: &[&str],
    log: &mut dyn FnMut(String),
) -> Result<()> {
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
    for &name in wanted {
        let params = match name {
            FIO_W1 | FIO_W2 | FIO_W3 => fio_shape(name).map(|(s, _)| format!("{}x{}K", s.files, s.file_kib)),
            SMALL => Some(format!("{}B", scale.small_file_bytes)),
            STAT => Some(format!("{}", scale.stat_files)),
            TREE => Some(format!("{}", scale.find_entries)),
            "tarball" => Some(format!("{}f-{}M", scale.tar_files, scale.tar_target_mib)),
            _ => None,
        };
        let Some(params) = params else { continue };
        let target = if name == "tarball" { tarball.to_path_buf() } else { backing.join(name) };
        if marker.get(name) == Some(&params) && target.exists() {
            continue;
        }
        log(format!("preparing dataset {name} ({params})"));
        marker.remove(name);
        let _ = fs::write(&marker_path, serde_json::to_string(&marker)?);
        if target.is_dir() {
            fs::remove_dir_all(&target).with_context(|| format!("removing old {}", target.display()))?;
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
            "tarball" => make_tarball(scale, work, tarball, &mut rng, &mut buf)?,
            _ => {}
        }
        marker.insert(name.to_string(), params);
        fs::write(&marker_path, serde_json::to_string_pretty(&marker)?)?;
    }
    Ok(())
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
    fn rng_is_deterministic_and_fills_odd_lengths() {
        let (mut a, mut b) = (Rng::new(3), Rng::new(3));
        let (mut x, mut y) = ([0u8; 13], [0u8; 13]);
        a.fill(&mut x);
        b.fill(&mut y);
        assert_eq!(x, y);
        assert!(x.iter().any(|&v| v != 0));
    }
}

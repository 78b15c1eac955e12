//! Where stackfs meets the fuzzer: a fresh directory (on tmpfs when there is
//! one, so FSYNC and SYNCFS reach no disk) holding the backing tree and, next
//! to it, a canary that must be exactly as it was after the run; and the
//! limits that keep a random stream from costing the host.
//!
//! The backing tree starts with symlinks that point out of it ("escape",
//! "abs", "link"), names the generator uses often: stackfs must never follow
//! them.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use efuse::abi::{Operation, ProtocolOptions};

use crate::wire::Wire;

/// A run directory: `backing/` for stackfs, `canary/` and `canary-top` beside it.
pub struct Sandbox {
    root: PathBuf,
    backing: PathBuf,
    before: BTreeSet<String>,
}

impl Sandbox {
    pub fn new(seed: u64) -> Sandbox {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        let root = base.join(format!("efuse-fuzz-{}-{seed:x}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let make = || -> std::io::Result<(PathBuf, PathBuf)> {
            fs::create_dir(&root)?;
            // Only we may reach what the run leaves in here (set-id files of random owners).
            fs::set_permissions(&root, fs::Permissions::from_mode(0o700))?;
            let canary = root.join("canary");
            fs::create_dir_all(canary.join("deep"))?;
            fs::write(canary.join("secret"), b"canary\n")?;
            fs::write(canary.join("deep/file"), b"deep\n")?;
            fs::write(root.join("canary-top"), b"top\n")?;
            let backing = root.join("backing");
            fs::create_dir_all(backing.join("dir"))?;
            // Callers of any uid may create here, as on a shared mount.
            fs::set_permissions(&backing, fs::Permissions::from_mode(0o777))?;
            fs::write(backing.join("keep"), b"keep\n")?;
            fs::write(backing.join("dir/x.txt"), b"x\n")?;
            std::os::unix::fs::symlink("../canary", backing.join("escape"))?;
            std::os::unix::fs::symlink(&canary, backing.join("abs"))?;
            std::os::unix::fs::symlink("../canary-top", backing.join("link"))?;
            Ok((canary, backing))
        };
        let (_, backing) = make().unwrap_or_else(|e| panic!("setting up {}: {e}", root.display()));
        let before = snapshot(&root, &backing);
        Sandbox { root, backing, before }
    }

    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// Everything outside the backing tree is as it was, and the tree holds
    /// no device node (a whiteout, 0:0, is not one).
    pub fn verify(&self) -> Result<(), String> {
        let after = snapshot(&self.root, &self.backing);
        if after != self.before {
            let gone: Vec<_> = self.before.difference(&after).collect();
            let new: Vec<_> = after.difference(&self.before).collect();
            return Err(format!("outside the backing tree: before {gone:?}, after {new:?}"));
        }
        let mut devices = Vec::new();
        walk(&self.backing, &mut |p, m| {
            let t = m.file_type();
            if (t.is_char_device() || t.is_block_device()) && m.rdev() != 0 {
                devices.push(format!("{} ({:x})", p.display(), m.rdev()));
            }
        });
        if devices.is_empty() {
            Ok(())
        } else {
            Err(format!("device nodes in the backing tree: {devices:?}"))
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("session_fuzz: leaving {} for inspection", self.root.display());
            return;
        }
        // Directories the run made unreadable would stop a non-root removal.
        walk(&self.root, &mut |p, m| {
            if m.is_dir() {
                let _ = fs::set_permissions(p, fs::Permissions::from_mode(0o700));
            }
        });
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// Calls `f` on every entry under `dir` (not following symlinks), parents
/// first, so `f` may make a directory readable before it is entered.
fn walk(dir: &Path, f: &mut dyn FnMut(&Path, &fs::Metadata)) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if let Ok(m) = fs::symlink_metadata(&p) {
            f(&p, &m);
            if m.is_dir() {
                walk(&p, f);
            }
        }
    }
}

/// One line per entry outside the backing tree: type and mode, owner,
/// size, times, link count, and content or target.
fn snapshot(root: &Path, backing: &Path) -> BTreeSet<String> {
    let describe = |p: &Path, m: &fs::Metadata| {
        let what = if m.file_type().is_symlink() {
            format!("-> {:?}", fs::read_link(p).ok())
        } else if m.is_file() {
            format!("{:?}", fs::read(p).ok())
        } else {
            String::new()
        };
        format!(
            "{} {:o} {}:{} {} m{}.{} c{}.{} n{} {what}",
            p.strip_prefix(root).unwrap_or(p).display(),
            m.mode(),
            m.uid(),
            m.gid(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
            m.nlink()
        )
    };
    let mut lines = BTreeSet::new();
    if let Ok(m) = fs::symlink_metadata(root) {
        lines.insert(describe(root, &m));
    }
    let Ok(entries) = fs::read_dir(root) else { return lines };
    for e in entries.flatten() {
        let p = e.path();
        let Ok(m) = fs::symlink_metadata(&p) else { continue };
        if p == backing {
            // Its own mode and owner are stackfs's to change (node 1).
            lines.insert("backing".into());
            continue;
        }
        lines.insert(describe(&p, &m));
        if m.is_dir() {
            let mut under = Vec::new();
            walk(&p, &mut |q, m| under.push(describe(q, m)));
            lines.extend(under);
        }
    }
    lines
}

/// The most a single FALLOCATE or COPY_FILE_RANGE may ask for here.
const MAX_EXTENT: u64 = 4 << 20;

/// Keeps one request from costing the host more than a run should: device
/// nodes are made only as a non-root caller (so creation fails: stackfs
/// creates as the caller, and a non-zero fsuid drops CAP_MKNOD), and a
/// FALLOCATE or COPY_FILE_RANGE allocates or copies at most [`MAX_EXTENT`]
/// (stackfs passes these to the backing file system as asked, which is
/// right, but a random length would fill the disk). Only argument values
/// change, so the request decodes as before.
pub fn confine(wire: &mut Wire, opts: ProtocolOptions) {
    // The header's uid; the length fields' offsets in their arguments.
    const UID: usize = 24;
    const FALLOCATE_LENGTH: usize = 16;
    const COPY_LEN: usize = 40;
    let mut header_patch = None;
    let mut arg_patch = None;
    if let Ok(req) = wire.parse(opts) {
        match req.op {
            Operation::Mknod { arg, .. }
                if matches!(arg.mode & libc::S_IFMT, libc::S_IFCHR | libc::S_IFBLK) && req.header.uid == 0 =>
            {
                header_patch = Some((UID, 1000u32.to_ne_bytes()));
            }
            Operation::Fallocate { arg } if arg.length > MAX_EXTENT => {
                arg_patch = Some((FALLOCATE_LENGTH, MAX_EXTENT.to_ne_bytes()));
            }
            Operation::CopyFileRange { arg } | Operation::CopyFileRange64 { arg } if arg.len > MAX_EXTENT => {
                arg_patch = Some((COPY_LEN, MAX_EXTENT.to_ne_bytes()));
            }
            _ => {}
        }
    }
    if let Some((at, bytes)) = header_patch {
        wire.header_mut()[at..at + bytes.len()].copy_from_slice(&bytes);
    }
    if let Some((at, bytes)) = arg_patch {
        wire.arg_mut()[at..at + bytes.len()].copy_from_slice(&bytes);
    }
}

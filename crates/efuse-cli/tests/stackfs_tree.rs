//! stackfs and the shape of its backing tree.
//!
//! - File systems mounted inside the backing directory: their inode numbers
//!   overlap (two fresh tmpfs number their files alike), and the FUSE mount
//!   has one `st_dev`, so stackfs must report distinct `st_ino`s or tar, du
//!   and cp -a take different files for hard links of one.
//! - A directory moved out of the backing tree behind the mount must no
//!   longer be reachable through it, not even from a process whose working
//!   directory is inside it, with every cache mode that has no promise of
//!   "nothing changes behind the mount".

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{require_fuse, require_tools, run, sh, Fs, MountSpec, Mounted, STEP};

/// A tmpfs mounted for the test; lazily unmounted on drop (stackfs may still
/// hold descriptors in it when the test ends).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        run("mount", &["-t", "tmpfs", "-o", "size=8m", "efuse-test", &at.display().to_string()], None, STEP)
            .expect_ok();
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = run("umount", &["-l", &self.0.display().to_string()], None, STEP);
    }
}

#[test]
fn inode_numbers_stay_unique_across_backing_file_systems() {
    let test = "inode_numbers_stay_unique_across_backing_file_systems";
    if !require_fuse(test) || !require_tools(test, &["tar", "du", "mount"]) {
        return;
    }
    let m = Mounted::new(Fs::Stackfs, test);
    let b = m.backing.clone().unwrap();
    // Mounted inside the backing directory after stackfs is up (stackfs
    // meets them on lookup), and declared after the mount so that they are
    // detached first, also when the test fails: the mount's guard then
    // removes an ordinary tree.
    let mut mounts = Vec::new();
    for side in ["a", "b"] {
        let t = Tmpfs::mount(&b.join(side));
        fs::write(t.0.join("x"), side.repeat(3000)).unwrap();
        mounts.push(t);
    }
    let (ia, ib) = (fs::metadata(b.join("a/x")).unwrap().ino(), fs::metadata(b.join("b/x")).unwrap().ino());
    assert_eq!(ia, ib, "precondition: two fresh tmpfs give their first files the same inode number");
    let (ma, mb) = (fs::metadata(m.mnt.join("a/x")).unwrap(), fs::metadata(m.mnt.join("b/x")).unwrap());
    assert_eq!(ma.dev(), mb.dev());
    assert_ne!(ma.ino(), mb.ino(), "two files of the mount share (st_dev, st_ino)");
    // The numbers hold still, and readdir's d_ino agrees with stat.
    let listed = sh("ls -i a b", &m.mnt).timeout(STEP).ok();
    assert!(listed.contains(&format!("{} x", ma.ino())) && listed.contains(&format!("{} x", mb.ino())), "{listed}");
    // tar and du see two files, as they do on the backing directory.
    let tar = sh("tar -cf - a b | tar -tvf - | grep -c ' link to '; true", &m.mnt).timeout(STEP).ok();
    assert_eq!(tar.trim(), "0", "tar stored a file of one tmpfs as a hard link to the other's");
    let du_mnt = sh("du -s --apparent-size -B1 a b | awk '{s+=$1} END {print s}'", &m.mnt).timeout(STEP).ok();
    let du_back = sh("du -s --apparent-size -B1 a b | awk '{s+=$1} END {print s}'", &b).timeout(STEP).ok();
    assert_eq!(du_mnt.trim(), du_back.trim(), "du counted a file once for both");
}

/// Moves `d` out of the backing tree while a process has its working
/// directory in it (through the mount), then has that process look around
/// (after `settle`: the plain profile may serve names it cached for 1 s,
/// as it does for every change behind the mount).
fn moved_out_directory_is_unreachable(test: &str, spec: MountSpec, settle: &str) {
    if !require_fuse(test) {
        return;
    }
    let m = Mounted::with(Fs::Stackfs, test, spec, |b| {
        fs::create_dir_all(b.join("d/sub")).unwrap();
        fs::write(b.join("d/sub/file"), b"inside\n").unwrap();
        fs::write(b.join("d/top"), b"top\n").unwrap();
    });
    let b = m.backing.clone().unwrap();
    let (ready, go) = (m.scratch.join("ready"), m.scratch.join("go"));
    let script = format!(
        "cd d && cat sub/file && cat top && touch {ready} && \
         while [ ! -e {go} ]; do sleep 0.02; done; sleep {settle}; \
         cat sub/file 2>&1; cat top 2>&1; ls 2>&1; echo end",
        ready = ready.display(),
        go = go.display()
    );
    let child = {
        let cmd = sh(&script, &m.mnt).timeout(Duration::from_secs(30));
        std::thread::spawn(move || cmd.run())
    };
    assert!(common::wait_until(Duration::from_secs(20), || ready.exists()), "the shell never got ready");
    let outside = m.scratch.join("outside");
    fs::rename(b.join("d"), &outside).unwrap();
    fs::write(&go, b"").unwrap();
    let out = child.join().expect("shell thread");
    let text = format!("{}{}", out.stdout, out.stderr);
    let after: Vec<&str> = text.lines().skip_while(|l| *l != "top").skip(1).collect();
    assert!(
        !after.iter().any(|l| l.contains("inside") || *l == "top" || *l == "sub"),
        "{test}: the moved-out directory was still reachable through the mount:\n{text}"
    );
    assert_eq!(after.last(), Some(&"end"), "{text}");
    // The content is intact where it went.
    assert_eq!(fs::read(outside.join("sub/file")).unwrap(), b"inside\n");
    // Moved back, it is reachable again.
    fs::rename(&outside, b.join("d")).unwrap();
    let back = common::wait_until(Duration::from_secs(3), || {
        sh("cat d/sub/file d/top", &m.mnt).timeout(STEP).try_run().is_ok_and(|o| o.ok() && o.stdout == "inside\ntop\n")
    });
    assert!(back, "{test}: the directory moved back into the tree stayed unreachable");
}

/// A directory whose name ends in " (deleted)" (what /proc shows for removed
/// ones) is an ordinary directory.
#[test]
fn a_directory_named_deleted_is_reachable() {
    let test = "a_directory_named_deleted_is_reachable";
    if !require_fuse(test) {
        return;
    }
    for spec in [MountSpec::default(), MountSpec::default().arg("--cache").arg("none")] {
        let m = Mounted::with(Fs::Stackfs, test, spec, |b| {
            fs::create_dir_all(b.join("a (deleted)/b")).unwrap();
            fs::write(b.join("a (deleted)/b/f"), b"here\n").unwrap();
        });
        let out = sh("cat 'a (deleted)/b/f' && ls 'a (deleted)'", &m.mnt).timeout(STEP).run();
        assert_eq!(format!("{}{}", out.stdout, out.stderr), "here\nb\n", "{test}");
    }
}

#[test]
fn moved_out_directory_is_unreachable_with_fanotify() {
    moved_out_directory_is_unreachable("moved_out_directory_is_unreachable_with_fanotify", MountSpec::default(), "0.2");
}

#[test]
fn moved_out_directory_is_unreachable_with_inotify() {
    let spec = MountSpec::default().wrapper(&["env", "EFUSE_STACKFS_WATCH=inotify"]);
    moved_out_directory_is_unreachable("moved_out_directory_is_unreachable_with_inotify", spec, "0.2");
}

#[test]
fn moved_out_directory_is_unreachable_without_caching() {
    let spec = MountSpec::default().arg("--cache").arg("none");
    moved_out_directory_is_unreachable("moved_out_directory_is_unreachable_without_caching", spec, "0");
}

#[test]
fn moved_out_directory_is_unreachable_in_the_plain_profile() {
    let spec = MountSpec::default().arg("--profile").arg("plain");
    moved_out_directory_is_unreachable("moved_out_directory_is_unreachable_in_the_plain_profile", spec, "1.3");
}

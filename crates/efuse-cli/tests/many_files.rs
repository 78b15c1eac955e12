//! stackfs with more backing entries than its daemon may hold descriptors:
//! mounted under `prlimit --nofile=512:512`, a tree of 3,000 files in 30
//! directories must still be fully listed and stat-able, and the daemon must
//! survive it.

mod common;

use std::fs;
use std::path::Path;

use common::{require_fuse, require_tools, sh, Fs, MountSpec, Mounted};

const DIRS: usize = 30;
const FILES_PER_DIR: usize = 100;
const NOFILE: u64 = 512;

fn make_backing(b: &Path) {
    for d in 0..DIRS {
        let dir = b.join(format!("dir{d:02}"));
        fs::create_dir(&dir).unwrap();
        for f in 0..FILES_PER_DIR {
            fs::write(dir.join(format!("file{f:03}")), vec![b'x'; (d * FILES_PER_DIR + f) % 97]).unwrap();
        }
    }
}

#[test]
fn stackfs_more_entries_than_daemon_fd_limit() {
    let test = "stackfs_more_entries_than_daemon_fd_limit";
    if !require_fuse(test) || !require_tools(test, &["prlimit"]) {
        return;
    }
    let nofile = format!("--nofile={NOFILE}:{NOFILE}");
    let spec = MountSpec::default().wrapper(&["prlimit", &nofile]);
    let m = Mounted::with(Fs::Stackfs, test, spec, make_backing);
    let backing = m.backing.clone().unwrap();

    // The limit must really apply to the daemon, or this test proves nothing.
    if let Some(pid) = common::daemon_pid(&m.mnt) {
        let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
        let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap_or("");
        let nums: Vec<&str> = line.split_whitespace().filter(|w| w.chars().all(|c| c.is_ascii_digit())).collect();
        assert_eq!(nums, [NOFILE.to_string(), NOFILE.to_string()], "daemon {pid} limits: {line}");
    } else {
        println!("{test}: could not find the daemon's pid in /proc; limit not double-checked");
    }

    let expected = sh("find . | wc -l", &backing).ok().trim().to_string();
    assert_eq!(expected, (1 + DIRS + DIRS * FILES_PER_DIR).to_string());
    let got = sh("find . | wc -l", &m.mnt).ok().trim().to_string();
    assert_eq!(got, expected, "find through the mount lists {got} entries, the backing dir has {expected}");

    let sizes = sh("find . -type f -exec stat -c '%n %s' {} + | sort", &m.mnt).ok();
    let want = sh("find . -type f -exec stat -c '%n %s' {} + | sort", &backing).ok();
    assert_eq!(sizes.lines().count(), DIRS * FILES_PER_DIR, "stat through the mount");
    common::assert_same("stat of every file", "stackfs", &sizes, &want);

    // Reading every file needs opens too; then the tree again (cached entries may have been forgotten).
    let sums = sh("find . -type f -print0 | sort -z | xargs -0 cat | wc -c", &m.mnt).ok();
    let want_sums = sh("find . -type f -print0 | sort -z | xargs -0 cat | wc -c", &backing).ok();
    assert_eq!(sums, want_sums, "bytes read through the mount");
    let again = sh("find . | wc -l", &m.mnt).ok().trim().to_string();
    assert_eq!(again, expected, "second find");

    // The daemon is still alive and answering.
    let stats = m.stats();
    assert!(stats["requests_total"].as_u64().unwrap_or(0) > 0, "stats after the walk: {stats}");
    let last = m.mnt.join("dir29/file099");
    let st = common::run("stat", &["-c", "%s", &last.display().to_string()], None, common::STEP);
    assert!(st.ok(), "stat after the walk failed: {}", st.stderr);
}

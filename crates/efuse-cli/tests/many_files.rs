//! stackfs with more files than its daemon may hold descriptors: mounted
//! under `prlimit --nofile=512:512`, a tree of 3,000 files in 30 directories
//! must still be fully listed and stat-able, and the daemon must survive it;
//! under `--nofile=1024:1024`, one process holding 3,000 files open must not
//! deny service to another, and every held file must keep working.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

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

/// Files one process holds open at once in the next tests: three times the
/// daemon's descriptor limit.
const HELD: usize = 3000;
const DAEMON_NOFILE: u64 = 1024;

fn held_path(root: &Path, i: usize) -> std::path::PathBuf {
    root.join(format!("held/d{:02}/f{i:04}", i / 100))
}

fn held_content(i: usize) -> Vec<u8> {
    format!("held file {i}\n").repeat(1 + i % 7).into_bytes()
}

fn make_held(b: &Path) {
    for d in 0..HELD / 100 {
        fs::create_dir_all(b.join(format!("held/d{d:02}"))).unwrap();
    }
    for i in 0..HELD {
        fs::write(held_path(b, i), held_content(i)).unwrap();
    }
    fs::create_dir(b.join("work")).unwrap();
}

/// Raises this process's RLIMIT_NOFILE to at least `want` (root may raise the
/// hard limit too); false if it cannot.
fn raise_own_nofile(want: u64) -> bool {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write one struct rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return false;
        }
        if lim.rlim_cur >= want {
            return true;
        }
        let new = libc::rlimit { rlim_cur: want, rlim_max: lim.rlim_max.max(want) };
        libc::setrlimit(libc::RLIMIT_NOFILE, &new) == 0
    }
}

/// Another process working on the mount while the files are held: mkdir,
/// create, rename, append, read back, read a held file, list, remove.
fn other_process_works(m: &Mounted, tag: &str) {
    let script = format!(
        r#"set -e
for i in $(seq 1 60); do
  mkdir {tag}$i
  printf 'w%s\n' $i > {tag}$i/a
  mv {tag}$i/a {tag}$i/b
  echo more >> {tag}$i/b
  test "$(cat {tag}$i/b)" = "$(printf 'w%s\nmore' $i)"
  cmp -s ../held/d00/f0005 - < ../held/d00/f0005
  ls -la {tag}$i > /dev/null
done
rm -r {tag}*
echo done"#
    );
    let out = sh(&script, &m.mnt.join("work")).timeout(Duration::from_secs(120)).run();
    assert!(
        out.ok() && out.stdout.trim() == "done",
        "{tag}: another process could not work on the mount while one holds {HELD} files:\n{}\n{}",
        out.stdout,
        out.stderr
    );
}

fn daemon_fd_count(m: &Mounted) -> Option<usize> {
    let pid = common::daemon_pid(&m.mnt)?;
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// One process holds 3,000 files open on a stackfs whose daemon may open
/// 1,024 descriptors; another keeps working; then every held file reads back
/// right, the read-write ones take writes, and a file unlinked through the
/// mount while held keeps its data.
fn held_files_do_not_deny_service(test: &str, extra: &[&str]) {
    if !require_fuse(test) || !require_tools(test, &["prlimit", "cmp"]) {
        return;
    }
    assert!(raise_own_nofile(HELD as u64 + 512), "{test}: cannot raise this process's RLIMIT_NOFILE");
    let nofile = format!("--nofile={DAEMON_NOFILE}:{DAEMON_NOFILE}");
    let mut spec = MountSpec::default().wrapper(&["prlimit", &nofile]);
    for a in extra {
        spec = spec.arg(a);
    }
    let m = Mounted::with(Fs::Stackfs, test, spec, make_held);
    let mnt = m.mnt.clone();
    let step = Duration::from_secs(120);

    // A file unlinked through the mount while held: its data must survive
    // every eviction that follows.
    let doomed = common::bounded("doomed file", step, {
        let mnt = mnt.clone();
        move || {
            let p = mnt.join("work/doomed");
            let f = fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
            f.write_all_at(b"doomed data", 0).unwrap();
            fs::remove_file(&p).unwrap();
            f
        }
    });

    // Open everything while another process works on the mount.
    let other = {
        let mnt = mnt.clone();
        std::thread::spawn(move || {
            let out = sh("ls held | wc -l", &mnt).timeout(Duration::from_secs(60)).run();
            assert!(out.ok(), "ls while opening: {}", out.stderr);
        })
    };
    let held = common::bounded("open held files", step, {
        let mnt = mnt.clone();
        move || {
            let mut held = Vec::with_capacity(HELD);
            for i in 0..HELD {
                let rw = i % 4 == 0;
                let p = held_path(&mnt, i);
                let f = fs::OpenOptions::new()
                    .read(true)
                    .write(rw)
                    .open(&p)
                    .unwrap_or_else(|e| panic!("open #{i} ({}) of {HELD} held files: {e}", p.display()));
                held.push((i, rw, f));
            }
            held
        }
    });
    other.join().expect("ls while opening");
    let peak = daemon_fd_count(&m);
    println!("{test}: {HELD} files held; the daemon holds {peak:?} descriptors (limit {DAEMON_NOFILE})");
    other_process_works(&m, "busy");

    // Every held file reads back right; the read-write ones take a write.
    let held = common::bounded("read and write held files", step, move || {
        for (i, rw, f) in &held {
            let want = held_content(*i);
            let mut got = vec![0u8; want.len() + 16];
            let n = f.read_at(&mut got, 0).unwrap_or_else(|e| panic!("read of held file {i}: {e}"));
            assert_eq!(&got[..n], &want[..], "held file {i} read back wrong");
            if *rw {
                f.write_all_at(b"W", 0).unwrap_or_else(|e| panic!("write to held file {i}: {e}"));
                let mut one = [0u8; 1];
                f.read_at(&mut one, 0).unwrap();
                assert_eq!(&one, b"W", "held file {i}: write not seen through its own descriptor");
            }
        }
        held
    });
    other_process_works(&m, "again");
    let doomed = common::bounded("doomed file after pressure", step, move || {
        let mut buf = [0u8; 64];
        let n = doomed.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..n], b"doomed data", "the unlinked held file lost its data");
        doomed.write_all_at(b", still here", 11).unwrap();
        let n = doomed.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..n], b"doomed data, still here");
        assert_eq!(doomed.metadata().unwrap().len(), 23);
        doomed
    });
    common::bounded("close held files", step, move || {
        drop(held);
        drop(doomed);
    });

    let backing = m.backing.clone().unwrap();
    for i in 0..HELD {
        let mut want = held_content(i);
        if i % 4 == 0 {
            want[0] = b'W';
        }
        let got = fs::read(held_path(&backing, i)).unwrap();
        assert_eq!(got, want, "backing file of held file {i} after close");
    }
    assert_eq!(fs::read_dir(backing.join("work")).unwrap().count(), 0, "work dir left over");
}

#[test]
fn stackfs_held_files_do_not_deny_service() {
    held_files_do_not_deny_service("stackfs_held_files_do_not_deny_service", &[]);
}

#[test]
fn stackfs_held_files_do_not_deny_service_passthrough_off() {
    held_files_do_not_deny_service("stackfs_held_files_do_not_deny_service_passthrough_off", &["--passthrough", "off"]);
}

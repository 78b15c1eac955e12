//! Requests that carry no information stay off the mount, and what is left
//! keeps its exact meaning.
//!
//! Each saving is counted with the daemon's per-opcode counters (`efuse
//! stats --json`) around a workload, and paired with a check that the
//! semantics did not move:
//!
//! - FLUSH, with the locks kept by the kernel: opens carry FOPEN_NOFLUSH,
//!   and a FLUSH that comes all the same (stateless opens, the writeback
//!   cache) is answered ENOSYS once, after which the kernel sends none. Data
//!   written and closed is visible to the next process (and, on stackfs, in
//!   the backing file); POSIX locks still go with any close of the owner's.
//!   With `--locks daemon` every close still sends FLUSH, which releases them.
//! - Files opened by CREATE on a `--no-open` mount get no RELEASE from the
//!   kernel: they keep no state in the daemon (memfs frees a removed file's
//!   data, stackfs its descriptors); flock locks, released at RELEASE, stay
//!   in the kernel there even with `--locks daemon`.
//! - Directories are listed without OPENDIR/RELEASEDIR where listings are
//!   cached (default profile); `--open-dirs` and `--cache none` keep them.
//!   Listings follow changes made through the mount.
//! - READDIRPLUS of a cold stackfs directory carries every entry's
//!   attributes once the program is seen to use what it lists: `ls -l`
//!   then sends no LOOKUP per entry, and shows what the backing directory
//!   shows.
//!
//! Every look at the mount is an external command with a timeout, so a
//! hung daemon fails a test instead of hanging it.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::{require_fuse, require_tools, sh, wait_until, Background, Cmd, Fs, MountSpec, Mounted};

/// Bound on one command run in the mount.
const LOOK: Duration = Duration::from_secs(60);

/// Opens, reads and closes `FILE` `N` times in one process.
const OPEN_LOOP: &str = "import os, sys
for _ in range(int(sys.argv[2])):
    f = os.open(sys.argv[1], os.O_RDONLY)
    os.read(f, 4096)
    os.close(f)
";

/// Takes a POSIX lock on `FILE` through one descriptor, then (told to by
/// MARK.go) opens and closes a second descriptor of the same file, which
/// drops the lock (POSIX), and waits for MARK.end.
const LOCK_HOLDER: &str = "import fcntl, os, sys, time
path, mark = sys.argv[1], sys.argv[2]
def wait(name):
    for _ in range(1200):
        if os.path.exists(mark + name):
            return
        time.sleep(0.05)
    sys.exit(3)
f = os.open(path, os.O_RDWR)
fcntl.lockf(f, fcntl.LOCK_EX)
open(mark + '.held', 'w').close()
wait('.go')
g = os.open(path, os.O_RDONLY)
os.close(g)
open(mark + '.closed', 'w').close()
wait('.end')
";

/// Exits 0 if it gets an exclusive POSIX lock on `FILE` at once, 1 if not.
const LOCK_PROBE: &str = "import fcntl, os, sys
f = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    sys.exit(1)
";

fn op_count(stats: &serde_json::Value, op: &str) -> (u64, u64) {
    let o = &stats["opcodes"][op];
    (o["count"].as_u64().unwrap_or(0), o["errors"].as_u64().unwrap_or(0))
}

/// Requests of `op` (count, errors) between two snapshots.
fn delta(before: &serde_json::Value, after: &serde_json::Value, op: &str) -> (u64, u64) {
    let (a, b) = (op_count(before, op), op_count(after, op));
    (b.0 - a.0, b.1 - a.1)
}

/// Runs `script` (bash) in `dir`; its stdout, trimmed; fails the test if it fails.
fn run(dir: &Path, script: &str) -> String {
    sh(script, dir).timeout(LOOK).ok().trim().to_string()
}

fn python(dir: &Path, code: &str, args: &[&str]) -> common::Output {
    Cmd::new("python3").arg("-c").arg(code).args(args).cwd(dir).timeout(LOOK).run()
}

fn usage(m: &Mounted, what: &str) -> u64 {
    m.stats()["usage"][what].as_u64().unwrap_or_else(|| panic!("no usage.{what} in efuse stats"))
}

/// The mounts the FLUSH tests run on: (file system, extra arguments).
const NOFLUSH_MOUNTS: [(Fs, &[&str]); 4] = [
    (Fs::Memfs, &["--no-open"]),
    (Fs::Stackfs, &["--no-open"]),
    (Fs::Memfs, &["--writeback-cache"]),
    (Fs::Stackfs, &["--writeback-cache"]),
];

#[test]
fn closes_send_no_flush_when_locks_stay_in_the_kernel() {
    let test = "closes_send_no_flush_when_locks_stay_in_the_kernel";
    if !require_fuse(test) || !require_tools(test, &["python3"]) {
        return;
    }
    for (fs_kind, args) in NOFLUSH_MOUNTS {
        let spec = args.iter().fold(MountSpec::default(), |s, a| s.arg(a));
        let m = Mounted::with(fs_kind, test, spec, |_| {});
        let what = format!("{} {}", fs_kind.name(), args.join(" "));
        run(&m.mnt, "head -c 4096 /dev/zero > f");
        let before = m.stats();
        let out = python(&m.mnt, OPEN_LOOP, &["f", "300"]);
        assert!(out.ok(), "{what}: open loop failed: {}", out.stderr);
        // Writes, each closed before the next process looks.
        for i in 0..20 {
            run(&m.mnt, &format!("printf 'line {i}\\n' >> log"));
            assert_eq!(run(&m.mnt, "tail -n 1 log"), format!("line {i}"), "{what}: a closed write is not visible");
            if let Some(b) = &m.backing {
                // On stackfs the data is in the backing file once close returned
                // (the writeback cache writes it back at close).
                let text = fs::read_to_string(b.join("log")).unwrap();
                assert_eq!(text.lines().last(), Some(format!("line {i}").as_str()), "{what}: backing file after close");
            }
        }
        let after = m.stats();
        let (flush, flush_err) = delta(&before, &after, "FLUSH");
        // At most the one FLUSH answered ENOSYS, from which the kernel learns.
        assert!(
            flush <= 1 && flush == flush_err,
            "{what}: {flush} FLUSH ({flush_err} answered with an error)\n{after:#}"
        );
        if args.contains(&"--no-open") {
            let (open, open_err) = op_count(&after, "OPEN");
            assert!(open <= 1 && open == open_err, "{what}: OPEN served\n{after:#}");
            // Only `f`, created before the kernel's first OPEN, is released.
            assert!(op_count(&after, "RELEASE").0 <= 1, "{what}: RELEASE\n{after:#}");
        }
    }
}

/// POSIX locks: a close of any of the owner's descriptors drops its locks,
/// wherever the locks live; with `--locks daemon` that is what FLUSH does,
/// so every close still sends one.
#[test]
fn posix_locks_go_with_any_close() {
    let test = "posix_locks_go_with_any_close";
    if !require_fuse(test) || !require_tools(test, &["python3"]) {
        return;
    }
    let mounts: [(Fs, &[&str]); 5] = [
        (Fs::Stackfs, &["--no-open"]),
        (Fs::Memfs, &["--no-open"]),
        (Fs::Stackfs, &["--locks", "daemon"]),
        (Fs::Stackfs, &["--locks", "daemon", "--no-open"]),
        (Fs::Memfs, &["--locks", "daemon", "--no-open"]),
    ];
    for (fs_kind, args) in mounts {
        let spec = args.iter().fold(MountSpec::default(), |s, a| s.arg(a));
        let m = Mounted::with(fs_kind, test, spec, |_| {});
        let what = format!("{} {}", fs_kind.name(), args.join(" "));
        run(&m.mnt, "printf data > lockf");
        let mark = m.scratch.join("lock").display().to_string();
        let before = m.stats();
        let mut holder = Background::spawn("python3", &["-c", LOCK_HOLDER, "lockf", &mark], &m.mnt);
        let seen = |name: &str| Path::new(&format!("{mark}{name}")).exists();
        assert!(wait_until(Duration::from_secs(30), || seen(".held")), "{what}: the holder never got its lock");
        assert_eq!(python(&m.mnt, LOCK_PROBE, &["lockf"]).code(), Some(1), "{what}: lock not held");
        fs::write(format!("{mark}.go"), b"").unwrap();
        assert!(wait_until(Duration::from_secs(30), || seen(".closed")), "{what}: the holder never closed");
        assert_eq!(
            python(&m.mnt, LOCK_PROBE, &["lockf"]).code(),
            Some(0),
            "{what}: the lock outlived a close of its owner's descriptor"
        );
        fs::write(format!("{mark}.end"), b"").unwrap();
        let status = holder.wait(Duration::from_secs(30));
        assert_eq!(status.and_then(|s| s.code()), Some(0), "{what}: lock holder");
        let after = m.stats();
        let (flush, flush_err) = delta(&before, &after, "FLUSH");
        if args.contains(&"daemon") {
            // The holder's two closes and the probes' closes.
            assert!(flush >= 4 && flush_err == 0, "{what}: {flush} FLUSH, {flush_err} errors\n{after:#}");
        } else {
            assert!(flush <= 1, "{what}: {flush} FLUSH\n{after:#}");
        }
    }
}

/// flock locks are released at RELEASE, which the kernel never sends on a
/// `--no-open` mount: there the kernel keeps them, even with `--locks daemon`.
#[test]
fn flock_locks_go_at_close_without_open() {
    let test = "flock_locks_go_at_close_without_open";
    if !require_fuse(test) || !require_tools(test, &["flock"]) {
        return;
    }
    for fs_kind in [Fs::Memfs, Fs::Stackfs] {
        let spec = MountSpec::default().arg("--no-open").arg("--locks").arg("daemon");
        let m = Mounted::with(fs_kind, test, spec, |_| {});
        let what = fs_kind.name();
        run(&m.mnt, "touch lockf");
        let try_lock = || Cmd::new("flock").args(["-x", "-n", "lockf", "-c", "true"]).cwd(&m.mnt).timeout(LOOK).run();
        for i in 0..3 {
            assert_eq!(try_lock().code(), Some(0), "{what}: flock {i} found the file locked by a process that exited");
        }
        let mark = m.scratch.join("held");
        let hold = format!("touch {}; sleep 60", mark.display());
        // Killed (with its group) when dropped.
        let holder = Background::spawn("flock", &["-x", "lockf", "-c", &hold], &m.mnt);
        assert!(wait_until(Duration::from_secs(30), || mark.exists()), "{what}: the holder never got the lock");
        assert_eq!(try_lock().code(), Some(1), "{what}: a held flock lock was granted again");
        drop(holder);
    }
}

/// On a `--no-open` mount the kernel releases no file opened by CREATE (once
/// it has seen OPEN answered ENOSYS): the daemon must keep nothing for them.
#[test]
fn stateless_creates_leave_nothing_behind() {
    let test = "stateless_creates_leave_nothing_behind";
    if !require_fuse(test) {
        return;
    }
    for fs_kind in [Fs::Memfs, Fs::Stackfs] {
        let m = Mounted::with(fs_kind, test, MountSpec::default().arg("--no-open"), |_| {});
        let what = fs_kind.name();
        // The first OPEN teaches the kernel that opens are stateless.
        run(&m.mnt, "printf x > first && cat first >/dev/null");
        let (key, base) = match fs_kind {
            Fs::Memfs => ("data_bytes", usage(&m, "data_bytes")),
            Fs::Stackfs => ("descriptors", usage(&m, "descriptors")),
        };
        run(&m.mnt, "mkdir d && for i in $(seq 40); do head -c 100000 /dev/urandom > d/f$i; done");
        assert_eq!(run(&m.mnt, "cat d/* | wc -c"), "4000000", "{what}: data written by created files");
        run(&m.mnt, "rm -r d");
        // Removed files go once the kernel forgets them (at once: nothing holds them).
        let back = wait_until(Duration::from_secs(10), || usage(&m, key) <= base);
        assert!(back, "{what}: {key} {} after removing every created file, {base} before", usage(&m, key));
        let stats = m.stats();
        assert_eq!(op_count(&stats, "CREATE").0, 41, "{what}\n{stats:#}");
    }
}

#[test]
fn directories_are_listed_without_opendir() {
    let test = "directories_are_listed_without_opendir";
    if !require_fuse(test) {
        return;
    }
    for fs_kind in [Fs::Memfs, Fs::Stackfs] {
        for args in [&[][..], &["--open-dirs"], &["--cache", "none"]] {
            let spec = args.iter().fold(MountSpec::default(), |s, a| s.arg(a));
            let m = Mounted::with(fs_kind, test, spec, |_| {});
            let what = format!("{} {}", fs_kind.name(), args.join(" "));
            run(&m.mnt, "mkdir -p d/sub && touch d/a d/b");
            let before = m.stats();
            let mut want = vec!["a", "b", "sub"];
            for i in 0..5 {
                assert_eq!(run(&m.mnt, "ls d | tr '\\n' ' '").trim(), want.join(" "), "{what}: listing {i}");
            }
            // Changes through the mount show in the next listing.
            run(&m.mnt, "touch d/c && rm d/a && mv d/b d/e");
            want = vec!["c", "e", "sub"];
            assert_eq!(run(&m.mnt, "ls d | tr '\\n' ' '").trim(), want.join(" "), "{what}: listing after changes");
            assert_eq!(run(&m.mnt, "find d | sort | tr '\\n' ' '").trim(), "d d/c d/e d/sub", "{what}: find");
            if let Some(b) = &m.backing {
                // Behind the mount (with the cache off: seen at once).
                fs::write(b.join("d/behind"), b"").unwrap();
                let seen = wait_until(Duration::from_secs(1), || run(&m.mnt, "ls d").contains("behind"));
                assert!(seen, "{what}: a file created behind the mount never showed in the listing");
            }
            let after = m.stats();
            let (opendir, opendir_err) = delta(&before, &after, "OPENDIR");
            let releasedir = delta(&before, &after, "RELEASEDIR").0;
            if args.is_empty() {
                assert!(
                    opendir <= 1 && opendir == opendir_err && releasedir == 0,
                    "{what}: {opendir} OPENDIR ({opendir_err} errors), {releasedir} RELEASEDIR\n{after:#}"
                );
            } else {
                assert!(opendir >= 7 && opendir_err == 0, "{what}: {opendir} OPENDIR\n{after:#}");
            }
        }
    }
}

/// A cold stackfs directory listed with READDIRPLUS carries every entry's
/// attributes once the program is seen to use what it lists: a new mount's
/// first answers go bare (each entry `ls -l` stats is looked up), later
/// ones carry them, so `ls -l` sends no LOOKUP for most entries (one answer
/// in eight goes bare, to keep measuring), and shows what the backing
/// directory shows.
#[test]
fn cold_listings_carry_attributes_once_entries_are_used() {
    let test = "cold_listings_carry_attributes_once_entries_are_used";
    if !require_fuse(test) {
        return;
    }
    let m = Mounted::with(Fs::Stackfs, test, MountSpec::default(), |b| {
        for d in ["d1", "d2"] {
            fs::create_dir(b.join(d)).unwrap();
            for i in 0..300 {
                fs::write(b.join(format!("{d}/f{i:03}")), "x".repeat(i)).unwrap();
            }
            fs::create_dir(b.join(format!("{d}/sub"))).unwrap();
            std::os::unix::fs::symlink("f001", b.join(format!("{d}/link"))).unwrap();
        }
    });
    let backing = m.backing.as_deref().expect("stackfs has a backing dir");
    let lookups_of = |dir: &str| {
        let before = m.stats();
        let ls = format!("ls -ln --time-style=full-iso {dir}");
        let through = run(&m.mnt, &ls);
        let after = m.stats();
        assert_eq!(through, run(backing, &ls), "ls -l {dir} through the mount and of the backing directory");
        delta(&before, &after, "LOOKUP").0
    };
    // ls stats each entry as it reads the listing: the policy learns within
    // the first directory, whose first answer goes bare.
    let first = lookups_of("d1");
    assert!(first >= 50, "the first listing of a new mount carried attributes ({first} LOOKUPs)");
    let second = lookups_of("d2");
    assert!(second <= 80 && second < first, "{second} LOOKUPs for ls -l of 302 entries (the first: {first})");
    // The inode numbers the listing gave are the ones stat gives.
    assert_eq!(run(&m.mnt, "ls -i d2/f007 | cut -d' ' -f1"), run(&m.mnt, "stat -c %i d2/f007"));
}

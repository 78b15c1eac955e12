//! stackfs's kernel-side fast paths, tested on real mounts.
//!
//! - `--cache auto` (the default) caches names, attributes, misses, pages
//!   and listings for a long time and keeps them exact by watching the
//!   backing directory. Each test here changes the backing directory behind
//!   the mount's back, after the kernel has cached the old state, and
//!   requires the mount to show the change within 1 s.
//! - `--cache none` and `--cache always` mount and work; `always` really
//!   caches (a change behind the mount stays invisible: the user promised
//!   there would be none).
//! - Passthrough: reads of an opened file never reach the daemon.
//! - `--no-open`: the kernel sends no OPEN (after the one answered ENOSYS)
//!   and no RELEASE; data is still right.
//!
//! Every look at the mount is an external command with a timeout, so a hung
//! daemon fails a test instead of hanging it.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{require_fuse, sh, Background, Fs, MountSpec, Mounted};

/// How long a change behind the mount may take to show.
const VISIBLE_WITHIN: Duration = Duration::from_secs(1);
/// Poll interval while waiting for it.
const POLL: Duration = Duration::from_millis(50);
/// Bound on one look at the mount.
const LOOK: Duration = Duration::from_secs(10);

/// Runs `script` (bash) in the mount; stdout then stderr, trimmed.
fn look(m: &Mounted, script: &str) -> String {
    let out = sh(script, &m.mnt).timeout(LOOK).run();
    format!("{}{}", out.stdout, out.stderr).trim().to_string()
}

/// Polls `script` in the mount until it prints `want` (within
/// [`VISIBLE_WITHIN`] of the call); fails with what it saw. Returns how long it took.
fn eventually(m: &Mounted, what: &str, script: &str, want: &str) -> Duration {
    let start = Instant::now();
    let mut seen = Vec::new();
    loop {
        let got = look(m, script);
        if got == want {
            return start.elapsed();
        }
        if seen.last() != Some(&got) {
            seen.push(got);
        }
        if start.elapsed() > VISIBLE_WITHIN {
            panic!(
                "{what}: the mount did not show the change within {VISIBLE_WITHIN:?}\n  script: {script}\n  \
                 want: {want:?}\n  seen (in order): {seen:?}"
            );
        }
        std::thread::sleep(POLL);
    }
}

/// Asserts `script` prints `want` now (the state the kernel is about to cache).
fn now(m: &Mounted, what: &str, script: &str, want: &str) {
    let got = look(m, script);
    assert_eq!(got, want, "{what}: before the change, `{script}` in the mount");
}

fn backing(m: &Mounted) -> &Path {
    m.backing.as_deref().expect("stackfs mount has a backing dir")
}

fn stat_of(name: &str) -> String {
    format!("stat -c '%F %a %s %h' -- '{name}' 2>/dev/null || echo missing")
}

fn prepare(b: &Path) {
    fs::write(b.join("file"), b"0123456789").unwrap();
    fs::write(b.join("moved"), b"moving").unwrap();
    fs::write(b.join("target"), b"old content").unwrap();
    fs::create_dir_all(b.join("sub/deeper")).unwrap();
    fs::write(b.join("sub/deeper/inner"), b"inner").unwrap();
    symlink("file", b.join("link")).unwrap();
}

#[test]
fn auto_cache_sees_changes_behind_the_mount() {
    changes_behind_the_mount("auto_cache_sees_changes_behind_the_mount", MountSpec::default());
}

/// The same with the watcher stackfs uses when it may not use fanotify.
#[test]
fn auto_cache_with_inotify_sees_changes_behind_the_mount() {
    let spec = MountSpec::default().wrapper(&["env", "EFUSE_STACKFS_WATCH=inotify"]);
    changes_behind_the_mount("auto_cache_with_inotify_sees_changes_behind_the_mount", spec);
}

fn changes_behind_the_mount(test: &str, spec: MountSpec) {
    if !require_fuse(test) {
        return;
    }
    let m = Mounted::with(Fs::Stackfs, test, spec, prepare);
    let b = backing(&m).to_path_buf();
    let mut slowest = (Duration::ZERO, "");
    let mut record = |d: Duration, what: &'static str| {
        if d > slowest.0 {
            slowest = (d, what);
        }
    };

    // Create: the miss was cached (negative entry), and so was the listing.
    now(&m, "create", &stat_of("new"), "missing");
    now(&m, "create", "ls", "file\nlink\nmoved\nsub\ntarget");
    fs::write(b.join("new"), b"fresh").unwrap();
    record(eventually(&m, "create (lookup)", "cat new", "fresh"), "create");
    record(eventually(&m, "create (listing)", "ls", "file\nlink\nmoved\nnew\nsub\ntarget"), "create listing");

    // Create deeper down, in a directory looked up through the mount.
    now(&m, "create in subdir", "ls sub/deeper; cat sub/deeper/inner", "inner\ninner");
    now(&m, "create in subdir", &stat_of("sub/deeper/n2"), "missing");
    fs::write(b.join("sub/deeper/n2"), b"two").unwrap();
    record(eventually(&m, "create in subdir", "cat sub/deeper/n2", "two"), "create in subdir");
    record(eventually(&m, "create in subdir (listing)", "ls sub/deeper", "inner\nn2"), "subdir listing");

    // Unlink.
    now(&m, "unlink", "cat new", "fresh");
    fs::remove_file(b.join("new")).unwrap();
    record(eventually(&m, "unlink", &stat_of("new"), "missing"), "unlink");
    record(eventually(&m, "unlink (listing)", "ls", "file\nlink\nmoved\nsub\ntarget"), "unlink listing");

    // Rename.
    now(&m, "rename", "cat moved; echo; stat -c %F renamed 2>/dev/null || echo missing", "moving\nmissing");
    fs::rename(b.join("moved"), b.join("renamed")).unwrap();
    record(eventually(&m, "rename", "cat moved 2>/dev/null || echo gone; cat renamed", "gone\nmoving"), "rename");

    // chmod.
    now(&m, "chmod", &stat_of("file"), "regular file 644 10 1");
    fs::set_permissions(b.join("file"), fs::Permissions::from_mode(0o600)).unwrap();
    record(eventually(&m, "chmod", &stat_of("file"), "regular file 600 10 1"), "chmod");

    // Append: attributes and cached pages.
    now(&m, "append", "cat file", "0123456789");
    {
        use std::io::Write;
        let mut f = fs::OpenOptions::new().append(true).open(b.join("file")).unwrap();
        f.write_all(b"abc").unwrap();
    }
    record(eventually(&m, "append", "cat file; echo; stat -c %s file", "0123456789abc\n13"), "append");

    // Truncate (shorter, same first bytes: only an exact page cache shows it).
    now(&m, "truncate", "cat file", "0123456789abc");
    fs::OpenOptions::new().write(true).open(b.join("file")).unwrap().set_len(4).unwrap();
    record(eventually(&m, "truncate", "cat file; echo; stat -c %s file", "0123\n4"), "truncate");

    // Overwrite in place, same size: only the page cache can be stale.
    now(&m, "overwrite", "cat file", "0123");
    fs::write(b.join("file"), b"wxyz").unwrap();
    record(eventually(&m, "overwrite", "cat file", "wxyz"), "overwrite");

    // Replace: write a new file and rename it over the old name.
    now(&m, "replace", "cat target", "old content");
    fs::write(b.join("target.tmp"), b"new content").unwrap();
    fs::rename(b.join("target.tmp"), b.join("target")).unwrap();
    record(eventually(&m, "replace", "cat target", "new content"), "replace");

    // mkdir / rmdir.
    now(&m, "mkdir", &stat_of("dir"), "missing");
    fs::create_dir(b.join("dir")).unwrap();
    fs::write(b.join("dir/f"), b"in dir").unwrap();
    record(eventually(&m, "mkdir", "stat -c %F dir && cat dir/f", "directory\nin dir"), "mkdir");
    fs::remove_file(b.join("dir/f")).unwrap();
    fs::remove_dir(b.join("dir")).unwrap();
    record(eventually(&m, "rmdir", &stat_of("dir"), "missing"), "rmdir");

    // Symlink replaced (atomically, as `ln -sfn` does).
    now(&m, "symlink", "readlink link; cat link", "file\nwxyz");
    symlink("target", b.join("link.tmp")).unwrap();
    fs::rename(b.join("link.tmp"), b.join("link")).unwrap();
    record(eventually(&m, "symlink", "readlink link; cat link", "target\nnew content"), "symlink");

    // The mount's own changes are still right (and not undone by the watcher).
    look(&m, "echo via-mount > mine && mkdir mdir && mv mine mdir/mine");
    assert_eq!(fs::read_to_string(b.join("mdir/mine")).unwrap(), "via-mount\n");
    now(&m, "own changes", "cat mdir/mine", "via-mount");

    eprintln!("{test}: slowest change to show through the mount: {:?} ({})", slowest.0, slowest.1);
}

#[test]
fn cache_none_and_always_mount_and_work() {
    let test = "cache_none_and_always_mount_and_work";
    if !require_fuse(test) {
        return;
    }
    for mode in ["none", "always"] {
        let m = Mounted::with(Fs::Stackfs, test, MountSpec::default().arg("--cache").arg(mode), prepare);
        let b = backing(&m).to_path_buf();
        // Plain work through the mount.
        let out = look(&m, "echo hi > w && cat w && mkdir d && mv w d/w && cat d/w && ls d && rm d/w && rmdir d && ls");
        assert_eq!(out, "hi\nhi\nw\nfile\nlink\nmoved\nsub\ntarget", "--cache {mode}");
        now(&m, mode, &stat_of("file"), "regular file 644 10 1");
        fs::set_permissions(b.join("file"), fs::Permissions::from_mode(0o600)).unwrap();
        match mode {
            // Nothing cached: the next stat asks the daemon.
            "none" => now(&m, "--cache none", &stat_of("file"), "regular file 600 10 1"),
            // Cached for a long time, unwatched: the change stays invisible,
            // which is what --cache always promises (and proves caching is on).
            // The file is held open so that memory pressure (or another
            // process dropping caches) cannot evict the cached inode.
            _ => {
                fs::set_permissions(b.join("file"), fs::Permissions::from_mode(0o644)).unwrap();
                let _holder = Background::spawn("bash", &["-c", "exec 3<file; sleep 60"], &m.mnt);
                std::thread::sleep(Duration::from_millis(200));
                now(&m, "--cache always", &stat_of("file"), "regular file 644 10 1");
                fs::set_permissions(b.join("file"), fs::Permissions::from_mode(0o600)).unwrap();
                std::thread::sleep(Duration::from_millis(1500));
                now(&m, "--cache always", &stat_of("file"), "regular file 644 10 1");
            }
        }
    }
}

/// Counts from `efuse stats --json`: (count, errors) of `op`.
fn op_count(stats: &serde_json::Value, op: &str) -> (u64, u64) {
    let o = &stats["opcodes"][op];
    (o["count"].as_u64().unwrap_or(0), o["errors"].as_u64().unwrap_or(0))
}

#[test]
fn passthrough_serves_reads_in_the_kernel() {
    let test = "passthrough_serves_reads_in_the_kernel";
    if !require_fuse(test) {
        return;
    }
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let m = Mounted::with(Fs::Stackfs, test, MountSpec::default(), |b| fs::write(b.join("big"), &data).unwrap());
    let sum = |dir: &Path| sh("sha256sum big | cut -d' ' -f1", dir).timeout(LOOK).ok();
    assert_eq!(sum(&m.mnt), sum(backing(&m)), "data read through the mount");
    // Writes through passthrough land in the backing file.
    look(&m, "printf 'PASS' | dd of=big bs=1 seek=100 conv=notrunc status=none");
    assert_eq!(&fs::read(backing(&m).join("big")).unwrap()[100..104], b"PASS");
    let stats = m.stats();
    let passthrough = stats["paths"]["passthrough"].as_u64().unwrap_or(0);
    assert!(passthrough >= 2, "opens answered with passthrough: {passthrough}\n{stats:#}");
    assert_eq!(op_count(&stats, "READ").0, 0, "READs reached the daemon despite passthrough\n{stats:#}");
    assert_eq!(op_count(&stats, "WRITE").0, 0, "WRITEs reached the daemon despite passthrough\n{stats:#}");
}

#[test]
fn no_open_mounts_send_no_open() {
    let test = "no_open_mounts_send_no_open";
    if !require_fuse(test) {
        return;
    }
    let data: Vec<u8> = (0..(1u32 << 20) + 777).map(|i| (i % 251) as u8).collect();
    let m = Mounted::with(Fs::Stackfs, test, MountSpec::default().arg("--no-open"), |b| {
        fs::write(b.join("data"), &data).unwrap();
        for i in 0..20 {
            fs::write(b.join(format!("small{i}")), format!("small file {i}\n")).unwrap();
        }
    });
    let sum = |dir: &Path| sh("sha256sum data small* | md5sum", dir).timeout(LOOK).ok();
    assert_eq!(sum(&m.mnt), sum(backing(&m)), "data read through a --no-open mount");
    // Reads at offsets, and a second pass (cached pages).
    let tail = look(&m, "dd if=data bs=1000 skip=1000 count=2 status=none | md5sum");
    let want = sh("dd if=data bs=1000 skip=1000 count=2 status=none | md5sum", backing(&m)).timeout(LOOK).ok();
    assert_eq!(tail, want.trim());
    assert_eq!(sum(&m.mnt), sum(backing(&m)));
    let stats = m.stats();
    let (open, open_err) = op_count(&stats, "OPEN");
    // The first OPEN is answered ENOSYS (that is how the kernel learns); no other is sent.
    assert!(open <= 1 && open == open_err, "OPEN requests served on a --no-open mount\n{stats:#}");
    assert_eq!(op_count(&stats, "RELEASE").0, 0, "RELEASE on a --no-open mount\n{stats:#}");
    assert!(op_count(&stats, "READ").0 > 0, "reads went somewhere\n{stats:#}");
    // Writes with fh 0 land in the backing file.
    look(&m, "printf 'stateless' > small3 && printf '!' >> small3");
    assert_eq!(fs::read_to_string(backing(&m).join("small3")).unwrap(), "stateless!");
    assert_eq!(look(&m, "cat small3"), "stateless!");
}

/// Restores a /proc/sys setting on drop.
struct Sysctl {
    path: &'static str,
    old: String,
}

impl Sysctl {
    fn set(path: &'static str, value: &str) -> Sysctl {
        let old = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        fs::write(path, value).unwrap_or_else(|e| panic!("write {path}: {e}"));
        Sysctl { path, old }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = fs::write(self.path, self.old.trim());
    }
}

/// Sends SIGCONT to a stopped daemon on drop, so a failing test never leaves it stopped.
struct Stopped(i32);

impl Stopped {
    fn new(pid: u32) -> Stopped {
        // SAFETY: plain syscall on the pid of the daemon this test started.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
        Stopped(pid as i32)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// Change events lost to a full inotify queue (here: the daemon stopped while
/// more changes than the queue holds happen behind the mount) must not leave
/// cached names or attributes stale: the watcher drops them all at once.
#[test]
fn lost_change_events_drop_every_cached_name() {
    let test = "lost_change_events_drop_every_cached_name";
    if !require_fuse(test) {
        return;
    }
    let spec = MountSpec::default().wrapper(&["env", "EFUSE_STACKFS_WATCH=inotify"]);
    let m = {
        // A 16-event queue for the daemon's inotify instance (the setting
        // applies to instances made while it holds).
        let _small = Sysctl::set("/proc/sys/fs/inotify/max_queued_events", "16");
        Mounted::with(Fs::Stackfs, test, spec, prepare)
    };
    let b = backing(&m).to_path_buf();
    // What the kernel caches: a name, a miss, and attributes.
    now(&m, "name", "cat moved", "moving");
    now(&m, "miss", &stat_of("ghost"), "missing");
    now(&m, "attributes", &stat_of("file"), "regular file 644 10 1");
    let pid = common::daemon_pid(&m.mnt).expect("daemon pid");
    {
        let _stopped = Stopped::new(pid);
        fs::create_dir(b.join("burst")).unwrap();
        for i in 0..64 {
            fs::write(b.join(format!("burst-{i}")), b"x").unwrap();
        }
        // These events find the queue full: only the overflow tells of them.
        fs::rename(b.join("moved"), b.join("moved-away")).unwrap();
        fs::write(b.join("ghost"), b"boo").unwrap();
        fs::OpenOptions::new().append(true).open(b.join("file")).unwrap().write_all(b"++").unwrap();
    }
    eventually(&m, "renamed behind the mount", "cat moved 2>/dev/null || echo gone", "gone");
    eventually(&m, "created behind the mount", "cat ghost", "boo");
    eventually(&m, "appended behind the mount", &stat_of("file"), "regular file 644 12 1");
}

/// Voluntary context switches of the daemon's change-watcher thread(s).
fn watcher_switches(pid: u32) -> u64 {
    let mut total = 0;
    for t in fs::read_dir(format!("/proc/{pid}/task")).expect("daemon threads").flatten() {
        let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.contains("watch") {
            continue;
        }
        let status = fs::read_to_string(t.path().join("status")).unwrap_or_default();
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

/// Writes made through the mount reach the backing file (passthrough writes
/// are reported to the watcher as the program's), so the watcher sees one
/// change per write: it must take them in bursts, not wake once per write
/// (it did: about one wake-up per 10 writes, ~20 per millisecond).
#[test]
fn writes_through_the_mount_do_not_wake_the_watcher_per_write() {
    let test = "writes_through_the_mount_do_not_wake_the_watcher_per_write";
    if !require_fuse(test) {
        return;
    }
    let m = Mounted::with(Fs::Stackfs, test, MountSpec::default(), |b| {
        fs::write(b.join("big"), vec![0u8; 16 << 20]).unwrap();
    });
    let pid = common::daemon_pid(&m.mnt).expect("daemon pid");
    let before = watcher_switches(pid);
    let start = Instant::now();
    sh("dd if=/dev/zero of=big bs=4k count=4096 conv=notrunc status=none", &m.mnt).timeout(LOOK).run().expect_ok();
    // Let the last burst be taken.
    std::thread::sleep(Duration::from_millis(50));
    let elapsed_ms = start.elapsed().as_millis() as u64;
    let woke = watcher_switches(pid) - before;
    // Each burst costs the watcher two sleeps (poll, then the gathering
    // pause of 2 ms), so at most one burst per 2 ms of writing.
    assert!(
        woke <= elapsed_ms + 20,
        "the watcher switched {woke} times during {elapsed_ms} ms of writes (at most one burst per 2 ms expected)"
    );
    // And the change is still seen.
    now(&m, "size after the writes", "stat -c %s big", &(16u64 << 20).to_string());
}

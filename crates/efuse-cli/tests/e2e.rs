//! End-to-end scenarios: every scenario runs with ordinary tools (cp, tar,
//! find, du, ln, mv, rm, chmod, chown, touch, truncate, dd, python3, setfattr,
//! flock, git, sqlite3) once on an efuse mount and once on a plain ext4
//! directory beside it, and the two transcripts must be identical.
//!
//! Transcripts leave out what legitimately differs between file systems:
//! inode numbers (hard links are shown as "same file as PATH" instead),
//! device ids, directory sizes and directory link counts, and timestamps the
//! scenario did not set itself.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::{assert_same, require_fuse, require_tools, sh, Background, Cmd, Fs, Mounted};

/// One side of a comparison: the directory under test and a private ext4 scratch dir.
struct Side {
    name: &'static str,
    /// Mount point or ext4 reference dir: the scenario works here.
    dir: PathBuf,
    /// ext4 scratch space private to this side (tar output, extraction target).
    out: PathBuf,
    /// ext4 scratch shared by both sides (the generated source tree lives here).
    src: PathBuf,
}

impl Side {
    /// A bash script run in `dir` with SRC and OUT exported and a `step`
    /// helper that records each command, its output and its exit status.
    fn script(&self, body: &str) -> String {
        let full = format!(
            "export LC_ALL=C TZ=UTC\n\
             step() {{ printf '$ %s\\n' \"$*\"; \"$@\" 2>&1; printf '[rc=%d]\\n' $?; }}\n\
             {body}"
        );
        let out = sh(&full, &self.dir)
            .env("SRC", &self.src.display().to_string())
            .env("OUT", &self.out.display().to_string())
            .run();
        let text = format!("{}{}[script rc={}]\n", out.stdout, out.stderr, out.status.code().unwrap_or(-1));
        self.normalise(&text)
    }

    /// Replaces the side-specific paths so both transcripts can be compared.
    fn normalise(&self, s: &str) -> String {
        s.replace(&self.out.display().to_string(), "$OUT").replace(&self.dir.display().to_string(), "$DIR")
    }
}

/// Runs `scenario` on the mount and on ext4 and requires identical transcripts.
fn compare(test: &str, fs_kind: Fs, tools: &[&str], scenario: fn(&Side) -> String) {
    if !require_fuse(test) || !require_tools(test, tools) {
        return;
    }
    let m = Mounted::new(fs_kind, test);
    let t = transcripts(&m.scratch, m.sides(), scenario);
    assert_same(test, fs_kind.name(), &t[0], &t[1]);
    // A pass-through must leave in the backing dir exactly what it shows.
    if let Some(backing) = &m.backing {
        let shown = manifest(&m.mnt, ".");
        let stored = manifest(backing, ".");
        assert_same(&format!("{test}: mount vs its backing dir"), "stackfs mount", &shown, &stored);
    }
}

/// Generates the source tree in `scratch` and runs `scenario` on each side.
fn transcripts(scratch: &Path, sides: [(&'static str, PathBuf); 2], scenario: fn(&Side) -> String) -> Vec<String> {
    let src = scratch.join("src");
    fs::create_dir_all(&src).unwrap();
    make_tree(&src.join("tree"));
    let mut out = Vec::new();
    for (name, dir) in sides {
        let side_out = scratch.join(format!("out-{name}"));
        fs::create_dir_all(&side_out).unwrap();
        let t = scenario(&Side { name, dir, out: side_out, src: src.clone() });
        if std::env::var_os("EFUSE_E2E_SHOW").is_some() {
            println!("===== transcript on {name} =====\n{t}");
        }
        out.push(t);
    }
    out
}

/// Deterministic pseudo-random bytes (xorshift64*), so offset bugs show up as content differences.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

fn set_mtime(p: &Path, secs_since_epoch: u64) {
    let f = fs::File::options().write(true).open(p).unwrap();
    f.set_modified(SystemTime::UNIX_EPOCH + Duration::new(secs_since_epoch, 123_456_789)).unwrap();
}

/// The generated source tree (on ext4): nested dirs, files of varied sizes
/// (0 B to over 3 MiB), odd names, symlinks (relative, to dirs, dangling),
/// hard links across dirs, varied modes and owners, fixed mtimes.
fn make_tree(root: &Path) {
    let dirs = ["dir1/sub/deeper", "dir2", "dir3/empty-dir", "dir4"];
    for d in dirs {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    let files: &[(&str, usize, u32)] = &[
        ("empty", 0, 0o644),
        ("one", 1, 0o644),
        ("a4095", 4095, 0o644),
        ("a4096", 4096, 0o640),
        ("a4097", 4097, 0o644),
        ("odd65537", 65537, 0o664),
        ("big1", 3 * 512 * 1024 + 7, 0o644),
        ("dir1/big2", 3 * 1024 * 1024 + 123, 0o600),
        ("script.sh", 300, 0o755),
        ("ro.txt", 100, 0o444),
        ("secret", 1000, 0o600),
        ("name with space", 10, 0o644),
        ("ünïcødé", 20, 0o644),
        ("dir1/sub/deeper/file", 5000, 0o644),
        ("dir2/x", 131072, 0o644),
        ("dir4/setgid-child", 33, 0o2755),
    ];
    for (i, (name, len, mode)) in files.iter().enumerate() {
        let p = root.join(name);
        fs::write(&p, pattern(i as u64 + 1, *len)).unwrap();
        set_mtime(&p, 1_500_000_000 + i as u64 * 1000);
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
    }
    // A foreign owner makes `cp -a` chown; only root may (the ext4 self-test runs without).
    // SAFETY: plain syscalls; the path was just created and outlives the call.
    if unsafe { libc::geteuid() } == 0 {
        let c = std::ffi::CString::new(root.join("secret").as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::chown(c.as_ptr(), 1000, 1000) }, 0, "chown secret");
    }
    fs::hard_link(root.join("a4097"), root.join("hard_a")).unwrap();
    fs::hard_link(root.join("a4097"), root.join("dir2/hard_b")).unwrap();
    symlink("one", root.join("sym_rel")).unwrap();
    symlink("../../a4096", root.join("dir1/sub/sym_up")).unwrap();
    symlink("dir1", root.join("sym_dir")).unwrap();
    symlink("does/not/exist", root.join("dangling")).unwrap();
    fs::set_permissions(root.join("dir2"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(root.join("dir4"), fs::Permissions::from_mode(0o2775)).unwrap();
    fs::set_permissions(root.join("dir3/empty-dir"), fs::Permissions::from_mode(0o1777)).unwrap();
}

/// A normalised listing of `dir/sub`: relative path, type, mode, owner, link
/// count (not for dirs), size (not for dirs), link target, mtime, sha256, and
/// for hard links the first path of the same file instead of an inode number.
fn manifest(dir: &Path, sub: &str) -> String {
    let listing = Cmd::new("find")
        .arg(sub)
        .args(["-printf", "%i\\t%p\\t%y\\t%m\\t%U:%G\\t%n\\t%s\\t%l\\t%T@\\n"])
        .cwd(dir)
        .env("LC_ALL", "C")
        .ok();
    let sums = sh(&format!("find '{sub}' -type f -print0 | xargs -0 -r sha256sum --"), dir).ok();
    let mut hash: HashMap<&str, &str> = HashMap::new();
    for line in sums.lines() {
        if let Some((h, p)) = line.split_once("  ") {
            hash.insert(p, h);
        }
    }
    let mut rows: Vec<Vec<&str>> = listing.lines().map(|l| l.split('\t').collect()).collect();
    rows.sort_by(|a, b| a[1].cmp(b[1]));
    let mut first_of_inode: HashMap<&str, &str> = HashMap::new();
    let mut lines = Vec::new();
    for r in &rows {
        assert_eq!(r.len(), 9, "find -printf row: {r:?}");
        let (ino, path, ty, mode, owner, nlink, size, target, mtime) =
            (r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]);
        let first = *first_of_inode.entry(ino).or_insert(path);
        let same = if first != path { format!(" same-file-as={first}") } else { String::new() };
        // The top directory was made by the scenario itself, at a time of its own.
        let mtime = if path == sub { "(made by the scenario)" } else { mtime };
        let line = if ty == "d" {
            format!("{path} d mode={mode} owner={owner} mtime={mtime}{same}")
        } else {
            let sha = hash.get(path).copied().unwrap_or("-");
            format!("{path} {ty} mode={mode} owner={owner} nlink={nlink} size={size} target={target} mtime={mtime} sha256={sha}{same}")
        };
        lines.push(line);
    }
    lines.join("\n") + "\n"
}

fn cp_tree(s: &Side) -> String {
    let cp = s.script("step cp -a \"$SRC/tree\" tree");
    format!("{cp}{}", manifest(&s.dir, "tree"))
}

/// `cp -a` of the generated tree, then the full manifest.
fn scenario_cp_a(s: &Side) -> String {
    cp_tree(s)
}

/// tar out of the mount and diff against the source; tar into the mount and compare.
fn scenario_tar(s: &Side) -> String {
    let mut t = cp_tree(s);
    t += &s.script(
        "step tar -cf \"$OUT/out.tar\" tree\n\
         mkdir -p \"$OUT/x\"\n\
         step tar -C \"$OUT/x\" -xf \"$OUT/out.tar\"\n\
         step diff -r --no-dereference \"$SRC/tree\" \"$OUT/x/tree\"\n\
         step tar -C \"$SRC\" -cf \"$OUT/src.tar\" tree\n\
         mkdir untar\n\
         step tar -C untar -xf \"$OUT/src.tar\"\n\
         step diff -r --no-dereference \"$SRC/tree\" untar/tree\n",
    );
    t += "--- extracted from the tar made on this side ---\n";
    t += &manifest(&s.out.join("x"), "tree");
    t += "--- untarred onto this side ---\n";
    t += &manifest(&s.dir, "untar");
    t
}

/// find, sorted, with a few predicates that read types, sizes, modes and mtimes.
fn scenario_find(s: &Side) -> String {
    let mut t = cp_tree(s);
    t += &s.script(
        "step sh -c 'find tree | sort'\n\
         step sh -c 'find tree -type f -size +4k | sort'\n\
         step sh -c 'find tree -type l -printf \"%p -> %l\\n\" | sort'\n\
         step sh -c 'find tree -type f -perm -u+x | sort'\n\
         step sh -c 'find tree -newer tree/a4095 ! -type d | sort'\n\
         step sh -c 'find tree -empty | sort'\n\
         step sh -c 'find -L tree -type f | sort'\n\
         step sh -c 'find tree -maxdepth 1 -type d | sort'\n",
    );
    t
}

/// du apparent sizes of every non-directory (directory sizes legitimately differ).
fn scenario_du(s: &Side) -> String {
    let mut t = cp_tree(s);
    t += &s.script(
        "step sh -c 'find tree ! -type d -print0 | xargs -0 du -ab -l -- | sort -k2'\n\
         step sh -c 'find tree -type f -print0 | xargs -0 du --apparent-size -b -c -l -- | tail -1'\n",
    );
    t
}

/// ln, ln -s, mv across directories (files, dirs, over existing files), rm -r.
fn scenario_links_mv_rm(s: &Side) -> String {
    s.script(
        "step mkdir -p a/b c d\n\
         step sh -c 'echo hello > a/f'\n\
         step ln a/f c/hard\n\
         step ln a/f a/b/hard2\n\
         step stat -c '%n %h %s %F' a/f c/hard a/b/hard2\n\
         step ln -s ../a/f c/sym\n\
         step ln -s a dirlink\n\
         step cat c/sym dirlink/f\n\
         step readlink c/sym dirlink\n\
         step ln a/f c/hard\n\
         step ln -s x c/sym\n\
         step ln a c/dirhard\n\
         step mv a/f c/moved\n\
         step cat c/sym\n\
         step stat -c '%n %h %s %F' c/moved c/hard a/b/hard2\n\
         step sh -c 'echo other > d/target'\n\
         step mv c/moved d/target\n\
         step cat d/target\n\
         step stat -c '%n %h' d/target c/hard\n\
         step mv a c/\n\
         step ls -1A . c c/a c/a/b\n\
         step mv c/a/b d/b2\n\
         step mkdir e\n\
         step mv -T d e\n\
         step ls -1A . e e/b2\n\
         step mkdir f && touch f/x\n\
         step mv -T e f\n\
         step mv c c/a/inside\n\
         step rm c/hard\n\
         step stat -c '%n %h' e/target e/b2/hard2\n\
         step rm -r c\n\
         step rm -r e/b2\n\
         step rmdir f\n\
         step rm -rf f e dirlink\n\
         step ls -1A .\n",
    )
}

/// chmod (incl. setuid/setgid/sticky), chown as root, touch -d with nanoseconds.
fn scenario_chmod_chown_touch(s: &Side) -> String {
    s.script(
        "step sh -c 'echo data > f; mkdir d; ln -s f l; echo x > g'\n\
         step chmod 751 f\n\
         step chmod 1777 d\n\
         step stat -c '%n %a %A %u:%g' f d\n\
         step chmod u+s,g+s f\n\
         step stat -c '%n %a %A' f\n\
         step chown 1234:5678 f d\n\
         step stat -c '%n %a %u:%g' f d\n\
         step chown -h 1234:5678 l\n\
         step stat -c '%n %u:%g %N' l f\n\
         step chown :42 g\n\
         step chown 7 g\n\
         step stat -c '%n %u:%g' g\n\
         step chmod 000 g\n\
         step cat g\n\
         step chmod a+rwx,o-w g\n\
         step stat -c '%n %a' g\n\
         step touch -d '2020-01-02 03:04:05.123456789' f d\n\
         step touch -h -d '2019-05-06 07:08:09.987654321' l\n\
         step stat -c '%n %y %x' f d l\n\
         step touch -m -d '2001-02-03 04:05:06.5' g\n\
         step touch -a -d '1999-12-31 23:59:59.999999999' g\n\
         step stat -c '%n %y %x' g\n\
         step touch -d '1960-06-07 08:09:10.25' g\n\
         step stat -c '%n %y %x' g\n\
         step touch -d '@0' f\n\
         step stat -c '%n %y %x' f\n\
         step touch -r g d\n\
         step stat -c '%n %y %x' d\n",
    )
}

/// truncate up and down: sizes and contents (zero fill, no stale data).
fn scenario_truncate(s: &Side) -> String {
    s.script(
        "step sh -c 'head -c 10000 \"$SRC/tree/big1\" > f'\n\
         step truncate -s 5000 f\n\
         step stat -c '%n %s' f\n\
         step sha256sum f\n\
         step truncate -s 20000 f\n\
         step stat -c '%n %s' f\n\
         step sha256sum f\n\
         step sh -c 'od -An -tx1 -j 4990 -N 20 f'\n\
         step truncate -s 4097 f\n\
         step truncate -s 1M f\n\
         step sha256sum f\n\
         step truncate -s +100 f\n\
         step truncate -s -1 f\n\
         step stat -c '%n %s' f\n\
         step truncate -s 0 f\n\
         step stat -c '%n %s' f\n\
         step sh -c 'printf abc >> f; truncate -s 2 f; printf Z >> f; od -An -c f'\n\
         step truncate -s 10 nonexistent-dir/x\n\
         step truncate -c -s 10 new-not-created\n\
         step truncate -s 7 created\n\
         step stat -c '%n %s' created\n\
         step ls -1\n",
    )
}

const SEEK_PY: &str = r#"
import errno, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
M = 1 << 20
offsets = [0, 4095, 4096, M - 1, M, M + 4095, M + 4096, 1000 * 4096 - 1, 1000 * 4096, 1001 * 4096 + 1,
           1002 * 4096, 5 * M, 2559 * 4096 - 1, 2559 * 4096, size - 1, size, size + 1]
for off in offsets:
    row = []
    for name, whence in (("DATA", os.SEEK_DATA), ("HOLE", os.SEEK_HOLE)):
        try:
            row.append("%s=%d" % (name, os.lseek(fd, off, whence)))
        except OSError as e:
            row.append("%s=%s" % (name, errno.errorcode[e.errno]))
    print(off, " ".join(row))
"#;

/// A sparse file: 4 KiB-aligned data islands in a 10 MiB file, then a punched
/// hole; SEEK_DATA/SEEK_HOLE positions, sizes, block counts and contents.
fn scenario_sparse_seek(s: &Side) -> String {
    let py = s.out.join("seek.py");
    fs::write(&py, SEEK_PY).unwrap();
    s.script(
        "step truncate -s 10M f\n\
         step dd if=\"$SRC/tree/dir2/x\" of=f bs=4k seek=256 count=1 conv=notrunc status=none\n\
         step dd if=\"$SRC/tree/dir2/x\" of=f bs=4k seek=1000 count=2 conv=notrunc status=none\n\
         step dd if=\"$SRC/tree/dir2/x\" of=f bs=4k seek=2559 count=1 conv=notrunc status=none\n\
         step sync f\n\
         step stat -c '%n size=%s blocks=%b' f\n\
         step du -b f\n\
         step sha256sum f\n\
         step python3 \"$OUT/seek.py\" f\n\
         step fallocate -p -o 4096000 -l 4096 f\n\
         step sync f\n\
         step stat -c '%n size=%s blocks=%b' f\n\
         step python3 \"$OUT/seek.py\" f\n\
         step sha256sum f\n\
         step truncate -s 0 empty\n\
         step python3 \"$OUT/seek.py\" empty\n",
    )
}

/// user xattrs: set, get, list, remove, empty and binary values, missing names, symlinks.
fn scenario_xattr(s: &Side) -> String {
    let long = "v".repeat(3000);
    s.script(&format!(
        "getd() {{ getfattr -d \"$@\" 2>&1 | cut -c1-80 | sort; }}\n\
         step sh -c 'echo hi > f; mkdir d; ln -s f l'\n\
         step setfattr -n user.x -v val f\n\
         step setfattr -n user.empty f\n\
         step setfattr -n user.bin -v 0x00ff10 f\n\
         step setfattr -n user.long -v {long} f\n\
         step setfattr -n user.d -v dirval d\n\
         step getd f\n\
         step getd d\n\
         step getfattr -n user.x --only-values f\n\
         step getfattr -n user.missing f\n\
         step getfattr -e hex -n user.bin f\n\
         step setfattr -n user.x -v newval f\n\
         step getfattr -n user.x f\n\
         step setfattr -x user.x f\n\
         step setfattr -x user.x f\n\
         step getd f\n\
         step setfattr -h -n user.x -v v l\n\
         step getfattr -n user.d l\n\
         step getfattr -h -d l\n\
         step sh -c 'cp --preserve=xattr f g && getfattr -d g | sort'\n\
         step sh -c 'mv f h && getfattr -d h | sort'\n"
    ))
}

/// flock: a held exclusive lock makes `flock -n` fail; shared locks coexist.
fn scenario_flock(s: &Side) -> String {
    let mut t = String::new();
    Cmd::new("touch").arg("lockf").cwd(&s.dir).ok();
    // Only external, time-limited steps touch the mount (a hung mount fails the test).
    let exists =
        |name: &str| Cmd::new("test").args(["-e", name]).cwd(&s.dir).timeout(Duration::from_secs(10)).run().ok();
    let try_lock = |mode: &str| -> i32 {
        Cmd::new("flock").args([mode, "-n", "lockf", "-c", "true"]).cwd(&s.dir).run().code().unwrap_or(-1)
    };
    for (holder_mode, label) in [("-x", "exclusive"), ("-s", "shared")] {
        Cmd::new("rm").args(["-f", "held", "release"]).cwd(&s.dir).ok();
        // The holder keeps the lock until told to let go (at most 60 s), so a
        // slow machine cannot make the lock expire before the probes run.
        let hold = "touch held; for i in $(seq 600); do [ -e release ] && exit 0; sleep 0.1; done; exit 3";
        let mut holder = Background::spawn("flock", &[holder_mode, "lockf", "-c", hold], &s.dir);
        let held = common::wait_until(Duration::from_secs(20), || exists("held"));
        assert!(held, "{}: the flock holder never got the {label} lock", s.name);
        let ex = try_lock("-x");
        let sh_ = try_lock("-s");
        t += &format!("while {label} held: flock -x -n rc={ex}, flock -s -n rc={sh_}\n");
        Cmd::new("touch").arg("release").cwd(&s.dir).ok();
        let status = holder.wait(Duration::from_secs(30));
        assert!(status.is_some(), "{}: flock holder did not finish", s.name);
        t += &format!("holder exit: {:?}\n", status.and_then(|s| s.code()));
        t += &format!("after release: flock -x -n rc={}\n", try_lock("-x"));
    }
    let expected = "while exclusive held: flock -x -n rc=1, flock -s -n rc=1\nholder exit: Some(0)\nafter release: flock -x -n rc=0\n\
                    while shared held: flock -x -n rc=1, flock -s -n rc=0\nholder exit: Some(0)\nafter release: flock -x -n rc=0\n";
    assert_eq!(t, expected, "{}: flock semantics", s.name);
    t
}

/// git init/add/commit/log/gc/fsck with fixed identities and dates (so hashes match).
fn scenario_git(s: &Side) -> String {
    let home = s.out.join("home");
    fs::create_dir_all(&home).unwrap();
    let script = "step git init -q -b main repo\n\
         cd repo\n\
         cp -a \"$SRC/tree/.\" .\n\
         step git add -A\n\
         step git commit -q -m first\n\
         step sh -c 'echo change >> one; rm a4095; mkdir newdir; echo n > newdir/n'\n\
         step git add -A\n\
         step git commit -q -m second\n\
         step git log --format='%H %an <%ae> %ad %s' --date=iso\n\
         step git status --porcelain\n\
         step git ls-files -s\n\
         step git gc -q\n\
         step git fsck --full --no-progress\n\
         step git checkout -q HEAD~1\n\
         step git status --porcelain\n\
         step sha256sum one a4095\n\
         step git checkout -q main\n\
         step git rev-parse HEAD HEAD^{tree}\n";
    let full = format!(
        "export LC_ALL=C TZ=UTC\nstep() {{ printf '$ %s\\n' \"$*\"; \"$@\" 2>&1; printf '[rc=%d]\\n' $?; }}\n{script}"
    );
    let h = home.display().to_string();
    let out = sh(&full, &s.dir)
        .env("SRC", &s.src.display().to_string())
        .env("HOME", &h)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Efuse Test")
        .env("GIT_AUTHOR_EMAIL", "test@efuse.invalid")
        .env("GIT_COMMITTER_NAME", "Efuse Test")
        .env("GIT_COMMITTER_EMAIL", "test@efuse.invalid")
        .env("GIT_AUTHOR_DATE", "2020-01-02T03:04:05Z")
        .env("GIT_COMMITTER_DATE", "2020-01-02T03:04:05Z")
        .run();
    s.normalise(&format!("{}{}[script rc={}]\n", out.stdout, out.stderr, out.status.code().unwrap_or(-1)))
}

/// sqlite3: create, bulk insert, update/delete, vacuum, WAL mode; query results and integrity.
fn scenario_sqlite(s: &Side) -> String {
    s.script(
        "step sqlite3 db \"create table t(a integer primary key, b text); \
            with recursive c(x) as (select 1 union all select x+1 from c where x<20000) \
            insert into t select x, printf('row%08d', x*7919 % 100003) from c; \
            create index tb on t(b); \
            select count(*), sum(a), min(b), max(b) from t; pragma integrity_check;\"\n\
         step sqlite3 db \"update t set b = b||'x' where a%3=0; delete from t where a%7=0; vacuum; \
            select count(*), sum(length(b)), sum(a) from t; pragma integrity_check;\"\n\
         step sqlite3 db \"pragma journal_mode=wal; begin; insert into t(b) select b||'w' from t where a<500; commit; \
            select count(*), max(a) from t; pragma integrity_check; pragma wal_checkpoint(truncate);\"\n\
         step sqlite3 db \"select count(*), sum(a), max(b) from t where b like '%w'; pragma quick_check;\"\n",
    )
}

macro_rules! scenarios {
    ($($name:ident: $tools:expr, $f:ident;)*) => {
        mod memfs {
            use super::*;
            $( #[test] fn $name() { compare(concat!("memfs::", stringify!($name)), Fs::Memfs, $tools, $f) } )*
        }
        mod stackfs {
            use super::*;
            $( #[test] fn $name() { compare(concat!("stackfs::", stringify!($name)), Fs::Stackfs, $tools, $f) } )*
        }
        /// The harness itself: every scenario on two plain ext4 directories must
        /// give identical transcripts (no root or FUSE needed), so a difference
        /// on a mount is the file system's, not the scenario's.
        #[test]
        fn harness_self_test_ext4_vs_ext4() {
            let test = "harness_self_test_ext4_vs_ext4";
            $(
                if require_tools(test, $tools) {
                    let root = common::TempDir::new(concat!("selftest-", stringify!($name)));
                    let (a, b) = (root.path().join("a"), root.path().join("b"));
                    fs::create_dir_all(&a).unwrap();
                    fs::create_dir_all(&b).unwrap();
                    let t = transcripts(&root.path().join("scratch"), [("ext4-a", a), ("ext4-b", b)], $f);
                    assert_same(stringify!($name), "ext4-a", &t[0], &t[1]);
                }
            )*
        }
    };
}

scenarios! {
    cp_a_tree_manifest: &[], scenario_cp_a;
    tar_out_and_in_roundtrip: &["tar", "diff"], scenario_tar;
    find_sorted_predicates: &[], scenario_find;
    du_apparent_sizes_of_files: &[], scenario_du;
    ln_symlink_mv_rm: &[], scenario_links_mv_rm;
    chmod_chown_touch_times: &[], scenario_chmod_chown_touch;
    truncate_up_and_down: &[], scenario_truncate;
    sparse_file_seek_hole_data: &["python3", "fallocate"], scenario_sparse_seek;
    xattr_set_get_remove: &["setfattr", "getfattr"], scenario_xattr;
    flock_exclusive_and_shared: &["flock"], scenario_flock;
    git_init_commit_log_gc: &["git"], scenario_git;
    sqlite3_create_query_wal: &["sqlite3"], scenario_sqlite;
}

/// After a workload, `efuse stats --json` is valid JSON with the documented
/// shape: LOOKUP was counted and requests_total is the sum of opcode counts.
fn stats_after_workload(test: &str, fs_kind: Fs) {
    if !require_fuse(test) {
        return;
    }
    let spec = common::MountSpec::default().arg("--threads").arg("2");
    let m = Mounted::with(fs_kind, test, spec, |_| {});
    sh("mkdir -p a/b && for i in 1 2 3 4 5; do echo $i > a/b/f$i; done && cat a/b/f3 && ls -lR >/dev/null && stat a/b/f1 >/dev/null && rm a/b/f2", &m.mnt).ok();
    let mut last = String::new();
    for _ in 0..3 {
        let v = m.stats();
        assert_eq!(v["threads"].as_u64(), Some(2), "stats threads after --threads 2: {v}");
        assert!(matches!(v["transport"].as_str(), Some("dev" | "uring")), "stats transport: {v}");
        assert!(v["paths"].is_object(), "stats paths object: {v}");
        let opcodes = v["opcodes"].as_object().unwrap_or_else(|| panic!("stats opcodes is not an object: {v}"));
        let lookup = opcodes.get("LOOKUP").and_then(|o| o["count"].as_u64()).unwrap_or(0);
        assert!(lookup > 0, "LOOKUP count is 0 after a workload that looks names up: {v}");
        let mut per_op: BTreeMap<&str, u64> = BTreeMap::new();
        for (name, o) in opcodes {
            let count = o["count"].as_u64().unwrap_or_else(|| panic!("opcode {name} has no numeric count: {v}"));
            let errors = o["errors"].as_u64().unwrap_or_else(|| panic!("opcode {name} has no numeric errors: {v}"));
            assert!(errors <= count, "opcode {name}: errors {errors} > count {count}");
            per_op.insert(name, count);
        }
        // With passthrough the kernel writes to the backing file itself: no WRITE.
        let passthrough = v["paths"]["passthrough"].as_u64().unwrap_or(0) > 0;
        let expected: &[&str] = if passthrough { &["MKDIR", "UNLINK"] } else { &["MKDIR", "WRITE", "UNLINK"] };
        for op in expected {
            assert!(per_op.get(op).copied().unwrap_or(0) > 0, "{op} count is 0 after a workload that does it: {v}");
        }
        let total = v["requests_total"].as_u64().unwrap_or_else(|| panic!("requests_total is not a number: {v}"));
        // Requests the daemon could not decode have no opcode; count them if reported.
        let sum: u64 = per_op.values().sum::<u64>() + v["undecodable"].as_u64().unwrap_or(0);
        if total == sum {
            return;
        }
        // Counters are independent relaxed atomics: a request the kernel sends while
        // the daemon serialises (a late FORGET) may split one snapshot. Retry a few times.
        last = format!("requests_total {total} != sum of opcode counts {sum}: {v}");
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!("{last}");
}

#[test]
fn memfs_stats_json_after_workload() {
    stats_after_workload("memfs_stats_json_after_workload", Fs::Memfs);
}

#[test]
fn stackfs_stats_json_after_workload() {
    stats_after_workload("stackfs_stats_json_after_workload", Fs::Stackfs);
}

/// `-o ro`: the backing tree reads through, every kind of write fails with EROFS.
#[test]
fn stackfs_read_only_mount_rejects_writes() {
    let test = "stackfs_read_only_mount_rejects_writes";
    if !require_fuse(test) {
        return;
    }
    let spec = common::MountSpec::default().arg("-o").arg("ro");
    let m = Mounted::with(Fs::Stackfs, test, spec, |b| {
        fs::write(b.join("f"), b"read me\n").unwrap();
        fs::create_dir(b.join("d")).unwrap();
    });
    let out = sh(
        "step() { printf '$ %s\\n' \"$*\"; \"$@\" 2>&1; printf '[rc=%d]\\n' $?; }\n\
         step cat f\n\
         step touch new\n\
         step truncate -s 1 f\n\
         step mkdir d2\n\
         step rm f\n\
         step chmod 600 f\n\
         step touch f\n\
         step mv f g\n\
         step ls\n",
        &m.mnt,
    )
    .env("LC_ALL", "C")
    .ok();
    let expected = "$ cat f\nread me\n[rc=0]\n\
        $ touch new\ntouch: cannot touch 'new': Read-only file system\n[rc=1]\n\
        $ truncate -s 1 f\ntruncate: cannot open 'f' for writing: Read-only file system\n[rc=1]\n\
        $ mkdir d2\nmkdir: cannot create directory 'd2': Read-only file system\n[rc=1]\n\
        $ rm f\nrm: cannot remove 'f': Read-only file system\n[rc=1]\n\
        $ chmod 600 f\nchmod: changing permissions of 'f': Read-only file system\n[rc=1]\n\
        $ touch f\ntouch: cannot touch 'f': Read-only file system\n[rc=1]\n\
        $ mv f g\nmv: cannot move 'f' to 'g': Read-only file system\n[rc=1]\n\
        $ ls\nd\nf\n[rc=0]\n";
    assert_same(test, "stackfs -o ro", &out, expected);
    let stored = fs::read(m.backing.as_ref().unwrap().join("f")).unwrap();
    assert_eq!(stored, b"read me\n", "the backing file changed under a read-only mount");
}

//! Programs under `efuse run` doing what the bypass client library must get
//! right beyond plain reads and writes: fork with a shared offset, exec of a
//! program that inherits a served descriptor, dup2 onto 0/1/2, mmap, fcntl
//! and flock locks seen by a second process, threads on one descriptor,
//! O_APPEND from two processes, holes (SEEK_DATA/SEEK_HOLE), large and
//! unaligned I/O, and signal handlers that read a served file while reads
//! are interrupted. Each script runs under `efuse run` on memfs or stackfs
//! and on ext4; the outputs must be identical, the mount's
//! EFUSE_BYPASS_LOG must show served opens (and the conversions the case
//! needs), the ext4 side's none.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::{assert_same, efuse_bin, require_fuse, require_tools, Cmd, Fs, Mounted};

const FORK: &str = r#"
import os
fd = os.open("f", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
os.write(fd, b"".join(b"%04d" % i for i in range(1000)))
os.lseek(fd, 0, os.SEEK_SET)
r1, w1 = os.pipe()
r2, w2 = os.pipe()
pid = os.fork()
if pid == 0:
    for i in range(20):
        os.read(r1, 1)
        os.read(fd, 8)
        os.write(fd, b"C%03d" % i)
        os.write(w2, b"x")
    os._exit(0)
seen = []
for i in range(20):
    seen.append(os.read(fd, 8))
    os.write(fd, b"P%03d" % i)
    os.write(w1, b"x")
    os.read(r2, 1)
    seen.append(os.lseek(fd, 0, os.SEEK_CUR))
_, st = os.waitpid(pid, 0)
print("child", st)
print(seen)
print(os.pread(fd, 480, 0))
print(os.fstat(fd).st_size)
"#;

const EXEC: &str = r#"
import os, subprocess, fcntl
fd = os.open("f", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
os.write(fd, b"line1\nline2\nline3\n")
os.lseek(fd, 6, os.SEEK_SET)
# F_SETFD, not os.set_inheritable (an ioctl, which converts at once).
fcntl.fcntl(fd, fcntl.F_SETFD, 0)
pid = os.fork()
if pid == 0:
    os.execv("/bin/sh", ["sh", "-c", "head -c 6 <&%d; cat <&%d" % (fd, fd)])
_, st = os.waitpid(pid, 0)
print("child", st)
os.lseek(fd, 0, os.SEEK_SET)
out = subprocess.run(["cat"], stdin=fd, capture_output=True).stdout
print("cat from a served stdin", out)
"#;

const DUP2: &str = r#"
set -e
printf 'one\ntwo\nthree\n' > in
exec 3<&0
exec 0<in
read -r a
echo "read $a"
cat
exec 0<&3
exec 4>&1
exec 1>out
echo hello
printf 'x%s\n' y
exec 1>&4
cat out
exec 5>&2
exec 2>err
echo to-err >&2
exec 2>&5
cat err
sh -c 'exec 0<in; head -n 1; cat'
"#;

const MMAP: &str = r#"
import os, mmap
fd = os.open("m", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
os.write(fd, bytes(range(256)) * 64)
m = mmap.mmap(fd, 16384)
print(m[100:110].hex(), m[16380:16384].hex())
m[0:5] = b"HELLO"
m[8190:8194] = b"MIDL"
m.flush()
m.close()
os.lseek(fd, 0, os.SEEK_SET)
print(os.read(fd, 8), os.pread(fd, 6, 8189))
os.close(fd)
with open("m", "rb") as f:
    print(f.read(5), len(f.read()))
"#;

const LOCKS: &str = r#"
import os, fcntl, subprocess, sys
probe = '''
import os, fcntl
for name, lock in (("l", fcntl.lockf), ("l2", fcntl.flock)):
    fd = os.open(name, os.O_RDWR)
    try:
        lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        print(name, "locked")
    except OSError as e:
        print(name, "busy", e.errno in (11, 13))
    os.close(fd)
'''
fd = os.open("l", os.O_RDWR | os.O_CREAT, 0o644)
os.write(fd, b"data")
fcntl.lockf(fd, fcntl.LOCK_EX)
fd2 = os.open("l2", os.O_RDWR | os.O_CREAT, 0o644)
os.write(fd2, b"data")
fcntl.flock(fd2, fcntl.LOCK_EX)
print("held:")
print(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout, end="")
print("reads while locked", os.pread(fd, 4, 0), os.pread(fd2, 4, 0))
fcntl.lockf(fd, fcntl.LOCK_UN)
fcntl.flock(fd2, fcntl.LOCK_UN)
print("released:")
print(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout, end="")
"#;

const THREADS: &str = r#"
import os, threading, collections
fd = os.open("t", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
N, R = 4, 400
def writer(t):
    for i in range(R):
        rec = (b"T%d-%05d-" % (t, i)).ljust(63, b".") + b"\n"
        assert os.write(fd, rec) == 64
ts = [threading.Thread(target=writer, args=(t,)) for t in range(N)]
[t.start() for t in ts]
[t.join() for t in ts]
print("size", os.fstat(fd).st_size, "offset", os.lseek(fd, 0, os.SEEK_CUR))
data = os.pread(fd, N * R * 64, 0)
recs = [data[i:i + 64] for i in range(0, len(data), 64)]
good = [r for r in recs if r.startswith(b"T") and r.endswith(b".\n")]
print("records", len(recs), "whole", len(good), sorted(collections.Counter(r[:2] for r in good).items()))
for t in range(N):
    mine = [int(r[3:8]) for r in good if r[:2] == b"T%d" % t]
    assert mine == sorted(mine) == list(range(R)), t
os.lseek(fd, 0, os.SEEK_SET)
got = []
lock = threading.Lock()
def reader():
    while True:
        b = os.read(fd, 64)
        if not b:
            return
        with lock:
            got.append(b)
ts = [threading.Thread(target=reader) for _ in range(N)]
[t.start() for t in ts]
[t.join() for t in ts]
print("read back", len(got), sorted(got) == sorted(recs))
"#;

const APPEND: &str = r#"
import os, subprocess, sys
code = '''
import os, sys
fd = os.open("a", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
for i in range(300):
    os.write(fd, (b"%s-%04d" % (sys.argv[1].encode(), i)).ljust(31, b" ") + b"\\n")
'''
ps = [subprocess.Popen([sys.executable, "-c", code, n]) for n in ("A", "B")]
print([p.wait() for p in ps])
data = open("a", "rb").read()
recs = data.split(b"\n")[:-1]
print(len(data), len(recs), sorted(set(len(r) for r in recs)), sum(r.startswith(b"A") for r in recs))
for n in (b"A", b"B"):
    mine = [int(r[2:6]) for r in recs if r.startswith(n)]
    print(n, mine == list(range(300)))
"#;

const HOLES: &str = r#"
import os, errno
fd = os.open("s", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
os.ftruncate(fd, 10 << 20)
os.pwrite(fd, b"x" * 4096, 1 << 20)
os.pwrite(fd, b"y" * 8192, 1000 * 4096)
os.fsync(fd)
for off in (0, 4096, (1 << 20) - 1, 1 << 20, (1 << 20) + 4096, 1000 * 4096 + 100, 1002 * 4096, (10 << 20) - 1, 10 << 20):
    row = []
    for w in (os.SEEK_DATA, os.SEEK_HOLE):
        try:
            row.append(os.lseek(fd, off, w))
        except OSError as e:
            row.append(errno.errorcode[e.errno])
    print(off, row)
print(os.pread(fd, 16, (1 << 20) - 8), os.fstat(fd).st_size)
"#;

const SIZES: &str = r#"
import os, hashlib, random
fd = os.open("big", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
sizes = [1, 4095, (1 << 20) + 1, 3 << 20, 4097, 1]
spots = []
off = 3
for i, n in enumerate(sizes):
    b = random.Random(i).randbytes(n)
    assert os.pwrite(fd, b, off) == n
    spots.append((off, n, hashlib.sha256(b).hexdigest()))
    off += n + 4093
for off, n, h in spots:
    got = os.pread(fd, n, off)
    print(off, n, len(got), hashlib.sha256(got).hexdigest() == h)
os.lseek(fd, 0, os.SEEK_SET)
whole = hashlib.sha256()
chunks = 0
while True:
    b = os.read(fd, (1 << 20) + 1)
    if not b:
        break
    whole.update(b)
    chunks += 1
print("size", os.fstat(fd).st_size, "chunks", chunks, whole.hexdigest())
a, b = bytearray(4095), bytearray((1 << 20) + 1)
print("readv", os.preadv(fd, [a, b], 1), hashlib.sha256(a + b).hexdigest())
print("writev", os.pwritev(fd, [b"q" * 4095, b"r" * 3], 7), os.pread(fd, 8, 4100))
"#;

const SIGNALS: &str = r#"
import os, signal, hashlib
fd = os.open("sig", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
os.write(fd, bytes(range(256)) * 4096)
other = os.open("sig2", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
os.write(other, b"handler-data")
hits = [0, 0]
def handler(sig, frame):
    hits[0] += 1
    if os.pread(other, 12, 0) != b"handler-data":
        hits[1] += 1
    with open("sig2", "rb") as f:
        if f.read() != b"handler-data":
            hits[1] += 1
signal.signal(signal.SIGALRM, handler)
signal.setitimer(signal.ITIMER_REAL, 0.0007, 0.0007)
total = 0
h = hashlib.sha256()
for _ in range(40):
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        b = os.read(fd, 65536)
        if not b:
            break
        total += len(b)
        h.update(b)
signal.setitimer(signal.ITIMER_REAL, 0)
print(total, h.hexdigest(), "bad reads in the handler", hits[1], "handler ran", hits[0] > 0)
"#;

/// Kept handles (the library keeps a read-only handle after its last close
/// and reuses it for the next open of the unchanged file): repeated opens,
/// a change in between, two opens at once, a forked child closing the
/// descriptor last, the program closing or dup2-ing onto every number
/// (the kept descriptors among them), and an exec.
const KEPT: &str = r#"
import os, sys
with open("k", "w") as f:
    f.write("first version\n")
def whole(p):
    fd = os.open(p, os.O_RDONLY)
    st = os.fstat(fd)
    b = os.read(fd, 65536)
    os.close(fd)
    return st.st_size, b
def thrice(what):
    print(what, [whole("k") for _ in range(3)])
for i in range(50):
    assert whole("k") == (14, b"first version\n"), i
with open("k", "a") as f:
    f.write("more\n")
thrice("appended here")
os.truncate("k", 5)
thrice("truncated here")
os.system("printf other > k")
thrice("rewritten by a child")
os.system("EFUSE_BYPASS=off sh -c 'printf kernel >> k'")
thrice("appended through the kernel")
a = os.open("k", os.O_RDONLY)
b = os.open("k", os.O_RDONLY)
print(os.read(a, 2), os.read(b, 100), os.read(a, 100))
os.close(a)
os.close(b)
fd = os.open("k", os.O_RDONLY)
pid = os.fork()
if pid == 0:
    print("child", os.read(fd, 3), whole("k"), flush=True)
    os.close(fd)
    os._exit(0)
os.close(fd)
os.waitpid(pid, 0)
for i in range(20):
    whole("k")
print("parent", whole("k"))
os.closerange(3, 65536)
print("after closerange", whole("k"), whole("k"))
whole("k")
for n in range(3, 1024):
    try:
        os.dup2(2, n)
        os.close(n)
    except OSError:
        pass
print("after dup2 everywhere", whole("k"), whole("k"))
sys.stdout.flush()
os.system("cat k; echo")
with open("k", "w") as f:
    f.write("rewritten")
print("rewritten", whole("k"))
"#;

/// Read-only opens, which stackfs serves as direct reads (from the backing
/// file, no request): offsets, dups, fork, changes made meanwhile through
/// other descriptors, rename and unlink while open, the uses that convert
/// (mmap, flock, fchmod), a file opened once and again, symbolic links on
/// the way, exec inheriting one.
const DIRECT: &str = r#"
import os, fcntl, mmap, subprocess
def w(name, data):
    with open(name, "wb") as f:
        f.write(data)
w("a", b"".join(b"%05d\n" % i for i in range(4000)))
os.stat("a")
fd = os.open("a", os.O_RDONLY)
print(os.read(fd, 10), os.pread(fd, 6, 23994), os.lseek(fd, 0, os.SEEK_END), os.lseek(fd, -6, os.SEEK_CUR))
print(os.read(fd, 100), os.read(fd, 100), os.fstat(fd).st_size)
print(os.lseek(fd, 0, os.SEEK_DATA), os.lseek(fd, 0, os.SEEK_HOLE))
wfd = os.open("a", os.O_WRONLY)
os.pwrite(wfd, b"XXXXX", 0)
print(os.pread(fd, 10, 0), os.fstat(fd).st_size)
os.ftruncate(wfd, 100)
print(os.fstat(fd).st_size, os.lseek(fd, 0, os.SEEK_END), os.pread(fd, 200, 90))
os.close(wfd)
with open("a", "ab") as f:
    f.write(b"appended")
print(os.fstat(fd).st_size, os.pread(fd, 50, 95))
os.lseek(fd, 0, os.SEEK_SET)
d = os.dup(fd)
print(os.read(d, 3), os.read(fd, 3))
pid = os.fork()
if pid == 0:
    ok = os.read(fd, 4) == b"X000"
    os.close(fd)
    os._exit(0 if ok else 1)
print("child", os.waitpid(pid, 0)[1], os.lseek(d, 0, os.SEEK_CUR), os.read(d, 4))
os.close(d)
os.rename("a", "b")
print(os.pread(fd, 5, 0))
w("c", b"new file c")
os.stat("c")
os.rename("c", "b")
print(os.pread(fd, 5, 0), open("b", "rb").read())
os.unlink("b")
print(os.pread(fd, 5, 0), os.fstat(fd).st_nlink, os.fstat(fd).st_size)
os.close(fd)
w("m", bytes(range(256)) * 16)
os.stat("m")
fd = os.open("m", os.O_RDONLY)
mm = mmap.mmap(fd, 4096, prot=mmap.PROT_READ)
print(mm[250:260].hex())
mm.close()
print(os.pread(fd, 4, 4092).hex())
os.close(fd)
fd = os.open("m", os.O_RDONLY)
os.fsync(fd)
os.fdatasync(fd)
fcntl.flock(fd, fcntl.LOCK_SH)
fcntl.flock(fd, fcntl.LOCK_UN)
print(os.read(fd, 3).hex())
os.close(fd)
fd = os.open("m", os.O_RDONLY)
os.fchmod(fd, 0o600)
print(oct(os.stat("m").st_mode & 0o777), oct(os.fstat(fd).st_mode & 0o777), os.read(fd, 2).hex())
os.close(fd)
os.mkdir("t")
for i in range(50):
    w("t/f%d" % i, b"file %d\n" % i * (i + 1))
sizes = []
for rep in range(3):
    for i in range(50):
        with open("t/f%d" % i, "rb") as f:
            sizes.append(len(f.read()))
print(sum(sizes))
os.symlink("t", "lnk")
os.symlink("f3", "t/l3")
os.stat("lnk/f2")
os.stat("t/l3")
print(open("lnk/f2", "rb").read(), open("t/l3", "rb").read())
fd = os.open("t/f4", os.O_RDONLY)
fcntl.fcntl(fd, fcntl.F_SETFD, 0)
os.lseek(fd, 2, os.SEEK_SET)
print(subprocess.run(["sh", "-c", "cat <&%d" % fd], capture_output=True).stdout)
print(os.lseek(fd, 0, os.SEEK_CUR))
os.close(fd)
x = os.open("t/f5", os.O_RDONLY)
y = os.open("t/f6", os.O_RDONLY)
os.set_inheritable(y, True)
r, w = os.pipe()
pid = os.posix_spawn("/bin/sh", ["sh", "-c", "cat <&%d >&%d" % (y, w)], os.environ,
                     file_actions=[(os.POSIX_SPAWN_DUP2, x, y)])
os.close(w)
print("spawned child read", os.read(r, 1000), os.waitpid(pid, 0)[1])
print("parent's", os.pread(x, 7, 0), os.pread(y, 7, 0))
os.close(x)
os.close(y)
"#;

/// Runs `script` (python3, or bash when `bash`) under `efuse run` in the
/// mount and in the ext4 reference directory; outputs must be the same, the
/// mount's log must show served opens and every string of `want_log`.
fn compare(test: &str, fs_kind: Fs, script: &str, bash: bool, want_log: &[&str]) {
    if !require_fuse(test) || !require_tools(test, &["python3"]) {
        return;
    }
    let m = Mounted::new(fs_kind, test);
    let file = m.scratch.join(if bash { "script.sh" } else { "script.py" });
    fs::write(&file, script).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
    let mut outs = Vec::new();
    let mut logs = Vec::new();
    for (side, dir) in m.sides() {
        let log = m.scratch.join(format!("{side}.log"));
        let out = Cmd::new(efuse_bin())
            .args(["run", "--", if bash { "bash" } else { "python3" }])
            .arg(&file)
            .cwd(&dir)
            .env("EFUSE_BYPASS_LOG", &log.to_string_lossy())
            .env("EFUSE_BYPASS_AFTER", "0")
            .env("LC_ALL", "C")
            .timeout(Duration::from_secs(120))
            .run();
        let text = fs::read_to_string(&log).unwrap_or_default();
        assert!(
            out.ok(),
            "{test}: on {side}: {} exited {}\n{}{}\nlog:\n{text}",
            out.what,
            out.status,
            out.stdout,
            out.stderr
        );
        outs.push(format!("{}{}", out.stdout, out.stderr));
        logs.push(text);
    }
    assert_same(test, fs_kind.name(), &outs[0], &outs[1]);
    assert!(logs[0].contains(" -> fd "), "{test}: no open served through the bypass:\n{}", logs[0]);
    for w in want_log {
        assert!(logs[0].contains(w), "{test}: the bypass log lacks {w:?}:\n{}", logs[0]);
    }
    assert!(!logs[1].contains(" -> fd "), "{test}: something on ext4 was served:\n{}", logs[1]);
}

macro_rules! cases {
    ($($name:ident: $script:expr, $bash:expr, $log:expr;)*) => {
        mod memfs {
            use super::*;
            $( #[test] fn $name() { compare(concat!("memfs::", stringify!($name)), Fs::Memfs, $script, $bash, $log) } )*
        }
        mod stackfs {
            use super::*;
            $( #[test] fn $name() { compare(concat!("stackfs::", stringify!($name)), Fs::Stackfs, $script, $bash, $log) } )*
        }
    };
}

cases! {
    fork_shares_the_offset: FORK, false, &[];
    exec_inherits_a_served_descriptor: EXEC, false, &["converted to a kernel open for exec"];
    dup2_onto_stdin_stdout_stderr: DUP2, true, &["converted to a kernel open for dup2 onto a standard descriptor"];
    mmap_after_open: MMAP, false, &["converted to a kernel open for mmap"];
    fcntl_and_flock_locks_seen_by_another_process: LOCKS, false, &["for fcntl (locks", "for flock"];
    threads_on_one_descriptor: THREADS, false, &[];
    o_append_from_two_processes: APPEND, false, &[];
    holes_seek_data_and_hole: HOLES, false, &[];
    large_and_unaligned_io: SIZES, false, &[];
    signal_handlers_read_while_reads_are_interrupted: SIGNALS, false, &[];
    kept_handles_across_opens: KEPT, false, &["kept handle"];
}

/// Direct reads on stackfs: the log shows them, and the results are ext4's.
#[test]
fn stackfs_direct_reads() {
    compare("stackfs_direct_reads", Fs::Stackfs, DIRECT, false, &["direct)", "converted to a kernel open for mmap"]);
}

/// The same script on memfs, which offers no direct reads.
#[test]
fn memfs_read_only_opens() {
    compare("memfs_read_only_opens", Fs::Memfs, DIRECT, false, &[]);
}

/// A process that opens and reads 100 files its user's table knows makes
/// no request for them (direct reads): as many bypass requests as the
/// interpreter alone.
#[test]
fn stackfs_direct_reads_cost_no_requests() {
    let test = "stackfs_direct_reads_cost_no_requests";
    if !require_fuse(test) || !require_tools(test, &["python3"]) {
        return;
    }
    let m = Mounted::new(Fs::Stackfs, test);
    fs::create_dir(m.mnt.join("d")).expect("mkdir d");
    for i in 0..100 {
        fs::write(m.mnt.join(format!("d/f{i}")), format!("file {i}\n")).expect("write");
    }
    let run = |script: &str| -> (u64, String) {
        let before = m.bypass_requests().unwrap_or_else(|e| panic!("{test}: {e}"));
        let (out, log) = python_served(&m, script);
        (m.bypass_requests().unwrap_or_else(|e| panic!("{test}: {e}")) - before, format!("{out}{log}"))
    };
    let (_, _) = run("import os\nfor i in range(100):\n    os.stat('d/f%d' % i)\n");
    let (idle, _) = run("pass");
    let reads = "import os\nn = 0\nfor i in range(100):\n    with open('d/f%d' % i, 'rb') as f:\n        \
                 n += len(f.read())\nprint(n)\n";
    let (n, text) = run(reads);
    assert!(text.starts_with("790\n"), "{test}: read {text}");
    assert!(n <= idle, "{test}: 100 reads of known files cost {n} requests (the interpreter alone {idle}):\n{text}");
    assert_eq!(text.matches("direct)").count(), 100, "{test}: not every open was a direct read:\n{text}");
}

/// Direct reads answer as the mount does, not as the backing file system
/// would: a file whose ACL lets `nobody` read it on ext4 (the mount has no
/// ACLs: its mode bits, 0640 root:root, do not) is refused to nobody
/// through the bypass as through the kernel mount.
#[test]
fn direct_reads_keep_the_mounts_permissions() {
    let test = "direct_reads_keep_the_mounts_permissions";
    if !require_fuse(test) || !require_tools(test, &["python3"]) {
        return;
    }
    let m = Mounted::with(Fs::Stackfs, test, common::MountSpec::default().arg("-o").arg("allow_other"), |b| {
        fs::write(b.join("f"), "secret\n").expect("write f");
    });
    let backing = m.backing.clone().expect("stackfs has a backing directory");
    // user_obj rw, user nobody r, group_obj none, mask r, other none.
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in
        [(1u16, 6u16, u32::MAX), (2, 4, 65534), (4, 0, u32::MAX), (0x10, 4, u32::MAX), (0x20, 0, u32::MAX)]
    {
        acl.extend(tag.to_le_bytes());
        acl.extend(perm.to_le_bytes());
        acl.extend(id.to_le_bytes());
    }
    let path = std::ffi::CString::new(backing.join("f").into_os_string().into_encoded_bytes()).expect("path");
    // SAFETY: a NUL-terminated path and a live buffer.
    let r = unsafe {
        libc::setxattr(path.as_ptr(), c"system.posix_acl_access".as_ptr(), acl.as_ptr().cast(), acl.len(), 0)
    };
    if r != 0 {
        common::skip(test, "the backing file system takes no POSIX ACL");
        return;
    }
    // Through ext4 nobody may read it; the script checks what the mount says.
    let script = "import os, sys\n\
                  os.stat('f')\n\
                  open('f').read()\n\
                  os.setgroups([])\nos.setgid(65534)\nos.setuid(65534)\n\
                  for i in range(3):\n    \
                  try:\n        os.stat('f')\n        open('f').read()\n        print('read')\n    \
                  except PermissionError:\n        print('refused')\n";
    let (out, log) = python_served(&m, script);
    assert_eq!(out.trim(), "refused\nrefused\nrefused", "{test}: through the bypass:\n{log}");
    let kernel = Cmd::new("python3")
        .args(["-I", "-c", script])
        .cwd(&m.mnt)
        .env("EFUSE_BYPASS", "off")
        .timeout(Duration::from_secs(60))
        .run()
        .expect_ok();
    assert_eq!(kernel.stdout.trim(), "refused\nrefused\nrefused", "{test}: through the kernel mount");
    let ext4 = fs::read_to_string(backing.join("f"));
    assert!(ext4.is_ok(), "root reads the backing file");
}

/// fio with Linux AIO (libaio's io_submit) and POSIX AIO under `efuse run`,
/// verifying what it wrote: both are system calls or helper threads the
/// library does not see, so it converts the descriptors they name first
/// (without that, io_submit failed with EBADF on the O_PATH descriptor).
fn fio_aio(test: &str, fs_kind: Fs) {
    if !require_fuse(test) || !require_tools(test, &["fio"]) {
        return;
    }
    let m = Mounted::new(fs_kind, test);
    for engine in ["libaio", "posixaio"] {
        let log = m.scratch.join(format!("{engine}.log"));
        let out = Cmd::new(efuse_bin())
            .args(["run", "--", "fio", "--name=aio", "--directory=."])
            .args(["--size=8M", "--bs=4k", "--rw=randrw", "--rwmixread=50", "--iodepth=8", "--numjobs=2"])
            .arg(format!("--ioengine={engine}"))
            .args(["--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--group_reporting"])
            .cwd(&m.mnt)
            .env("EFUSE_BYPASS_LOG", &log.to_string_lossy())
            .env("EFUSE_BYPASS_AFTER", "0")
            .timeout(Duration::from_secs(120))
            .run();
        let text = fs::read_to_string(&log).unwrap_or_default();
        assert!(out.ok(), "{test}: fio {engine}: {}\n{}{}\nlog:\n{text}", out.status, out.stdout, out.stderr);
        assert!(out.stdout.contains("err= 0"), "{test}: fio {engine} reported an error:\n{}", out.stdout);
        let why = if engine == "libaio" { "io_submit (Linux AIO)" } else { "POSIX AIO" };
        assert!(text.contains(why), "{test}: fio {engine}: no conversion for {why}:\n{text}");
    }
}

#[test]
fn memfs_fio_aio_converts() {
    fio_aio("memfs_fio_aio_converts", Fs::Memfs);
}

#[test]
fn stackfs_fio_aio_converts() {
    fio_aio("stackfs_fio_aio_converts", Fs::Stackfs);
}

/// Direct reads' backing descriptors are the process's to manage: a child
/// forked while another thread reads one closes its copy with the file; a
/// copy made in a vfork child (posix_spawn's `dup2` onto stdin) touches
/// nothing of the parent's; and a process holds a bounded number of them,
/// so a program under a descriptor limit can open nearly as many files as
/// on ext4 (at most 16 + the library's socket and kept handles fewer).
#[test]
fn direct_read_descriptors_are_bounded_and_never_leak() {
    let test = "direct_read_descriptors_are_bounded_and_never_leak";
    if !require_fuse(test) || !require_tools(test, &["python3"]) {
        return;
    }
    let m = Mounted::new(Fs::Stackfs, test);
    let backing = m.backing.clone().expect("stackfs has a backing directory");
    let script = format!(
        r#"
import os, resource, subprocess, sys, threading
backing = {backing:?}
def leftovers():
    n = 0
    for f in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink("/proc/self/fd/" + f).startswith(backing + "/")
        except OSError:
            pass
    return n
with open("big", "wb") as f:
    f.write(os.urandom(1 << 20))
os.stat("big")
fd = os.open("big", os.O_RDONLY)
stop = []
def reader():
    while not stop:
        os.pread(fd, 1 << 20, 0)
t = threading.Thread(target=reader)
t.start()
left = 0
for i in range(20):
    pid = os.fork()
    if pid == 0:
        os.close(fd)
        os._exit(min(leftovers(), 100))
    left += os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
stop.append(1)
t.join()
print("forked children left with a backing descriptor:", left)
devnull = os.open("/dev/null", os.O_RDONLY)
os.dup2(devnull, 0)
f = open("big", "rb")
subprocess.run(["/bin/true"], stdin=f)
f.close()
os.close(fd)
print("stdin after a spawn:", os.read(0, 10), "backing descriptors left:", leftovers())
def backing_dirs():
    n = 0
    for f in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink("/proc/self/fd/" + f) == backing
        except OSError:
            pass
    return n
before = backing_dirs()
os.chroot("/")
print("directory of direct reads before and after a chroot:", before, backing_dirs())
os.mkdir("many")
for i in range(300):
    with open("many/f%d" % i, "w") as g:
        g.write("%d\n" % i)
    os.stat("many/f%d" % i)
# A new process whose limit is 256 from its start.
limited = """
import os, resource
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
fds = []
try:
    for i in range(300):
        fds.append(os.open("many/f%d" % i, os.O_RDONLY))
except OSError:
    pass
ok = all(os.pread(d, 10, 0) == b"%d\\n" % i for i, d in enumerate(fds))
print("opened", len(fds), "reads ok", ok)
"""
sys.stdout.flush()
subprocess.run([sys.executable, "-I", "-c", limited])
"#
    );
    let (out, log) = python_served(&m, &script);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("forked children left with a backing descriptor: 0"), "{test}:\n{out}\n{log}");
    assert_eq!(lines.next(), Some("stdin after a spawn: b'' backing descriptors left: 0"), "{test}:\n{out}\n{log}");
    assert_eq!(
        lines.next(),
        Some("directory of direct reads before and after a chroot: 1 0"),
        "{test}: a process that changed its root kept the backing directory:\n{out}\n{log}"
    );
    let last = lines.next().unwrap_or_default().to_string();
    let n: usize = last.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    // ext4: 256 minus stdin/out/err and the interpreter's own (about 251).
    assert!(n >= 225 && last.ends_with("reads ok True"), "{test}: under a limit of 256: {last}\n{log}");
    assert!(log.contains("direct)"), "{test}: no direct read:\n{log}");
}

/// On stackfs a served open takes the data path a kernel open would
/// (passthrough on the default profile), although its client reads and
/// writes through the daemon: a descriptor converted to a kernel open later
/// (mmap, io_submit: fio) then gets passthrough too, where a cached open of
/// the same file would force the kernel's onto the cached path (without
/// this, fio W2 under `efuse run` ran at an eighth of the kernel path).
#[test]
fn stackfs_converted_opens_keep_passthrough() {
    let test = "stackfs_converted_opens_keep_passthrough";
    if !require_fuse(test) || !require_tools(test, &["python3"]) {
        return;
    }
    let m = Mounted::new(Fs::Stackfs, test);
    let paths = || {
        let s = m.stats();
        (s["paths"]["passthrough"].as_u64().unwrap_or(0), s["paths"]["cached"].as_u64().unwrap_or(0))
    };
    let (pt0, cached0) = paths();
    let script =
        "import os, mmap\nfor i in range(5):\n    fd = os.open('f%d' % i, os.O_RDWR | os.O_CREAT, 0o644)\n    \
                  os.write(fd, b'x' * 100000)\n    m = mmap.mmap(fd, 100000)\n    assert m[99999:] == b'x'\n    \
                  m.close()\n    os.close(fd)\n";
    let (_, log) = python_served(&m, script);
    assert!(log.contains("converted to a kernel open for mmap"), "{test}: no conversion:\n{log}");
    let (pt, cached) = paths();
    assert_eq!(cached - cached0, 0, "{test}: an open took the cached path (passthrough {})", pt - pt0);
    assert!(pt - pt0 >= 10, "{test}: {} passthrough opens for 5 served opens and 5 conversions", pt - pt0);
}

/// The same shell steps with every program a busybox applet when `B` is
/// `busybox` (a static binary: the library cannot be preloaded into it).
const FALLBACK: &str = r#"
set -e
$B printf 'hello\nworld\n' > a
$B cat a
$B cp a b
$B cmp a b && echo same
$B dd if=/dev/zero of=z bs=4096 count=3 2>/dev/null
$B wc -c z
$B mv b c
$B ls
$B truncate -s 2 c
$B cat c
echo
echo more >> a
$B cat a
$B rm c z
$B ls
$B stat -c '%s %a' a
"#;

/// `EFUSE_BYPASS=off` (bash and coreutils), and busybox-static under a
/// library that is on: both use the kernel mount (no bypass request, no
/// served open), give ext4's output, and a bypassed reader afterwards sees
/// what they wrote.
fn falls_back(test: &str, fs_kind: Fs, static_busybox: bool) {
    if !require_fuse(test) {
        return;
    }
    let busybox = if static_busybox {
        match common::which("busybox") {
            Some(b)
                if {
                    let o = Cmd::new("ldd").arg(&b).run();
                    format!("{}{}", o.stdout, o.stderr).contains("not a dynamic executable")
                } =>
            {
                Some(b)
            }
            Some(b) => {
                common::skip(test, &format!("{} is not statically linked (install busybox-static)", b.display()));
                return;
            }
            None => {
                common::skip(test, "needs busybox from busybox-static (scripts/setup.sh installs it)");
                return;
            }
        }
    } else {
        None
    };
    let m = Mounted::new(fs_kind, test);
    let mut outs = Vec::new();
    let before = m.bypass_requests().unwrap_or_else(|e| panic!("{test}: {e}"));
    let log = m.scratch.join("fallback.log");
    for (side, dir) in m.sides() {
        let mut c = Cmd::new(efuse_bin()).arg("run").arg("--");
        c = match &busybox {
            Some(b) => c.arg(b).args(["sh", "-c", FALLBACK]).env("B", &b.to_string_lossy()),
            None => c.args(["bash", "-c", FALLBACK]).env("B", "").env("EFUSE_BYPASS", "off"),
        };
        let out = c.cwd(&dir).env("EFUSE_BYPASS_LOG", &log.to_string_lossy()).env("LC_ALL", "C").run();
        assert!(out.ok(), "{test}: on {side}: {} exited {}\n{}{}", out.what, out.status, out.stdout, out.stderr);
        outs.push(format!("{}{}", out.stdout, out.stderr));
    }
    assert_same(test, fs_kind.name(), &outs[0], &outs[1]);
    let after = m.bypass_requests().unwrap_or_else(|e| panic!("{test}: {e}"));
    assert_eq!(before, after, "{test}: bypass requests were served while the library was off or absent");
    let text = fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains(" -> fd "), "{test}: opens were served:\n{text}");
    // What the kernel mount was given, a bypassed process reads back.
    let out = Cmd::new(efuse_bin())
        .args(["run", "--", "cat", "a"])
        .cwd(&m.mnt)
        .env("EFUSE_BYPASS_AFTER", "0")
        .run()
        .expect_ok();
    assert_eq!(out.stdout, "hello\nworld\nmore\n", "{test}: bypassed read after the kernel's writes");
    assert!(m.bypass_requests().unwrap_or(0) > after, "{test}: the bypassed cat was not served");
}

#[test]
fn memfs_bypass_off_uses_the_kernel_mount() {
    falls_back("memfs_bypass_off_uses_the_kernel_mount", Fs::Memfs, false);
}

#[test]
fn stackfs_bypass_off_uses_the_kernel_mount() {
    falls_back("stackfs_bypass_off_uses_the_kernel_mount", Fs::Stackfs, false);
}

#[test]
fn memfs_static_busybox_uses_the_kernel_mount() {
    falls_back("memfs_static_busybox_uses_the_kernel_mount", Fs::Memfs, true);
}

#[test]
fn stackfs_static_busybox_uses_the_kernel_mount() {
    falls_back("stackfs_static_busybox_uses_the_kernel_mount", Fs::Stackfs, true);
}

/// What the bypass saves, counted by the daemon: 200 open/fstat/read/close
/// of one unchanged file in one process cost a handful of requests (the
/// library keeps the handle, and the bytes where the file system keeps
/// pages across opens); 200 stats of it by a new process cost none (its
/// user's table is warm); a process that makes fewer path calls on the mount
/// than EFUSE_BYPASS_AFTER (default 8) stays on the kernel mount, and one
/// that makes more connects.
fn requests_counted(test: &str, fs_kind: Fs) {
    if !require_fuse(test) || !require_tools(test, &["python3"]) {
        return;
    }
    let m = Mounted::new(fs_kind, test);
    fs::write(m.mnt.join("f"), "0123456789").expect("write f");
    let run = |after: Option<&str>, script: &str| -> u64 {
        let before = m.bypass_requests().unwrap_or_else(|e| panic!("{test}: {e}"));
        let mut c = Cmd::new(efuse_bin()).args(["run", "--", "python3", "-I", "-c", script]).cwd(&m.mnt);
        if let Some(a) = after {
            c = c.env("EFUSE_BYPASS_AFTER", a);
        }
        c.timeout(Duration::from_secs(60)).run().expect_ok();
        m.bypass_requests().unwrap_or_else(|e| panic!("{test}: {e}")) - before
    };
    let many = "import os\nfor i in range(200):\n    fd = os.open('f', os.O_RDONLY)\n    \
                assert os.fstat(fd).st_size == 10\n    assert os.read(fd, 100) == b'0123456789'\n    os.close(fd)\n";
    let n = run(None, many);
    assert!(n > 0 && n < 40, "{test}: 200 open/fstat/read/close of an unchanged file cost {n} bypass requests");
    // A new process of the same user starts with what the earlier ones
    // resolved: the metadata table is shared by the clients of one set of
    // credentials. Its stats cost no request at all.
    // (Measured against the same interpreter doing nothing: a launcher
    // script may look for names of its own in the working directory.)
    let stats = "import os\nfor i in range(200):\n    assert os.stat('f').st_size == 10\n";
    run(Some("0"), "pass");
    let idle = run(Some("0"), "pass");
    let n = run(Some("0"), stats);
    assert!(n <= idle, "{test}: a new process's stats cost {n} requests (the interpreter alone {idle})");
    // Dropped as drop_caches drops the kernel's (the bench's cold runs):
    // the next process asks again.
    let answer = efuse::control::query(&m.mnt, "drop-bypass-tables").expect("control socket");
    assert!(answer.contains("\"dropped\": true"), "{test}: drop-bypass-tables answered {answer}");
    let n = run(Some("0"), stats);
    assert!(n > idle, "{test}: after the tables were dropped a new process asked {n} (the interpreter alone {idle})");
    // (Read and write: a read-only open of a file the table knows may be
    // served with no request at all, see `direct reads` below.)
    let short = "import os\nfor i in range(3):\n    os.stat('f')\nfd = os.open('f', os.O_RDWR)\n\
                 assert os.read(fd, 100) == b'0123456789'\nos.close(fd)\n";
    assert_eq!(run(None, short), 0, "{test}: a process of a few calls was served (EFUSE_BYPASS_AFTER default)");
    // With the mount named (`--mount`), such a process does not even read
    // the mount table; one that makes more calls is served.
    let named = |script: &str, log: &Path| -> u64 {
        let before = m.bypass_requests().unwrap_or_else(|e| panic!("{test}: {e}"));
        Cmd::new(efuse_bin())
            .arg("run")
            .arg("--mount")
            .arg(&m.mnt)
            .args(["--", "python3", "-I", "-c", script])
            .cwd(&m.mnt)
            .env("EFUSE_BYPASS_LOG", &log.to_string_lossy())
            .timeout(Duration::from_secs(60))
            .run()
            .expect_ok();
        m.bypass_requests().unwrap_or_else(|e| panic!("{test}: {e}")) - before
    };
    let log = m.scratch.join("named-short.log");
    assert_eq!(named(short, &log), 0, "{test}: --mount: a process of a few calls was served");
    let text = fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("bypass socket"), "{test}: --mount: a short process read the mount table:\n{text}");
    let log = m.scratch.join("named-many.log");
    assert!(named(many, &log) > 0, "{test}: --mount: a process of many calls was not served");
    assert!(run(Some("2"), short) > 0, "{test}: EFUSE_BYPASS_AFTER=2: the process was not served");
    assert!(run(Some("0"), short) > 0, "{test}: EFUSE_BYPASS_AFTER=0: the process was not served");
}

#[test]
fn memfs_requests_counted() {
    requests_counted("memfs_requests_counted", Fs::Memfs);
}

#[test]
fn stackfs_requests_counted() {
    requests_counted("stackfs_requests_counted", Fs::Stackfs);
}

/// A file system that does not declare its opens reusable (stackfs with
/// `--cache none`: no watcher, so a change behind the mount may go
/// unreported) keeps no handle: every open of the loop reaches it.
#[test]
fn stackfs_without_a_watcher_keeps_no_handles() {
    let test = "stackfs_without_a_watcher_keeps_no_handles";
    if !require_fuse(test) || !require_tools(test, &["python3"]) {
        return;
    }
    let m = Mounted::with(Fs::Stackfs, test, common::MountSpec::default().arg("--cache").arg("none"), |_| {});
    fs::write(m.mnt.join("f"), "0123456789").expect("write f");
    let before = m.bypass_requests().unwrap_or_else(|e| panic!("{test}: {e}"));
    let script = "import os\nfor i in range(50):\n    fd = os.open('f', os.O_RDONLY)\n    \
                  assert os.read(fd, 100) == b'0123456789'\n    os.close(fd)\n";
    let (_, text) = python_served(&m, script);
    let n = m.bypass_requests().unwrap_or_else(|e| panic!("{test}: {e}")) - before;
    assert!(!text.contains("kept handle"), "{test}: a handle was kept:\n{text}");
    assert!(n >= 100, "{test}: 50 opens and closes made only {n} bypass requests");
}

/// A child forked after its parent connected keeps no handle (it shares
/// the parent's connection, and one that `_exit`s would never give a kept
/// handle back): its second open of a file asks the daemon again; the
/// parent's kept handles stay its own.
#[test]
fn forked_children_keep_no_handles() {
    let test = "forked_children_keep_no_handles";
    if !require_fuse(test) || !require_tools(test, &["python3"]) {
        return;
    }
    let m = Mounted::new(Fs::Memfs, test);
    fs::write(m.mnt.join("f"), "0123456789").expect("write f");
    let script = "import os\n\
                  def whole():\n    fd = os.open('f', os.O_RDONLY)\n    b = os.read(fd, 100)\n    os.close(fd)\n    return b\n\
                  first = whole()\n\
                  for i in range(5):\n    pid = os.fork()\n    if pid == 0:\n        \
                  ok = whole() == b'0123456789' and whole() == b'0123456789'\n        os._exit(0 if ok else 1)\n    \
                  _, st = os.waitpid(pid, 0)\n    assert st == 0, st\n\
                  print('parent', whole(), whole(), whole())\n";
    let (stdout, text) = python_served(&m, script);
    assert_eq!(stdout.trim(), "parent b'0123456789' b'0123456789' b'0123456789'");
    let kept: Vec<&str> = text.lines().filter(|l| l.contains("kept handle")).collect();
    // Only the parent's later opens take a kept handle: all from one pid.
    let pids: std::collections::BTreeSet<&str> = kept.iter().filter_map(|l| l.split(']').next()).collect();
    assert!(!kept.is_empty() && pids.len() == 1, "{test}: kept handles taken by {pids:?}:\n{text}");
}

/// `efuse run -- python3 -I -c script` in the mount, every process served
/// from its first call; its stdout and the library's log.
fn python_served(m: &Mounted, script: &str) -> (String, String) {
    let log = m.scratch.join("bypass.log");
    let out = Cmd::new(efuse_bin())
        .args(["run", "--", "python3", "-I", "-c", script])
        .cwd(&m.mnt)
        .env("EFUSE_BYPASS_AFTER", "0")
        .env("EFUSE_BYPASS_LOG", &log.to_string_lossy())
        .timeout(Duration::from_secs(60))
        .run()
        .expect_ok();
    (out.stdout, fs::read_to_string(&log).unwrap_or_default())
}

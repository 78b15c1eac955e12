//! Coherence between the bypass and the kernel mount: two long-lived
//! python3 processes work on the same files, one under `efuse run` (its
//! calls go through the bypass socket) and one not (through the kernel and
//! its caches), driven step by step over pipes, with no pause between a
//! change on one side and the check on the other. Both directions: reads
//! after writes (also through a descriptor held open), appends, truncates,
//! rename over a file, unlink while open, size and mtime after a write, a
//! name created on one side seen at once on the other (no stale negative
//! entry). On stackfs also changes made behind the mount, in the backing
//! directory, seen by the bypassed process (a rename over a name it already
//! resolved, or an unlink, once stackfs's watcher reports them).

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use common::{efuse_bin, require_fuse, require_tools, Fs, Mounted};
use serde_json::{json, Value};

/// One process: reads a JSON array per line (an operation), answers a JSON
/// value per line (the result, or "err ENAME").
const SERVER: &str = r#"
import errno, json, os, sys
fds = {}
def whole(fd):
    out = b""
    while True:
        b = os.read(fd, 65536)
        if not b:
            return out
        out += b
def do(c):
    op = c[0]
    if op == "write_file":
        fd = os.open(c[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, c[2].encode())
        os.close(fd)
        return "ok"
    if op == "read_file":
        fd = os.open(c[1], os.O_RDONLY)
        d = whole(fd)
        os.close(fd)
        return d.decode()
    if op == "append":
        fd = os.open(c[1], os.O_WRONLY | os.O_APPEND)
        os.write(fd, c[2].encode())
        os.close(fd)
        return "ok"
    if op == "truncate":
        os.truncate(c[1], c[2])
        return "ok"
    if op == "rename":
        os.rename(c[1], c[2])
        return "ok"
    if op == "unlink":
        os.unlink(c[1])
        return "ok"
    if op == "stat":
        st = os.stat(c[1])
        return [st.st_size, st.st_mtime_ns]
    if op == "open":
        fds[c[1]] = os.open(c[2], os.O_RDWR)
        return "ok"
    if op == "pread":
        return os.pread(fds[c[1]], c[2], c[3]).decode()
    if op == "pwrite":
        os.pwrite(fds[c[1]], c[2].encode(), c[3])
        return "ok"
    if op == "fstat":
        st = os.fstat(fds[c[1]])
        return [st.st_size, st.st_mtime_ns]
    if op == "close":
        os.close(fds.pop(c[1]))
        return "ok"
    raise ValueError(op)
for line in sys.stdin:
    try:
        r = do(json.loads(line))
    except OSError as e:
        r = "err " + errno.errorcode[e.errno]
    print(json.dumps(r), flush=True)
"#;

/// Bound for one step (a hung mount fails the test; the guard unmounts).
const STEP: Duration = Duration::from_secs(20);

struct Server {
    name: &'static str,
    child: Child,
    input: ChildStdin,
    output: Receiver<String>,
}

impl Server {
    fn spawn(name: &'static str, bypass: bool, dir: &Path, script: &Path, log: &Path) -> Server {
        let mut argv: Vec<String> = Vec::new();
        if bypass {
            argv.extend([efuse_bin().display().to_string(), "run".into(), "--".into()]);
        }
        argv.extend(["python3".to_string(), "-u".into(), script.display().to_string()]);
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .current_dir(dir)
            .env("EFUSE_BYPASS_LOG", log)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {argv:?}: {e}"));
        let input = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, output) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Server { name, child, input, output }
    }

    /// Runs one operation; its result.
    fn ask(&mut self, op: Value) -> Value {
        let line = format!("{op}\n");
        if let Err(e) = self.input.write_all(line.as_bytes()) {
            panic!("{}: sending {op}: {e}", self.name);
        }
        match self.output.recv_timeout(STEP) {
            Ok(l) => serde_json::from_str(&l).unwrap_or_else(|e| panic!("{}: {op} answered {l:?}: {e}", self.name)),
            Err(e) => panic!("{}: no answer to {op} within {STEP:?} ({e}): the mount looks hung", self.name),
        }
    }

    /// Runs an operation that must succeed.
    fn ok(&mut self, op: Value) {
        let r = self.ask(op.clone());
        assert_eq!(r, json!("ok"), "{}: {op}", self.name);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: plain syscall on the group of the child this test spawned.
        unsafe { libc::killpg(self.child.id() as libc::pid_t, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Every change made by `w` seen at once by `r`.
fn changes_seen(w: &mut Server, r: &mut Server, tag: &str) {
    let ctx = format!("{} writes, {} reads", w.name, r.name);
    let (f, g) = (format!("f-{tag}"), format!("g-{tag}"));
    // A name looked up and missed, then created: no stale negative entry.
    assert_eq!(r.ask(json!(["stat", f])), json!("err ENOENT"), "{ctx}");
    w.ok(json!(["write_file", f, "v1"]));
    assert_eq!(r.ask(json!(["read_file", f])), json!("v1"), "{ctx}: read after create");
    // Read again unchanged: the bypassed reader keeps its handle and the
    // bytes across these opens; the changes below must end that.
    for _ in 0..3 {
        assert_eq!(r.ask(json!(["read_file", f])), json!("v1"), "{ctx}: read again");
    }
    // The reader holds the file open (the kernel's pages of it cached).
    r.ok(json!(["open", "h", f]));
    assert_eq!(r.ask(json!(["pread", "h", 100, 0])), json!("v1"), "{ctx}");
    w.ok(json!(["write_file", f, "version-two"]));
    assert_eq!(r.ask(json!(["pread", "h", 100, 0])), json!("version-two"), "{ctx}: read through an open descriptor");
    assert_eq!(r.ask(json!(["read_file", f])), json!("version-two"), "{ctx}: read after rewrite");
    assert_eq!(r.ask(json!(["read_file", f])), json!("version-two"), "{ctx}: read again after rewrite");
    w.ok(json!(["append", f, "+tail"]));
    assert_eq!(r.ask(json!(["read_file", f])), json!("version-two+tail"), "{ctx}: read after append");
    assert_eq!(r.ask(json!(["read_file", f])), json!("version-two+tail"), "{ctx}: read again after append");
    assert_eq!(r.ask(json!(["fstat", "h"]))[0], json!(16), "{ctx}: size after append");
    w.ok(json!(["truncate", f, 3]));
    assert_eq!(r.ask(json!(["read_file", f])), json!("ver"), "{ctx}: read after truncate down");
    assert_eq!(r.ask(json!(["read_file", f])), json!("ver"), "{ctx}: read again after truncate down");
    assert_eq!(r.ask(json!(["pread", "h", 100, 0])), json!("ver"), "{ctx}: open descriptor after truncate down");
    w.ok(json!(["truncate", f, 6]));
    assert_eq!(r.ask(json!(["read_file", f])), json!("ver\0\0\0"), "{ctx}: read after truncate up");
    // Size and mtime after a write through a descriptor, as the writer sees them.
    w.ok(json!(["open", "wh", f]));
    w.ok(json!(["pwrite", "wh", "XY", 10]));
    let mine = w.ask(json!(["fstat", "wh"]));
    assert_eq!(mine[0], json!(12), "{ctx}: writer's size");
    assert_eq!(r.ask(json!(["stat", f])), mine, "{ctx}: size and mtime after a write");
    assert_eq!(r.ask(json!(["fstat", "h"])), mine, "{ctx}: size and mtime through an open descriptor");
    w.ok(json!(["close", "wh"]));
    r.ok(json!(["close", "h"]));
    // Rename over a file the reader has just read.
    w.ok(json!(["write_file", g, "G"]));
    assert_eq!(r.ask(json!(["read_file", f])), json!("ver\0\0\0\0\0\0\0XY"), "{ctx}");
    assert_eq!(r.ask(json!(["read_file", f])), json!("ver\0\0\0\0\0\0\0XY"), "{ctx}: read again");
    w.ok(json!(["rename", g, f]));
    assert_eq!(r.ask(json!(["read_file", f])), json!("G"), "{ctx}: read after rename over");
    assert_eq!(r.ask(json!(["stat", g])), json!("err ENOENT"), "{ctx}: the old name after rename");
    // Unlink while the reader holds it open.
    r.ok(json!(["open", "h2", f]));
    w.ok(json!(["unlink", f]));
    assert_eq!(r.ask(json!(["stat", f])), json!("err ENOENT"), "{ctx}: stat after unlink");
    assert_eq!(r.ask(json!(["pread", "h2", 10, 0])), json!("G"), "{ctx}: an unlinked file read while open");
    w.ok(json!(["write_file", f, "again"]));
    assert_eq!(r.ask(json!(["read_file", f])), json!("again"), "{ctx}: a new file under the unlinked name");
    assert_eq!(r.ask(json!(["pread", "h2", 10, 0])), json!("G"), "{ctx}: the unlinked file still");
    r.ok(json!(["close", "h2"]));
}

fn coherence(test: &str, fs_kind: Fs) {
    if !require_fuse(test) || !require_tools(test, &["python3"]) {
        return;
    }
    let m = Mounted::new(fs_kind, test);
    let script = m.scratch.join("server.py");
    fs::write(&script, SERVER).unwrap_or_else(|e| panic!("write {}: {e}", script.display()));
    let log = m.scratch.join("bypass.log");
    let mut bypassed = Server::spawn("bypassed", true, &m.mnt, &script, &log);
    let mut kernel = Server::spawn("kernel", false, &m.mnt, &script, &m.scratch.join("kernel.log"));
    let before = m.bypass_requests().unwrap_or_else(|e| panic!("{test}: {e}"));
    changes_seen(&mut bypassed, &mut kernel, "b2k");
    changes_seen(&mut kernel, &mut bypassed, "k2b");
    // Interleaved on one file: each side's append seen by the other's next one.
    bypassed.ok(json!(["write_file", "both", ""]));
    let mut want = String::new();
    for i in 0..20 {
        let (w, r) = if i % 2 == 0 { (&mut bypassed, &mut kernel) } else { (&mut kernel, &mut bypassed) };
        let piece = format!("{}{i};", w.name);
        w.ok(json!(["append", "both", piece]));
        want += &piece;
        assert_eq!(r.ask(json!(["read_file", "both"])), json!(want), "{test}: interleaved appends, step {i}");
    }
    if let Some(backing) = &m.backing {
        // Behind the mount: the bypassed process sees the backing directory's
        // changes. Data is read from the backing file at once; what the
        // bypass's metadata table (like the kernel's caches) knows of a name
        // or of attributes follows once stackfs's watcher reports the
        // change (within 1 s, as for the kernel mount; see tests/cache.rs),
        // so those are polled for.
        let p = |n: &str| backing.join(n);
        fs::write(p("behind"), "first").unwrap();
        assert_eq!(bypassed.ask(json!(["read_file", "behind"])), json!("first"), "{test}: file made behind");
        fs::write(p("behind"), "second, longer").unwrap();
        assert_eq!(bypassed.ask(json!(["read_file", "behind"])), json!("second, longer"), "{test}: rewritten behind");
        let mut last = Value::Null;
        let sized = common::wait_until(Duration::from_secs(2), || {
            last = bypassed.ask(json!(["stat", "behind"]));
            last[0] == json!(14)
        });
        assert!(sized, "{test}: size after a write behind: stat still answers {last} after 2 s");
        let mut eventually = |op: Value, want: Value, what: &str| {
            let mut last = Value::Null;
            let seen = common::wait_until(Duration::from_secs(2), || {
                last = bypassed.ask(op.clone());
                last == want
            });
            assert!(seen, "{test}: {what}: {op} still answers {last} after 2 s, not {want}");
        };
        // A name the bypassed process missed (its table then caches the
        // miss, as the kernel caches a negative dentry), made behind.
        eventually(json!(["stat", "later"]), json!("err ENOENT"), "a name not made yet");
        eventually(json!(["read_file", "later"]), json!("err ENOENT"), "a name not made yet");
        fs::write(p("later"), "made behind").unwrap();
        eventually(json!(["read_file", "later"]), json!("made behind"), "a name missed, then made behind");
        fs::write(p("behind2"), "other").unwrap();
        fs::rename(p("behind2"), p("behind")).unwrap();
        eventually(json!(["read_file", "behind"]), json!("other"), "renamed over behind");
        fs::remove_file(p("behind")).unwrap();
        eventually(json!(["stat", "behind"]), json!("err ENOENT"), "unlinked behind");
    }
    let after = m.bypass_requests().unwrap_or_else(|e| panic!("{test}: {e}"));
    drop(bypassed);
    drop(kernel);
    let text = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        after > before && text.contains(" -> fd "),
        "{test}: the bypassed process was not served ({before} -> {after} requests):\n{text}"
    );
    // Its repeated reads of unchanged files reused kept handles (the checks
    // above ran through them too). On stackfs the watcher also reports the
    // daemon's own writes to the backing files, a little later, and such a
    // report may end a kept handle before its reuse (as it should): only
    // memfs is sure to show one.
    if m.backing.is_none() {
        assert!(text.contains("kept handle"), "{test}: no open took a kept handle:\n{text}");
    }
}

#[test]
fn memfs_bypass_and_kernel_see_each_others_changes() {
    coherence("memfs_bypass_and_kernel_see_each_others_changes", Fs::Memfs);
}

#[test]
fn stackfs_bypass_and_kernel_see_each_others_changes() {
    coherence("stackfs_bypass_and_kernel_see_each_others_changes", Fs::Stackfs);
}

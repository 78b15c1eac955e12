//! The bypass client library under `efuse run`: preloaded into ordinary
//! programs it must change nothing when no path they use is on an efuse
//! mount that offers the bypass; it must survive exec (shells, `env -i`);
//! EFUSE_BYPASS=off must turn it off; `efuse run` must report a missing
//! command or a bad --mount clearly.

mod common;

use common::{efuse_bin, require_tools, sh, Cmd, TempDir};

/// A script exercising opens, reads, writes, stat, dup onto 0/1/2, fork,
/// exec, mmap, locks and directories on plain files.
const SCRIPT: &str = r#"
set -e
printf 'hello\nworld\n' > a
cat a
cp a b && cmp a b
ls -l --time-style=+ a b | awk '{print $1, $5, $NF}'
stat -c '%s %F %a' a b
tar cf t.tar a b && tar tf t.tar && mkdir x && tar xf t.tar -C x && cmp a x/a
exec 3<a; read -r first <&3; echo "fd3: $first"; exec 3<&-
sh -c 'exec 0<a; cat'
mv b c && ln -s c d && readlink d && cat d && rm c d
find . -type f | sort
grep -c o a
python3 - <<'PY'
import os, mmap, fcntl, threading
fd = os.open("a", os.O_RDWR)
assert os.read(fd, 6) == b"hello\n"
pid = os.fork()
if pid == 0:
    os.lseek(fd, 2, os.SEEK_CUR)
    os._exit(0)
os.waitpid(pid, 0)
print("shared offset", os.lseek(fd, 0, os.SEEK_CUR))
fcntl.lockf(fd, fcntl.LOCK_EX)
m = mmap.mmap(fd, 0)
print("mmap", m[:5])
m.close()
os.close(fd)
out = []
def rd():
    with open("a", "rb") as f:
        out.append(f.read())
ts = [threading.Thread(target=rd) for _ in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
print("threads", len(set(out)), len(out[0]))
with open("w", "wb") as f:
    f.write(b"x" * 100000)
    f.seek(300000)
    f.write(b"y")
print("sparse", os.stat("w").st_size)
PY
env -i /bin/sh -c 'echo env-i ok'
"#;

#[test]
fn preloaded_programs_behave_as_without_the_library_when_no_mount_is_bypassed() {
    if !require_tools("bypass_no_mount", &["python3", "tar", "awk", "find", "grep", "cmp"]) {
        return;
    }
    let plain_dir = TempDir::new("bypass-plain");
    let plain = sh(SCRIPT, plain_dir.path()).run().expect_ok();
    let run_dir = TempDir::new("bypass-run");
    let log = run_dir.path().join("../bypass-run.log");
    let under = Cmd::new(efuse_bin())
        .args(["run", "--", "bash", "-o", "pipefail", "-c", SCRIPT])
        .cwd(run_dir.path())
        .env("EFUSE_BYPASS_LOG", &log.to_string_lossy())
        .run()
        .expect_ok();
    assert_eq!(plain.stdout, under.stdout, "stdout differs under efuse run");
    assert_eq!(plain.stderr, under.stderr, "stderr differs under efuse run");
    // Nothing in the temporary directory is on a bypassed mount: the log
    // must not show a single served open.
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(!text.contains(" -> fd "), "something was served through the bypass:\n{text}");
}

#[test]
fn the_library_survives_exec_with_a_cleared_environment() {
    let dir = TempDir::new("bypass-exec");
    // The library maps itself into every program down the exec chain,
    // `env -i` (which empties the environment) included.
    let out = Cmd::new(efuse_bin())
        .args([
            "run",
            "--",
            "sh",
            "-c",
            "env -i /bin/sh -c 'env -i /bin/grep -q libefuse_preload /proc/self/maps && echo kept'",
        ])
        .cwd(dir.path())
        .run()
        .expect_ok();
    assert_eq!(out.stdout.trim(), "kept", "the library is gone after env -i: {}", out.stdout);
    let out = Cmd::new(efuse_bin())
        .args(["run", "--", "env", "-i", "/bin/sh", "-c", "echo \"$LD_PRELOAD\""])
        .cwd(dir.path())
        .run()
        .expect_ok();
    assert!(out.stdout.contains("libefuse_preload.so"), "LD_PRELOAD not re-injected: {}", out.stdout);
    // EFUSE_BYPASS=off: the library does nothing, re-injection included.
    let out = Cmd::new(efuse_bin())
        .args(["run", "--", "env", "-i", "/bin/sh", "-c", "echo \"[$LD_PRELOAD]\""])
        .env("EFUSE_BYPASS", "off")
        .cwd(dir.path())
        .run()
        .expect_ok();
    assert_eq!(out.stdout.trim(), "[]");
}

#[test]
fn efuse_run_reports_usage_errors_and_passes_the_exit_code() {
    let dir = TempDir::new("bypass-usage");
    let out = Cmd::new(efuse_bin()).args(["run", "--", "sh", "-c", "exit 7"]).cwd(dir.path()).run();
    assert_eq!(out.code(), Some(7));
    let out = Cmd::new(efuse_bin()).args(["run", "--", "efuse-no-such-command"]).cwd(dir.path()).run();
    assert_eq!(out.code(), Some(1));
    assert!(out.stderr.contains("command not found"), "{}", out.stderr);
    let out = Cmd::new(efuse_bin()).args(["run", "--mount", dir.path().to_str().expect("utf-8"), "--", "true"]).run();
    assert_eq!(out.code(), Some(2));
    assert!(out.stderr.contains("not a mount point"), "{}", out.stderr);
    let out = Cmd::new(efuse_bin())
        .args(["run", "--", "true"])
        .env("EFUSE_PRELOAD", "/nonexistent/libefuse_preload.so")
        .run();
    assert_eq!(out.code(), Some(1));
    assert!(out.stderr.contains("EFUSE_PRELOAD"), "{}", out.stderr);
}

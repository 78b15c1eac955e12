//! The bypass client library against cases where it used to differ from
//! the kernel: programs run under `efuse run` on a memfs mount that offers
//! the bypass, their results compared with what the kernel gives (the ext4
//! reference directory, or the answer the kernel is documented to give).
//!
//! Each test also checks the library's log for a served open, so it cannot
//! pass because the library stayed out of the way. Small C programs are
//! built with `cc` into the scratch directory; every command runs under the
//! harness's timeout and the `Mounted` guard unmounts.

mod common;

use std::path::{Path, PathBuf};

use common::{efuse_bin, require_fuse, Cmd, Fs, MountSpec, Mounted, Output};

fn mounted(test: &str) -> Option<Mounted> {
    if !require_fuse(test) {
        return None;
    }
    Some(Mounted::new(Fs::Memfs, test))
}

/// A mount other users may use too (the tests that change credentials).
fn mounted_for_all(test: &str) -> Option<Mounted> {
    if !require_fuse(test) {
        return None;
    }
    Some(Mounted::with(Fs::Memfs, test, MountSpec::default().arg("-o").arg("allow_other"), |_| {}))
}

/// `efuse run -- argv` in `cwd`; its output and the library's log. Every
/// process connects at its first call on the mount (EFUSE_BYPASS_AFTER=0):
/// these short programs check what served descriptors do.
fn efuse_run(m: &Mounted, cwd: &Path, argv: &[&str]) -> (Output, String) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = m.scratch.join(format!("bypass-{n}.log"));
    let out = Cmd::new(efuse_bin())
        .arg("run")
        .arg("--")
        .args(argv)
        .cwd(cwd)
        .env("EFUSE_BYPASS_LOG", &log.to_string_lossy())
        .env("EFUSE_BYPASS_AFTER", "0")
        .run();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    (out, text)
}

/// `efuse run -- bash -c script` in the mount.
fn bash(m: &Mounted, script: &str) -> (Output, String) {
    efuse_run(m, &m.mnt, &["bash", "-c", script])
}

/// Builds a C program into the scratch directory.
fn cc(m: &Mounted, name: &str, src: &str) -> PathBuf {
    let c = m.scratch.join(format!("{name}.c"));
    let bin = m.scratch.join(name);
    std::fs::write(&c, src).expect("write C source");
    Cmd::new("cc").args(["-O1", "-Wall", "-o"]).arg(&bin).arg(&c).run().expect_ok();
    bin
}

/// The library served at least one open (the test exercised it).
fn assert_served(log: &str) {
    assert!(log.contains(" -> fd "), "no open was served through the bypass; log:\n{log}");
}

fn read(p: impl AsRef<Path>) -> String {
    std::fs::read_to_string(p.as_ref()).unwrap_or_else(|e| panic!("read {}: {e}", p.as_ref().display()))
}

/// Descriptors 0, 1 and 2 must stay kernel files: stdio writes them with
/// the C library's internal write, which the library does not see.
#[test]
fn stdio_on_descriptors_copied_from_served_ones() {
    let Some(m) = mounted("bypass-fix-stdio") else { return };
    let (out, log) = bash(
        &m,
        "set -e; echo hello > f; { echo x; echo y; } > g; exec 4>h; echo one >&4; echo two >&4; \
         cat f g h; exec 3<f; read -r l <&3; echo \"read $l\"",
    );
    let out = out.expect_ok();
    assert_eq!(out.stderr, "");
    assert_eq!(out.stdout, "hello\nx\ny\none\ntwo\nread hello\n");
    assert_eq!(read(m.mnt.join("f")), "hello\n");
    assert_eq!(read(m.mnt.join("h")), "one\ntwo\n");
    assert_served(&log);

    let prog = cc(
        &m,
        "stdio",
        r#"
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(void) {
    char buf[64];
    int fd = open("c1", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 3) return 10;
    int saved = dup(1);
    if (dup2(fd, 1) != 1) return 11;
    printf("printf through dup2\n");
    if (fflush(stdout) != 0) return 12;
    if (dup3(saved, 1, 0) != 1) return 13;
    close(fd);
    /* A served open that lands on a closed standard descriptor. */
    close(1);
    fd = open("c2", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd != 1) return 14;
    printf("printf on a reopened 1\n");
    if (fflush(stdout) != 0) return 15;
    if (dup2(saved, 1) != 1) return 16;
    /* stdin from a served file, by F_DUPFD onto a closed 0 and by dup. */
    int r = open("c1", O_RDONLY);
    if (r < 3) return 17;
    close(0);
    if (fcntl(r, F_DUPFD, 0) != 0) return 18;
    if (!fgets(buf, sizeof buf, stdin)) return 19;
    printf("stdin: %s", buf);
    close(0);
    clearerr(stdin);
    if (lseek(r, 0, SEEK_SET) != 0) return 20;
    if (dup(r) != 0) return 21;
    if (!fgets(buf, sizeof buf, stdin)) return 22;
    /* r and its copy on 0 still share one offset, as dups do. */
    if (lseek(r, 0, SEEK_CUR) != (off_t)strlen(buf)) return 23;
    printf("again: %s", buf);
    return 0;
}
"#,
    );
    let (out, log) = efuse_run(&m, &m.mnt, &[prog.to_str().expect("utf-8")]);
    let out = out.expect_ok();
    assert_eq!(out.stdout, "stdin: printf through dup2\nagain: printf through dup2\n");
    assert_eq!(read(m.mnt.join("c1")), "printf through dup2\n");
    assert_eq!(read(m.mnt.join("c2")), "printf on a reopened 1\n");
    assert_served(&log);
}

/// A forked child that changes its credentials gives up only its own use
/// of the connection it shares with its parent: the parent's served
/// descriptors keep working, and the child reconnects as its new self.
#[test]
fn a_childs_credential_change_leaves_the_parents_connection_alone() {
    let Some(m) = mounted_for_all("bypass-fix-child-creds") else { return };
    let prog = cc(
        &m,
        "childcreds",
        r#"
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
int main(void) {
    char buf[64];
    int fd = open("shared", O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 3) return 10;
    if (write(fd, "parent1\n", 8) != 8) return 11;
    pid_t p = fork();
    if (p == 0) {
        if (setgroups(0, NULL) != 0 || setgid(65534) != 0 || setuid(65534) != 0) _exit(2);
        /* A new connection, judged by the new credentials. */
        int r = open("shared", O_RDONLY);
        if (r < 0) _exit(3);
        if (pread(r, buf, sizeof buf, 0) != 8) _exit(4);
        if (open("shared", O_WRONLY) >= 0 || errno != EACCES) _exit(5);
        _exit(0);
    }
    int st = 0;
    if (waitpid(p, &st, 0) != p || !WIFEXITED(st)) return 12;
    if (WEXITSTATUS(st) != 0) return 20 + WEXITSTATUS(st);
    /* Time for the daemon to act on anything the child did to the
       connection (a shut-down socket drops the client). */
    usleep(300000);
    if (write(fd, "parent2\n", 8) != 8) return 13;
    if (lseek(fd, 0, SEEK_SET) != 0) return 14;
    ssize_t n = read(fd, buf, sizeof buf);
    if (n != 16 || memcmp(buf, "parent1\nparent2\n", 16) != 0) return 15;
    return 0;
}
"#,
    );
    let (out, log) = efuse_run(&m, &m.mnt, &[prog.to_str().expect("utf-8")]);
    assert!(out.ok(), "exit {:?}; stderr:\n{}\nlog:\n{log}", out.code(), out.stderr);
    assert_eq!(read(m.mnt.join("shared")), "parent1\nparent2\n");
    assert_served(&log);
}

/// open as root, then drop privileges (daemons do): the descriptor keeps
/// the access it was opened with, as a kernel open does.
#[test]
fn descriptors_opened_before_dropping_privileges_keep_working() {
    let Some(m) = mounted_for_all("bypass-fix-drop-privs") else { return };
    let prog = cc(
        &m,
        "dropprivs",
        r#"
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
int main(void) {
    char buf[64];
    struct stat st;
    int fd = open("secret", O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 3) return 10;
    if (write(fd, "root\n", 5) != 5) return 11;
    /* uid first: the credentials change in one call. */
    if (setuid(65534) != 0) return 2;
    if (write(fd, "more\n", 5) != 5) return 12;
    if (lseek(fd, 0, SEEK_SET) != 0) return 13;
    if (read(fd, buf, sizeof buf) != 10 || memcmp(buf, "root\nmore\n", 10) != 0) return 14;
    if (fstat(fd, &st) != 0 || st.st_uid != 0 || st.st_size != 10) return 15;
    /* A new open is judged by the new credentials. */
    if (open("secret", O_RDONLY) >= 0 || errno != EACCES) return 16;
    if (close(fd) != 0) return 17;
    return 0;
}
"#,
    );
    let (out, log) = efuse_run(&m, &m.mnt, &[prog.to_str().expect("utf-8")]);
    assert!(out.ok(), "exit {:?}; stderr:\n{}\nlog:\n{log}", out.code(), out.stderr);
    assert_eq!(read(m.mnt.join("secret")), "root\nmore\n");
    assert_served(&log);
}

/// After chroot (or entering another mount namespace and changing mounts
/// there) the mount table the library read no longer says which file a
/// path names: path calls must reach what the kernel reaches.
#[test]
fn paths_after_chroot_and_unshare_are_the_kernels() {
    let Some(m) = mounted("bypass-fix-chroot") else { return };
    let mnt = m.mnt.to_str().expect("utf-8").to_string();
    // The same absolute path inside the new root names an ext4 file.
    let root = m.scratch.join("root");
    let inside = root.join(mnt.trim_start_matches('/'));
    std::fs::create_dir_all(&inside).expect("mkdir");
    std::fs::write(inside.join("victim"), "jail\n").expect("write");
    std::fs::write(m.mnt.join("victim"), "mount\n").expect("write");
    std::fs::create_dir(m.mnt.join("sub")).expect("mkdir");
    let prog = cc(
        &m,
        "rootchange",
        r#"
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char p[4096], buf[64];
    struct stat st;
    /* A served descriptor first: the library is connected. */
    snprintf(p, sizeof p, "%s/victim", argv[2]);
    int fd = open(p, O_RDONLY);
    if (fd < 3) return 10;
    if (strcmp(argv[1], "chroot") == 0) {
        if (chroot(argv[3]) != 0 || chdir("/") != 0) return 11;
        /* Still served: a descriptor does not depend on paths. */
        if (pread(fd, buf, sizeof buf, 0) != 6 || memcmp(buf, "mount\n", 6) != 0) return 12;
        if (stat(p, &st) != 0 || st.st_size != 5) return 13;
        int j = open(p, O_RDONLY);
        if (j < 0 || read(j, buf, sizeof buf) != 5 || memcmp(buf, "jail\n", 5) != 0) return 14;
        if (unlink(p) != 0) return 15;
        return 0;
    }
    if (unshare(CLONE_NEWNS) != 0) return 20;
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) return 21;
    snprintf(p, sizeof p, "%s/sub", argv[2]);
    if (mount("tmpfs", p, "tmpfs", 0, NULL) != 0) return 22;
    snprintf(p, sizeof p, "%s/sub/new", argv[2]);
    int n = open(p, O_WRONLY | O_CREAT | O_EXCL, 0644);
    if (n < 0 || write(n, "tmpfs\n", 6) != 6) return 23;
    if (stat(p, &st) != 0 || st.st_size != 6) return 24;
    return 0;
}
"#,
    );
    let (out, log) =
        efuse_run(&m, &m.scratch, &[prog.to_str().expect("utf-8"), "chroot", &mnt, root.to_str().expect("utf-8")]);
    assert!(out.ok(), "exit {:?}; stderr:\n{}\nlog:\n{log}", out.code(), out.stderr);
    assert_served(&log);
    assert!(!inside.join("victim").exists(), "unlink inside the chroot missed the chroot's file");
    assert_eq!(read(m.mnt.join("victim")), "mount\n", "unlink inside the chroot reached the mount");

    let (out, log) = efuse_run(&m, &m.scratch, &[prog.to_str().expect("utf-8"), "unshare", &mnt]);
    assert!(out.ok(), "exit {:?}; stderr:\n{}\nlog:\n{log}", out.code(), out.stderr);
    assert_served(&log);
    assert!(!m.mnt.join("sub/new").exists(), "a create on the tmpfs of another namespace reached the mount");
}

/// The name-changing calls on paths that end with a slash, `.` or `..`:
/// the same results (errno or success) and the same tree as on ext4.
#[test]
fn trailing_slashes_and_dots_on_name_changing_calls_answer_as_the_kernel() {
    let Some(m) = mounted("bypass-fix-trailing") else { return };
    const SCRIPT: &str = r#"
import errno, os
def fresh():
    for name in sorted(os.listdir("."), reverse=True):
        if os.path.islink(name) or os.path.isfile(name):
            os.unlink(name)
        else:
            for sub in os.listdir(name):
                os.unlink(os.path.join(name, sub))
            os.rmdir(name)
    with open("file", "w") as f:
        f.write("data\n")
    os.mkdir("d")
    os.mkdir("e")
    os.symlink("d", "linktodir")
def tree():
    return " ".join(sorted(n + ("/" if os.path.isdir(n) and not os.path.islink(n) else "") for n in os.listdir(".")))
ops = [
    ("unlink file/", lambda: os.unlink("file/")),
    ("unlink file/.", lambda: os.unlink("file/.")),
    ("unlink linktodir/", lambda: os.unlink("linktodir/")),
    ("unlink d/", lambda: os.unlink("d/")),
    ("unlinkat d/ REMOVEDIR", lambda: os.rmdir("d/")),
    ("rmdir d/.", lambda: os.rmdir("d/.")),
    ("rmdir d/..", lambda: os.rmdir("d/..")),
    ("rmdir file/", lambda: os.rmdir("file/")),
    ("rmdir linktodir/", lambda: os.rmdir("linktodir/")),
    ("rename d/. x", lambda: os.rename("d/.", "x")),
    ("rename d/.. x", lambda: os.rename("d/..", "x")),
    ("rename file/ x", lambda: os.rename("file/", "x")),
    ("rename file x/", lambda: os.rename("file", "x/")),
    ("rename d x/", lambda: os.rename("d", "x/")),
    ("rename d/ x", lambda: os.rename("d/", "x")),
    ("rename d e/.", lambda: os.rename("d", "e/.")),
    ("rename linktodir/ x", lambda: os.rename("linktodir/", "x")),
    ("link file new/", lambda: os.link("file", "new/")),
    ("link file/ new", lambda: os.link("file/", "new")),
    ("link file e/.", lambda: os.link("file", "e/.")),
    ("symlink file s/", lambda: os.symlink("file", "s/")),
    ("mkdir n/", lambda: os.mkdir("n/")),
    ("mkdir n/.", lambda: os.mkdir("n/.")),
    ("mkdir d/.", lambda: os.mkdir("d/.")),
    ("mkdir d/..", lambda: os.mkdir("d/..")),
]
for name, op in ops:
    fresh()
    try:
        op()
        r = "ok"
    except OSError as e:
        r = errno.errorcode[e.errno]
    print(f"{name}: {r}; {tree()}")
"#;
    let script = m.scratch.join("trailing.py");
    std::fs::write(&script, SCRIPT).expect("write script");
    let script = script.to_str().expect("utf-8");
    let ext4 = Cmd::new("python3").arg(script).cwd(&m.reference).run().expect_ok();
    let (out, log) = efuse_run(&m, &m.mnt, &["python3", script]);
    let out = out.expect_ok();
    assert_served(&log);
    let diff: Vec<String> = ext4
        .stdout
        .lines()
        .zip(out.stdout.lines())
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("ext4:   {a}\nbypass: {b}"))
        .collect();
    assert!(diff.is_empty() && ext4.stdout.lines().count() == out.stdout.lines().count(), "{}", diff.join("\n"));
}

/// Descriptors closed by close_range, closefrom or a raw close: the number
/// the kernel hands out next is a new file, never the old served one.
#[test]
fn closes_the_library_does_not_see_leave_no_stale_entry() {
    let Some(m) = mounted("bypass-fix-close-range") else { return };
    std::fs::write(m.mnt.join("served"), "served data\n").expect("write");
    let other = m.scratch.join("other");
    std::fs::write(&other, "kernel file\n").expect("write");
    let prog = cc(
        &m,
        "closerange",
        r#"
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/close_range.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
static int check(int fd, int want_fd) {
    char buf[64];
    if (fd != want_fd) return 1;
    ssize_t n = read(fd, buf, sizeof buf);
    return n != 12 || memcmp(buf, "kernel file\n", 12) != 0;
}
int main(int argc, char **argv) {
    const char *other = argv[1];
    char buf[64];
    int fd, k;
    /* close_range over a served descriptor, then a kernel open. */
    fd = open("served", O_RDONLY);
    if (fd < 3) return 10;
    if (close_range(fd, ~0U, 0) != 0) return 11;
    if (check(open(other, O_RDONLY), fd)) return 12;
    close(fd);
    /* closefrom. */
    fd = open("served", O_RDONLY);
    if (fd < 3) return 20;
    closefrom(fd);
    if (check(open(other, O_RDONLY), fd)) return 21;
    close(fd);
    /* A raw close, then a dup of a kernel descriptor onto the number. */
    k = open(other, O_RDONLY);
    fd = open("served", O_RDONLY);
    if (k < 3 || fd < 3) return 30;
    syscall(SYS_close, fd);
    if (check(dup(k), fd)) return 31;
    close(fd);
    close(k);
    /* A raw close, then a served open of the same number stays exact. */
    fd = open("served", O_RDONLY);
    syscall(SYS_close, fd);
    if (open("served", O_RDONLY) != fd || read(fd, buf, sizeof buf) != 12) return 40;
    /* CLOSE_RANGE_CLOEXEC only marks: still open and served. */
    if (close_range(fd, fd, CLOSE_RANGE_CLOEXEC) != 0) return 50;
    if (fcntl(fd, F_GETFD) != FD_CLOEXEC) return 51;
    if (pread(fd, buf, 6, 0) != 6 || memcmp(buf, "served", 6) != 0) return 52;
    return 0;
}
"#,
    );
    let (out, log) = efuse_run(&m, &m.mnt, &[prog.to_str().expect("utf-8"), other.to_str().expect("utf-8")]);
    assert!(out.ok(), "exit {:?}; stderr:\n{}\nlog:\n{log}", out.code(), out.stderr);
    assert_served(&log);
}

/// Long paths: a relative path from a deep working directory that the
/// kernel accepts, and a path of PATH_MAX bytes or more (made of `./`) that
/// it refuses, answered as on ext4.
#[test]
fn long_paths_answer_as_the_kernel() {
    let Some(m) = mounted("bypass-fix-long-paths") else { return };
    const SCRIPT: &str = r#"
import errno, os, sys
def try_(name, f):
    try:
        r = f()
        print(name, "ok", r if isinstance(r, int) else "")
    except OSError as e:
        print(name, errno.errorcode[e.errno])
with open("x", "w") as f:
    f.write("x\n")
here = os.getcwd()
dots = here + "/" + "./" * 2100 + "x"
try_("stat dots", lambda: os.stat(dots).st_size)
try_("open dots", lambda: os.close(os.open(dots, os.O_RDONLY)) or 0)
try_("unlink dots", lambda: os.unlink(dots))
try_("still there", lambda: os.stat("x").st_size)
# A working directory about 3000 bytes below the root of the test tree.
deep = "/".join(["d" * 200] * 15)
os.makedirs(deep)
os.chdir(deep)
rel = "/".join(["e" * 200] * 8)
try_("mkdir long relative", lambda: os.makedirs(rel) or 0)
try_("create long relative", lambda: os.close(os.open(rel + "/f", os.O_WRONLY | os.O_CREAT, 0o644)) or 0)
try_("stat long relative", lambda: os.stat(rel + "/f").st_size)
try_("unlink long relative", lambda: os.unlink(rel + "/f"))
"#;
    let script = m.scratch.join("long.py");
    std::fs::write(&script, SCRIPT).expect("write script");
    let script = script.to_str().expect("utf-8");
    let ext4 = Cmd::new("python3").arg(script).cwd(&m.reference).run().expect_ok();
    let (out, log) = efuse_run(&m, &m.mnt, &["python3", script]);
    let out = out.expect_ok();
    assert_served(&log);
    assert!(ext4.stdout.contains("stat dots ENAMETOOLONG"), "ext4 answered:\n{}", ext4.stdout);
    assert!(ext4.stdout.contains("stat long relative ok"), "ext4 answered:\n{}", ext4.stdout);
    assert_eq!(out.stdout, ext4.stdout, "bypass (left) and ext4 (right) differ");
}

/// setfsuid to another id than the effective one, and capset dropping
/// CAP_DAC_OVERRIDE: both change one thread's credentials, which the daemon
/// (reading the process's at connection) cannot follow; what the process
/// then does must be what the kernel allows.
#[test]
fn fsuid_and_capability_changes_are_answered_as_the_kernel() {
    use std::os::unix::fs::PermissionsExt;
    let Some(m) = mounted_for_all("bypass-fix-fsuid-caps") else { return };
    std::fs::set_permissions(&m.mnt, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    std::fs::write(m.mnt.join("others"), "not root's\n").expect("write");
    std::fs::set_permissions(m.mnt.join("others"), std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::os::unix::fs::chown(m.mnt.join("others"), Some(1000), Some(1000)).expect("chown");
    let prog = cc(
        &m,
        "fsuidcaps",
        r#"
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
/* The C library exports it without declaring it. */
extern int capset(cap_user_header_t h, const cap_user_data_t d);
int main(int argc, char **argv) {
    char buf[64];
    struct stat st;
    int fd = open("mine", O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 3 || write(fd, "root's\n", 7) != 7) return 10;
    if (strcmp(argv[1], "fsuid") == 0) {
        setfsuid(65534);
        if (setfsuid(-1) != 65534) return 11;
        /* The kernel checks with the fsuid. */
        if (open("mine", O_RDONLY) >= 0 || errno != EACCES) return 12;
        int c = open("byfsuid", O_WRONLY | O_CREAT | O_EXCL, 0644);
        if (c < 0 || fstat(c, &st) != 0 || st.st_uid != 65534) return 13;
        /* Opened before: still usable. */
        if (pread(fd, buf, sizeof buf, 0) != 7) return 14;
        return 0;
    }
    struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct d[2];
    if (syscall(SYS_capget, &h, d) != 0) return 20;
    d[0].effective &= ~((1u << CAP_DAC_OVERRIDE) | (1u << CAP_DAC_READ_SEARCH));
    if (capset(&h, d) != 0) return 21;
    /* Root without CAP_DAC_OVERRIDE: another user's 0600 file is closed. */
    if (open("others", O_RDONLY) >= 0 || errno != EACCES) return 22;
    if (pread(fd, buf, sizeof buf, 0) != 7) return 23;
    return 0;
}
"#,
    );
    for what in ["fsuid", "caps"] {
        let (out, log) = efuse_run(&m, &m.mnt, &[prog.to_str().expect("utf-8"), what]);
        assert!(out.ok(), "{what}: exit {:?}; stderr:\n{}\nlog:\n{log}", out.code(), out.stderr);
        assert_served(&log);
    }
}

/// The library's own socket is out of the program's way: a program that
/// puts its own files on that number (dup2), closes it, or closes every
/// descriptor above 2 keeps being served, and its own dup2 works.
#[test]
fn programs_cannot_take_the_librarys_socket_away() {
    let Some(m) = mounted("bypass-fixes-own-socket") else { return };
    std::fs::write(m.mnt.join("f"), b"payload").unwrap();
    let src = r#"
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static int sock_fd(void) {
    DIR *d = opendir("/proc/self/fd"); struct dirent *e; char p[64], l[64]; int found = -1;
    while ((e = readdir(d))) {
        snprintf(p, sizeof p, "/proc/self/fd/%s", e->d_name);
        ssize_t n = readlink(p, l, sizeof l - 1);
        if (n > 0) { l[n] = 0; if (!strncmp(l, "socket:", 7)) found = atoi(e->d_name); }
    }
    closedir(d);
    return found;
}
static int check(const char *what) {
    char b[16] = {0};
    int fd = open("f", O_RDONLY);
    if (fd < 0 || read(fd, b, sizeof b) != 7 || strcmp(b, "payload")) { printf("%s: bad read\n", what); return 1; }
    close(fd);
    return 0;
}
int main(void) {
    if (check("first")) return 1;
    int s = sock_fd();
    if (s < 0) { printf("no socket\n"); return 2; }
    int null = open("/dev/null", O_RDONLY);
    if (dup2(null, s) != s) { printf("dup2 failed\n"); return 3; }
    if (check("after dup2 onto it")) return 4;
    if (close(s) != 0) { printf("close failed\n"); return 5; }
    if (check("after close")) return 6;
    closefrom(3);
    if (check("after closefrom")) return 7;
    printf("ok\n");
    return 0;
}
"#;
    let bin = cc(&m, "own_socket", src);
    let (out, log) = efuse_run(&m, &m.mnt, &[&bin.to_string_lossy()]);
    assert_eq!(out.stdout.trim(), "ok", "{out:?}\n{log}");
    assert_eq!(log.matches(" -> fd ").count(), 4, "every open served through the bypass:\n{log}");
}

/// A vfork child that copies one served descriptor onto another's number
/// (`dup2(x, y)`) and then execs: the program it runs reads X on `y`, and
/// the parent's own `x` and `y` still read X and Y (the child's exec-time
/// conversion used to take the table's entry for `y`, which is the
/// parent's, and reopen the child's `y` as Y with Y's offset).
#[test]
fn vfork_child_dup2_onto_a_served_number_then_exec() {
    let Some(m) = mounted("bypass-fix-vfork-dup2") else { return };
    std::fs::write(m.mnt.join("x"), "abcdefgh").expect("write x");
    std::fs::write(m.mnt.join("y"), "ABCDEFGH").expect("write y");
    let prog = cc(
        &m,
        "vforkdup",
        r#"
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
int main(void) {
    char buf[16] = {0}, cmd[64];
    int x = open("x", O_RDONLY), y = open("y", O_RDONLY);
    if (x < 3 || y < 3) return 10;
    if (read(y, buf, 2) != 2) return 11;
    snprintf(cmd, sizeof cmd, "head -c 4 <&%d", y);
    pid_t p = vfork();
    if (p == 0) {
        if (dup2(x, y) != y) _exit(20);
        char *argv[] = {"sh", "-c", cmd, NULL};
        execv("/bin/sh", argv);
        _exit(21);
    }
    int st = 0;
    waitpid(p, &st, 0);
    printf("\nchild %d\n", WEXITSTATUS(st));
    memset(buf, 0, sizeof buf);
    if (pread(x, buf, 8, 0) != 8) return 12;
    printf("x %s\n", buf);
    memset(buf, 0, sizeof buf);
    if (read(y, buf, 8) != 6) return 13;
    printf("y %s\n", buf);
    return 0;
}
"#,
    );
    let (out, log) = efuse_run(&m, &m.mnt, &[&prog.to_string_lossy()]);
    assert!(out.ok(), "{}: {}\n{}\nlog:\n{log}", out.status, out.stdout, out.stderr);
    assert_served(&log);
    assert_eq!(out.stdout, "abcd\nchild 0\nx abcdefgh\ny CDEFGH\n", "log:\n{log}");
}

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

use common::{efuse_bin, require_fuse, Cmd, Fs, Mounted, Output};

fn mounted(test: &str) -> Option<Mounted> {
    if !require_fuse(test) {
        return None;
    }
    Some(Mounted::new(Fs::Memfs, test))
}

/// `efuse run -- argv` in `cwd`; its output and the library's log.
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

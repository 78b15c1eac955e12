//! Running external commands with a time limit, and a watchdog for the
//! workloads the bench runs in its own process.
//!
//! Every external command the bench starts goes through [`run`]: a command
//! that outlives its limit is killed and reported.
//! A hung FUSE daemon blocks in-process system calls too; [`guarded`] runs
//! such a loop on a thread and, past its limit, aborts the FUSE connection so
//! the blocked calls fail instead of hanging the bench.

use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use wait_timeout::ChildExt;

/// Where commands' captured output goes (a directory under the work dir).
static SCRATCH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
static SEQ: AtomicU64 = AtomicU64::new(0);

/// Sets the directory for captured output; called once before any command.
pub fn set_scratch_dir(dir: &Path) {
    let _ = SCRATCH.set(dir.to_path_buf());
}

fn scratch_file(tag: &str) -> PathBuf {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let dir = SCRATCH.get().cloned().unwrap_or_else(std::env::temp_dir);
    dir.join(format!("{tag}-{n}.txt"))
}

/// A command as one shell-like line, for error messages and the report.
pub fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"$\\*?".contains(c)) {
            let _ = write!(s, " '{}'", a.replace('\'', r"'\''"));
        } else {
            let _ = write!(s, " {a}");
        }
    }
    s
}

/// What a finished command printed.
pub struct Output {
    pub stdout: String,
}

/// Runs `cmd` to completion within `timeout`; fails (with its stderr) unless
/// it exits 0. Output is captured through files, not pipes, so a daemon the
/// command leaves behind cannot hold us up by keeping a pipe open.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    run_to(cmd, timeout, None)
}

/// As [`run`], with standard output written to `stdout_path` (not read back).
pub fn run_to(cmd: &mut Command, timeout: Duration, stdout_path: Option<&Path>) -> Result<Output> {
    let line = display(cmd);
    let out_path = match stdout_path {
        Some(p) => p.to_path_buf(),
        None => scratch_file("stdout"),
    };
    let err_path = scratch_file("stderr");
    let out_file = File::create(&out_path).with_context(|| format!("creating {}", out_path.display()))?;
    let err_file = File::create(&err_path).with_context(|| format!("creating {}", err_path.display()))?;
    cmd.stdin(Stdio::null()).stdout(out_file).stderr(err_file);
    let status = spawn_and_wait(cmd, timeout, &line);
    let stderr = read_tail(&err_path);
    let _ = std::fs::remove_file(&err_path);
    let stdout = if stdout_path.is_none() {
        let s = std::fs::read_to_string(&out_path).unwrap_or_default();
        let _ = std::fs::remove_file(&out_path);
        s
    } else {
        String::new()
    };
    let status = status?;
    if !status.success() {
        let detail = stderr.trim();
        if detail.is_empty() {
            bail!("`{line}` failed ({status})");
        }
        bail!("`{line}` failed ({status}): {}", one_line(detail));
    }
    Ok(Output { stdout })
}

fn spawn_and_wait(cmd: &mut Command, timeout: Duration, line: &str) -> Result<ExitStatus> {
    let mut child = cmd.spawn().with_context(|| format!("starting `{}`", display(cmd)))?;
    match child.wait_timeout(timeout).context("waiting for a command")? {
        Some(status) => Ok(status),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let line = if line.is_empty() { display(cmd) } else { line.to_string() };
            Err(anyhow!("`{line}` timed out after {}s and was killed", timeout.as_secs()))
        }
    }
}

/// The last few KiB of a file: enough of an error message, never a flood.
fn read_tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    if s.len() > 4096 {
        let mut cut = s.len() - 4096;
        while !s.is_char_boundary(cut) {
            cut += 1;
        }
        s[cut..].to_string()
    } else {
        s
    }
}

/// Folds a multi-line message into one line for tables and logs.
pub fn one_line(s: &str) -> String {
    let joined: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let mut j = joined.join(" | ");
    if j.len() > 600 {
        let mut cut = 600;
        while !j.is_char_boundary(cut) {
            cut -= 1;
        }
        j.truncate(cut);
        j.push_str(" ...");
    }
    j
}

/// Runs `f` on its own thread; if it has not finished within `timeout`,
/// aborts FUSE connection `conn` (when the system is FUSE) so that whatever
/// `f` is blocked on fails, then waits for `f` to return.
pub fn guarded<T: Send>(timeout: Duration, conn: Option<u32>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::scope(|s| {
        let h = s.spawn(move || {
            let r = f();
            let _ = tx.send(());
            r
        });
        let timed_out = matches!(rx.recv_timeout(timeout), Err(mpsc::RecvTimeoutError::Timeout));
        if timed_out {
            if let Some(c) = conn {
                let _ = efuse::mount::abort_connection(c);
            }
        }
        let r = h.join().map_err(|_| anyhow!("the workload thread panicked"))?;
        if timed_out {
            let detail = match &r {
                Ok(_) => "finished late".to_string(),
                Err(e) => format!("{e:#}"),
            };
            bail!(
                "timed out after {}s{} ({detail})",
                timeout.as_secs(),
                if conn.is_some() { "; aborted the FUSE connection" } else { "" }
            );
        }
        r
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_only_what_needs_it() {
        let mut c = Command::new("fio");
        c.arg("--name=w1").arg("--filename_format=w1.$filenum").arg("a b");
        assert_eq!(display(&c), "fio --name=w1 '--filename_format=w1.$filenum' 'a b'");
    }

    #[test]
    fn timeouts_kill() {
        let e = run(Command::new("sleep").arg("5"), Duration::from_millis(200)).err().map(|e| e.to_string());
        assert!(e.unwrap_or_default().contains("timed out"));
        assert!(run(&mut Command::new("true"), Duration::from_secs(5)).is_ok());
        let e = run(Command::new("sh").arg("-c").arg("echo boom >&2; exit 3"), Duration::from_secs(5));
        assert!(e.err().map(|e| e.to_string()).unwrap_or_default().contains("boom"));
    }

    #[test]
    fn guard_reports_timeout() {
        let r: Result<()> = guarded(Duration::from_millis(50), None, || {
            std::thread::sleep(Duration::from_millis(200));
            Ok(())
        });
        assert!(r.is_err());
        assert_eq!(guarded(Duration::from_secs(5), None, || Ok(7)).ok(), Some(7));
    }
}

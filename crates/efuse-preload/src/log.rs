//! EFUSE_BYPASS_LOG: one line per decision (mount found, connected or
//! refused and why; each conversion and why; each fallback to the kernel).
//!
//! Lines are formatted on the stack and written with raw system calls; a
//! log file is opened for each line (O_APPEND), so no descriptor of the
//! library lives in the program's descriptor table between calls.

use std::fmt::Write as _;

/// A line being formatted (longer lines are cut).
pub struct Line {
    buf: [u8; 512],
    len: usize,
}

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let room = self.buf.len() - 1 - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl Line {
    pub fn new() -> Line {
        Line { buf: [0; 512], len: 0 }
    }

    /// What was written so far.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Is logging on?
pub fn enabled() -> bool {
    crate::config::get().log.is_some()
}

/// Writes one line: "efuse-preload[pid]: " + message.
pub fn emit(args: std::fmt::Arguments<'_>) {
    let Some(target) = crate::config::get().log.as_ref() else { return };
    let mut l = Line::new();
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let _ = write!(l, "efuse-preload[{pid}]: ");
    let _ = l.write_fmt(args);
    l.buf[l.len] = b'\n';
    let line = &l.buf[..l.len + 1];
    if target == b"stderr" {
        // SAFETY: writes a live buffer to descriptor 2.
        unsafe { libc::syscall(libc::SYS_write, 2, line.as_ptr(), line.len()) };
        return;
    }
    let mut path = [0u8; 4097];
    if target.len() >= path.len() {
        return;
    }
    path[..target.len()].copy_from_slice(target);
    // SAFETY: a NUL-terminated path; the descriptor is closed right away.
    unsafe {
        let fd = libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_CLOEXEC,
            0o600,
        );
        if fd >= 0 {
            libc::syscall(libc::SYS_write, fd, line.as_ptr(), line.len());
            libc::syscall(libc::SYS_close, fd);
        }
    }
}

/// Logs a line when EFUSE_BYPASS_LOG is set (arguments are only formatted then).
macro_rules! blog {
    ($($t:tt)*) => {
        if $crate::log::enabled() {
            $crate::log::emit(format_args!($($t)*));
        }
    };
}
pub(crate) use blog;

/// Shows a path (bytes) in a log line.
pub struct Show<'a>(pub &'a [u8]);

impl std::fmt::Display for Show<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(self.0))
    }
}

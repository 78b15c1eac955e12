//! What one extra, untimed repetition of a workload costs the machine:
//! system calls of every process (eBPF on raw_syscalls:sys_enter, when this
//! build carries the programs and runs as root) and context switches
//! (`ctxt` of /proc/stat). Counted apart from the timed repetitions: a
//! program on every system call slows every call a little, and more so on
//! the systems that make more of them.

use serde::Serialize;

/// Counts of one repetition, machine-wide (the workload's processes, the
/// daemon, and whatever else ran meanwhile).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Counted {
    /// None when eBPF was not available (not root, or not built).
    pub syscalls: Option<u64>,
    pub context_switches: u64,
}

/// A counter running since [`Counter::start`].
pub struct Counter {
    ctxt: u64,
    observer: Option<efuse_bpf::Observer>,
}

impl Counter {
    pub fn start() -> Counter {
        let cfg =
            efuse_bpf::ObserverConfig { daemon_pid: 0, connection: None, syscall_pid: Some(efuse_bpf::EVERY_PROCESS) };
        let observer = efuse_bpf::Observer::load(cfg).ok();
        Counter { ctxt: context_switches(), observer }
    }

    pub fn stop(self) -> Counted {
        let ctxt = context_switches();
        let syscalls = self.observer.as_ref().and_then(|o| o.snapshot().ok()).map(|s| s.syscalls_total());
        Counted { syscalls, context_switches: ctxt.saturating_sub(self.ctxt) }
    }
}

/// Context switches of the machine since boot (/proc/stat `ctxt`).
fn context_switches() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("ctxt ")).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_grow_with_work() {
        let c = Counter::start();
        for _ in 0..200 {
            std::thread::sleep(std::time::Duration::from_micros(50));
            // SAFETY: getppid has no preconditions.
            unsafe { libc::getppid() };
        }
        let n = c.stop();
        assert!(n.context_switches >= 200, "{n:?}");
        if let Some(s) = n.syscalls {
            assert!(s >= 400, "{n:?}");
        }
    }
}

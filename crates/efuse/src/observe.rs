//! Observability of one mount: the eBPF kernel-side view (`efuse-bpf`), the
//! `top` report served on the control socket, and the numbers the Prometheus
//! endpoint ([`crate::metrics`]) exports.
//!
//! The BPF programs are loaded before mount(2), so the INIT request is
//! counted too, and are filtered to this mount's FUSE connection once it is
//! known. Loading is optional: without privileges or clang at build time the
//! daemon says why once and `top` falls back to the daemon's own counters.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use efuse_abi::Opcode;
use efuse_bpf::{BpfSnapshot, Observer, ObserverConfig};
use serde::{Deserialize, Serialize};

use crate::session::SessionShared;
use crate::stats::CounterSnapshot;

/// `--bpf`: whether to load the eBPF programs at mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BpfMode {
    /// Load them when privileged; otherwise say once why not.
    Auto,
    /// Never load them.
    #[default]
    Off,
}

impl std::str::FromStr for BpfMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BpfMode::Auto),
            "off" => Ok(BpfMode::Off),
            _ => Err(format!("'{s}' is not a BPF mode (auto, off)")),
        }
    }
}

/// Observability settings of one mount.
#[derive(Debug, Clone, Default)]
pub struct ObserveOptions {
    pub bpf: BpfMode,
    /// Serve Prometheus metrics on this address (`--metrics`).
    pub metrics: Option<std::net::SocketAddr>,
}

/// The BPF programs of a mount, or why there are none.
pub struct KernelView {
    observer: Mutex<Option<Observer>>,
    why_not: Option<String>,
}

impl KernelView {
    /// Loads the programs for this process (before mount(2): see the module doc).
    /// Never fails: a failure is logged once and kept for `top` to report.
    pub fn load(mode: BpfMode) -> KernelView {
        if mode == BpfMode::Off {
            return KernelView { observer: Mutex::new(None), why_not: Some("disabled (--bpf off)".into()) };
        }
        let pid = std::process::id();
        // Counting syscalls runs a program on every syscall of the machine: opt in.
        let syscalls = std::env::var_os("EFUSE_BPF_SYSCALLS").is_some_and(|v| v == "1");
        let cfg = ObserverConfig { daemon_pid: pid, connection: None, syscall_pid: syscalls.then_some(pid) };
        match Observer::load(cfg) {
            Ok(o) => {
                tracing::info!("eBPF kernel-side counters loaded");
                KernelView { observer: Mutex::new(Some(o)), why_not: None }
            }
            Err(e) => {
                tracing::warn!("eBPF kernel-side counters unavailable (efuse top falls back to daemon counts): {e}");
                KernelView { observer: Mutex::new(None), why_not: Some(e.to_string()) }
            }
        }
    }

    /// Restricts counting to the mount's connection.
    pub fn set_connection(&self, connection: Option<u32>) {
        let mut guard = self.observer.lock().unwrap_or_else(|p| p.into_inner());
        let Some(o) = guard.as_mut() else { return };
        match connection {
            Some(c) => {
                if let Err(e) = o.set_connection(c) {
                    tracing::warn!("eBPF: could not set the connection filter, unloading: {e}");
                    *guard = None;
                }
            }
            None => {
                // Without our connection the counts would mix other mounts.
                tracing::warn!("eBPF: the mount's FUSE connection is unknown; unloading the kernel-side counters");
                *guard = None;
            }
        }
    }

    /// Detaches the programs now (threads serving `top` or metrics may outlive the mount).
    pub fn unload(&self) {
        let mut guard = self.observer.lock().unwrap_or_else(|p| p.into_inner());
        *guard = None;
    }

    /// A snapshot, or why there is none.
    pub fn snapshot(&self) -> Result<BpfSnapshot, String> {
        let guard = self.observer.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(o) => o.snapshot().map_err(|e| e.to_string()),
            None => Err(self.why_not.clone().unwrap_or_else(|| "not loaded".into())),
        }
    }
}

/// The name of a FUSE opcode number, as `efuse stats` prints it.
pub fn opcode_name(op: u32) -> String {
    match Opcode::from_u32(op) {
        Some(o) => o.name().to_string(),
        None => format!("OPCODE_{op}"),
    }
}

/// One opcode in `efuse top --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopOpcode {
    pub requests: u64,
    pub errors: u64,
    /// Kernel-side send-to-reply latency quantiles; null when the source is the daemon.
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
}

/// One daemon thread in `efuse top --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopThread {
    pub tid: u32,
    pub name: String,
    pub voluntary: u64,
    pub involuntary: u64,
}

/// What `efuse top --once --json` prints (design.md; fields are only ever added).
/// Counters are cumulative since mount.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopReport {
    /// "ebpf" (kernel tracepoints) or "daemon" (the daemon's own counters).
    pub source: String,
    /// Why the source is not "ebpf".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bpf_unavailable: Option<String>,
    pub uptime_secs: f64,
    pub requests_total: u64,
    pub opcodes: BTreeMap<String, TopOpcode>,
    /// Context switches of the daemon's threads (from /proc when the source is "daemon").
    pub context_switches: u64,
    pub threads: Vec<TopThread>,
    /// Syscalls of the daemon (eBPF with EFUSE_BPF_SYSCALLS=1), else null.
    pub syscalls: Option<u64>,
    /// Replies whose request the programs did not see being sent.
    pub unmatched_ends: u64,
}

/// Everything a mount exposes beyond `stats`: shared by the control socket and
/// the metrics endpoint.
pub struct Observability {
    shared: Arc<SessionShared>,
    pub kernel: KernelView,
}

impl Observability {
    pub fn new(shared: Arc<SessionShared>, kernel: KernelView) -> Observability {
        Observability { shared, kernel }
    }

    pub fn counters(&self) -> CounterSnapshot {
        self.shared.counters.snapshot()
    }

    pub fn uptime_secs(&self) -> f64 {
        self.shared.started.elapsed().as_secs_f64()
    }

    pub fn top(&self) -> TopReport {
        match self.kernel.snapshot() {
            Ok(snap) => self.top_from_bpf(&snap),
            Err(why) => self.top_from_daemon(why),
        }
    }

    fn top_from_bpf(&self, snap: &BpfSnapshot) -> TopReport {
        let opcodes = snap
            .opcodes
            .iter()
            .map(|o| {
                let op = TopOpcode {
                    requests: o.requests,
                    errors: o.errors,
                    p50_us: o.quantile_us(0.5),
                    p99_us: o.quantile_us(0.99),
                };
                (opcode_name(o.opcode), op)
            })
            .collect();
        TopReport {
            source: "ebpf".into(),
            bpf_unavailable: None,
            uptime_secs: self.uptime_secs(),
            requests_total: snap.requests_total(),
            opcodes,
            context_switches: snap.context_switches(),
            threads: snap
                .threads
                .iter()
                .map(|t| TopThread {
                    tid: t.tid,
                    name: t.name.clone(),
                    voluntary: t.voluntary,
                    involuntary: t.involuntary,
                })
                .collect(),
            syscalls: (!snap.syscalls.is_empty()).then(|| snap.syscalls_total()),
            unmatched_ends: snap.unmatched_ends,
        }
    }

    fn top_from_daemon(&self, why: String) -> TopReport {
        let c = self.counters();
        let opcodes = c
            .opcodes
            .iter()
            .map(|(name, o)| {
                (name.clone(), TopOpcode { requests: o.count, errors: o.errors, p50_us: None, p99_us: None })
            })
            .collect();
        let threads = proc_threads();
        TopReport {
            source: "daemon".into(),
            bpf_unavailable: Some(why),
            uptime_secs: self.uptime_secs(),
            requests_total: c.requests_total,
            opcodes,
            context_switches: threads.iter().map(|t| t.voluntary + t.involuntary).sum(),
            threads,
            syscalls: None,
            unmatched_ends: 0,
        }
    }
}

/// Context switches of this process's threads from /proc (live threads only).
fn proc_threads() -> Vec<TopThread> {
    process_threads("self")
}

/// Context switches of the threads of process `pid` (a number, or "self")
/// from /proc/PID/task/*/status, by thread id; live threads only (an
/// exited thread takes its counts with it). Empty when /proc cannot be read.
pub fn process_threads(pid: &str) -> Vec<TopThread> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for entry in dir.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else { continue };
        // A thread may be gone between the listing and the read.
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else { continue };
        out.push(thread_from_status(tid, &status));
    }
    out.sort_by_key(|t| t.tid);
    out
}

/// A thread's name and context switches from its /proc status text
/// (absent fields count as 0).
fn thread_from_status(tid: u32, status: &str) -> TopThread {
    let field = |key: &str| {
        status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0)
    };
    let name = status.lines().find_map(|l| l.strip_prefix("Name:")).unwrap_or("").trim().to_string();
    TopThread {
        tid,
        name,
        voluntary: field("voluntary_ctxt_switches:"),
        involuntary: field("nonvoluntary_ctxt_switches:"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_names() {
        assert_eq!("auto".parse::<BpfMode>(), Ok(BpfMode::Auto));
        assert!("on".parse::<BpfMode>().is_err());
        assert_eq!(opcode_name(3), "GETATTR");
        assert_eq!(opcode_name(63), "OPCODE_63");
        assert!(!proc_threads().is_empty());
    }

    #[test]
    fn switches_are_read_from_a_status_file() {
        let status = "Name:\tefuse-ring-0\nState:\tS (sleeping)\nvoluntary_ctxt_switches:\t1234\n\
                      nonvoluntary_ctxt_switches:\t56\n";
        let t = thread_from_status(7, status);
        assert_eq!((t.tid, t.name.as_str(), t.voluntary, t.involuntary), (7, "efuse-ring-0", 1234, 56));
        let t = thread_from_status(1, "Name:\tx\n");
        assert_eq!((t.voluntary, t.involuntary), (0, 0), "absent fields count as 0");
        // A field whose name another one ends with is not mistaken for it.
        let t = thread_from_status(1, "nonvoluntary_ctxt_switches:\t7\n");
        assert_eq!((t.voluntary, t.involuntary), (0, 7));
    }
}

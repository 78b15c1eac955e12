//! efuse's kernel-side view of a FUSE mount: eBPF tracepoint programs (C, in
//! `bpf/efuse.bpf.c`, compiled by clang in `build.rs`) and their loader.
//!
//! What it is for: counting, per FUSE opcode, the requests the kernel sends to
//! one mount's daemon and how long each took from send to reply (log2
//! histograms), the daemon threads' context switches, and optionally one
//! process's syscalls. What it is not for: anything per request in user space
//! (no ring buffers, no events), or knowing FUSE opcode names (`efuse-abi` does).
//!
//! Loading needs CAP_BPF and CAP_PERFMON (root) and tracefs; [`Observer::load`]
//! mounts tracefs when it is missing. Programs detach when the [`Observer`] drops.

use std::path::Path;

/// Opcode slots in the maps: FUSE opcodes are 1..=52; slot 63 collects larger ones.
pub const MAX_OPCODES: usize = 64;
/// Log2 latency buckets: bucket `b` counts send-to-end times in `[2^b, 2^(b+1))` ns.
pub const BUCKETS: usize = 64;
/// Syscall numbers counted (larger ones are ignored).
pub const MAX_SYSCALLS: usize = 512;

/// Why the kernel-side view is unavailable.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("BPF programs were not built (clang missing when efuse was compiled)")]
    NotBuilt,
    #[error("loading BPF needs root (CAP_BPF and CAP_PERFMON)")]
    NotPrivileged,
    #[error("tracefs is not mounted and mounting it at /sys/kernel/tracing failed: {0}")]
    Tracefs(std::io::Error),
    #[error("{what}: {detail}")]
    Kernel { what: String, detail: String },
}

#[cfg_attr(not(efuse_bpf_built), allow(dead_code))]
fn kernel(what: impl Into<String>, e: impl std::fmt::Display) -> BpfError {
    BpfError::Kernel { what: what.into(), detail: e.to_string() }
}

/// Counters of one FUSE opcode as the kernel saw them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpcodeStats {
    /// The FUSE opcode number (63 stands for "any opcode >= 63").
    pub opcode: u32,
    /// Requests sent to the daemon (`fuse_request_send`).
    pub requests: u64,
    /// Requests answered with an error (`fuse_request_end` with error != 0).
    pub errors: u64,
    /// Sum of send-to-end times, ns.
    pub latency_sum_ns: u64,
    /// Send-to-end times: `buckets[b]` counts those in `[2^b, 2^(b+1))` ns.
    pub buckets: [u64; BUCKETS],
}

impl OpcodeStats {
    /// Requests that have ended (and so have a latency).
    pub fn ended(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The `q` quantile (0..=1) of send-to-end time in microseconds,
    /// interpolated linearly inside its log2 bucket; None without data.
    pub fn quantile_us(&self, q: f64) -> Option<f64> {
        quantile_ns(&self.buckets, q).map(|ns| ns / 1000.0)
    }
}

/// The `q` quantile of a log2 histogram, in ns.
pub fn quantile_ns(buckets: &[u64; BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * total as f64).max(1.0);
    let mut seen = 0u64;
    for (b, &n) in buckets.iter().enumerate() {
        if n == 0 {
            continue;
        }
        if (seen + n) as f64 >= rank {
            let lo = if b == 0 { 0.0 } else { (1u128 << b) as f64 };
            let hi = (1u128 << (b + 1)) as f64;
            let frac = (rank - seen as f64) / n as f64;
            return Some(lo + (hi - lo) * frac);
        }
        seen += n;
    }
    None
}

/// Context switches of one daemon thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadSwitches {
    pub tid: u32,
    /// The thread's name (`/proc/PID/task/TID/comm`), empty once it has exited.
    pub name: String,
    /// It blocked: waited for a request, a lock, I/O.
    pub voluntary: u64,
    /// It was preempted while runnable.
    pub involuntary: u64,
}

/// Everything the programs counted since they were attached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BpfSnapshot {
    /// The connection counted (0 if none was seen yet).
    pub connection: u32,
    /// Opcodes with at least one request, by opcode number.
    pub opcodes: Vec<OpcodeStats>,
    /// Per daemon thread, by thread id.
    pub threads: Vec<ThreadSwitches>,
    /// Syscalls of the chosen process, by number (only non-zero ones).
    pub syscalls: Vec<(u32, u64)>,
    /// Replies whose send was not seen (sent before attaching, or too many in flight).
    pub unmatched_ends: u64,
}

impl BpfSnapshot {
    pub fn requests_total(&self) -> u64 {
        self.opcodes.iter().map(|o| o.requests).sum()
    }

    pub fn context_switches(&self) -> u64 {
        self.threads.iter().map(|t| t.voluntary + t.involuntary).sum()
    }

    pub fn syscalls_total(&self) -> u64 {
        self.syscalls.iter().map(|s| s.1).sum()
    }
}

/// What to watch.
#[derive(Debug, Clone, Copy)]
pub struct ObserverConfig {
    /// The daemon process: its context switches are counted, and its own
    /// mount(2) names the connection until [`Observer::set_connection`].
    pub daemon_pid: u32,
    /// The FUSE connection (the mount's device minor), if already known.
    pub connection: Option<u32>,
    /// Count this process's syscalls ([`EVERY_PROCESS`]: every process's).
    pub syscall_pid: Option<u32>,
}

/// [`ObserverConfig::syscall_pid`] that counts the syscalls of every
/// process of the machine.
pub const EVERY_PROCESS: u32 = u32::MAX;

#[cfg(efuse_bpf_built)]
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/efuse.bpf.o"));

/// Whether this build carries the BPF programs.
pub fn built() -> bool {
    cfg!(efuse_bpf_built)
}

/// Mounts tracefs at /sys/kernel/tracing unless tracefs (or debugfs's
/// tracing directory) is already there: attaching to a tracepoint reads its id there.
pub fn ensure_tracefs() -> Result<(), BpfError> {
    let candidates = ["/sys/kernel/tracing/events", "/sys/kernel/debug/tracing/events"];
    if candidates.iter().any(|p| Path::new(p).is_dir()) {
        return Ok(());
    }
    // SAFETY: all pointers are NUL-terminated literals.
    let rc = unsafe {
        libc::mount(c"nodev".as_ptr(), c"/sys/kernel/tracing".as_ptr(), c"tracefs".as_ptr(), 0, std::ptr::null())
    };
    if rc != 0 {
        return Err(BpfError::Tracefs(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The loaded, attached programs. Detached when dropped.
pub struct Observer {
    #[cfg(efuse_bpf_built)]
    ebpf: aya::Ebpf,
    #[cfg(efuse_bpf_built)]
    config: Config,
}

// The layouts below mirror the structs of bpf/efuse.bpf.c.
#[cfg(efuse_bpf_built)]
mod layout {
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    pub struct Config {
        pub connection: u32,
        pub daemon_tgid: u32,
        pub syscall_tgid: u32,
        pub pad: u32,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    pub struct Switches {
        pub voluntary: u64,
        pub involuntary: u64,
    }

    // SAFETY: plain integers, no padding, any bit pattern is valid.
    unsafe impl aya::Pod for Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Switches {}
}
#[cfg(efuse_bpf_built)]
use layout::{Config, Switches};

#[cfg(efuse_bpf_built)]
const PROGRAMS: [(&str, &str, &str); 4] = [
    ("fuse_request_send", "fuse", "fuse_request_send"),
    ("fuse_request_end", "fuse", "fuse_request_end"),
    ("sched_switch", "sched", "sched_switch"),
    ("sys_enter", "raw_syscalls", "sys_enter"),
];

impl Observer {
    /// Loads and attaches the programs.
    #[cfg(not(efuse_bpf_built))]
    pub fn load(_cfg: ObserverConfig) -> Result<Observer, BpfError> {
        Err(BpfError::NotBuilt)
    }

    /// Loads and attaches the programs.
    #[cfg(efuse_bpf_built)]
    pub fn load(cfg: ObserverConfig) -> Result<Observer, BpfError> {
        use aya::programs::TracePoint;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(BpfError::NotPrivileged);
        }
        ensure_tracefs()?;
        let ebpf = aya::Ebpf::load(PROGRAM).map_err(|e| kernel("loading the BPF object", e))?;
        let config = Config {
            connection: cfg.connection.unwrap_or(0),
            daemon_tgid: cfg.daemon_pid,
            syscall_tgid: cfg.syscall_pid.unwrap_or(0),
            pad: 0,
        };
        let mut observer = Observer { ebpf, config };
        // Configure before attaching, so nothing is counted unfiltered.
        observer.write_config()?;
        for (prog, category, event) in PROGRAMS {
            // sys_enter would run on every syscall of the machine: only when asked.
            if prog == "sys_enter" && cfg.syscall_pid.is_none() {
                continue;
            }
            let tp: &mut TracePoint = observer
                .ebpf
                .program_mut(prog)
                .ok_or_else(|| kernel(format!("program {prog}"), "missing from the object"))?
                .try_into()
                .map_err(|e| kernel(format!("program {prog}"), e))?;
            tp.load().map_err(|e| kernel(format!("verifying {prog}"), e))?;
            tp.attach(category, event).map_err(|e| kernel(format!("attaching to {category}:{event}"), e))?;
        }
        Ok(observer)
    }

    /// Counts requests of `connection` only (the mount's device minor).
    pub fn set_connection(&mut self, connection: u32) -> Result<(), BpfError> {
        #[cfg(efuse_bpf_built)]
        {
            let current = self.read_config()?;
            if current.connection != connection {
                self.config.connection = connection;
                self.write_config()?;
            }
        }
        let _ = connection;
        Ok(())
    }

    /// The connection the programs count (0: none seen yet).
    pub fn connection(&self) -> Result<u32, BpfError> {
        #[cfg(efuse_bpf_built)]
        return Ok(self.read_config()?.connection);
        #[cfg(not(efuse_bpf_built))]
        Ok(0)
    }

    #[cfg(efuse_bpf_built)]
    fn read_config(&self) -> Result<Config, BpfError> {
        let map = self.ebpf.map("config").ok_or_else(|| kernel("map config", "missing"))?;
        let arr: aya::maps::Array<_, Config> = aya::maps::Array::try_from(map).map_err(|e| kernel("map config", e))?;
        arr.get(&0, 0).map_err(|e| kernel("reading config", e))
    }

    #[cfg(efuse_bpf_built)]
    fn write_config(&mut self) -> Result<(), BpfError> {
        let map = self.ebpf.map_mut("config").ok_or_else(|| kernel("map config", "missing"))?;
        let mut arr: aya::maps::Array<_, Config> =
            aya::maps::Array::try_from(map).map_err(|e| kernel("map config", e))?;
        arr.set(0, self.config, 0).map_err(|e| kernel("writing config", e))
    }

    /// Reads every map into a snapshot (cumulative since attach).
    pub fn snapshot(&self) -> Result<BpfSnapshot, BpfError> {
        #[cfg(not(efuse_bpf_built))]
        return Err(BpfError::NotBuilt);
        #[cfg(efuse_bpf_built)]
        self.read_snapshot()
    }

    #[cfg(efuse_bpf_built)]
    fn read_snapshot(&self) -> Result<BpfSnapshot, BpfError> {
        use aya::maps::{Array, HashMap, MapData};
        let array = |name: &str| -> Result<Vec<u64>, BpfError> {
            let map = self.ebpf.map(name).ok_or_else(|| kernel(format!("map {name}"), "missing"))?;
            let arr: Array<&MapData, u64> = Array::try_from(map).map_err(|e| kernel(format!("map {name}"), e))?;
            arr.iter().collect::<Result<Vec<u64>, _>>().map_err(|e| kernel(format!("reading {name}"), e))
        };
        let requests = array("op_requests")?;
        let errors = array("op_errors")?;
        let sums = array("op_latency_sum")?;
        let latency = array("op_latency")?;
        let mut snap = BpfSnapshot { connection: self.read_config()?.connection, ..Default::default() };
        for (op, &r) in requests.iter().enumerate().take(MAX_OPCODES) {
            let mut buckets = [0u64; BUCKETS];
            if let Some(src) = latency.get(op * BUCKETS..(op + 1) * BUCKETS) {
                buckets.copy_from_slice(src);
            }
            let e = errors.get(op).copied().unwrap_or(0);
            if r == 0 && e == 0 && buckets.iter().all(|&b| b == 0) {
                continue;
            }
            snap.opcodes.push(OpcodeStats {
                opcode: op as u32,
                requests: r,
                errors: e,
                latency_sum_ns: sums.get(op).copied().unwrap_or(0),
                buckets,
            });
        }
        let map = self.ebpf.map("thread_switches").ok_or_else(|| kernel("map thread_switches", "missing"))?;
        let threads: HashMap<&MapData, u32, Switches> =
            HashMap::try_from(map).map_err(|e| kernel("map thread_switches", e))?;
        for entry in threads.iter() {
            let (tid, s) = entry.map_err(|e| kernel("reading thread_switches", e))?;
            let name = std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", self.config.daemon_tgid))
                .map(|n| n.trim().to_string())
                .unwrap_or_default();
            snap.threads.push(ThreadSwitches { tid, name, voluntary: s.voluntary, involuntary: s.involuntary });
        }
        snap.threads.sort_by_key(|t| t.tid);
        snap.syscalls =
            array("syscalls")?.into_iter().enumerate().filter(|(_, n)| *n > 0).map(|(i, n)| (i as u32, n)).collect();
        snap.unmatched_ends = array("lost")?.first().copied().unwrap_or(0);
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        let mut b = [0u64; BUCKETS];
        assert_eq!(quantile_ns(&b, 0.5), None);
        b[10] = 100; // [1024, 2048) ns
        let p50 = quantile_ns(&b, 0.5).unwrap();
        assert!((1024.0..2048.0).contains(&p50), "{p50}");
        assert_eq!(quantile_ns(&b, 1.0), Some(2048.0));
        b[20] = 1; // one slow request
        assert!(quantile_ns(&b, 0.99).unwrap() < 2048.0);
        assert!(quantile_ns(&b, 1.0).unwrap() > 1_000_000.0);
        let s = OpcodeStats { opcode: 3, requests: 101, errors: 0, latency_sum_ns: 0, buckets: b };
        assert_eq!(s.ended(), 101);
        assert!(s.quantile_us(0.5).unwrap() < 2.1);
    }

    #[test]
    fn loads_when_root() {
        // SAFETY: geteuid has no preconditions.
        if !built() {
            let e = Observer::load(ObserverConfig { daemon_pid: 1, connection: None, syscall_pid: None }).err();
            assert!(matches!(e, Some(BpfError::NotBuilt)), "{e:?}");
            assert!(e.unwrap().to_string().contains("clang missing"));
            return;
        }
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP loads_when_root: needs root");
            return;
        }
        let pid = std::process::id();
        let obs =
            Observer::load(ObserverConfig { daemon_pid: pid, connection: None, syscall_pid: Some(pid) }).expect("load");
        std::thread::sleep(std::time::Duration::from_millis(20));
        let snap = obs.snapshot().expect("snapshot");
        assert!(snap.syscalls_total() > 0, "our own syscalls are counted: {snap:?}");
        assert_eq!(snap.requests_total(), 0, "no connection configured");
    }
}

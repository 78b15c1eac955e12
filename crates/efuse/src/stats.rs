//! Daemon-side counters: requests and errors per opcode, and the data path
//! chosen for each open. Lock-free (relaxed atomics); read by `efuse stats`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use efuse_abi::consts::fopen;
use efuse_abi::Opcode;
use serde::Serialize;

const N: usize = Opcode::ALL.len();

/// Per-opcode request and error counts since mount.
pub struct Counters {
    requests: [AtomicU64; N],
    errors: [AtomicU64; N],
    /// Requests that could not be decoded (unknown opcode, malformed body).
    undecodable: AtomicU64,
    path_passthrough: AtomicU64,
    path_cached: AtomicU64,
    path_direct: AtomicU64,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            requests: std::array::from_fn(|_| AtomicU64::new(0)),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
            undecodable: AtomicU64::new(0),
            path_passthrough: AtomicU64::new(0),
            path_cached: AtomicU64::new(0),
            path_direct: AtomicU64::new(0),
        }
    }
}

impl Counters {
    #[inline]
    pub fn request(&self, op: Opcode) {
        self.requests[op.index()].fetch_add(1, Relaxed);
    }

    #[inline]
    pub fn error(&self, op: Opcode) {
        self.errors[op.index()].fetch_add(1, Relaxed);
    }

    pub fn undecodable(&self) {
        self.undecodable.fetch_add(1, Relaxed);
    }

    /// Counts the data path an OPEN/CREATE reply chose, from its `FOPEN_*` flags.
    #[inline]
    pub fn open_path(&self, open_flags: u32) {
        let c = if open_flags & fopen::PASSTHROUGH != 0 {
            &self.path_passthrough
        } else if open_flags & fopen::DIRECT_IO != 0 {
            &self.path_direct
        } else {
            &self.path_cached
        };
        c.fetch_add(1, Relaxed);
    }

    /// A consistent-enough copy for reporting.
    pub fn snapshot(&self) -> CounterSnapshot {
        let mut opcodes = std::collections::BTreeMap::new();
        let mut total = 0;
        for op in Opcode::ALL {
            let count = self.requests[op.index()].load(Relaxed);
            let errors = self.errors[op.index()].load(Relaxed);
            total += count;
            if count > 0 || errors > 0 {
                opcodes.insert(op.name().to_string(), OpcodeCount { count, errors });
            }
        }
        CounterSnapshot {
            requests_total: total,
            undecodable: self.undecodable.load(Relaxed),
            opcodes,
            paths: PathCounts {
                passthrough: self.path_passthrough.load(Relaxed),
                cached: self.path_cached.load(Relaxed),
                direct: self.path_direct.load(Relaxed),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq, Eq, Default)]
pub struct OpcodeCount {
    pub count: u64,
    pub errors: u64,
}

#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq, Eq, Default)]
pub struct PathCounts {
    pub passthrough: u64,
    pub cached: u64,
    pub direct: u64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq, Default)]
pub struct CounterSnapshot {
    pub requests_total: u64,
    pub undecodable: u64,
    pub opcodes: std::collections::BTreeMap<String, OpcodeCount>,
    pub paths: PathCounts,
}

/// What `efuse stats --json` prints (design.md; fields are only ever added).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct StatsReport {
    pub transport: String,
    pub threads: usize,
    pub fs: String,
    pub mountpoint: String,
    pub pid: u32,
    pub uptime_secs: f64,
    pub requests_total: u64,
    pub undecodable: u64,
    pub opcodes: std::collections::BTreeMap<String, OpcodeCount>,
    pub paths: PathCounts,
    /// What the file system holds now ([`crate::Filesystem::usage`]).
    #[serde(default)]
    pub usage: FsUsage,
    /// Bypass clients connected now.
    #[serde(default)]
    pub bypass_clients: u64,
    /// Requests bypass clients sent since mount.
    #[serde(default)]
    pub bypass_requests: u64,
    /// Bypass metadata tables now (one per set of credentials).
    #[serde(default)]
    pub bypass_tables: u64,
}

/// What a file system holds now, for `efuse stats`: each field is None when
/// the file system does not say. After a load ends and the kernel forgets
/// its inodes (FORGET), these go back to what they were before it.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq, Eq, Default)]
pub struct FsUsage {
    /// Inodes kept in memory (memfs: every inode; stackfs: the nodes the
    /// kernel holds lookups on, and the root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inodes: Option<u64>,
    /// Bytes of file data held (memfs: blocks taken from its pool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_bytes: Option<u64>,
    /// Descriptors held on backing files (stackfs: cached and pinned `O_PATH`
    /// descriptors and cached descriptors of open files and directories).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub descriptors: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_paths() {
        let c = Counters::default();
        c.request(Opcode::Lookup);
        c.request(Opcode::Lookup);
        c.error(Opcode::Lookup);
        c.request(Opcode::Open);
        c.open_path(0);
        c.open_path(fopen::DIRECT_IO);
        c.open_path(fopen::PASSTHROUGH | fopen::KEEP_CACHE);
        let s = c.snapshot();
        assert_eq!(s.requests_total, 3);
        assert_eq!(s.opcodes["LOOKUP"], OpcodeCount { count: 2, errors: 1 });
        assert!(!s.opcodes.contains_key("READ"));
        assert_eq!(s.paths, PathCounts { passthrough: 1, cached: 1, direct: 1 });
    }
}

//! The sizes of every workload, full and `--quick`, scaled to this machine
//! (2 cores, 24 GiB): the shape of eFUSE's and bt-fuse's workloads, smaller.

use serde::Serialize;

/// One fio workload's shape.
#[derive(Clone, Debug, Serialize)]
pub struct FioShape {
    /// Number of files, shared by all jobs.
    pub files: u32,
    /// Size of each file in KiB.
    pub file_kib: u64,
    /// Block size in KiB.
    pub block_kib: u64,
    pub jobs: u32,
    pub iodepth: u32,
}

/// Every size and count the bench uses.
#[derive(Clone, Debug, Serialize)]
pub struct Scale {
    pub name: &'static str,
    pub reps: u32,
    /// Seconds per fio run.
    pub fio_runtime_s: u32,
    pub w1: FioShape,
    pub w2: FioShape,
    pub w3: FioShape,
    /// Fresh `cat` processes reading one small file.
    pub cat_runs: u32,
    /// open/read/close of one small file in the bench's own process.
    pub open_loops: u32,
    /// Size of that small file in bytes.
    pub small_file_bytes: usize,
    /// Files stat'ed, and how many passes over them.
    pub stat_files: u32,
    pub stat_passes: u32,
    /// Entries (files and directories) in the tree `find` walks.
    pub find_entries: u32,
    /// Files in the tarball, and their total size aimed at (MiB).
    pub tar_files: u32,
    pub tar_target_mib: u64,
    /// Sequential write and read file size (MiB), in 1 MiB blocks.
    pub seq_mib: u64,
    /// Regular files of the system's C headers copied into the source tree
    /// (`grep -r`, the real untar, `cp -r`, `git status`); fewer if the
    /// headers directory has fewer.
    pub src_files: u32,
    /// memfs capacity (everything above fits).
    pub memfs_size: &'static str,
}

impl Scale {
    pub fn full() -> Scale {
        Scale {
            name: "full",
            reps: 3,
            fio_runtime_s: 10,
            w1: FioShape { files: 1, file_kib: 1 << 20, block_kib: 4, jobs: 2, iodepth: 32 },
            w2: FioShape { files: 50, file_kib: 512, block_kib: 4, jobs: 2, iodepth: 32 },
            w3: FioShape { files: 4, file_kib: 512 << 10, block_kib: 1024, jobs: 2, iodepth: 16 },
            cat_runs: 10_000,
            open_loops: 100_000,
            small_file_bytes: 4096,
            stat_files: 10_000,
            stat_passes: 5,
            find_entries: 50_000,
            tar_files: 30_000,
            tar_target_mib: 300,
            seq_mib: 2048,
            src_files: 20_000,
            memfs_size: "6G",
        }
    }

    pub fn quick() -> Scale {
        Scale {
            name: "quick",
            reps: 1,
            fio_runtime_s: 2,
            w1: FioShape { files: 1, file_kib: 256 << 10, block_kib: 4, jobs: 2, iodepth: 32 },
            w2: FioShape { files: 50, file_kib: 512, block_kib: 4, jobs: 2, iodepth: 32 },
            w3: FioShape { files: 2, file_kib: 256 << 10, block_kib: 1024, jobs: 2, iodepth: 16 },
            cat_runs: 1_000,
            open_loops: 10_000,
            small_file_bytes: 4096,
            stat_files: 2_000,
            stat_passes: 5,
            find_entries: 10_000,
            tar_files: 3_000,
            tar_target_mib: 30,
            seq_mib: 256,
            src_files: 2_000,
            memfs_size: "2G",
        }
    }

    /// One paragraph for the report: how this compares to the originals.
    pub fn describe(&self) -> String {
        let fio = |n: &str, s: &FioShape| {
            format!(
                "{n}: {} x {} file(s), {} blocks, {} jobs x iodepth {}",
                s.files,
                human_kib(s.file_kib),
                human_kib(s.block_kib),
                s.jobs,
                s.iodepth
            )
        };
        format!(
            "Scale `{}`: {} repetition(s), median reported. fio (randrw, rwmixread=70, libaio, {} s per run): {}; {}; {} \
             (eFUSE used 1 x 1 GiB / 50 x 512 KiB / 5 x 2 GiB with 8-16 jobs and iodepth 64-256 for 60-120 s). \
             cat storm: {} fresh `cat`s of one {}-byte file; open/read/close: {} in one process; stat storm: {} files x {} passes; \
             find: {} entries; untar/rm: {} files, ~{} MiB; sequential: {} MiB in 1 MiB blocks; source tree (grep -r, \
             untar, cp -r, git status): up to {} files of the C headers. memfs capacity {}.",
            self.name,
            self.reps,
            self.fio_runtime_s,
            fio("W1", &self.w1),
            fio("W2", &self.w2),
            fio("W3", &self.w3),
            self.cat_runs,
            self.small_file_bytes,
            self.open_loops,
            self.stat_files,
            self.stat_passes,
            self.find_entries,
            self.tar_files,
            self.tar_target_mib,
            self.seq_mib,
            self.src_files,
            self.memfs_size,
        )
    }
}

pub fn human_kib(kib: u64) -> String {
    if kib >= 1 << 20 && kib.is_multiple_of(1 << 20) {
        format!("{} GiB", kib >> 20)
    } else if kib >= 1024 && kib.is_multiple_of(1024) {
        format!("{} MiB", kib >> 10)
    } else {
        format!("{kib} KiB")
    }
}

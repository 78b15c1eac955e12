//! Flag and constant values of the FUSE protocol, grouped by the field they go in.

/// `fuse_init_in.flags` / `fuse_init_out.flags`, with bits 32..63 carried in `flags2`.
pub mod init {
    pub const ASYNC_READ: u64 = 1 << 0;
    pub const POSIX_LOCKS: u64 = 1 << 1;
    pub const FILE_OPS: u64 = 1 << 2;
    pub const ATOMIC_O_TRUNC: u64 = 1 << 3;
    pub const EXPORT_SUPPORT: u64 = 1 << 4;
    pub const BIG_WRITES: u64 = 1 << 5;
    pub const DONT_MASK: u64 = 1 << 6;
    pub const SPLICE_WRITE: u64 = 1 << 7;
    pub const SPLICE_MOVE: u64 = 1 << 8;
    pub const SPLICE_READ: u64 = 1 << 9;
    pub const FLOCK_LOCKS: u64 = 1 << 10;
    pub const HAS_IOCTL_DIR: u64 = 1 << 11;
    pub const AUTO_INVAL_DATA: u64 = 1 << 12;
    pub const DO_READDIRPLUS: u64 = 1 << 13;
    pub const READDIRPLUS_AUTO: u64 = 1 << 14;
    pub const ASYNC_DIO: u64 = 1 << 15;
    pub const WRITEBACK_CACHE: u64 = 1 << 16;
    pub const NO_OPEN_SUPPORT: u64 = 1 << 17;
    pub const PARALLEL_DIROPS: u64 = 1 << 18;
    pub const HANDLE_KILLPRIV: u64 = 1 << 19;
    pub const POSIX_ACL: u64 = 1 << 20;
    pub const ABORT_ERROR: u64 = 1 << 21;
    pub const MAX_PAGES: u64 = 1 << 22;
    pub const CACHE_SYMLINKS: u64 = 1 << 23;
    pub const NO_OPENDIR_SUPPORT: u64 = 1 << 24;
    pub const EXPLICIT_INVAL_DATA: u64 = 1 << 25;
    pub const MAP_ALIGNMENT: u64 = 1 << 26;
    pub const SUBMOUNTS: u64 = 1 << 27;
    pub const HANDLE_KILLPRIV_V2: u64 = 1 << 28;
    pub const SETXATTR_EXT: u64 = 1 << 29;
    pub const INIT_EXT: u64 = 1 << 30;
    pub const INIT_RESERVED: u64 = 1 << 31;
    pub const SECURITY_CTX: u64 = 1 << 32;
    pub const HAS_INODE_DAX: u64 = 1 << 33;
    pub const CREATE_SUPP_GROUP: u64 = 1 << 34;
    pub const HAS_EXPIRE_ONLY: u64 = 1 << 35;
    pub const DIRECT_IO_ALLOW_MMAP: u64 = 1 << 36;
    pub const PASSTHROUGH: u64 = 1 << 37;
    pub const NO_EXPORT_SUPPORT: u64 = 1 << 38;
    pub const HAS_RESEND: u64 = 1 << 39;
    pub const ALLOW_IDMAP: u64 = 1 << 40;
    pub const OVER_IO_URING: u64 = 1 << 41;
    pub const REQUEST_TIMEOUT: u64 = 1 << 42;

    /// Names of the flags, for logs.
    pub const NAMES: &[(u64, &str)] = &[
        (ASYNC_READ, "ASYNC_READ"),
        (POSIX_LOCKS, "POSIX_LOCKS"),
        (FILE_OPS, "FILE_OPS"),
        (ATOMIC_O_TRUNC, "ATOMIC_O_TRUNC"),
        (EXPORT_SUPPORT, "EXPORT_SUPPORT"),
        (BIG_WRITES, "BIG_WRITES"),
        (DONT_MASK, "DONT_MASK"),
        (SPLICE_WRITE, "SPLICE_WRITE"),
        (SPLICE_MOVE, "SPLICE_MOVE"),
        (SPLICE_READ, "SPLICE_READ"),
        (FLOCK_LOCKS, "FLOCK_LOCKS"),
        (HAS_IOCTL_DIR, "HAS_IOCTL_DIR"),
        (AUTO_INVAL_DATA, "AUTO_INVAL_DATA"),
        (DO_READDIRPLUS, "DO_READDIRPLUS"),
        (READDIRPLUS_AUTO, "READDIRPLUS_AUTO"),
        (ASYNC_DIO, "ASYNC_DIO"),
        (WRITEBACK_CACHE, "WRITEBACK_CACHE"),
        (NO_OPEN_SUPPORT, "NO_OPEN_SUPPORT"),
        (PARALLEL_DIROPS, "PARALLEL_DIROPS"),
        (HANDLE_KILLPRIV, "HANDLE_KILLPRIV"),
        (POSIX_ACL, "POSIX_ACL"),
        (ABORT_ERROR, "ABORT_ERROR"),
        (MAX_PAGES, "MAX_PAGES"),
        (CACHE_SYMLINKS, "CACHE_SYMLINKS"),
        (NO_OPENDIR_SUPPORT, "NO_OPENDIR_SUPPORT"),
        (EXPLICIT_INVAL_DATA, "EXPLICIT_INVAL_DATA"),
        (MAP_ALIGNMENT, "MAP_ALIGNMENT"),
        (SUBMOUNTS, "SUBMOUNTS"),
        (HANDLE_KILLPRIV_V2, "HANDLE_KILLPRIV_V2"),
        (SETXATTR_EXT, "SETXATTR_EXT"),
        (INIT_EXT, "INIT_EXT"),
        (INIT_RESERVED, "INIT_RESERVED"),
        (SECURITY_CTX, "SECURITY_CTX"),
        (HAS_INODE_DAX, "HAS_INODE_DAX"),
        (CREATE_SUPP_GROUP, "CREATE_SUPP_GROUP"),
        (HAS_EXPIRE_ONLY, "HAS_EXPIRE_ONLY"),
        (DIRECT_IO_ALLOW_MMAP, "DIRECT_IO_ALLOW_MMAP"),
        (PASSTHROUGH, "PASSTHROUGH"),
        (NO_EXPORT_SUPPORT, "NO_EXPORT_SUPPORT"),
        (HAS_RESEND, "HAS_RESEND"),
        (ALLOW_IDMAP, "ALLOW_IDMAP"),
        (OVER_IO_URING, "OVER_IO_URING"),
        (REQUEST_TIMEOUT, "REQUEST_TIMEOUT"),
    ];

    /// A `|`-separated list of the names of the set flags.
    pub fn describe(flags: u64) -> String {
        let mut out = String::new();
        for (bit, name) in NAMES {
            if flags & bit != 0 {
                if !out.is_empty() {
                    out.push('|');
                }
                out.push_str(name);
            }
        }
        out
    }
}

/// `fuse_setattr_in.valid`.
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
    pub const LOCKOWNER: u32 = 1 << 9;
    pub const CTIME: u32 = 1 << 10;
    pub const KILL_SUIDGID: u32 = 1 << 11;
}

/// `fuse_open_out.open_flags`.
pub mod fopen {
    pub const DIRECT_IO: u32 = 1 << 0;
    pub const KEEP_CACHE: u32 = 1 << 1;
    pub const NONSEEKABLE: u32 = 1 << 2;
    pub const CACHE_DIR: u32 = 1 << 3;
    pub const STREAM: u32 = 1 << 4;
    pub const NOFLUSH: u32 = 1 << 5;
    pub const PARALLEL_DIRECT_WRITES: u32 = 1 << 6;
    pub const PASSTHROUGH: u32 = 1 << 7;
}

/// `fuse_open_in.open_flags` / `fuse_create_in.open_flags`.
pub const OPEN_KILL_SUIDGID: u32 = 1 << 0;

/// `fuse_release_in.release_flags`.
pub mod release {
    pub const FLUSH: u32 = 1 << 0;
    pub const FLOCK_UNLOCK: u32 = 1 << 1;
}

/// `fuse_getattr_in.getattr_flags`.
pub const GETATTR_FH: u32 = 1 << 0;
/// `fuse_lk_in.lk_flags`: the lock is a BSD `flock`, not a POSIX record lock.
pub const LK_FLOCK: u32 = 1 << 0;

/// `fuse_write_in.write_flags`.
pub mod write {
    pub const CACHE: u32 = 1 << 0;
    pub const LOCKOWNER: u32 = 1 << 1;
    pub const KILL_SUIDGID: u32 = 1 << 2;
}

/// `fuse_read_in.read_flags`.
pub const READ_LOCKOWNER: u32 = 1 << 1;
/// `fuse_fsync_in.fsync_flags`.
pub const FSYNC_FDATASYNC: u32 = 1 << 0;
/// `fuse_attr.flags`.
pub const ATTR_SUBMOUNT: u32 = 1 << 0;
pub const ATTR_DAX: u32 = 1 << 1;
/// `fuse_setxattr_in.setxattr_flags`.
pub const SETXATTR_ACL_KILL_SGID: u32 = 1 << 0;
/// `fuse_notify_inval_entry_out.flags`.
pub const EXPIRE_ONLY: u32 = 1 << 0;
/// High bit of `fuse_in_header.unique` on a resent request.
pub const UNIQUE_RESEND: u64 = 1 << 63;
/// uid/gid the kernel sends when an idmapping cannot map the caller.
pub const INVALID_UIDGID: u32 = u32::MAX;

/// Extension types at the end of a request (`fuse_ext_header.type`).
pub mod ext {
    pub const MAX_NR_SECCTX: u32 = 31;
    pub const GROUPS: u32 = 32;
}

/// `fuse_notify_code`: the `error` field of an unsolicited message.
pub mod notify {
    pub const POLL: i32 = 1;
    pub const INVAL_INODE: i32 = 2;
    pub const INVAL_ENTRY: i32 = 3;
    pub const STORE: i32 = 4;
    pub const RETRIEVE: i32 = 5;
    pub const DELETE: i32 = 6;
    pub const RESEND: i32 = 7;
    pub const INC_EPOCH: i32 = 8;
    pub const PRUNE: i32 = 9;
}

/// Device ioctls on `/dev/fuse`.
pub mod ioctl {
    const MAGIC: u64 = 229;
    const IOC_WRITE: u64 = 1;
    const IOC_READ: u64 = 2;
    const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
        (dir << 30) | (size << 16) | (MAGIC << 8) | nr
    }
    /// `_IOR(229, 0, uint32_t)`: attach a new fd to an existing connection.
    pub const DEV_IOC_CLONE: u64 = ioc(IOC_READ, 0, 4);
    /// `_IOW(229, 1, struct fuse_backing_map)`: register a backing file.
    pub const DEV_IOC_BACKING_OPEN: u64 = ioc(IOC_WRITE, 1, 16);
    /// `_IOW(229, 2, uint32_t)`: drop a backing file id.
    pub const DEV_IOC_BACKING_CLOSE: u64 = ioc(IOC_WRITE, 2, 4);
    /// `_IO(229, 3)`: ask for INIT only after the daemon is ready.
    pub const DEV_IOC_SYNC_INIT: u64 = ioc(0, 3, 0);
}

/// FUSE-over-io_uring command codes (`enum fuse_uring_cmd`).
pub mod uring {
    pub const CMD_INVALID: u32 = 0;
    pub const CMD_REGISTER: u32 = 1;
    pub const CMD_COMMIT_AND_FETCH: u32 = 2;
    /// Size of the in/out header area of `fuse_uring_req_header`.
    pub const IN_OUT_HEADER_SZ: usize = 128;
    /// Size of the per-opcode area of `fuse_uring_req_header`.
    pub const OP_IN_OUT_SZ: usize = 128;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel() {
        // Values computed by the C macros on x86_64.
        assert_eq!(ioctl::DEV_IOC_CLONE, 0x8004_e500);
        assert_eq!(ioctl::DEV_IOC_BACKING_OPEN, 0x4010_e501);
        assert_eq!(ioctl::DEV_IOC_BACKING_CLOSE, 0x4004_e502);
        assert_eq!(ioctl::DEV_IOC_SYNC_INIT, 0xe503);
    }

    #[test]
    fn describe_names_flags() {
        assert_eq!(init::describe(init::ASYNC_READ | init::PASSTHROUGH), "ASYNC_READ|PASSTHROUGH");
        assert_eq!(init::describe(0), "");
    }
}

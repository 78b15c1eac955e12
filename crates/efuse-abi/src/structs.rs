//! The fixed-size structures of `include/uapi/linux/fuse.h`, field for field.
//!
//! All are `#[repr(C)]`, padded to 64 bits like the C originals, and derive
//! zerocopy's traits so they can be read from and written to byte buffers
//! without `unsafe`. Reads copy (`read_from_prefix`), so request buffers need no
//! particular alignment.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

macro_rules! abi_struct {
    ($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
        pub struct $name { $($(#[$fm])* pub $f: $t),* }
    };
}

abi_struct! {
    /// `struct fuse_attr`.
    pub struct Attr {
        pub ino: u64,
        pub size: u64,
        pub blocks: u64,
        pub atime: u64,
        pub mtime: u64,
        pub ctime: u64,
        pub atimensec: u32,
        pub mtimensec: u32,
        pub ctimensec: u32,
        pub mode: u32,
        pub nlink: u32,
        pub uid: u32,
        pub gid: u32,
        pub rdev: u32,
        pub blksize: u32,
        pub flags: u32,
    }
}

abi_struct! {
    /// `struct fuse_sx_time`, bit-compatible with `struct statx_timestamp`.
    pub struct SxTime {
        pub tv_sec: i64,
        pub tv_nsec: u32,
        pub reserved: i32,
    }
}

abi_struct! {
    /// `struct fuse_statx`, bit-compatible with `struct statx`.
    pub struct Statx {
        pub mask: u32,
        pub blksize: u32,
        pub attributes: u64,
        pub nlink: u32,
        pub uid: u32,
        pub gid: u32,
        pub mode: u16,
        pub spare0: u16,
        pub ino: u64,
        pub size: u64,
        pub blocks: u64,
        pub attributes_mask: u64,
        pub atime: SxTime,
        pub btime: SxTime,
        pub ctime: SxTime,
        pub mtime: SxTime,
        pub rdev_major: u32,
        pub rdev_minor: u32,
        pub dev_major: u32,
        pub dev_minor: u32,
        pub spare2: [u64; 14],
    }
}

abi_struct! {
    /// `struct fuse_kstatfs`.
    pub struct Kstatfs {
        pub blocks: u64,
        pub bfree: u64,
        pub bavail: u64,
        pub files: u64,
        pub ffree: u64,
        pub bsize: u32,
        pub namelen: u32,
        pub frsize: u32,
        pub padding: u32,
        pub spare: [u32; 6],
    }
}

abi_struct! {
    /// `struct fuse_file_lock`.
    pub struct FileLock {
        pub start: u64,
        pub end: u64,
        pub typ: u32,
        pub pid: u32,
    }
}

abi_struct! {
    /// `struct fuse_entry_out`.
    pub struct EntryOut {
        pub nodeid: u64,
        pub generation: u64,
        pub entry_valid: u64,
        pub attr_valid: u64,
        pub entry_valid_nsec: u32,
        pub attr_valid_nsec: u32,
        pub attr: Attr,
    }
}

abi_struct! {
    /// `struct fuse_forget_in`.
    pub struct ForgetIn { pub nlookup: u64 }
}

abi_struct! {
    /// `struct fuse_forget_one`.
    pub struct ForgetOne { pub nodeid: u64, pub nlookup: u64 }
}

abi_struct! {
    /// `struct fuse_batch_forget_in`.
    pub struct BatchForgetIn { pub count: u32, pub dummy: u32 }
}

abi_struct! {
    /// `struct fuse_getattr_in`.
    pub struct GetattrIn { pub getattr_flags: u32, pub dummy: u32, pub fh: u64 }
}

abi_struct! {
    /// `struct fuse_attr_out`.
    pub struct AttrOut {
        pub attr_valid: u64,
        pub attr_valid_nsec: u32,
        pub dummy: u32,
        pub attr: Attr,
    }
}

abi_struct! {
    /// `struct fuse_statx_in`.
    pub struct StatxIn {
        pub getattr_flags: u32,
        pub reserved: u32,
        pub fh: u64,
        pub sx_flags: u32,
        pub sx_mask: u32,
    }
}

abi_struct! {
    /// `struct fuse_statx_out`.
    pub struct StatxOut {
        pub attr_valid: u64,
        pub attr_valid_nsec: u32,
        pub flags: u32,
        pub spare: [u64; 2],
        pub stat: Statx,
    }
}

abi_struct! {
    /// `struct fuse_mknod_in`.
    pub struct MknodIn { pub mode: u32, pub rdev: u32, pub umask: u32, pub padding: u32 }
}

abi_struct! {
    /// `struct fuse_mkdir_in`.
    pub struct MkdirIn { pub mode: u32, pub umask: u32 }
}

abi_struct! {
    /// `struct fuse_rename_in`.
    pub struct RenameIn { pub newdir: u64 }
}

abi_struct! {
    /// `struct fuse_rename2_in`.
    pub struct Rename2In { pub newdir: u64, pub flags: u32, pub padding: u32 }
}

abi_struct! {
    /// `struct fuse_link_in`.
    pub struct LinkIn { pub oldnodeid: u64 }
}

abi_struct! {
    /// `struct fuse_setattr_in`.
    pub struct SetattrIn {
        pub valid: u32,
        pub padding: u32,
        pub fh: u64,
        pub size: u64,
        pub lock_owner: u64,
        pub atime: u64,
        pub mtime: u64,
        pub ctime: u64,
        pub atimensec: u32,
        pub mtimensec: u32,
        pub ctimensec: u32,
        pub mode: u32,
        pub unused4: u32,
        pub uid: u32,
        pub gid: u32,
        pub unused5: u32,
    }
}

abi_struct! {
    /// `struct fuse_open_in`.
    pub struct OpenIn { pub flags: u32, pub open_flags: u32 }
}

abi_struct! {
    /// `struct fuse_create_in`.
    pub struct CreateIn { pub flags: u32, pub mode: u32, pub umask: u32, pub open_flags: u32 }
}

abi_struct! {
    /// `struct fuse_open_out`.
    pub struct OpenOut { pub fh: u64, pub open_flags: u32, pub backing_id: i32 }
}

abi_struct! {
    /// `struct fuse_release_in`.
    pub struct ReleaseIn { pub fh: u64, pub flags: u32, pub release_flags: u32, pub lock_owner: u64 }
}

abi_struct! {
    /// `struct fuse_flush_in`.
    pub struct FlushIn { pub fh: u64, pub unused: u32, pub padding: u32, pub lock_owner: u64 }
}

abi_struct! {
    /// `struct fuse_read_in`.
    pub struct ReadIn {
        pub fh: u64,
        pub offset: u64,
        pub size: u32,
        pub read_flags: u32,
        pub lock_owner: u64,
        pub flags: u32,
        pub padding: u32,
    }
}

abi_struct! {
    /// `struct fuse_write_in`.
    pub struct WriteIn {
        pub fh: u64,
        pub offset: u64,
        pub size: u32,
        pub write_flags: u32,
        pub lock_owner: u64,
        pub flags: u32,
        pub padding: u32,
    }
}

abi_struct! {
    /// `struct fuse_write_out`.
    pub struct WriteOut { pub size: u32, pub padding: u32 }
}

abi_struct! {
    /// `struct fuse_statfs_out`.
    pub struct StatfsOut { pub st: Kstatfs }
}

abi_struct! {
    /// `struct fuse_fsync_in`.
    pub struct FsyncIn { pub fh: u64, pub fsync_flags: u32, pub padding: u32 }
}

abi_struct! {
    /// `struct fuse_setxattr_in` without the 7.33 extension (`FUSE_SETXATTR_EXT` off).
    pub struct SetxattrInCompat { pub size: u32, pub flags: u32 }
}

abi_struct! {
    /// `struct fuse_setxattr_in` (`FUSE_SETXATTR_EXT` on).
    pub struct SetxattrIn { pub size: u32, pub flags: u32, pub setxattr_flags: u32, pub padding: u32 }
}

abi_struct! {
    /// `struct fuse_getxattr_in`.
    pub struct GetxattrIn { pub size: u32, pub padding: u32 }
}

abi_struct! {
    /// `struct fuse_getxattr_out`.
    pub struct GetxattrOut { pub size: u32, pub padding: u32 }
}

abi_struct! {
    /// `struct fuse_lk_in`.
    pub struct LkIn { pub fh: u64, pub owner: u64, pub lk: FileLock, pub lk_flags: u32, pub padding: u32 }
}

abi_struct! {
    /// `struct fuse_lk_out`.
    pub struct LkOut { pub lk: FileLock }
}

abi_struct! {
    /// `struct fuse_access_in`.
    pub struct AccessIn { pub mask: u32, pub padding: u32 }
}

abi_struct! {
    /// `struct fuse_init_in` as of 7.36 (the kernel sends the long form when it sets
    /// `FUSE_INIT_EXT`; older kernels send only the first 16 bytes).
    pub struct InitIn {
        pub major: u32,
        pub minor: u32,
        pub max_readahead: u32,
        pub flags: u32,
        pub flags2: u32,
        pub unused: [u32; 11],
    }
}

abi_struct! {
    /// `struct fuse_init_out`.
    pub struct InitOut {
        pub major: u32,
        pub minor: u32,
        pub max_readahead: u32,
        pub flags: u32,
        pub max_background: u16,
        pub congestion_threshold: u16,
        pub max_write: u32,
        pub time_gran: u32,
        pub max_pages: u16,
        pub map_alignment: u16,
        pub flags2: u32,
        pub max_stack_depth: u32,
        pub request_timeout: u16,
        pub unused: [u16; 11],
    }
}

abi_struct! {
    /// `struct fuse_interrupt_in`.
    pub struct InterruptIn { pub unique: u64 }
}

abi_struct! {
    /// `struct fuse_bmap_in`.
    pub struct BmapIn { pub block: u64, pub blocksize: u32, pub padding: u32 }
}

abi_struct! {
    /// `struct fuse_bmap_out`.
    pub struct BmapOut { pub block: u64 }
}

abi_struct! {
    /// `struct fuse_ioctl_in`.
    pub struct IoctlIn {
        pub fh: u64,
        pub flags: u32,
        pub cmd: u32,
        pub arg: u64,
        pub in_size: u32,
        pub out_size: u32,
    }
}

abi_struct! {
    /// `struct fuse_ioctl_out`.
    pub struct IoctlOut { pub result: i32, pub flags: u32, pub in_iovs: u32, pub out_iovs: u32 }
}

abi_struct! {
    /// `struct fuse_poll_in`.
    pub struct PollIn { pub fh: u64, pub kh: u64, pub flags: u32, pub events: u32 }
}

abi_struct! {
    /// `struct fuse_poll_out`.
    pub struct PollOut { pub revents: u32, pub padding: u32 }
}

abi_struct! {
    /// `struct fuse_fallocate_in`.
    pub struct FallocateIn { pub fh: u64, pub offset: u64, pub length: u64, pub mode: u32, pub padding: u32 }
}

abi_struct! {
    /// `struct fuse_in_header`.
    pub struct InHeader {
        pub len: u32,
        pub opcode: u32,
        pub unique: u64,
        pub nodeid: u64,
        pub uid: u32,
        pub gid: u32,
        pub pid: u32,
        pub total_extlen: u16,
        pub padding: u16,
    }
}

abi_struct! {
    /// `struct fuse_out_header`.
    pub struct OutHeader { pub len: u32, pub error: i32, pub unique: u64 }
}

abi_struct! {
    /// `struct fuse_dirent` without its trailing name.
    pub struct Dirent { pub ino: u64, pub off: u64, pub namelen: u32, pub typ: u32 }
}

abi_struct! {
    /// `struct fuse_direntplus` without its trailing name.
    pub struct DirentPlus { pub entry_out: EntryOut, pub dirent: Dirent }
}

abi_struct! {
    /// `struct fuse_notify_inval_inode_out`.
    pub struct NotifyInvalInodeOut { pub ino: u64, pub off: i64, pub len: i64 }
}

abi_struct! {
    /// `struct fuse_notify_inval_entry_out`.
    pub struct NotifyInvalEntryOut { pub parent: u64, pub namelen: u32, pub flags: u32 }
}

abi_struct! {
    /// `struct fuse_notify_delete_out`.
    pub struct NotifyDeleteOut { pub parent: u64, pub child: u64, pub namelen: u32, pub padding: u32 }
}

abi_struct! {
    /// `struct fuse_notify_store_out`.
    pub struct NotifyStoreOut { pub nodeid: u64, pub offset: u64, pub size: u32, pub padding: u32 }
}

abi_struct! {
    /// `struct fuse_notify_retrieve_out`.
    pub struct NotifyRetrieveOut {
        pub notify_unique: u64,
        pub nodeid: u64,
        pub offset: u64,
        pub size: u32,
        pub padding: u32,
    }
}

abi_struct! {
    /// `struct fuse_notify_retrieve_in` (the body of a NOTIFY_REPLY).
    pub struct NotifyRetrieveIn {
        pub dummy1: u64,
        pub offset: u64,
        pub size: u32,
        pub dummy2: u32,
        pub dummy3: u64,
        pub dummy4: u64,
    }
}

abi_struct! {
    /// `struct fuse_notify_prune_out`, followed by `count` node ids.
    pub struct NotifyPruneOut { pub count: u32, pub padding: u32, pub spare: u64 }
}

abi_struct! {
    /// `struct fuse_backing_map`: argument of `FUSE_DEV_IOC_BACKING_OPEN`.
    pub struct BackingMap { pub fd: i32, pub flags: u32, pub padding: u64 }
}

abi_struct! {
    /// `struct fuse_lseek_in`.
    pub struct LseekIn { pub fh: u64, pub offset: u64, pub whence: u32, pub padding: u32 }
}

abi_struct! {
    /// `struct fuse_lseek_out`.
    pub struct LseekOut { pub offset: u64 }
}

abi_struct! {
    /// `struct fuse_copy_file_range_in`.
    pub struct CopyFileRangeIn {
        pub fh_in: u64,
        pub off_in: u64,
        pub nodeid_out: u64,
        pub fh_out: u64,
        pub off_out: u64,
        pub len: u64,
        pub flags: u64,
    }
}

abi_struct! {
    /// `struct fuse_copy_file_range_out` (reply to COPY_FILE_RANGE_64).
    pub struct CopyFileRangeOut { pub bytes_copied: u64 }
}

abi_struct! {
    /// `struct fuse_setupmapping_in` (DAX; virtiofs only).
    pub struct SetupMappingIn { pub fh: u64, pub foffset: u64, pub len: u64, pub flags: u64, pub moffset: u64 }
}

abi_struct! {
    /// `struct fuse_removemapping_in`, followed by `count` `RemoveMappingOne`.
    pub struct RemoveMappingIn { pub count: u32, pub padding: u32 }
}

abi_struct! {
    /// `struct fuse_removemapping_one`.
    pub struct RemoveMappingOne { pub moffset: u64, pub len: u64 }
}

abi_struct! {
    /// `struct fuse_syncfs_in`.
    pub struct SyncfsIn { pub padding: u64 }
}

abi_struct! {
    /// `struct fuse_secctx`.
    pub struct Secctx { pub size: u32, pub padding: u32 }
}

abi_struct! {
    /// `struct fuse_secctx_header`.
    pub struct SecctxHeader { pub size: u32, pub nr_secctx: u32 }
}

abi_struct! {
    /// `struct fuse_ext_header`.
    pub struct ExtHeader { pub size: u32, pub typ: u32 }
}

abi_struct! {
    /// `struct fuse_uring_ent_in_out`.
    pub struct UringEntInOut {
        pub flags: u64,
        pub commit_id: u64,
        pub payload_sz: u32,
        pub padding: u32,
        pub reserved: u64,
    }
}

abi_struct! {
    /// `struct fuse_uring_req_header`: the per-entry header buffer of a ring entry.
    pub struct UringReqHeader {
        /// `fuse_in_header` / `fuse_out_header` area (128 bytes).
        pub in_out: [u64; 16],
        /// Per-opcode argument area (128 bytes).
        pub op_in: [u64; 16],
        pub ring_ent_in_out: UringEntInOut,
    }
}

abi_struct! {
    /// `struct fuse_uring_cmd_req`: the 80-byte command area of a 128-byte SQE.
    pub struct UringCmdReq {
        pub flags: u64,
        pub commit_id: u64,
        pub qid: u16,
        pub padding: [u8; 6],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    /// Sizes from the C header (x86_64); a mismatch means a wrong field.
    #[test]
    fn sizes_match_the_kernel_header() {
        assert_eq!(size_of::<Attr>(), 88);
        assert_eq!(size_of::<Statx>(), 256);
        assert_eq!(size_of::<Kstatfs>(), 80);
        assert_eq!(size_of::<FileLock>(), 24);
        assert_eq!(size_of::<EntryOut>(), 128);
        assert_eq!(size_of::<AttrOut>(), 104);
        assert_eq!(size_of::<StatxIn>(), 24);
        assert_eq!(size_of::<StatxOut>(), 288);
        assert_eq!(size_of::<SetattrIn>(), 88);
        assert_eq!(size_of::<OpenOut>(), 16);
        assert_eq!(size_of::<ReleaseIn>(), 24);
        assert_eq!(size_of::<FlushIn>(), 24);
        assert_eq!(size_of::<ReadIn>(), 40);
        assert_eq!(size_of::<WriteIn>(), 40);
        assert_eq!(size_of::<LkIn>(), 48);
        assert_eq!(size_of::<InitIn>(), 64);
        assert_eq!(size_of::<InitOut>(), 64);
        assert_eq!(size_of::<InHeader>(), 40);
        assert_eq!(size_of::<OutHeader>(), 16);
        assert_eq!(size_of::<Dirent>(), 24);
        assert_eq!(size_of::<DirentPlus>(), 152);
        assert_eq!(size_of::<CopyFileRangeIn>(), 56);
        assert_eq!(size_of::<UringReqHeader>(), 288);
        assert_eq!(size_of::<UringCmdReq>(), 24);
        assert_eq!(size_of::<BackingMap>(), 16);
        assert_eq!(size_of::<FallocateIn>(), 32);
        assert_eq!(size_of::<LseekIn>(), 24);
        assert_eq!(size_of::<IoctlIn>(), 32);
        assert_eq!(size_of::<PollIn>(), 24);
    }
}

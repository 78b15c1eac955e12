//! Arguments and replies of the bypass's own opcodes ([`crate::op`]).

use efuse_abi::structs::EntryOut;

/// Argument of [`crate::op::WALK`]; the path follows.
#[repr(C)]
#[derive(Debug, Clone, Copy, zerocopy::IntoBytes, zerocopy::FromBytes, zerocopy::Immutable, zerocopy::KnownLayout)]
pub struct WalkIn {
    /// [`walk`] flags.
    pub flags: u32,
    /// Bytes of the path that follows.
    pub path_len: u32,
}

/// Reply of [`crate::op::WALK`].
#[repr(C)]
#[derive(Debug, Clone, Copy, zerocopy::IntoBytes, zerocopy::FromBytes, zerocopy::Immutable, zerocopy::KnownLayout)]
pub struct WalkOut {
    /// [`walk::DONE`] or [`walk::LEFT`].
    pub status: u32,
    pub _pad: u32,
    /// The node the path names (valid when `status` is DONE).
    pub entry: EntryOut,
}

/// [`WalkIn::flags`] and [`WalkOut::status`].
pub mod walk {
    /// Follow a symbolic link in the last component (stat, open without
    /// O_NOFOLLOW); links before it are always followed.
    pub const FOLLOW_LAST: u32 = 1 << 0;
    /// The path must name a directory (it ended with a slash).
    pub const DIRECTORY: u32 = 1 << 1;
    /// The client keeps no lookup of the final node: it wants only the
    /// entry's attributes (stat, access). Saves a FORGET.
    pub const NO_KEEP: u32 = 1 << 2;

    /// Walked to the end: `entry` names the node.
    pub const DONE: u32 = 0;
    /// The path leaves the tree the daemon can walk (a symbolic link to an
    /// absolute path, or `..` above the mount's root): the client resolves
    /// it some other way (through the kernel).
    pub const LEFT: u32 = 1;
}

/// The longest path a WALK carries (PATH_MAX, counting no NUL).
pub const WALK_PATH_MAX: usize = 4095;
/// The most symbolic links one WALK follows (as the kernel: ELOOP after 40).
pub const WALK_MAX_LINKS: u32 = 40;

/// In OPEN's `open_flags` (a bit the kernel never sets): the client found
/// the node in its metadata table, not by a WALK that kept it, and will
/// FORGET it when it closes the file; the daemon takes a lookup of the node
/// for the client with the open.
pub const OPEN_ADOPT: u32 = 1 << 31;

/// In OPEN's `open_flags` (a bit the kernel never sets): read the first
/// [`PREFETCH_MAX`] bytes with the open, so that the client's first read
/// needs no request. The reply is then the `fuse_open_out`, a
/// [`PrefetchOut`] and its data. The client may use the data only while the
/// node's entry in its metadata table stays as it was when it found the
/// node there: every change clears or rewrites it.
pub const OPEN_PREFETCH: u32 = 1 << 30;
/// Most bytes read with an open.
pub const PREFETCH_MAX: usize = 16384;

/// After `fuse_open_out` in the reply of an OPEN with [`OPEN_PREFETCH`].
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, zerocopy::IntoBytes, zerocopy::FromBytes, zerocopy::Immutable, zerocopy::KnownLayout,
)]
pub struct PrefetchOut {
    /// Bytes of data that follow (from offset 0).
    pub len: u32,
    /// 1: the data is there; fewer than asked means end of file.
    pub valid: u32,
}

/// In RELEASE's `release_flags` (a bit the kernel never sets): the client
/// is done with the node too; the daemon forgets one of its lookups after
/// the release (a FORGET in the same request).
pub const RELEASE_FORGET: u32 = 1 << 31;

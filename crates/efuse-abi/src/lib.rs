//! The Linux FUSE kernel ABI, protocol 7.45 (`include/uapi/linux/fuse.h`), in Rust.
//!
//! This crate is the only place in efuse that knows byte layouts. It offers:
//! - the `#[repr(C)]` structures the kernel reads and writes ([`structs`]),
//! - opcodes and flag constants ([`Opcode`], [`consts`]),
//! - a decoder that turns one request buffer into a typed [`Request`] and never
//!   panics on short or malformed input ([`request`]),
//! - encoders for the variable-length records of replies (directory entries)
//!   and notifications ([`encode`]).
//!
//! It is not a FUSE library: no I/O, no mount, no session state.

pub mod consts;
pub mod encode;
mod opcode;
pub mod request;
pub mod structs;

pub use opcode::Opcode;
pub use request::{DecodeError, Operation, ProtocolOptions, Request};

/// Major version of the protocol spoken here.
pub const KERNEL_VERSION: u32 = 7;
/// Highest minor version understood here.
pub const KERNEL_MINOR_VERSION: u32 = 45;
/// Lowest minor version accepted: 7.31 (Linux 5.10) has every structure at its
/// current size for the operations efuse decodes.
pub const MIN_KERNEL_MINOR_VERSION: u32 = 31;
/// The node id of the root directory.
pub const ROOT_ID: u64 = 1;
/// The kernel requires read buffers of at least this size.
pub const MIN_READ_BUFFER: usize = 8192;

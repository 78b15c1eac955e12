//! efuse: a framework for user-space file systems that answer most requests
//! without waking their daemon.
//!
//! A file system implements one trait, [`Filesystem`], inode based like
//! libfuse's low-level API. efuse mounts it ([`mount`]), negotiates with the
//! kernel and dispatches requests ([`session`]) over a multi-threaded
//! transport ([`transport`]), and counts what it does ([`stats`], served on a
//! [`control`] socket). The byte layouts live in the `efuse-abi` crate.
//!
//! Data flows one way: transport -> session -> file system -> reply.

pub mod buffer;
pub mod cache;
pub mod changes;
pub mod connection;
pub mod control;
pub mod daemon;
pub mod filesystem;
pub mod locks;
pub mod metrics;
pub mod mount;
pub mod observe;
pub mod policy;
pub mod reply;
pub mod session;
pub mod stats;
pub mod transport;
pub mod types;

pub use cache::{CacheMode, CachePolicy};
pub use connection::{BackingId, Connection};
pub use efuse_abi as abi;
pub use filesystem::{Filesystem, InitInfo};
pub use reply::*;
pub use session::{Features, Session, SessionConfig};
pub use types::*;

/// Default entry and attribute cache time, as libfuse's.
pub const DEFAULT_TTL: std::time::Duration = std::time::Duration::from_secs(1);

//! Transports carry requests from the kernel to the session and replies back.
//!
//! `dev`: N worker threads, each reading its own /dev/fuse descriptor cloned
//! with FUSE_DEV_IOC_CLONE, so the kernel can hand requests to idle workers
//! without one descriptor's lock in the way.

pub mod dev;

pub use dev::{run, DevChannel, Running, TransportConfig};

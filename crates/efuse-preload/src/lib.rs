//! The bypass client library of efuse (`libefuse_preload.so`), preloaded
//! into a program by `efuse run`: file calls on paths under an efuse mount
//! whose daemon accepts bypass clients, and on descriptors opened that way,
//! are served through the shared-memory protocol of `efuse-bypass` instead
//! of through the kernel. Everything else, and everything this library does
//! not serve, goes to the C library's own functions, so a program behaves
//! as it would without the library.
//!
//! Rules every interposed function follows (see `exports`):
//! - nothing happens at load but reading the environment; mounts are found
//!   at the first path call and connected at their first use;
//! - no Rust panic crosses into C (each served call runs under
//!   `catch_unwind`, and a panic becomes EIO);
//! - the library never serves its own calls: a thread-local guard sends
//!   every call made while the library is working to the real function;
//! - descriptors are real kernel descriptors (O_PATH opens of the same
//!   file), so a use the library does not serve either is converted to an
//!   ordinary kernel open first or fails with EBADF, never silently wrong.

// The unit tests build without the exports, which use most of the rest.
#![cfg_attr(test, allow(dead_code))]

mod config;
mod creds;
mod direct;
mod env;
#[cfg(not(test))]
mod exports;
mod files;
mod guard;
mod kept;
mod log;
mod mountinfo;
mod mounts;
mod ops;
mod paths;
mod prefetch;
mod real;
mod serve;

//! The end-to-end, differential and fio suites again, every mount with
//! `--writeback-cache` (the kernel's writeback cache for buffered writes;
//! memfs honours it, stackfs does not declare it and runs without passthrough).
//! The harness picks the arguments from this binary's name
//! (`common::test_mount_args`).

#![allow(clippy::duplicate_mod)]

#[path = "differential.rs"]
mod differential;
#[path = "e2e.rs"]
mod e2e;
#[path = "fio.rs"]
mod fio;

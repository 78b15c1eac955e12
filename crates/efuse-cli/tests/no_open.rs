//! The end-to-end, differential and fio suites again, every mount with
//! `--no-open` (stateless opens: no OPEN, RELEASE or FLUSH reaches the
//! daemon after the first OPEN, answered ENOSYS; passthrough off). The
//! harness picks the arguments from this binary's name
//! (`common::test_mount_args`).

#![allow(clippy::duplicate_mod)]

#[path = "differential.rs"]
mod differential;
#[path = "e2e.rs"]
mod e2e;
#[path = "fio.rs"]
mod fio;

//! The end-to-end, differential and fio suites again, every mount with
//! `--profile plain` (libfuse's behaviour: 1 s TTLs, no keep_cache, no readdirplus, no passthrough, locks in the daemon): the issue's "pass in every profile and with passthrough on and
//! off". The harness picks the arguments from this binary's name
//! (`common::test_mount_args`).

#![allow(clippy::duplicate_mod)]

#[path = "differential.rs"]
mod differential;
#[path = "e2e.rs"]
mod e2e;
#[path = "fio.rs"]
mod fio;

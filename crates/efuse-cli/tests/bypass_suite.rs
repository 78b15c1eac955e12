//! The end-to-end, differential and fio suites again, every program they
//! start (the efuse binary aside) run under `efuse run --`, so its file
//! calls on the mount go through the bypass client library and socket; the
//! ext4 sides run under it too and must be left alone by it. The
//! differential engine, which calls libc itself, runs in a child: this
//! binary again under `efuse run`. Every mount must have served bypass
//! requests by the end of its test (`efuse stats --json`). The harness
//! decides all this from this binary's name (`common::bypass_suite`).

#![allow(clippy::duplicate_mod)]

#[path = "differential.rs"]
mod differential;
#[path = "e2e.rs"]
mod e2e;
#[path = "fio.rs"]
mod fio;

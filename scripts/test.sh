#!/usr/bin/env bash
# The test command (README): installs what is missing, builds, and runs every
# test: unit tests, end-to-end mount tests, the differential test, fio verify.
# Mount tests need root and /dev/fuse; elsewhere they skip and say why.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"

cargo build --workspace --release --all-targets
cargo test --workspace --release -- --test-threads="${EFUSE_TEST_THREADS:-4}"

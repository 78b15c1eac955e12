#!/usr/bin/env bash
# The test command (README): installs what is missing, builds, and runs every
# test: unit tests, end-to-end mount tests, the differential test, fio verify.
# Mount tests need root and /dev/fuse; elsewhere they skip and say why.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"

cargo build --workspace --release --all-targets
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --release -- --test-threads="${EFUSE_TEST_THREADS:-4}" 2>&1 | tee "$log" || status=$?

# One closing line for the whole run: cargo prints one per test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"

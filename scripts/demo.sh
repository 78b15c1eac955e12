#!/usr/bin/env bash
# The main job (README): build efuse, mount memfs and stackfs, use them with
# ordinary programs, show the daemon's counters, unmount. Needs root (mount(2))
# or fusermount3.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -p efuse-cli
efuse=target/release/efuse

work=$(mktemp -d /tmp/efuse-demo.XXXXXX)
mkdir -p "$work/mem" "$work/backing" "$work/stack"
cleanup() {
    for m in "$work/mem" "$work/stack"; do
        grep -q " $m " /proc/mounts && "$efuse" umount "$m" || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step "$efuse" mount memfs "$work/mem" --size 256M
step cp -a crates "$work/mem/"
step sh -c "find '$work/mem' -type f | wc -l"
step sh -c "cd '$work/mem' && tar cf - crates | sha256sum && cd '$OLDPWD' && tar cf - crates | sha256sum"
step df -h "$work/mem"
step "$efuse" stats "$work/mem"
step "$efuse" umount "$work/mem"

echo "hello from the backing directory" > "$work/backing/hello.txt"
step "$efuse" mount stackfs "$work/backing" "$work/stack"
step cat "$work/stack/hello.txt"
step sh -c "cd '$work/stack' && git init -q repo && cd repo && echo one > f && git add f && git -c user.name=demo -c user.email=demo@example.invalid commit -qm first && git log --oneline"
step ls -la "$work/backing/repo"
step "$efuse" stats "$work/stack"
step "$efuse" umount "$work/stack"
echo
echo "demo: done, nothing left mounted"

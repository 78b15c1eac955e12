#!/usr/bin/env bash
# Installs what efuse needs on a fresh Debian 12 machine: the FUSE user-space
# tools, and the programs the end-to-end tests and benchmarks run.
# Idempotent; needs root (or sudo) for apt-get.
set -euo pipefail

packages=(fuse3 fio sqlite3 attr git util-linux python3 procps coreutils tar findutils stress-ng diffutils
    # busybox-static: a statically linked program for the bypass tests (the
    # client library cannot be preloaded into it; it must use the kernel mount).
    busybox-static
    # efuse-bpf: clang compiles bpf/efuse.bpf.c, libbpf-dev gives <bpf/bpf_helpers.h>,
    # linux-libc-dev <linux/bpf.h>; llvm for llvm-objdump when debugging the object.
    clang llvm libbpf-dev linux-libc-dev)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# FUSE-over-io_uring (Linux 6.14+, CONFIG_FUSE_IO_URING) is off until the
# fuse module parameter says so; the uring transport and its tests need it.
uring_param=/sys/module/fuse/parameters/enable_uring
if [ -w "$uring_param" ]; then
    echo Y > "$uring_param" || echo "setup: could not enable FUSE-over-io_uring" >&2
fi

# The Rust toolchain comes with the machine (rustup); make sure it is on PATH.
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }

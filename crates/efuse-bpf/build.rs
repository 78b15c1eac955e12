//! Compiles `bpf/efuse.bpf.c` with clang for the BPF target. Without clang the
//! crate still builds: the loader then reports that the programs were not
//! built, and the daemon runs without its kernel-side view.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = PathBuf::from("bpf/efuse.bpf.c");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rustc-check-cfg=cfg(efuse_bpf_built)");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("efuse.bpf.o");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let mut cmd = Command::new(&clang);
    cmd.args(["-O2", "-g", "-target", "bpf", "-Wall"]);
    // <linux/bpf.h> includes <asm/types.h>, which Debian keeps under the
    // multiarch directory that a -target bpf clang does not search.
    if let Some(dir) = multiarch_include() {
        cmd.arg(format!("-I{dir}"));
    }
    cmd.arg("-c").arg(&src).arg("-o").arg(&out);
    match cmd.output() {
        Ok(o) if o.status.success() => println!("cargo:rustc-cfg=efuse_bpf_built"),
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            let first = err.lines().find(|l| l.contains("error")).unwrap_or("see clang's output");
            println!("cargo:warning=efuse-bpf: clang could not compile {}: {first}", src.display());
            println!("cargo:warning=efuse-bpf: building without eBPF programs (install clang and libbpf-dev)");
        }
        Err(e) => {
            println!("cargo:warning=efuse-bpf: {clang} not found ({e}); building without eBPF programs");
            println!("cargo:warning=efuse-bpf: install clang and libbpf-dev (scripts/setup.sh does) for `efuse top`");
        }
    }
}

fn multiarch_include() -> Option<String> {
    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH").ok()?.as_str() {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        _ => return None,
    };
    let dir = format!("/usr/include/{arch}");
    std::path::Path::new(&dir).is_dir().then_some(dir)
}

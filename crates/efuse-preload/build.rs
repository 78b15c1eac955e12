//! Links the unwinder into the library statically instead of depending on
//! the shared libgcc_s. The library is loaded into every process `efuse
//! run` starts, so it must cost a process as little as it can, and loading
//! libgcc_s runs its constructor (`__cpu_indicator_init`), whose CPUID
//! instructions each trap to the hypervisor in a virtual machine: measured
//! at about 0.15 ms per process here, a fifth of a whole `cat`. The library
//! needs only the unwinder (panics are caught at its boundary), which the
//! static libgcc_eh provides without that constructor.
//!
//! rustc asks for `-lgcc_s` itself; a linker script of that name, found
//! first on the search path, points the linker at libgcc_eh instead.

use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let script = out.join("libgcc_s.so");
    std::fs::write(&script, "/* efuse-preload: the static unwinder, see build.rs */\nINPUT(-lgcc_eh)\n")
        .expect("write the libgcc_s linker script");
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rerun-if-changed=build.rs");
}

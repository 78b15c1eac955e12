//! The library's settings, read from the environment once at load (the
//! only work done at load): EFUSE_BYPASS, EFUSE_BYPASS_LOG,
//! EFUSE_BYPASS_MOUNTS, EFUSE_BYPASS_AFTER, and the values exec must hand on to new programs.

use std::ffi::CStr;
use std::sync::OnceLock;

/// The variables a new program needs to keep the library: re-injected by
/// the exec family when a program drops them.
pub const KEPT_VARS: [&str; 5] =
    ["LD_PRELOAD", "EFUSE_BYPASS", "EFUSE_BYPASS_LOG", "EFUSE_BYPASS_MOUNTS", "EFUSE_BYPASS_AFTER"];

/// Default of EFUSE_BYPASS_AFTER: a process connects to a mount's daemon at
/// its ninth path call on the mount. Connecting costs about what five
/// round trips through the kernel cost (socket, handshake, the daemon's
/// new region and thread); a process that does less on the mount, such as
/// one `cat`, is faster through the kernel.
pub const DEFAULT_AFTER: u32 = 8;

pub struct Config {
    /// EFUSE_BYPASS=off: the library does nothing at all.
    pub off: bool,
    /// EFUSE_BYPASS_LOG: "stderr" or a file path.
    pub log: Option<Vec<u8>>,
    /// EFUSE_BYPASS_MOUNTS: the only mount points to bypass (None: all).
    pub mounts: Option<Vec<Vec<u8>>>,
    /// EFUSE_BYPASS_AFTER: path calls on a mount that go through the kernel
    /// before the process connects to its daemon (0: connect at the first).
    pub after: u32,
    /// "NAME=value" of each of [`KEPT_VARS`] set at load.
    pub kept: Vec<Vec<u8>>,
    /// This library's file, for LD_PRELOAD in new programs.
    pub library: Option<Vec<u8>>,
}

static CONFIG: OnceLock<Config> = OnceLock::new();

fn var(name: &CStr) -> Option<Vec<u8>> {
    // SAFETY: getenv with a NUL-terminated name; the value is copied at once.
    let p = unsafe { libc::getenv(name.as_ptr()) };
    if p.is_null() {
        None
    } else {
        // SAFETY: getenv returns a NUL-terminated string.
        Some(unsafe { CStr::from_ptr(p) }.to_bytes().to_vec())
    }
}

/// The path of the object holding this function (this library).
fn own_path() -> Option<Vec<u8>> {
    // SAFETY: dladdr fills a plain struct for an address in this object.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    let here = own_path as *const () as *const libc::c_void;
    if unsafe { libc::dladdr(here, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is a NUL-terminated string owned by the loader.
    let p = unsafe { CStr::from_ptr(info.dli_fname) }.to_bytes().to_vec();
    (p.first() == Some(&b'/')).then_some(p)
}

fn load() -> Config {
    let off = var(c"EFUSE_BYPASS").is_some_and(|v| v == b"off" || v == b"0");
    let log = var(c"EFUSE_BYPASS_LOG").filter(|v| !v.is_empty());
    let mounts = var(c"EFUSE_BYPASS_MOUNTS").map(|v| {
        v.split(|b| *b == b':').filter(|s| !s.is_empty()).map(|s| crate::paths::trim_slashes(s).to_vec()).collect()
    });
    let after = var(c"EFUSE_BYPASS_AFTER")
        .and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse().ok())
        .unwrap_or(DEFAULT_AFTER);
    let mut kept = Vec::new();
    for name in KEPT_VARS {
        let mut c = name.as_bytes().to_vec();
        c.push(0);
        let cname = CStr::from_bytes_with_nul(&c).expect("literal names");
        if let Some(v) = var(cname) {
            let mut kv = name.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(&v);
            kept.push(kv);
        }
    }
    Config { off, log, mounts, after, kept, library: own_path() }
}

/// The settings (read at load; read now if the loader has not run the
/// constructor yet).
pub fn get() -> &'static Config {
    CONFIG.get_or_init(load)
}

/// Is the library on? One atomic load after the first call.
pub fn on() -> bool {
    !get().off
}

/// Runs at load: read the environment now, before the program can change it.
#[cfg(not(test))]
#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = {
    extern "C" fn init() {
        let _ = std::panic::catch_unwind(|| {
            let _g = crate::guard::enter();
            get();
        });
    }
    init
};

//! An unprivileged writer clears suid and sgid exactly as on ext4.
//!
//! efuse negotiates HANDLE_KILLPRIV_V2 so that writes need no
//! GETXATTR("security.capability") round trip; the file systems then clear
//! the bits themselves, on cached, direct and passthrough writes and on
//! truncation. This checks the result against an ext4 directory, as `nobody`.

mod common;

use std::path::Path;

use common::{require_fuse, require_tools, sh, Fs, MountSpec, Mounted};

/// Modes covering suid, sgid with and without group execute.
const MODES: [&str; 5] = ["4777", "6777", "2767", "2777", "0777"];

fn scenario(dir: &Path) -> String {
    let mut script = String::from("set -e\n");
    for m in MODES {
        script.push_str(&format!(
            "echo x > w{m}; chmod {m} w{m}; setpriv --reuid=65534 --regid=65534 --clear-groups sh -c 'echo y >> w{m}'\n\
             echo x > t{m}; chmod {m} t{m}; setpriv --reuid=65534 --regid=65534 --clear-groups truncate -s 1 t{m}\n"
        ));
    }
    script.push_str("stat -c '%n %a %s' w* t*\n");
    sh(&script, dir).ok()
}

fn unprivileged_write_clears_suid_sgid(test: &str, fs: Fs) {
    if !require_fuse(test) || !require_tools(test, &["setpriv"]) {
        return;
    }
    let m = Mounted::with(fs, test, MountSpec::default().arg("-o").arg("allow_other"), |_| {});
    // `nobody` must reach both sides.
    sh(&format!("chmod 755 {}; chmod 777 {} {}", m.root.display(), m.mnt.display(), m.reference.display()), &m.root)
        .ok();
    let got = scenario(&m.mnt);
    let want = scenario(&m.reference);
    assert_eq!(got, want, "{test}: modes after unprivileged writes differ from ext4");
}

#[test]
fn memfs_unprivileged_write_clears_suid_sgid() {
    unprivileged_write_clears_suid_sgid("memfs_unprivileged_write_clears_suid_sgid", Fs::Memfs);
}

#[test]
fn stackfs_unprivileged_write_clears_suid_sgid() {
    unprivileged_write_clears_suid_sgid("stackfs_unprivileged_write_clears_suid_sgid", Fs::Stackfs);
}

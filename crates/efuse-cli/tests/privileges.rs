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

/// What the caller's umask gives new files, directories, FIFOs, symlinks and
/// O_TMPFILE files, whatever the daemon's own umask (077 here): the same
/// modes as on ext4, with and without `default_permissions`.
fn modes_follow_the_callers_umask(test: &str, fs: Fs, options: Option<&str>) {
    if !require_fuse(test) || !require_tools(test, &["python3", "mkfifo"]) {
        return;
    }
    let mut spec = MountSpec::default().umask(0o077);
    if let Some(o) = options {
        spec = spec.arg("-o").arg(o);
    }
    let m = Mounted::with(fs, test, spec, |_| {});
    let script = r#"set -e
for u in 000 002 022 027 077 0777; do
  umask $u; mkdir d$u; touch f$u; mkfifo p$u; ln -s f$u s$u
  mkdir -m 1777 D$u; touch F$u; chmod 0 F$u
  python3 -c 'import os, stat; fd = os.open(".", os.O_TMPFILE | os.O_WRONLY, 0o666); print("tmpfile '$u'", stat.filemode(os.fstat(fd).st_mode))'
done
umask 022; mkdir -m 2775 sg; umask 0; mkdir sg/d; touch sg/f
stat -c '%n %A' d* f* p* s* D* F* sg sg/*
"#;
    let got = sh(script, &m.mnt).ok();
    let want = sh(script, &m.reference).ok();
    common::assert_same(&format!("{test}: modes"), fs.name(), &got, &want);
}

#[test]
fn memfs_modes_follow_the_callers_umask() {
    modes_follow_the_callers_umask("memfs_modes_follow_the_callers_umask", Fs::Memfs, None);
}

#[test]
fn stackfs_modes_follow_the_callers_umask() {
    modes_follow_the_callers_umask("stackfs_modes_follow_the_callers_umask", Fs::Stackfs, None);
}

#[test]
fn stackfs_modes_follow_the_callers_umask_with_default_permissions() {
    let test = "stackfs_modes_follow_the_callers_umask_with_default_permissions";
    modes_follow_the_callers_umask(test, Fs::Stackfs, Some("default_permissions"));
}

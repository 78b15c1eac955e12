//! The process's credentials, for the walks the library makes over its
//! metadata table: search permission on each directory, as the daemon (and
//! the kernel with default_permissions) would check it. Taken when a
//! connection is made, forgotten when the process changes its credentials
//! (the connections start over then). Plain atomics: a signal handler may
//! read them.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use efuse_abi::structs::Attr;

const MAX_GROUPS: usize = 32;

static VALID: AtomicBool = AtomicBool::new(false);
static UID: AtomicU32 = AtomicU32::new(0);
static GID: AtomicU32 = AtomicU32::new(0);
/// Supplementary groups; more than MAX_GROUPS: u32::MAX (unknown: group
/// checks go to the daemon).
static NGROUPS: AtomicU32 = AtomicU32::new(0);
static GROUPS: [AtomicU32; MAX_GROUPS] = [const { AtomicU32::new(0) }; MAX_GROUPS];

/// Takes the credentials now (after a connection is made). The effective
/// ids are what the daemon's SO_PEERCRED reports and checks with.
pub fn take() {
    // SAFETY: plain system calls without preconditions; getgroups fills at
    // most MAX_GROUPS entries of a live buffer.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let mut g = [0 as libc::gid_t; MAX_GROUPS];
    let n = unsafe { libc::getgroups(MAX_GROUPS as i32, g.as_mut_ptr()) };
    VALID.store(false, Ordering::Release);
    UID.store(uid, Ordering::Relaxed);
    GID.store(gid, Ordering::Relaxed);
    if n < 0 {
        NGROUPS.store(u32::MAX, Ordering::Relaxed);
    } else {
        for (d, s) in GROUPS.iter().zip(&g[..n as usize]) {
            d.store(*s, Ordering::Relaxed);
        }
        NGROUPS.store(n as u32, Ordering::Relaxed);
    }
    VALID.store(true, Ordering::Release);
}

/// Forgets them (a credential change).
pub fn forget() {
    VALID.store(false, Ordering::Release);
}

/// Are the calling thread's file-system ids its effective ones? (setfsuid
/// and setfsgid change them for one thread only; the daemon reads the
/// process's at connection.) Two system calls.
pub fn fs_ids_are_effective() -> bool {
    // SAFETY: setfsuid and setfsgid with an invalid id change nothing and
    // return the current one.
    unsafe {
        libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32 == libc::geteuid()
            && libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32 == libc::getegid()
    }
}

/// May this process search directory `dir` (mode bits, as the kernel's
/// generic_permission)? None when the library cannot tell.
pub fn may_search(dir: &Attr) -> Option<bool> {
    may(dir, 0o1)
}

/// May this process open file `file` for reading (mode bits only, as the
/// kernel checks them on the mount, which has no ACLs)? None when the
/// library cannot tell.
pub fn may_read(file: &Attr) -> Option<bool> {
    may(file, 0o4)
}

/// The owner, group or other bits of `a` (as the kernel's
/// generic_permission picks them) include `bit` (0o4 read, 0o1 search)?
/// Root may read and search anything (CAP_DAC_OVERRIDE).
fn may(a: &Attr, bit: u32) -> Option<bool> {
    if !VALID.load(Ordering::Acquire) {
        return None;
    }
    let uid = UID.load(Ordering::Relaxed);
    if uid == 0 {
        // CAP_DAC_OVERRIDE: root reads and searches whatever the mode bits say.
        return Some(true);
    }
    let mode = a.mode;
    if uid == a.uid {
        return Some(mode & (bit << 6) != 0);
    }
    let in_group = if GID.load(Ordering::Relaxed) == a.gid {
        true
    } else {
        let n = NGROUPS.load(Ordering::Relaxed);
        if n == u32::MAX {
            return None;
        }
        GROUPS[..n as usize].iter().any(|g| g.load(Ordering::Relaxed) == a.gid)
    };
    if in_group {
        return Some(mode & (bit << 3) != 0);
    }
    Some(mode & bit != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_fsuid_is_seen() {
        assert!(fs_ids_are_effective());
        if unsafe { libc::geteuid() } == 0 {
            // On a thread of its own: fsuid is per thread.
            let changed = std::thread::spawn(|| unsafe {
                libc::syscall(libc::SYS_setfsuid, 1234);
                let r = fs_ids_are_effective();
                libc::syscall(libc::SYS_setfsuid, 0);
                r
            })
            .join()
            .expect("thread");
            assert!(!changed);
        }
    }

    #[test]
    fn search_follows_the_owner_then_group_then_other_bits() {
        take();
        let me = unsafe { libc::geteuid() };
        let dir = |mode, uid, gid| Attr { mode: libc::S_IFDIR | mode, uid, gid, ..Default::default() };
        if me == 0 {
            assert_eq!(may_search(&dir(0o000, 5, 5)), Some(true));
        } else {
            assert_eq!(may_search(&dir(0o700, me, 5)), Some(true));
            // The owner's bits decide for the owner, even when others' allow.
            assert_eq!(may_search(&dir(0o077, me, 5)), Some(false));
            assert_eq!(may_search(&dir(0o001, me.wrapping_add(1), u32::MAX - 3)), Some(true));
        }
        let file = |mode, uid, gid| Attr { mode: libc::S_IFREG | mode, uid, gid, ..Default::default() };
        if me != 0 {
            assert_eq!(may_read(&file(0o400, me, 5)), Some(true));
            assert_eq!(may_read(&file(0o044, me, 5)), Some(false));
            assert_eq!(may_read(&file(0o004, me.wrapping_add(1), u32::MAX - 3)), Some(true));
            assert_eq!(may_read(&file(0o770, me.wrapping_add(1), u32::MAX - 3)), Some(false));
        }
        forget();
        assert_eq!(may_search(&dir(0o777, me, 0)), None);
        assert_eq!(may_read(&file(0o777, me, 0)), None);
    }
}

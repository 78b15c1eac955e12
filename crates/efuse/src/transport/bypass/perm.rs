//! Permission checks for bypass requests: what the kernel does for a mount
//! with default_permissions (fs/namei.c generic_permission, may_delete,
//! may_create, may_linkat; fs/attr.c setattr_prepare; fs/xattr.c
//! xattr_permission), on mode bits only: efuse never negotiates
//! FUSE_POSIX_ACL, so the kernel checks no ACLs on its mounts either.
//!
//! A client is judged as the kernel judges a process: by its file-system
//! ids (fsuid, fsgid), supplementary groups and effective capabilities, read
//! from `/proc/PID/status` when it connects (the client library starts a
//! new connection, or stops serving, when the process changes them).

use efuse_abi::structs::Attr;

pub(crate) const MAY_EXEC: u32 = 1;
pub(crate) const MAY_WRITE: u32 = 2;
pub(crate) const MAY_READ: u32 = 4;

/// Capabilities (bit numbers of `CapEff`) the checks look at.
pub(crate) mod cap {
    pub const CHOWN: u32 = 0;
    pub const DAC_OVERRIDE: u32 = 1;
    pub const DAC_READ_SEARCH: u32 = 2;
    pub const FOWNER: u32 = 3;
    pub const FSETID: u32 = 4;
    pub const SYS_ADMIN: u32 = 21;
    pub const MKNOD: u32 = 27;
}

/// Who a client is, learned at connection.
#[derive(Debug, Clone)]
pub(crate) struct Creds {
    /// File-system uid and gid (what the kernel checks with).
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub groups: Vec<u32>,
    /// Effective capabilities (`CapEff`).
    pub caps: u64,
}

impl Creds {
    /// The credentials of process `pid` from `/proc/PID/status`: fsuid,
    /// fsgid, groups, CapEff. None when it cannot be read (the process is
    /// gone).
    pub(crate) fn of_process(pid: u32) -> Option<Creds> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
        // "Uid:  real effective saved fs"
        let fs_id = |name: &str| field(name)?.split_whitespace().nth(3)?.parse::<u32>().ok();
        let uid = fs_id("Uid:")?;
        let gid = fs_id("Gid:")?;
        let groups = field("Groups:")?.split_whitespace().filter_map(|g| g.parse().ok()).collect();
        let caps = u64::from_str_radix(field("CapEff:")?, 16).ok()?;
        Some(Creds { uid, gid, pid, groups, caps })
    }

    /// Whether these credentials can do all that `other`'s can: the same
    /// ids, every group and capability of `other`'s.
    pub(crate) fn covers(&self, other: &Creds) -> bool {
        self.uid == other.uid
            && self.gid == other.gid
            && other.groups.iter().all(|g| self.groups.contains(g))
            && other.caps & !self.caps == 0
    }

    pub(crate) fn capable(&self, cap: u32) -> bool {
        self.caps & (1u64 << cap) != 0
    }

    pub(crate) fn in_group(&self, gid: u32) -> bool {
        gid == self.gid || self.groups.contains(&gid)
    }

    pub(crate) fn owns(&self, a: &Attr) -> bool {
        self.uid == a.uid
    }

    /// inode_owner_or_capable: the owner, or CAP_FOWNER.
    pub(crate) fn owner_or_capable(&self, a: &Attr) -> bool {
        self.owns(a) || self.capable(cap::FOWNER)
    }
}

pub(crate) fn is_dir(a: &Attr) -> bool {
    a.mode & libc::S_IFMT == libc::S_IFDIR
}

pub(crate) fn is_reg(a: &Attr) -> bool {
    a.mode & libc::S_IFMT == libc::S_IFREG
}

pub(crate) fn is_symlink(a: &Attr) -> bool {
    a.mode & libc::S_IFMT == libc::S_IFLNK
}

/// generic_permission: the mode bits of the caller's class, then the
/// capabilities that override them. Ok or the errno (positive).
pub(crate) fn permission(c: &Creds, a: &Attr, mask: u32) -> Result<(), i32> {
    let mask = mask & (MAY_READ | MAY_WRITE | MAY_EXEC);
    let bits = if c.owns(a) {
        a.mode >> 6
    } else if c.in_group(a.gid) {
        a.mode >> 3
    } else {
        a.mode
    } & 7;
    if mask & !bits == 0 {
        return Ok(());
    }
    if is_dir(a) {
        if mask & MAY_WRITE == 0 && c.capable(cap::DAC_READ_SEARCH) {
            return Ok(());
        }
        if c.capable(cap::DAC_OVERRIDE) {
            return Ok(());
        }
        return Err(libc::EACCES);
    }
    if mask == MAY_READ && c.capable(cap::DAC_READ_SEARCH) {
        return Ok(());
    }
    // CAP_DAC_OVERRIDE: all but executing a file nobody may execute.
    if (mask & MAY_EXEC == 0 || a.mode & 0o111 != 0) && c.capable(cap::DAC_OVERRIDE) {
        return Ok(());
    }
    Err(libc::EACCES)
}

/// may_create: write and search on the parent directory.
pub(crate) fn may_create(c: &Creds, dir: &Attr) -> Result<(), i32> {
    permission(c, dir, MAY_WRITE | MAY_EXEC)
}

/// may_delete: write and search on the parent, and the sticky-bit rule
/// (in a sticky directory only the file's owner, the directory's owner or
/// a holder of CAP_FOWNER may remove or replace a name).
pub(crate) fn may_delete(c: &Creds, dir: &Attr, victim: &Attr) -> Result<(), i32> {
    permission(c, dir, MAY_WRITE | MAY_EXEC)?;
    if dir.mode & libc::S_ISVTX != 0 && !c.capable(cap::FOWNER) && !c.owns(victim) && !c.owns(dir) {
        return Err(libc::EPERM);
    }
    Ok(())
}

/// may_linkat with fs.protected_hardlinks: someone who does not own the
/// source may link it only if it is a regular file that is neither setuid
/// nor executable-setgid and they may read and write it.
pub(crate) fn may_link(c: &Creds, src: &Attr, protected: bool) -> Result<(), i32> {
    if is_dir(src) {
        return Err(libc::EPERM);
    }
    if !protected || c.owner_or_capable(src) {
        return Ok(());
    }
    let sgid_exec = src.mode & (libc::S_ISGID | libc::S_IXGRP) == (libc::S_ISGID | libc::S_IXGRP);
    if is_reg(src) && src.mode & libc::S_ISUID == 0 && !sgid_exec && permission(c, src, MAY_READ | MAY_WRITE).is_ok() {
        return Ok(());
    }
    Err(libc::EPERM)
}

/// The sysctl fs.protected_hardlinks (1 on every distribution's default).
pub(crate) fn protected_hardlinks() -> bool {
    std::fs::read_to_string("/proc/sys/fs/protected_hardlinks").map(|s| s.trim() != "0").unwrap_or(true)
}

/// xattr_permission for `name` with `mask` (MAY_READ or MAY_WRITE).
pub(crate) fn xattr_permission(c: &Creds, a: &Attr, name: &[u8], mask: u32) -> Result<(), i32> {
    let write = mask & MAY_WRITE != 0;
    if name.starts_with(b"trusted.") {
        if c.capable(cap::SYS_ADMIN) {
            return Ok(());
        }
        return Err(if write { libc::EPERM } else { libc::ENODATA });
    }
    if name.starts_with(b"user.") {
        if !is_reg(a) && !is_dir(a) {
            return Err(if write { libc::EPERM } else { libc::ENODATA });
        }
        if is_dir(a) && a.mode & libc::S_ISVTX != 0 && write && !c.owner_or_capable(a) {
            return Err(libc::EPERM);
        }
        return permission(c, a, mask);
    }
    if name.starts_with(b"security.") {
        // Left to security modules by the kernel; only CAP_SYS_ADMIN changes
        // them here.
        if write && !c.capable(cap::SYS_ADMIN) {
            return Err(libc::EPERM);
        }
        return Ok(());
    }
    // system.* (ACLs, which these mounts do not have) and unknown prefixes.
    Err(libc::EOPNOTSUPP)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(mode: u32, uid: u32, gid: u32) -> Attr {
        Attr { mode, uid, gid, ..Default::default() }
    }

    fn user(uid: u32, gid: u32, groups: &[u32]) -> Creds {
        // Root with every capability; anyone else with none.
        let caps = if uid == 0 { u64::MAX } else { 0 };
        Creds { uid, gid, pid: 0, groups: groups.to_vec(), caps }
    }

    #[test]
    fn owner_group_other_bits() {
        let f = attr(libc::S_IFREG | 0o640, 10, 20);
        assert_eq!(permission(&user(10, 99, &[]), &f, MAY_READ | MAY_WRITE), Ok(()));
        assert_eq!(permission(&user(11, 20, &[]), &f, MAY_READ), Ok(()));
        assert_eq!(permission(&user(11, 20, &[]), &f, MAY_WRITE), Err(libc::EACCES));
        assert_eq!(permission(&user(11, 5, &[20]), &f, MAY_READ), Ok(()));
        assert_eq!(permission(&user(11, 5, &[]), &f, MAY_READ), Err(libc::EACCES));
        // The owner class decides even when the group class would allow more.
        let g = attr(libc::S_IFREG | 0o070, 10, 20);
        assert_eq!(permission(&user(10, 20, &[]), &g, MAY_READ), Err(libc::EACCES));
    }

    #[test]
    fn root_executes_only_what_someone_may() {
        let root = user(0, 0, &[]);
        assert_eq!(permission(&root, &attr(libc::S_IFREG, 1, 1), MAY_READ | MAY_WRITE), Ok(()));
        assert_eq!(permission(&root, &attr(libc::S_IFREG | 0o600, 1, 1), MAY_EXEC), Err(libc::EACCES));
        assert_eq!(permission(&root, &attr(libc::S_IFREG | 0o001, 1, 1), MAY_EXEC), Ok(()));
        assert_eq!(permission(&root, &attr(libc::S_IFDIR, 1, 1), MAY_EXEC), Ok(()));
    }

    #[test]
    fn root_without_capabilities_is_an_ordinary_user() {
        let bare = Creds { uid: 0, gid: 0, pid: 0, groups: vec![], caps: 0 };
        let theirs = attr(libc::S_IFREG | 0o600, 65534, 65534);
        assert_eq!(permission(&bare, &theirs, MAY_READ), Err(libc::EACCES));
        let dir = attr(libc::S_IFDIR | 0o700, 65534, 65534);
        assert_eq!(permission(&bare, &dir, MAY_EXEC), Err(libc::EACCES));
        // CAP_DAC_READ_SEARCH alone: read files and search directories, no writes.
        let rs = Creds { caps: 1 << cap::DAC_READ_SEARCH, ..bare.clone() };
        assert_eq!(permission(&rs, &theirs, MAY_READ), Ok(()));
        assert_eq!(permission(&rs, &theirs, MAY_WRITE), Err(libc::EACCES));
        assert_eq!(permission(&rs, &dir, MAY_EXEC | MAY_READ), Ok(()));
        assert_eq!(permission(&rs, &dir, MAY_WRITE | MAY_EXEC), Err(libc::EACCES));
        let sticky = attr(libc::S_IFDIR | 0o1777, 7, 7);
        assert_eq!(may_delete(&bare, &sticky, &theirs), Err(libc::EPERM));
    }

    #[test]
    fn credentials_come_from_proc() {
        let me = Creds::of_process(std::process::id()).expect("own status");
        // SAFETY: no preconditions.
        assert_eq!(me.uid, unsafe { libc::geteuid() });
        assert_eq!(me.gid, unsafe { libc::getegid() });
        assert!(Creds::of_process(u32::MAX).is_none());
    }

    #[test]
    fn sticky_directories() {
        let dir = attr(libc::S_IFDIR | 0o1777, 0, 0);
        let theirs = attr(libc::S_IFREG | 0o666, 5, 5);
        assert_eq!(may_delete(&user(6, 6, &[]), &dir, &theirs), Err(libc::EPERM));
        assert_eq!(may_delete(&user(5, 6, &[]), &dir, &theirs), Ok(()));
        assert_eq!(may_delete(&user(0, 0, &[]), &dir, &theirs), Ok(()));
        let own_dir = attr(libc::S_IFDIR | 0o1777, 6, 6);
        assert_eq!(may_delete(&user(6, 6, &[]), &own_dir, &theirs), Ok(()));
    }

    #[test]
    fn hardlinks_and_xattrs() {
        let f = attr(libc::S_IFREG | 0o644, 5, 5);
        assert_eq!(may_link(&user(6, 6, &[]), &f, true), Err(libc::EPERM));
        assert_eq!(may_link(&user(6, 6, &[]), &f, false), Ok(()));
        let rw = attr(libc::S_IFREG | 0o666, 5, 5);
        assert_eq!(may_link(&user(6, 6, &[]), &rw, true), Ok(()));
        let u = user(6, 6, &[]);
        assert_eq!(xattr_permission(&u, &f, b"user.x", MAY_READ), Ok(()));
        assert_eq!(xattr_permission(&u, &f, b"user.x", MAY_WRITE), Err(libc::EACCES));
        assert_eq!(xattr_permission(&u, &f, b"trusted.x", MAY_READ), Err(libc::ENODATA));
        let link = attr(libc::S_IFLNK | 0o777, 6, 6);
        assert_eq!(xattr_permission(&u, &link, b"user.x", MAY_WRITE), Err(libc::EPERM));
    }
}

//! Permission checks for bypass requests: what the kernel does for a mount
//! with default_permissions (fs/namei.c generic_permission, may_delete,
//! may_create, may_linkat; fs/attr.c setattr_prepare; fs/xattr.c
//! xattr_permission), on mode bits only: efuse never negotiates
//! FUSE_POSIX_ACL, so the kernel checks no ACLs on its mounts either.
//!
//! uid 0 stands for the capabilities root has (CAP_DAC_OVERRIDE,
//! CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_CHOWN, CAP_MKNOD, CAP_SYS_ADMIN):
//! the daemon cannot see a client's capability sets through the socket.

use efuse_abi::structs::Attr;

pub(crate) const MAY_EXEC: u32 = 1;
pub(crate) const MAY_WRITE: u32 = 2;
pub(crate) const MAY_READ: u32 = 4;

/// Who a client is, learned at connection (SO_PEERCRED and the
/// process's `Groups:` line).
#[derive(Debug, Clone)]
pub(crate) struct Creds {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub groups: Vec<u32>,
}

impl Creds {
    pub(crate) fn root(&self) -> bool {
        self.uid == 0
    }

    pub(crate) fn in_group(&self, gid: u32) -> bool {
        gid == self.gid || self.groups.contains(&gid)
    }

    pub(crate) fn owns(&self, a: &Attr) -> bool {
        self.uid == a.uid
    }

    /// inode_owner_or_capable.
    pub(crate) fn owner_or_root(&self, a: &Attr) -> bool {
        self.root() || self.owns(a)
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

/// generic_permission: Ok or the errno (positive).
pub(crate) fn permission(c: &Creds, a: &Attr, mask: u32) -> Result<(), i32> {
    let mask = mask & (MAY_READ | MAY_WRITE | MAY_EXEC);
    if c.root() {
        // CAP_DAC_OVERRIDE: all but executing a file nobody may execute.
        if mask & MAY_EXEC == 0 || is_dir(a) || a.mode & 0o111 != 0 {
            return Ok(());
        }
        return Err(libc::EACCES);
    }
    let bits = if c.owns(a) {
        a.mode >> 6
    } else if c.in_group(a.gid) {
        a.mode >> 3
    } else {
        a.mode
    } & 7;
    if mask & !bits != 0 {
        return Err(libc::EACCES);
    }
    Ok(())
}

/// may_create: write and search on the parent directory.
pub(crate) fn may_create(c: &Creds, dir: &Attr) -> Result<(), i32> {
    permission(c, dir, MAY_WRITE | MAY_EXEC)
}

/// may_delete: write and search on the parent, and the sticky-bit rule
/// (in a sticky directory only the file's owner, the directory's owner or
/// root may remove or replace a name).
pub(crate) fn may_delete(c: &Creds, dir: &Attr, victim: &Attr) -> Result<(), i32> {
    permission(c, dir, MAY_WRITE | MAY_EXEC)?;
    if dir.mode & libc::S_ISVTX != 0 && !c.root() && !c.owns(victim) && !c.owns(dir) {
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
    if !protected || c.owner_or_root(src) {
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
        if c.root() {
            return Ok(());
        }
        return Err(if write { libc::EPERM } else { libc::ENODATA });
    }
    if name.starts_with(b"user.") {
        if !is_reg(a) && !is_dir(a) {
            return Err(if write { libc::EPERM } else { libc::ENODATA });
        }
        if is_dir(a) && a.mode & libc::S_ISVTX != 0 && write && !c.owner_or_root(a) {
            return Err(libc::EPERM);
        }
        return permission(c, a, mask);
    }
    if name.starts_with(b"security.") {
        // Left to security modules by the kernel; only root changes them here.
        if write && !c.root() {
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
        Creds { uid, gid, pid: 0, groups: groups.to_vec() }
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

//! Acting as the caller: what a create-type call (create, mkdir, mknod,
//! symlink, O_TMPFILE) runs with, so that the backing file system gives the
//! new inode exactly the owner, group and mode it would give the caller.
//!
//! - **Mode**: the kernel has already applied the caller's umask (and, in a
//!   setgid directory, dropped a non-member's setgid bit) to the mode it
//!   sends. The daemon's own umask must not apply a second time, so a create
//!   runs with a umask of 0, private to its thread (`unshare(CLONE_FS)` once
//!   per thread; the daemon's process-wide umask stays for its own files).
//! - **Owner and group** (daemon running as root): the thread's fsuid and
//!   fsgid become the caller's, and its supplementary groups the caller's
//!   (read from /proc, since FUSE sends only fsuid and fsgid), so the backing
//!   file system checks the creation and picks the new inode's group (the
//!   directory's, if setgid) exactly as for the caller itself.
//!   All three are per thread and restored before the reply, even on error.

use std::cell::Cell;
use std::sync::OnceLock;

use efuse::{Errno, RequestContext};

use super::sys;

thread_local! {
    /// This thread has a umask of its own (see the module documentation).
    static PRIVATE_UMASK: Cell<bool> = const { Cell::new(false) };
}

/// The daemon's own supplementary groups, restored after acting as a caller.
fn daemon_groups() -> &'static [u32] {
    static GROUPS: OnceLock<Vec<u32>> = OnceLock::new();
    GROUPS.get_or_init(|| sys::getgroups().unwrap_or_default())
}

/// Sets this thread's umask to 0, making it private to the thread first;
/// returns the umask to restore. Err when the thread cannot have a umask of
/// its own (creating would then apply the daemon's).
fn umask_zero() -> Result<u32, Errno> {
    if !PRIVATE_UMASK.with(Cell::get) {
        sys::unshare_fs().inspect_err(|e| {
            tracing::error!("stackfs: cannot give a worker thread its own umask (unshare(CLONE_FS): {e})");
        })?;
        PRIVATE_UMASK.with(|c| c.set(true));
    }
    Ok(sys::umask(0))
}

/// While alive, this thread creates as the caller. Restored on drop, so
/// every return path (errors included) gives the thread back its own ids
/// and umask.
pub(super) struct CallerCreds {
    umask: u32,
    saved: Option<(u32, u32)>,
    groups_changed: bool,
}

impl CallerCreds {
    /// Prepares this thread to create on behalf of `ctx`'s caller: umask 0
    /// always (Err if that cannot be had); when `as_caller` (the daemon runs as root), the caller's
    /// fsuid, fsgid and supplementary groups.
    pub(super) fn assume(ctx: &RequestContext<'_>, as_caller: bool) -> Result<CallerCreds, Errno> {
        let umask = umask_zero()?;
        let mut creds = CallerCreds { umask, saved: None, groups_changed: false };
        if !as_caller {
            return Ok(creds);
        }
        // Groups and gid first: once the fsuid is non-zero the thread's file
        // capabilities are gone (setgroups needs CAP_SETGID, which setfsuid
        // leaves alone, but keep the order that never depends on that).
        // Root callers pass every permission check and keep setgid bits
        // (CAP_FSETID): their supplementary groups change nothing.
        if ctx.uid != 0 {
            let groups = ctx.caller().supplementary_groups().unwrap_or_default();
            if groups != daemon_groups() {
                sys::setgroups_thread(&groups)?;
                creds.groups_changed = true;
            }
        }
        let old_gid = sys::setfsgid(ctx.gid);
        let old_uid = sys::setfsuid(ctx.uid);
        creds.saved = Some((old_uid, old_gid));
        Ok(creds)
    }
}

impl Drop for CallerCreds {
    fn drop(&mut self) {
        sys::umask(self.umask);
        if let Some((uid, gid)) = self.saved.take() {
            // uid first: back to fsuid 0 restores the capabilities setfsgid
            // and setgroups may need.
            sys::setfsuid(uid);
            sys::setfsgid(gid);
            if self.groups_changed {
                if let Err(e) = sys::setgroups_thread(daemon_groups()) {
                    // Nothing else can be done; the thread keeps the caller's
                    // groups, which only ever narrow what it may do.
                    tracing::error!("stackfs: cannot restore the daemon's groups: {e}");
                }
            }
        }
    }
}

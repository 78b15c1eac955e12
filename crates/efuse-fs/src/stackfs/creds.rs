//! Acting as the caller: a guard that switches this thread's file-system uid
//! and gid to the requesting process's for the duration of a create-type call.

use efuse::RequestContext;

use super::sys;

/// While alive, this thread's fsuid/fsgid are the caller's. Restored on drop,
/// so every return path (errors included) gives the thread back its own ids.
pub(super) struct CallerCreds {
    saved: Option<(u32, u32)>,
}

impl CallerCreds {
    /// Switches to the caller's ids when `enabled` (the daemon runs as root)
    /// and the caller is someone else; otherwise does nothing.
    pub(super) fn assume(ctx: &RequestContext<'_>, enabled: bool) -> CallerCreds {
        if !enabled {
            return CallerCreds { saved: None };
        }
        // gid first: once the fsuid is non-zero the thread's file
        // capabilities are gone (setfsgid needs only CAP_SETGID, but keep the
        // order that never depends on that).
        let old_gid = sys::setfsgid(ctx.gid);
        let old_uid = sys::setfsuid(ctx.uid);
        CallerCreds { saved: Some((old_uid, old_gid)) }
    }
}

impl Drop for CallerCreds {
    fn drop(&mut self) {
        if let Some((uid, gid)) = self.saved.take() {
            // uid first: back to fsuid 0 restores the capabilities setfsgid may need.
            sys::setfsuid(uid);
            sys::setfsgid(gid);
        }
    }
}

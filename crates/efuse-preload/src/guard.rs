//! The re-entry guard: while the library works on a call, the C library
//! functions it uses (directly or through std) land in this library's own
//! exports again; the guard sends them straight to the real functions.
//!
//! A thread-local flag with a const initializer and no destructor: reading
//! it allocates nothing and registers nothing, so it is safe at any point
//! of a thread's life, in a signal handler included.

use std::cell::Cell;

thread_local! {
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

/// Held while the library works on a call of this thread.
pub struct Entered(());

impl Drop for Entered {
    fn drop(&mut self) {
        BUSY.with(|b| b.set(false));
    }
}

/// Enters the library, or None if this thread is already inside it (the
/// caller then uses the real function).
pub fn enter() -> Option<Entered> {
    BUSY.with(|b| {
        if b.get() {
            None
        } else {
            b.set(true);
            Some(Entered(()))
        }
    })
}

thread_local! {
    /// The thread's id once asked (0: not yet); a forked child forgets it
    /// ([`forget_tid`]): its one thread has another id.
    static TID: Cell<u32> = const { Cell::new(0) };
}

/// The calling thread's id.
pub fn tid() -> u32 {
    TID.with(|t| match t.get() {
        0 => {
            // SAFETY: gettid has no preconditions.
            let id = unsafe { libc::syscall(libc::SYS_gettid) as u32 };
            t.set(id);
            id
        }
        id => id,
    })
}

/// In a forked child: the thread id cached by the parent's thread is not
/// this thread's.
pub fn forget_tid() {
    TID.with(|t| t.set(0));
}

/// Sets the calling thread's errno.
pub fn set_errno(e: i32) {
    // SAFETY: errno is the calling thread's own.
    unsafe { *libc::__errno_location() = e };
}

/// The calling thread's errno.
pub fn errno() -> i32 {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() }
}

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

/// The calling thread's id (a system call: a cached value would be wrong
/// in a forked child).
pub fn tid() -> u32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as u32 }
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

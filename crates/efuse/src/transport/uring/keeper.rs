//! Keeps the other CPUs of a small machine from going idle while one CPU's
//! ring queue is busy, so the scheduler leaves the program on its CPU.
//!
//! Why: a request is served on the CPU that sent it (the crew pinned there),
//! and the member that answers it wakes the program while it is still
//! running itself. The scheduler then sees that CPU busy and another one
//! idle, and moves the program to the idle CPU: every request of a
//! single-threaded program then pays a wake-up of a halted CPU (measured on
//! a 2-CPU VM: 40 us per LOOKUP with one client thread, 12 us with two,
//! where no CPU is idle). A keeper is one thread per CPU, at the lowest
//! priority, that spins with `sched_yield` while another CPU received a
//! request within the last [`WINDOW`] and its own CPU did not: that CPU is
//! then never idle, so the program stays where its requests are served,
//! and anything else that wants the CPU gets it at once (the keeper yields
//! on every turn and runs at nice 19). With no request anywhere for a
//! window, keepers sleep; the first request after that wakes them.
//!
//! Only on machines of at most [`MAX_CPUS`] online CPUs: on larger ones
//! keeping every idle CPU busy costs more than the wake-ups it saves.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long after the last request keepers go on spinning.
pub(super) const WINDOW: Duration = Duration::from_millis(1);
/// Keepers run only on machines with at most this many online CPUs.
pub(super) const MAX_CPUS: usize = 2;

/// What members and keepers share.
pub(crate) struct Keepers {
    epoch: Instant,
    /// Per queue (online CPU, by index): when its members last received a
    /// request, in ns since `epoch` (0: never).
    last: Vec<AtomicU64>,
    /// Keepers are asleep (no request anywhere for a window).
    asleep: AtomicBool,
    wake: Mutex<()>,
    woken: Condvar,
    stop: AtomicBool,
}

impl Keepers {
    pub(super) fn new(queues: usize) -> Arc<Keepers> {
        Arc::new(Keepers {
            epoch: Instant::now(),
            last: (0..queues).map(|_| AtomicU64::new(0)).collect(),
            asleep: AtomicBool::new(true),
            wake: Mutex::new(()),
            woken: Condvar::new(),
            stop: AtomicBool::new(false),
        })
    }

    fn now(&self) -> u64 {
        // Never 0 ("never"), whatever the clock says.
        (self.epoch.elapsed().as_nanos() as u64).max(1)
    }

    /// A member of queue `idx` received a request.
    pub(super) fn note(&self, idx: usize) {
        if let Some(l) = self.last.get(idx) {
            l.store(self.now(), Ordering::SeqCst);
        }
        // Pairs with the keeper's store of `asleep` then look at `last`:
        // either it sees this request or this call sees it asleep.
        if self.asleep.load(Ordering::SeqCst) && self.asleep.swap(false, Ordering::SeqCst) {
            let _guard = self.wake.lock().unwrap_or_else(|p| p.into_inner());
            self.woken.notify_all();
        }
    }

    fn recent(&self, idx: usize, now: u64) -> bool {
        self.last.get(idx).is_some_and(|l| {
            let t = l.load(Ordering::SeqCst);
            t != 0 && now.saturating_sub(t) < WINDOW.as_nanos() as u64
        })
    }

    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _guard = self.wake.lock().unwrap_or_else(|p| p.into_inner());
        self.woken.notify_all();
    }

    /// The keeper of queue `idx` (its thread is pinned to that queue's CPU).
    pub(super) fn run(self: Arc<Keepers>, idx: usize) {
        // SAFETY: setpriority on this thread (tid) only.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, 19);
        }
        while !self.stop.load(Ordering::Acquire) {
            let now = self.now();
            let mine = self.recent(idx, now);
            let others = (0..self.last.len()).any(|j| j != idx && self.recent(j, now));
            if others && !mine {
                // Busy elsewhere, idle here: stay runnable, give way to anyone.
                // SAFETY: sched_yield has no preconditions.
                unsafe { libc::sched_yield() };
                continue;
            }
            let guard = self.wake.lock().unwrap_or_else(|p| p.into_inner());
            if mine {
                // This CPU serves requests itself: look again after a window.
                let _ = self.woken.wait_timeout(guard, WINDOW);
                continue;
            }
            // Nothing anywhere: sleep until a request comes (or a stop). A
            // request noted before `asleep` was set did not wake anyone:
            // look once more after setting it.
            self.asleep.store(true, Ordering::SeqCst);
            let now = self.now();
            if (0..self.last.len()).any(|j| self.recent(j, now)) || self.stop.load(Ordering::Acquire) {
                continue;
            }
            let _ = self.woken.wait_timeout(guard, Duration::from_millis(500));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        cond()
    }

    /// A keeper wakes on a request elsewhere, goes back to sleep a window
    /// after the last one, and stops when told.
    #[test]
    fn keeper_wakes_sleeps_and_stops() {
        let k = Keepers::new(2);
        let t = {
            let k = k.clone();
            std::thread::spawn(move || k.run(1))
        };
        assert!(wait_for(Duration::from_secs(2), || k.asleep.load(Ordering::SeqCst)), "keeper never slept");
        k.note(0);
        assert!(!k.asleep.load(Ordering::SeqCst), "a request must wake the keepers");
        // With no request after it, the keeper sleeps again after a window.
        assert!(wait_for(Duration::from_secs(2), || k.asleep.load(Ordering::SeqCst)), "keeper kept spinning");
        let start = Instant::now();
        k.stop();
        t.join().unwrap();
        assert!(start.elapsed() < Duration::from_secs(1), "stop took {:?}", start.elapsed());
    }

    #[test]
    fn recent_requests_only() {
        let k = Keepers::new(2);
        let now = k.now();
        assert!(!k.recent(0, now), "never noted");
        k.note(0);
        let now = k.now();
        assert!(k.recent(0, now) && !k.recent(1, now));
        assert!(!k.recent(0, now + 2 * WINDOW.as_nanos() as u64));
        assert!(!k.recent(7, now), "out of range");
    }
}

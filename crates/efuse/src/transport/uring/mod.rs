//! The FUSE-over-io_uring transport (Linux 6.14+, `CONFIG_FUSE_IO_URING`,
//! module parameter `enable_uring=Y`): ring queues per CPU, so a request is
//! fetched, served and answered on the CPU that issued it, with one
//! `io_uring_enter` per request instead of a read and a write.
//!
//! The protocol (the kernel side is `fs/fuse/dev_uring.c`):
//! - INIT arrives on /dev/fuse as always; the daemon asks for
//!   `FUSE_OVER_IO_URING` in its reply. From then on the kernel holds new
//!   requests until every queue (one per *possible* CPU, qid = CPU index) has
//!   an entry registered, or until a registration fails (then it falls back to
//!   /dev/fuse for this connection).
//! - A ring entry is two buffers: a header buffer (`struct
//!   fuse_uring_req_header`: 128 bytes for the in/out header, 128 for the
//!   per-opcode argument, then `fuse_uring_ent_in_out`) and a payload buffer of
//!   at least `max(8192, max_write, max_pages * 4096)` bytes.
//! - `FUSE_IO_URING_CMD_REGISTER`: an `IORING_OP_URING_CMD` on the /dev/fuse
//!   session fd, in a 128-byte SQE whose `addr`/`len` point at the iovec pair
//!   [header, payload] and whose 80-byte command area holds `fuse_uring_cmd_req`
//!   with the qid. The command completes only when a request has been copied
//!   into the entry: `fuse_in_header` at the start of the header area, the
//!   opcode's first argument (`in_args[0]`, possibly empty) in `op_in`, the
//!   remaining arguments (names, write data, extensions) in the payload, and
//!   `ring_ent_in_out.{commit_id, payload_sz}`. The kernel copies a request
//!   into a waiting entry through task work of the thread that submitted the
//!   entry's command (or, when the request was already waiting, in the
//!   COMMIT_AND_FETCH that makes the entry available).
//! - The reply goes into the same buffers: `fuse_out_header` at the start of
//!   the header area, the reply body in the payload with
//!   `ring_ent_in_out.payload_sz` set, then `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`
//!   with the entry's `commit_id` hands the reply over and waits for the next
//!   request in one command (any thread may submit it).
//! - INTERRUPT and FORGET still go through /dev/fuse (a /dev/fuse worker keeps
//!   serving it); notifications are written there too.
//! - When the connection ends (unmount, abort, daemon exit), commands waiting
//!   in the kernel complete with `-ENOTCONN` (or `-ECANCELED`), and a commit
//!   for a request of a dead connection fails with `-ENOTCONN`.
//!
//! Threading ([`crew`]): each online CPU's queue is served by a crew of
//! threads pinned to it, each keeping one entry available, so a handler that
//! blocks holds back only its own request. Queues of CPUs that are possible
//! but offline get one entry each, registered by a crew of an online CPU.
//! Buffers ([`memory`]) are never freed while the kernel may write them: a
//! stopping member waits for its commands to come back.

mod crew;
mod keeper;
mod memory;

use std::os::fd::OwnedFd;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

pub use crew::UringError;
use crew::{member_thread, MemberStart, Queue};
use memory::EntryMem;

use crate::filesystem::Filesystem;
use crate::session::{Negotiated, Session};

/// Members (each with one available entry) per online CPU's queue, unless
/// configured: how many requests of one CPU can be in service at once
/// before the next one waits in the kernel.
pub const DEFAULT_QUEUE_DEPTH: usize = 8;
/// How long `stop_and_join` waits for members still inside the file system.
const JOIN_GRACE: Duration = Duration::from_secs(5);

/// CPUs listed in a sysfs cpu list such as "0-3,8,10-11".
fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?);
                if b < a || b - a > 65536 {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

fn cpu_list(which: &str) -> Option<Vec<usize>> {
    parse_cpu_list(&std::fs::read_to_string(format!("/sys/devices/system/cpu/{which}")).ok()?)
}

/// (possible, online) CPUs: the kernel expects one queue per possible CPU;
/// only online ones run tasks whose requests need serving.
fn cpus() -> (usize, Vec<usize>) {
    let fallback = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let possible = cpu_list("possible").and_then(|c| c.iter().max().map(|m| m + 1)).unwrap_or(fallback);
    let online = cpu_list("online").filter(|c| !c.is_empty()).unwrap_or_else(|| (0..fallback).collect());
    let online = online.into_iter().filter(|&c| c < possible).collect();
    (possible, online)
}

/// The running ring queues.
pub(crate) struct UringRunning {
    queues: Vec<Arc<Queue>>,
    keepers: Option<(Arc<keeper::Keepers>, Vec<std::thread::JoinHandle<()>>)>,
}

impl UringRunning {
    pub(crate) fn queues(&self) -> usize {
        self.queues.len()
    }

    /// Tells every crew to stop (they also stop when the connection ends)
    /// and waits for their members: a member leaves once its commands are
    /// back from the kernel; one still inside the file system after a grace
    /// period is left behind (its ring and buffers stay allocated).
    pub(crate) fn stop_and_join(mut self) {
        for q in &self.queues {
            q.stop();
        }
        if let Some((k, threads)) = self.keepers.take() {
            k.stop();
            for t in threads {
                let _ = t.join();
            }
        }
        let deadline = Instant::now() + JOIN_GRACE;
        for q in &self.queues {
            loop {
                let threads = q.take_threads();
                if threads.is_empty() {
                    break;
                }
                for t in threads {
                    while !t.is_finished() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    if t.is_finished() {
                        let _ = t.join();
                    } else {
                        tracing::warn!(
                            qid = q.qid,
                            "a ring queue member is still inside the file system; not waiting for it"
                        );
                    }
                }
            }
        }
    }
}

/// Registers the queues on the connection of `session_fd` (a crew of
/// `depth` members per online CPU) and starts them. Returns once every
/// queue has registered its entries, or with the first failure.
pub(crate) fn start<F: Filesystem>(
    session: &Arc<Session<F>>,
    session_fd: Arc<OwnedFd>,
    negotiated: &Negotiated,
    depth: usize,
) -> Result<UringRunning, UringError> {
    let depth = depth.clamp(1, 256);
    // The kernel refuses payload buffers smaller than its max_payload_sz.
    let payload_size = (negotiated.max_write as usize).max(efuse_abi::MIN_READ_BUFFER).next_multiple_of(4096);
    let (possible, online) = cpus();
    if online.is_empty() {
        return Err(UringError::Other { qid: 0, what: "no online CPU found".into() });
    }
    let offline: Vec<usize> = (0..possible).filter(|c| !online.contains(c)).collect();
    let queues: Vec<Arc<Queue>> = online
        .iter()
        .map(|&cpu| Arc::new(Queue::new(cpu as u16, cpu, session.shared().clone(), payload_size, depth)))
        .collect();
    let (started_tx, started_rx) = mpsc::channel();
    let mut expected = 0;
    let mut failure = None;
    'start: for (n, q) in queues.iter().enumerate() {
        for member in 0..depth {
            let qid = q.qid as usize;
            let alloc = |qid: usize, e: std::io::Error| UringError::Other {
                qid,
                what: format!("allocating ring buffers: {e}"),
            };
            let mut entries = match EntryMem::new(q.qid, payload_size) {
                Ok(e) => vec![Arc::new(e)],
                Err(e) => {
                    failure = Some(alloc(qid, e));
                    break 'start;
                }
            };
            q.count_entry();
            // Offline CPUs' queues: one entry each, on the first members.
            if member == 0 {
                for &cpu in offline.iter().skip(n).step_by(queues.len()) {
                    match EntryMem::new(cpu as u16, payload_size) {
                        Ok(e) => entries.push(Arc::new(e)),
                        Err(e) => {
                            failure = Some(alloc(cpu, e));
                            break 'start;
                        }
                    }
                }
            }
            let start = MemberStart {
                queue: q.clone(),
                session: session.clone(),
                fd: session_fd.clone(),
                entries,
                started: Some(started_tx.clone()),
            };
            q.note_member();
            match std::thread::Builder::new().name(format!("efuse-ring-{qid}")).spawn(move || member_thread(start)) {
                Ok(t) => {
                    q.add_thread(t);
                    expected += 1;
                }
                Err(e) => {
                    failure = Some(UringError::Other { qid, what: format!("cannot start its thread: {e}") });
                    break 'start;
                }
            }
        }
    }
    drop(started_tx);
    for _ in 0..expected {
        match started_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failure.get_or_insert(e);
            }
            Err(_) => {
                failure.get_or_insert(UringError::Other { qid: 0, what: "a queue thread died while starting".into() });
            }
        }
    }
    for q in &queues {
        let (queue, session, fd) = (q.clone(), session.clone(), session_fd.clone());
        // Members started later (to adopt answered held entries) come with
        // no entry of their own.
        let weak = Arc::downgrade(&queue);
        q.set_spawn(Box::new(move || {
            let queue = weak.upgrade().ok_or_else(|| std::io::Error::other("queue gone"))?;
            let start =
                MemberStart { queue, session: session.clone(), fd: fd.clone(), entries: Vec::new(), started: None };
            let qid = start.queue.qid;
            std::thread::Builder::new().name(format!("efuse-ring-{qid}")).spawn(move || member_thread(start))
        }));
    }
    // Small machines: keepers hold idle CPUs while a queue is busy (see keeper.rs).
    let mut keepers = None;
    if failure.is_none() && (2..=keeper::MAX_CPUS).contains(&queues.len()) {
        let k = keeper::Keepers::new(queues.len());
        let mut threads = Vec::new();
        for (idx, q) in queues.iter().enumerate() {
            q.set_keepers(k.clone(), idx);
            let (k, cpu) = (k.clone(), q.cpu());
            match std::thread::Builder::new().name(format!("efuse-keep-{cpu}")).spawn(move || {
                crew::pin_to_cpu(cpu);
                k.run(idx)
            }) {
                Ok(t) => threads.push(t),
                Err(e) => tracing::warn!("cannot start a CPU keeper thread: {e}"),
            }
        }
        keepers = Some((k, threads));
    }
    let running = UringRunning { queues, keepers };
    match failure {
        None => Ok(running),
        Some(e) => {
            // Members that did register stay until the connection ends (their
            // commands fail then); nothing will be sent to them.
            std::thread::spawn(move || running.stop_and_join());
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-3,8,10-11\n"), Some(vec![0, 1, 2, 3, 8, 10, 11]));
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
        let (possible, online) = cpus();
        assert!(possible >= 1 && !online.is_empty() && online.iter().all(|&c| c < possible));
    }
}

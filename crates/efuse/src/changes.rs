//! Changes: every change to names, attributes or data that the session
//! answers (whichever transport brought the request) or that the daemon
//! tells the kernel about (a [`crate::Connection`] notification, e.g. from
//! stackfs's watcher of the backing directory), told to listeners *before*
//! the change's reply goes out. Caches the daemon keeps outside the kernel
//! (the bypass clients' metadata tables) stay exact this way, under the same
//! rule as the kernel's caches.
//!
//! One more kind of change is invisible to the daemon: writes through a
//! kernel passthrough open go straight to the backing file. The session
//! counts such opens per node ([`Changes::unseen_writers`]): while one is
//! open, what a cache holds of that node may go stale without notice, so a
//! listener must not cache it.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use efuse_abi::structs as abi;
use efuse_abi::Operation;
use zerocopy::FromBytes;

use crate::reply::{Reply, ReplySink};
use crate::session::SessionShared;

/// One change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Name `name` in directory `parent` now names something else, or
    /// nothing (created, removed, renamed over); what it named before
    /// changed too (its link count, its ctime).
    Name { parent: u64, name: Box<[u8]> },
    /// The attributes or data of `nodeid` changed.
    Node { nodeid: u64 },
    /// Anything may have changed.
    All,
}

/// Told of changes before they are answered.
pub trait ChangeListener: Send + Sync {
    /// `changes` were made (or learnt of). Called before the reply that
    /// makes them visible is sent, from whatever thread answers it: keep it
    /// short, and never wait for a request of the same session.
    fn changed(&self, changes: &[Change]);
}

/// The listeners of one session, and the writes it cannot see.
#[derive(Default)]
pub struct Changes {
    listeners: RwLock<Vec<Arc<dyn ChangeListener>>>,
    any: AtomicBool,
    /// Kernel opens with passthrough and write access, per node: (fh of
    /// each open). Counted whether or not anyone listens, since a listener
    /// that comes later must know of opens made before it.
    unseen: Mutex<HashMap<u64, Vec<u64>>>,
    /// Whether `unseen` holds anything: a RELEASE looks no further when not
    /// (every kernel RELEASE passes here).
    any_unseen: AtomicBool,
}

impl std::fmt::Debug for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Changes").field("listening", &self.any.load(Ordering::Relaxed)).finish()
    }
}

impl Changes {
    /// Adds a listener; it hears every change answered from now on.
    pub fn listen(&self, l: Arc<dyn ChangeListener>) {
        let mut v = self.listeners.write().unwrap_or_else(|e| e.into_inner());
        v.push(l);
        self.any.store(true, Ordering::Release);
    }

    /// Removes a listener added with [`Changes::listen`] (the same Arc).
    pub fn unlisten(&self, l: &Arc<dyn ChangeListener>) {
        let mut v = self.listeners.write().unwrap_or_else(|e| e.into_inner());
        v.retain(|x| !Arc::ptr_eq(x, l));
        self.any.store(!v.is_empty(), Ordering::Release);
    }

    /// Whether anyone listens.
    pub fn listening(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }

    /// Tells every listener.
    pub fn tell(&self, changes: &[Change]) {
        if changes.is_empty() || !self.listening() {
            return;
        }
        let v = self.listeners.read().unwrap_or_else(|e| e.into_inner());
        for l in v.iter() {
            l.changed(changes);
        }
    }

    /// How many kernel opens of `nodeid` may write to it without the
    /// daemon seeing the writes (passthrough).
    pub fn unseen_writers(&self, nodeid: u64) -> usize {
        self.unseen.lock().unwrap_or_else(|e| e.into_inner()).get(&nodeid).map_or(0, |v| v.len())
    }

    fn opened_unseen(&self, nodeid: u64, fh: u64) {
        let mut m = self.unseen.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(nodeid).or_default().push(fh);
        self.any_unseen.store(true, Ordering::Release);
    }

    fn released(&self, nodeid: u64, fh: u64) {
        if !self.any_unseen.load(Ordering::Acquire) {
            return;
        }
        let mut m = self.unseen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = m.get_mut(&nodeid) {
            if let Some(at) = v.iter().position(|&x| x == fh) {
                v.swap_remove(at);
            }
            if v.is_empty() {
                m.remove(&nodeid);
            }
        }
        self.any_unseen.store(!m.is_empty(), Ordering::Release);
    }
}

fn name(parent: u64, n: &OsStr) -> Change {
    Change::Name { parent, name: n.as_bytes().into() }
}

fn node(nodeid: u64) -> Change {
    Change::Node { nodeid }
}

/// What a request changes, if it succeeds.
fn of_request(nodeid: u64, op: &Operation<'_>) -> Vec<Change> {
    match op {
        Operation::Setattr { .. }
        | Operation::Write { .. }
        | Operation::Fallocate { .. }
        | Operation::Setxattr { .. }
        | Operation::Removexattr { .. } => vec![node(nodeid)],
        Operation::CopyFileRange { arg } | Operation::CopyFileRange64 { arg } => vec![node(arg.nodeid_out)],
        Operation::Create { name: n, .. }
        | Operation::Mknod { name: n, .. }
        | Operation::Mkdir { name: n, .. }
        | Operation::Symlink { name: n, .. }
        | Operation::Unlink { name: n }
        | Operation::Rmdir { name: n } => vec![name(nodeid, n), node(nodeid)],
        Operation::Link { arg, name: n } => vec![name(nodeid, n), node(nodeid), node(arg.oldnodeid)],
        Operation::Rename { newdir, name: n, newname } => {
            vec![name(nodeid, n), name(*newdir, newname), node(nodeid), node(*newdir)]
        }
        Operation::Rename2 { arg, name: n, newname } => {
            vec![name(nodeid, n), name(arg.newdir, newname), node(nodeid), node(arg.newdir)]
        }
        // O_TRUNC truncates (with ATOMIC_O_TRUNC) in the OPEN itself.
        Operation::Open { arg } if arg.flags as i32 & libc::O_TRUNC != 0 => vec![node(nodeid)],
        _ => Vec::new(),
    }
}

/// Whether an open with these flags may write.
fn writes(flags: u32) -> bool {
    let acc = flags as i32 & libc::O_ACCMODE;
    acc == libc::O_WRONLY || acc == libc::O_RDWR
}

/// What the session does around one request: None when there is nothing to
/// tell or count, else the sink to answer through instead of `sink`.
pub(crate) fn watch(
    changes: &Arc<Changes>,
    nodeid: u64,
    op: &Operation<'_>,
    sink: &Arc<dyn ReplySink>,
) -> Option<Arc<dyn ReplySink>> {
    // Passthrough opens for writing are counted whoever listens.
    let writer_open = match op {
        Operation::Open { arg } if writes(arg.flags) => Some(WriterOpen::Open(nodeid)),
        Operation::Create { arg, .. } if writes(arg.flags) => Some(WriterOpen::Create),
        _ => None,
    };
    if let Operation::Release { arg } = op {
        changes.released(nodeid, arg.fh);
        return None;
    }
    let told = if changes.listening() { of_request(nodeid, op) } else { Vec::new() };
    if told.is_empty() && writer_open.is_none() {
        return None;
    }
    Some(Arc::new(Telling { inner: sink.clone(), changes: changes.clone(), told, writer_open }))
}

enum WriterOpen {
    /// OPEN of this node.
    Open(u64),
    /// CREATE: the node is in the reply.
    Create,
}

/// A sink that tells the listeners, then answers.
struct Telling {
    inner: Arc<dyn ReplySink>,
    changes: Arc<Changes>,
    told: Vec<Change>,
    writer_open: Option<WriterOpen>,
}

impl Telling {
    /// The (nodeid, fh) of a successful open reply that carries
    /// FOPEN_PASSTHROUGH.
    fn passthrough_open(&self, reply: &Reply<'_>) -> Option<(u64, u64)> {
        let w = self.writer_open.as_ref()?;
        if reply.error != 0 {
            return None;
        }
        // Replies come in one slice; gather only if one did not.
        let gathered: Vec<u8>;
        let bytes: &[u8] = match reply.payload {
            [one] => one,
            many => {
                gathered = many.iter().flat_map(|p| p.iter().copied()).collect();
                &gathered
            }
        };
        let (nodeid, open) = match w {
            WriterOpen::Open(n) => (*n, abi::OpenOut::read_from_prefix(bytes).ok()?.0),
            WriterOpen::Create => {
                let (entry, rest) = abi::EntryOut::read_from_prefix(bytes).ok()?;
                (entry.nodeid, abi::OpenOut::read_from_prefix(rest).ok()?.0)
            }
        };
        (open.open_flags & efuse_abi::consts::fopen::PASSTHROUGH != 0).then_some((nodeid, open.fh))
    }
}

impl ReplySink for Telling {
    fn send(&self, reply: &Reply<'_>) {
        let changes = &self.changes;
        let mut told = self.told.clone();
        if let Some((nodeid, fh)) = self.passthrough_open(reply) {
            changes.opened_unseen(nodeid, fh);
            // What a cache holds of it may go stale from now on.
            told.push(node(nodeid));
        }
        // A failed change may still have changed something (a short write).
        changes.tell(&told);
        self.inner.send(reply);
    }

    fn session(&self) -> Option<&SessionShared> {
        self.inner.session()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::{Grant, MemorySink};
    use efuse_abi::Opcode;
    use std::io::IoSlice;
    use zerocopy::IntoBytes;

    /// Records what it hears, and how many replies had gone out by then.
    struct Ear {
        heard: Mutex<Vec<(Change, usize)>>,
        sink: Arc<MemorySink>,
    }

    impl ChangeListener for Ear {
        fn changed(&self, changes: &[Change]) {
            let sent = self.sink.replies.lock().unwrap().len();
            self.heard.lock().unwrap().extend(changes.iter().map(|c| (c.clone(), sent)));
        }
    }

    fn setup() -> (Arc<Changes>, Arc<MemorySink>, Arc<Ear>) {
        let changes = Arc::new(Changes::default());
        let sink = Arc::new(MemorySink::default());
        let ear = Arc::new(Ear { heard: Mutex::default(), sink: sink.clone() });
        (changes, sink, ear)
    }

    fn answer(s: &Arc<dyn ReplySink>, opcode: Opcode, error: i32, payload: &[u8]) {
        let p = [IoSlice::new(payload)];
        s.send(&Reply { opcode, unique: 1, error, payload: &p, grant: Grant::Nothing });
    }

    #[test]
    fn listeners_hear_a_change_before_its_reply() {
        let (changes, mem, ear) = setup();
        let sink: Arc<dyn ReplySink> = mem.clone();
        let unlink = Operation::Unlink { name: OsStr::new("f") };
        // Nobody listens: nothing to wrap.
        assert!(watch(&changes, 5, &unlink, &sink).is_none());
        let l: Arc<dyn ChangeListener> = ear.clone();
        changes.listen(l.clone());
        let w = watch(&changes, 5, &unlink, &sink).expect("watched");
        answer(&w, Opcode::Unlink, 0, &[]);
        let heard = ear.heard.lock().unwrap().clone();
        assert_eq!(heard, [(Change::Name { parent: 5, name: b"f"[..].into() }, 0), (Change::Node { nodeid: 5 }, 0)]);
        assert_eq!(mem.replies.lock().unwrap().len(), 1);
        // Reads change nothing; after unlisten nobody hears.
        assert!(watch(&changes, 5, &Operation::Readlink, &sink).is_none());
        changes.unlisten(&l);
        assert!(!changes.listening());
        assert!(watch(&changes, 5, &unlink, &sink).is_none());
    }

    #[test]
    fn renames_and_links_name_both_sides() {
        let rename = Operation::Rename { newdir: 9, name: OsStr::new("a"), newname: OsStr::new("b") };
        let got = of_request(5, &rename);
        assert!(got.contains(&Change::Name { parent: 5, name: b"a"[..].into() }));
        assert!(got.contains(&Change::Name { parent: 9, name: b"b"[..].into() }));
        assert!(got.contains(&Change::Node { nodeid: 9 }));
        let link = Operation::Link { arg: abi::LinkIn { oldnodeid: 7 }, name: OsStr::new("l") };
        assert!(of_request(5, &link).contains(&Change::Node { nodeid: 7 }));
        let trunc =
            Operation::Open { arg: abi::OpenIn { flags: (libc::O_WRONLY | libc::O_TRUNC) as u32, open_flags: 0 } };
        assert_eq!(of_request(5, &trunc), [Change::Node { nodeid: 5 }]);
    }

    #[test]
    fn passthrough_writers_are_counted_until_released() {
        let (changes, mem, ear) = setup();
        let sink: Arc<dyn ReplySink> = mem.clone();
        changes.listen(ear.clone());
        let open = |flags: i32| Operation::Open { arg: abi::OpenIn { flags: flags as u32, open_flags: 0 } };
        let out = abi::OpenOut { fh: 77, open_flags: efuse_abi::consts::fopen::PASSTHROUGH, backing_id: 3 };
        // Read-only: nothing to count, nothing to wrap.
        assert!(watch(&changes, 5, &open(libc::O_RDONLY), &sink).is_none());
        let w = watch(&changes, 5, &open(libc::O_RDWR), &sink).expect("watched");
        answer(&w, Opcode::Open, 0, out.as_bytes());
        assert_eq!(changes.unseen_writers(5), 1);
        assert!(ear.heard.lock().unwrap().contains(&(Change::Node { nodeid: 5 }, 0)));
        // Without passthrough the writes come through the daemon: not counted.
        let plain = abi::OpenOut { fh: 78, open_flags: 0, backing_id: 0 };
        let w = watch(&changes, 6, &open(libc::O_WRONLY), &sink).expect("watched");
        answer(&w, Opcode::Open, 0, plain.as_bytes());
        assert_eq!(changes.unseen_writers(6), 0);
        // A failed open counts nothing.
        let w = watch(&changes, 8, &open(libc::O_WRONLY), &sink).expect("watched");
        answer(&w, Opcode::Open, -libc::EACCES, &[]);
        assert_eq!(changes.unseen_writers(8), 0);
        // RELEASE of another handle leaves it; of this one ends it.
        let release = |fh| Operation::Release { arg: abi::ReleaseIn { fh, ..Default::default() } };
        assert!(watch(&changes, 5, &release(1), &sink).is_none());
        assert_eq!(changes.unseen_writers(5), 1);
        watch(&changes, 5, &release(77), &sink);
        assert_eq!(changes.unseen_writers(5), 0);
    }

    #[test]
    fn notifications_to_the_kernel_are_told_too() {
        let (changes, _mem, ear) = setup();
        changes.listen(ear.clone());
        let devnull = std::fs::OpenOptions::new().write(true).open("/dev/null").unwrap();
        let conn = crate::Connection::new(Arc::new(devnull.into())).telling(changes.clone());
        conn.inval_entry(3, OsStr::new("x")).unwrap();
        conn.inval_inode(4, 0, 0).unwrap();
        let heard: Vec<Change> = ear.heard.lock().unwrap().iter().map(|h| h.0.clone()).collect();
        assert_eq!(heard, [Change::Name { parent: 3, name: b"x"[..].into() }, Change::Node { nodeid: 4 }]);
    }
}

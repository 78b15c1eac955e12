//! The inode table: which backing inode each node id stands for, how many
//! lookups the kernel holds on it, and a bounded set of `O_PATH` descriptors.
//!
//! A node is keyed by the backing (st_dev, st_ino), so hard links share one
//! node. Its node id is ours (a counter; never reused, so generation 0 keeps
//! (nodeid, generation) unique). Every node remembers a file handle
//! (name_to_handle_at); its `O_PATH` descriptor is kept in an LRU of at most
//! `bound` entries and reopened with open_by_handle_at when needed again.
//! Open files do not keep their node's descriptor: an evicted one is reopened
//! by handle like any other. Two kinds of node keep theirs ("pinned"): nodes
//! without a handle (no CAP_DAC_READ_SEARCH, a file system without export
//! support), and nodes unlinked or replaced through the mount while open
//! ([`InodeTable::pin_if_open`]), since a removed inode cannot be opened by
//! handle and its descriptor is what keeps its data reachable (and alive).
//!
//! Descriptors are handed out as `Arc<OwnedFd>`: eviction drops the table's
//! reference, and the descriptor closes when the last operation using it ends.
//!
//! For the backing-directory watcher the table also answers "which node is
//! this?" by file handle (fanotify reports handles) and by (st_dev, st_ino)
//! (inotify reports names, which the watcher stats). A regular file's I/O
//! state ([`NodeIo`]) hangs off its node and goes away with it.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use efuse::Errno;

use super::fileio::NodeIo;
use super::sys::{self, FileHandle};

/// The kernel's node id of the root directory.
pub(super) const ROOT_ID: u64 = 1;

/// Backing identity of an inode: (st_dev, st_ino).
pub(super) type InodeKey = (u64, u64);

/// No neighbour in the LRU list.
const NIL: u64 = 0;

/// Fewest descriptors the LRU keeps, however many nodes are kept pinned.
const LRU_FLOOR: usize = 16;

struct Node {
    key: InodeKey,
    nlookup: u64,
    /// Open files (and directories) on this node.
    nopen: u32,
    /// Unlinked or replaced through the mount while open: the descriptor
    /// stays out of the LRU until the last open is released.
    keep: bool,
    handle: Option<FileHandle>,
    fd: Option<Arc<OwnedFd>>,
    in_lru: bool,
    prev: u64,
    next: u64,
    /// `Table::tick` when last moved to the LRU head.
    stamp: u64,
    /// I/O state of a regular file, made on first open.
    io: Option<Arc<NodeIo>>,
    /// A directory found outside the backing tree: unreachable from now on.
    detached: bool,
    /// The value of `InodeTable::moves` when this directory was last found
    /// inside the backing tree.
    verified: u64,
}

struct Table {
    nodes: HashMap<u64, Node>,
    by_key: HashMap<InodeKey, u64>,
    /// Descriptors of each mount seen, for open_by_handle_at, by mount id.
    mounts: HashMap<i32, Arc<OwnedFd>>,
    next_id: u64,
    head: u64,
    tail: u64,
    lru_len: usize,
    pinned: usize,
    /// Nodes with `nopen > 0`: an unlink needs to look for one to pin only
    /// when there are any.
    open_nodes: usize,
    /// Nodes with `keep` set.
    kept: usize,
    tick: u64,
    /// Node by [`FileHandle::key`], kept once [`InodeTable::track_handles`] was called.
    by_handle: Option<HashMap<Box<[u8]>, u64>>,
}

/// Counts, for tests.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TableCounts {
    pub nodes: usize,
    /// Descriptors held in the LRU.
    pub cached: usize,
    /// Descriptors held outside the LRU.
    pub pinned: usize,
}

pub(super) struct InodeTable {
    table: Mutex<Table>,
    /// Most descriptors the LRU holds.
    bound: usize,
    /// File handles work here (root with CAP_DAC_READ_SEARCH, export support).
    handles: bool,
    warned_pinned: std::sync::atomic::AtomicBool,
    /// Directory moves seen behind the mount so far (see [`Self::dir_moved`]).
    moves: std::sync::atomic::AtomicU64,
    /// `fh` 0 was served at least once ([`note_stateless`](Self::note_stateless)).
    served_stateless: std::sync::atomic::AtomicBool,
    /// The mount of the root on which open_by_handle_at reaches an inode
    /// with no name while it is held (probed at start; see
    /// [`pin_if_open`](Self::pin_if_open)); None if it does not.
    reach_unlinked: Option<i32>,
}

impl Node {
    /// Found again by name below a directory inside the tree: a directory
    /// cut off once is back (checked again on its next use).
    fn readmit(&mut self) {
        if self.detached {
            self.detached = false;
            self.verified = 0;
        }
    }
}

impl Table {
    fn unlink_lru(&mut self, id: u64) {
        let Some(n) = self.nodes.get_mut(&id) else { return };
        if !n.in_lru {
            return;
        }
        n.in_lru = false;
        let (prev, next) = (n.prev, n.next);
        n.prev = NIL;
        n.next = NIL;
        match self.nodes.get_mut(&prev) {
            Some(p) => p.next = next,
            None => self.head = next,
        }
        match self.nodes.get_mut(&next) {
            Some(nx) => nx.prev = prev,
            None => self.tail = prev,
        }
        self.lru_len -= 1;
    }

    fn push_head(&mut self, id: u64) {
        self.tick += 1;
        let (tick, old_head) = (self.tick, self.head);
        let Some(n) = self.nodes.get_mut(&id) else { return };
        n.in_lru = true;
        n.prev = NIL;
        n.next = old_head;
        n.stamp = tick;
        match self.nodes.get_mut(&old_head) {
            Some(h) => h.prev = id,
            None => self.tail = id,
        }
        self.head = id;
        self.lru_len += 1;
    }

    /// Marks `id` recently used. Nodes already in the newer half of the list
    /// stay put, so a hot node costs no list surgery.
    fn touch(&mut self, id: u64, bound: usize) {
        let Some(n) = self.nodes.get(&id) else { return };
        if !n.in_lru || self.tick.saturating_sub(n.stamp) < (bound as u64 / 2).max(1) {
            return;
        }
        self.unlink_lru(id);
        self.push_head(id);
    }

    fn lru_eligible(&self, n: &Node, id: u64) -> bool {
        id != ROOT_ID
            && !n.keep
            && n.fd.is_some()
            && n.handle.as_ref().is_some_and(|h| self.mounts.contains_key(&h.mount_id))
    }

    /// Files a node whose descriptor was just set or unpinned: into the LRU if
    /// it can be reopened, else counted as pinned. Returns the descriptor the
    /// LRU evicted to stay within `bound`, to be dropped outside the lock.
    fn place(&mut self, id: u64, bound: usize) -> Vec<Arc<OwnedFd>> {
        let Some(n) = self.nodes.get(&id) else { return Vec::new() };
        if n.fd.is_none() || n.in_lru {
            return Vec::new();
        }
        if self.lru_eligible(n, id) {
            self.push_head(id);
            self.shrink(bound)
        } else {
            self.pinned += 1;
            Vec::new()
        }
    }

    /// The LRU's share of `bound`: nodes pinned because they were removed
    /// while open take their descriptors from the same budget, so the two
    /// together stay within it (down to a floor the LRU needs to work).
    fn lru_limit(&self, bound: usize) -> usize {
        bound.saturating_sub(self.kept).max(bound.min(LRU_FLOOR))
    }

    /// Evicts down to the LRU's share of `bound`; the descriptors evicted, to
    /// be dropped outside the lock.
    fn shrink(&mut self, bound: usize) -> Vec<Arc<OwnedFd>> {
        let mut evicted = Vec::new();
        while self.lru_len > self.lru_limit(bound) {
            match self.evict_tail() {
                Some(fd) => evicted.push(fd),
                None => break,
            }
        }
        evicted
    }

    /// Takes a node's descriptor out of whichever set holds it.
    fn take_fd(&mut self, id: u64) -> Option<Arc<OwnedFd>> {
        let in_lru = self.nodes.get(&id).is_some_and(|n| n.in_lru);
        if in_lru {
            self.unlink_lru(id);
        }
        let n = self.nodes.get_mut(&id)?;
        let fd = n.fd.take();
        if fd.is_some() && !in_lru {
            self.pinned -= 1;
        }
        fd
    }

    fn evict_tail(&mut self) -> Option<Arc<OwnedFd>> {
        let victim = self.tail;
        if victim == NIL {
            return None;
        }
        self.unlink_lru(victim);
        self.nodes.get_mut(&victim).and_then(|n| n.fd.take())
    }
}

/// Whether open_by_handle_at reaches an inode that has no name while
/// something holds it (ext4, xfs, btrfs and tmpfs do): tried on an
/// `O_TMPFILE` file in the root directory, which leaves nothing behind. No
/// when anything fails (a read-only backing directory, say).
fn handles_reach_unlinked(root: &OwnedFd, mount_fd: &OwnedFd) -> bool {
    let Ok(tmp) = sys::openat(root.as_fd(), c".", libc::O_TMPFILE | libc::O_RDWR, 0o600) else { return false };
    let Ok(handle) = sys::name_to_handle(tmp.as_fd()) else { return false };
    let Ok(again) = sys::open_by_handle(mount_fd.as_fd(), &handle, libc::O_PATH) else { return false };
    let same = |fd: &OwnedFd| sys::statx(fd.as_fd()).map(|st| sys::statx_key(&st));
    matches!((same(&tmp), same(&again)), (Ok(a), Ok(b)) if a == b)
}

impl InodeTable {
    /// A table holding the root. `mount_fd` is a descriptor (not `O_PATH`) on
    /// the root's mount, for open_by_handle_at.
    pub(super) fn new(
        root_fd: OwnedFd,
        root: &libc::statx,
        mount_fd: OwnedFd,
        bound: usize,
        handles: bool,
    ) -> InodeTable {
        let key = sys::statx_key(root);
        let handle = if handles { sys::name_to_handle(root_fd.as_fd()).ok() } else { None };
        let reach_unlinked =
            handle.as_ref().filter(|_| handles_reach_unlinked(&root_fd, &mount_fd)).map(|h| h.mount_id);
        let mut mounts = HashMap::new();
        if let Some(h) = &handle {
            mounts.insert(h.mount_id, Arc::new(mount_fd));
        }
        let root_node = Node {
            key,
            nlookup: 1,
            nopen: 0,
            keep: false,
            handle,
            fd: Some(Arc::new(root_fd)),
            in_lru: false,
            prev: NIL,
            next: NIL,
            stamp: 0,
            io: None,
            detached: false,
            verified: 0,
        };
        let mut table = Table {
            nodes: HashMap::new(),
            by_key: HashMap::new(),
            mounts,
            next_id: ROOT_ID + 1,
            head: NIL,
            tail: NIL,
            lru_len: 0,
            pinned: 1,
            open_nodes: 0,
            kept: 0,
            tick: 0,
            by_handle: None,
        };
        table.nodes.insert(ROOT_ID, root_node);
        table.by_key.insert(key, ROOT_ID);
        InodeTable {
            table: Mutex::new(table),
            bound: bound.max(1),
            handles,
            warned_pinned: std::sync::atomic::AtomicBool::new(false),
            moves: std::sync::atomic::AtomicU64::new(1),
            served_stateless: std::sync::atomic::AtomicBool::new(false),
            reach_unlinked,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // Nothing panics while the table is borrowed; a poisoned lock still
        // guards consistent data.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[cfg(test)]
    pub(super) fn counts(&self) -> TableCounts {
        let t = self.lock();
        TableCounts { nodes: t.nodes.len(), cached: t.lru_len, pinned: t.pinned }
    }

    /// The `O_PATH` descriptor of a node, reopened from its handle if
    /// evicted; ENOENT for a directory found outside the backing tree.
    pub(super) fn fd(&self, id: u64) -> Result<Arc<OwnedFd>, Errno> {
        let (handle, mount) = {
            let mut t = self.lock();
            let n = t.nodes.get(&id).ok_or(Errno::ESTALE)?;
            if n.detached {
                return Err(Errno::ENOENT);
            }
            if let Some(fd) = &n.fd {
                let fd = fd.clone();
                t.touch(id, self.bound);
                return Ok(fd);
            }
            let handle = n.handle.clone().ok_or(Errno::ESTALE)?;
            let mount = t.mounts.get(&handle.mount_id).cloned().ok_or(Errno::ESTALE)?;
            (handle, mount)
        };
        // An unlinked inode cannot be opened by handle: ESTALE, which is the truth.
        let fresh = Arc::new(sys::open_by_handle(mount.as_fd(), &handle, libc::O_PATH)?);
        let mut t = self.lock();
        let Some(n) = t.nodes.get_mut(&id) else {
            // Forgotten meanwhile; the caller may still finish with it.
            return Ok(fresh);
        };
        if let Some(fd) = &n.fd {
            return Ok(fd.clone());
        }
        n.fd = Some(fresh.clone());
        let evicted = t.place(id, self.bound);
        drop(t);
        drop(evicted);
        Ok(fresh)
    }

    /// A directory moved behind the mount: every directory node is checked
    /// again ([`Self::still_inside`]) before names are resolved in it.
    pub(super) fn dir_moved(&self) {
        self.moves.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Whether directory node `id` (descriptor `fd`) is still inside the
    /// backing tree. Checked when a directory move was seen since the last
    /// check, or every time when `always` (no watcher tells of moves); a
    /// directory found outside is detached for good: every later use of the
    /// node answers ENOENT.
    pub(super) fn still_inside(&self, id: u64, fd: &OwnedFd, always: bool) -> bool {
        if id == ROOT_ID {
            return true;
        }
        let moves = self.moves.load(std::sync::atomic::Ordering::Acquire);
        if !always && self.lock().nodes.get(&id).is_some_and(|n| n.verified == moves) {
            return true;
        }
        let root = match self.fd(ROOT_ID) {
            Ok(r) => r,
            Err(_) => return false,
        };
        let inside = sys::is_beneath(fd.as_fd(), root.as_fd());
        let mut t = self.lock();
        if let Some(n) = t.nodes.get_mut(&id) {
            if inside {
                n.verified = moves;
            } else {
                n.detached = true;
            }
        }
        let dropped = if inside { None } else { t.take_fd(id) };
        drop(t);
        drop(dropped);
        inside
    }

    /// Adds one lookup to a known node (the "." lookup).
    pub(super) fn add_lookup(&self, id: u64) -> Result<(), Errno> {
        let mut t = self.lock();
        let n = t.nodes.get_mut(&id).ok_or(Errno::ESTALE)?;
        n.nlookup += 1;
        Ok(())
    }

    /// Whether a node stands for the backing inode `key`.
    pub(super) fn knows(&self, key: InodeKey) -> bool {
        self.lock().by_key.contains_key(&key)
    }

    /// Records one lookup of the inode `fd` (an `O_PATH` descriptor) with
    /// attributes `st`; returns its node id. Reuses the node of a known
    /// inode, unless the backing inode number was recycled for a new file
    /// (told apart by the file handle, which carries the generation).
    pub(super) fn remember(&self, fd: OwnedFd, st: &libc::statx) -> Result<u64, Errno> {
        let key = sys::statx_key(st);
        // Fast path: a known node with a live descriptor. That descriptor pins
        // the backing inode, so its number cannot have been reused.
        {
            let mut t = self.lock();
            if let Some(&id) = t.by_key.get(&key) {
                if let Some(n) = t.nodes.get_mut(&id) {
                    if n.fd.is_some() {
                        n.nlookup += 1;
                        n.readmit();
                        t.touch(id, self.bound);
                        return Ok(id);
                    }
                }
            }
        }
        let handle = if self.handles { self.handle_for(&fd, st) } else { None };
        let fd = Arc::new(fd);
        let mut t = self.lock();
        let known = t.by_key.get(&key).copied();
        if let Some(id) = known {
            if let Some(n) = t.nodes.get_mut(&id) {
                if n.fd.is_some() {
                    n.nlookup += 1;
                    n.readmit();
                    t.touch(id, self.bound);
                    return Ok(id);
                }
                if n.handle.is_none() || n.handle == handle {
                    n.nlookup += 1;
                    n.fd = Some(fd);
                    n.readmit();
                    let evicted = t.place(id, self.bound);
                    drop(t);
                    drop(evicted);
                    return Ok(id);
                }
                // Same number, different file: the old node lives on under
                // its id until forgotten, but the key now names the new one.
            }
        }
        let id = t.next_id;
        t.next_id += 1;
        let pinned_without_handle = handle.is_none();
        if let (Some(map), Some(h)) = (t.by_handle.as_mut(), handle.as_ref()) {
            map.insert(h.key(), id);
        }
        t.nodes.insert(
            id,
            Node {
                key,
                nlookup: 1,
                nopen: 0,
                keep: false,
                handle,
                fd: Some(fd),
                in_lru: false,
                prev: NIL,
                next: NIL,
                stamp: 0,
                io: None,
                detached: false,
                // Found by name below a directory inside the tree: no move
                // seen so far needs checking.
                verified: self.moves.load(std::sync::atomic::Ordering::Acquire),
            },
        );
        t.by_key.insert(key, id);
        let evicted = t.place(id, self.bound);
        let pinned = t.pinned;
        drop(t);
        drop(evicted);
        if pinned_without_handle
            && self.handles
            && pinned > self.bound
            && !self.warned_pinned.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(pinned, "stackfs: many inodes have no file handle and keep a descriptor each");
        }
        Ok(id)
    }

    /// The handle of a new inode, and a mount descriptor for its mount if it
    /// is the first inode seen there; None keeps the descriptor pinned.
    fn handle_for(&self, fd: &OwnedFd, st: &libc::statx) -> Option<FileHandle> {
        let handle = sys::name_to_handle(fd.as_fd()).ok()?;
        if self.lock().mounts.contains_key(&handle.mount_id) {
            return Some(handle);
        }
        // First inode of another mount under the backing tree (crossed on a
        // mount point, a directory): keep a descriptor of it for open_by_handle_at.
        if st.stx_mode as u32 & libc::S_IFMT != libc::S_IFDIR {
            return None;
        }
        let mount_fd = sys::reopen(fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY).ok()?;
        self.lock().mounts.entry(handle.mount_id).or_insert_with(|| Arc::new(mount_fd));
        Some(handle)
    }

    /// The kernel dropped `n` lookups of `id`; at zero the node goes away.
    #[cfg(test)]
    pub(super) fn forget(&self, id: u64, n: u64) {
        self.forget_many(&[(id, n)], |_| {})
    }

    /// Several forgets under one lock (BATCH_FORGET); `gone` hears of each
    /// node removed, after the lock is released, as are descriptors closed.
    pub(super) fn forget_many(&self, forgets: &[(u64, u64)], mut gone: impl FnMut(u64)) {
        type Closing = (u64, Option<Arc<OwnedFd>>, Option<Arc<NodeIo>>);
        let mut closing: [Closing; 64] = [const { (0, None, None) }; 64];
        for chunk in forgets.chunks(closing.len()) {
            let mut t = self.lock();
            for (slot, &(id, n)) in closing.iter_mut().zip(chunk) {
                let Some(node) = t.nodes.get_mut(&id) else { continue };
                node.nlookup = node.nlookup.saturating_sub(n);
                if node.nlookup > 0 || id == ROOT_ID {
                    continue;
                }
                let key = node.key;
                let io = node.io.take();
                let (open, kept) = (node.nopen > 0, node.keep);
                // The kernel forgets no inode with open files; if it did,
                // the counts must still add up.
                if open {
                    t.open_nodes -= 1;
                }
                if kept {
                    t.kept -= 1;
                }
                let fd = t.take_fd(id);
                *slot = (id, fd, io);
                if let Some(node) = t.nodes.remove(&id) {
                    if let (Some(map), Some(h)) = (t.by_handle.as_mut(), node.handle.as_ref()) {
                        let k = h.key();
                        if map.get(&k) == Some(&id) {
                            map.remove(&k);
                        }
                    }
                }
                if t.by_key.get(&key) == Some(&id) {
                    t.by_key.remove(&key);
                }
            }
            drop(t);
            for slot in closing.iter_mut() {
                let (id, fd, io) = std::mem::take(slot);
                drop(fd);
                drop(io);
                if id != 0 {
                    gone(id);
                }
            }
        }
    }

    /// Starts answering [`node_by_handle`](Self::node_by_handle); false when
    /// nodes have no file handles here.
    pub(super) fn track_handles(&self) -> bool {
        if !self.handles {
            return false;
        }
        let mut t = self.lock();
        let map: HashMap<Box<[u8]>, u64> =
            t.nodes.iter().filter_map(|(&id, n)| n.handle.as_ref().map(|h| (h.key(), id))).collect();
        t.by_handle = Some(map);
        true
    }

    /// The node of the inode with handle key `key` ([`sys::handle_key`]).
    pub(super) fn node_by_handle(&self, key: &[u8]) -> Option<u64> {
        self.lock().by_handle.as_ref()?.get(key).copied()
    }

    /// The node standing for the backing inode `key`.
    pub(super) fn node_by_key(&self, key: InodeKey) -> Option<u64> {
        self.lock().by_key.get(&key).copied()
    }

    /// Every node id, for invalidating everything after lost events.
    pub(super) fn all_ids(&self) -> Vec<u64> {
        self.lock().nodes.keys().copied().collect()
    }

    /// The I/O state of node `id`, made on first use.
    pub(super) fn io(&self, id: u64) -> Result<Arc<NodeIo>, Errno> {
        let mut t = self.lock();
        let n = t.nodes.get_mut(&id).ok_or(Errno::ESTALE)?;
        Ok(n.io.get_or_insert_with(|| Arc::new(NodeIo::default())).clone())
    }

    /// A file or directory was opened on `id`.
    pub(super) fn opened(&self, id: u64) {
        let mut t = self.lock();
        let Some(n) = t.nodes.get_mut(&id) else { return };
        n.nopen += 1;
        if n.nopen == 1 {
            t.open_nodes += 1;
        }
    }

    /// The open `opened` counted was released; the last one unpins a node
    /// that was unlinked while open.
    pub(super) fn closed(&self, id: u64) {
        let mut t = self.lock();
        let Some(n) = t.nodes.get_mut(&id) else { return };
        if n.nopen == 0 {
            return;
        }
        n.nopen -= 1;
        if n.nopen > 0 {
            return;
        }
        let was_kept = std::mem::take(&mut n.keep);
        t.open_nodes -= 1;
        if !was_kept {
            return;
        }
        t.kept -= 1;
        let eligible = t.nodes.get(&id).is_some_and(|n| !n.in_lru && t.lru_eligible(n, id));
        if !eligible {
            return;
        }
        t.pinned -= 1;
        let evicted = t.place(id, self.bound);
        drop(t);
        drop(evicted);
    }

    /// The inode `fd` (an `O_PATH` descriptor opened before, with attributes
    /// `st`) just lost a name through the mount (unlink, rename over it), or
    /// was opened without one (O_TMPFILE). If it is a node with open files,
    /// or whose `fh` 0 was served (stateless opens: the kernel may hold it
    /// open unseen), keep its descriptor until its last open is released (or
    /// the node is forgotten): the descriptor is what keeps a nameless
    /// inode's data alive, and a way back to it. `fd` becomes the node's
    /// descriptor if it had none.
    ///
    /// Not needed when every open of it is a passthrough open and this file
    /// system reopens a nameless inode by handle while something holds it
    /// ([`InodeTable::new`] probes that): the kernel's backing file holds it.
    /// Returns whether the node was pinned.
    pub(super) fn pin_if_open(&self, fd: OwnedFd, st: &libc::statx) -> bool {
        let key = sys::statx_key(st);
        let (id, io, probed) = {
            let t = self.lock();
            let Some(&id) = t.by_key.get(&key) else { return false };
            let Some(n) = t.nodes.get(&id) else { return false };
            if id == ROOT_ID || (n.nopen == 0 && n.io.is_none()) {
                return false;
            }
            let probed = n.handle.as_ref().is_some_and(|h| Some(h.mount_id) == self.reach_unlinked);
            (id, n.io.clone(), probed)
        };
        // The I/O state is asked outside the table's lock (it is taken the
        // other way round elsewhere).
        let stateless = io.as_ref().is_some_and(|io| io.served_stateless());
        let kernel_held = probed && io.as_ref().is_some_and(|io| io.passthrough_live());
        let mut t = self.lock();
        let Some(n) = t.nodes.get(&id) else { return false };
        // Stateless I/O needs a descriptor of the daemon's; opens that are
        // all passthrough need none (the kernel holds the backing file).
        if !stateless && (n.nopen == 0 || kernel_held) {
            return false;
        }
        if n.keep {
            return true;
        }
        // A node with a descriptor holds its inode, so its number cannot
        // have been recycled; without one, the handle tells whether `fd` is
        // the same inode (only then may it stand in for the node's).
        if n.fd.is_none() {
            if let (Some(h), Ok(other)) = (&n.handle, sys::name_to_handle(fd.as_fd())) {
                if &other != h {
                    return false;
                }
            }
        }
        let in_lru = n.in_lru;
        let had_fd = n.fd.is_some();
        if in_lru {
            t.unlink_lru(id);
        }
        let Some(n) = t.nodes.get_mut(&id) else { return false };
        n.keep = true;
        if !had_fd {
            n.fd = Some(Arc::new(fd));
        }
        if in_lru || !had_fd {
            t.pinned += 1;
        }
        t.kept += 1;
        // Kept nodes share the LRU's budget.
        let evicted = t.shrink(self.bound);
        drop(t);
        drop(evicted);
        true
    }

    /// Whether an unlink must look for a node to pin ([`pin_if_open`](Self::pin_if_open)).
    pub(super) fn may_need_pin(&self) -> bool {
        self.served_stateless.load(std::sync::atomic::Ordering::Relaxed) || self.lock().open_nodes > 0
    }

    /// `fh` 0 was served (stateless opens): from now on every unlink looks
    /// for a node to pin, as the kernel's opens are not seen.
    pub(super) fn note_stateless(&self) {
        if !self.served_stateless.load(std::sync::atomic::Ordering::Relaxed) {
            self.served_stateless.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Nodes known now (those the kernel holds lookups on, and the root),
    /// and the `O_PATH` descriptors held for them (cached and pinned).
    pub(super) fn usage(&self) -> (usize, usize) {
        let t = self.lock();
        (t.nodes.len(), t.lru_len + t.pinned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    fn open_dir(path: &std::path::Path) -> (OwnedFd, OwnedFd, libc::statx) {
        let p = CString::new(path.as_os_str().as_bytes()).unwrap();
        let cwd = unsafe { std::os::fd::BorrowedFd::borrow_raw(libc::AT_FDCWD) };
        let root = sys::openat(cwd, &p, libc::O_PATH | libc::O_DIRECTORY, 0).unwrap();
        let mount = sys::openat(cwd, &p, libc::O_RDONLY | libc::O_DIRECTORY, 0).unwrap();
        let st = sys::statx(root.as_fd()).unwrap();
        (root, mount, st)
    }

    fn tempdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("stackfs-inodes-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn lookup(t: &InodeTable, parent: u64, name: &str) -> u64 {
        let dir = t.fd(parent).unwrap();
        let name = CString::new(name).unwrap();
        let fd = sys::open_path_at(dir.as_fd(), &name).unwrap();
        let st = sys::statx(fd.as_fd()).unwrap();
        t.remember(fd, &st).unwrap()
    }

    fn handles_work() -> bool {
        sys::geteuid() == 0
    }

    #[test]
    fn bounded_descriptors_over_many_files() {
        let d = tempdir("bounded");
        for i in 0..500 {
            std::fs::write(d.join(format!("f{i}")), format!("{i}")).unwrap();
        }
        let (root, mount, st) = open_dir(&d);
        let t = InodeTable::new(root, &st, mount, 16, handles_work());
        let mut ids = Vec::new();
        for i in 0..500 {
            ids.push(lookup(&t, ROOT_ID, &format!("f{i}")));
        }
        let c = t.counts();
        assert_eq!(c.nodes, 501);
        if handles_work() {
            assert!(c.cached <= 16, "{c:?}");
            assert_eq!(c.pinned, 1, "{c:?}");
            // Every node can still be reached: evicted ones are reopened.
            for (i, &id) in ids.iter().enumerate() {
                let fd = t.fd(id).unwrap();
                let f = sys::reopen(fd.as_fd(), libc::O_RDONLY).unwrap();
                let mut buf = [0u8; 8];
                let n = sys::pread(f.as_fd(), &mut buf, 0).unwrap();
                assert_eq!(&buf[..n], i.to_string().as_bytes());
            }
            assert!(t.counts().cached <= 16);
        }
        // Looking a name up again finds the same node; hard links too.
        std::fs::hard_link(d.join("f7"), d.join("link7")).unwrap();
        assert_eq!(lookup(&t, ROOT_ID, "f7"), ids[7]);
        assert_eq!(lookup(&t, ROOT_ID, "link7"), ids[7]);
        // Forget drops the node at zero, and only then.
        t.forget(ids[7], 2);
        assert!(t.fd(ids[7]).is_ok());
        t.forget(ids[7], 1);
        assert_eq!(t.fd(ids[7]).err(), Some(Errno::ESTALE));
        for &id in &ids {
            t.forget(id, 1);
        }
        let c = t.counts();
        assert_eq!((c.nodes, c.cached, c.pinned), (1, 0, 1));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn recycled_inode_numbers_get_new_nodes() {
        if !handles_work() {
            return;
        }
        let d = tempdir("recycle");
        std::fs::write(d.join("a"), b"old").unwrap();
        let (root, mount, st) = open_dir(&d);
        let t = InodeTable::new(root, &st, mount, 1, true);
        let a = lookup(&t, ROOT_ID, "a");
        // Push "a" out of the one-slot LRU, then replace the file.
        std::fs::write(d.join("b"), b"b").unwrap();
        let _b = lookup(&t, ROOT_ID, "b");
        std::fs::remove_file(d.join("a")).unwrap();
        assert_eq!(t.fd(a).err(), Some(Errno::ESTALE));
        std::fs::write(d.join("a"), b"new").unwrap();
        let a2 = lookup(&t, ROOT_ID, "a");
        assert_ne!(a, a2);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn open_files_pin_their_node_only_once_unlinked() {
        if !handles_work() {
            return;
        }
        let d = tempdir("pin");
        std::fs::write(d.join("a"), b"data").unwrap();
        std::fs::write(d.join("b"), b"b").unwrap();
        std::fs::write(d.join("c"), b"c").unwrap();
        let (root, mount, st) = open_dir(&d);
        let t = InodeTable::new(root, &st, mount, 1, true);
        let a = lookup(&t, ROOT_ID, "a");
        assert!(!t.may_need_pin());
        t.opened(a);
        assert!(t.may_need_pin());
        // Open but linked: evictable like any node, reopened by handle.
        let _b = lookup(&t, ROOT_ID, "b");
        assert_eq!(t.counts().pinned, 1, "only the root");
        assert!(t.fd(a).is_ok());
        // Unlinked through the mount while open (its descriptor opened
        // before): pinned, then reachable (and alive) through the pinned
        // descriptor, whatever the LRU does.
        let name = CString::new("a").unwrap();
        let victim = sys::open_path_at(t.fd(ROOT_ID).unwrap().as_fd(), &name).unwrap();
        let vst = sys::statx(victim.as_fd()).unwrap();
        std::fs::remove_file(d.join("a")).unwrap();
        assert!(t.pin_if_open(victim, &vst));
        let _c = lookup(&t, ROOT_ID, "c");
        assert_eq!(t.counts().pinned, 2);
        let fd = t.fd(a).unwrap();
        let f = sys::reopen(fd.as_fd(), libc::O_RDONLY).unwrap();
        let mut buf = [0u8; 8];
        let n = sys::pread(f.as_fd(), &mut buf, 0).unwrap();
        assert_eq!(&buf[..n], b"data");
        // A node without open files is not pinned by an unlink.
        let b2 = lookup(&t, ROOT_ID, "b");
        let name = CString::new("b").unwrap();
        let victim = sys::open_path_at(t.fd(ROOT_ID).unwrap().as_fd(), &name).unwrap();
        let vst = sys::statx(victim.as_fd()).unwrap();
        assert!(!t.pin_if_open(victim, &vst));
        t.forget(b2, 2);
        // The last close unpins.
        t.closed(a);
        assert_eq!(t.counts().pinned, 1);
        assert!(t.counts().cached <= 1);
        assert!(!t.may_need_pin());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn kept_nodes_share_the_lru_budget() {
        if !handles_work() {
            return;
        }
        let d = tempdir("keptbudget");
        for i in 0..60 {
            std::fs::write(d.join(format!("f{i}")), b"x").unwrap();
        }
        let (root, mount, st) = open_dir(&d);
        let t = InodeTable::new(root, &st, mount, 32, true);
        assert!(t.reach_unlinked.is_some(), "ext4 and tmpfs reopen a held nameless inode by handle");
        let ids: Vec<u64> = (0..60).map(|i| lookup(&t, ROOT_ID, &format!("f{i}"))).collect();
        assert_eq!(t.counts().cached, 32);
        // 20 open files removed through the mount: kept, and the LRU shrinks
        // so that both stay within the bound (down to its floor).
        for (i, &id) in ids.iter().enumerate().take(20) {
            t.opened(id);
            let name = CString::new(format!("f{i}")).unwrap();
            let victim = sys::open_path_at(t.fd(ROOT_ID).unwrap().as_fd(), &name).unwrap();
            let vst = sys::statx(victim.as_fd()).unwrap();
            std::fs::remove_file(d.join(format!("f{i}"))).unwrap();
            assert!(t.pin_if_open(victim, &vst));
        }
        let c = t.counts();
        assert_eq!(c.pinned, 21);
        assert_eq!(c.cached, LRU_FLOOR, "{c:?}");
        for &id in &ids[20..] {
            assert!(t.fd(id).is_ok());
            assert!(t.counts().cached <= LRU_FLOOR);
        }
        // Released: the budget is the LRU's again.
        for &id in &ids[..20] {
            t.closed(id);
        }
        assert_eq!(t.counts().pinned, 1);
        for &id in &ids[20..] {
            assert!(t.fd(id).is_ok());
        }
        assert_eq!(t.counts().cached, 32);
        std::fs::remove_dir_all(&d).unwrap();
    }
}

//! Open files and directories: the `fh` the kernel hands back on every
//! READ, WRITE, READDIR, ... names one of these, and the bounded cache of
//! descriptors that serves them.
//!
//! An open does not own a descriptor. The descriptors of open files and
//! directories (and the per-inode ones serving `fh` 0) live in one
//! [`FdCache`] of at most `bound` entries, least recently used first out; an
//! evicted one is opened again from the inode's `O_PATH` descriptor when a
//! request needs it, with the open's own flags ([`reopen_flags`]). So the
//! daemon's descriptors are bounded per file system, whatever number of
//! files its clients hold open: one process holding thousands of files
//! cannot make another process's `mkdir` fail with EMFILE.
//!
//! A descriptor opened with O_DIRECT serves only direct requests, and one
//! opened without it only buffered ones: each has its own key
//! ([`FdKey::HandleDirect`], [`FdKey::StatelessDirect`]), since a READ or
//! WRITE asks for direct I/O by its own flags (an open with O_DIRECT, or
//! one that `fcntl(F_SETFL)` changed since).

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use efuse::Errno;

use super::fileio::{NodeIo, OpenPath};
use super::sys;

/// An open regular file (or anything else opened for I/O). Its descriptor
/// lives in the [`FdCache`] under [`FdKey::Handle`]; a passthrough open
/// starts without one (the kernel holds the backing file itself).
pub(super) struct OpenFile {
    /// The node opened, whose `O_PATH` descriptor a reopen starts from.
    pub(super) ino: u64,
    /// What a reopen passes to open(2) ([`reopen_flags`] of the open's flags).
    pub(super) flags: i32,
    /// The open asked for O_DIRECT: its descriptor was opened with it.
    pub(super) direct: bool,
    /// The inode's I/O state (regular files), and the path this open was given.
    pub(super) io: Option<(Arc<NodeIo>, OpenPath)>,
    released: AtomicBool,
}

impl OpenFile {
    pub(super) fn new(ino: u64, open_flags: i32, io: Option<(Arc<NodeIo>, OpenPath)>) -> OpenFile {
        let direct = open_flags & libc::O_DIRECT != 0;
        OpenFile { ino, flags: reopen_flags(open_flags), direct, io, released: AtomicBool::new(false) }
    }

    /// The cache key of this open's descriptor for direct (O_DIRECT) or
    /// buffered requests.
    pub(super) fn key(fh: u64, direct: bool) -> FdKey {
        if direct {
            FdKey::HandleDirect(fh)
        } else {
            FdKey::Handle(fh)
        }
    }

    /// RELEASE came: no descriptor may be cached for it any more.
    pub(super) fn release(&self) {
        self.released.store(true, Ordering::Release)
    }

    pub(super) fn is_live(&self) -> bool {
        !self.released.load(Ordering::Acquire)
    }
}

/// An open directory and its position in the listing; its descriptor lives
/// in the [`FdCache`] like an open file's.
pub(super) struct OpenDir {
    pub(super) ino: u64,
    pub(super) stream: Mutex<DirStream>,
    released: AtomicBool,
}

impl OpenDir {
    pub(super) fn new(ino: u64) -> OpenDir {
        OpenDir { ino, stream: Mutex::new(DirStream::default()), released: AtomicBool::new(false) }
    }

    pub(super) fn release(&self) {
        self.released.store(true, Ordering::Release)
    }

    pub(super) fn is_live(&self) -> bool {
        !self.released.load(Ordering::Acquire)
    }
}

/// The flags an evicted open is reopened with: what the caller's open asked
/// of every later read and write (access mode, O_APPEND, O_SYNC/O_DSYNC,
/// O_NOATIME, O_NONBLOCK), never what only the first open(2) may do
/// (O_CREAT, O_EXCL, O_TRUNC, O_TMPFILE). O_DIRECT is not kept either: it
/// is a property of the descriptor's key, added by who reopens for a
/// direct request.
pub(super) fn reopen_flags(open_flags: i32) -> i32 {
    const KEPT: i32 = libc::O_ACCMODE
        | libc::O_APPEND
        | libc::O_SYNC
        | libc::O_DSYNC
        | libc::O_NOATIME
        | libc::O_NONBLOCK
        | libc::O_LARGEFILE;
    open_flags & KEPT
}

/// Which descriptor a cache slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum FdKey {
    /// An open file or directory, by `fh` (one counter for both).
    Handle(u64),
    /// An open file's descriptor with O_DIRECT, for direct requests.
    HandleDirect(u64),
    /// The descriptor serving `fh` 0 of a node (stateless opens of a file or
    /// a directory), by node id.
    Stateless(u64),
    /// The same with O_DIRECT, for direct requests on `fh` 0.
    StatelessDirect(u64),
}

impl FdKey {
    /// The key of the same open or node with O_DIRECT the other way round.
    fn twin(self) -> FdKey {
        match self {
            FdKey::Handle(fh) => FdKey::HandleDirect(fh),
            FdKey::HandleDirect(fh) => FdKey::Handle(fh),
            FdKey::Stateless(ino) => FdKey::StatelessDirect(ino),
            FdKey::StatelessDirect(ino) => FdKey::Stateless(ino),
        }
    }
}

/// A descriptor out of the cache. `serial` tells descriptors of the same key
/// apart: a directory stream positioned on one must seek again on another.
#[derive(Clone)]
pub(super) struct CachedFd {
    pub(super) fd: Arc<OwnedFd>,
    pub(super) serial: u64,
}

struct Slot {
    fd: Arc<OwnedFd>,
    serial: u64,
    /// Key of this slot in `CacheState::order`.
    stamp: u64,
}

#[derive(Default)]
struct CacheState {
    slots: HashMap<FdKey, Slot>,
    /// Slots by last use, oldest first.
    order: BTreeMap<u64, FdKey>,
    tick: u64,
    serial: u64,
    /// Descriptors opened again after eviction, for tests and logs.
    reopened: u64,
}

impl CacheState {
    fn stamp(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Marks `key` used. Slots in the newer half of the order stay put, so
    /// a hot descriptor costs no reordering.
    fn touch(&mut self, key: FdKey, bound: usize) -> Option<CachedFd> {
        let tick = self.tick;
        let slot = self.slots.get(&key)?;
        let found = CachedFd { fd: slot.fd.clone(), serial: slot.serial };
        if tick.saturating_sub(slot.stamp) >= (bound as u64 / 2).max(1) {
            let old = slot.stamp;
            let new = self.stamp();
            self.order.remove(&old);
            self.order.insert(new, key);
            if let Some(slot) = self.slots.get_mut(&key) {
                slot.stamp = new;
            }
        }
        Some(found)
    }

    /// Files `fd` under `key` (replacing nothing: the caller checked), and
    /// returns the descriptors evicted to stay within `bound`.
    fn insert(&mut self, key: FdKey, fd: Arc<OwnedFd>, bound: usize, evicted: &mut Vec<Arc<OwnedFd>>) -> CachedFd {
        self.serial += 1;
        let serial = self.serial;
        let stamp = self.stamp();
        self.order.insert(stamp, key);
        self.slots.insert(key, Slot { fd: fd.clone(), serial, stamp });
        while self.slots.len() > bound {
            let Some((_, victim)) = self.order.pop_first() else { break };
            if let Some(slot) = self.slots.remove(&victim) {
                evicted.push(slot.fd);
            }
        }
        CachedFd { fd, serial }
    }

    fn remove(&mut self, key: FdKey) -> Option<Arc<OwnedFd>> {
        let slot = self.slots.remove(&key)?;
        self.order.remove(&slot.stamp);
        Some(slot.fd)
    }

    /// Evicts the older half, to make room after EMFILE.
    fn shed(&mut self, evicted: &mut Vec<Arc<OwnedFd>>) {
        let n = self.slots.len().div_ceil(2);
        for _ in 0..n {
            let Some((_, victim)) = self.order.pop_first() else { break };
            if let Some(slot) = self.slots.remove(&victim) {
                evicted.push(slot.fd);
            }
        }
    }
}

/// A bounded LRU of open descriptors; see the module documentation.
///
/// Descriptors are handed out as `Arc<OwnedFd>`: eviction drops the cache's
/// reference, and the descriptor closes when the last request using it ends
/// (always outside the cache's lock: close(2) can be slow, e.g. a network
/// file system flushing).
pub(super) struct FdCache {
    state: Mutex<CacheState>,
    bound: usize,
}

impl FdCache {
    pub(super) fn new(bound: usize) -> FdCache {
        FdCache { state: Mutex::default(), bound: bound.max(1) }
    }

    fn lock(&self) -> MutexGuard<'_, CacheState> {
        // Nothing panics while the state is borrowed; a poisoned lock still
        // guards consistent data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached descriptor of `key`, if it is still cached.
    pub(super) fn get(&self, key: FdKey) -> Option<CachedFd> {
        self.lock().touch(key, self.bound)
    }

    /// Caches a descriptor just opened (OPEN, OPENDIR), evicting the least
    /// recently used beyond the bound.
    pub(super) fn insert(&self, key: FdKey, fd: OwnedFd) -> CachedFd {
        let mut evicted = Vec::new();
        let (old, cached) = {
            let mut s = self.lock();
            let old = s.remove(key);
            (old, s.insert(key, Arc::new(fd), self.bound, &mut evicted))
        };
        drop(old);
        drop(evicted);
        cached
    }

    /// Runs `open`; if it fails for want of descriptors (EMFILE, ENFILE),
    /// sheds the older half of the cache and runs it once more.
    pub(super) fn open_with_room(&self, mut open: impl FnMut() -> Result<OwnedFd, Errno>) -> Result<OwnedFd, Errno> {
        match open() {
            Err(e) if e == Errno::EMFILE || e.raw() == libc::ENFILE => {
                let mut shed = Vec::new();
                self.lock().shed(&mut shed);
                tracing::debug!(shed = shed.len(), "stackfs: out of descriptors; shed half of the open-file cache");
                drop(shed);
                open()
            }
            other => other,
        }
    }

    /// The descriptor of `key`, opened with `open` ([`open_with_room`]) when
    /// it is not cached. It is cached only while `live()` holds (checked
    /// under the cache's lock, so a descriptor opened for a handle being
    /// released is used once and closed, never left behind).
    ///
    /// [`open_with_room`]: Self::open_with_room
    pub(super) fn get_or_open(
        &self,
        key: FdKey,
        open: impl FnMut() -> Result<OwnedFd, Errno>,
        live: impl Fn() -> bool,
    ) -> Result<CachedFd, Errno> {
        if let Some(found) = self.get(key) {
            return Ok(found);
        }
        let fd = self.open_with_room(open)?;
        let mut evicted = Vec::new();
        let cached = {
            let mut s = self.lock();
            s.reopened += 1;
            if let Some(raced) = s.touch(key, self.bound) {
                // Another request reopened it meanwhile: share that one.
                raced
            } else if live() {
                s.insert(key, Arc::new(fd), self.bound, &mut evicted)
            } else {
                s.serial += 1;
                CachedFd { fd: Arc::new(fd), serial: s.serial }
            }
        };
        drop(evicted);
        Ok(cached)
    }

    /// Forgets `key` (RELEASE, FORGET) and its twin with O_DIRECT the
    /// other way round; their descriptors close once unused.
    pub(super) fn remove(&self, key: FdKey) {
        let old = {
            let mut s = self.lock();
            (s.remove(key), s.remove(key.twin()))
        };
        drop(old);
    }

    /// Forgets only `key`, not its twin.
    pub(super) fn remove_one(&self, key: FdKey) {
        let old = self.lock().remove(key);
        drop(old);
    }

    /// Descriptors cached now.
    pub(super) fn len(&self) -> usize {
        self.lock().slots.len()
    }

    /// Descriptors opened again after eviction since start.
    #[cfg(test)]
    pub(super) fn reopened(&self) -> u64 {
        self.lock().reopened
    }
}

/// Handles by `fh`, read-mostly: lookups share the lock.
pub(super) struct HandleTable<T> {
    map: RwLock<HashMap<u64, Arc<T>>>,
}

impl<T> Default for HandleTable<T> {
    fn default() -> Self {
        HandleTable { map: RwLock::default() }
    }
}

/// Source of `fh` numbers, shared by files and directories; 0 is never used.
#[derive(Debug)]
pub(super) struct FhCounter(AtomicU64);

impl Default for FhCounter {
    fn default() -> Self {
        FhCounter(AtomicU64::new(1))
    }
}

impl FhCounter {
    pub(super) fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

impl<T> HandleTable<T> {
    pub(super) fn insert(&self, fh: u64, value: T) {
        self.map.write().unwrap_or_else(|p| p.into_inner()).insert(fh, Arc::new(value));
    }

    /// The handle under `key`, made by `make` when there is none.
    pub(super) fn get_or_insert_with(&self, key: u64, make: impl FnOnce() -> T) -> Arc<T> {
        if let Ok(found) = self.get(key) {
            return found;
        }
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        map.entry(key).or_insert_with(|| Arc::new(make())).clone()
    }

    /// The handle; EBADF for an `fh` we never gave out or already released.
    pub(super) fn get(&self, fh: u64) -> Result<Arc<T>, Errno> {
        self.map.read().unwrap_or_else(|p| p.into_inner()).get(&fh).cloned().ok_or(Errno::EBADF)
    }

    pub(super) fn remove(&self, fh: u64) -> Option<Arc<T>> {
        self.map.write().unwrap_or_else(|p| p.into_inner()).remove(&fh)
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// A directory listing read with getdents64, resumable at any cookie.
///
/// Entries read but not yet sent stay in `buf`, so a READDIR that filled the
/// kernel's buffer continues where it stopped without a seek. The position
/// belongs to one descriptor (`on`, a [`CachedFd::serial`]): when the
/// directory's descriptor was evicted and opened again, the buffered
/// entries are dropped and the new descriptor is positioned at the cookie
/// with lseek, which every Linux file system supports for the cookies it
/// hands out (they are what telldir/seekdir and NFS rely on).
#[derive(Default)]
pub(super) struct DirStream {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Cookie of the position after the last consumed entry (0 = start).
    offset: u64,
    /// Serial of the descriptor positioned at `offset`; 0 = none yet.
    on: u64,
}

/// One `linux_dirent64`, located in the stream's buffer.
#[derive(Debug, Clone, Copy)]
pub(super) struct RawDirent {
    pub(super) ino: u64,
    /// Cookie to resume after this entry.
    pub(super) off: u64,
    /// `DT_*` type.
    pub(super) dtype: u8,
    name_at: usize,
    name_len: usize,
    reclen: usize,
}

impl RawDirent {
    /// The type as `S_IFMT` bits (DT_x << 12 is S_IFx), 0 when unknown.
    pub(super) fn kind(&self) -> u32 {
        (self.dtype as u32) << 12
    }
}

const DIRENT_BUFFER: usize = 32 * 1024;
/// d_ino (8) + d_off (8) + d_reclen (2) + d_type (1).
const DIRENT_HEADER: usize = 19;

impl DirStream {
    /// Positions the stream at cookie `offset` on descriptor `fd` (serial
    /// `serial`) unless it is already there.
    pub(super) fn seek(&mut self, fd: &OwnedFd, serial: u64, offset: u64) -> Result<(), Errno> {
        if offset == self.offset && serial == self.on {
            return Ok(());
        }
        // Whatever was buffered came from the old position or descriptor.
        self.start = 0;
        self.end = 0;
        self.on = 0;
        sys::lseek(fd.as_fd(), offset, libc::SEEK_SET)?;
        self.offset = offset;
        self.on = serial;
        Ok(())
    }

    /// The next entry without consuming it; None at the end of the directory.
    pub(super) fn peek(&mut self, fd: &OwnedFd) -> Result<Option<RawDirent>, Errno> {
        if self.start >= self.end {
            if self.buf.len() < DIRENT_BUFFER {
                self.buf.resize(DIRENT_BUFFER, 0);
            }
            let n = sys::getdents64(fd.as_fd(), &mut self.buf)?;
            self.start = 0;
            self.end = n.min(self.buf.len());
            if n == 0 {
                return Ok(None);
            }
        }
        let rec = &self.buf[self.start..self.end];
        if rec.len() < DIRENT_HEADER {
            return Err(Errno::EIO);
        }
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&rec[i..i + 8]);
            u64::from_ne_bytes(b)
        };
        let ino = u64_at(0);
        let off = u64_at(8);
        let reclen = u16::from_ne_bytes([rec[16], rec[17]]) as usize;
        let dtype = rec[18];
        if reclen < DIRENT_HEADER || reclen > rec.len() {
            return Err(Errno::EIO);
        }
        let name_area = &rec[DIRENT_HEADER..reclen];
        let name_len = name_area.iter().position(|&b| b == 0).unwrap_or(name_area.len());
        Ok(Some(RawDirent { ino, off, dtype, name_at: self.start + DIRENT_HEADER, name_len, reclen }))
    }

    pub(super) fn name(&self, e: &RawDirent) -> &[u8] {
        self.buf.get(e.name_at..e.name_at + e.name_len).unwrap_or(&[])
    }

    /// Steps past `e`, which `peek` just returned.
    pub(super) fn consume(&mut self, e: &RawDirent) {
        self.start += e.reclen;
        self.offset = e.off;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn stream_lists_and_resumes_at_cookies() {
        let d = std::env::temp_dir().join(format!("stackfs-dirstream-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..2000 {
            std::fs::write(d.join(format!("file-with-a-longish-name-{i}")), b"").unwrap();
        }
        let p = CString::new(d.as_os_str().as_bytes()).unwrap();
        let cwd = unsafe { std::os::fd::BorrowedFd::borrow_raw(libc::AT_FDCWD) };
        let fd = sys::openat(cwd, &p, libc::O_RDONLY | libc::O_DIRECTORY, 0).unwrap();
        let mut s = DirStream::default();
        let mut all = Vec::new();
        while let Some(e) = s.peek(&fd).unwrap() {
            all.push((s.name(&e).to_vec(), e.off));
            s.consume(&e);
        }
        assert_eq!(all.len(), 2002);
        // Resume after entry 1000 from a fresh position, as a later READDIR would.
        let mut s2 = DirStream::default();
        let fd2 = sys::openat(cwd, &p, libc::O_RDONLY | libc::O_DIRECTORY, 0).unwrap();
        s2.seek(&fd2, 1, all[999].1).unwrap();
        let e = s2.peek(&fd2).unwrap().unwrap();
        assert_eq!(s2.name(&e), &all[1000].0[..]);
        // Half-way through a buffer, the descriptor is replaced (evicted and
        // opened again): the stream drops its buffer and seeks the new one.
        for _ in 0..200 {
            let e = s2.peek(&fd2).unwrap().unwrap();
            s2.consume(&e);
        }
        assert!(s2.start < s2.end, "entries still buffered");
        let fd3 = sys::openat(cwd, &p, libc::O_RDONLY | libc::O_DIRECTORY, 0).unwrap();
        let at = s2.offset;
        s2.seek(&fd3, 2, at).unwrap();
        let mut rest = Vec::new();
        while let Some(e) = s2.peek(&fd3).unwrap() {
            rest.push(s2.name(&e).to_vec());
            s2.consume(&e);
        }
        let want: Vec<Vec<u8>> = all[1200..].iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(rest, want);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A descriptor of /dev/null, and a probe that tells when it was closed.
    fn probe_fd() -> (OwnedFd, impl Fn(&FdCache, FdKey) -> bool) {
        let fd = sys::openat(
            unsafe { std::os::fd::BorrowedFd::borrow_raw(libc::AT_FDCWD) },
            c"/dev/null",
            libc::O_RDONLY,
            0,
        )
        .unwrap();
        (fd, |c: &FdCache, k: FdKey| c.get(k).is_some())
    }

    #[test]
    fn cache_stays_within_its_bound_least_recent_first() {
        let cache = FdCache::new(8);
        let mut weak = Vec::new();
        for i in 0..100 {
            let (fd, _) = probe_fd();
            let c = cache.insert(FdKey::Handle(i), fd);
            weak.push(Arc::downgrade(&c.fd));
            // Keep handle 0 hot: it must survive every eviction.
            assert!(cache.get(FdKey::Handle(0)).is_some(), "hot entry evicted at {i}");
            assert!(cache.len() <= 8);
        }
        assert_eq!(cache.len(), 8);
        // Evicted descriptors are closed (no reference is left anywhere).
        let open = weak.iter().filter(|w| w.strong_count() > 0).count();
        assert_eq!(open, 8, "descriptors still open");
        assert_eq!(weak[0].strong_count(), 1);
        assert_eq!(weak[99].strong_count(), 1);
        assert_eq!(weak[50].strong_count(), 0);
        // Removing closes too.
        cache.remove(FdKey::Handle(99));
        assert_eq!(weak[99].strong_count(), 0);
        assert_eq!(cache.len(), 7);
    }

    #[test]
    fn evicted_descriptors_are_reopened_once_and_shared() {
        let cache = FdCache::new(2);
        let (fd, present) = probe_fd();
        let first = cache.insert(FdKey::Handle(1), fd);
        for k in 2..4 {
            cache.insert(FdKey::Handle(k), probe_fd().0);
        }
        assert!(!present(&cache, FdKey::Handle(1)));
        let mut opens = 0;
        let again = cache
            .get_or_open(
                FdKey::Handle(1),
                || {
                    opens += 1;
                    Ok(probe_fd().0)
                },
                || true,
            )
            .unwrap();
        assert_eq!(opens, 1);
        assert_ne!(again.serial, first.serial, "a reopened descriptor has a new serial");
        // Cached now: the next request gets the same descriptor without opening.
        let same = cache.get_or_open(FdKey::Handle(1), || panic!("opened twice"), || true).unwrap();
        assert_eq!(same.serial, again.serial);
        assert!(Arc::ptr_eq(&same.fd, &again.fd));
        assert_eq!(cache.reopened(), 1);
        // A stateless slot of node 1 is another key than handle 1.
        assert!(cache.get(FdKey::Stateless(1)).is_none());
    }

    /// A descriptor opened with O_DIRECT never serves a buffered request,
    /// nor the other way round; releasing an open closes both.
    #[test]
    fn direct_and_buffered_descriptors_are_kept_apart() {
        let cache = FdCache::new(8);
        let d = std::env::temp_dir().join(format!("efuse-fdcache-direct-{}", std::process::id()));
        std::fs::write(&d, vec![1u8; 8192]).unwrap();
        let p = CString::new(d.as_os_str().as_bytes()).unwrap();
        let cwd = unsafe { std::os::fd::BorrowedFd::borrow_raw(libc::AT_FDCWD) };
        let open = |flags| sys::openat(cwd, &p, flags, 0);
        let buffered = cache.insert(OpenFile::key(3, false), open(libc::O_RDONLY).unwrap());
        let direct =
            cache.get_or_open(OpenFile::key(3, true), || open(libc::O_RDONLY | libc::O_DIRECT), || true).unwrap();
        assert!(!Arc::ptr_eq(&buffered.fd, &direct.fd));
        let fl = |fd: &OwnedFd| unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(fd), libc::F_GETFL) };
        assert_eq!(fl(&direct.fd) & libc::O_DIRECT, libc::O_DIRECT);
        assert_eq!(fl(&buffered.fd) & libc::O_DIRECT, 0);
        let again = cache.get_or_open(OpenFile::key(3, false), || panic!("reopened"), || true).unwrap();
        assert!(Arc::ptr_eq(&again.fd, &buffered.fd));
        let (wb, wd) = (Arc::downgrade(&buffered.fd), Arc::downgrade(&direct.fd));
        drop((buffered, direct, again));
        cache.remove(FdKey::Handle(3));
        assert_eq!((wb.strong_count(), wd.strong_count()), (0, 0), "release closes both");
        // Stateless slots likewise; remove_one leaves the twin.
        cache.insert(FdKey::Stateless(5), open(libc::O_RDONLY).unwrap());
        cache.insert(FdKey::StatelessDirect(5), open(libc::O_RDONLY | libc::O_DIRECT).unwrap());
        cache.remove_one(FdKey::Stateless(5));
        assert!(cache.get(FdKey::Stateless(5)).is_none());
        assert!(cache.get(FdKey::StatelessDirect(5)).is_some());
        cache.remove(FdKey::Stateless(5));
        assert_eq!(cache.len(), 0);
        std::fs::remove_file(&d).unwrap();
    }

    #[test]
    fn released_handles_leave_nothing_cached() {
        let cache = FdCache::new(4);
        let got = cache.get_or_open(FdKey::Handle(7), || Ok(probe_fd().0), || false).unwrap();
        let weak = Arc::downgrade(&got.fd);
        assert_eq!(cache.len(), 0);
        drop(got);
        assert_eq!(weak.strong_count(), 0, "closed once its request is done");
    }

    #[test]
    fn out_of_descriptors_sheds_half_and_retries() {
        let cache = FdCache::new(10);
        for k in 0..10 {
            cache.insert(FdKey::Handle(k), probe_fd().0);
        }
        let mut tries = 0;
        let got = cache.get_or_open(
            FdKey::Handle(100),
            || {
                tries += 1;
                if tries == 1 {
                    Err(Errno::EMFILE)
                } else {
                    Ok(probe_fd().0)
                }
            },
            || true,
        );
        assert!(got.is_ok());
        assert_eq!(tries, 2);
        assert_eq!(cache.len(), 6, "half shed, then the new one cached");
        // The newest survived the shedding.
        assert!(cache.get(FdKey::Handle(9)).is_some());
        assert!(cache.get(FdKey::Handle(0)).is_none());
        // Any other error is the caller's.
        let err = cache.get_or_open(FdKey::Handle(101), || Err(Errno::ESTALE), || true).err();
        assert_eq!(err, Some(Errno::ESTALE));
    }

    #[test]
    fn reopen_keeps_what_each_io_needs_and_nothing_one_shot() {
        let f = reopen_flags(
            libc::O_RDWR
                | libc::O_APPEND
                | libc::O_CREAT
                | libc::O_EXCL
                | libc::O_TRUNC
                | libc::O_DSYNC
                | libc::O_NOATIME,
        );
        assert_eq!(f, libc::O_RDWR | libc::O_APPEND | libc::O_DSYNC | libc::O_NOATIME);
        assert_eq!(reopen_flags(libc::O_WRONLY | libc::O_SYNC), libc::O_WRONLY | libc::O_SYNC);
        assert_eq!(reopen_flags(libc::O_RDWR | libc::O_TMPFILE), libc::O_RDWR);
        assert_eq!(reopen_flags(libc::O_RDONLY | libc::O_DIRECT | libc::O_NOCTTY), libc::O_RDONLY);
        let f = OpenFile::new(1, libc::O_RDWR | libc::O_DIRECT, None);
        assert!(f.direct);
        assert_eq!(f.flags, libc::O_RDWR);
    }
}

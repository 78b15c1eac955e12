//! The metadata table: names and attributes the daemon publishes to one
//! client, in shared memory the client only reads, so that path walks, stat
//! and access of names it resolved before cost no request at all.
//!
//! Set-associative: an entry for name `name` in directory `parent` lives in
//! one of [`WAYS`] entries of bucket `bucket_of(parent, name)`. Each entry is
//! a seqlock: the daemon makes `seq` odd, writes, makes it even again; a
//! reader copies the entry and keeps the copy only when `seq` was the same
//! even value before and after. Every field is an atomic, so a torn read is
//! detected, never undefined. Entries carry the expiry times of the reply
//! they come from (CLOCK_MONOTONIC), as the kernel's dentries do; the daemon
//! clears an entry before it answers any change it makes to what the entry
//! says (the same rule it follows for the kernel's caches).
//!
//! The daemon never reads the table back: it keeps its own index of what it
//! published where, so a client that scribbles on its table only misleads
//! itself.

use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

use efuse_abi::structs::Attr;
use zerocopy::{FromBytes, IntoBytes};

/// Entries per bucket.
pub const WAYS: u32 = 4;
/// Longest name an entry holds (NAME_MAX).
pub const NAME_MAX: usize = 255;
/// Bytes of one entry.
pub const ENTRY_SIZE: usize = 512;

const ATTR_WORDS: usize = std::mem::size_of::<Attr>() / 8;
const NAME_WORDS: usize = NAME_MAX.div_ceil(8) + 1;

/// One entry (512 bytes).
#[repr(C)]
pub struct TableEntry {
    seq: AtomicU32,
    /// Bytes of the name; 0: the entry is empty.
    name_len: AtomicU32,
    parent: AtomicU64,
    nodeid: AtomicU64,
    generation: AtomicU64,
    /// Until when the name may be trusted (CLOCK_MONOTONIC, ns).
    entry_expires: AtomicU64,
    /// Until when the attributes may be trusted.
    attr_expires: AtomicU64,
    attr: [AtomicU64; ATTR_WORDS],
    name: [AtomicU64; NAME_WORDS],
}

const _: () = assert!(std::mem::size_of::<TableEntry>() <= ENTRY_SIZE);
const _: () = assert!(std::mem::size_of::<Attr>().is_multiple_of(8));

/// What an entry says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub parent: u64,
    pub nodeid: u64,
    pub generation: u64,
    pub entry_expires: u64,
    pub attr_expires: u64,
    pub attr: Attr,
}

/// The table inside a region: `buckets * WAYS` entries at `base`.
pub struct Table {
    base: *const TableEntry,
    buckets: u32,
}

// SAFETY: shared memory reached only through atomics.
unsafe impl Send for Table {}
// SAFETY: as above.
unsafe impl Sync for Table {}

/// The bucket of `name` in `parent`, among `buckets` (a power of two).
pub fn bucket_of(parent: u64, name: &[u8], buckets: u32) -> u32 {
    // FNV-1a over the parent and the name.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parent.to_le_bytes().iter().chain(name) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    ((h ^ (h >> 32)) as u32) & (buckets - 1)
}

/// Bytes a table of `buckets` buckets takes.
pub fn table_len(buckets: u32) -> usize {
    buckets as usize * WAYS as usize * ENTRY_SIZE
}

/// The time entries are compared with: CLOCK_MONOTONIC in ns (a vDSO call,
/// no system call).
pub fn now_ns() -> u64 {
    // SAFETY: clock_gettime fills the timespec.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Table {
    /// A table of `buckets` buckets (a power of two) at `base`, which must
    /// stay mapped (and 8-byte aligned) for the table's life.
    ///
    /// # Safety
    /// `base` points to at least [`table_len`]`(buckets)` bytes of shared
    /// memory that outlives the table.
    pub unsafe fn at(base: *mut u8, buckets: u32) -> Table {
        assert!(buckets.is_power_of_two());
        Table { base: base as *const TableEntry, buckets }
    }

    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    /// Entries in all.
    pub fn len(&self) -> u32 {
        self.buckets * WAYS
    }

    pub fn is_empty(&self) -> bool {
        self.buckets == 0
    }

    fn entry(&self, i: u32) -> &TableEntry {
        assert!(i < self.len());
        // SAFETY: in bounds of the table; entries are ENTRY_SIZE apart.
        unsafe { &*((self.base as *const u8).add(i as usize * ENTRY_SIZE) as *const TableEntry) }
    }

    /// The entries `name` in `parent` may occupy.
    pub fn ways(&self, parent: u64, name: &[u8]) -> std::ops::Range<u32> {
        let b = bucket_of(parent, name, self.buckets);
        b * WAYS..(b + 1) * WAYS
    }

    // ---- daemon side ----

    /// Writes entry `i` (daemon). `name` longer than NAME_MAX is not stored.
    pub fn write(&self, i: u32, name: &[u8], p: &Published) {
        if name.is_empty() || name.len() > NAME_MAX {
            self.clear(i);
            return;
        }
        let e = self.entry(i);
        let s = e.seq.load(Ordering::Relaxed);
        let odd = s | 1;
        e.seq.store(odd, Ordering::Relaxed);
        fence(Ordering::Release);
        e.name_len.store(name.len() as u32, Ordering::Relaxed);
        e.parent.store(p.parent, Ordering::Relaxed);
        e.nodeid.store(p.nodeid, Ordering::Relaxed);
        e.generation.store(p.generation, Ordering::Relaxed);
        e.entry_expires.store(p.entry_expires, Ordering::Relaxed);
        e.attr_expires.store(p.attr_expires, Ordering::Relaxed);
        let mut words = [0u64; ATTR_WORDS];
        words.as_mut_bytes().copy_from_slice(p.attr.as_bytes());
        for (d, w) in e.attr.iter().zip(words) {
            d.store(w, Ordering::Relaxed);
        }
        let mut nw = [0u64; NAME_WORDS];
        nw.as_mut_bytes()[..name.len()].copy_from_slice(name);
        for (d, w) in e.name.iter().zip(nw) {
            d.store(w, Ordering::Relaxed);
        }
        e.seq.store(odd.wrapping_add(1), Ordering::Release);
    }

    /// Empties entry `i` (daemon).
    pub fn clear(&self, i: u32) {
        let e = self.entry(i);
        let s = e.seq.load(Ordering::Relaxed);
        let odd = s | 1;
        e.seq.store(odd, Ordering::Relaxed);
        fence(Ordering::Release);
        e.name_len.store(0, Ordering::Relaxed);
        e.seq.store(odd.wrapping_add(1), Ordering::Release);
    }

    /// Updates only the attributes of entry `i` (daemon), if it still
    /// names `nodeid`.
    pub fn write_attr(&self, i: u32, nodeid: u64, attr: &Attr, attr_expires: u64) {
        let e = self.entry(i);
        if e.nodeid.load(Ordering::Relaxed) != nodeid || e.name_len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let s = e.seq.load(Ordering::Relaxed);
        let odd = s | 1;
        e.seq.store(odd, Ordering::Relaxed);
        fence(Ordering::Release);
        let mut words = [0u64; ATTR_WORDS];
        words.as_mut_bytes().copy_from_slice(attr.as_bytes());
        for (d, w) in e.attr.iter().zip(words) {
            d.store(w, Ordering::Relaxed);
        }
        e.attr_expires.store(attr_expires, Ordering::Relaxed);
        e.seq.store(odd.wrapping_add(1), Ordering::Release);
    }

    // ---- client side ----

    /// Reads entry `i` consistently: None when it is empty or the daemon is
    /// writing it. Returns the name's length and the entry.
    pub fn read(&self, i: u32, name_out: &mut [u8; NAME_MAX + 1]) -> Option<(usize, Published)> {
        let e = self.entry(i);
        for _ in 0..4 {
            let s1 = e.seq.load(Ordering::Acquire);
            if s1 & 1 != 0 {
                std::hint::spin_loop();
                continue;
            }
            let len = e.name_len.load(Ordering::Relaxed) as usize;
            if len == 0 || len > NAME_MAX {
                return None;
            }
            let parent = e.parent.load(Ordering::Relaxed);
            let nodeid = e.nodeid.load(Ordering::Relaxed);
            let generation = e.generation.load(Ordering::Relaxed);
            let entry_expires = e.entry_expires.load(Ordering::Relaxed);
            let attr_expires = e.attr_expires.load(Ordering::Relaxed);
            let mut words = [0u64; ATTR_WORDS];
            for (d, w) in words.iter_mut().zip(&e.attr) {
                *d = w.load(Ordering::Relaxed);
            }
            let mut nw = [0u64; NAME_WORDS];
            for (d, w) in nw.iter_mut().zip(&e.name) {
                *d = w.load(Ordering::Relaxed);
            }
            fence(Ordering::Acquire);
            if e.seq.load(Ordering::Relaxed) != s1 {
                continue;
            }
            name_out[..len].copy_from_slice(&nw.as_bytes()[..len]);
            let attr = Attr::read_from_bytes(words.as_bytes()).ok()?;
            return Some((len, Published { parent, nodeid, generation, entry_expires, attr_expires, attr }));
        }
        None
    }

    /// The live entry for `name` in `parent` at time `now`, and its index.
    pub fn find(&self, parent: u64, name: &[u8], now: u64) -> Option<(u32, Published)> {
        if name.is_empty() || name.len() > NAME_MAX {
            return None;
        }
        let mut buf = [0u8; NAME_MAX + 1];
        for i in self.ways(parent, name) {
            if let Some((len, p)) = self.read(i, &mut buf) {
                if p.parent == parent && &buf[..len] == name && p.entry_expires > now {
                    return Some((i, p));
                }
            }
        }
        None
    }

    /// The attributes of `nodeid` from entry `i` (found earlier), if the
    /// entry still names it and they have not expired.
    pub fn attr_of(&self, i: u32, nodeid: u64, now: u64) -> Option<Attr> {
        if i >= self.len() {
            return None;
        }
        let mut buf = [0u8; NAME_MAX + 1];
        let (_, p) = self.read(i, &mut buf)?;
        (p.nodeid == nodeid && p.attr_expires > now).then_some(p.attr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ino: u64, size: u64) -> Attr {
        Attr { ino, size, mode: 0o100644, nlink: 1, blksize: 4096, ..Default::default() }
    }

    fn published(parent: u64, nodeid: u64, size: u64) -> Published {
        Published {
            parent,
            nodeid,
            generation: 0,
            entry_expires: u64::MAX,
            attr_expires: u64::MAX,
            attr: attr(nodeid, size),
        }
    }

    struct Mem(Vec<u64>);

    fn table(buckets: u32) -> (Mem, Table) {
        let mut m = Mem(vec![0u64; table_len(buckets) / 8]);
        // SAFETY: the buffer outlives the table in each test.
        let t = unsafe { Table::at(m.0.as_mut_ptr() as *mut u8, buckets) };
        (m, t)
    }

    #[test]
    fn entries_are_found_by_parent_and_name_only() {
        let (_m, t) = table(16);
        let i = t.ways(1, b"a").start;
        t.write(i, b"a", &published(1, 7, 10));
        assert_eq!(t.find(1, b"a", 0).map(|(_, p)| p.nodeid), Some(7));
        assert_eq!(t.find(2, b"a", 0), None);
        assert_eq!(t.find(1, b"b", 0), None);
        assert_eq!(t.find(1, b"", 0), None);
        assert_eq!(t.attr_of(i, 7, 0).map(|a| a.size), Some(10));
        assert_eq!(t.attr_of(i, 8, 0), None);
        t.write_attr(i, 7, &attr(7, 99), u64::MAX);
        assert_eq!(t.attr_of(i, 7, 0).map(|a| a.size), Some(99));
        t.clear(i);
        assert_eq!(t.find(1, b"a", 0), None);
        assert_eq!(t.attr_of(i, 7, 0), None);
        // A name too long for an entry is never stored.
        let long = vec![b'x'; NAME_MAX + 1];
        t.write(i, &long, &published(1, 9, 1));
        assert_eq!(t.find(1, &long, 0), None);
        let max = vec![b'y'; NAME_MAX];
        let j = t.ways(1, &max).start;
        t.write(j, &max, &published(1, 9, 1));
        assert_eq!(t.find(1, &max, 0).map(|(_, p)| p.nodeid), Some(9));
    }

    #[test]
    fn expired_entries_are_misses() {
        let (_m, t) = table(4);
        let i = t.ways(1, b"a").start;
        let mut p = published(1, 7, 10);
        p.entry_expires = 1000;
        p.attr_expires = 500;
        t.write(i, b"a", &p);
        assert!(t.find(1, b"a", 999).is_some());
        assert!(t.find(1, b"a", 1000).is_none());
        assert!(t.attr_of(i, 7, 499).is_some());
        assert!(t.attr_of(i, 7, 500).is_none());
    }

    /// A reader racing a writer sees either a whole old entry, a whole new
    /// one, or nothing: never a mix.
    #[test]
    fn readers_never_see_a_torn_entry() {
        let (m, t) = table(1);
        let base = m.0.as_ptr() as usize;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                // SAFETY: `m` outlives the thread (joined below).
                let t = unsafe { Table::at(base as *mut u8, 1) };
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    k += 1;
                    let name = if k.is_multiple_of(2) { &b"even"[..] } else { &b"odd-name"[..] };
                    // nodeid, size and the name's length go together.
                    t.write(0, name, &published(1, k, k * 3 + name.len() as u64));
                    if k.is_multiple_of(7) {
                        t.clear(0);
                    }
                    // Leave readers a window now and then.
                    if k.is_multiple_of(4) {
                        for _ in 0..2000 {
                            std::hint::spin_loop();
                        }
                    }
                }
            })
        };
        let mut seen = 0;
        let mut buf = [0u8; NAME_MAX + 1];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while seen < 1_000_000 && std::time::Instant::now() < deadline {
            if let Some((len, p)) = t.read(0, &mut buf) {
                seen += 1;
                assert_eq!(p.attr.size, p.nodeid * 3 + len as u64);
                assert_eq!(p.attr.ino, p.nodeid);
                let want: &[u8] = if p.nodeid.is_multiple_of(2) { b"even" } else { b"odd-name" };
                assert_eq!(&buf[..len], want);
            }
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        assert!(seen > 0);
    }
}

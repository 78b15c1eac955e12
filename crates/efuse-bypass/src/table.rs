//! The metadata table: names and attributes the daemon publishes to one
//! client, in shared memory the client only reads, so that path walks, stat
//! and access of names it resolved before cost no request at all.
//!
//! Set-associative with two choices: an entry for name `name` in directory
//! `parent` lives in one of the [`WAYS`] entries of either of its two
//! buckets ([`buckets_of`]; the second is used when the first is full, so a
//! table fills far further before names evict each other). Each entry is
//! a seqlock: the daemon makes `seq` odd, writes, makes it even again; a
//! reader copies the entry and keeps the copy only when `seq` was the same
//! even value before and after. Every field is an atomic, so a torn read is
//! detected, never undefined. Entries carry the expiry times of the reply
//! they come from (CLOCK_MONOTONIC), as the kernel's dentries do; the daemon
//! clears an entry before it answers any change it makes to what the entry
//! says (the same rule it follows for the kernel's caches).
//!
//! An entry of node 0 is negative: the name does not exist (published when
//! the file system's LOOKUP answered with a negative entry and a timeout,
//! as the kernel caches such a miss in a negative dentry); it holds no
//! lookup, and a change that creates the name clears it as it would clear
//! the kernel's.
//!
//! Only the daemon writes a table: it keeps its own index of what it
//! published where, and clients map the table read-only (`TableMap`), so
//! the daemon may read its entries back ([`Publisher::get`], under its lock)
//! to walk through names it already resolved.

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
    /// The entry's sequence number when it was read (readers fill it;
    /// writers ignore it): it changes with every change to the entry.
    pub seq: u32,
    pub parent: u64,
    pub nodeid: u64,
    pub generation: u64,
    pub entry_expires: u64,
    pub attr_expires: u64,
    pub attr: Attr,
}

impl Published {
    /// `nodeid` in `parent` with attributes `attr`, valid for ever (tests,
    /// and entries the daemon makes without a reply's timeouts).
    pub fn lasting(parent: u64, nodeid: u64, attr: Attr) -> Published {
        Published { seq: 0, parent, nodeid, generation: 0, entry_expires: u64::MAX, attr_expires: u64::MAX, attr }
    }
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

/// The hash of `name` in `parent`: FNV-1a over both, mixed with the
/// finalizer of MurmurHash3 so that every bit is good.
#[inline]
fn hash(parent: u64, name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parent.to_le_bytes().iter().chain(name) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

#[inline]
fn buckets_of_hash(h: u64, buckets: u32) -> (u32, u32) {
    let mask = buckets - 1;
    let first = h as u32 & mask;
    let mut second = (h >> 32) as u32 & mask;
    if second == first {
        second ^= 1 & mask;
    }
    (first, second)
}

/// The tag of a name: hash bits beside those that chose its bucket; never
/// 0 (an entry without a tag).
#[inline]
fn tag_of_hash(h: u64) -> u32 {
    (h >> 12) as u32 | 1
}

/// Up to 8 bytes of a name as an entry stores them: one word, zero padded.
#[inline]
fn word_of(chunk: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b[..chunk.len()].copy_from_slice(chunk);
    u64::from_ne_bytes(b)
}

/// The two buckets `name` in `parent` may live in, among `buckets` (a
/// power of two): different ones when there are two or more.
pub fn buckets_of(parent: u64, name: &[u8], buckets: u32) -> (u32, u32) {
    buckets_of_hash(hash(parent, name), buckets)
}

/// Bytes a table of `buckets` buckets takes: the entries, then one tag
/// (4 bytes) per entry. A reader compares tags first, so a lookup reads
/// the 16 bytes of tags of each of its two buckets and then only the
/// entries whose tag matches (usually one), not every entry of both
/// buckets (eight entries of 512 bytes: with 10,000 names in use, eight
/// cache misses per path component).
pub fn table_len(buckets: u32) -> usize {
    buckets as usize * WAYS as usize * (ENTRY_SIZE + 4)
}

/// The time entries are compared with: CLOCK_MONOTONIC in ns (a vDSO call,
/// no system call).
#[inline]
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

    #[inline]
    fn entry(&self, i: u32) -> &TableEntry {
        assert!(i < self.len());
        // SAFETY: in bounds of the table; entries are ENTRY_SIZE apart.
        unsafe { &*((self.base as *const u8).add(i as usize * ENTRY_SIZE) as *const TableEntry) }
    }

    /// The tag of entry `i` (after all the entries; see [`table_len`]): a
    /// hint only. A reader skips an entry whose tag differs from its
    /// name's; what it reads of an entry whose tag matches is checked as
    /// ever (name, parent, sequence number). A tag that lags behind its
    /// entry makes a lookup miss (the daemon is asked), never answer wrong.
    #[inline]
    fn tag(&self, i: u32) -> &AtomicU32 {
        assert!(i < self.len());
        // SAFETY: in bounds of the tag array that follows the entries.
        unsafe {
            &*((self.base as *const u8).add(self.len() as usize * ENTRY_SIZE + i as usize * 4) as *const AtomicU32)
        }
    }

    /// The entries `name` in `parent` may occupy: those of its first
    /// bucket, then those of its second.
    pub fn ways(&self, parent: u64, name: &[u8]) -> std::iter::Chain<std::ops::Range<u32>, std::ops::Range<u32>> {
        let (a, b) = buckets_of(parent, name, self.buckets);
        let second = if b == a { 0..0 } else { b * WAYS..(b + 1) * WAYS };
        (a * WAYS..(a + 1) * WAYS).chain(second)
    }

    // ---- daemon side ----

    /// Writes entry `i` (daemon). `name` longer than NAME_MAX is not stored.
    pub fn write(&self, i: u32, name: &[u8], p: &Published) {
        if name.is_empty() || name.len() > NAME_MAX {
            self.clear(i);
            return;
        }
        let e = self.entry(i);
        self.tag(i).store(0, Ordering::Relaxed);
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
        self.tag(i).store(tag_of_hash(hash(p.parent, name)), Ordering::Release);
    }

    /// Empties entry `i` (daemon).
    pub fn clear(&self, i: u32) {
        let e = self.entry(i);
        self.tag(i).store(0, Ordering::Relaxed);
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
            return Some((len, Published { seq: s1, parent, nodeid, generation, entry_expires, attr_expires, attr }));
        }
        None
    }

    /// The live entry for `name` in `parent` at time `now`, and its index.
    #[inline]
    pub fn find(&self, parent: u64, name: &[u8], now: u64) -> Option<(u32, Published)> {
        if name.is_empty() || name.len() > NAME_MAX {
            return None;
        }
        let h = hash(parent, name);
        let tag = tag_of_hash(h);
        let (a, b) = buckets_of_hash(h, self.buckets);
        let second = if b == a { 0..0 } else { b * WAYS..(b + 1) * WAYS };
        (a * WAYS..(a + 1) * WAYS)
            .chain(second)
            .filter(|&i| self.tag(i).load(Ordering::Acquire) == tag)
            .find_map(|i| self.matching(i, parent, name, now).map(|p| (i, p)))
    }

    /// Entry `i` if it is `parent`'s entry for `name` and alive at `now`: a
    /// seqlock read that gives up at the first field that differs, before
    /// copying the rest.
    #[inline]
    fn matching(&self, i: u32, parent: u64, name: &[u8], now: u64) -> Option<Published> {
        let len = name.len();
        let e = self.entry(i);
        for _ in 0..4 {
            let s1 = e.seq.load(Ordering::Acquire);
            if s1 & 1 != 0 {
                std::hint::spin_loop();
                continue;
            }
            if e.name_len.load(Ordering::Relaxed) as usize != len
                || e.parent.load(Ordering::Relaxed) != parent
                || e.name.iter().zip(name.chunks(8)).any(|(w, chunk)| w.load(Ordering::Relaxed) != word_of(chunk))
            {
                // A miss, unless a writer was changing it: then look again.
                fence(Ordering::Acquire);
                if e.seq.load(Ordering::Relaxed) == s1 {
                    return None;
                }
                continue;
            }
            let entry_expires = e.entry_expires.load(Ordering::Relaxed);
            let nodeid = e.nodeid.load(Ordering::Relaxed);
            let generation = e.generation.load(Ordering::Relaxed);
            let attr_expires = e.attr_expires.load(Ordering::Relaxed);
            let mut words = [0u64; ATTR_WORDS];
            for (d, w) in words.iter_mut().zip(&e.attr) {
                *d = w.load(Ordering::Relaxed);
            }
            fence(Ordering::Acquire);
            if e.seq.load(Ordering::Relaxed) != s1 {
                continue;
            }
            if entry_expires <= now {
                return None;
            }
            let attr = Attr::read_from_bytes(words.as_bytes()).ok()?;
            return Some(Published { seq: s1, parent, nodeid, generation, entry_expires, attr_expires, attr });
        }
        None
    }

    /// Whether entry `i` still names `nodeid` unchanged since a read saw
    /// sequence number `seq` (nothing was written to it since).
    pub fn unchanged(&self, i: u32, nodeid: u64, seq: u32) -> bool {
        if i >= self.len() || seq & 1 != 0 {
            return false;
        }
        let e = self.entry(i);
        let s1 = e.seq.load(Ordering::Acquire);
        if s1 != seq {
            return false;
        }
        let named = e.nodeid.load(Ordering::Relaxed) == nodeid && e.name_len.load(Ordering::Relaxed) != 0;
        fence(Ordering::Acquire);
        named && e.seq.load(Ordering::Relaxed) == seq
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

    pub(super) fn published(parent: u64, nodeid: u64, size: u64) -> Published {
        Published::lasting(parent, nodeid, attr(nodeid, size))
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
        let i = t.ways(1, b"a").next().expect("a way");
        t.write(i, b"a", &published(1, 7, 10));
        assert_eq!(t.find(1, b"a", 0).map(|(_, p)| p.nodeid), Some(7));
        let seen = t.find(1, b"a", 0).unwrap().1.seq;
        assert!(t.unchanged(i, 7, seen));
        assert!(!t.unchanged(i, 8, seen));
        assert_eq!(t.find(2, b"a", 0), None);
        assert_eq!(t.find(1, b"b", 0), None);
        assert_eq!(t.find(1, b"", 0), None);
        assert_eq!(t.attr_of(i, 7, 0).map(|a| a.size), Some(10));
        assert_eq!(t.attr_of(i, 8, 0), None);
        t.write_attr(i, 7, &attr(7, 99), u64::MAX);
        assert_eq!(t.attr_of(i, 7, 0).map(|a| a.size), Some(99));
        // Any write to the entry tells a reader that saw it before.
        assert!(!t.unchanged(i, 7, seen));
        t.clear(i);
        assert_eq!(t.find(1, b"a", 0), None);
        assert_eq!(t.attr_of(i, 7, 0), None);
        // A name too long for an entry is never stored.
        let long = vec![b'x'; NAME_MAX + 1];
        t.write(i, &long, &published(1, 9, 1));
        assert_eq!(t.find(1, &long, 0), None);
        let max = vec![b'y'; NAME_MAX];
        let j = t.ways(1, &max).next().expect("a way");
        t.write(j, &max, &published(1, 9, 1));
        assert_eq!(t.find(1, &max, 0).map(|(_, p)| p.nodeid), Some(9));
    }

    #[test]
    fn expired_entries_are_misses() {
        let (_m, t) = table(4);
        let i = t.ways(1, b"a").next().expect("a way");
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
            // A find is the same seqlock read, stopping early on a miss.
            for (name, even) in [(&b"even"[..], true), (&b"odd-name"[..], false)] {
                if let Some((_, p)) = t.find(1, name, 0) {
                    assert_eq!(p.nodeid.is_multiple_of(2), even);
                    assert_eq!(p.attr.size, p.nodeid * 3 + name.len() as u64);
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        assert!(seen > 0);
    }
}

/// The daemon's side of one client's table: what it published where, so
/// it can clear exactly the entries a change makes wrong, and a change
/// counter that keeps a slow publisher from putting back what a change
/// cleared in the meantime.
///
/// Protocol: read [`Publisher::epoch`] before asking the file system for
/// what will be published, pass it to [`Publisher::publish`]; any change
/// that cleared something in between bumped the epoch, and the publish is
/// dropped. Changes call the `forget_*` methods after the change is made
/// and before its reply is sent.
///
/// Each entry stands for one lookup of its node that the daemon holds on
/// the table's behalf (so the client may name the node in requests while
/// the entry lives): a successful publish takes over one lookup from the
/// caller, and every entry that goes hands its node back through
/// [`Publisher::take_dropped`], for the daemon to forget.
pub struct Publisher {
    table: Table,
    by_name: std::collections::HashMap<(u64, Box<[u8]>), u32>,
    by_node: std::collections::HashMap<u64, Vec<u32>>,
    /// What each entry holds, for eviction.
    held: Vec<Option<Held>>,
    cursor: Vec<u8>,
    epoch: u64,
    /// Nodes of entries that went, one per entry.
    dropped: Vec<u64>,
}

/// What a published entry holds: (parent, name, nodeid).
type Held = (u64, Box<[u8]>, u64);

impl Publisher {
    /// A publisher for `table`, which must be empty (all zeros, as a new
    /// region is: the region's pages are then touched only as the table
    /// fills, which keeps a short-lived client cheap).
    pub fn new(table: Table) -> Publisher {
        let n = table.len() as usize;
        let buckets = table.buckets() as usize;
        Publisher {
            table,
            by_name: Default::default(),
            by_node: Default::default(),
            held: vec![None; n],
            cursor: vec![0; buckets],
            epoch: 0,
            dropped: Vec::new(),
        }
    }

    /// The change counter (see the type's documentation).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Entries in use.
    pub fn published(&self) -> usize {
        self.by_name.len()
    }

    /// Publishes `name` in `parent` as `p`, unless a change came after
    /// `epoch` was read (returns false then). Replaces an older entry of the
    /// same name; evicts another entry of the bucket when it is full.
    pub fn publish(&mut self, epoch: u64, name: &[u8], p: &Published) -> bool {
        if epoch != self.epoch || name.is_empty() || name.len() > NAME_MAX {
            return false;
        }
        let key = (p.parent, Box::<[u8]>::from(name));
        let i = match self.by_name.get(&key) {
            Some(&i) => {
                self.unlink_node(i);
                if let Some(old) = self.held[i as usize].take() {
                    self.dropped.push(old.2);
                }
                i
            }
            None => {
                let ways = self.table.ways(p.parent, name);
                let first = ways.clone().next().unwrap_or(0);
                // The bucket with more free entries (the first on a tie).
                let free_in = |b: u32| (b..b + WAYS).filter(|&i| self.held[i as usize].is_none()).count();
                let second = ways.clone().nth(WAYS as usize).unwrap_or(first);
                let bucket = if free_in(second) > free_in(first) { second } else { first };
                let free = (bucket..bucket + WAYS).find(|&i| self.held[i as usize].is_none());
                match free {
                    Some(i) => i,
                    None => {
                        // Both buckets full: one of the first goes, in turn.
                        let b = (first / WAYS) as usize;
                        let victim = first + self.cursor[b] as u32 % WAYS;
                        self.cursor[b] = self.cursor[b].wrapping_add(1);
                        self.drop_entry(victim);
                        victim
                    }
                }
            }
        };
        self.table.write(i, name, p);
        self.held[i as usize] = Some((p.parent, key.1.clone(), p.nodeid));
        self.by_name.insert(key, i);
        if p.nodeid != 0 {
            self.by_node.entry(p.nodeid).or_default().push(i);
        }
        true
    }

    /// What is published for `name` in `parent`, read back from the table
    /// (daemon side, under the publisher's lock, so no write is under way).
    /// Only the daemon writes a table, and a client's mapping of it is
    /// read-only (see `TableMap`), so what it reads is what it wrote.
    pub fn get(&self, parent: u64, name: &[u8]) -> Option<Published> {
        let i = *self.by_name.get(&(parent, Box::<[u8]>::from(name)))?;
        let mut buf = [0u8; NAME_MAX + 1];
        let (len, p) = self.table.read(i, &mut buf)?;
        (p.parent == parent && &buf[..len] == name).then_some(p)
    }

    /// Refreshes the attributes wherever `nodeid` is published (a GETATTR
    /// reply), unless a change came after `epoch`.
    pub fn refresh_attr(&mut self, epoch: u64, nodeid: u64, attr: &Attr, attr_expires: u64) -> bool {
        if epoch != self.epoch {
            return false;
        }
        if let Some(slots) = self.by_node.get(&nodeid) {
            for &i in slots {
                self.table.write_attr(i, nodeid, attr, attr_expires);
            }
        }
        true
    }

    /// `name` in `parent` changed (created, removed, renamed): its entry
    /// goes, and so does every entry of the node it named (whose link count
    /// and ctime changed with it).
    pub fn forget_name(&mut self, parent: u64, name: &[u8]) {
        self.epoch += 1;
        if let Some(i) = self.by_name.get(&(parent, Box::<[u8]>::from(name))).copied() {
            let nodeid = self.held[i as usize].as_ref().map(|h| h.2);
            self.drop_entry(i);
            if let Some(n) = nodeid.filter(|n| *n != 0) {
                self.forget_node(n);
            }
        }
    }

    /// A name of `nodeid` in the table: (parent, name).
    pub fn name_of(&self, nodeid: u64) -> Option<(u64, Box<[u8]>)> {
        let i = *self.by_node.get(&nodeid)?.first()?;
        self.held[i as usize].as_ref().map(|h| (h.0, h.1.clone()))
    }

    /// Whether some entry names `nodeid`.
    pub fn has_node(&self, nodeid: u64) -> bool {
        self.by_node.contains_key(&nodeid)
    }

    /// The nodes of entries that went since the last call, one per entry:
    /// the lookups the daemon held for them are to be forgotten.
    pub fn take_dropped(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.dropped)
    }

    /// What is known of `nodeid` changed (attributes, data): every entry
    /// that names it goes.
    pub fn forget_node(&mut self, nodeid: u64) {
        self.epoch += 1;
        if let Some(slots) = self.by_node.remove(&nodeid) {
            for i in slots {
                self.drop_entry_keeping_node(i);
            }
        }
    }

    /// Everything goes (a change whose reach is unknown).
    pub fn forget_all(&mut self) {
        self.epoch += 1;
        for i in 0..self.table.len() {
            if let Some(h) = self.held[i as usize].take() {
                self.table.clear(i);
                if h.2 != 0 {
                    self.dropped.push(h.2);
                }
            }
        }
        self.by_name.clear();
        self.by_node.clear();
    }

    /// Node ids published now, each once (the client may name them).
    pub fn nodes(&self) -> impl Iterator<Item = u64> + '_ {
        self.by_node.keys().copied()
    }

    fn drop_entry(&mut self, i: u32) {
        self.unlink_node(i);
        self.drop_entry_keeping_node(i);
    }

    fn drop_entry_keeping_node(&mut self, i: u32) {
        self.table.clear(i);
        if let Some((parent, name, nodeid)) = self.held[i as usize].take() {
            self.by_name.remove(&(parent, name));
            if nodeid != 0 {
                self.dropped.push(nodeid);
            }
        }
    }

    fn unlink_node(&mut self, i: u32) {
        if let Some((_, _, nodeid)) = &self.held[i as usize] {
            if let Some(v) = self.by_node.get_mut(nodeid) {
                v.retain(|&x| x != i);
                if v.is_empty() {
                    self.by_node.remove(nodeid);
                }
            }
        }
    }
}

#[cfg(test)]
mod publisher_tests {
    use super::tests::published as p;
    use super::*;

    fn setup(buckets: u32) -> (Vec<u64>, Publisher) {
        let mut m = vec![0u64; table_len(buckets) / 8];
        // SAFETY: the Vec's heap buffer does not move when the Vec does, and
        // each test keeps the Vec alive as long as the publisher.
        let t = unsafe { Table::at(m.as_mut_ptr() as *mut u8, buckets) };
        (m, Publisher::new(t))
    }

    fn reader(m: &mut [u64], buckets: u32) -> Table {
        // SAFETY: as in setup.
        unsafe { Table::at(m.as_mut_ptr() as *mut u8, buckets) }
    }

    #[test]
    fn changes_clear_exactly_what_they_touch() {
        let (mut m, mut pb) = setup(8);
        let e = pb.epoch();
        assert!(pb.publish(e, b"a", &p(1, 10, 1)));
        assert!(pb.publish(e, b"b", &p(1, 11, 2)));
        // A hard link: the same node under two names.
        assert!(pb.publish(e, b"c", &p(5, 10, 1)));
        let t = reader(&mut m, 8);
        assert!(t.find(1, b"a", 0).is_some() && t.find(5, b"c", 0).is_some());
        pb.forget_node(10);
        assert!(t.find(1, b"a", 0).is_none() && t.find(5, b"c", 0).is_none());
        assert!(t.find(1, b"b", 0).is_some());
        let mut dropped = pb.take_dropped();
        dropped.sort();
        assert_eq!(dropped, [10, 10]);
        // A removed name takes every entry of its node along.
        assert!(pb.publish(pb.epoch(), b"hard", &p(7, 11, 2)));
        pb.forget_name(1, b"b");
        assert!(t.find(1, b"b", 0).is_none() && t.find(7, b"hard", 0).is_none());
        assert_eq!(pb.take_dropped(), [11, 11]);
        assert_eq!(pb.published(), 0);
        assert_eq!(pb.nodes().count(), 0);
        assert!(!pb.has_node(11));
    }

    #[test]
    fn a_publish_older_than_a_change_is_dropped() {
        let (mut m, mut pb) = setup(8);
        let before = pb.epoch();
        pb.forget_name(1, b"a"); // a change lands while the lookup was under way
        assert!(!pb.publish(before, b"a", &p(1, 10, 1)));
        assert!(reader(&mut m, 8).find(1, b"a", 0).is_none());
        assert!(!pb.refresh_attr(before, 10, &Attr::default(), u64::MAX));
        assert!(pb.publish(pb.epoch(), b"a", &p(1, 10, 1)));
    }

    #[test]
    fn a_negative_entry_pins_nothing_and_goes_with_its_name() {
        let (mut m, mut pb) = setup(8);
        let e = pb.epoch();
        assert!(pb.publish(e, b"missing", &p(1, 0, 0)));
        let t = reader(&mut m, 8);
        assert_eq!(t.find(1, b"missing", 0).map(|(_, x)| x.nodeid), Some(0));
        assert!(!pb.has_node(0) && pb.nodes().next().is_none(), "a miss names no node");
        assert_eq!(pb.get(1, b"missing").map(|x| x.nodeid), Some(0));
        // Created: the miss goes; it held no lookup to forget.
        pb.forget_name(1, b"missing");
        assert!(t.find(1, b"missing", 0).is_none());
        assert!(pb.take_dropped().is_empty());
        assert!(pb.publish(pb.epoch(), b"missing", &p(1, 0, 0)));
        pb.forget_all();
        assert!(pb.take_dropped().is_empty());
    }

    #[test]
    fn a_table_three_quarters_full_keeps_every_name() {
        // 10,000 files in 100 directories (the bench's stat storm) in a
        // table of 16,384 entries: with one bucket per name a fifth of them
        // evicted each other; the second choice keeps them all.
        let (mut m, mut pb) = setup(4096);
        let e = pb.epoch();
        for d in 0..100u64 {
            for f in 0..100u64 {
                let name = format!("f{:05}", d * 100 + f);
                assert!(pb.publish(e, name.as_bytes(), &p(10 + d, 1000 + d * 100 + f, 0)));
            }
        }
        let dropped = pb.take_dropped().len();
        assert!(dropped <= 10, "{dropped} of 10,000 names evicted");
        let t = reader(&mut m, 4096);
        let found = (0..100u64)
            .flat_map(|d| (0..100u64).map(move |f| (d, f)))
            .filter(|(d, f)| t.find(10 + d, format!("f{:05}", d * 100 + f).as_bytes(), 0).is_some())
            .count();
        assert_eq!(found + dropped, 10_000);
    }

    #[test]
    fn a_full_bucket_evicts_and_keeps_the_index_true() {
        let (mut m, mut pb) = setup(1);
        let e = pb.epoch();
        for k in 0..20u64 {
            let name = format!("n{k}");
            assert!(pb.publish(e, name.as_bytes(), &p(1, 100 + k, k)));
        }
        assert_eq!(pb.published(), WAYS as usize);
        // Every eviction handed its node back.
        assert_eq!(pb.take_dropped().len(), 20 - WAYS as usize);
        let t = reader(&mut m, 1);
        let live: Vec<u64> = (0..20u64).filter(|k| t.find(1, format!("n{k}").as_bytes(), 0).is_some()).collect();
        assert_eq!(live.len(), WAYS as usize);
        let mut nodes: Vec<u64> = pb.nodes().collect();
        nodes.sort();
        assert_eq!(nodes, live.iter().map(|k| 100 + k).collect::<Vec<_>>());
        // Re-publishing a name moves it to its new node.
        let k = live[0];
        assert!(pb.publish(e, format!("n{k}").as_bytes(), &p(1, 999, 0)));
        assert_eq!(t.find(1, format!("n{k}").as_bytes(), 0).map(|(_, x)| x.nodeid), Some(999));
        assert!(!pb.nodes().any(|n| n == 100 + k));
        assert_eq!(pb.take_dropped(), [100 + k]);
        pb.forget_all();
        assert_eq!(pb.take_dropped().len(), WAYS as usize);
        assert_eq!(pb.published(), 0);
        assert!((0..20u64).all(|k| t.find(1, format!("n{k}").as_bytes(), 0).is_none()));
    }
}

//! Per-open choice of the data path: passthrough, cached or direct.
//!
//! eFUSE probes its I/O paths and predicts the best one from what it saw; this
//! is the same idea on a stock kernel, in the daemon. For each open of a
//! regular file the file system asks [`PathPolicy::choose`] which path the
//! kernel should use:
//!
//! - **passthrough**: the kernel reads and writes the backing file itself; the
//!   daemon sees no READ/WRITE at all. Only for file systems whose bytes pass
//!   through unchanged (stackfs) and when the kernel granted FUSE_PASSTHROUGH.
//!   It wins whenever it is allowed: I/O runs at the backing file system's
//!   speed, through its page cache, so efuse prefers it (`auto` and `on`).
//! - **cached**: the FUSE page cache; hits cost nothing, misses one round trip
//!   each, with readahead. Best for sequential reads and re-reads.
//!   One exception: a small file opened read-only is served from the FUSE
//!   page cache (kept with FOPEN_KEEP_CACHE): after the first read its opens
//!   cost one OPEN and nothing else, while every passthrough open also
//!   registers a backing file with the kernel.
//! - **direct** (FOPEN_DIRECT_IO): every read and write goes to the daemon,
//!   with the application's own sizes and offsets. Best for random access to
//!   data that is not read again: no readahead amplification, no page cache
//!   filled with pages nobody reads twice.
//!
//! Between cached and direct the policy *probes then predicts*: a new inode is
//! opened cached; once enough reads have been seen (in cached mode the daemon
//! sees the misses, in direct mode every read), the inode's pattern decides
//! (random and never re-read -> direct; sequential or re-read -> cached). The
//! window decays, so an inode whose pattern changes is re-classified, and
//! every [`REPROBE_EVERY`]th open of a direct inode is opened cached again to
//! re-check that re-reads would not have hit the cache.
//!
//! All live opens of an inode share one path: the kernel forbids mixing
//! cached and passthrough opens (the later open fails with EIO), and a direct
//! or passthrough write behind a cached open's back would leave its pages
//! stale. The path changes only when no open is live, and the first cached
//! open after writes that bypassed the FUSE page cache does not keep the
//! cache ([`InodeIo::keep_cache`]), so no stale page is ever served.
//!
//! Listings get the same probe-then-predict treatment ([`ListingPolicy`]):
//! whether a READDIRPLUS answer carries the attributes of entries the file
//! system must look up to get them (a cold directory) depends on whether the
//! program then looks those entries up.

/// One of the three data paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataPath {
    Passthrough,
    Cached,
    Direct,
}

/// What `--passthrough` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PassthroughMode {
    /// Passthrough where allowed, otherwise the adaptive cached/direct choice.
    #[default]
    Auto,
    /// Passthrough for every eligible open, never direct.
    On,
    /// Never passthrough; the adaptive cached/direct choice.
    Off,
}

impl std::str::FromStr for PassthroughMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(PassthroughMode::Auto),
            "on" => Ok(PassthroughMode::On),
            "off" => Ok(PassthroughMode::Off),
            _ => Err(format!("unknown passthrough mode '{s}' (auto, on, off)")),
        }
    }
}

/// Reads seen before the pattern is trusted.
pub const MIN_SAMPLES: u32 = 32;
/// Every this many opens, a direct inode is opened cached to re-probe.
pub const REPROBE_EVERY: u32 = 16;
/// Files smaller than this are always cached: readahead of a small file costs little.
pub const SMALL_FILE: u64 = 256 * 1024;
/// Block size used to recognise re-reads.
const BLOCK_SHIFT: u32 = 12;
/// Slots of the recently-read block table.
const RECENT: usize = 512;

/// What one inode's I/O has looked like recently, and its live opens.
#[derive(Debug, Clone)]
pub struct InodeIo {
    reads: u32,
    sequential: u32,
    reread: u32,
    next_offset: u64,
    recent: Box<[u64; RECENT]>,
    opens: u32,
    live_cached: u32,
    live_passthrough: u32,
    live_direct: u32,
    /// Data changed while no cached open was live: the page cache may be stale.
    cache_stale: bool,
}

impl Default for InodeIo {
    fn default() -> Self {
        InodeIo {
            reads: 0,
            sequential: 0,
            reread: 0,
            next_offset: 0,
            recent: Box::new([0; RECENT]),
            opens: 0,
            live_cached: 0,
            live_passthrough: 0,
            live_direct: 0,
            cache_stale: false,
        }
    }
}

/// The pattern the daemon has seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Too few reads to tell.
    Unknown,
    Sequential,
    /// Random, with blocks read again (the page cache would hit).
    RandomReread,
    /// Random, each block read once.
    Random,
}

impl InodeIo {
    /// Records a READ the daemon served.
    pub fn observe_read(&mut self, offset: u64, len: u32) {
        if self.reads >= 4 * MIN_SAMPLES {
            // Decay: the recent past counts more than the distant past.
            self.reads /= 2;
            self.sequential /= 2;
            self.reread /= 2;
        }
        self.reads += 1;
        if offset == self.next_offset {
            self.sequential += 1;
        }
        self.next_offset = offset + len as u64;
        let block = offset >> BLOCK_SHIFT;
        let slot = (block.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 55) as usize % RECENT;
        if self.recent[slot] == block + 1 {
            self.reread += 1;
        } else {
            self.recent[slot] = block + 1;
        }
    }

    pub fn pattern(&self) -> Pattern {
        if self.reads < MIN_SAMPLES {
            Pattern::Unknown
        } else if self.sequential * 2 >= self.reads {
            Pattern::Sequential
        } else if self.reread * 4 >= self.reads {
            Pattern::RandomReread
        } else {
            Pattern::Random
        }
    }

    /// Records a WRITE the daemon served. Writes through a cached open update
    /// the page cache as they go; any other write makes it stale.
    pub fn observe_write(&mut self) {
        if self.live_cached == 0 {
            self.cache_stale = true;
        }
    }

    /// Must be called for every open answered with `path`; `writable` when
    /// opened for writing.
    pub fn opened(&mut self, path: DataPath, writable: bool) {
        self.opens = self.opens.wrapping_add(1);
        match path {
            DataPath::Cached => self.live_cached += 1,
            DataPath::Passthrough => self.live_passthrough += 1,
            DataPath::Direct => self.live_direct += 1,
        }
        if path != DataPath::Cached && writable {
            // Passthrough writes are never seen by the daemon; direct ones
            // bypass the page cache.
            self.cache_stale = true;
        }
    }

    /// Must be called for every release of an open answered with `path`.
    pub fn released(&mut self, path: DataPath) {
        match path {
            DataPath::Cached => self.live_cached = self.live_cached.saturating_sub(1),
            DataPath::Passthrough => self.live_passthrough = self.live_passthrough.saturating_sub(1),
            DataPath::Direct => self.live_direct = self.live_direct.saturating_sub(1),
        }
    }

    /// Whether a cached open about to be answered may keep the page cache
    /// (FOPEN_KEEP_CACHE): not when data changed behind it. Clears the mark,
    /// since the open without KEEP_CACHE drops the stale pages.
    pub fn keep_cache(&mut self) -> bool {
        !std::mem::take(&mut self.cache_stale)
    }

    /// Marks the page cache stale (a change the daemon learnt of otherwise).
    pub fn invalidate(&mut self) {
        self.cache_stale = true;
    }

    /// Opens of this inode still using passthrough.
    pub fn live_passthrough(&self) -> u32 {
        self.live_passthrough
    }
}

/// The mount-wide part of the choice.
///
/// Use [`PathPolicy::choose_open`] with the open's flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathPolicy {
    pub mode: PassthroughMode,
    /// The kernel granted passthrough (FUSE_PASSTHROUGH negotiated, CAP_SYS_ADMIN).
    pub passthrough_granted: bool,
    /// Direct I/O may be chosen (off for mmap-heavy setups or the plain profile).
    pub adaptive: bool,
}

impl PathPolicy {
    /// Chooses the path for an open of a regular file of `size` bytes with
    /// `open(2)` flags `flags`; see the module documentation.
    pub fn choose_open(&self, io: &InodeIo, size: u64, bytes_unchanged: bool, flags: i32) -> DataPath {
        let app_direct = flags & libc::O_DIRECT != 0;
        let read_only = flags & libc::O_ACCMODE == libc::O_RDONLY && flags & libc::O_TRUNC == 0;
        if read_only && !app_direct && size < SMALL_FILE && io.live_passthrough == 0 && io.live_direct == 0 {
            return DataPath::Cached;
        }
        self.choose(io, size, bytes_unchanged, app_direct)
    }

    /// Chooses the path for a new open of a regular file of `size` bytes.
    /// `bytes_unchanged` is the file system's word that its bytes are the
    /// backing file's (passthrough allowed); `app_direct` is O_DIRECT.
    pub fn choose(&self, io: &InodeIo, size: u64, bytes_unchanged: bool, app_direct: bool) -> DataPath {
        let passthrough_ok =
            bytes_unchanged && self.passthrough_granted && self.mode != PassthroughMode::Off && io.live_cached == 0;
        // Live opens fix the path (see the module documentation). While an
        // inode has a backing file the kernel accepts only passthrough opens.
        if io.live_passthrough > 0 {
            return DataPath::Passthrough;
        }
        if io.live_cached > 0 {
            return DataPath::Cached;
        }
        if io.live_direct > 0 {
            return DataPath::Direct;
        }
        if passthrough_ok {
            return DataPath::Passthrough;
        }
        if app_direct {
            // The application asked for no caching.
            return DataPath::Direct;
        }
        if !self.adaptive || self.mode == PassthroughMode::On || size < SMALL_FILE {
            return DataPath::Cached;
        }
        match io.pattern() {
            Pattern::Random if io.opens % REPROBE_EVERY != REPROBE_EVERY - 1 => DataPath::Direct,
            _ => DataPath::Cached,
        }
    }
}

/// Entries sent without attributes before the usage ratio is trusted.
pub const LISTING_SAMPLES: u32 = 64;
/// Every this many READDIRPLUS answers, one is sent without looking entries
/// up, to measure again whether the program uses them.
pub const LISTING_PROBE_EVERY: u32 = 8;
/// Directories whose bare listings are followed, most recent first.
const LISTING_RECENT: usize = 64;
/// The counts halve beyond this many entries, so the recent past decides.
const LISTING_DECAY: u32 = 512;

/// Whether READDIRPLUS answers should carry the attributes (and a lookup)
/// of entries the file system would have to look up to fill them: worth it
/// when the program opens or stats most entries it lists (`grep -r`, `ls
/// -l`, `du`, `cp -r`), since each entry it uses would otherwise cost a
/// LOOKUP round trip; wasted when it uses few (`find`, `ls`), since the file
/// system then looks up every entry for nothing.
///
/// The policy watches what follows listings sent without attributes: the
/// LOOKUPs of names in those directories, against the entries sent bare.
/// Once at least one in four bare entries was looked up, answers carry
/// attributes, except every [`LISTING_PROBE_EVERY`]th, which goes out bare
/// to keep measuring (entries that came with attributes are never looked
/// up, so only bare ones tell). A new mount starts bare, as the kernel's own
/// READDIRPLUS_AUTO does. Entries the file system knows already cost little
/// and are not its concern.
#[derive(Debug, Default)]
pub struct ListingPolicy {
    state: std::sync::Mutex<ListingState>,
}

#[derive(Debug, Default)]
struct ListingState {
    /// Always fill (true) or never (false), whatever the program does.
    fixed: Option<bool>,
    /// Entries sent bare, and LOOKUPs in their directories since (decayed).
    bare: u32,
    used: u32,
    /// Directories listed bare lately: (node id, entries sent bare, LOOKUPs
    /// counted), newest last. A directory counts at most its bare entries.
    recent: std::collections::VecDeque<(u64, u32, u32)>,
    answers: u32,
}

impl ListingPolicy {
    fn lock(&self) -> std::sync::MutexGuard<'_, ListingState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A policy that always (or never) fills, whatever the program does.
    pub fn fixed(fill: bool) -> ListingPolicy {
        ListingPolicy { state: std::sync::Mutex::new(ListingState { fixed: Some(fill), ..Default::default() }) }
    }

    /// Whether the READDIRPLUS answer about to be built fills entries.
    pub fn fill(&self) -> bool {
        let mut s = self.lock();
        if let Some(fill) = s.fixed {
            return fill;
        }
        s.answers = s.answers.wrapping_add(1);
        let used_enough = s.bare >= LISTING_SAMPLES && s.used * 4 >= s.bare;
        used_enough && !s.answers.is_multiple_of(LISTING_PROBE_EVERY)
    }

    /// `n` entries of directory `dir` went out without attributes.
    pub fn listed_bare(&self, dir: u64, n: u32) {
        if n == 0 {
            return;
        }
        let mut s = self.lock();
        s.bare = s.bare.saturating_add(n);
        if s.bare > LISTING_DECAY {
            s.bare /= 2;
            s.used /= 2;
        }
        match s.recent.iter().position(|r| r.0 == dir) {
            Some(i) => {
                if let Some(mut r) = s.recent.remove(i) {
                    r.1 = r.1.saturating_add(n);
                    s.recent.push_back(r);
                }
            }
            None => {
                if s.recent.len() == LISTING_RECENT {
                    s.recent.pop_front();
                }
                s.recent.push_back((dir, n, 0));
            }
        }
    }

    /// The kernel looked a name up in directory `dir`.
    pub fn looked_up(&self, dir: u64) {
        let mut s = self.lock();
        let Some(r) = s.recent.iter_mut().rev().find(|r| r.0 == dir) else { return };
        if r.2 < r.1 {
            r.2 += 1;
            s.used = s.used.saturating_add(1).min(s.bare);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADAPTIVE: PathPolicy = PathPolicy { mode: PassthroughMode::Auto, passthrough_granted: false, adaptive: true };

    fn feed_random(io: &mut InodeIo, n: u64, space: u64) {
        let mut x = 12345u64;
        for _ in 0..n {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            io.observe_read(((x >> 20) % space) << 12, 4096);
        }
    }

    #[test]
    fn sequential_stays_cached() {
        let mut io = InodeIo::default();
        for i in 0..100 {
            io.observe_read(i * 131072, 131072);
        }
        assert_eq!(io.pattern(), Pattern::Sequential);
        assert_eq!(ADAPTIVE.choose(&io, 1 << 30, false, false), DataPath::Cached);
    }

    #[test]
    fn random_once_goes_direct_but_rereads_stay_cached() {
        let mut io = InodeIo::default();
        assert_eq!(ADAPTIVE.choose(&io, 1 << 30, false, false), DataPath::Cached, "probe first");
        feed_random(&mut io, 200, 1 << 18);
        assert_eq!(io.pattern(), Pattern::Random);
        assert_eq!(ADAPTIVE.choose(&io, 1 << 30, false, false), DataPath::Direct);
        // A small working set read over and over: the cache would hit.
        let mut hot = InodeIo::default();
        feed_random(&mut hot, 400, 16);
        assert_eq!(hot.pattern(), Pattern::RandomReread);
        assert_eq!(ADAPTIVE.choose(&hot, 1 << 30, false, false), DataPath::Cached);
        // Small files are never worth direct I/O.
        assert_eq!(ADAPTIVE.choose(&io, 4096, false, false), DataPath::Cached);
    }

    #[test]
    fn reprobe_periodically() {
        let mut io = InodeIo::default();
        feed_random(&mut io, 200, 1 << 18);
        let mut paths = Vec::new();
        for _ in 0..REPROBE_EVERY {
            let p = ADAPTIVE.choose(&io, 1 << 30, false, false);
            io.opened(p, false);
            io.released(p);
            paths.push(p);
        }
        assert_eq!(paths.iter().filter(|p| **p == DataPath::Cached).count(), 1);
    }

    #[test]
    fn passthrough_rules() {
        let pt = PathPolicy { mode: PassthroughMode::Auto, passthrough_granted: true, adaptive: true };
        let mut io = InodeIo::default();
        assert_eq!(pt.choose(&io, 1 << 30, true, false), DataPath::Passthrough);
        // Not for a transforming file system.
        assert_eq!(pt.choose(&io, 1 << 30, false, false), DataPath::Cached);
        // A live cached open forbids passthrough; a live passthrough open forbids cached.
        io.opened(DataPath::Cached, false);
        assert_eq!(pt.choose(&io, 1 << 30, true, false), DataPath::Cached);
        io.released(DataPath::Cached);
        io.opened(DataPath::Passthrough, true);
        assert_eq!(pt.choose(&io, 1 << 30, true, true), DataPath::Passthrough, "even O_DIRECT joins it");
        assert_eq!(io.live_passthrough(), 1);
        // Passthrough writes bypassed the FUSE page cache: the next cached open drops it.
        io.released(DataPath::Passthrough);
        assert!(!io.keep_cache());
        assert!(io.keep_cache());
    }

    #[test]
    fn small_read_only_files_use_the_page_cache() {
        let pt = PathPolicy { mode: PassthroughMode::Auto, passthrough_granted: true, adaptive: true };
        let mut io = InodeIo::default();
        assert_eq!(pt.choose_open(&io, 4096, true, libc::O_RDONLY), DataPath::Cached);
        assert_eq!(pt.choose_open(&io, 4096, true, libc::O_RDWR), DataPath::Passthrough);
        assert_eq!(pt.choose_open(&io, 1 << 30, true, libc::O_RDONLY), DataPath::Passthrough);
        // A reader joins a live passthrough writer.
        io.opened(DataPath::Passthrough, true);
        assert_eq!(pt.choose_open(&io, 4096, true, libc::O_RDONLY), DataPath::Passthrough);
    }

    #[test]
    fn live_opens_share_one_path() {
        let mut io = InodeIo::default();
        feed_random(&mut io, 200, 1 << 18);
        let p = ADAPTIVE.choose(&io, 1 << 30, false, false);
        assert_eq!(p, DataPath::Direct);
        io.opened(p, true);
        // Even an application asking for the cache joins the live direct opens.
        assert_eq!(ADAPTIVE.choose(&io, 1 << 30, false, false), DataPath::Direct);
        io.observe_write();
        io.released(p);
        let mut seq = io.clone();
        for i in 0..200 {
            seq.observe_read(i << 17, 1 << 17);
        }
        assert_eq!(ADAPTIVE.choose(&seq, 1 << 30, false, false), DataPath::Cached);
        assert!(!seq.keep_cache(), "direct writes happened since the last cached open");
        seq.opened(DataPath::Cached, true);
        seq.observe_write();
        assert!(seq.keep_cache(), "writes through a cached open keep the cache right");
    }

    /// Lists `dirs` directories of `per_dir` bare entries each (as answers
    /// that did not fill them come) and looks up `used` of each; returns how
    /// many of the answers that followed would fill.
    fn run_listings(p: &ListingPolicy, first_dir: u64, dirs: u64, per_dir: u32, used: u32) -> u32 {
        let mut filled = 0;
        for d in first_dir..first_dir + dirs {
            if p.fill() {
                filled += 1;
                continue;
            }
            p.listed_bare(d, per_dir);
            for _ in 0..used {
                p.looked_up(d);
            }
        }
        filled
    }

    #[test]
    fn listings_fill_when_entries_are_used() {
        let p = ListingPolicy::default();
        // A new mount starts bare.
        assert!(!p.fill());
        // grep -r: every entry opened.
        let filled = run_listings(&p, 10, 100, 50, 50);
        assert!(filled >= 80, "filled {filled} of 100 listings of used entries");
        // Every probe goes bare.
        let mut bare = 0;
        for _ in 0..LISTING_PROBE_EVERY * 4 {
            bare += u32::from(!p.fill());
        }
        assert_eq!(bare, 4);
    }

    #[test]
    fn listings_stay_bare_when_few_entries_are_used() {
        let p = ListingPolicy::default();
        // find: only the subdirectories (a tenth) are looked up.
        assert_eq!(run_listings(&p, 10, 100, 50, 5), 0);
        // LOOKUPs elsewhere (creating files in a new directory) do not count.
        for _ in 0..1000 {
            p.looked_up(999);
        }
        assert!(!p.fill());
    }

    #[test]
    fn listings_follow_a_change_of_workload() {
        let p = ListingPolicy::default();
        assert!(run_listings(&p, 10, 100, 50, 50) > 80);
        // Then a find-like walk: the probes see it and filling stops.
        let filled = run_listings(&p, 1000, 400, 50, 2);
        assert!(filled < 400 - 100, "kept filling: {filled} of 400");
        assert_eq!(run_listings(&p, 5000, 50, 50, 2), 0, "still filling at the end");
        // A directory counts no more LOOKUPs than entries it sent bare.
        let q = ListingPolicy::default();
        q.listed_bare(1, 100);
        for _ in 0..1000 {
            q.looked_up(1);
        }
        assert_eq!(q.lock().used, 100);
    }
}

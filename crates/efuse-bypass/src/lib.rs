//! The bypass protocol: how an application's client library (`efuse run`)
//! sends file requests to an efuse daemon through shared memory instead of
//! through the kernel.
//!
//! A daemon that accepts bypass clients listens on a Unix stream socket per
//! mount ([`socket_name`]). A client connects, sends a [`Hello`], and gets a
//! [`Welcome`] with a memfd attached (SCM_RIGHTS): the client's own *region*,
//! which both map shared. The region holds a [`RegionHeader`] and
//! `slot_count` slots; each slot carries one request at a time, in the FUSE
//! wire format (`fuse_in_header` and the operation's arguments), and then its
//! reply (`fuse_out_header` and the payload), so the daemon serves bypass
//! requests through the same session and file system code as kernel ones.
//!
//! A slot goes FREE -> REQUEST (client) -> SERVING (daemon) -> REPLY (daemon)
//! -> FREE (client). Every request gets a reply, FORGET included (an empty
//! one), so the client knows when it may reuse the slot. The client rings the region's doorbell (a counter the
//! daemon's thread futex-waits on when idle) after publishing a request and
//! waits on the slot's state (spin, then futex). Everything in the region is
//! the client's to scribble on: the daemon copies a request out once, then
//! validates the copy, and never trusts the region again for that request.
//!
//! The socket stays open for the life of the client: the daemon learns the
//! client's credentials from it (SO_PEERCRED) and, when it closes, takes
//! back every lookup and open handle the client still held.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64};

pub mod client;
pub mod table;
pub mod wire;

/// First bytes of a region, a [`Hello`] and a [`Welcome`].
pub const MAGIC: u64 = u64::from_le_bytes(*b"EFUSEBP1");
/// The protocol version; a daemon refuses other versions with EPROTO.
/// 2: the metadata table is a memfd of its own, shared by the clients of
/// one set of credentials, passed beside the region; 3: the directory of
/// direct reads may follow it; 4: a tag per table entry.
pub const VERSION: u32 = 4;
/// Bytes before the first slot.
pub const HEADER_SIZE: usize = 4096;
/// Bytes of a slot's header; its data follows.
pub const SLOT_HEADER_SIZE: usize = 64;

/// Slot states (the slot header's `state` word, also its futex).
pub mod state {
    /// Nobody uses the slot.
    pub const FREE: u32 = 0;
    /// The client wrote a request and wants it served.
    pub const REQUEST: u32 = 1;
    /// The daemon copied the request out and is serving it.
    pub const SERVING: u32 = 2;
    /// The daemon wrote the reply.
    pub const REPLY: u32 = 3;
}

/// Opcodes the bypass adds to FUSE's: requests that let a client do in one
/// round trip what a kernel does in several. Far above any FUSE opcode.
pub mod op {
    /// Walk a relative path from `nodeid` (a directory), one component at a
    /// time with the same permission checks as the kernel's walk. Argument:
    /// [`crate::wire::WalkIn`] followed by the path (no NUL). Reply:
    /// [`crate::wire::WalkOut`]; on success the client holds one lookup of
    /// the node it names (FORGET it when done), and `entry` is the final
    /// component's entry. A symbolic link met on the way whose target is
    /// absolute (or a `..` above the start) stops the walk: see
    /// [`crate::wire::walk`].
    pub const WALK: u32 = 0x4546_0001;
}

/// The region's first page. Every field but the magic and geometry is
/// shared state the client may corrupt; the daemon only reads `doorbell`.
#[repr(C)]
pub struct RegionHeader {
    pub magic: u64,
    pub version: u32,
    pub slot_count: u32,
    /// Bytes of data per slot (requests and replies).
    pub slot_size: u32,
    /// Incremented by the client after each request it publishes; the
    /// daemon's thread futex-waits on it when it has nothing to do.
    pub doorbell: AtomicU32,
    /// 1 while the daemon's thread sleeps (or is about to) on `doorbell`:
    /// the client wakes it only then.
    pub server_waiting: AtomicU32,
    /// Slots the client's threads (and its forked children, which share the
    /// region) have claimed: bit i for slot i. Only clients read it.
    pub claimed: AtomicU64,
}

/// The header of a slot.
#[repr(C)]
pub struct SlotHeader {
    /// One of [`state`]; the client futex-waits on it for the reply.
    pub state: AtomicU32,
    /// 1 while the client sleeps on `state`: the daemon wakes it only then.
    pub client_waiting: AtomicU32,
    /// Bytes of the request (written by the client) or reply (by the daemon).
    pub len: AtomicU32,
    /// [`slot_flags`], written by the client with the request.
    pub flags: AtomicU32,
}

/// [`SlotHeader::flags`].
pub mod slot_flags {
    /// The client does not wait for the reply (RELEASE, FORGET): the daemon
    /// serves the request, then frees the slot itself (state FREE, and the
    /// slot's bit in [`crate::RegionHeader::claimed`] cleared) instead of
    /// writing a reply.
    pub const NO_REPLY: u32 = 1 << 0;
}

/// Bytes of a region with `slot_count` slots of `slot_size` bytes (the
/// metadata table is a memfd of its own: [`TableMap`]).
pub fn region_len(slot_count: u32, slot_size: u32) -> usize {
    HEADER_SIZE + slot_count as usize * slot_stride(slot_size)
}

/// Bytes from one slot to the next (page aligned).
pub fn slot_stride(slot_size: u32) -> usize {
    (SLOT_HEADER_SIZE + slot_size as usize).next_multiple_of(4096)
}

/// A mapping of a region, by the daemon or the client.
pub struct Region {
    base: *mut u8,
    len: usize,
    slot_count: u32,
    slot_size: u32,
}

// SAFETY: the region is shared memory reached only through atomics and
// explicit copies; the mapping stays valid for the Region's life.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// Creates a sealed memfd for a new region (daemon side) and maps it.
    /// The seals keep the client from shrinking the file under the daemon's
    /// mapping (which would make the daemon's reads fault).
    pub fn create(slot_count: u32, slot_size: u32) -> io::Result<(OwnedFd, Region)> {
        if !geometry_ok(slot_count, slot_size) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bypass region: bad geometry"));
        }
        let len = region_len(slot_count, slot_size);
        // SAFETY: the name is a NUL-terminated literal.
        let fd = unsafe { libc::memfd_create(c"efuse-bypass".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: plain syscalls on our fd.
        unsafe {
            if libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) != 0
                || libc::fcntl(
                    fd.as_raw_fd(),
                    libc::F_ADD_SEALS,
                    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
                ) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        let region = Region::map(fd.as_raw_fd(), slot_count, slot_size)?;
        // SAFETY: the header page is ours to initialise; nobody else has it yet.
        unsafe {
            let p = region.base as *mut RegionHeader;
            std::ptr::addr_of_mut!((*p).magic).write(MAGIC);
            std::ptr::addr_of_mut!((*p).version).write(VERSION);
            std::ptr::addr_of_mut!((*p).slot_count).write(slot_count);
            std::ptr::addr_of_mut!((*p).slot_size).write(slot_size);
        }
        Ok((fd, region))
    }

    /// Maps the region in `fd` shared, read-write. The client checks the
    /// geometry against the [`Welcome`] before it maps.
    pub fn map(fd: RawFd, slot_count: u32, slot_size: u32) -> io::Result<Region> {
        if !geometry_ok(slot_count, slot_size) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bypass region: bad geometry"));
        }
        let len = region_len(slot_count, slot_size);
        // SAFETY: a fresh shared mapping of a file at least `len` long (the
        // daemon sealed it; the client checked its size).
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Region { base: base as *mut u8, len, slot_count, slot_size })
    }

    pub fn slot_count(&self) -> u32 {
        self.slot_count
    }

    pub fn slot_size(&self) -> u32 {
        self.slot_size
    }

    pub fn header(&self) -> &RegionHeader {
        // SAFETY: the mapping starts with a RegionHeader; its shared fields
        // are atomics, the others are plain integers any bytes make valid.
        unsafe { &*(self.base as *const RegionHeader) }
    }

    /// The header of slot `i` (`i < slot_count`).
    pub fn slot(&self, i: u32) -> &SlotHeader {
        assert!(i < self.slot_count);
        // SAFETY: in bounds; atomics only.
        unsafe { &*(self.slot_ptr(i) as *const SlotHeader) }
    }

    fn slot_ptr(&self, i: u32) -> *mut u8 {
        // SAFETY: i < slot_count, so the offset is inside the mapping.
        unsafe { self.base.add(HEADER_SIZE + i as usize * slot_stride(self.slot_size)) }
    }

    /// Slot `i`'s data area (`slot_size` bytes). Shared memory: the other
    /// side may change it at any time, so it is handed out as a raw pointer
    /// for explicit copies only.
    pub fn data(&self, i: u32) -> *mut u8 {
        assert!(i < self.slot_count);
        // SAFETY: the data follows the slot header inside the stride.
        unsafe { self.slot_ptr(i).add(SLOT_HEADER_SIZE) }
    }

    /// Copies `len` bytes of slot `i`'s data into `out` (cleared first).
    /// `len` beyond the slot is an error, never a read past it.
    pub fn copy_out(&self, i: u32, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
        if len > self.slot_size as usize {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "bypass slot: length beyond the slot"));
        }
        out.clear();
        out.reserve(len);
        // SAFETY: `len` bytes are inside the slot's data; volatile-free byte
        // copy of shared memory into our own buffer (a racing writer only
        // changes which bytes we get, which we validate afterwards).
        unsafe {
            std::ptr::copy_nonoverlapping(self.data(i), out.as_mut_ptr(), len);
            out.set_len(len);
        }
        Ok(())
    }

    /// Writes `parts` one after the other into slot `i`'s data; Err when
    /// they do not fit (nothing written then).
    pub fn write_parts(&self, i: u32, parts: &[&[u8]]) -> Result<usize, usize> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total > self.slot_size as usize {
            return Err(total);
        }
        let mut at = self.data(i);
        for p in parts {
            // SAFETY: the total fits in the slot's data.
            unsafe {
                std::ptr::copy_nonoverlapping(p.as_ptr(), at, p.len());
                at = at.add(p.len());
            }
        }
        Ok(total)
    }
}

impl Region {
    /// Puts private anonymous memory of the same size in place of the
    /// mapping: this process no longer reaches the shared region, while a
    /// thread still inside a call reads and writes zeroes instead of
    /// faulting. The shared region itself is left as it is for whoever else
    /// maps it.
    pub fn detach(&self) -> io::Result<()> {
        // SAFETY: exactly the pages map() mapped, which stay mapped (now
        // private and zeroed) until Drop unmaps them.
        unsafe { privatize(self.base, self.len, libc::PROT_READ | libc::PROT_WRITE) }
    }
}

/// Puts private zeroed anonymous memory with protection `prot` in place of
/// `len` bytes mapped at `base` (see [`Region::detach`]).
///
/// # Safety
/// `base..base + len` is a mapping of the caller's, kept until it unmaps it.
unsafe fn privatize(base: *mut u8, len: usize, prot: i32) -> io::Result<()> {
    let p = libc::mmap(
        base as *mut libc::c_void,
        len,
        prot,
        libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    );
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what map() mapped.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

/// A metadata table in a memfd of its own: the daemon maps it read-write
/// and publishes to it for every client of one set of credentials; each of
/// those clients maps it read-only (the memfd is sealed against new
/// writable mappings and against resizing once the daemon has mapped it),
/// so a process finds what the earlier processes of its user resolved.
pub struct TableMap {
    base: *mut u8,
    len: usize,
    buckets: u32,
}

// SAFETY: shared memory reached only through the table's atomics; the
// mapping stays valid for the TableMap's life.
unsafe impl Send for TableMap {}
// SAFETY: as above.
unsafe impl Sync for TableMap {}

impl TableMap {
    /// Creates the memfd of a table of `buckets` buckets (daemon side),
    /// maps it read-write, then seals it.
    pub fn create(buckets: u32) -> io::Result<(OwnedFd, TableMap)> {
        if !table_buckets_ok(buckets) || buckets == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bypass table: bad geometry"));
        }
        let len = table::table_len(buckets);
        // SAFETY: the name is a NUL-terminated literal.
        let fd = unsafe { libc::memfd_create(c"efuse-table".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: plain syscalls on our fd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let map = TableMap::map(fd.as_raw_fd(), buckets, true)?;
        // SAFETY: as above. The daemon's writable mapping exists already;
        // F_SEAL_FUTURE_WRITE refuses every later one (the clients').
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_SEAL;
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((fd, map))
    }

    /// Maps the table in `fd` (`writable`: the daemon; clients map it
    /// read-only), after checking that the file holds the whole table.
    pub fn map(fd: RawFd, buckets: u32, writable: bool) -> io::Result<TableMap> {
        if !table_buckets_ok(buckets) || buckets == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bypass table: bad geometry"));
        }
        let len = table::table_len(buckets);
        // SAFETY: fstat into a zeroed stat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if (st.st_size as usize) < len {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "bypass table: smaller than announced"));
        }
        let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        // SAFETY: a fresh shared mapping of a file at least `len` long.
        let base = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(TableMap { base: base as *mut u8, len, buckets })
    }

    /// The table. (A client's mapping is read-only: it must only read.)
    pub fn table(&self) -> table::Table {
        // SAFETY: the mapping holds the whole table, page aligned, and
        // outlives every use the owner of `self` makes of it.
        unsafe { table::Table::at(self.base, self.buckets) }
    }

    /// As [`Region::detach`]: this process reads zeroes (an empty table)
    /// from now on instead of the shared table.
    pub fn detach(&self) -> io::Result<()> {
        // SAFETY: exactly the pages map() mapped, kept until Drop.
        unsafe { privatize(self.base, self.len, libc::PROT_READ) }
    }
}

impl Drop for TableMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what map() mapped.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

/// Whether a region of this shape is one efuse makes: 1-64 slots of at
/// least 8 KiB and at most 64 MiB.
pub fn geometry_ok(slot_count: u32, slot_size: u32) -> bool {
    (1..=64).contains(&slot_count) && (8192..=64 << 20).contains(&slot_size)
}

/// Whether a metadata table of `buckets` buckets is one efuse makes: none
/// (0), or a power of two up to 2^16.
pub fn table_buckets_ok(buckets: u32) -> bool {
    buckets == 0 || (buckets.is_power_of_two() && buckets <= 1 << 16)
}

/// Waits while `word` holds `expected`, for at most `timeout` (None: no
/// limit). Shared (not private) futex: the word lives in a mapping two
/// processes share. Returns on wake, timeout, signal or a changed value.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<std::time::Duration>) {
    let ts = timeout.map(|d| libc::timespec { tv_sec: d.as_secs() as libc::time_t, tv_nsec: d.subsec_nanos() as _ });
    let tsp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: FUTEX_WAIT on a live aligned u32; the kernel only reads it.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT, expected, tsp, 0usize, 0u32) };
}

/// Wakes up to `n` waiters on `word`.
pub fn futex_wake(word: &AtomicU32, n: i32) {
    // SAFETY: FUTEX_WAKE on a live aligned u32.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, n, 0usize, 0usize, 0u32) };
}

/// The name of the bypass socket of the mount at `mountpoint` (an absolute
/// path without trailing slash), inside the daemon's runtime directory: the
/// control socket's key with another suffix.
pub fn socket_name(mountpoint: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in mountpoint {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}.bypass")
}

/// The directories where a daemon running as `uid` keeps its sockets, as a
/// client of any user can name them (a client checks each is a directory
/// owned by `uid` before trusting a socket in it).
pub fn runtime_dirs_of(uid: u32) -> Vec<std::path::PathBuf> {
    if uid == 0 {
        return vec!["/run/efuse".into()];
    }
    let mut dirs = Vec::new();
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
        let p = std::path::PathBuf::from(x).join("efuse");
        dirs.push(p);
    }
    for d in [format!("/run/user/{uid}/efuse"), format!("/tmp/efuse-{uid}")] {
        let d = std::path::PathBuf::from(d);
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    dirs
}

/// The client's opening message.
#[repr(C)]
#[derive(Debug, Clone, Copy, zerocopy::IntoBytes, zerocopy::FromBytes, zerocopy::Immutable, zerocopy::KnownLayout)]
pub struct Hello {
    pub magic: u64,
    pub version: u32,
    pub flags: u32,
}

/// The daemon's answer to a [`Hello`]; on success the region's memfd comes
/// with it.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, zerocopy::IntoBytes, zerocopy::FromBytes, zerocopy::Immutable, zerocopy::KnownLayout,
)]
pub struct Welcome {
    pub magic: u64,
    pub version: u32,
    /// 0, or a negative errno saying why the daemon refused the client
    /// (EPROTO: version; EACCES: not allowed on this mount; EAGAIN: too
    /// many clients; EOPNOTSUPP: bypass off).
    pub error: i32,
    /// st_dev of the mount, as stat(2) on the mount point reports it: the
    /// client checks that it reached the daemon of the mount it means.
    pub dev: u64,
    pub slot_count: u32,
    pub slot_size: u32,
    /// Largest READ or WRITE the daemon serves in one request.
    pub max_io: u32,
    /// [`welcome`] flags.
    pub flags: u32,
    /// Buckets of the region's metadata table (0: none).
    pub table_buckets: u32,
    pub _pad: u32,
}

/// [`Welcome::flags`].
pub mod welcome {
    /// FLUSH carries nothing on this mount (the file system's FLUSH only
    /// releases locks, which the client never takes through the daemon):
    /// the client sends none at close.
    pub const NO_FLUSH: u32 = 1 << 0;
    /// The file system's opens may be reused (`Capabilities::reusable_opens`):
    /// the client may keep a read-only handle after its last close and take
    /// it again while the file's table entry is unchanged.
    pub const KEEP_OPENS: u32 = 1 << 1;
    /// A third descriptor follows the table's: an O_PATH descriptor of a
    /// directory that holds the file system's regular files under the same
    /// paths, with the same contents and permissions
    /// (`Filesystem::direct_reads`). The client may open a file there
    /// read-only itself, with its own credentials, and read it with no
    /// request to the daemon: the user-space counterpart of passthrough.
    pub const DIRECT_READS: u32 = 1 << 2;
}

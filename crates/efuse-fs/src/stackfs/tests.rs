//! stackfs driven through an efuse session without a kernel: requests are
//! encoded by hand and replies read back from a `MemorySink`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use efuse::abi::structs as abi;
use efuse::abi::Opcode;
use efuse::{Features, MemorySink, ReplySink, Session, SessionConfig};
use zerocopy::{FromBytes, IntoBytes};

use super::*;

struct Harness {
    session: Session<StackFs>,
    mem: Arc<MemorySink>,
    sink: Arc<dyn ReplySink>,
    unique: std::cell::Cell<u64>,
    dir: PathBuf,
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("stackfs-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

impl Harness {
    fn new(tag: &str, max_open_handles: Option<usize>) -> Harness {
        Harness::bounded(tag, max_open_handles, None)
    }

    /// With both descriptor caches bounded: `O_PATH` (`handles`) and open files (`files`).
    /// Directories are opened with OPENDIR.
    fn bounded(tag: &str, max_open_handles: Option<usize>, max_open_files: Option<usize>) -> Harness {
        let features = Features { no_opendir: false, ..Features::DEFAULT };
        Harness::with_features(tag, max_open_handles, max_open_files, features)
    }

    /// A session asking the kernel for `features`; listings fill every
    /// entry, whatever the requests before them (the adaptive choice has
    /// its own test).
    fn with_features(
        tag: &str,
        max_open_handles: Option<usize>,
        max_open_files: Option<usize>,
        features: Features,
    ) -> Harness {
        Harness::with_listings(tag, max_open_handles, max_open_files, features, ListingPolicy::fixed(true))
    }

    fn with_listings(
        tag: &str,
        max_open_handles: Option<usize>,
        max_open_files: Option<usize>,
        features: Features,
        listings: ListingPolicy,
    ) -> Harness {
        let dir = tempdir(tag);
        let mut cfg = StackFsConfig::new(dir.join("backing"));
        std::fs::create_dir_all(&cfg.backing).unwrap();
        cfg.max_open_handles = max_open_handles;
        cfg.max_open_files = max_open_files;
        let mut fs = StackFs::new(cfg).unwrap();
        fs.listings = listings;
        let session = Session::new(fs, SessionConfig { features, ..SessionConfig::default() });
        let mem = Arc::new(MemorySink::default());
        let sink: Arc<dyn ReplySink> = mem.clone();
        let h = Harness { session, mem, sink, unique: std::cell::Cell::new(1), dir };
        let init = abi::InitIn {
            major: 7,
            minor: 45,
            max_readahead: 131072,
            flags: u32::MAX,
            flags2: 0,
            ..Default::default()
        };
        let buf = h.encode(Opcode::Init, 0, &[init.as_bytes()]);
        assert!(h.session.handle_init(&buf, &h.sink, None).is_ok());
        h
    }

    fn backing(&self) -> PathBuf {
        self.dir.join("backing")
    }

    fn encode(&self, op: Opcode, nodeid: u64, parts: &[&[u8]]) -> Vec<u8> {
        let unique = self.unique.get();
        self.unique.set(unique + 1);
        let body: usize = parts.iter().map(|p| p.len()).sum();
        let h = abi::InHeader {
            len: (std::mem::size_of::<abi::InHeader>() + body) as u32,
            opcode: op as u32,
            unique,
            nodeid,
            uid: 0,
            gid: 0,
            pid: 1,
            ..Default::default()
        };
        let mut v = h.as_bytes().to_vec();
        for p in parts {
            v.extend_from_slice(p);
        }
        v
    }

    /// Sends one request; returns (error, payload) of its reply.
    fn call(&self, op: Opcode, nodeid: u64, parts: &[&[u8]]) -> (i32, Vec<u8>) {
        let buf = self.encode(op, nodeid, parts);
        let unique = self.unique.get() - 1;
        self.session.dispatch(&buf, &self.sink);
        let replies = self.mem.replies.lock().unwrap();
        let r = replies.iter().rev().find(|r| r.1 == unique).expect("no reply");
        (r.2, r.3.clone())
    }

    fn lookup(&self, parent: u64, name: &str) -> Result<abi::EntryOut, i32> {
        let name = format!("{name}\0");
        let (err, data) = self.call(Opcode::Lookup, parent, &[name.as_bytes()]);
        if err != 0 {
            return Err(err);
        }
        let (e, _) = abi::EntryOut::read_from_prefix(&data).unwrap();
        if e.nodeid == 0 {
            return Err(-libc::ENOENT);
        }
        Ok(e)
    }

    fn forget(&self, nodeid: u64, n: u64) {
        let f = abi::ForgetIn { nlookup: n };
        let buf = self.encode(Opcode::Forget, nodeid, &[f.as_bytes()]);
        self.session.dispatch(&buf, &self.sink);
    }

    fn opendir(&self, nodeid: u64) -> u64 {
        let o = abi::OpenIn { flags: libc::O_RDONLY as u32, open_flags: 0 };
        let (err, data) = self.call(Opcode::Opendir, nodeid, &[o.as_bytes()]);
        assert_eq!(err, 0);
        abi::OpenOut::read_from_prefix(&data).unwrap().0.fh
    }

    /// All (name, nodeid) of a READDIRPLUS listing, in small buffers.
    fn readdirplus(&self, nodeid: u64, fh: u64) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let mut offset = 0;
        loop {
            let r = abi::ReadIn { fh, offset, size: 1024, ..Default::default() };
            let (err, data) = self.call(Opcode::Readdirplus, nodeid, &[r.as_bytes()]);
            assert_eq!(err, 0);
            if data.is_empty() {
                return out;
            }
            let mut rest = &data[..];
            while !rest.is_empty() {
                let (d, _) = abi::DirentPlus::read_from_prefix(rest).unwrap();
                let size = efuse::abi::encode::direntplus_size(d.dirent.namelen as usize);
                let hdr = std::mem::size_of::<abi::DirentPlus>();
                let name = String::from_utf8(rest[hdr..hdr + d.dirent.namelen as usize].to_vec()).unwrap();
                out.push((name, d.entry_out.nodeid));
                offset = d.dirent.off;
                rest = &rest[size..];
            }
        }
    }

    fn counts(&self) -> inodes::TableCounts {
        self.session.fs().inodes.counts()
    }

    /// Descriptors of open files and directories held now.
    fn open_fds(&self) -> usize {
        self.session.fs().fds.len()
    }

    fn open(&self, nodeid: u64, flags: i32) -> u64 {
        let o = abi::OpenIn { flags: flags as u32, open_flags: 0 };
        let (err, data) = self.call(Opcode::Open, nodeid, &[o.as_bytes()]);
        assert_eq!(err, 0, "open of node {nodeid}");
        abi::OpenOut::read_from_prefix(&data).unwrap().0.fh
    }

    fn read(&self, nodeid: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        self.read_flags(nodeid, fh, offset, size, 0)
    }

    /// A READ whose open file has `flags` now (O_DIRECT).
    fn read_flags(&self, nodeid: u64, fh: u64, offset: u64, size: u32, flags: i32) -> Result<Vec<u8>, i32> {
        let r = abi::ReadIn { fh, offset, size, flags: flags as u32, ..Default::default() };
        match self.call(Opcode::Read, nodeid, &[r.as_bytes()]) {
            (0, data) => Ok(data),
            (err, _) => Err(err),
        }
    }

    fn write(&self, nodeid: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32, i32> {
        self.write_flags(nodeid, fh, offset, data, 0)
    }

    /// A WRITE whose open file has `flags` now. The request is encoded into
    /// a fresh vector, so its data is not page-aligned.
    fn write_flags(&self, nodeid: u64, fh: u64, offset: u64, data: &[u8], flags: i32) -> Result<u32, i32> {
        let w = abi::WriteIn { fh, offset, size: data.len() as u32, flags: flags as u32, ..Default::default() };
        match self.call(Opcode::Write, nodeid, &[w.as_bytes(), data]) {
            (0, out) => Ok(abi::WriteOut::read_from_prefix(&out).unwrap().0.size),
            (err, _) => Err(err),
        }
    }

    fn release(&self, nodeid: u64, fh: u64) {
        let rel = abi::ReleaseIn { fh, ..Default::default() };
        assert_eq!(self.call(Opcode::Release, nodeid, &[rel.as_bytes()]).0, 0);
    }

    /// GETATTR through open file `fh`: the size.
    fn size_by_fh(&self, nodeid: u64, fh: u64) -> Result<u64, i32> {
        let g = abi::GetattrIn { getattr_flags: efuse::abi::consts::GETATTR_FH, dummy: 0, fh };
        match self.call(Opcode::Getattr, nodeid, &[g.as_bytes()]) {
            (0, data) => Ok(abi::AttrOut::read_from_prefix(&data).unwrap().0.attr.size),
            (err, _) => Err(err),
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Appends the names of a READDIR reply's entries to `names`; returns the
/// offset of the last one (where the next READDIR continues).
fn read_dirents(data: &[u8], names: &mut Vec<String>) -> u64 {
    let mut rest = data;
    let mut offset = 0;
    while !rest.is_empty() {
        let (d, _) = abi::Dirent::read_from_prefix(rest).unwrap();
        let hdr = std::mem::size_of::<abi::Dirent>();
        names.push(String::from_utf8(rest[hdr..hdr + d.namelen as usize].to_vec()).unwrap());
        offset = d.off;
        rest = &rest[efuse::abi::encode::dirent_size(d.namelen as usize)..];
    }
    offset
}

fn write_files(dir: &Path, n: usize) {
    for i in 0..n {
        std::fs::write(dir.join(format!("f{i:04}")), format!("content {i}")).unwrap();
    }
}

#[test]
fn readdirplus_counts_lookups_and_forget_releases_them() {
    let h = Harness::new("rdp", Some(16));
    write_files(&h.backing(), 500);
    // A cold directory: every entry but "." and ".." comes with its
    // attributes and one lookup, whatever the descriptor bound.
    let fh = h.opendir(ROOT_ID);
    let listed = h.readdirplus(ROOT_ID, fh);
    assert_eq!(listed.len(), 502);
    let mut names: Vec<_> = listed.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    assert_eq!(&names[..3], &[".", "..", "f0000"]);
    for (name, id) in &listed {
        assert_eq!(*id == 0, name == "." || name == "..", "{name}: node {id}");
    }
    let c = h.counts();
    assert_eq!(c.nodes, 501);
    assert!(c.cached <= 16, "{c:?}");
    // The same node as a LOOKUP finds, with the backing inode's number.
    let id_of = |listed: &[(String, u64)], name: &str| listed.iter().find(|(n, _)| n == name).map(|(_, id)| *id);
    let f7 = id_of(&listed, "f0007").unwrap();
    let e = h.lookup(ROOT_ID, "f0007").unwrap();
    assert_eq!(e.nodeid, f7);
    assert_eq!(
        e.attr.ino,
        std::fs::metadata(h.backing().join("f0007"))
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.ino()
            })
            .unwrap()
    );
    // A second listing adds one lookup to each entry again.
    let fh2 = h.opendir(ROOT_ID);
    let again = h.readdirplus(ROOT_ID, fh2);
    assert_eq!(id_of(&again, "f0007"), Some(f7));
    assert_eq!(h.counts().nodes, 501);
    // f0007: three lookups (READDIRPLUS, LOOKUP, READDIRPLUS); the others two.
    for (name, id) in &listed {
        if *id != 0 && name != "f0007" {
            h.forget(*id, 2);
        }
    }
    assert_eq!(h.counts().nodes, 2);
    h.forget(f7, 2);
    assert_eq!(h.counts().nodes, 2);
    h.forget(f7, 1);
    assert_eq!(h.counts().nodes, 1);
    let rel = abi::ReleaseIn { fh: fh2, ..Default::default() };
    assert_eq!(h.call(Opcode::Releasedir, ROOT_ID, &[rel.as_bytes()]).0, 0);
    let rel = abi::ReleaseIn { fh, ..Default::default() };
    assert_eq!(h.call(Opcode::Releasedir, ROOT_ID, &[rel.as_bytes()]).0, 0);
}

/// An entry removed behind the mount after the daemon read it from the
/// backing directory (but before it was sent) is left out, not sent as a
/// node that no longer exists, and the listing goes on.
#[test]
fn readdirplus_skips_entries_removed_since_they_were_read() {
    let h = Harness::new("rdpgone", None);
    write_files(&h.backing(), 200);
    let fh = h.opendir(ROOT_ID);
    // The first small READDIRPLUS reads far more entries from the backing
    // directory than it sends.
    let r = abi::ReadIn { fh, offset: 0, size: 1024, ..Default::default() };
    let (err, data) = h.call(Opcode::Readdirplus, ROOT_ID, &[r.as_bytes()]);
    assert_eq!(err, 0);
    let mut sent = Vec::new();
    let mut offset = 0;
    let mut rest = &data[..];
    while !rest.is_empty() {
        let (d, _) = abi::DirentPlus::read_from_prefix(rest).unwrap();
        let hdr = std::mem::size_of::<abi::DirentPlus>();
        sent.push(String::from_utf8(rest[hdr..hdr + d.dirent.namelen as usize].to_vec()).unwrap());
        offset = d.dirent.off;
        rest = &rest[efuse::abi::encode::direntplus_size(d.dirent.namelen as usize)..];
    }
    assert!(sent.len() < 100, "{} entries in 1024 bytes", sent.len());
    let mut removed = 0;
    for i in 0..200 {
        let name = format!("f{i:04}");
        if !sent.contains(&name) {
            std::fs::remove_file(h.backing().join(&name)).unwrap();
            removed += 1;
        }
    }
    let mut more = Vec::new();
    loop {
        let r = abi::ReadIn { fh, offset, size: 1024, ..Default::default() };
        let (err, data) = h.call(Opcode::Readdirplus, ROOT_ID, &[r.as_bytes()]);
        assert_eq!(err, 0);
        if data.is_empty() {
            break;
        }
        let mut rest = &data[..];
        while !rest.is_empty() {
            let (d, _) = abi::DirentPlus::read_from_prefix(rest).unwrap();
            let hdr = std::mem::size_of::<abi::DirentPlus>();
            more.push(String::from_utf8(rest[hdr..hdr + d.dirent.namelen as usize].to_vec()).unwrap());
            offset = d.dirent.off;
            rest = &rest[efuse::abi::encode::direntplus_size(d.dirent.namelen as usize)..];
        }
    }
    assert!(removed > 100);
    assert!(more.iter().all(|n| sent.contains(n) || h.backing().join(n).exists()), "sent removed entries: {more:?}");
    let rel = abi::ReleaseIn { fh, ..Default::default() };
    assert_eq!(h.call(Opcode::Releasedir, ROOT_ID, &[rel.as_bytes()]).0, 0);
}

/// READDIRPLUS of a cold directory goes bare on a new mount, and carries
/// every entry's attributes once the program is seen to look up most of
/// what it lists (one answer in eight still goes bare, to keep measuring).
#[test]
fn readdirplus_fills_cold_entries_once_they_are_used() {
    let features = Features { no_opendir: false, ..Features::DEFAULT };
    let h = Harness::with_listings("rdpadapt", None, None, features, ListingPolicy::default());
    for d in 0..4 {
        std::fs::create_dir(h.backing().join(format!("d{d}"))).unwrap();
        write_files(&h.backing().join(format!("d{d}")), 100);
    }
    let listed_nodes = |dir: u64| {
        let fh = h.opendir(dir);
        let listed = h.readdirplus(dir, fh);
        let rel = abi::ReleaseIn { fh, ..Default::default() };
        assert_eq!(h.call(Opcode::Releasedir, dir, &[rel.as_bytes()]).0, 0);
        assert_eq!(listed.len(), 102);
        listed.into_iter().filter(|(_, id)| *id != 0).map(|(name, _)| name).collect::<Vec<_>>()
    };
    // find-like: one directory listed, nothing in it looked up: stays bare.
    let d0 = h.lookup(ROOT_ID, "d0").unwrap().nodeid;
    assert!(listed_nodes(d0).is_empty(), "a new mount fills its first listing");
    let d1 = h.lookup(ROOT_ID, "d1").unwrap().nodeid;
    assert!(listed_nodes(d1).is_empty(), "filled after listings nobody used");
    // grep-like: every entry of d1 looked up after its listing.
    for i in 0..100 {
        h.lookup(d1, &format!("f{i:04}")).unwrap();
    }
    let d2 = h.lookup(ROOT_ID, "d2").unwrap().nodeid;
    let filled = listed_nodes(d2);
    assert!(filled.len() >= 80, "only {} of 100 entries filled once listed entries were used", filled.len());
}

#[test]
fn read_write_through_evicted_handles() {
    let h = Harness::new("rw", Some(4));
    write_files(&h.backing(), 50);
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(h.lookup(ROOT_ID, &format!("f{i:04}")).unwrap().nodeid);
    }
    for (i, &id) in ids.iter().enumerate() {
        let o = abi::OpenIn { flags: libc::O_RDWR as u32, open_flags: 0 };
        let (err, data) = h.call(Opcode::Open, id, &[o.as_bytes()]);
        assert_eq!(err, 0);
        let fh = abi::OpenOut::read_from_prefix(&data).unwrap().0.fh;
        let r = abi::ReadIn { fh, offset: 0, size: 4096, ..Default::default() };
        let (err, data) = h.call(Opcode::Read, id, &[r.as_bytes()]);
        assert_eq!(err, 0);
        assert_eq!(data, format!("content {i}").as_bytes());
        let payload = b"XY";
        let w = abi::WriteIn { fh, offset: 0, size: 2, ..Default::default() };
        let (err, data) = h.call(Opcode::Write, id, &[w.as_bytes(), payload]);
        assert_eq!(err, 0);
        assert_eq!(abi::WriteOut::read_from_prefix(&data).unwrap().0.size, 2);
        let rel = abi::ReleaseIn { fh, ..Default::default() };
        assert_eq!(h.call(Opcode::Release, id, &[rel.as_bytes()]).0, 0);
    }
    assert_eq!(std::fs::read(h.backing().join("f0009")).unwrap(), b"XYntent 9");
    assert_eq!(h.session.fs().files.len(), 0);
    assert!(h.counts().cached <= 4);
}

#[test]
fn names_cannot_escape_the_backing_directory() {
    let h = Harness::new("escape", None);
    std::fs::write(h.dir.join("secret"), b"outside").unwrap();
    std::os::unix::fs::symlink("../secret", h.backing().join("link")).unwrap();
    std::fs::create_dir(h.backing().join("sub")).unwrap();
    // ".." of the root is the root; "." is the directory itself.
    assert_eq!(h.lookup(ROOT_ID, "..").unwrap().nodeid, ROOT_ID);
    assert_eq!(h.lookup(ROOT_ID, ".").unwrap().nodeid, ROOT_ID);
    let sub = h.lookup(ROOT_ID, "sub").unwrap().nodeid;
    assert_eq!(h.lookup(sub, "..").unwrap().nodeid, ROOT_ID);
    // Multi-component and empty names are refused.
    assert_eq!(h.lookup(ROOT_ID, "../secret").unwrap_err(), -libc::EINVAL);
    assert_eq!(h.lookup(ROOT_ID, "sub/../../secret").unwrap_err(), -libc::EINVAL);
    assert_eq!(h.lookup(ROOT_ID, "").unwrap_err(), -libc::EINVAL);
    // A symlink is a symlink node, never its target; opening it fails.
    let link = h.lookup(ROOT_ID, "link").unwrap();
    assert_eq!(link.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    let (err, data) = h.call(Opcode::Readlink, link.nodeid, &[]);
    assert_eq!((err, &data[..]), (0, &b"../secret"[..]));
    let o = abi::OpenIn { flags: libc::O_RDONLY as u32, open_flags: 0 };
    assert_ne!(h.call(Opcode::Open, link.nodeid, &[o.as_bytes()]).0, 0);
    // CREATE over the symlink does not follow it.
    let c = abi::CreateIn { flags: (libc::O_WRONLY | libc::O_TRUNC) as u32, mode: 0o644, umask: 0, open_flags: 0 };
    assert_ne!(h.call(Opcode::Create, ROOT_ID, &[c.as_bytes(), b"link\0"]).0, 0);
    assert_eq!(std::fs::read(h.dir.join("secret")).unwrap(), b"outside");
}

#[test]
fn create_rename_link_unlink() {
    let h = Harness::new("ops", None);
    let c = abi::CreateIn { flags: libc::O_RDWR as u32, mode: libc::S_IFREG | 0o640, umask: 0, open_flags: 0 };
    let (err, data) = h.call(Opcode::Create, ROOT_ID, &[c.as_bytes(), b"new\0"]);
    assert_eq!(err, 0);
    let (e, rest) = abi::EntryOut::read_from_prefix(&data).unwrap();
    let (o, _) = abi::OpenOut::read_from_prefix(rest).unwrap();
    assert_eq!(e.attr.mode, libc::S_IFREG | 0o640);
    let w = abi::WriteIn { fh: o.fh, offset: 0, size: 5, ..Default::default() };
    assert_eq!(h.call(Opcode::Write, e.nodeid, &[w.as_bytes(), b"hello"]).0, 0);
    // Hard link: same node.
    let l = abi::LinkIn { oldnodeid: e.nodeid };
    let (err, data) = h.call(Opcode::Link, ROOT_ID, &[l.as_bytes(), b"hard\0"]);
    assert_eq!(err, 0);
    assert_eq!(abi::EntryOut::read_from_prefix(&data).unwrap().0.nodeid, e.nodeid);
    // RENAME_NOREPLACE refuses an existing target; plain rename works.
    let r = abi::Rename2In { newdir: ROOT_ID, flags: libc::RENAME_NOREPLACE, padding: 0 };
    assert_eq!(h.call(Opcode::Rename2, ROOT_ID, &[r.as_bytes(), b"new\0hard\0"]).0, -libc::EEXIST);
    let r = abi::Rename2In { newdir: ROOT_ID, flags: 0, padding: 0 };
    assert_eq!(h.call(Opcode::Rename2, ROOT_ID, &[r.as_bytes(), b"new\0moved\0"]).0, 0);
    assert_eq!(std::fs::read(h.backing().join("moved")).unwrap(), b"hello");
    // mkdir, symlink, mknod(fifo)
    let m = abi::MkdirIn { mode: 0o750, umask: 0 };
    let (err, data) = h.call(Opcode::Mkdir, ROOT_ID, &[m.as_bytes(), b"d\0"]);
    assert_eq!(err, 0);
    assert_eq!(abi::EntryOut::read_from_prefix(&data).unwrap().0.attr.mode, libc::S_IFDIR | 0o750);
    assert_eq!(h.call(Opcode::Symlink, ROOT_ID, &[b"s\0", b"moved\0"]).0, 0);
    let n = abi::MknodIn { mode: libc::S_IFIFO | 0o600, rdev: 0, umask: 0, padding: 0 };
    let (err, data) = h.call(Opcode::Mknod, ROOT_ID, &[n.as_bytes(), b"fifo\0"]);
    assert_eq!(err, 0);
    assert_eq!(abi::EntryOut::read_from_prefix(&data).unwrap().0.attr.mode & libc::S_IFMT, libc::S_IFIFO);
    // xattrs
    let sx = abi::SetxattrInCompat { size: 3, flags: 0 };
    assert_eq!(h.call(Opcode::Setxattr, e.nodeid, &[sx.as_bytes(), b"user.k\0", b"val"]).0, 0);
    let gx = abi::GetxattrIn { size: 0, padding: 0 };
    let (err, data) = h.call(Opcode::Getxattr, e.nodeid, &[gx.as_bytes(), b"user.k\0"]);
    assert_eq!((err, abi::GetxattrOut::read_from_prefix(&data).unwrap().0.size), (0, 3));
    let gx = abi::GetxattrIn { size: 64, padding: 0 };
    assert_eq!(h.call(Opcode::Getxattr, e.nodeid, &[gx.as_bytes(), b"user.k\0"]), (0, b"val".to_vec()));
    // setattr: truncate by path, chmod.
    let sa = abi::SetattrIn {
        valid: efuse::abi::consts::fattr::SIZE | efuse::abi::consts::fattr::MODE,
        size: 2,
        mode: 0o600,
        ..Default::default()
    };
    let (err, data) = h.call(Opcode::Setattr, e.nodeid, &[sa.as_bytes()]);
    assert_eq!(err, 0);
    let (a, _) = abi::AttrOut::read_from_prefix(&data).unwrap();
    assert_eq!((a.attr.size, a.attr.mode), (2, libc::S_IFREG | 0o600));
    // Unlink both names while open: the node stays usable through its fh.
    assert_eq!(h.call(Opcode::Unlink, ROOT_ID, &[b"moved\0"]).0, 0);
    assert_eq!(h.call(Opcode::Unlink, ROOT_ID, &[b"hard\0"]).0, 0);
    let g = abi::GetattrIn { getattr_flags: 0, dummy: 0, fh: 0 };
    assert_eq!(h.call(Opcode::Getattr, e.nodeid, &[g.as_bytes()]).0, 0);
    let rel = abi::ReleaseIn { fh: o.fh, ..Default::default() };
    assert_eq!(h.call(Opcode::Release, e.nodeid, &[rel.as_bytes()]).0, 0);
    assert_eq!(h.call(Opcode::Rmdir, ROOT_ID, &[b"d\0"]).0, 0);
    assert_eq!(h.lookup(ROOT_ID, "d").unwrap_err(), -libc::ENOENT);
}

#[test]
fn create_runs_as_the_caller() {
    if sys::geteuid() != 0 {
        return;
    }
    let h = Harness::new("creds", None);
    std::fs::set_permissions(h.backing(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let m = abi::MkdirIn { mode: 0o755, umask: 0 };
    let mut buf = h.encode(Opcode::Mkdir, ROOT_ID, &[m.as_bytes(), b"mine\0"]);
    // uid and gid of the header.
    buf[24..28].copy_from_slice(&1234u32.to_ne_bytes());
    buf[28..32].copy_from_slice(&5678u32.to_ne_bytes());
    h.session.dispatch(&buf, &h.sink);
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(h.backing().join("mine")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    // The thread is root again afterwards.
    std::fs::write(h.backing().join("after"), b"").unwrap();
    assert_eq!(std::fs::metadata(h.backing().join("after")).unwrap().uid(), 0);
    // A caller without write permission cannot create in root's 0755 directory.
    std::fs::create_dir(h.backing().join("closed")).unwrap();
    let closed = h.lookup(ROOT_ID, "closed").unwrap().nodeid;
    let mut buf = h.encode(Opcode::Mkdir, closed, &[m.as_bytes(), b"x\0"]);
    buf[24..28].copy_from_slice(&1234u32.to_ne_bytes());
    h.session.dispatch(&buf, &h.sink);
    assert!(!h.backing().join("closed/x").exists());
}

/// The kernel applies the caller's umask before it sends MKDIR, MKNOD and
/// CREATE; the daemon's own umask must not apply again.
#[test]
fn new_modes_ignore_the_daemons_umask() {
    let h = Harness::new("umask", None);
    // SAFETY: umask cannot fail. This thread is the "daemon" here.
    let old = unsafe { libc::umask(0o077) };
    let m = abi::MkdirIn { mode: 0o777, umask: 0 };
    assert_eq!(h.call(Opcode::Mkdir, ROOT_ID, &[m.as_bytes(), b"d\0"]).0, 0);
    let c = abi::CreateIn { flags: (libc::O_CREAT | libc::O_WRONLY) as u32, mode: 0o100666, umask: 0, open_flags: 0 };
    assert_eq!(h.call(Opcode::Create, ROOT_ID, &[c.as_bytes(), b"f\0"]).0, 0);
    let n = abi::MknodIn { mode: libc::S_IFIFO | 0o666, rdev: 0, umask: 0, padding: 0 };
    assert_eq!(h.call(Opcode::Mknod, ROOT_ID, &[n.as_bytes(), b"p\0"]).0, 0);
    // The thread's own umask is back once the requests are answered.
    // SAFETY: as above.
    let after = unsafe { libc::umask(old) };
    assert_eq!(after, 0o077);
    use std::os::unix::fs::PermissionsExt;
    let mode = |name: &str| std::fs::symlink_metadata(h.backing().join(name)).unwrap().permissions().mode() & 0o7777;
    assert_eq!((mode("d"), mode("f"), mode("p")), (0o777, 0o666, 0o666));
}

/// CREATE answers with the node of the file it opened, even when another
/// process renames a different file over the name at the same moment (a
/// second lookup of the name would have answered with that other file,
/// leaving the entry and the open handle on different inodes).
#[test]
fn create_answers_with_the_file_it_opened() {
    let h = Harness::new("create-race", None);
    let b = h.backing();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let renamer = {
        let (b, stop) = (b.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let src = b.join(format!("src{}", n % 2));
                if std::fs::write(&src, b"other").is_ok() {
                    let _ = std::fs::rename(&src, b.join("name"));
                }
                n += 1;
            }
        })
    };
    let mut mismatches = 0;
    for _ in 0..3000 {
        let _ = std::fs::remove_file(b.join("name"));
        let c = abi::CreateIn { flags: (libc::O_CREAT | libc::O_RDWR) as u32, mode: 0o100644, umask: 0, open_flags: 0 };
        let (err, data) = h.call(Opcode::Create, ROOT_ID, &[c.as_bytes(), b"name\0"]);
        if err != 0 {
            continue;
        }
        let (e, rest) = abi::EntryOut::read_from_prefix(&data).unwrap();
        let (o, _) = abi::OpenOut::read_from_prefix(rest).unwrap();
        // Attributes through the handle: the file the handle has open.
        let g = abi::GetattrIn { getattr_flags: efuse::abi::consts::GETATTR_FH, dummy: 0, fh: o.fh };
        let (err, data) = h.call(Opcode::Getattr, e.nodeid, &[g.as_bytes()]);
        assert_eq!(err, 0);
        let (a, _) = abi::AttrOut::read_from_prefix(&data).unwrap();
        if a.attr.ino != e.attr.ino {
            mismatches += 1;
        }
        let rel = abi::ReleaseIn { fh: o.fh, ..Default::default() };
        assert_eq!(h.call(Opcode::Release, e.nodeid, &[rel.as_bytes()]).0, 0);
        h.forget(e.nodeid, 1);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    renamer.join().unwrap();
    assert_eq!(mismatches, 0, "CREATE answered with an entry for another file than its handle");
}

#[test]
fn open_and_create_answer_with_regular_files_only() {
    let h = Harness::new("regular", None);
    let n = abi::MknodIn { mode: libc::S_IFIFO | 0o666, rdev: 0, umask: 0, padding: 0 };
    let (err, data) = h.call(Opcode::Mknod, ROOT_ID, &[n.as_bytes(), b"fifo\0"]);
    assert_eq!(err, 0);
    let fifo = abi::EntryOut::read_from_prefix(&data).unwrap().0.nodeid;
    // Held open at both ends, so that a regression fails below instead of
    // blocking the test for good.
    let _ends = std::fs::OpenOptions::new().read(true).write(true).open(h.backing().join("fifo")).unwrap();
    std::fs::create_dir(h.backing().join("dir")).unwrap();
    std::fs::write(h.backing().join("file"), b"data").unwrap();

    // The kernel opens FIFOs itself and never truncates one: refused.
    let o = abi::OpenIn { flags: libc::O_RDONLY as u32, open_flags: 0 };
    assert_eq!(h.call(Opcode::Open, fifo, &[o.as_bytes()]).0, -libc::EINVAL);
    let sa = abi::SetattrIn { valid: efuse::abi::consts::fattr::SIZE, size: 0, ..Default::default() };
    assert_eq!(h.call(Opcode::Setattr, fifo, &[sa.as_bytes()]).0, -libc::EINVAL);
    // Nor is one opened for I/O without an open (fh 0, as with --no-open).
    let r = abi::ReadIn { fh: 0, offset: 0, size: 16, ..Default::default() };
    assert_eq!(h.call(Opcode::Read, fifo, &[r.as_bytes()]).0, -libc::EINVAL);

    // CREATE without O_EXCL of a name that appeared: a regular file is
    // opened, anything else refused without being opened.
    let c = abi::CreateIn { flags: libc::O_WRONLY as u32, mode: 0o644, umask: 0, open_flags: 0 };
    assert_eq!(h.call(Opcode::Create, ROOT_ID, &[c.as_bytes(), b"fifo\0"]).0, -libc::EEXIST);
    assert_eq!(h.call(Opcode::Create, ROOT_ID, &[c.as_bytes(), b"dir\0"]).0, -libc::EISDIR);
    let (err, data) = h.call(Opcode::Create, ROOT_ID, &[c.as_bytes(), b"file\0"]);
    assert_eq!(err, 0);
    let e = abi::EntryOut::read_from_prefix(&data).unwrap().0;
    assert_eq!((e.attr.mode & libc::S_IFMT, e.attr.size), (libc::S_IFREG, 4));
    let excl = abi::CreateIn { flags: (libc::O_WRONLY | libc::O_EXCL) as u32, ..c };
    assert_eq!(h.call(Opcode::Create, ROOT_ID, &[excl.as_bytes(), b"file\0"]).0, -libc::EEXIST);

    // O_PATH, which the kernel never sends, would drop O_CREAT and O_TMPFILE
    // and open the name or the directory itself.
    let p = abi::CreateIn { flags: (libc::O_RDWR | libc::O_PATH) as u32, mode: 0o600, umask: 0, open_flags: 0 };
    assert_eq!(h.call(Opcode::Create, ROOT_ID, &[p.as_bytes(), b"dir\0"]).0, -libc::EISDIR);
    let (err, data) = h.call(Opcode::Tmpfile, ROOT_ID, &[p.as_bytes()]);
    assert_eq!(err, 0);
    assert_eq!(abi::EntryOut::read_from_prefix(&data).unwrap().0.attr.mode & libc::S_IFMT, libc::S_IFREG);
}

#[test]
fn open_files_beyond_the_descriptor_bound() {
    // 200 open files, 8 descriptors for them and 8 for inodes: every one
    // still reads and writes, and the daemon never holds more.
    let h = Harness::bounded("manyopen", Some(8), Some(8));
    write_files(&h.backing(), 200);
    let mut open = Vec::new();
    for i in 0..200 {
        let id = h.lookup(ROOT_ID, &format!("f{i:04}")).unwrap().nodeid;
        let flags = if i % 3 == 0 { libc::O_RDWR } else { libc::O_RDONLY };
        open.push((id, h.open(id, flags), flags));
        assert!(h.open_fds() <= 8, "{} open-file descriptors", h.open_fds());
        let c = h.counts();
        assert!(c.cached <= 8 && c.pinned == 1, "open files must not pin their nodes: {c:?}");
    }
    for (i, &(id, fh, flags)) in open.iter().enumerate() {
        assert_eq!(h.read(id, fh, 0, 4096).unwrap(), format!("content {i}").as_bytes());
        if flags == libc::O_RDWR {
            assert_eq!(h.write(id, fh, 0, b"W").unwrap(), 1);
        } else {
            assert_eq!(h.write(id, fh, 0, b"W").unwrap_err(), -libc::EBADF, "a reopen keeps the access mode");
        }
        assert!(h.open_fds() <= 8);
    }
    for &(id, fh, _) in &open {
        h.release(id, fh);
    }
    assert_eq!(h.open_fds(), 0);
    assert_eq!(std::fs::read(h.backing().join("f0003")).unwrap(), b"Wontent 3");
    assert_eq!(std::fs::read(h.backing().join("f0004")).unwrap(), b"content 4");
    assert!(h.session.fs().fds.reopened() >= 190, "reopened {}", h.session.fs().fds.reopened());
}

#[test]
fn reopen_repeats_append_but_not_truncate() {
    let h = Harness::bounded("reopenflags", Some(4), Some(1));
    write_files(&h.backing(), 3);
    let a = h.lookup(ROOT_ID, "f0000").unwrap().nodeid;
    let b = h.lookup(ROOT_ID, "f0001").unwrap().nodeid;
    let c = h.lookup(ROOT_ID, "f0002").unwrap().nodeid;
    // O_TRUNC acts once, at open.
    let ta = h.open(a, libc::O_WRONLY | libc::O_TRUNC);
    assert_eq!(std::fs::read(h.backing().join("f0000")).unwrap(), b"");
    assert_eq!(h.write(a, ta, 0, b"kept").unwrap(), 4);
    // O_APPEND holds on every write, through evictions (one slot: each open evicts the other).
    let tb = h.open(b, libc::O_WRONLY | libc::O_APPEND);
    assert_eq!(h.write(a, ta, 4, b"!").unwrap(), 1);
    assert_eq!(h.write(b, tb, 0, b"+1").unwrap(), 2);
    let tc = h.open(c, libc::O_RDONLY);
    assert_eq!(h.write(b, tb, 0, b"+2").unwrap(), 2);
    assert_eq!(h.read(c, tc, 0, 100).unwrap(), b"content 2");
    assert_eq!(h.write(a, ta, 5, b"?").unwrap(), 1);
    assert_eq!(std::fs::read(h.backing().join("f0000")).unwrap(), b"kept!?");
    assert_eq!(std::fs::read(h.backing().join("f0001")).unwrap(), b"content 1+1+2");
    for (id, fh) in [(a, ta), (b, tb), (c, tc)] {
        h.release(id, fh);
    }
}

#[test]
fn unlinked_open_files_work_through_evictions() {
    let h = Harness::bounded("unlinkopen", Some(2), Some(2));
    write_files(&h.backing(), 40);
    let victim = h.lookup(ROOT_ID, "f0000").unwrap().nodeid;
    let fh = h.open(victim, libc::O_RDWR);
    let replaced = h.lookup(ROOT_ID, "f0001").unwrap().nodeid;
    let fh2 = h.open(replaced, libc::O_RDONLY);
    // Through the mount: unlink one, rename another file over the other.
    assert_eq!(h.call(Opcode::Unlink, ROOT_ID, &[b"f0000\0"]).0, 0);
    let r = abi::Rename2In { newdir: ROOT_ID, flags: 0, padding: 0 };
    assert_eq!(h.call(Opcode::Rename2, ROOT_ID, &[r.as_bytes(), b"f0002\0f0001\0"]).0, 0);
    // Every descriptor the caches hold is pushed out by other files.
    let mut others = Vec::new();
    for i in 3..40 {
        let id = h.lookup(ROOT_ID, &format!("f{i:04}")).unwrap().nodeid;
        others.push((id, h.open(id, libc::O_RDONLY)));
    }
    assert_eq!(h.counts().pinned, 3, "the root and the two removed open files");
    assert_eq!(h.read(victim, fh, 0, 100).unwrap(), b"content 0");
    assert_eq!(h.write(victim, fh, 9, b" and more").unwrap(), 9);
    for &(id, o) in &others {
        assert!(h.read(id, o, 0, 100).is_ok());
    }
    assert_eq!(h.read(victim, fh, 0, 100).unwrap(), b"content 0 and more");
    assert_eq!(h.size_by_fh(victim, fh).unwrap(), 18);
    assert_eq!(h.read(replaced, fh2, 0, 100).unwrap(), b"content 1");
    for (id, o) in others {
        h.release(id, o);
    }
    h.release(victim, fh);
    h.release(replaced, fh2);
    assert_eq!(h.counts().pinned, 1, "the last close unpins");
}

#[test]
fn listing_resumes_after_its_descriptor_was_evicted() {
    let h = Harness::bounded("direvict", Some(4), Some(1));
    write_files(&h.backing(), 300);
    let fh = h.opendir(ROOT_ID);
    let mut names = Vec::new();
    let mut offset = 0;
    let mut i = 0;
    loop {
        let r = abi::ReadIn { fh, offset, size: 512, ..Default::default() };
        let (err, data) = h.call(Opcode::Readdir, ROOT_ID, &[r.as_bytes()]);
        assert_eq!(err, 0);
        if data.is_empty() {
            break;
        }
        offset = read_dirents(&data, &mut names);
        // A listing that restarts or repeats must fail here, not run forever.
        assert!(names.len() <= 302, "{} entries listed from a directory of 302", names.len());
        // An open file takes the one slot: the directory's descriptor goes.
        let id = h.lookup(ROOT_ID, &format!("f{:04}", i % 300)).unwrap().nodeid;
        let o = h.open(id, libc::O_RDONLY);
        h.release(id, o);
        i += 1;
    }
    assert!(i > 10, "the listing took {i} READDIRs; too few to test resumption");
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), names.len(), "an entry came twice");
    assert_eq!(names.len(), 302);
    let rel = abi::ReleaseIn { fh, ..Default::default() };
    assert_eq!(h.call(Opcode::Releasedir, ROOT_ID, &[rel.as_bytes()]).0, 0);
    assert_eq!(h.open_fds(), 0);
}

#[test]
fn stateless_io_shares_the_bounded_cache() {
    // fh 0 (stateless opens): one descriptor per inode served, in the same
    // cache; a forgotten node's goes with it.
    let h = Harness::bounded("stateless", Some(4), Some(4));
    write_files(&h.backing(), 30);
    let mut ids = Vec::new();
    for i in 0..30 {
        let id = h.lookup(ROOT_ID, &format!("f{i:04}")).unwrap().nodeid;
        assert_eq!(h.read(id, 0, 0, 100).unwrap(), format!("content {i}").as_bytes());
        ids.push(id);
        assert!(h.open_fds() <= 4);
    }
    assert_eq!(h.write(ids[5], 0, 0, b"S").unwrap(), 1);
    assert_eq!(std::fs::read(h.backing().join("f0005")).unwrap(), b"Sontent 5");
    for &id in &ids {
        h.forget(id, 1);
    }
    assert_eq!(h.open_fds(), 0);
    assert_eq!(h.counts().nodes, 1);
}

#[test]
fn unlinked_behind_the_mount_answers_right_data_or_estale() {
    let h = Harness::bounded("behind", Some(1), Some(1));
    write_files(&h.backing(), 10);
    let a = h.lookup(ROOT_ID, "f0000").unwrap().nodeid;
    let b = h.lookup(ROOT_ID, "f0001").unwrap().nodeid;
    let fa = h.open(a, libc::O_RDONLY);
    let fb = h.open(b, libc::O_RDONLY);
    // f0000 is still held by someone else; f0001 by nobody but us.
    let other = std::fs::File::open(h.backing().join("f0000")).unwrap();
    std::fs::remove_file(h.backing().join("f0000")).unwrap();
    std::fs::remove_file(h.backing().join("f0001")).unwrap();
    // A third file takes both one-slot caches: neither open keeps a descriptor.
    let c = h.lookup(ROOT_ID, "f0002").unwrap().nodeid;
    let fc = h.open(c, libc::O_RDONLY);
    assert_eq!(h.read(c, fc, 0, 100).unwrap(), b"content 2");
    assert_eq!(h.counts().pinned, 1, "removed behind the mount: nothing pinned");
    for (id, fh, want) in [(a, fa, &b"content 0"[..]), (b, fb, &b"content 1"[..])] {
        match h.read(id, fh, 0, 100) {
            Ok(data) => assert_eq!(data, want, "node {id}: wrong data"),
            Err(e) => assert_eq!(e, -libc::ESTALE, "node {id}: neither its data nor ESTALE"),
        }
    }
    // Nothing holds f0001's inode any more: its data is gone, and so is any answer.
    assert_eq!(h.read(b, fb, 0, 100).unwrap_err(), -libc::ESTALE);
    drop(other);
    for (id, fh) in [(a, fa), (b, fb), (c, fc)] {
        h.release(id, fh);
    }
}

/// The backing file system's direct-I/O offset alignment (`STATX_DIOALIGN`).
fn dio_offset_align(p: &Path) -> u32 {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut st = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: statx writes one struct statx.
    assert_eq!(unsafe { libc::statx(libc::AT_FDCWD, c.as_ptr(), 0, libc::STATX_DIOALIGN, st.as_mut_ptr()) }, 0);
    // SAFETY: zeroed and filled by the kernel.
    let st = unsafe { st.assume_init() };
    if st.stx_mask & libc::STATX_DIOALIGN != 0 {
        st.stx_dio_offset_align
    } else {
        0
    }
}

fn has_o_direct(fd: &OwnedFd) -> bool {
    // SAFETY: fcntl on a live descriptor.
    unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(fd), libc::F_GETFL) & libc::O_DIRECT != 0 }
}

#[test]
fn o_direct_requests_do_direct_io_on_the_backing_file() {
    let h = Harness::new("direct", None);
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 + i / 4096) as u8).collect();
    std::fs::write(h.backing().join("d"), &data).unwrap();
    let id = h.lookup(ROOT_ID, "d").unwrap().nodeid;
    let fh = h.open(id, libc::O_RDWR | libc::O_DIRECT);
    let fds = &h.session.fs().fds;
    let direct = fds.get(FdKey::HandleDirect(fh)).expect("the open's descriptor, kept under its direct key");
    assert!(has_o_direct(&direct.fd));
    assert!(fds.get(FdKey::Handle(fh)).is_none());
    // The WRITE's data sits 80 bytes into a vector: copied to an aligned
    // buffer, or O_DIRECT would refuse it (EINVAL).
    let fresh = vec![0xA5u8; 8192];
    assert_eq!(h.write_flags(id, fh, 4096, &fresh, libc::O_DIRECT), Ok(8192));
    assert_eq!(h.read_flags(id, fh, 4096, 8192, libc::O_DIRECT).unwrap(), fresh);
    // At the end of the file a direct read comes back short, as on the file.
    assert_eq!(h.read_flags(id, fh, 61440, 8192, libc::O_DIRECT).unwrap(), &data[61440..]);
    if dio_offset_align(&h.backing().join("d")) > 1 {
        assert_eq!(h.read_flags(id, fh, 1, 4096, libc::O_DIRECT), Err(-libc::EINVAL), "unaligned direct read");
        assert_eq!(h.write_flags(id, fh, 0, &fresh[..100], libc::O_DIRECT), Err(-libc::EINVAL), "unaligned write");
    }
    // A buffered request on the same open (fcntl turned O_DIRECT off) gets a
    // descriptor of its own, without O_DIRECT; it takes any alignment.
    assert_eq!(h.read_flags(id, fh, 1, 10, 0).unwrap(), &data[1..11]);
    let buffered = fds.get(FdKey::Handle(fh)).expect("a buffered descriptor for the buffered request");
    assert!(!has_o_direct(&buffered.fd));
    drop((direct, buffered));
    h.release(id, fh);
    assert!(fds.get(FdKey::Handle(fh)).is_none() && fds.get(FdKey::HandleDirect(fh)).is_none());
    // fh 0 (stateless opens): the same, per inode.
    assert_eq!(h.read_flags(id, 0, 4096, 4096, libc::O_DIRECT).unwrap(), &fresh[..4096]);
    assert_eq!(h.write_flags(id, 0, 0, &fresh[..4096], 0), Ok(4096));
    let sd = fds.get(FdKey::StatelessDirect(id)).expect("a direct descriptor for fh 0");
    let sb = fds.get(FdKey::Stateless(id)).expect("a buffered descriptor for fh 0");
    assert!(has_o_direct(&sd.fd) && !has_o_direct(&sb.fd));
    drop((sd, sb));
    h.forget(id, 1);
    assert_eq!(h.open_fds(), 0);
    let mut want = data;
    want[..4096].copy_from_slice(&fresh[..4096]);
    want[4096..12288].copy_from_slice(&fresh);
    assert_eq!(std::fs::read(h.backing().join("d")).unwrap(), want);
}

/// Directories listed without OPENDIR (fh 0): each READDIR names its
/// position, the node's stream resumes there (also after its descriptor
/// was evicted), and FORGET drops the node's listing state.
#[test]
fn stateless_listing_resumes_and_goes_with_its_node() {
    let h = Harness::with_features("statelessdir", Some(4), Some(1), Features::DEFAULT);
    let o = abi::OpenIn { flags: libc::O_RDONLY as u32, open_flags: 0 };
    assert_eq!(h.call(Opcode::Opendir, ROOT_ID, &[o.as_bytes()]).0, -libc::ENOSYS, "OPENDIR is stateless");
    std::fs::create_dir(h.backing().join("d")).unwrap();
    write_files(&h.backing().join("d"), 300);
    let d = h.lookup(ROOT_ID, "d").unwrap().nodeid;
    let mut names = Vec::new();
    let mut offset = 0;
    let mut i = 0;
    loop {
        let r = abi::ReadIn { fh: 0, offset, size: 512, ..Default::default() };
        let (err, data) = h.call(Opcode::Readdir, d, &[r.as_bytes()]);
        assert_eq!(err, 0);
        if data.is_empty() {
            break;
        }
        offset = read_dirents(&data, &mut names);
        assert!(names.len() <= 302, "{} entries listed from a directory of 302", names.len());
        // Another reader starts over at 0 meanwhile; an open file takes the
        // one descriptor slot.
        let r = abi::ReadIn { fh: 0, offset: 0, size: 512, ..Default::default() };
        assert_eq!(h.call(Opcode::Readdir, d, &[r.as_bytes()]).0, 0);
        let id = h.lookup(d, &format!("f{:04}", i % 300)).unwrap().nodeid;
        let fh = h.open(id, libc::O_RDONLY);
        h.release(id, fh);
        h.forget(id, 1);
        i += 1;
    }
    assert!(i > 10, "the listing took {i} READDIRs; too few to test resumption");
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), names.len(), "an entry came twice");
    assert_eq!(names.len(), 302);
    // A regular file cannot be listed, and leaves no state behind.
    let f = h.lookup(d, "f0001").unwrap().nodeid;
    let r = abi::ReadIn { fh: 0, offset: 0, size: 512, ..Default::default() };
    assert_eq!(h.call(Opcode::Readdir, f, &[r.as_bytes()]).0, -libc::ENOTDIR);
    h.forget(f, 1);
    h.forget(d, 1);
    assert_eq!(h.counts().nodes, 1);
    assert_eq!(h.open_fds(), 0, "a forgotten directory's descriptor stays");
    assert_eq!(h.session.fs().stateless_dirs.len(), 0, "a forgotten directory's listing state stays");
}

/// With stateless opens the kernel sends no RELEASE once it has seen OPEN
/// answered ENOSYS, also not for files opened by CREATE: those get fh 0
/// and leave nothing behind but the node, which FORGET takes.
#[test]
fn stateless_creates_keep_no_per_open_state() {
    let features = Features { no_open: true, passthrough: false, ..Features::DEFAULT };
    let h = Harness::with_features("statelesscreate", None, None, features);
    std::fs::write(h.backing().join("old"), b"old").unwrap();
    let old = h.lookup(ROOT_ID, "old").unwrap().nodeid;
    let o = abi::OpenIn { flags: libc::O_RDONLY as u32, open_flags: 0 };
    assert_eq!(h.call(Opcode::Open, old, &[o.as_bytes()]).0, -libc::ENOSYS);
    let mut made = Vec::new();
    for i in 0..20 {
        let c = abi::CreateIn { flags: libc::O_WRONLY as u32, mode: libc::S_IFREG | 0o644, umask: 0, open_flags: 0 };
        let name = format!("new{i}\0");
        let (err, data) = h.call(Opcode::Create, ROOT_ID, &[c.as_bytes(), name.as_bytes()]);
        assert_eq!(err, 0);
        let (e, rest) = abi::EntryOut::read_from_prefix(&data).unwrap();
        let (o, _) = abi::OpenOut::read_from_prefix(rest).unwrap();
        assert_eq!(o.fh, 0, "a stateless CREATE hands out no handle");
        assert_eq!(h.write(e.nodeid, 0, 0, b"stateless").unwrap(), 9);
        made.push(e.nodeid);
    }
    // A TMPFILE's unnamed inode stays alive for its fh 0 I/O.
    let t = abi::CreateIn { flags: libc::O_RDWR as u32, mode: libc::S_IFREG | 0o600, umask: 0, open_flags: 0 };
    let (err, data) = h.call(Opcode::Tmpfile, ROOT_ID, &[t.as_bytes(), b"\0"]);
    assert_eq!(err, 0);
    let (tmp, _) = abi::EntryOut::read_from_prefix(&data).unwrap();
    assert_eq!(h.write(tmp.nodeid, 0, 0, b"unnamed").unwrap(), 7);
    assert_eq!(h.read(tmp.nodeid, 0, 0, 100).unwrap(), b"unnamed");
    assert_eq!(std::fs::read(h.backing().join("new7")).unwrap(), b"stateless");
    assert_eq!(h.session.fs().files.len(), 0, "per-open state kept for a stateless CREATE");
    // A RELEASE that comes all the same (CREATEs before the kernel's first
    // OPEN) finds nothing to undo.
    h.release(made[0], 0);
    for id in made.into_iter().chain([old, tmp.nodeid]) {
        h.forget(id, 1);
    }
    assert_eq!(h.counts().nodes, 1);
    assert_eq!(h.open_fds(), 0);
}

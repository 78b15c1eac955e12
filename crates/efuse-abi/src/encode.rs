//! Encoders for the variable-length records the daemon writes: directory
//! entries (READDIR, READDIRPLUS) and notification bodies.

use zerocopy::IntoBytes;

use crate::structs::{Dirent, DirentPlus, EntryOut};

/// Records are aligned to 8 bytes (`FUSE_REC_ALIGN`).
pub const fn rec_align(x: usize) -> usize {
    (x + 7) & !7
}

/// Size of one `fuse_dirent` record carrying `namelen` name bytes.
pub const fn dirent_size(namelen: usize) -> usize {
    rec_align(std::mem::size_of::<Dirent>() + namelen)
}

/// Size of one `fuse_direntplus` record carrying `namelen` name bytes.
pub const fn direntplus_size(namelen: usize) -> usize {
    rec_align(std::mem::size_of::<DirentPlus>() + namelen)
}

/// Appends a `fuse_dirent` to `buf` unless it would exceed `limit` bytes in
/// total. Returns false (and leaves `buf` unchanged) when it does not fit.
pub fn push_dirent(buf: &mut Vec<u8>, limit: usize, ino: u64, off: u64, typ: u32, name: &[u8]) -> bool {
    let size = dirent_size(name.len());
    if buf.len() + size > limit {
        return false;
    }
    let d = Dirent { ino, off, namelen: name.len() as u32, typ };
    let start = buf.len();
    buf.extend_from_slice(d.as_bytes());
    buf.extend_from_slice(name);
    buf.resize(start + size, 0);
    true
}

/// Appends a `fuse_direntplus`, as [`push_dirent`] does.
pub fn push_direntplus(buf: &mut Vec<u8>, limit: usize, entry: &EntryOut, off: u64, typ: u32, name: &[u8]) -> bool {
    let size = direntplus_size(name.len());
    if buf.len() + size > limit {
        return false;
    }
    let d =
        DirentPlus { entry_out: *entry, dirent: Dirent { ino: entry.attr.ino, off, namelen: name.len() as u32, typ } };
    let start = buf.len();
    buf.extend_from_slice(d.as_bytes());
    buf.extend_from_slice(name);
    buf.resize(start + size, 0);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::FromBytes;

    #[test]
    fn dirent_layout_and_limit() {
        let mut buf = Vec::new();
        assert!(push_dirent(&mut buf, 64, 5, 1, 4, b"abc"));
        assert_eq!(buf.len(), 32);
        let (d, rest) = Dirent::read_from_prefix(&buf).unwrap();
        assert_eq!((d.ino, d.off, d.namelen, d.typ), (5, 1, 3, 4));
        assert_eq!(&rest[..3], b"abc");
        assert!(push_dirent(&mut buf, 64, 6, 2, 8, b"defgh"));
        assert!(!push_dirent(&mut buf, 64, 7, 3, 8, b"x"));
        assert_eq!(buf.len(), 64);
    }

    #[test]
    fn direntplus_size_is_aligned() {
        assert_eq!(direntplus_size(1), 160);
        assert_eq!(direntplus_size(8), 160);
        assert_eq!(direntplus_size(9), 168);
    }
}

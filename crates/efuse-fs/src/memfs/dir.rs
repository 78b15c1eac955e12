//! Directory contents: entries by name, and by insertion sequence for READDIR.
//!
//! The READDIR offset of an entry is a cookie derived from a sequence number
//! the directory hands out when the entry is inserted and never reuses, so a
//! listing resumed at a cookie after other entries came and went neither
//! repeats nor skips the entries that stayed. Cookies 1 and 2 are "." and "..".

use std::collections::BTreeMap;
use std::ops::Bound;

/// Cookie of ".".
pub(crate) const DOT_COOKIE: u64 = 1;
/// Cookie of "..".
pub(crate) const DOTDOT_COOKIE: u64 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DirEntry {
    pub(crate) ino: u64,
    /// File type bits (`S_IFREG`, ...); an inode never changes type.
    pub(crate) kind: u32,
    seq: u64,
}

impl DirEntry {
    pub(crate) fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }
}

#[derive(Debug, Default)]
pub(crate) struct Directory {
    by_name: BTreeMap<Box<[u8]>, DirEntry>,
    by_seq: BTreeMap<u64, Box<[u8]>>,
    next_seq: u64,
    /// Removed (rmdir, or replaced by rename): nothing may be created in it.
    pub(crate) unlinked: bool,
}

impl Directory {
    pub(crate) fn get(&self, name: &[u8]) -> Option<DirEntry> {
        self.by_name.get(name).copied()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Adds `name`, replacing (and returning) any entry of that name. The new
    /// entry gets a fresh cookie.
    pub(crate) fn insert(&mut self, name: &[u8], ino: u64, kind: u32) -> Option<DirEntry> {
        let old = self.remove(name);
        self.next_seq += 1;
        let seq = self.next_seq;
        self.by_name.insert(name.into(), DirEntry { ino, kind, seq });
        self.by_seq.insert(seq, name.into());
        old
    }

    pub(crate) fn remove(&mut self, name: &[u8]) -> Option<DirEntry> {
        let e = self.by_name.remove(name)?;
        self.by_seq.remove(&e.seq);
        Some(e)
    }

    /// Points an existing name at another inode, keeping its cookie (RENAME_EXCHANGE).
    pub(crate) fn repoint(&mut self, name: &[u8], ino: u64, kind: u32) -> bool {
        match self.by_name.get_mut(name) {
            Some(e) => {
                e.ino = ino;
                e.kind = kind;
                true
            }
            None => false,
        }
    }

    /// Entries whose cookie is greater than `offset`, in cookie order.
    pub(crate) fn after(&self, offset: u64) -> impl Iterator<Item = (u64, &[u8], DirEntry)> + '_ {
        let from = offset.saturating_sub(DOTDOT_COOKIE);
        self.by_seq.range((Bound::Excluded(from), Bound::Unbounded)).filter_map(move |(&seq, name)| {
            let e = self.by_name.get(name)?;
            Some((seq + DOTDOT_COOKIE, &name[..], *e))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(d: &Directory, offset: u64) -> Vec<(u64, String)> {
        d.after(offset).map(|(c, n, _)| (c, String::from_utf8_lossy(n).into_owned())).collect()
    }

    #[test]
    fn cookies_survive_changes() {
        let mut d = Directory::default();
        for (i, n) in ["a", "b", "c", "d"].iter().enumerate() {
            assert!(d.insert(n.as_bytes(), 10 + i as u64, libc::S_IFREG).is_none());
        }
        let all = names(&d, 0);
        assert_eq!(all.iter().map(|x| x.1.as_str()).collect::<Vec<_>>(), ["a", "b", "c", "d"]);
        assert!(all.iter().all(|x| x.0 > DOTDOT_COOKIE));
        // A listing read "a" and "b", then "b" and "c" went and "e" came.
        let resume = all[1].0;
        d.remove(b"b");
        d.remove(b"c");
        d.insert(b"e", 20, libc::S_IFREG);
        let rest: Vec<String> = names(&d, resume).into_iter().map(|x| x.1).collect();
        assert_eq!(rest, ["d", "e"]);
        // Resuming after "." or ".." lists every entry.
        assert_eq!(names(&d, DOT_COOKIE).len(), 3);
        assert_eq!(names(&d, DOTDOT_COOKIE).len(), 3);
        // Replacing a name gives it a new cookie at the end.
        let old = d.insert(b"a", 30, libc::S_IFDIR).unwrap();
        assert_eq!(old.ino, 10);
        assert_eq!(names(&d, 0).last().unwrap().1, "a");
        assert!(d.get(b"a").unwrap().is_dir());
        // Repointing keeps the cookie.
        let before = names(&d, 0);
        assert!(d.repoint(b"d", 40, libc::S_IFREG));
        assert_eq!(names(&d, 0), before);
        assert_eq!(d.get(b"d").unwrap().ino, 40);
        assert_eq!(names(&d, 0).len(), 3);
        // A cookie past the end lists nothing.
        assert!(names(&d, u64::MAX).is_empty());
    }
}

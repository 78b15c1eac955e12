//! The inode numbers stackfs reports (`st_ino`, `d_ino`): unique per mount
//! even when the backing tree spans several file systems.
//!
//! A FUSE mount has a single `st_dev`, so programs that find hard links by
//! (st_dev, st_ino) (tar, du, cp -a, rsync -H) would take two files of two
//! backing file systems with the same inode number for one file. So:
//!
//! - on the backing directory's own file system, `st_ino` is the backing
//!   inode number, unchanged (below 2^56, which every local Linux file system
//!   uses in practice);
//! - each further file system met below the backing directory gets an index
//!   1..=254 in the order it is met, and its inode `ino` is reported as
//!   `index << 56 | ino`;
//! - anything that does not fit (an inode number of 2^56 or more, or more
//!   than 254 further file systems) gets a number of its own from the
//!   reserved range `0xff << 56`, remembered for the life of the mount.
//!
//! The mapping is a function of (st_dev, st_ino) for the life of the mount,
//! so a node forgotten and looked up again keeps its number. The price of
//! the last case is memory: one table entry (some 40 bytes) per such inode
//! ever reported, for the life of the mount; backing trees that use the top
//! byte of inode numbers (overlayfs with `xino`, some NFS servers) pay it
//! for every file.

use std::collections::HashMap;
use std::sync::Mutex;

/// Bits of an inode number kept as is.
const LOW_BITS: u32 = 56;
const LOW_MASK: u64 = (1 << LOW_BITS) - 1;
/// The top byte that marks numbers given out one by one.
const RESERVED: u64 = 0xff;

#[derive(Default)]
struct Maps {
    /// Index of each further file system (1..=254).
    devs: HashMap<u64, u64>,
    /// Numbers given out one by one, and the next one.
    assigned: HashMap<(u64, u64), u64>,
    next: u64,
}

/// See the module documentation.
pub(super) struct InoMap {
    root_dev: u64,
    maps: Mutex<Maps>,
}

impl InoMap {
    pub(super) fn new(root_dev: u64) -> InoMap {
        InoMap { root_dev, maps: Mutex::default() }
    }

    /// The number to report for inode `ino` of device `dev`.
    pub(super) fn st_ino(&self, dev: u64, ino: u64) -> u64 {
        if dev == self.root_dev && ino <= LOW_MASK {
            return ino;
        }
        let mut m = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        if ino <= LOW_MASK && dev != self.root_dev {
            let count = m.devs.len() as u64;
            let index = match m.devs.get(&dev) {
                Some(&i) => Some(i),
                None if count < RESERVED - 1 => {
                    m.devs.insert(dev, count + 1);
                    Some(count + 1)
                }
                None => None,
            };
            if let Some(i) = index {
                return i << LOW_BITS | ino;
            }
        }
        if let Some(&n) = m.assigned.get(&(dev, ino)) {
            return n;
        }
        let n = RESERVED << LOW_BITS | (m.next & LOW_MASK);
        m.next += 1;
        m.assigned.insert((dev, ino), n);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_unique_and_stable() {
        let m = InoMap::new(10);
        assert_eq!(m.st_ino(10, 1234), 1234);
        let a = m.st_ino(20, 1234);
        let b = m.st_ino(30, 1234);
        assert_ne!(a, 1234);
        assert_ne!(a, b);
        assert_eq!(m.st_ino(20, 1234), a);
        assert_eq!(a, 1 << 56 | 1234);
        // Too large to carry a device index: one by one, remembered.
        let big = 1u64 << 60;
        let x = m.st_ino(10, big);
        let y = m.st_ino(20, big);
        assert_ne!(x, y);
        assert_eq!(m.st_ino(10, big), x);
        assert_eq!(x >> 56, RESERVED);
        for n in [1234, a, b] {
            assert_ne!(x, n);
            assert_ne!(y, n);
        }
    }

    #[test]
    fn many_devices_stay_unique() {
        let m = InoMap::new(0);
        let mut seen = std::collections::HashSet::new();
        for dev in 1..400u64 {
            assert!(seen.insert(m.st_ino(dev, 7)), "device {dev}");
        }
    }
}

//! Metadata tables shared by the clients of one set of credentials.
//!
//! What a client may learn from a table (names, attributes) depends only on
//! the credentials the daemon judges it by: the same file-system uid and
//! gid, supplementary groups and capabilities give the same answers to
//! every permission check. So the clients of one set share one table: a
//! memfd the daemon maps read-write and each client maps read-only (sealed
//! against new writable mappings), and a new process of a user finds what
//! the user's earlier processes resolved, as the kernel's dentry cache is
//! warm for it. Per mount at most [`MAX_TABLES`] tables; one without
//! clients stays for [`TABLE_IDLE`] (the next process of that user starts
//! warm), then goes, forgetting the lookups it pinned.
//!
//! Only the daemon writes a table (the clients' mappings are read-only), so
//! a WALK may go through names the table already has without asking the
//! file system, as the kernel's path walk goes through its dentries.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use efuse_bypass::table::Publisher;
use efuse_bypass::TableMap;

use crate::changes::{Change as Told, ChangeListener, Changes};

use super::perm::Creds;
use super::TABLE_BUCKETS;

/// Tables per mount at most (one per set of credentials in use).
pub const MAX_TABLES: usize = 16;
/// How long a table without clients stays.
pub const TABLE_IDLE: Duration = Duration::from_secs(30);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The credentials a table is for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    caps: u64,
}

impl Key {
    fn of(c: &Creds) -> Key {
        let mut groups = c.groups.clone();
        groups.sort_unstable();
        groups.dedup();
        Key { uid: c.uid, gid: c.gid, groups, caps: c.caps }
    }
}

/// One table: its memfd (passed to each client), the daemon's mapping, and
/// the publisher that keeps it.
pub(crate) struct SharedTable {
    memfd: OwnedFd,
    _map: TableMap,
    pub(crate) publisher: Arc<Mutex<Publisher>>,
    ear: Arc<dyn ChangeListener>,
    /// WALKs going through the table's entries now: the lookups of entries
    /// that went are forgotten only when none is (a walk may stand on a
    /// node only the table pinned).
    pub(crate) walkers: Arc<std::sync::atomic::AtomicU32>,
}

impl SharedTable {
    pub(crate) fn fd(&self) -> RawFd {
        self.memfd.as_raw_fd()
    }
}

struct Entry {
    key: Key,
    table: Arc<SharedTable>,
    users: u32,
    idle_since: Instant,
}

/// The tables of one mount.
#[derive(Default)]
pub(crate) struct Registry {
    entries: Mutex<Vec<Entry>>,
}

/// A client's use of a table; the table counts it until dropped.
pub(crate) struct Lease {
    registry: Arc<Registry>,
    pub(crate) table: Arc<SharedTable>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut es = lock(&self.registry.entries);
        if let Some(e) = es.iter_mut().find(|e| Arc::ptr_eq(&e.table, &self.table)) {
            e.users = e.users.saturating_sub(1);
            if e.users == 0 {
                e.idle_since = Instant::now();
            }
        }
    }
}

impl Registry {
    /// The table for a client with credentials `creds`, made if there is
    /// none; with it, the nodes whose lookups a table evicted to make room
    /// had pinned (the caller forgets them in the file system). None: no
    /// table (the limit is reached with every table in use, or memory for
    /// one cannot be had); the client works without one.
    pub(crate) fn lease(self: &Arc<Self>, creds: &Creds, changes: &Changes) -> (Option<Lease>, Vec<u64>) {
        let key = Key::of(creds);
        let mut es = lock(&self.entries);
        if let Some(e) = es.iter_mut().find(|e| e.key == key) {
            e.users += 1;
            return (Some(Lease { registry: self.clone(), table: e.table.clone() }), Vec::new());
        }
        let mut freed = Vec::new();
        if es.len() >= MAX_TABLES {
            // The table idle longest goes.
            let Some(k) =
                es.iter().enumerate().filter(|(_, e)| e.users == 0).min_by_key(|(_, e)| e.idle_since).map(|(k, _)| k)
            else {
                return (None, freed);
            };
            let e = es.swap_remove(k);
            freed = retire(&e.table, changes);
        }
        let (memfd, map) = match TableMap::create(TABLE_BUCKETS) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("bypass: cannot create a metadata table: {e}");
                return (None, freed);
            }
        };
        let publisher = Arc::new(Mutex::new(Publisher::new(map.table())));
        let ear: Arc<dyn ChangeListener> = Arc::new(TableEar { table: publisher.clone() });
        changes.listen(ear.clone());
        let table = Arc::new(SharedTable { memfd, _map: map, publisher, ear, walkers: Arc::default() });
        es.push(Entry { key, table: table.clone(), users: 1, idle_since: Instant::now() });
        (Some(Lease { registry: self.clone(), table }), freed)
    }

    /// Periodic work (the accept thread's): tables idle for
    /// [`TABLE_IDLE`] go; every table hands back the nodes of entries that
    /// went (changes told while no client drained it). Returns the nodes
    /// whose lookups the caller forgets in the file system.
    /// With `all_idle`, every table without clients goes now.
    pub(crate) fn tick(&self, changes: &Changes, all_idle: bool) -> Vec<u64> {
        let mut es = lock(&self.entries);
        let mut nodes = Vec::new();
        let mut k = 0;
        while k < es.len() {
            if es[k].users == 0 && (all_idle || es[k].idle_since.elapsed() >= TABLE_IDLE) {
                let e = es.swap_remove(k);
                nodes.extend(retire(&e.table, changes));
                continue;
            }
            if es[k].table.walkers.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                nodes.extend(lock(&es[k].table.publisher).take_dropped());
            }
            k += 1;
        }
        nodes
    }

    /// Every table goes (the server stops); their pinned nodes.
    pub(crate) fn clear(&self, changes: &Changes) -> Vec<u64> {
        let mut es = lock(&self.entries);
        es.drain(..).flat_map(|e| retire(&e.table, changes)).collect()
    }

    /// Tables now (for tests and counters).
    pub(crate) fn len(&self) -> usize {
        lock(&self.entries).len()
    }
}

/// A table leaves the registry: it stops listening and empties; the nodes
/// it pinned are returned. (Clients still mapping it see an empty table.)
fn retire(t: &SharedTable, changes: &Changes) -> Vec<u64> {
    changes.unlisten(&t.ear);
    let mut p = lock(&t.publisher);
    p.forget_all();
    p.take_dropped()
}

/// Keeps a table exact: every change the session answers clears what it
/// makes wrong, before its reply goes out.
struct TableEar {
    table: Arc<Mutex<Publisher>>,
}

impl ChangeListener for TableEar {
    fn changed(&self, changes: &[Told]) {
        let mut t = lock(&self.table);
        for c in changes {
            match c {
                Told::Name { parent, name } => t.forget_name(*parent, name),
                Told::Node { nodeid } => t.forget_node(*nodeid),
                Told::All => t.forget_all(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use efuse_bypass::table::Published;

    fn creds(uid: u32, groups: &[u32]) -> Creds {
        Creds { uid, gid: uid, pid: 1, groups: groups.to_vec(), caps: 0 }
    }

    fn entry(parent: u64, nodeid: u64) -> Published {
        Published::lasting(parent, nodeid, Default::default())
    }

    #[test]
    fn clients_with_the_same_credentials_share_one_table_and_others_do_not() {
        let r = Arc::new(Registry::default());
        let changes = Changes::default();
        let (a, _) = r.lease(&creds(1000, &[5, 4]), &changes);
        let (b, _) = r.lease(&creds(1000, &[4, 5, 4]), &changes);
        let (c, _) = r.lease(&creds(1000, &[4]), &changes);
        let (d, _) = r.lease(&creds(1001, &[4, 5]), &changes);
        let (a, b, c, d) = (a.expect("a"), b.expect("b"), c.expect("c"), d.expect("d"));
        assert!(Arc::ptr_eq(&a.table, &b.table), "same ids and groups (in any order): one table");
        assert!(!Arc::ptr_eq(&a.table, &c.table), "other groups: another table");
        assert!(!Arc::ptr_eq(&a.table, &d.table), "another uid: another table");
        assert_eq!(r.len(), 3);
        // What one client publishes, the other's mapping shows.
        let e = lock(&a.table.publisher).epoch();
        assert!(lock(&a.table.publisher).publish(e, b"x", &entry(1, 7)));
        let other = TableMap::map(b.table.fd(), TABLE_BUCKETS, false).expect("map read-only");
        assert_eq!(other.table().find(1, b"x", 0).map(|(_, p)| p.nodeid), Some(7));
        // A change told to the session clears it before anything else.
        changes.tell(&[Told::Node { nodeid: 7 }]);
        assert!(other.table().find(1, b"x", 0).is_none());
        assert_eq!(r.tick(&changes, false), vec![7], "the dropped entry's lookup is handed back");
    }

    #[test]
    fn past_the_limit_the_longest_idle_table_goes_with_its_lookups() {
        let r = Arc::new(Registry::default());
        let changes = Changes::default();
        let mut held = Vec::new();
        for uid in 0..MAX_TABLES as u32 {
            let (l, freed) = r.lease(&creds(uid, &[]), &changes);
            assert!(freed.is_empty());
            let l = l.expect("a table");
            let e = lock(&l.table.publisher).epoch();
            assert!(lock(&l.table.publisher).publish(e, b"n", &entry(1, 100 + uid as u64)));
            held.push(l);
        }
        // Every table in use: a new set of credentials gets none.
        let (none, freed) = r.lease(&creds(999, &[]), &changes);
        assert!(none.is_none() && freed.is_empty());
        // Two go idle; the first to go idle is the one replaced.
        let second = held.remove(3);
        let first = held.remove(2);
        drop(first);
        std::thread::sleep(Duration::from_millis(2));
        drop(second);
        let (l, freed) = r.lease(&creds(999, &[]), &changes);
        assert!(l.is_some());
        assert_eq!(freed, vec![102], "the evicted table's pinned lookup");
        assert_eq!(r.len(), MAX_TABLES);
        let (_, freed) = r.lease(&creds(3, &[]), &changes);
        assert!(freed.is_empty(), "uid 3's idle table is still there");
        let all = r.clear(&changes);
        assert_eq!(all.len(), MAX_TABLES - 1, "every pinned lookup (uid 999 published none): {all:?}");
    }
}

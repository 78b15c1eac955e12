//! WALK: a relative path resolved in one round trip, as the kernel's path
//! walk resolves it (search permission on every directory, symbolic links
//! followed, the kernel's errors), each step a LOOKUP or READLINK through
//! the session. The walk never leaves the node it started from upwards and
//! never follows an absolute link: it answers LEFT and the client resolves
//! the path through the kernel.

use efuse_abi::structs::{Attr, EntryOut};
use efuse_bypass::wire::{self, walk as flag, WalkIn, WalkOut};
use zerocopy::FromBytes;

use super::client::Client;
use super::perm::{self, MAY_EXEC};
use crate::filesystem::Filesystem;
use efuse_abi::ROOT_ID;

const NAME_MAX: usize = 255;

/// What the walk found: the final node, or that the path leaves the tree.
enum Found {
    Done(EntryOut),
    Left,
}

/// Serves a WALK whose arguments (after the header) are `body`.
pub(super) fn walk<F: Filesystem>(c: &mut Client<F>, start: u64, body: &[u8]) -> Result<WalkOut, i32> {
    let (arg, path) = WalkIn::read_from_prefix(body).map_err(|_| libc::EIO)?;
    if arg.path_len as usize != path.len() {
        return Err(libc::EIO);
    }
    if path.len() > wire::WALK_PATH_MAX {
        return Err(libc::ENAMETOOLONG);
    }
    // An empty path names the start itself (the mount's root, for the
    // client): open("") is the client's to refuse, as the kernel does.
    if !c.holds(start) {
        return Err(libc::ENOENT);
    }
    // Every lookup the walk made, to forget but for the one the client keeps
    // (lookups handed to the client's table are not in it).
    let mut looked: Vec<u64> = Vec::new();
    let mut last: Option<(u64, Vec<u8>)> = None;
    // Until the walk is done no lookup an entry pinned is forgotten: it
    // may go through nodes only the table holds.
    let _walking = c.walking();
    let found = resolve(c, start, arg.flags, path, &mut looked, &mut last);
    let mut keep = None;
    if let Ok(Found::Done(e)) = &found {
        if arg.flags & flag::NO_KEEP == 0 {
            keep = Some(e.nodeid);
        }
    }
    if let Some(id) = keep {
        match looked.iter().position(|n| *n == id) {
            Some(i) => {
                looked.swap_remove(i);
                c.keep_lookup(id);
            }
            None => match last {
                // The table took the walk's lookup of it: one more for the client.
                Some((parent, name)) if id != start => match c.lookup(parent, &name) {
                    Ok(e) if e.nodeid == id => c.keep_lookup(id),
                    Ok(e) => {
                        c.fs_forget(e.nodeid, 1);
                        keep_failed(c, &looked);
                        return Err(libc::ESTALE);
                    }
                    Err(e) => {
                        keep_failed(c, &looked);
                        return Err(e);
                    }
                },
                // The walk ended where it began: the client holds it already.
                _ => c.keep_extra(id),
            },
        }
    }
    looked.sort_unstable();
    for run in looked.chunk_by(|a, b| a == b) {
        c.fs_forget(run[0], run.len() as u64);
    }
    let zero = EntryOut::default();
    match found? {
        Found::Done(entry) => Ok(WalkOut { status: flag::DONE, _pad: 0, entry }),
        Found::Left => Ok(WalkOut { status: flag::LEFT, _pad: 0, entry: zero }),
    }
}

/// Forgets the walk's lookups when it fails at the end.
fn keep_failed<F: Filesystem>(c: &Client<F>, looked: &[u64]) {
    for n in looked {
        c.fs_forget(*n, 1);
    }
}

fn resolve<F: Filesystem>(
    c: &Client<F>,
    start: u64,
    flags: u32,
    path: &[u8],
    looked: &mut Vec<u64>,
    last: &mut Option<(u64, Vec<u8>)>,
) -> Result<Found, i32> {
    // The root as the table has it (every walk of the client starts there).
    if start == ROOT_ID {
        if let Some(root) = c.known(0, b"/") {
            if root.nodeid == ROOT_ID {
                return walk_from(c, root, flags, path, looked, last);
            }
        }
    }
    let epoch = c.epoch();
    let start_out = c.attr_out(start)?;
    let start_attr = start_out.attr;
    if start == ROOT_ID {
        // The root, for the client's own walks: "/" in no directory.
        let mut root = synth(start, start_attr);
        root.entry_valid = start_out.attr_valid;
        root.entry_valid_nsec = start_out.attr_valid_nsec;
        root.attr_valid = start_out.attr_valid;
        root.attr_valid_nsec = start_out.attr_valid_nsec;
        c.publish(epoch, 0, b"/", &root);
    }
    walk_from(c, synth(start, start_attr), flags, path, looked, last)
}

/// The walk from `cur` (the start node).
fn walk_from<F: Filesystem>(
    c: &Client<F>,
    mut cur: EntryOut,
    flags: u32,
    path: &[u8],
    looked: &mut Vec<u64>,
    last: &mut Option<(u64, Vec<u8>)>,
) -> Result<Found, i32> {
    // How `cur` was reached: (directory, name); None for the start.
    let mut cur_name: Option<(u64, Vec<u8>)> = None;
    // Directories above `cur` within this walk, for "..", and their names.
    let mut above: Vec<EntryOut> = Vec::new();
    let mut above_names: Vec<Option<(u64, Vec<u8>)>> = Vec::new();
    // Components still to walk, last first.
    let mut pending: Vec<Vec<u8>> = path.split(|b| *b == b'/').rev().map(|s| s.to_vec()).collect();
    let mut links = 0u32;
    while let Some(name) = pending.pop() {
        if name.is_empty() {
            continue;
        }
        if !perm::is_dir(&cur.attr) {
            return Err(libc::ENOTDIR);
        }
        perm::permission(c.creds(), &cur.attr, MAY_EXEC)?;
        if name == b"." {
            continue;
        }
        if name == b".." {
            match above.pop() {
                Some(up) => {
                    cur = up;
                    cur_name = above_names.pop().flatten();
                }
                None => return Ok(Found::Left),
            }
            continue;
        }
        if name.len() > NAME_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        // A name the table has (and pins) needs no lookup: the kernel's
        // walk would find it in its dentries just so.
        let e = match c.known(cur.nodeid, &name) {
            Some(e) if e.nodeid == 0 => return Err(libc::ENOENT),
            Some(e) => e,
            None => {
                let epoch = c.epoch();
                let e = c.lookup_entry(cur.nodeid, &name)?;
                if e.nodeid == 0 {
                    // A miss the file system lets be cached: so does the table.
                    c.publish(epoch, cur.nodeid, &name, &e);
                    return Err(libc::ENOENT);
                }
                if !c.publish(epoch, cur.nodeid, &name, &e) {
                    looked.push(e.nodeid);
                }
                e
            }
        };
        let last = pending.iter().all(|p| p.is_empty());
        let trailing_slash = last && !pending.is_empty();
        let follow = !last || flags & (flag::FOLLOW_LAST | flag::DIRECTORY) != 0 || trailing_slash;
        if perm::is_symlink(&e.attr) && follow {
            links += 1;
            if links > wire::WALK_MAX_LINKS {
                return Err(libc::ELOOP);
            }
            let target = c.readlink(e.nodeid)?;
            if target.is_empty() {
                return Err(libc::ENOENT);
            }
            if target[0] == b'/' {
                return Ok(Found::Left);
            }
            // The target's components come next, from the link's directory.
            pending.extend(target.split(|b| *b == b'/').rev().map(|s| s.to_vec()));
            continue;
        }
        above_names.push(cur_name.replace((cur.nodeid, name)));
        above.push(std::mem::replace(&mut cur, e));
    }
    if (flags & flag::DIRECTORY != 0 || path.ends_with(b"/")) && !perm::is_dir(&cur.attr) {
        return Err(libc::ENOTDIR);
    }
    *last = cur_name;
    Ok(Found::Done(cur))
}

/// An entry for a node the walk did not look up (where it started).
fn synth(nodeid: u64, attr: Attr) -> EntryOut {
    EntryOut { nodeid, generation: 0, entry_valid: 0, attr_valid: 0, entry_valid_nsec: 0, attr_valid_nsec: 0, attr }
}

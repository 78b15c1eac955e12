//! Path classification: which mount a path is on and what is left of it
//! below the mount's root. Purely lexical: `.` components and repeated
//! slashes go, `..` stays (only the daemon's walk can resolve it, because
//! a symbolic link may come before it), so a path that uses `..` to reach
//! a mount from outside simply goes to the kernel.

/// `s` without trailing slashes ("/" stays "/").
pub fn trim_slashes(s: &[u8]) -> &[u8] {
    let mut end = s.len();
    while end > 1 && s[end - 1] == b'/' {
        end -= 1;
    }
    &s[..end]
}

/// An absolute path made lexically tidy.
#[derive(Debug, PartialEq, Eq)]
pub struct Tidy {
    /// "/a/b" (no `.`, no empty components, no trailing slash; "/" alone
    /// for the root).
    pub path: Vec<u8>,
    /// The original ended with a slash (or "/."): it must name a directory.
    pub dir: bool,
}

/// Tidies `base` (an absolute directory, e.g. the cwd) joined with `rel`
/// (absolute `rel` ignores `base`).
pub fn tidy(base: &[u8], rel: &[u8]) -> Tidy {
    let mut path = Vec::with_capacity(base.len() + rel.len() + 1);
    let mut dir = false;
    let parts: [&[u8]; 2] = if rel.first() == Some(&b'/') { [b"", rel] } else { [base, rel] };
    for part in parts {
        for c in part.split(|b| *b == b'/') {
            if c.is_empty() || c == b"." {
                continue;
            }
            path.push(b'/');
            path.extend_from_slice(c);
        }
    }
    if let Some(last) = rel.rsplit(|b| *b == b'/').next() {
        dir = rel.ends_with(b"/") || (last == b"." || last == b"..");
    }
    if path.is_empty() {
        path.push(b'/');
    }
    Tidy { path, dir }
}

/// The longest of `points` (tidy mount points) that contains `path`, and
/// the rest of `path` below it (no leading slash; empty for the mount's
/// root).
pub fn longest_prefix<'a, P: AsRef<[u8]>>(points: &[P], path: &'a [u8]) -> Option<(usize, &'a [u8])> {
    let mut best: Option<(usize, usize)> = None;
    for (i, p) in points.iter().enumerate() {
        let p = p.as_ref();
        let inside =
            if p == b"/" { true } else { path.starts_with(p) && (path.len() == p.len() || path[p.len()] == b'/') };
        if inside && best.is_none_or(|(_, l)| p.len() > l) {
            best = Some((i, p.len()));
        }
    }
    best.map(|(i, l)| {
        let rest = &path[l.min(path.len())..];
        let rest = rest.strip_prefix(b"/").unwrap_or(rest);
        (i, rest)
    })
}

/// Does the path's last component (trailing slashes aside) read `.` or
/// `..`? Such a name cannot be created, removed or renamed: the kernel
/// answers EEXIST, EINVAL, EBUSY or ENOTEMPTY, which lexical tidying would
/// lose.
pub fn ends_with_dots(p: &[u8]) -> bool {
    let last = trim_slashes(p).rsplit(|b| *b == b'/').next().unwrap_or(b"");
    last == b"." || last == b".."
}

/// Splits a relative path into its parent and last component; None when
/// the last component cannot be created or removed by name (empty, `.`,
/// `..`).
pub fn parent_and_name(rest: &[u8]) -> Option<(&[u8], &[u8])> {
    let (parent, name) = match rest.iter().rposition(|b| *b == b'/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (&b""[..], rest),
    };
    if name.is_empty() || name == b"." || name == b".." {
        return None;
    }
    Some((parent, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tidy_joins_and_drops_dots_but_keeps_dotdot() {
        assert_eq!(tidy(b"/home/u", b"a//b/./c").path, b"/home/u/a/b/c");
        assert_eq!(tidy(b"/home/u", b"/x/../y/").path, b"/x/../y");
        assert!(tidy(b"/home/u", b"/x/y/").dir);
        assert!(tidy(b"/", b"x/.").dir);
        assert!(!tidy(b"/", b"x/y").dir);
        assert_eq!(tidy(b"/", b".").path, b"/");
        assert_eq!(tidy(b"/a", b"").path, b"/a");
    }

    #[test]
    fn longest_mount_wins_and_prefixes_need_a_slash() {
        let points: Vec<&[u8]> = vec![b"/", b"/mnt/e", b"/mnt/e/inner", b"/mnt/ee"];
        assert_eq!(longest_prefix(&points, b"/mnt/e/f/g"), Some((1, &b"f/g"[..])));
        assert_eq!(longest_prefix(&points, b"/mnt/e"), Some((1, &b""[..])));
        assert_eq!(longest_prefix(&points, b"/mnt/e/inner/x"), Some((2, &b"x"[..])));
        assert_eq!(longest_prefix(&points, b"/mnt/eee/x"), Some((0, &b"mnt/eee/x"[..])));
        assert_eq!(longest_prefix(&points, b"/mnt/ee"), Some((3, &b""[..])));
        let none: Vec<&[u8]> = vec![b"/mnt/e"];
        assert_eq!(longest_prefix(&none, b"/etc/passwd"), None);
    }

    #[test]
    fn parent_and_name_refuses_dots() {
        assert_eq!(parent_and_name(b"a/b/c"), Some((&b"a/b"[..], &b"c"[..])));
        assert_eq!(parent_and_name(b"c"), Some((&b""[..], &b"c"[..])));
        assert_eq!(parent_and_name(b"a/.."), None);
        assert_eq!(parent_and_name(b""), None);
        assert_eq!(trim_slashes(b"/a//"), b"/a");
        assert_eq!(trim_slashes(b"//"), b"/");
    }

    #[test]
    fn dots_at_the_end_are_seen_through_trailing_slashes() {
        for p in [&b"."[..], b"..", b"d/.", b"d/./", b"/a/b/..//", b"./."] {
            assert!(ends_with_dots(p), "{}", String::from_utf8_lossy(p));
        }
        for p in [&b"d"[..], b"d/", b"./d", b"../d/", b"/", b"a.", b"..a"] {
            assert!(!ends_with_dots(p), "{}", String::from_utf8_lossy(p));
        }
    }
}

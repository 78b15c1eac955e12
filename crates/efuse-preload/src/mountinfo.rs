//! Parsing /proc/self/mountinfo: every mount's point, device, type and the
//! `user_id=` of FUSE mounts (the daemon's uid, whose runtime directory
//! holds the bypass socket).

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountLine {
    /// The mount point, unescaped (\040 and friends), without trailing slash
    /// (the root is "/").
    pub point: Vec<u8>,
    /// st_dev of files on the mount.
    pub dev: u64,
    /// The file system type ("fuse", "fuse.efuse", "ext4", ...).
    pub fstype: Vec<u8>,
    /// `user_id=` of the super block options (FUSE mounts).
    pub user_id: Option<u32>,
}

impl MountLine {
    /// A FUSE mount (`fuse` or `fuse.SUBTYPE`)?
    pub fn is_fuse(&self) -> bool {
        self.fstype == b"fuse" || self.fstype.starts_with(b"fuse.")
    }
}

/// Undoes the kernel's octal escapes (`\040` space, `\011` tab, `\012`
/// newline, `\134` backslash).
pub fn unescape(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\' && i + 3 < s.len() && s[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (s[i + 1] - b'0') as u32 * 64 + (s[i + 2] - b'0') as u32 * 8 + (s[i + 3] - b'0') as u32;
            if v <= 255 {
                out.push(v as u8);
                i += 4;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// Parses one line; None for a line that does not have mountinfo's shape.
pub fn parse_line(line: &[u8]) -> Option<MountLine> {
    let fields: Vec<&[u8]> = line.split(|b| *b == b' ').filter(|f| !f.is_empty()).collect();
    if fields.len() < 7 {
        return None;
    }
    let devs = std::str::from_utf8(fields[2]).ok()?;
    let (maj, min) = devs.split_once(':')?;
    let (maj, min): (u32, u32) = (maj.parse().ok()?, min.parse().ok()?);
    let point = unescape(fields[4]);
    let sep = fields.iter().skip(6).position(|f| *f == b"-")? + 6;
    let fstype = unescape(fields.get(sep + 1)?);
    let super_opts = fields.get(sep + 3).copied().unwrap_or(b"");
    let user_id = super_opts
        .split(|b| *b == b',')
        .find_map(|o| o.strip_prefix(b"user_id="))
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok());
    let point = crate::paths::trim_slashes(&point).to_vec();
    if point.first() != Some(&b'/') {
        return None;
    }
    Some(MountLine { point, dev: libc::makedev(maj, min), fstype, user_id })
}

/// Parses a whole mountinfo text.
pub fn parse(text: &[u8]) -> Vec<MountLine> {
    text.split(|b| *b == b'\n').filter_map(parse_line).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_with_escapes_and_optional_fields() {
        let text = b"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
            40 22 0:45 / /mnt/my\\040disk rw,nosuid,nodev,relatime shared:20 master:3 - fuse.efuse memfs rw,user_id=1000,group_id=1000\n\
            41 22 0:46 / /mnt/x rw - fuse /dev/fuse rw,user_id=0,group_id=0,default_permissions\n\
            garbage\n";
        let m = parse(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].point, b"/");
        assert!(!m[0].is_fuse());
        assert_eq!(m[1].point, b"/mnt/my disk");
        assert_eq!(m[1].fstype, b"fuse.efuse");
        assert_eq!(m[1].user_id, Some(1000));
        assert_eq!(m[1].dev, libc::makedev(0, 45));
        assert!(m[1].is_fuse());
        assert_eq!(m[2].user_id, Some(0));
        assert!(m[2].is_fuse());
    }

    #[test]
    fn unescape_handles_backslash_tab_newline_and_broken_escapes() {
        assert_eq!(unescape(b"a\\134b\\011c\\012d"), b"a\\b\tc\nd");
        assert_eq!(unescape(b"end\\04"), b"end\\04");
        assert_eq!(unescape(b"x\\999"), b"x\\999");
    }
}

//! Mounting and unmounting: mount(2) with `fd=` when privileged, fusermount3
//! otherwise; finding a mount's FUSE connection; cleaning up after a dead daemon.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Mount options (`-o`).
#[derive(Debug, Clone, Default)]
pub struct MountOptions {
    /// Shown as the mount's source (`fsname=`).
    pub fsname: String,
    /// Shown in the type as `fuse.<subtype>`.
    pub subtype: String,
    /// Let other users access the mount.
    pub allow_other: bool,
    /// The kernel checks permissions from the attributes.
    pub default_permissions: bool,
    pub read_only: bool,
}

impl MountOptions {
    /// Parses a comma-separated `-o` list. `debug` is returned separately
    /// since it is a daemon setting, not a kernel one.
    pub fn parse_list(&mut self, list: &str) -> Result<bool, MountError> {
        let mut debug = false;
        for opt in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match opt {
                "allow_other" => self.allow_other = true,
                "default_permissions" => self.default_permissions = true,
                "ro" => self.read_only = true,
                "rw" => self.read_only = false,
                "debug" => debug = true,
                o if o.starts_with("fsname=") => self.fsname = o["fsname=".len()..].to_string(),
                o if o.starts_with("subtype=") => self.subtype = o["subtype=".len()..].to_string(),
                other => return Err(MountError::UnknownOption(other.to_string())),
            }
        }
        Ok(debug)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("unknown mount option '{0}' (known: allow_other, default_permissions, ro, rw, debug, fsname=, subtype=)")]
    UnknownOption(String),
    #[error("mount point {0}: {1}")]
    BadMountpoint(PathBuf, String),
    #[error("{0} is already a FUSE mount; run `efuse umount {0}` first")]
    AlreadyMounted(PathBuf),
    #[error("cannot open /dev/fuse: {0}")]
    DevFuse(io::Error),
    #[error("mount(2) on {0} failed: {1}")]
    Mount(PathBuf, io::Error),
    #[error("fusermount3: {0}")]
    Fusermount(String),
    #[error("mounting as a regular user needs fusermount3, which is not installed (install the fuse3 package, or mount as root)")]
    FusermountMissing,
    #[error("{p} is not setuid root, so it cannot mount for a regular user (as root: chown root:root {p} && chmod u+s {p}; or mount as root)", p = .0.display())]
    FusermountNotSetuid(PathBuf),
    #[error("fusermount3 refused to mount {}: {said}", .mountpoint.display())]
    FusermountRefused { mountpoint: PathBuf, said: String },
}

/// A live mount: the session's /dev/fuse descriptor and how to undo it.
#[derive(Debug)]
pub struct Mounted {
    pub mountpoint: PathBuf,
    pub fd: OwnedFd,
    /// Mounted by mount(2) (as root) rather than by fusermount3.
    pub privileged: bool,
}

fn cstring(p: &OsStr) -> io::Result<CString> {
    CString::new(p.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Fields `fusermount3` and mount(2) cannot take literally.
fn check_opt_value(what: &str, v: &str) -> Result<(), MountError> {
    if v.contains(',') || v.contains('\0') {
        return Err(MountError::UnknownOption(format!("{what}={v} (commas are not allowed)")));
    }
    Ok(())
}

/// Mounts a FUSE file system at `mountpoint`. The kernel sends INIT on the
/// returned descriptor; nothing is served until the caller answers it.
pub fn mount(mountpoint: &Path, opts: &MountOptions) -> Result<Mounted, MountError> {
    check_opt_value("fsname", &opts.fsname)?;
    check_opt_value("subtype", &opts.subtype)?;
    let meta = std::fs::metadata(mountpoint)
        .map_err(|e| MountError::BadMountpoint(mountpoint.to_path_buf(), e.to_string()))?;
    if !meta.is_dir() {
        return Err(MountError::BadMountpoint(mountpoint.to_path_buf(), "not a directory".into()));
    }
    if let Some(m) = find_mount(mountpoint) {
        if m.fstype.starts_with("fuse") {
            return Err(MountError::AlreadyMounted(mountpoint.to_path_buf()));
        }
    }
    if is_root() {
        mount_syscall(mountpoint, opts, &meta)
    } else {
        mount_fusermount(mountpoint, opts)
    }
}

fn mount_syscall(mountpoint: &Path, opts: &MountOptions, meta: &std::fs::Metadata) -> Result<Mounted, MountError> {
    use std::os::unix::fs::MetadataExt;
    let dev = CString::new("/dev/fuse").expect("static string has no NUL");
    // SAFETY: open(2) on a NUL-terminated path; the result is checked.
    let raw = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(MountError::DevFuse(io::Error::last_os_error()));
    }
    // SAFETY: raw is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data =
        format!("fd={},rootmode={:o},user_id={uid},group_id={gid}", fd.as_raw_fd(), meta.mode() & libc::S_IFMT);
    if opts.allow_other {
        data.push_str(",allow_other");
    }
    if opts.default_permissions {
        data.push_str(",default_permissions");
    }
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if opts.read_only {
        flags |= libc::MS_RDONLY;
    }
    let fstype = if opts.subtype.is_empty() { "fuse".to_string() } else { format!("fuse.{}", opts.subtype) };
    let c = |s: &str| CString::new(s).map_err(|_| MountError::UnknownOption(s.to_string()));
    let (source, fstype, data) = (c(&opts.fsname)?, c(&fstype)?, c(&data)?);
    let target = cstring(mountpoint.as_os_str()).map_err(|e| MountError::Mount(mountpoint.to_path_buf(), e))?;
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, data.as_ptr().cast()) };
    if rc != 0 {
        return Err(MountError::Mount(mountpoint.to_path_buf(), io::Error::last_os_error()));
    }
    Ok(Mounted { mountpoint: mountpoint.to_path_buf(), fd, privileged: true })
}

/// The environment variable through which fusermount3 learns which of its
/// descriptors is the socket to send the /dev/fuse descriptor on (libfuse's
/// `FUSE_COMMFD_ENV`). Without it fusermount3 refuses with "old style
/// mounting not supported". The protocol has no version variable: one
/// SCM_RIGHTS message with one byte of data, then fusermount3 exits.
const COMMFD_ENV: &str = "_FUSE_COMMFD";

/// Where libfuse looks for fusermount3 before searching PATH.
const FUSERMOUNT_DIRS: [&str; 2] = ["/usr/bin", "/bin"];

/// The fusermount3 to run, checked to be able to mount for us: found (the
/// install directories first, as libfuse does, then PATH) and setuid root,
/// or carrying file capabilities.
pub fn fusermount_program() -> Result<PathBuf, MountError> {
    let path_dirs = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
    let found = FUSERMOUNT_DIRS
        .iter()
        .map(PathBuf::from)
        .chain(path_dirs)
        .map(|d| d.join("fusermount3"))
        .find(|p| p.is_file())
        .ok_or(MountError::FusermountMissing)?;
    check_fusermount(&found)?;
    Ok(found)
}

/// Whether `prog` can gain the privilege to mount: setuid root, or file
/// capabilities (`security.capability`), which some distributions use instead.
fn check_fusermount(prog: &Path) -> Result<(), MountError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(prog).map_err(|e| MountError::Fusermount(format!("{}: {e}", prog.display())))?;
    if meta.uid() == 0 && meta.mode() & libc::S_ISUID != 0 {
        return Ok(());
    }
    let c = cstring(prog.as_os_str()).map_err(|e| MountError::Fusermount(e.to_string()))?;
    // SAFETY: NUL-terminated names; a zero-length buffer only asks for the size.
    let caps = unsafe { libc::getxattr(c.as_ptr(), c"security.capability".as_ptr(), std::ptr::null_mut(), 0) };
    if caps > 0 {
        return Ok(());
    }
    Err(MountError::FusermountNotSetuid(prog.to_path_buf()))
}

/// Appends `key` and `value` to a fusermount3 `-o` list, escaping in the
/// value what fusermount3 would otherwise split on or unescape (libfuse's
/// `fuse_opt_add_opt_escaped`).
fn push_escaped(list: &mut Vec<String>, key: &str, value: &str) {
    let mut s = String::with_capacity(key.len() + value.len() + 1);
    s.push_str(key);
    for c in value.chars() {
        if c == ',' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    list.push(s);
}

/// The `-o` list for fusermount3.
fn fusermount_options(opts: &MountOptions) -> String {
    let mut o = Vec::new();
    push_escaped(&mut o, "fsname=", &opts.fsname);
    if !opts.subtype.is_empty() {
        push_escaped(&mut o, "subtype=", &opts.subtype);
    }
    if opts.allow_other {
        o.push("allow_other".into());
    }
    if opts.default_permissions {
        o.push("default_permissions".into());
    }
    if opts.read_only {
        o.push("ro".into());
    }
    o.push("nosuid".into());
    o.push("nodev".into());
    o.join(",")
}

/// Mounts through fusermount3, as libfuse does for an unprivileged caller:
/// a socket pair, one end passed to fusermount3 as `_FUSE_COMMFD`; it opens
/// /dev/fuse, mounts, sends the descriptor back over the socket and exits.
/// We wait for the descriptor (or for end of file: fusermount3 exited without
/// sending one), then reap fusermount3. Its stderr is kept: when it refuses,
/// its own words are the error.
fn mount_fusermount(mountpoint: &Path, opts: &MountOptions) -> Result<Mounted, MountError> {
    use std::io::Read;
    let prog = fusermount_program()?;
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair writes two descriptors into the array; both are
    // close-on-exec so no other child of this process inherits them.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) } != 0 {
        return Err(MountError::Fusermount(format!("socketpair: {}", io::Error::last_os_error())));
    }
    // SAFETY: both descriptors are fresh and ours.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let their_raw = theirs.as_raw_fd();
    let mut cmd = Command::new(&prog);
    // Its messages start with argv[0]; libfuse runs it by name.
    cmd.arg0("fusermount3")
        .arg("-o")
        .arg(fusermount_options(opts))
        .arg("--")
        .arg(mountpoint)
        .env(COMMFD_ENV, their_raw.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: fcntl is async-signal-safe; only fusermount3 keeps this end
    // across exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(their_raw, libc::F_SETFD, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| MountError::Fusermount(format!("cannot run {}: {e}", prog.display())))?;
    // Ours must go, or end of file never comes if fusermount3 fails.
    drop(theirs);
    // A thread drains stderr so fusermount3 never blocks on a full pipe
    // while we wait for the descriptor.
    let stderr_reader = child.stderr.take().map(|mut pipe| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    });
    let received = receive_fd(&ours);
    drop(ours);
    let status = child.wait();
    let stderr = stderr_reader.and_then(|t| t.join().ok()).unwrap_or_default();
    let said = one_line(&stderr);
    match received {
        Ok(fd) => {
            if !said.is_empty() {
                tracing::warn!("fusermount3: {said}");
            }
            Ok(Mounted { mountpoint: mountpoint.to_path_buf(), fd, privileged: false })
        }
        Err(e) => {
            let status = match status {
                Ok(s) => s.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            Err(MountError::FusermountRefused {
                mountpoint: mountpoint.to_path_buf(),
                said: if said.is_empty() { format!("{status}, no descriptor received ({e})") } else { said },
            })
        }
    }
}

/// fusermount3's stderr as one line (errors are one line).
fn one_line(text: &str) -> String {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
}

/// Receives one descriptor sent with SCM_RIGHTS.
fn receive_fd(sock: &OwnedFd) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    // Room for one cmsg carrying one int, 8-byte aligned.
    let mut cbuf = [0u64; 8];
    // SAFETY: msghdr is plain data; zeroed is a valid initial state.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    let n = loop {
        // SAFETY: msg points at live buffers for the duration of the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    if n == 0 {
        return Err(io::Error::other("fusermount3 closed the socket without sending a descriptor"));
    }
    // SAFETY: CMSG_FIRSTHDR walks the control buffer recvmsg filled in.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    if cmsg.is_null() {
        return Err(io::Error::other("fusermount3 sent no descriptor"));
    }
    // SAFETY: cmsg is non-null and inside cbuf.
    let (level, typ) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type) };
    if level != libc::SOL_SOCKET || typ != libc::SCM_RIGHTS {
        return Err(io::Error::other("unexpected control message"));
    }
    // SAFETY: an SCM_RIGHTS message carries at least one int.
    let fd = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>()) };
    // SAFETY: the kernel installed this descriptor for us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
    pub major: u32,
    pub minor: u32,
    /// The owner a FUSE mount was made for (its `user_id=` option).
    pub user_id: Option<u32>,
}

impl MountInfo {
    /// The FUSE connection number (its directory under /sys/fs/fuse/connections).
    pub fn connection(&self) -> Option<u32> {
        (self.major == 0 && self.fstype.starts_with("fuse")).then_some(self.minor)
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') as u32 * 64 + (b[i + 2] - b'0') as u32 * 8 + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else { continue };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        if pre.len() < 5 || post.len() < 2 {
            continue;
        }
        let Some((maj, min)) = pre[2].split_once(':') else { continue };
        let (Ok(major), Ok(minor)) = (maj.parse(), min.parse()) else { continue };
        out.push(MountInfo {
            mountpoint: PathBuf::from(OsStr::from_bytes(&unescape(pre[4]))),
            fstype: post[0].to_string(),
            source: String::from_utf8_lossy(&unescape(post[1])).into_owned(),
            major,
            minor,
            user_id: post
                .get(2)
                .and_then(|o| o.split(',').find_map(|kv| kv.strip_prefix("user_id=")))
                .and_then(|v| v.parse().ok()),
        });
    }
    out
}

/// The topmost mount at exactly `path` (an absolute path, compared as is).
pub fn find_mount(path: &Path) -> Option<MountInfo> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_mountinfo(&text).into_iter().rev().find(|m| m.mountpoint == path)
}

/// Aborts a FUSE connection: every pending and future request fails, so
/// nothing blocks on a dead daemon any more.
///
/// The kernel gives a connection's control files to the user who mounted it
/// (`user_id`), so a regular user can abort their own mounts, provided the
/// fusectl file system is mounted; only root can mount it.
pub fn abort_connection(conn: u32) -> io::Result<()> {
    const CONNECTIONS: &str = "/sys/fs/fuse/connections";
    let abort = format!("{CONNECTIONS}/{conn}/abort");
    if !Path::new(&abort).exists() {
        if !is_root() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{abort} does not exist: fusectl is not mounted on {CONNECTIONS}, and only root can mount it"),
            ));
        }
        // The fusectl file system is not always mounted; mount it once.
        let (src, dir, fstype) = (c"fusectl", CString::new(CONNECTIONS).expect("no NUL"), c"fusectl");
        // SAFETY: NUL-terminated strings that outlive the call.
        let rc = unsafe { libc::mount(src.as_ptr(), dir.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) {
                return Err(io::Error::new(e.kind(), format!("mounting fusectl on {CONNECTIONS}: {e}")));
            }
        }
    }
    std::fs::write(&abort, "1").map_err(|e| match e.kind() {
        io::ErrorKind::PermissionDenied => io::Error::new(
            e.kind(),
            format!("{abort}: {e} (only the user who mounted it, or root, may abort a connection)"),
        ),
        _ => io::Error::new(e.kind(), format!("{abort}: {e}")),
    })
}

/// Unmounts `mountpoint`. As root by umount2(2), falling back to a lazy
/// unmount when busy (or when `lazy`); otherwise through `fusermount3 -u`.
pub fn unmount(mountpoint: &Path, lazy: bool) -> io::Result<()> {
    if is_root() {
        let target = cstring(mountpoint.as_os_str())?;
        if !lazy {
            // SAFETY: NUL-terminated path.
            if unsafe { libc::umount2(target.as_ptr(), 0) } == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) {
                return Err(e);
            }
            tracing::info!("{} is busy; detaching it (lazy unmount)", mountpoint.display());
        }
        // SAFETY: NUL-terminated path.
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    } else {
        // fusermount3 unmounts only mounts whose user_id is ours.
        let prog = fusermount_program().map_err(io::Error::other)?;
        let mut cmd = Command::new(&prog);
        cmd.arg0("fusermount3").arg("-u");
        if lazy {
            cmd.arg("-z");
        }
        let out = cmd.arg("--").arg(mountpoint).stdin(std::process::Stdio::null()).output()?;
        let said = one_line(&String::from_utf8_lossy(&out.stderr));
        if out.status.success() {
            Ok(())
        } else if !lazy && said.contains("busy") {
            tracing::info!("{} is busy; detaching it (lazy unmount)", mountpoint.display());
            unmount(mountpoint, true)
        } else if said.is_empty() {
            Err(io::Error::other(format!("fusermount3 -u {}", out.status)))
        } else {
            Err(io::Error::other(said))
        }
    }
}

/// An absolute form of `path` that does not touch `path` itself (stat of a
/// mount whose daemon died would hang): the parent is resolved, the last
/// component kept.
pub fn absolute_mountpoint(path: &Path) -> io::Result<PathBuf> {
    let abs = if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir()?.join(path) };
    let name = match abs.file_name() {
        Some(n) if n != ".." => n.to_os_string(),
        _ => return std::fs::canonicalize(&abs),
    };
    let parent = abs.parent().unwrap_or(Path::new("/"));
    Ok(std::fs::canonicalize(parent)?.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let text = "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    120 29 0:52 / /tmp/a\\040b rw,nosuid,nodev,relatime shared:70 - fuse.efuse memfs rw,user_id=0,group_id=0\n\
                    garbage line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].mountpoint, PathBuf::from("/tmp/a b"));
        assert_eq!(m[1].fstype, "fuse.efuse");
        assert_eq!(m[1].source, "memfs");
        assert_eq!(m[1].connection(), Some(52));
        assert_eq!(m[0].connection(), None);
        assert_eq!(m[1].user_id, Some(0));
        assert_eq!(m[0].user_id, None);
    }

    #[test]
    fn options_parse() {
        let mut o = MountOptions::default();
        assert!(o.parse_list("allow_other,ro,debug,fsname=x").unwrap());
        assert!(o.allow_other && o.read_only && !o.default_permissions);
        assert_eq!(o.fsname, "x");
        assert!(o.parse_list("bogus").is_err());
    }

    #[test]
    fn fusermount_options_escape_what_fusermount3_splits_on() {
        let o = MountOptions {
            fsname: r"/srv/a\b".into(),
            subtype: "efuse".into(),
            allow_other: true,
            read_only: true,
            ..Default::default()
        };
        assert_eq!(fusermount_options(&o), r"fsname=/srv/a\\b,subtype=efuse,allow_other,ro,nosuid,nodev");
    }

    #[test]
    fn a_fusermount3_without_privilege_is_named() {
        // A plain executable file: not setuid root, no file capabilities.
        let path = std::env::temp_dir().join(format!("efuse-fusermount-check-{}", std::process::id()));
        std::fs::write(&path, "#!/bin/sh\n").unwrap();
        let err = check_fusermount(&path).unwrap_err();
        let _ = std::fs::remove_file(&path);
        assert!(matches!(err, MountError::FusermountNotSetuid(_)), "{err}");
        assert!(err.to_string().contains("is not setuid root"), "{err}");
    }

    #[test]
    fn fusermount3_messages_become_one_line() {
        assert_eq!(one_line("fusermount3: a\n\n  fusermount3: b  \n"), "fusermount3: a; fusermount3: b");
        assert_eq!(one_line(""), "");
    }

    #[test]
    fn absolute_mountpoint_keeps_last_component() {
        let p = absolute_mountpoint(Path::new("/tmp/does-not-exist-efuse")).unwrap();
        assert_eq!(p, PathBuf::from("/tmp/does-not-exist-efuse"));
    }
}

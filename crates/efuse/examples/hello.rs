//! The smallest efuse file system: one read-only file, `hello`, in the root.
//!
//! Run as root: `cargo run -p efuse --example hello -- /mnt/hello`, then
//! `cat /mnt/hello/hello`; Ctrl-C unmounts.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::Duration;

use efuse::daemon::{serve, ServeOptions};
use efuse::mount::MountOptions;
use efuse::transport::TransportConfig;
use efuse::*;

const TEXT: &[u8] = b"Hello from efuse!\n";
const TTL: Duration = Duration::from_secs(1);

struct Hello;

fn attr(ino: u64) -> FileAttr {
    let now = Timespec::new(0, 0);
    let (mode, nlink, size) =
        if ino == 1 { (libc::S_IFDIR | 0o755, 2, 0) } else { (libc::S_IFREG | 0o444, 1, TEXT.len() as u64) };
    FileAttr { ino, size, mode, nlink, atime: now, mtime: now, ctime: now, blksize: 4096, ..Default::default() }
}

impl Filesystem for Hello {
    fn lookup(&self, _ctx: &RequestContext<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        if parent != 1 || name != "hello" {
            return reply.error(Errno::ENOENT);
        }
        reply.entry(&Entry { nodeid: 2, generation: 0, attr: attr(2), entry_ttl: TTL, attr_ttl: TTL })
    }

    fn getattr(&self, _ctx: &RequestContext<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match ino {
            1 | 2 => reply.attr(&attr(ino), TTL),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _ctx: &RequestContext<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if ino != 2 {
            return reply.error(Errno::EISDIR);
        }
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EACCES);
        }
        reply.opened(0, 0)
    }

    fn read(&self, _ctx: &RequestContext<'_>, _ino: u64, _fh: u64, offset: u64, size: u32, _: i32, reply: ReplyData) {
        let start = (offset as usize).min(TEXT.len());
        let end = (start + size as usize).min(TEXT.len());
        reply.data(&TEXT[start..end])
    }

    fn readdir(&self, _ctx: &RequestContext<'_>, ino: u64, _fh: u64, offset: u64, mut reply: ReplyDirectory) {
        if ino != 1 {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [(1, libc::S_IFDIR, "."), (1, libc::S_IFDIR, ".."), (2, libc::S_IFREG, "hello")];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if !reply.add(*ino, i as u64 + 1, *kind, OsStr::new(name)) {
                break;
            }
        }
        reply.ok()
    }
}

fn main() {
    let Some(mountpoint) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: hello MOUNTPOINT");
        std::process::exit(2);
    };
    let opts = ServeOptions {
        mount: MountOptions { fsname: "hello".into(), subtype: "efuse".into(), ..Default::default() },
        session: SessionConfig { fs_name: "hello".into(), ..Default::default() },
        transport: TransportConfig::default(),
        observe: Default::default(),
        bypass: true,
    };
    let ready = |r: Result<(), String>| match r {
        Ok(()) => eprintln!("mounted; Ctrl-C to unmount"),
        Err(e) => eprintln!("hello: {e}"),
    };
    if serve(Hello, &mountpoint, opts, ready).is_err() {
        std::process::exit(1);
    }
}

//! Decoding of one request buffer, as read from `/dev/fuse` or a ring entry,
//! into a typed [`Request`].
//!
//! Every length is checked before it is used; a short or malformed request yields
//! a [`DecodeError`], never a panic. Fixed-size arguments are copied out of the
//! buffer, so it needs no alignment; names and data borrow from it.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use zerocopy::FromBytes;

use crate::structs::*;
use crate::Opcode;

/// Why a buffer is not a valid request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("request of {0} bytes is shorter than the 40-byte header")]
    ShortHeader(usize),
    #[error("header says {header} bytes but {actual} were read")]
    LengthMismatch { header: u32, actual: usize },
    #[error("unknown opcode {0}")]
    UnknownOpcode(u32),
    #[error("{op:?}: argument needs {need} bytes, {have} present")]
    ShortArgument { op: Opcode, need: usize, have: usize },
    #[error("{op:?}: name is not NUL-terminated")]
    Unterminated { op: Opcode },
    #[error("{op:?}: extension length {extlen} exceeds the body")]
    BadExtension { op: Opcode, extlen: usize },
}

impl DecodeError {
    /// The opcode, when the header was readable.
    pub fn opcode(&self) -> Option<Opcode> {
        match self {
            DecodeError::ShortArgument { op, .. }
            | DecodeError::Unterminated { op }
            | DecodeError::BadExtension { op, .. } => Some(*op),
            _ => None,
        }
    }
}

/// What the decoder must know of the negotiated protocol.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProtocolOptions {
    /// `FUSE_SETXATTR_EXT` was negotiated: SETXATTR carries the long argument.
    pub setxattr_ext: bool,
}

/// One decoded request: the header and its operation.
#[derive(Debug)]
pub struct Request<'a> {
    pub header: InHeader,
    pub op: Operation<'a>,
}

/// The operation of a request, with its arguments.
///
/// Names are the bytes before the kernel's NUL terminator.
#[derive(Debug)]
pub enum Operation<'a> {
    Lookup { name: &'a OsStr },
    Forget { arg: ForgetIn },
    Getattr { arg: GetattrIn },
    Setattr { arg: SetattrIn },
    Readlink,
    Symlink { name: &'a OsStr, target: &'a OsStr },
    Mknod { arg: MknodIn, name: &'a OsStr },
    Mkdir { arg: MkdirIn, name: &'a OsStr },
    Unlink { name: &'a OsStr },
    Rmdir { name: &'a OsStr },
    Rename { newdir: u64, name: &'a OsStr, newname: &'a OsStr },
    Link { arg: LinkIn, name: &'a OsStr },
    Open { arg: OpenIn },
    Read { arg: ReadIn },
    Write { arg: WriteIn, data: &'a [u8] },
    Statfs,
    Release { arg: ReleaseIn },
    Fsync { arg: FsyncIn },
    Setxattr { arg: SetxattrIn, name: &'a OsStr, value: &'a [u8] },
    Getxattr { arg: GetxattrIn, name: &'a OsStr },
    Listxattr { arg: GetxattrIn },
    Removexattr { name: &'a OsStr },
    Flush { arg: FlushIn },
    Init { arg: InitIn },
    Opendir { arg: OpenIn },
    Readdir { arg: ReadIn },
    Releasedir { arg: ReleaseIn },
    Fsyncdir { arg: FsyncIn },
    Getlk { arg: LkIn },
    Setlk { arg: LkIn },
    Setlkw { arg: LkIn },
    Access { arg: AccessIn },
    Create { arg: CreateIn, name: &'a OsStr },
    Interrupt { arg: InterruptIn },
    Bmap { arg: BmapIn },
    Destroy,
    Ioctl { arg: IoctlIn, data: &'a [u8] },
    Poll { arg: PollIn },
    NotifyReply { arg: NotifyRetrieveIn, data: &'a [u8] },
    BatchForget { nodes: ForgetList<'a> },
    Fallocate { arg: FallocateIn },
    Readdirplus { arg: ReadIn },
    Rename2 { arg: Rename2In, name: &'a OsStr, newname: &'a OsStr },
    Lseek { arg: LseekIn },
    CopyFileRange { arg: CopyFileRangeIn },
    CopyFileRange64 { arg: CopyFileRangeIn },
    SetupMapping { arg: SetupMappingIn },
    RemoveMapping { arg: RemoveMappingIn },
    Syncfs { arg: SyncfsIn },
    Tmpfile { arg: CreateIn, name: &'a OsStr },
    Statx { arg: StatxIn },
}

/// The entries of a BATCH_FORGET, decoded one at a time.
#[derive(Debug, Clone)]
pub struct ForgetList<'a> {
    bytes: &'a [u8],
}

impl<'a> ForgetList<'a> {
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.bytes.len() / std::mem::size_of::<ForgetOne>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<'a> Iterator for ForgetList<'a> {
    type Item = ForgetOne;
    fn next(&mut self) -> Option<ForgetOne> {
        let (one, rest) = ForgetOne::read_from_prefix(self.bytes).ok()?;
        self.bytes = rest;
        Some(one)
    }
}

/// Reads the header alone: enough to count or reject a request whose body is bad.
pub fn parse_header(buf: &[u8]) -> Result<InHeader, DecodeError> {
    InHeader::read_from_prefix(buf).map(|(h, _)| h).map_err(|_| DecodeError::ShortHeader(buf.len()))
}

struct Cursor<'a> {
    op: Opcode,
    /// Split requests (ring entries): the per-opcode argument area, read by
    /// `arg`. `None` for a contiguous request, where it precedes `rest`.
    op_in: Option<&'a [u8]>,
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn arg<T: FromBytes>(&mut self) -> Result<T, DecodeError> {
        let src = self.op_in.unwrap_or(self.rest);
        match T::read_from_prefix(src) {
            Ok((v, rest)) => {
                match &mut self.op_in {
                    Some(op_in) => *op_in = rest,
                    None => self.rest = rest,
                }
                Ok(v)
            }
            Err(_) => Err(DecodeError::ShortArgument { op: self.op, need: std::mem::size_of::<T>(), have: src.len() }),
        }
    }

    fn name(&mut self) -> Result<&'a OsStr, DecodeError> {
        let nul = self.rest.iter().position(|&b| b == 0).ok_or(DecodeError::Unterminated { op: self.op })?;
        let name = &self.rest[..nul];
        self.rest = &self.rest[nul + 1..];
        Ok(OsStr::from_bytes(name))
    }

    fn bytes(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < len {
            return Err(DecodeError::ShortArgument { op: self.op, need: len, have: self.rest.len() });
        }
        let (data, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(data)
    }
}

impl<'a> Request<'a> {
    /// Decodes one request. `buf` is exactly what one read returned.
    pub fn parse(buf: &'a [u8], opts: ProtocolOptions) -> Result<Request<'a>, DecodeError> {
        let header = parse_header(buf)?;
        if header.len as usize != buf.len() {
            return Err(DecodeError::LengthMismatch { header: header.len, actual: buf.len() });
        }
        Self::parse_body(header, None, &buf[std::mem::size_of::<InHeader>()..], opts)
    }

    /// Decodes one request as a FUSE-over-io_uring entry carries it, split in
    /// three: `header` holds the `fuse_in_header`, `op_in` the per-opcode
    /// argument (`in_args[0]`, e.g. `fuse_write_in`; empty or zero-filled for
    /// opcodes without one), and `payload` everything after it (names, write
    /// data, extensions). Nothing is copied but the fixed-size arguments:
    /// names and data borrow from `payload`.
    ///
    /// `header.len` is not checked against the parts: the ring transmits the
    /// payload size separately and `op_in` is a fixed-size area.
    pub fn parse_split(
        header: &[u8],
        op_in: &'a [u8],
        payload: &'a [u8],
        opts: ProtocolOptions,
    ) -> Result<Request<'a>, DecodeError> {
        let header = parse_header(header)?;
        Self::parse_body(header, Some(op_in), payload, opts)
    }

    fn parse_body(
        header: InHeader,
        op_in: Option<&'a [u8]>,
        body: &'a [u8],
        opts: ProtocolOptions,
    ) -> Result<Request<'a>, DecodeError> {
        let op = Opcode::from_u32(header.opcode).ok_or(DecodeError::UnknownOpcode(header.opcode))?;
        // Extensions (security context, supplementary groups) trail the body.
        let extlen = header.total_extlen as usize * 8;
        if extlen > body.len() {
            return Err(DecodeError::BadExtension { op, extlen });
        }
        let body = &body[..body.len() - extlen];
        let mut c = Cursor { op, op_in, rest: body };
        use Operation as O;
        let op = match op {
            Opcode::Lookup => O::Lookup { name: c.name()? },
            Opcode::Forget => O::Forget { arg: c.arg()? },
            Opcode::Getattr => O::Getattr { arg: c.arg()? },
            Opcode::Setattr => O::Setattr { arg: c.arg()? },
            Opcode::Readlink => O::Readlink,
            Opcode::Symlink => {
                let name = c.name()?;
                O::Symlink { name, target: c.name()? }
            }
            Opcode::Mknod => {
                let arg = c.arg()?;
                O::Mknod { arg, name: c.name()? }
            }
            Opcode::Mkdir => {
                let arg = c.arg()?;
                O::Mkdir { arg, name: c.name()? }
            }
            Opcode::Unlink => O::Unlink { name: c.name()? },
            Opcode::Rmdir => O::Rmdir { name: c.name()? },
            Opcode::Rename => {
                let arg: RenameIn = c.arg()?;
                let name = c.name()?;
                O::Rename { newdir: arg.newdir, name, newname: c.name()? }
            }
            Opcode::Link => {
                let arg = c.arg()?;
                O::Link { arg, name: c.name()? }
            }
            Opcode::Open => O::Open { arg: c.arg()? },
            Opcode::Read => O::Read { arg: c.arg()? },
            Opcode::Write => {
                let arg: WriteIn = c.arg()?;
                let data = c.bytes(arg.size as usize)?;
                O::Write { arg, data }
            }
            Opcode::Statfs => O::Statfs,
            Opcode::Release => O::Release { arg: c.arg()? },
            Opcode::Fsync => O::Fsync { arg: c.arg()? },
            Opcode::Setxattr => {
                let arg = if opts.setxattr_ext {
                    c.arg::<SetxattrIn>()?
                } else {
                    let a: SetxattrInCompat = c.arg()?;
                    SetxattrIn { size: a.size, flags: a.flags, ..Default::default() }
                };
                let name = c.name()?;
                let value = c.bytes(arg.size as usize)?;
                O::Setxattr { arg, name, value }
            }
            Opcode::Getxattr => {
                let arg = c.arg()?;
                O::Getxattr { arg, name: c.name()? }
            }
            Opcode::Listxattr => O::Listxattr { arg: c.arg()? },
            Opcode::Removexattr => O::Removexattr { name: c.name()? },
            Opcode::Flush => O::Flush { arg: c.arg()? },
            Opcode::Init => {
                // Kernels before 7.36 send only major, minor, max_readahead, flags.
                let mut arg = InitIn::default();
                let src = c.op_in.unwrap_or(c.rest);
                let n = src.len().min(std::mem::size_of::<InitIn>());
                if n < 16 {
                    return Err(DecodeError::ShortArgument { op, need: 16, have: n });
                }
                let dst = zerocopy::IntoBytes::as_mut_bytes(&mut arg);
                dst[..n].copy_from_slice(&src[..n]);
                O::Init { arg }
            }
            Opcode::Opendir => O::Opendir { arg: c.arg()? },
            Opcode::Readdir => O::Readdir { arg: c.arg()? },
            Opcode::Releasedir => O::Releasedir { arg: c.arg()? },
            Opcode::Fsyncdir => O::Fsyncdir { arg: c.arg()? },
            Opcode::Getlk => O::Getlk { arg: c.arg()? },
            Opcode::Setlk => O::Setlk { arg: c.arg()? },
            Opcode::Setlkw => O::Setlkw { arg: c.arg()? },
            Opcode::Access => O::Access { arg: c.arg()? },
            Opcode::Create => {
                let arg = c.arg()?;
                O::Create { arg, name: c.name()? }
            }
            Opcode::Interrupt => O::Interrupt { arg: c.arg()? },
            Opcode::Bmap => O::Bmap { arg: c.arg()? },
            Opcode::Destroy => O::Destroy,
            Opcode::Ioctl => {
                let arg: IoctlIn = c.arg()?;
                let data = c.bytes((arg.in_size as usize).min(c.rest.len()))?;
                O::Ioctl { arg, data }
            }
            Opcode::Poll => O::Poll { arg: c.arg()? },
            Opcode::NotifyReply => {
                let arg: NotifyRetrieveIn = c.arg()?;
                let data = c.bytes(arg.size as usize)?;
                O::NotifyReply { arg, data }
            }
            Opcode::BatchForget => {
                let arg: BatchForgetIn = c.arg()?;
                let need = arg.count as usize * std::mem::size_of::<ForgetOne>();
                let bytes = c.bytes(need)?;
                O::BatchForget { nodes: ForgetList { bytes } }
            }
            Opcode::Fallocate => O::Fallocate { arg: c.arg()? },
            Opcode::Readdirplus => O::Readdirplus { arg: c.arg()? },
            Opcode::Rename2 => {
                let arg = c.arg()?;
                let name = c.name()?;
                O::Rename2 { arg, name, newname: c.name()? }
            }
            Opcode::Lseek => O::Lseek { arg: c.arg()? },
            Opcode::CopyFileRange => O::CopyFileRange { arg: c.arg()? },
            Opcode::CopyFileRange64 => O::CopyFileRange64 { arg: c.arg()? },
            Opcode::Setupmapping => O::SetupMapping { arg: c.arg()? },
            Opcode::Removemapping => O::RemoveMapping { arg: c.arg()? },
            Opcode::Syncfs => O::Syncfs { arg: c.arg()? },
            Opcode::Tmpfile => {
                let arg = c.arg()?;
                // The kernel sends an empty name; accept its absence too.
                let name = if c.rest.is_empty() { OsStr::new("") } else { c.name()? };
                O::Tmpfile { arg, name }
            }
            Opcode::Statx => O::Statx { arg: c.arg()? },
        };
        Ok(Request { header, op })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    fn build(opcode: Opcode, body: &[u8]) -> Vec<u8> {
        let len = 40 + body.len();
        let h = InHeader {
            len: len as u32,
            opcode: opcode as u32,
            unique: 7,
            nodeid: 1,
            uid: 1000,
            gid: 1000,
            pid: 42,
            ..Default::default()
        };
        let mut v = h.as_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn lookup_name() {
        let buf = build(Opcode::Lookup, b"hello\0");
        let r = Request::parse(&buf, ProtocolOptions::default()).unwrap();
        assert_eq!(r.header.unique, 7);
        match r.op {
            Operation::Lookup { name } => assert_eq!(name, "hello"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rename_two_names() {
        let mut body = RenameIn { newdir: 9 }.as_bytes().to_vec();
        body.extend_from_slice(b"a\0bb\0");
        let buf = build(Opcode::Rename, &body);
        match Request::parse(&buf, ProtocolOptions::default()).unwrap().op {
            Operation::Rename { newdir, name, newname } => {
                assert_eq!((newdir, name.as_bytes(), newname.as_bytes()), (9, &b"a"[..], &b"bb"[..]))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn write_data_must_be_present() {
        let arg = WriteIn { size: 10, ..Default::default() };
        let mut body = arg.as_bytes().to_vec();
        body.extend_from_slice(&[1, 2, 3]);
        let buf = build(Opcode::Write, &body);
        assert!(matches!(
            Request::parse(&buf, ProtocolOptions::default()),
            Err(DecodeError::ShortArgument { op: Opcode::Write, need: 10, have: 3 })
        ));
        body.extend_from_slice(&[0; 7]);
        let buf = build(Opcode::Write, &body);
        match Request::parse(&buf, ProtocolOptions::default()).unwrap().op {
            Operation::Write { data, .. } => assert_eq!(data.len(), 10),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn setxattr_short_and_long_forms() {
        let mut body = SetxattrInCompat { size: 2, flags: 1 }.as_bytes().to_vec();
        body.extend_from_slice(b"user.a\0xy");
        let buf = build(Opcode::Setxattr, &body);
        match Request::parse(&buf, ProtocolOptions { setxattr_ext: false }).unwrap().op {
            Operation::Setxattr { arg, name, value } => {
                assert_eq!((arg.size, arg.flags, name.as_bytes(), value), (2, 1, &b"user.a"[..], &b"xy"[..]))
            }
            other => panic!("{other:?}"),
        }
        // The same bytes read as the long form are malformed (name not terminated).
        assert!(Request::parse(&buf, ProtocolOptions { setxattr_ext: true }).is_err());
    }

    #[test]
    fn init_accepts_short_and_long_forms() {
        let long = InitIn { major: 7, minor: 45, max_readahead: 4096, flags: 1, flags2: 2, ..Default::default() };
        let buf = build(Opcode::Init, long.as_bytes());
        match Request::parse(&buf, ProtocolOptions::default()).unwrap().op {
            Operation::Init { arg } => assert_eq!(arg, long),
            other => panic!("{other:?}"),
        }
        let buf = build(Opcode::Init, &long.as_bytes()[..16]);
        match Request::parse(&buf, ProtocolOptions::default()).unwrap().op {
            Operation::Init { arg } => assert_eq!((arg.minor, arg.flags2), (45, 0)),
            other => panic!("{other:?}"),
        }
        let buf = build(Opcode::Init, &long.as_bytes()[..12]);
        assert!(Request::parse(&buf, ProtocolOptions::default()).is_err());
    }

    #[test]
    fn batch_forget_count_is_checked() {
        let mut body = BatchForgetIn { count: 2, dummy: 0 }.as_bytes().to_vec();
        body.extend_from_slice(ForgetOne { nodeid: 5, nlookup: 1 }.as_bytes());
        let buf = build(Opcode::BatchForget, &body);
        assert!(Request::parse(&buf, ProtocolOptions::default()).is_err());
        body.extend_from_slice(ForgetOne { nodeid: 6, nlookup: 3 }.as_bytes());
        let buf = build(Opcode::BatchForget, &body);
        match Request::parse(&buf, ProtocolOptions::default()).unwrap().op {
            Operation::BatchForget { nodes } => {
                let v: Vec<_> = nodes.map(|f| (f.nodeid, f.nlookup)).collect();
                assert_eq!(v, vec![(5, 1), (6, 3)]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn extensions_are_stripped() {
        let mut body = MkdirIn { mode: 0o755, umask: 0o22 }.as_bytes().to_vec();
        body.extend_from_slice(b"dir\0\0\0\0\0");
        body.extend_from_slice(ExtHeader { size: 8, typ: 32 }.as_bytes());
        let mut buf = build(Opcode::Mkdir, &body);
        buf[36] = 1; // total_extlen = 1 (8 bytes)
        match Request::parse(&buf, ProtocolOptions::default()).unwrap().op {
            Operation::Mkdir { name, .. } => assert_eq!(name, "dir"),
            other => panic!("{other:?}"),
        }
        buf[36] = 200;
        assert!(matches!(Request::parse(&buf, ProtocolOptions::default()), Err(DecodeError::BadExtension { .. })));
    }

    #[test]
    fn header_errors() {
        assert_eq!(Request::parse(&[0; 10], ProtocolOptions::default()).unwrap_err(), DecodeError::ShortHeader(10));
        let mut buf = build(Opcode::Statfs, &[]);
        buf[0] = 99;
        assert!(matches!(Request::parse(&buf, ProtocolOptions::default()), Err(DecodeError::LengthMismatch { .. })));
        let mut buf = build(Opcode::Statfs, &[]);
        buf[4] = 7; // opcode 7 was never assigned
        assert_eq!(Request::parse(&buf, ProtocolOptions::default()).unwrap_err(), DecodeError::UnknownOpcode(7));
    }

    /// Builds a ring entry's three parts: header, 128-byte op area, payload.
    fn split(opcode: Opcode, op: &[u8], payload: &[u8]) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let h = InHeader {
            len: (40 + op.len() + payload.len()) as u32,
            opcode: opcode as u32,
            unique: 9,
            nodeid: 3,
            ..Default::default()
        };
        let mut op_in = op.to_vec();
        op_in.resize(128, 0);
        (h.as_bytes().to_vec(), op_in, payload.to_vec())
    }

    #[test]
    fn split_lookup_and_write() {
        let (h, op, p) = split(Opcode::Lookup, &[], b"name\0");
        let r = Request::parse_split(&h, &op, &p, ProtocolOptions::default()).unwrap();
        assert_eq!((r.header.unique, r.header.nodeid), (9, 3));
        assert!(matches!(r.op, Operation::Lookup { name } if name == "name"));

        let arg = WriteIn { fh: 4, offset: 8192, size: 5, ..Default::default() };
        let (h, op, p) = split(Opcode::Write, arg.as_bytes(), b"hello");
        match Request::parse_split(&h, &op, &p, ProtocolOptions::default()).unwrap().op {
            Operation::Write { arg: a, data } => {
                assert_eq!((a.fh, a.offset, data), (4, 8192, &b"hello"[..]));
                // The data is the payload buffer itself, not a copy.
                assert_eq!(data.as_ptr(), p.as_ptr());
            }
            other => panic!("{other:?}"),
        }
        // The op area is fixed-size: a short payload is what is checked.
        let (h, op, p) = split(Opcode::Write, arg.as_bytes(), b"hel");
        assert!(matches!(
            Request::parse_split(&h, &op, &p, ProtocolOptions::default()),
            Err(DecodeError::ShortArgument { op: Opcode::Write, need: 5, have: 3 })
        ));
    }

    #[test]
    fn split_rename_setxattr_and_extensions() {
        let (h, op, p) = split(Opcode::Rename, RenameIn { newdir: 7 }.as_bytes(), b"a\0b\0");
        match Request::parse_split(&h, &op, &p, ProtocolOptions::default()).unwrap().op {
            Operation::Rename { newdir, name, newname } => {
                assert_eq!((newdir, name, newname), (7, OsStr::new("a"), OsStr::new("b")))
            }
            other => panic!("{other:?}"),
        }
        let arg = SetxattrIn { size: 2, flags: 1, setxattr_flags: 0, padding: 0 };
        let (h, op, p) = split(Opcode::Setxattr, arg.as_bytes(), b"user.x\0vv");
        match Request::parse_split(&h, &op, &p, ProtocolOptions { setxattr_ext: true }).unwrap().op {
            Operation::Setxattr { name, value, .. } => {
                assert_eq!((name.as_bytes(), value), (&b"user.x"[..], &b"vv"[..]))
            }
            other => panic!("{other:?}"),
        }
        // Extensions trail the payload and are stripped from it.
        let mut payload = b"dir\0\0\0\0\0".to_vec();
        payload.extend_from_slice(ExtHeader { size: 8, typ: 32 }.as_bytes());
        let (mut h, op, p) = split(Opcode::Mkdir, MkdirIn { mode: 0o755, umask: 0 }.as_bytes(), &payload);
        h[36] = 1;
        assert!(matches!(
            Request::parse_split(&h, &op, &p, ProtocolOptions::default()).unwrap().op,
            Operation::Mkdir { name, arg } if name == "dir" && arg.mode == 0o755
        ));
        h[36] = 9;
        assert!(matches!(
            Request::parse_split(&h, &op, &p, ProtocolOptions::default()),
            Err(DecodeError::BadExtension { .. })
        ));
    }

    /// For every opcode, the split form decodes as the contiguous one does.
    #[test]
    fn split_and_contiguous_agree() {
        let sizes: &[(Opcode, usize)] = &[
            (Opcode::Getattr, 16),
            (Opcode::Setattr, 88),
            (Opcode::Read, 40),
            (Opcode::Open, 8),
            (Opcode::Fsync, 16),
            (Opcode::Setlkw, 48),
            (Opcode::Fallocate, 32),
            (Opcode::CopyFileRange, 56),
            (Opcode::Statx, 24),
            (Opcode::Create, 16),
            (Opcode::Mknod, 16),
            (Opcode::Link, 8),
            (Opcode::Getxattr, 8),
            (Opcode::Lseek, 24),
        ];
        for &(opcode, size) in sizes {
            let arg: Vec<u8> = (0..size as u8).map(|i| i.wrapping_mul(7) | 1).collect();
            let rest = b"file\0";
            let (h, op, p) = split(opcode, &arg, rest);
            let mut whole = h.clone();
            whole.extend_from_slice(&arg);
            whole.extend_from_slice(rest);
            let a = Request::parse(&whole, ProtocolOptions::default()).map(|r| format!("{:?}", r.op));
            let b = Request::parse_split(&h, &op, &p, ProtocolOptions::default()).map(|r| format!("{:?}", r.op));
            assert_eq!(a, b, "{opcode:?}");
        }
    }

    /// Truncated and random parts: decode or err, never panic.
    #[test]
    fn split_truncated_and_random_never_panic() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let (h, op, p) = split(Opcode::Write, WriteIn { size: 100, ..Default::default() }.as_bytes(), &[1; 100]);
        for hc in 0..=h.len() {
            for oc in [0, 1, 8, 39, 40, 128] {
                for pc in [0, 1, 50, 99, 100] {
                    let _ = Request::parse_split(&h[..hc], &op[..oc], &p[..pc], ProtocolOptions::default());
                }
            }
        }
        for _ in 0..100_000 {
            let mut hdr: Vec<u8> = (0..(next() % 48) as usize).map(|_| next() as u8).collect();
            if hdr.len() >= 8 {
                hdr[4..8].copy_from_slice(&((next() % 56) as u32).to_ne_bytes());
            }
            let op_in: Vec<u8> = (0..(next() % 130) as usize).map(|_| next() as u8).collect();
            let payload: Vec<u8> = (0..(next() % 300) as usize).map(|_| next() as u8).collect();
            let _ = Request::parse_split(&hdr, &op_in, &payload, ProtocolOptions { setxattr_ext: next() % 2 == 0 });
        }
    }

    /// Every truncation of every valid request decodes or errs, never panics.
    #[test]
    fn truncated_requests_never_panic() {
        let mut samples = Vec::new();
        for op in Opcode::ALL {
            let mut body = vec![0u8; 200];
            for (i, b) in body.iter_mut().enumerate() {
                *b = (i as u8).wrapping_mul(31) | 1; // no NULs: names unterminated
            }
            samples.push(build(op, &body));
            samples.push(build(op, &[0u8; 200]));
        }
        for s in &samples {
            for cut in 0..s.len() {
                let mut t = s[..cut].to_vec();
                if t.len() >= 4 {
                    t[..4].copy_from_slice(&(cut as u32).to_ne_bytes());
                }
                let _ = Request::parse(&t, ProtocolOptions::default());
                let _ = Request::parse(&t, ProtocolOptions { setxattr_ext: true });
            }
        }
    }

    /// Random buffers with a consistent length field: decode or err, never panic.
    #[test]
    fn random_buffers_never_panic() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..200_000 {
            let len = (next() % 400) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if len >= 8 {
                buf[..4].copy_from_slice(&(len as u32).to_ne_bytes());
                let op = (next() % 56) as u32;
                buf[4..8].copy_from_slice(&op.to_ne_bytes());
            }
            if len >= 40 && next() % 2 == 0 {
                buf[36..38].copy_from_slice(&0u16.to_ne_bytes());
            }
            let _ = Request::parse(&buf, ProtocolOptions { setxattr_ext: next() % 2 == 0 });
        }
    }
}

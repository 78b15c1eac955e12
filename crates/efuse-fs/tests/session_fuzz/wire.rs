//! How a request reaches the session: contiguous, as one read of /dev/fuse
//! returns it (`Session::dispatch`), or split in three as a FUSE-over-io_uring
//! entry carries it (`Session::dispatch_split`): the 40-byte header, the
//! opcode's fixed argument in a zero-filled 128-byte area, and the rest
//! (names, data, extensions) as the payload. The two decode differently on
//! damaged input (a short argument is zero-filled in the split form, and the
//! header's length is not checked there), so both are fuzzed.

use std::mem::size_of;
use std::sync::Arc;

use efuse::abi::structs as abi;
use efuse::abi::{DecodeError, Opcode, ProtocolOptions, Request};
use efuse::{Filesystem, ReplySink, Session};

/// Size of the per-opcode argument area of a ring entry.
const OP_IN: usize = efuse::abi::consts::uring::OP_IN_OUT_SZ;
const HEADER: usize = size_of::<abi::InHeader>();

/// One request as the session will receive it.
pub enum Wire {
    Contiguous(Vec<u8>),
    Split { header: Vec<u8>, op_in: Vec<u8>, payload: Vec<u8> },
}

/// The size of the fixed argument the kernel puts in a ring entry's argument
/// area (its `in_args[0]`); 0 where the first argument is a name.
fn arg_size(op: Option<Opcode>, setxattr_ext: bool) -> usize {
    use Opcode as O;
    let Some(op) = op else { return 0 };
    match op {
        O::Lookup | O::Readlink | O::Symlink | O::Unlink | O::Rmdir | O::Statfs | O::Removexattr | O::Destroy => 0,
        O::Forget => size_of::<abi::ForgetIn>(),
        O::Getattr => size_of::<abi::GetattrIn>(),
        O::Setattr => size_of::<abi::SetattrIn>(),
        O::Mknod => size_of::<abi::MknodIn>(),
        O::Mkdir => size_of::<abi::MkdirIn>(),
        O::Rename => size_of::<abi::RenameIn>(),
        O::Rename2 => size_of::<abi::Rename2In>(),
        O::Link => size_of::<abi::LinkIn>(),
        O::Open | O::Opendir => size_of::<abi::OpenIn>(),
        O::Read | O::Readdir | O::Readdirplus => size_of::<abi::ReadIn>(),
        O::Write => size_of::<abi::WriteIn>(),
        O::Release | O::Releasedir => size_of::<abi::ReleaseIn>(),
        O::Fsync | O::Fsyncdir => size_of::<abi::FsyncIn>(),
        O::Setxattr if setxattr_ext => size_of::<abi::SetxattrIn>(),
        O::Setxattr => size_of::<abi::SetxattrInCompat>(),
        O::Getxattr | O::Listxattr => size_of::<abi::GetxattrIn>(),
        O::Flush => size_of::<abi::FlushIn>(),
        O::Init => size_of::<abi::InitIn>(),
        O::Getlk | O::Setlk | O::Setlkw => size_of::<abi::LkIn>(),
        O::Access => size_of::<abi::AccessIn>(),
        O::Create | O::Tmpfile => size_of::<abi::CreateIn>(),
        O::Interrupt => size_of::<abi::InterruptIn>(),
        O::Bmap => size_of::<abi::BmapIn>(),
        O::Ioctl => size_of::<abi::IoctlIn>(),
        O::Poll => size_of::<abi::PollIn>(),
        O::NotifyReply => size_of::<abi::NotifyRetrieveIn>(),
        O::BatchForget => size_of::<abi::BatchForgetIn>(),
        O::Fallocate => size_of::<abi::FallocateIn>(),
        O::Lseek => size_of::<abi::LseekIn>(),
        O::CopyFileRange | O::CopyFileRange64 => size_of::<abi::CopyFileRangeIn>(),
        O::Setupmapping => size_of::<abi::SetupMappingIn>(),
        O::Removemapping => size_of::<abi::RemoveMappingIn>(),
        O::Syncfs => size_of::<abi::SyncfsIn>(),
        O::Statx => size_of::<abi::StatxIn>(),
    }
}

impl Wire {
    /// Splits a contiguous request as the kernel would lay it out in a ring
    /// entry (taken from its opcode field; nothing else is checked).
    pub fn split(buf: Vec<u8>, setxattr_ext: bool) -> Wire {
        let cut = buf.len().min(HEADER);
        let opcode = (buf.len() >= 8).then(|| u32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]));
        let body = &buf[cut..];
        let n = arg_size(opcode.and_then(Opcode::from_u32), setxattr_ext).min(body.len());
        let mut op_in = body[..n].to_vec();
        op_in.resize(OP_IN, 0);
        Wire::Split { header: buf[..cut].to_vec(), op_in, payload: body[n..].to_vec() }
    }

    pub fn parse(&self, opts: ProtocolOptions) -> Result<Request<'_>, DecodeError> {
        match self {
            Wire::Contiguous(b) => Request::parse(b, opts),
            Wire::Split { header, op_in, payload } => Request::parse_split(header, op_in, payload, opts),
        }
    }

    /// The bytes where the header is.
    pub fn header(&self) -> &[u8] {
        match self {
            Wire::Contiguous(b) => b,
            Wire::Split { header, .. } => header,
        }
    }

    pub fn header_mut(&mut self) -> &mut [u8] {
        match self {
            Wire::Contiguous(b) => b,
            Wire::Split { header, .. } => header,
        }
    }

    /// The bytes where the opcode's fixed argument is.
    pub fn arg_mut(&mut self) -> &mut [u8] {
        match self {
            Wire::Contiguous(b) => {
                let cut = b.len().min(HEADER);
                &mut b[cut..]
            }
            Wire::Split { op_in, .. } => op_in,
        }
    }

    pub fn dispatch<F: Filesystem>(&self, session: &Session<F>, sink: &Arc<dyn ReplySink>) {
        match self {
            Wire::Contiguous(b) => session.dispatch(b, sink),
            Wire::Split { header, op_in, payload } => session.dispatch_split(header, op_in, payload, sink),
        }
    }

    /// The request's bytes for a report, with the form it was sent in.
    pub fn describe(&self) -> String {
        let hex = |b: &[u8]| b.iter().take(96).map(|x| format!("{x:02x}")).collect::<String>();
        match self {
            Wire::Contiguous(b) => format!("contiguous, {} bytes: {}", b.len(), hex(b)),
            Wire::Split { header, op_in, payload } => format!(
                "split: header {} | op_in {} | payload ({} bytes) {}",
                hex(header),
                hex(op_in),
                payload.len(),
                hex(payload)
            ),
        }
    }
}

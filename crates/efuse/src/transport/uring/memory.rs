//! The memory of ring entries: the two buffers the kernel reads requests
//! into and replies out of, and who may touch them when.

use std::io::{self, IoSlice};
use std::mem::{offset_of, size_of};
use std::sync::{Mutex, MutexGuard};

use efuse_abi::structs::{OutHeader, UringEntInOut, UringReqHeader};
use zerocopy::IntoBytes;

use crate::reply::Refused;

/// Offset of `ring_ent_in_out` in the header buffer.
pub(super) const ENT_IN_OUT: usize = offset_of!(UringReqHeader, ring_ent_in_out);
/// Offset of the opcode's first argument in the header buffer.
pub(super) const OP_IN: usize = offset_of!(UringReqHeader, op_in);

/// Page-aligned, zeroed memory that the kernel reads and writes through the
/// user pointers we registered. Only ever accessed through raw pointers,
/// except for the payload slice lent to the session while a request is being
/// dispatched (see [`EntryState::lent`]). Page-aligned, so a WRITE's data
/// (the kernel puts it at the start of the payload) can go to a backing file
/// opened with O_DIRECT as it is.
pub(super) type RawBuf = crate::buffer::AlignedBuf;

/// Where the request on an entry is, as far as replies are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// No request in userspace on it (its command is in the kernel, or it is
    /// not registered).
    Idle,
    /// A crew thread is dispatching its request; `replied` once answered.
    Serving { replied: bool },
    /// The dispatch returned without an answer; the reply will come from
    /// another thread (a lock grant, an interrupt).
    Held,
}

/// What the entry lock guards.
pub(super) struct EntryState {
    pub(super) phase: Phase,
    /// The payload is lent to a dispatch in progress (names and write data
    /// borrow from it): a reply given meanwhile is staged here and copied in
    /// when the dispatch returns.
    pub(super) lent: bool,
    pub(super) staged: Option<(OutHeader, Vec<u8>)>,
    /// What the reply being committed grants, taken back if the kernel
    /// refuses the commit.
    pub(super) grant: Option<Refused>,
    /// The kernel's id of the request in userspace on this entry.
    pub(super) commit_id: u64,
}

/// One ring entry: its buffers and its state.
///
/// Ownership of the buffers follows the phase: while a command is in the
/// kernel the kernel owns both; when its completion delivers a request, the
/// crew thread that received it owns them until the reply is written;
/// exactly one reply is written (reply objects answer once), then a crew
/// thread submits the commit and the kernel owns them again.
pub(super) struct EntryMem {
    /// The queue id the entry is registered with.
    pub(super) qid: u16,
    pub(super) header: RawBuf,
    pub(super) payload: RawBuf,
    state: Mutex<EntryState>,
    /// [header, payload] as the kernel reads them at REGISTER.
    iovecs: [libc::iovec; 2],
}

// SAFETY: the iovecs only point at the entry's own buffers; see RawBuf.
unsafe impl Send for EntryMem {}
// SAFETY: as above.
unsafe impl Sync for EntryMem {}

impl EntryMem {
    pub(super) fn new(qid: u16, payload_size: usize) -> io::Result<EntryMem> {
        let header = RawBuf::new(size_of::<UringReqHeader>())?;
        let payload = RawBuf::new(payload_size)?;
        let iovecs = [
            libc::iovec { iov_base: header.as_ptr().cast(), iov_len: size_of::<UringReqHeader>() },
            libc::iovec { iov_base: payload.as_ptr().cast(), iov_len: payload.len() },
        ];
        let state = EntryState { phase: Phase::Idle, lent: false, staged: None, grant: None, commit_id: 0 };
        Ok(EntryMem { qid, header, payload, state: Mutex::new(state), iovecs })
    }

    pub(super) fn state(&self) -> MutexGuard<'_, EntryState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn iovecs(&self) -> &[libc::iovec; 2] {
        &self.iovecs
    }

    /// Writes a reply into the entry's buffers.
    ///
    /// # Safety
    /// A request is in userspace on this entry, this is its only reply, and
    /// the payload is not lent out.
    pub(super) unsafe fn write_reply(&self, out: &OutHeader, parts: &[IoSlice<'_>]) {
        let h = self.header.as_ptr();
        std::ptr::copy_nonoverlapping(out.as_bytes().as_ptr(), h, size_of::<OutHeader>());
        let mut at = 0usize;
        for p in parts {
            std::ptr::copy_nonoverlapping(p.as_ptr(), self.payload.as_ptr().add(at), p.len());
            at += p.len();
        }
        let sz = (at as u32).to_ne_bytes();
        let field = ENT_IN_OUT + offset_of!(UringEntInOut, payload_sz);
        std::ptr::copy_nonoverlapping(sz.as_ptr(), h.add(field), sz.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use efuse_abi::consts::uring as cmd;

    #[test]
    fn write_data_starts_page_aligned() {
        let entry = EntryMem::new(0, 1 << 20).unwrap();
        assert_eq!(entry.payload.as_ptr() as usize % crate::buffer::ALIGN, 0);
        assert_eq!(entry.iovecs()[1].iov_base as usize % crate::buffer::ALIGN, 0);
    }

    #[test]
    fn header_layout_matches_the_kernel() {
        assert_eq!(OP_IN, cmd::IN_OUT_HEADER_SZ);
        assert_eq!(ENT_IN_OUT, cmd::IN_OUT_HEADER_SZ + cmd::OP_IN_OUT_SZ);
        assert_eq!(ENT_IN_OUT + offset_of!(UringEntInOut, payload_sz), 272);
    }
}

//! The first request of a session: random and damaged INITs, each to a fresh
//! session. Whatever arrives, INIT is answered at most once; a refusal says
//! why; a newer major version is answered with ours and a retry then
//! succeeds; and what is negotiated is never more than the kernel offered.

use std::mem::size_of;
use std::sync::Arc;

use efuse::abi::consts::init;
use efuse::abi::structs as abi;
use efuse::abi::{Opcode, Operation, ProtocolOptions, Request};
use efuse::session::{InitError, InitOutcome};
use efuse::{MemorySink, ReplySink, Session, SessionConfig};
use efuse_fs::memfs::{MemFs, MemFsConfig};
use zerocopy::{FromBytes, IntoBytes};

use crate::gen::Rng;

fn init_request(unique: u64, arg: &[u8]) -> Vec<u8> {
    let h = abi::InHeader {
        len: (size_of::<abi::InHeader>() + arg.len()) as u32,
        opcode: Opcode::Init as u32,
        unique,
        ..Default::default()
    };
    let mut v = h.as_bytes().to_vec();
    v.extend_from_slice(arg);
    v
}

/// Checks an accepted INIT's one reply against what was offered.
fn check_done(out: &[u8], offered: u64, kernel_minor: u32) -> Result<(), String> {
    let o = abi::InitOut::read_from_bytes(out).map_err(|_| format!("INIT reply of {} bytes", out.len()))?;
    let flags = o.flags as u64 | (o.flags2 as u64) << 32;
    if flags & !offered != 0 {
        return Err(format!("negotiated {} the kernel did not offer", init::describe(flags & !offered)));
    }
    if o.major != 7 || o.minor != kernel_minor.min(efuse::abi::KERNEL_MINOR_VERSION) {
        return Err(format!("answered {}.{} to 7.{kernel_minor}", o.major, o.minor));
    }
    if o.max_write < 4096 {
        return Err(format!("max_write {}", o.max_write));
    }
    Ok(())
}

#[test]
fn init_is_answered_at_most_once_and_never_grants_more_than_offered() {
    let seed = crate::settings("init", false, 1).seed;
    let mut rng = Rng::new(seed);
    let mut seen = [0u64; 5];
    for i in 0..20_000u64 {
        let major = rng.pick(&[7, 7, 7, 8, 6, 0, u32::MAX]);
        let minor: u32 = rng.pick(&[45, 44, 36, 35, 31, 30, 20, 0, 99, u32::MAX]);
        let flags = if rng.percent(50) { rng.next() } else { crate::KERNEL_OFFER & rng.next() };
        let arg = abi::InitIn {
            major,
            minor,
            max_readahead: rng.pick(&[0, 4096, 131072, u32::MAX]),
            flags: flags as u32,
            flags2: (flags >> 32) as u32,
            unused: [0; 11],
        };
        let mut body = arg.as_bytes().to_vec();
        match rng.below(10) {
            0 => body.truncate(16),
            1 => body.truncate(rng.below(64) as usize),
            2 => body.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
            _ => {}
        }
        let mut buf = init_request(2, &body);
        if rng.percent(5) {
            // Anywhere but the unique, which the reply must carry.
            let at = rng.below(buf.len() as u64 - 8) as usize;
            let at = if at >= 8 { at + 8 } else { at };
            buf[at] ^= 1 << rng.below(8);
        }
        // What the request says after the damage, as the daemon must read it.
        let sent = match Request::parse(&buf, ProtocolOptions::default()) {
            Ok(Request { op: Operation::Init { arg }, .. }) => Some(arg),
            _ => None,
        };
        let (minor, offered) = match sent {
            Some(a) if a.flags as u64 & init::INIT_EXT != 0 => (a.minor, a.flags as u64 | (a.flags2 as u64) << 32),
            Some(a) => (a.minor, a.flags as u64),
            None => (0, 0),
        };

        let session = Session::new(MemFs::new(MemFsConfig::default()), SessionConfig::default());
        let mem = Arc::new(MemorySink::default());
        let sink: Arc<dyn ReplySink> = mem.clone();
        let outcome = session.handle_init(&buf, &sink, None);
        let replies = std::mem::take(&mut *mem.replies.lock().unwrap_or_else(|p| p.into_inner()));
        let fail = |what: String| -> ! {
            panic!("session_fuzz init, seed {seed}, case {i}: {what}; request {buf:02x?}, replies {replies:?}")
        };
        match (&outcome, &replies[..]) {
            (Ok(InitOutcome::Done(_)), [(Opcode::Init, 2, 0, out)]) => {
                seen[0] += 1;
                if let Err(e) = check_done(out, offered, minor) {
                    fail(e);
                }
            }
            (Ok(InitOutcome::Retry), [(Opcode::Init, 2, 0, out)]) => {
                seen[1] += 1;
                let o = abi::InitOut::read_from_bytes(out).unwrap_or_else(|_| fail("retry reply".into()));
                if (o.major, o.minor) != (7, efuse::abi::KERNEL_MINOR_VERSION) {
                    fail(format!("retry answered {}.{}", o.major, o.minor));
                }
                // The kernel then speaks our version.
                let again = abi::InitIn { major: 7, minor: 45, flags: init::INIT_EXT as u32, ..Default::default() };
                let out = session.handle_init(&init_request(4, again.as_bytes()), &sink, None);
                let r = std::mem::take(&mut *mem.replies.lock().unwrap_or_else(|p| p.into_inner()));
                if !matches!((out, &r[..]), (Ok(InitOutcome::Done(_)), [(Opcode::Init, 4, 0, _)])) {
                    fail(format!("INIT after a retry answered {r:?}"));
                }
            }
            (Err(InitError::TooOld(..)), [(Opcode::Init, 2, e, out)]) if *e == -libc::EPROTO && out.is_empty() => {
                seen[2] += 1
            }
            // Nothing to answer: not a readable INIT at all (the mount fails).
            (Err(InitError::Malformed(_)), []) => seen[3] += 1,
            (Err(InitError::NotInit(_)), []) => seen[4] += 1,
            _ => fail(format!("outcome {:?}", outcome.as_ref().map(|_| "accepted"))),
        }
    }
    println!(
        "session_fuzz init: seed {seed}: accepted {}, retry {}, too old {}, malformed {}, not INIT {}",
        seen[0], seen[1], seen[2], seen[3], seen[4]
    );
}

//! Session fuzzing: a seeded generator feeds an efuse session random,
//! well-formed and mutated FUSE requests through in-memory reply sinks, with
//! memfs and with stackfs (over a fresh directory) behind it, and checks that
//! nothing panics or hangs, that every request is answered exactly once with
//! its own unique (or dropped, where the protocol expects no answer), that
//! every reply is well formed for its opcode, and that the session's counters
//! agree with what was sent and answered; for stackfs, that nothing outside
//! its directory changed.
//!
//! Each file system is fuzzed by one worker (a stream that repeats for a
//! seed) and by two workers at once on one session (as a transport's
//! threads; interleavings differ from run to run). Requests arrive whole, as
//! from /dev/fuse, or split, as from a FUSE-over-io_uring entry. The first
//! INIT is fuzzed apart ([`first_init`]).
//!
//! `EFUSE_FUZZ_REQUESTS=N` sets the memfs runs (stackfs runs N/5, or
//! `EFUSE_FUZZ_STACKFS_REQUESTS`), `EFUSE_FUZZ_SEED=S` the seed (else one is
//! drawn and printed). A failure prints the seed and how to repeat it.

mod first_init;
mod gen;
mod oracle;
mod sandbox;
mod wire;
mod worker;

use std::cell::Cell;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use efuse::abi::consts::init;
use efuse::abi::structs as abi;
use efuse::abi::{Opcode, ProtocolOptions};
use efuse::session::InitOutcome;
use efuse::{Features, Filesystem, ReplySink, Session, SessionConfig};
use efuse_fs::memfs::{MemFs, MemFsConfig};
use efuse_fs::stackfs::{StackFs, StackFsConfig};
use zerocopy::IntoBytes;

use gen::Generator;
use oracle::{CounterModel, Negotiated};
use worker::{Confine, FuzzSink, Outcome, Run, Worker};

/// Requests per run in the default (CI) configuration.
const MEMFS_REQUESTS: u64 = 500_000;
const STACKFS_REQUESTS: u64 = 100_000;
/// A run that makes no progress for this long is hung.
const STALL: Duration = Duration::from_secs(60);

/// INIT flags a Linux 6.x kernel offers (fs/fuse/inode.c, fuse_send_init),
/// passthrough included.
const KERNEL_OFFER: u64 = init::ASYNC_READ
    | init::POSIX_LOCKS
    | init::ATOMIC_O_TRUNC
    | init::EXPORT_SUPPORT
    | init::BIG_WRITES
    | init::DONT_MASK
    | init::SPLICE_WRITE
    | init::SPLICE_MOVE
    | init::SPLICE_READ
    | init::FLOCK_LOCKS
    | init::HAS_IOCTL_DIR
    | init::AUTO_INVAL_DATA
    | init::DO_READDIRPLUS
    | init::READDIRPLUS_AUTO
    | init::ASYNC_DIO
    | init::WRITEBACK_CACHE
    | init::NO_OPEN_SUPPORT
    | init::PARALLEL_DIROPS
    | init::HANDLE_KILLPRIV
    | init::POSIX_ACL
    | init::ABORT_ERROR
    | init::MAX_PAGES
    | init::CACHE_SYMLINKS
    | init::NO_OPENDIR_SUPPORT
    | init::EXPLICIT_INVAL_DATA
    | init::HANDLE_KILLPRIV_V2
    | init::SETXATTR_EXT
    | init::INIT_EXT
    | init::SECURITY_CTX
    | init::CREATE_SUPP_GROUP
    | init::HAS_EXPIRE_ONLY
    | init::DIRECT_IO_ALLOW_MMAP
    | init::PASSTHROUGH
    | init::NO_EXPORT_SUPPORT
    | init::HAS_RESEND
    | init::ALLOW_IDMAP
    | init::REQUEST_TIMEOUT;

/// How one run is set up.
struct Settings {
    label: String,
    seed: u64,
    requests: u64,
    workers: u64,
    /// The environment that repeats this run, less the request count.
    repeat: String,
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v}: {e}")))
}

fn settings(fs: &str, stackfs: bool, workers: u64) -> Settings {
    let seed = env_u64("EFUSE_FUZZ_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        gen::Rng::new(t.as_nanos() as u64 ^ ((std::process::id() as u64) << 32)).next()
    });
    let (requests, var) = if stackfs {
        let n = env_u64("EFUSE_FUZZ_STACKFS_REQUESTS")
            .or_else(|| env_u64("EFUSE_FUZZ_REQUESTS").map(|n| n / 5))
            .unwrap_or(STACKFS_REQUESTS);
        (n, "EFUSE_FUZZ_STACKFS_REQUESTS")
    } else {
        (env_u64("EFUSE_FUZZ_REQUESTS").unwrap_or(MEMFS_REQUESTS), "EFUSE_FUZZ_REQUESTS")
    };
    let label = if workers == 1 { fs.to_string() } else { format!("{fs}, {workers} workers") };
    Settings { label, seed, requests, workers, repeat: format!("EFUSE_FUZZ_SEED={seed} {var}=") }
}

/// Kernel features to ask for, varied by seed so CI covers each over time.
fn features(seed: u64) -> (Features, &'static str) {
    let d = Features::DEFAULT;
    match seed % 4 {
        0 => (d, "default"),
        1 => (Features::PLAIN, "plain"),
        2 => (Features { no_open: true, no_opendir: true, ..d }, "no-open"),
        _ => (Features { writeback_cache: true, daemon_locks: true, ..d }, "writeback, daemon locks"),
    }
}

/// Panics on threads other than a run's own (lock waiters): those would
/// otherwise only show as an EIO answer.
static STRAY_PANICS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static RUNNER: Cell<bool> = const { Cell::new(false) };
}

/// Counts panics on other threads from now on; marks this thread as a runner.
fn count_stray_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !RUNNER.with(|r| r.get()) {
                STRAY_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info)
        }));
    });
    RUNNER.with(|r| r.set(true));
}

/// Aborts the process when a run stops making progress: a hung request
/// would otherwise hang CI. Writes to stderr directly, past the test
/// harness's capture, which an abort would lose.
struct Watchdog {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(progress: Arc<AtomicU64>, s: &Settings) -> Watchdog {
        let (label, repeat, requests) = (s.label.clone(), s.repeat.clone(), s.requests);
        let done = Arc::new(AtomicBool::new(false));
        let stop = done.clone();
        let thread = std::thread::spawn(move || {
            let mut last = (u64::MAX, Instant::now());
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(200));
                let p = progress.load(Ordering::Acquire);
                if p != last.0 {
                    last = (p, Instant::now());
                } else if last.1.elapsed() > STALL {
                    let _ = writeln!(
                        std::io::stderr(),
                        "session_fuzz {label}: no progress for {STALL:?} after {p} requests; aborting. Repeat: \
                         {repeat}{} cargo test --release -p efuse-fs --test session_fuzz",
                        p.min(requests)
                    );
                    std::process::abort();
                }
            }
        });
        Watchdog { done, thread: Some(thread) }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers INIT as a 7.45 kernel offers it; returns what was settled.
fn init<F: Filesystem>(session: &Session<F>, model: &mut CounterModel) -> Negotiated {
    let arg = abi::InitIn {
        major: 7,
        minor: 45,
        max_readahead: 131072,
        flags: KERNEL_OFFER as u32,
        flags2: (KERNEL_OFFER >> 32) as u32,
        unused: [0; 11],
    };
    let h = abi::InHeader {
        len: (std::mem::size_of::<abi::InHeader>() + std::mem::size_of::<abi::InitIn>()) as u32,
        opcode: Opcode::Init as u32,
        unique: 2,
        ..Default::default()
    };
    let mut buf = h.as_bytes().to_vec();
    buf.extend_from_slice(arg.as_bytes());
    let sink = Arc::new(FuzzSink::new(session.shared().clone()));
    let dyn_sink: Arc<dyn ReplySink> = sink.clone();
    let n = match session.handle_init(&buf, &dyn_sink, None) {
        Ok(InitOutcome::Done(n)) => n,
        Ok(InitOutcome::Retry) => panic!("INIT 7.45 asked for a retry"),
        Err(e) => panic!("INIT failed: {e}"),
    };
    model.request(Opcode::Init);
    let replies = sink.take();
    let ok = matches!(&replies[..], [(Opcode::Init, 2, 0, p)] if p.len() == std::mem::size_of::<abi::InitOut>());
    assert!(ok, "INIT answered {replies:?}");
    Negotiated {
        opts: ProtocolOptions { setxattr_ext: n.flags & init::SETXATTR_EXT != 0 },
        max_read: n.max_write,
        no_open: n.flags & init::NO_OPEN_SUPPORT != 0,
        no_opendir: n.flags & init::NO_OPENDIR_SUPPORT != 0,
        no_flush: session.fs().capabilities().flush_only_unlocks && n.flags & init::POSIX_LOCKS == 0,
    }
}

/// Says where a run was when something in the session or file system panicked.
struct PanicNote<'a> {
    settings: &'a Settings,
    progress: &'a AtomicU64,
}

impl Drop for PanicNote<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The end (interrupting what waits, DESTROY) counts on past the stream.
            let p = self.progress.load(Ordering::Acquire).min(self.settings.requests);
            eprintln!(
                "session_fuzz {}: panicked after {p} requests; repeat: {}{p} cargo test --release -p efuse-fs --test \
                 session_fuzz",
                self.settings.label, self.settings.repeat
            );
        }
    }
}

/// INIT, the workers' streams, DESTROY, and the counters compared.
fn fuzz<F: Filesystem>(fs: F, s: Settings, confine: Option<Confine>) {
    count_stray_panics();
    let (features, feature_names) = features(s.seed);
    println!(
        "session_fuzz {}: seed {}, {} requests, features {feature_names} (repeat with {}{})",
        s.label, s.seed, s.requests, s.repeat, s.requests
    );
    let session = Session::new(fs, SessionConfig { features, ..Default::default() });
    let mut at_init = CounterModel::new();
    let negotiated = init(&session, &mut at_init);
    let progress = Arc::new(AtomicU64::new(0));
    let _watchdog = Watchdog::start(progress.clone(), &s);
    let _note = PanicNote { settings: &s, progress: &progress };
    let run = Run {
        session: &session,
        negotiated,
        confine,
        progress: &progress,
        label: s.label.clone(),
        repeat: if s.workers == 1 { s.repeat.clone() } else { format!("(interleaving varies) {}", s.repeat) },
        workers: s.workers,
    };
    let ext = run.negotiated.opts.setxattr_ext;
    let started = Instant::now();
    let outcomes: Vec<Outcome> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..s.workers)
            .map(|lane| {
                let generator = Generator::new(s.seed, ext, lane, s.workers);
                // The first worker's model starts from INIT, so a lone worker
                // can compare with the session's counters as it goes.
                let base = if lane == 0 { at_init.clone() } else { CounterModel::new() };
                let requests = s.requests / s.workers + u64::from(lane < s.requests % s.workers);
                let run = &run;
                scope.spawn(move || {
                    count_stray_panics();
                    Worker::new(run, generator, base, s.workers == 1).run(requests)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    });
    let elapsed = started.elapsed();
    let mut model = CounterModel::new();
    for o in &outcomes {
        model.add(&o.model);
    }
    // DESTROY, from a worker of its own once every stream has ended.
    let destroy = Worker::new(&run, Generator::new(s.seed, ext, 0, 1), CounterModel::new(), false).destroy();
    model.add(&destroy.model);
    if let Err(e) = model.compare(&session.shared().counters.snapshot(), false) {
        panic!("session_fuzz {}: at the end: {e}", s.label);
    }
    assert!(session.shared().destroyed.load(Ordering::Acquire), "DESTROY did not mark the session destroyed");
    let stray = STRAY_PANICS.load(Ordering::SeqCst);
    assert_eq!(stray, 0, "session_fuzz {}: {stray} panics on other threads (see the log)", s.label);
    report(&s, feature_names, &model, &outcomes, elapsed);
}

fn report(s: &Settings, features: &str, model: &CounterModel, outcomes: &[Outcome], elapsed: Duration) {
    let rate = s.requests as f64 / elapsed.as_secs_f64().max(1e-9);
    let late: u64 = outcomes.iter().map(|o| o.late).sum();
    println!(
        "session_fuzz {}: {} requests in {:.1} s ({rate:.0}/s), seed {}, features {features}; {} undecodable, {late} \
         SETLKW answered late",
        s.label,
        s.requests,
        elapsed.as_secs_f64(),
        s.seed,
        model.total_undecodable(),
    );
    let mut how = std::collections::BTreeMap::new();
    for o in outcomes {
        for (h, c) in &o.how {
            *how.entry(*h).or_insert(0) += c;
        }
    }
    let how: Vec<String> = how.iter().map(|(h, c)| format!("{h:?} {c}")).collect();
    println!("  made: {}", how.join(", "));
    let ops: Vec<String> = Opcode::ALL
        .iter()
        .map(|op| {
            let ok: u64 = outcomes.iter().filter_map(|o| o.tally.get(op.name())).map(|t| t.ok).sum();
            format!("{} {ok}/{}", op.name(), model.requests(*op))
        })
        .collect();
    println!("  answered ok / decoded, per opcode: {}", ops.join(", "));
}

fn memfs() -> MemFs {
    // Small, so ENOSPC is reached and memory stays bounded.
    MemFs::new(MemFsConfig { capacity: 64 << 20, ..Default::default() })
}

fn stackfs(workers: u64) {
    let s = settings("stackfs", true, workers);
    let sandbox = sandbox::Sandbox::new(s.seed ^ workers);
    let fs = StackFs::new(StackFsConfig::new(sandbox.backing().to_path_buf()))
        .unwrap_or_else(|e| panic!("stackfs over {}: {e}", sandbox.backing().display()));
    let label = s.label.clone();
    fuzz(fs, s, Some(sandbox::confine));
    if let Err(e) = sandbox.verify() {
        panic!("session_fuzz {label}: {e}");
    }
}

#[test]
fn memfs_answers_every_request_once() {
    fuzz(memfs(), settings("memfs", false, 1), None);
}

#[test]
fn memfs_answers_every_request_once_with_two_workers() {
    fuzz(memfs(), settings("memfs", false, 2), None);
}

#[test]
fn stackfs_answers_every_request_once_and_stays_in_its_directory() {
    stackfs(1);
}

#[test]
fn stackfs_answers_every_request_once_and_stays_in_its_directory_with_two_workers() {
    stackfs(2);
}

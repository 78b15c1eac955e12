//! One fuzzing worker: sends its generator's stream to the shared session
//! one request at a time, as one transport worker would, through its own
//! in-memory sink, and checks each answer as it comes. The only answers that
//! come later are those of SETLKW requests waiting for a lock, which end when
//! the lock is released or the request is interrupted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use efuse::abi::{Opcode, ProtocolOptions};
use efuse::session::SessionShared;
use efuse::{Filesystem, MemorySink, RecordedReply, Reply, ReplySink, Session};

use crate::gen::{Fact, Generator, How};
use crate::oracle::{self, CounterModel, Expect, Negotiated, Shape};
use crate::wire::Wire;

/// How long waiting SETLKW requests may take to answer their INTERRUPT.
const DRAIN: Duration = Duration::from_secs(30);
/// More SETLKW requests than this waiting at once: interrupt them.
const MAX_WAITING: usize = 64;

/// The in-memory sink that belongs to the session, as a transport's
/// channel does: error replies are counted and requests tracked for
/// interrupts.
pub struct FuzzSink {
    mem: MemorySink,
    shared: Arc<SessionShared>,
}

impl FuzzSink {
    pub fn new(shared: Arc<SessionShared>) -> FuzzSink {
        FuzzSink { mem: MemorySink::default(), shared }
    }

    /// The replies sent since the last call.
    pub fn take(&self) -> Vec<RecordedReply> {
        std::mem::take(&mut *self.mem.replies.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl ReplySink for FuzzSink {
    fn send(&self, reply: &Reply<'_>) {
        self.mem.send(reply)
    }

    fn session(&self) -> Option<&SessionShared> {
        Some(&self.shared)
    }
}

/// Rewrites a request before it is sent (stackfs's resource limits).
pub type Confine = fn(&mut Wire, ProtocolOptions);

/// Per-opcode tallies for the summary.
#[derive(Default, Clone, Copy)]
pub struct Tally {
    pub ok: u64,
    pub errors: u64,
}

/// What a worker did, for the counters check and the summary.
pub struct Outcome {
    pub model: CounterModel,
    pub how: BTreeMap<How, u64>,
    pub tally: BTreeMap<&'static str, Tally>,
    pub late: u64,
}

/// What the workers of one run share.
pub struct Run<'s, F: Filesystem> {
    pub session: &'s Session<F>,
    pub negotiated: Negotiated,
    pub confine: Option<Confine>,
    /// Requests sent by all workers, for the watchdog.
    pub progress: &'s AtomicU64,
    pub label: String,
    /// The environment that repeats the run, less the request count.
    pub repeat: String,
    /// Workers sharing the requests (each sends its share of the count).
    pub workers: u64,
}

pub struct Worker<'s, F: Filesystem> {
    run: &'s Run<'s, F>,
    sink: Arc<FuzzSink>,
    dyn_sink: Arc<dyn ReplySink>,
    generator: Generator,
    /// SETLKW requests whose answer is still to come, by unique: the index that sent them.
    waiting: BTreeMap<u64, u64>,
    /// INTERRUPTs answered EAGAIN so far.
    interrupts_answered: std::collections::BTreeSet<u64>,
    index: u64,
    /// The only worker: compare the session's counters as the run goes, so
    /// a disagreement is reported near the request that caused it.
    audit: bool,
    out: Outcome,
    facts: Vec<Fact>,
}

impl<'s, F: Filesystem> Worker<'s, F> {
    /// A worker sending `generator`'s stream; its counter model starts at `model`.
    pub fn new(run: &'s Run<'s, F>, generator: Generator, model: CounterModel, audit: bool) -> Worker<'s, F> {
        let sink = Arc::new(FuzzSink::new(run.session.shared().clone()));
        let dyn_sink: Arc<dyn ReplySink> = sink.clone();
        Worker {
            run,
            sink,
            dyn_sink,
            generator,
            waiting: BTreeMap::new(),
            interrupts_answered: Default::default(),
            index: 0,
            audit,
            out: Outcome { model, how: BTreeMap::new(), tally: BTreeMap::new(), late: 0 },
            facts: Vec::new(),
        }
    }

    fn fail(&self, wire: Option<&Wire>, what: &str) -> ! {
        let req = wire.map_or_else(|| "none".to_string(), Wire::describe);
        panic!(
            "session_fuzz {}: request #{}: {what}\n  request: {req}\n  repeat: {}{} cargo test --release -p efuse-fs \
             --test session_fuzz",
            self.run.label,
            self.index,
            self.run.repeat,
            (self.index + 1) * self.run.workers
        )
    }

    /// Sends `requests` requests, then interrupts what still waits.
    pub fn run(mut self, requests: u64) -> Outcome {
        for i in 0..requests {
            self.index = i;
            self.run.progress.fetch_add(1, Ordering::Release);
            let (wire, how) = self.generator.next_request();
            *self.out.how.entry(how).or_default() += 1;
            self.send(wire);
            if self.waiting.len() > MAX_WAITING {
                // Only when the stream's own INTERRUPTs fall behind; the
                // waits it ends depend on timing, so a repeat may differ here.
                self.interrupt_waiting(MAX_WAITING / 2);
            }
            if self.audit && i % 4096 == 4095 {
                let snap = self.run.session.shared().counters.snapshot();
                if let Err(e) = self.out.model.compare(&snap, !self.waiting.is_empty()) {
                    self.fail(None, &e);
                }
            }
        }
        self.index = requests;
        self.interrupt_waiting(0);
        self.out
    }

    /// Sends DESTROY, the last request of a session, and checks that
    /// nothing answers after it.
    pub fn destroy(mut self) -> Outcome {
        let b = self.generator.destroy();
        self.send(Wire::Contiguous(b));
        std::thread::sleep(Duration::from_millis(100));
        let replies = self.sink.take();
        self.settle(None, Expect::Nothing, replies);
        self.out
    }

    /// Sends one request and checks what came back.
    fn send(&mut self, mut wire: Wire) {
        if let Some(confine) = self.run.confine {
            confine(&mut wire, self.run.negotiated.opts);
        }
        let (expect, decoded) = oracle::expect(&wire, &self.run.negotiated);
        match decoded {
            Some(op) => self.out.model.request(op),
            None => self.out.model.undecodable(),
        }
        wire.dispatch(self.run.session, &self.dyn_sink);
        let replies = self.sink.take();
        self.settle(Some(&wire), expect, replies);
    }

    /// Interrupts the waiting SETLKW requests until at most `limit` wait.
    /// Their answers come from their own threads, so this waits for them.
    fn interrupt_waiting(&mut self, limit: usize) {
        let deadline = Instant::now() + DRAIN;
        while self.waiting.len() > limit {
            if Instant::now() > deadline {
                let left: Vec<_> = self.waiting.values().collect();
                self.fail(None, &format!("SETLKW requests {left:?} still unanswered {DRAIN:?} after their INTERRUPT"));
            }
            let targets: Vec<u64> = self.waiting.keys().copied().collect();
            for t in targets {
                let b = self.generator.interrupt(t);
                self.send(Wire::Contiguous(b));
            }
            std::thread::sleep(Duration::from_millis(20));
            let replies = self.sink.take();
            self.settle(None, Expect::Nothing, replies);
            self.run.progress.fetch_add(1, Ordering::Release);
        }
    }

    /// Matches `replies` to the request just sent (`expect`) and to waiting SETLKWs.
    fn settle(&mut self, wire: Option<&Wire>, expect: Expect, replies: Vec<RecordedReply>) {
        let mut answered = false;
        for (opcode, unique, error, payload) in replies {
            let mine = match expect {
                Expect::Rejected { unique: u, .. } | Expect::Answer { unique: u, .. } => u == unique && !answered,
                Expect::Nothing => false,
            };
            if mine {
                answered = true;
                match expect {
                    Expect::Rejected { errno, .. } => {
                        if error != -errno || !payload.is_empty() {
                            let what = format!("refused request answered {error} with {} bytes", payload.len());
                            self.fail(wire, &what);
                        }
                    }
                    Expect::Answer { op, nodeid, shape, .. } => {
                        if opcode != op {
                            self.fail(wire, &format!("{} answered as {}", op.name(), opcode.name()));
                        }
                        self.answer(wire, op, shape, nodeid, error, &payload);
                    }
                    Expect::Nothing => {}
                }
            } else if opcode == Opcode::Interrupt && error == -libc::EAGAIN && payload.is_empty() {
                // An INTERRUPT whose request was not in flight (answered
                // already, or never sent) is answered EAGAIN once its grace
                // is over, and only once.
                if !self.interrupts_answered.insert(unique) {
                    self.fail(wire, &format!("INTERRUPT {unique} answered twice"));
                }
            } else if let Some(sent_at) = self.waiting.remove(&unique) {
                if opcode != Opcode::Setlkw {
                    self.fail(wire, &format!("the SETLKW of request #{sent_at} answered as {}", opcode.name()));
                }
                self.out.late += 1;
                self.answer(wire, Opcode::Setlkw, Shape::Empty, 0, error, &payload);
            } else {
                let what = format!(
                    "unexpected reply (a second one, or to a request that expects none): {} unique {unique} error \
                     {error}, {} bytes; expected {expect:?}",
                    opcode.name(),
                    payload.len()
                );
                self.fail(wire, &what);
            }
        }
        if !answered {
            match expect {
                Expect::Answer { op: Opcode::Setlkw, unique, .. } => {
                    self.waiting.insert(unique, self.index);
                }
                Expect::Answer { .. } | Expect::Rejected { .. } => {
                    self.fail(wire, &format!("no reply; expected {expect:?}"))
                }
                Expect::Nothing => {}
            }
        }
    }

    fn answer(&mut self, wire: Option<&Wire>, op: Opcode, shape: Shape, nodeid: u64, error: i32, payload: &[u8]) {
        self.facts.clear();
        if let Err(e) = oracle::check_answer(shape, nodeid, error, payload, &mut self.facts) {
            self.fail(wire, &format!("{} reply: {e}", op.name()));
        }
        let t = self.out.tally.entry(op.name()).or_default();
        if error != 0 {
            t.errors += 1;
            self.out.model.error(op);
        } else {
            t.ok += 1;
        }
        for f in self.facts.drain(..) {
            self.generator.learn(f);
        }
    }
}

//! The Prometheus endpoint of `efuse mount --metrics ADDR:PORT`: the daemon's
//! counters and the eBPF histograms in OpenMetrics text, served by a minimal
//! HTTP/1.1 responder on a thread of its own (one request per connection).
//!
//! Metrics are built at scrape time from snapshots; nothing on the request
//! path knows about Prometheus.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::observe::{opcode_name, Observability};

/// Latency buckets exported: upper bounds 2^10 ns (~1 us) .. 2^35 ns (~34 s);
/// faster requests fall in the first, slower ones in +Inf.
const FIRST_BOUND_LOG2: usize = 10;
const LAST_BOUND_LOG2: usize = 35;

/// Renders every metric of the mount (OpenMetrics text, ending with `# EOF`).
pub fn render(obs: &Arc<Observability>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(MountCollector(obs.clone())));
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out = "# EOF\n".into();
    }
    out
}

struct MountCollector(Arc<Observability>);

impl std::fmt::Debug for MountCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MountCollector")
    }
}

type Labels = Vec<(&'static str, String)>;

fn counter_family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        if labels.is_empty() {
            m.encode_counter::<NoLabelSet, _, u64>(&v, None)?;
        } else {
            m.encode_family(&labels)?.encode_counter::<NoLabelSet, _, u64>(&v, None)?;
        }
    }
    Ok(())
}

impl Collector for MountCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let obs = &self.0;
        let c = obs.counters();
        counter_family(
            &mut enc,
            "efuse_daemon_requests",
            "Requests the daemon read from the kernel and dispatched, per FUSE opcode, since mount.",
            c.opcodes.iter().map(|(op, n)| (vec![("opcode", op.clone())], n.count)),
        )?;
        counter_family(
            &mut enc,
            "efuse_daemon_errors",
            "Requests the daemon answered with an error, per FUSE opcode, since mount.",
            c.opcodes.iter().map(|(op, n)| (vec![("opcode", op.clone())], n.errors)),
        )?;
        counter_family(
            &mut enc,
            "efuse_daemon_opens",
            "Opens by the data path the reply chose: passthrough (the kernel does the I/O on the backing file), \
             cached (through the page cache), direct (every read and write reaches the daemon).",
            [
                (vec![("path", "passthrough".to_string())], c.paths.passthrough),
                (vec![("path", "cached".to_string())], c.paths.cached),
                (vec![("path", "direct".to_string())], c.paths.direct),
            ],
        )?;
        counter_family(
            &mut enc,
            "efuse_daemon_undecodable_requests",
            "Requests the daemon could not decode (unknown opcode or malformed body).",
            [(Vec::new(), c.undecodable)],
        )?;
        enc.encode_descriptor(
            "efuse_uptime",
            "Time since the mount was set up.",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?
        .encode_gauge(&obs.uptime_secs())?;

        let snap = obs.kernel.snapshot();
        enc.encode_descriptor(
            "efuse_bpf_loaded",
            "1 when the eBPF kernel-side counters (efuse_kernel_*) are loaded for this mount, else 0.",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&i64::from(snap.is_ok()))?;
        let Ok(snap) = snap else { return Ok(()) };
        counter_family(
            &mut enc,
            "efuse_kernel_requests",
            "Requests the kernel sent to this mount's daemon (tracepoint fuse_request_send), per FUSE opcode; \
             FORGET, BATCH_FORGET and INTERRUPT are not traced by the kernel.",
            snap.opcodes.iter().map(|o| (vec![("opcode", opcode_name(o.opcode))], o.requests)),
        )?;
        counter_family(
            &mut enc,
            "efuse_kernel_errors",
            "Requests that ended with an error (tracepoint fuse_request_end), per FUSE opcode.",
            snap.opcodes.iter().map(|o| (vec![("opcode", opcode_name(o.opcode))], o.errors)),
        )?;
        {
            let mut m = enc.encode_descriptor(
                "efuse_kernel_request_duration",
                "Time from the kernel sending a request to the daemon's reply ending it, per FUSE opcode \
                 (log2 buckets, measured in the kernel).",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for o in &snap.opcodes {
                let mut buckets = Vec::with_capacity(LAST_BOUND_LOG2 - FIRST_BOUND_LOG2 + 2);
                let below: u64 = o.buckets[..FIRST_BOUND_LOG2].iter().sum();
                buckets.push((2f64.powi(FIRST_BOUND_LOG2 as i32) / 1e9, below));
                for b in FIRST_BOUND_LOG2..LAST_BOUND_LOG2 {
                    buckets.push((2f64.powi(b as i32 + 1) / 1e9, o.buckets[b]));
                }
                buckets.push((f64::MAX, o.buckets[LAST_BOUND_LOG2..].iter().sum()));
                let labels: Labels = vec![("opcode", opcode_name(o.opcode))];
                m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                    o.latency_sum_ns as f64 / 1e9,
                    o.ended(),
                    &buckets,
                    None,
                )?;
            }
        }
        counter_family(
            &mut enc,
            "efuse_daemon_context_switches",
            "Context switches of the daemon's threads (tracepoint sched_switch): voluntary when the thread \
             blocked, involuntary when it was preempted.",
            snap.threads.iter().flat_map(|t| {
                let thread = format!("{}/{}", t.name, t.tid);
                [
                    (vec![("thread", thread.clone()), ("kind", "voluntary".to_string())], t.voluntary),
                    (vec![("thread", thread), ("kind", "involuntary".to_string())], t.involuntary),
                ]
            }),
        )?;
        if !snap.syscalls.is_empty() {
            counter_family(
                &mut enc,
                "efuse_daemon_syscalls",
                "System calls the daemon made (tracepoint raw_syscalls:sys_enter), by syscall number.",
                snap.syscalls.iter().map(|(nr, n)| (vec![("nr", nr.to_string())], *n)),
            )?;
        }
        Ok(())
    }
}

/// The metrics endpoint; stops listening when dropped.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl MetricsServer {
    /// Binds `addr` (only it) and serves `GET /metrics` on a thread.
    pub fn start(addr: SocketAddr, obs: Arc<Observability>) -> io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new().name("efuse-metrics".into()).spawn(move || {
            for conn in listener.incoming() {
                if stopped.load(Ordering::Acquire) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                if let Err(e) = answer(conn, &obs) {
                    tracing::debug!("metrics request: {e}");
                }
            }
        })?;
        tracing::info!("Prometheus metrics on http://{addr}/metrics");
        Ok(MetricsServer { addr, stop })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// Answers one HTTP/1.1 request and closes the connection.
fn answer(mut conn: TcpStream, obs: &Arc<Observability>) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?.take(16 * 1024));
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Skip the headers; a GET has no body.
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", render(obs))
        }
        ("GET" | "HEAD", "/") => ("200 OK", "text/plain; charset=utf-8", "efuse metrics: see /metrics\n".to_string()),
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain; charset=utf-8", "not found\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain; charset=utf-8", "only GET\n".to_string()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    if method != "HEAD" {
        conn.write_all(body.as_bytes())?;
    }
    conn.flush()
}

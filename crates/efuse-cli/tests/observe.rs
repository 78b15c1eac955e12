//! Observability on real mounts: the eBPF kernel-side counters agree with the
//! daemon's own, `efuse top --once --json` has the documented shape, and the
//! Prometheus endpoint serves valid OpenMetrics text.
//!
//! Needs root (mounting, loading BPF); skips with a message otherwise, and
//! under CI must run (clang is installed by scripts/setup.sh, so the BPF
//! programs are built). Every look at the mount is a command with a timeout;
//! the `Mounted` guard unmounts whatever happens.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{efuse_bin, in_ci, require_fuse, sh, Cmd, Fs, MountSpec, Mounted};
use serde_json::Value;

const LOOK: Duration = Duration::from_secs(20);
/// Opcodes the kernel queues apart from requests (no fuse_request_send event).
const UNTRACED: [&str; 3] = ["FORGET", "BATCH_FORGET", "INTERRUPT"];

fn top_json(m: &Mounted) -> (Value, String) {
    let out = Cmd::new(efuse_bin()).arg("top").arg(&m.mnt).args(["--once", "--json"]).timeout(LOOK).run().expect_ok();
    let v = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("efuse top --once --json printed invalid JSON ({e}):\n{}", out.stdout));
    (v, out.stderr)
}

/// True when the BPF view is live; skips (or, under CI, fails) when it is not.
fn require_ebpf(test: &str, top: &Value) -> bool {
    if top["source"] == "ebpf" {
        return true;
    }
    let why = top["bpf_unavailable"].as_str().unwrap_or("no reason given").to_string();
    common::skip(test, &format!("eBPF counters unavailable: {why}"))
}

/// Per-opcode counts: `key` is "requests" (top) or "count" (stats).
fn counts(v: &Value, key: &str) -> BTreeMap<String, u64> {
    v["opcodes"]
        .as_object()
        .expect("opcodes is an object")
        .iter()
        .map(|(k, o)| (k.clone(), o[key].as_u64().unwrap_or_else(|| panic!("{k}.{key} is not a count: {o}"))))
        .filter(|(k, _)| !UNTRACED.contains(&k.as_str()))
        .collect()
}

/// Waits until both sides stop moving (two equal readings 200 ms apart).
fn settled(m: &Mounted) -> (Value, Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last: Option<(u64, u64)> = None;
    loop {
        let (top, _) = top_json(m);
        let stats = m.stats();
        let now = (top["requests_total"].as_u64().unwrap_or(0), stats["requests_total"].as_u64().unwrap_or(0));
        if last == Some(now) || Instant::now() > deadline {
            return (top, stats);
        }
        last = Some(now);
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn ebpf_counts_match_the_daemons() {
    let test = "ebpf_counts_match_the_daemons";
    if !require_fuse(test) {
        return;
    }
    let m = Mounted::with(Fs::Memfs, test, MountSpec::default().arg("--cache").arg("none"), |_| {});
    sh("mkdir d && for i in $(seq 1 100); do echo $i > d/f$i; done", &m.mnt).timeout(LOOK).ok();
    let (before, _) = top_json(&m);
    if !require_ebpf(test, &before) {
        return;
    }
    // 1,000 stats of existing files: with --cache none each one reaches the daemon.
    sh("for r in $(seq 1 10); do stat --format=%s $(printf 'd/f%d ' $(seq 1 100)) > /dev/null; done", &m.mnt)
        .timeout(Duration::from_secs(60))
        .ok();
    let (top, stats) = settled(&m);
    let kernel = counts(&top, "requests");
    let daemon = counts(&stats, "count");
    assert_eq!(kernel, daemon, "per-opcode counts: eBPF (left) vs daemon (right)\ntop: {top}\nstats: {stats}");
    let lookups =
        kernel.get("LOOKUP").copied().unwrap_or(0) - counts(&before, "requests").get("LOOKUP").copied().unwrap_or(0);
    assert!(lookups >= 1000, "1,000 stats under --cache none should send >= 1,000 LOOKUPs, saw {lookups}");
    assert_eq!(kernel.get("INIT"), Some(&1), "INIT (sent by mount(2)) is counted: {top}");
    // Latency: every counted opcode that ended has quantiles, p50 <= p99.
    for (op, o) in top["opcodes"].as_object().unwrap() {
        let (p50, p99) = (o["p50_us"].as_f64(), o["p99_us"].as_f64());
        if let (Some(a), Some(b)) = (p50, p99) {
            assert!(a > 0.0 && a <= b, "{op}: p50 {a} us, p99 {b} us");
        }
    }
    assert!(top["opcodes"]["LOOKUP"]["p50_us"].as_f64().is_some(), "LOOKUP has a latency: {top}");
    assert!(top["context_switches"].as_u64().unwrap_or(0) > 0, "the daemon's threads switched: {top}");
}

#[test]
fn top_once_json_has_the_documented_fields() {
    let test = "top_once_json_has_the_documented_fields";
    if !require_fuse(test) {
        return;
    }
    let m = Mounted::new(Fs::Memfs, test);
    sh("touch a && stat a > /dev/null && ls > /dev/null", &m.mnt).timeout(LOOK).ok();
    let (top, _) = top_json(&m);
    for field in ["source", "requests_total", "opcodes", "context_switches"] {
        assert!(top.get(field).is_some(), "missing {field}: {top}");
    }
    assert!(matches!(top["source"].as_str(), Some("ebpf" | "daemon")), "{top}");
    assert!(top["requests_total"].as_u64().unwrap() > 0, "{top}");
    assert!(top["context_switches"].is_u64(), "{top}");
    let ops = top["opcodes"].as_object().expect("opcodes object");
    assert!(ops.contains_key("LOOKUP") || ops.contains_key("CREATE"), "{top}");
    for (op, o) in ops {
        assert!(o["requests"].is_u64(), "{op}: {o}");
        assert!(o.get("p50_us").is_some() && o.get("p99_us").is_some(), "{op}: {o}");
    }
    let sum: u64 = ops.values().map(|o| o["requests"].as_u64().unwrap()).sum();
    assert_eq!(sum, top["requests_total"].as_u64().unwrap(), "requests_total is the sum: {top}");
    if in_ci() {
        assert_eq!(top["source"], "ebpf", "CI builds the BPF programs and runs as root: {top}");
    }
}

#[test]
fn bpf_off_falls_back_to_daemon_counts_and_says_so() {
    let test = "bpf_off_falls_back_to_daemon_counts_and_says_so";
    if !require_fuse(test) {
        return;
    }
    let m = Mounted::with(Fs::Memfs, test, MountSpec::default().arg("--bpf").arg("off"), |_| {});
    sh("touch a && stat a > /dev/null", &m.mnt).timeout(LOOK).ok();
    let (top, stderr) = top_json(&m);
    assert_eq!(top["source"], "daemon", "{top}");
    assert_eq!(stderr.matches("eBPF counters unavailable").count(), 1, "said once on stderr: {stderr:?}");
    let stats = m.stats();
    assert_eq!(counts(&top, "requests"), counts(&stats, "count"));
    assert!(top["opcodes"]["LOOKUP"]["p50_us"].is_null(), "no kernel-side latency without eBPF: {top}");
}

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr")
}

/// GET `path` from `addr`; (status line, body). Bounded by timeouts.
fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read the response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP head and body");
    let status = head.lines().next().unwrap_or("").to_string();
    let len: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
        .expect("Content-Length");
    assert_eq!(len, body.len(), "Content-Length matches the body");
    (status, body.to_string())
}

/// One sample of an exposition: family-level name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Checks OpenMetrics text format rules we rely on and returns the samples:
/// HELP/TYPE before a family's samples, known types, sample names derived from
/// a declared family with the suffixes its type allows, well-formed labels,
/// numeric values, `# EOF` last, histogram buckets cumulative up to +Inf = _count.
fn parse_openmetrics(text: &str) -> Vec<Sample> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helps: BTreeSet<String> = BTreeSet::new();
    let mut samples = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "exposition ends with # EOF");
    for (i, line) in lines.iter().enumerate() {
        let ctx = || format!("line {}: {line:?}", i + 1);
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap();
            if kind == "EOF" {
                assert_eq!(i + 1, lines.len(), "# EOF only at the end ({})", ctx());
                continue;
            }
            let name = parts.next().unwrap_or_else(|| panic!("descriptor without a name ({})", ctx()));
            let arg = parts.next().unwrap_or("");
            assert!(valid_name(name), "bad metric name ({})", ctx());
            match kind {
                "HELP" => assert!(helps.insert(name.into()) && !arg.is_empty(), "one non-empty HELP ({})", ctx()),
                "TYPE" => {
                    let known = ["counter", "gauge", "histogram", "summary", "info", "stateset", "unknown"];
                    assert!(known.contains(&arg), "unknown type ({})", ctx());
                    assert!(types.insert(name.into(), arg.into()).is_none(), "TYPE twice ({})", ctx());
                }
                "UNIT" => assert!(name.ends_with(&format!("_{arg}")), "name ends with its unit ({})", ctx()),
                _ => panic!("unknown descriptor ({})", ctx()),
            }
            continue;
        }
        let (name_labels, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("sample without value ({})", ctx()));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value is not a number ({})", ctx())),
        };
        let (name, labels) = match name_labels.split_once('{') {
            None => (name_labels, BTreeMap::new()),
            Some((n, l)) => {
                (n, parse_labels(l.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels ({})", ctx())), &ctx))
            }
        };
        assert!(valid_name(name), "bad sample name ({})", ctx());
        let (family, ty) = types
            .iter()
            .filter(|(f, _)| name.starts_with(f.as_str()))
            .max_by_key(|(f, _)| f.len())
            .unwrap_or_else(|| panic!("sample of an undeclared family ({})", ctx()));
        assert!(helps.contains(family), "family {family} has HELP ({})", ctx());
        let suffix = &name[family.len()..];
        let allowed: &[&str] = match ty.as_str() {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            "gauge" | "unknown" => &[""],
            _ => &["", "_total", "_bucket", "_sum", "_count", "_info"],
        };
        assert!(allowed.contains(&suffix), "suffix {suffix:?} not allowed for a {ty} ({})", ctx());
        if suffix == "_total" || suffix == "_bucket" || suffix == "_count" {
            assert!(value >= 0.0, "negative count ({})", ctx());
        }
        samples.push(Sample { name: name.to_string(), labels, value });
    }
    check_histograms(&samples);
    samples
}

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_labels(s: &str, ctx: &dyn Fn() -> String) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("label without =\" ({})", ctx()));
        assert!(valid_name(key) && !key.contains(':'), "bad label name {key:?} ({})", ctx());
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => panic!("bad escape {other:?} ({})", ctx()),
                },
                Some((j, '"')) => break j,
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label value ({})", ctx()),
            }
        };
        assert!(out.insert(key.to_string(), value).is_none(), "label {key} twice ({})", ctx());
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    out
}

/// A histogram series: base name and its labels other than `le`.
type SeriesKey = (String, Vec<(String, String)>);

/// Buckets of each histogram series are cumulative and end with +Inf = _count.
fn check_histograms(samples: &[Sample]) {
    let mut series: BTreeMap<SeriesKey, Vec<(f64, f64)>> = BTreeMap::new();
    let mut count: BTreeMap<SeriesKey, f64> = BTreeMap::new();
    for s in samples {
        let rest: Vec<(String, String)> =
            s.labels.iter().filter(|(k, _)| k.as_str() != "le").map(|(k, v)| (k.clone(), v.clone())).collect();
        if let Some(base) = s.name.strip_suffix("_bucket") {
            let le = &s.labels["le"];
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().expect("le is a number") };
            series.entry((base.to_string(), rest)).or_default().push((le, s.value));
        } else if let Some(base) = s.name.strip_suffix("_count") {
            count.insert((base.to_string(), rest), s.value);
        }
    }
    for (key, buckets) in series {
        assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "{key:?}: buckets not cumulative");
        let last = buckets.last().unwrap();
        assert!(last.0.is_infinite(), "{key:?}: last bucket is +Inf");
        assert_eq!(Some(&last.1), count.get(&key), "{key:?}: +Inf bucket equals _count");
    }
}

fn value(samples: &[Sample], name: &str, label: (&str, &str)) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && s.labels.get(label.0).map(String::as_str) == Some(label.1))
        .map(|s| s.value)
}

#[test]
fn metrics_endpoint_serves_valid_openmetrics() {
    let test = "metrics_endpoint_serves_valid_openmetrics";
    if !require_fuse(test) {
        return;
    }
    let addr = free_port();
    let spec = MountSpec::default().arg("--cache").arg("none").arg("--metrics").arg(&addr.to_string());
    let m = Mounted::with(Fs::Memfs, test, spec, |_| {});
    sh("mkdir d && touch d/a d/b && for i in $(seq 1 50); do stat d/a d/b > /dev/null; done; cat d/nope 2>/dev/null; true", &m.mnt)
        .timeout(LOOK)
        .ok();
    let (top, _) = settled(&m);
    let (status, body) = http_get(addr, "/metrics");
    assert!(status.contains(" 200 "), "{status}");
    let samples = parse_openmetrics(&body);
    let stats = m.stats();
    let lookups = stats["opcodes"]["LOOKUP"]["count"].as_u64().unwrap() as f64;
    assert_eq!(value(&samples, "efuse_daemon_requests_total", ("opcode", "LOOKUP")), Some(lookups), "{body}");
    assert!(value(&samples, "efuse_daemon_errors_total", ("opcode", "LOOKUP")).unwrap() >= 1.0, "the miss: {body}");
    assert!(samples.iter().any(|s| s.name == "efuse_daemon_opens_total"), "{body}");
    for help in ["# UNIT efuse_kernel_request_duration_seconds seconds", "# HELP efuse_daemon_requests "] {
        assert!(body.contains(help) || top["source"] != "ebpf" && help.contains("kernel"), "missing {help:?}");
    }
    if require_ebpf(test, &top) {
        assert_eq!(value(&samples, "efuse_kernel_requests_total", ("opcode", "LOOKUP")), Some(lookups), "{body}");
        assert!(value(&samples, "efuse_kernel_request_duration_seconds_count", ("opcode", "LOOKUP")).unwrap() > 0.0);
        assert!(samples.iter().any(|s| s.name == "efuse_daemon_context_switches_total"), "{body}");
    }
    let (status, _) = http_get(addr, "/nope");
    assert!(status.contains(" 404 "), "{status}");
}

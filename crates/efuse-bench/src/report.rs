//! What a run found, and writing it out: `results.json` (raw numbers) and
//! `results.md` (tables with ratios to ext4, FUSE requests per workload).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::scale::Scale;
use crate::workloads::{Figures, Kind, Metric, Workload};

/// Counters read from `efuse stats --json`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StatsSnapshot {
    pub requests_total: u64,
    /// Opcode -> (count, errors).
    pub opcodes: BTreeMap<String, (u64, u64)>,
    /// passthrough / cached / direct opens.
    pub paths: BTreeMap<String, u64>,
}

impl StatsSnapshot {
    pub fn parse(text: &str) -> anyhow::Result<StatsSnapshot> {
        let v: serde_json::Value = serde_json::from_str(text.trim())?;
        let num = |x: Option<&serde_json::Value>| x.and_then(|n| n.as_u64()).unwrap_or(0);
        let mut s = StatsSnapshot { requests_total: num(v.get("requests_total")), ..Default::default() };
        if let Some(ops) = v.get("opcodes").and_then(|o| o.as_object()) {
            for (k, c) in ops {
                s.opcodes.insert(k.clone(), (num(c.get("count")), num(c.get("errors"))));
            }
        }
        if let Some(p) = v.get("paths").and_then(|o| o.as_object()) {
            for (k, c) in p {
                s.paths.insert(k.clone(), c.as_u64().unwrap_or(0));
            }
        }
        Ok(s)
    }

    /// `self - before`, counter by counter.
    pub fn since(&self, before: &StatsSnapshot) -> StatsSnapshot {
        let mut d = StatsSnapshot {
            requests_total: self.requests_total.saturating_sub(before.requests_total),
            ..Default::default()
        };
        for (k, (c, e)) in &self.opcodes {
            let (bc, be) = before.opcodes.get(k).copied().unwrap_or((0, 0));
            let (dc, de) = (c.saturating_sub(bc), e.saturating_sub(be));
            if dc > 0 || de > 0 {
                d.opcodes.insert(k.clone(), (dc, de));
            }
        }
        for (k, v) in &self.paths {
            d.paths.insert(k.clone(), v.saturating_sub(before.paths.get(k).copied().unwrap_or(0)));
        }
        d
    }
}

/// The kernel-side view from `efuse top --once --json` (eBPF when loaded).
#[derive(Clone, Debug, Default, Serialize)]
pub struct TopSnapshot {
    /// "ebpf" or "daemon".
    pub source: String,
    pub context_switches: u64,
    /// Opcode -> (requests, p50 µs, p99 µs), cumulative since mount.
    pub opcodes: BTreeMap<String, (u64, Option<f64>, Option<f64>)>,
}

impl TopSnapshot {
    pub fn parse(text: &str) -> anyhow::Result<TopSnapshot> {
        let v: serde_json::Value = serde_json::from_str(text.trim())?;
        let mut t = TopSnapshot {
            source: v.get("source").and_then(|s| s.as_str()).unwrap_or("?").to_string(),
            context_switches: v.get("context_switches").and_then(|n| n.as_u64()).unwrap_or(0),
            ..Default::default()
        };
        if let Some(ops) = v.get("opcodes").and_then(|o| o.as_object()) {
            for (k, o) in ops {
                let n = o.get("requests").and_then(|n| n.as_u64()).unwrap_or(0);
                let p = |f: &str| o.get(f).and_then(|x| x.as_f64());
                t.opcodes.insert(k.clone(), (n, p("p50_us"), p("p99_us")));
            }
        }
        Ok(t)
    }
}

/// FUSE requests per repetition (mean over the repetitions measured).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Requests {
    pub reps: u32,
    pub total_per_rep: f64,
    pub errors_per_rep: f64,
    pub opcodes_per_rep: BTreeMap<String, f64>,
    pub paths_per_rep: BTreeMap<String, f64>,
    /// Daemon context switches per repetition (eBPF sched_switch, or /proc).
    pub context_switches_per_rep: Option<f64>,
    /// Kernel-side latency of the busiest opcodes over the whole workload
    /// (send to reply, from the eBPF histograms): (opcode, p50 µs, p99 µs).
    pub kernel_latency: Vec<(String, f64, f64)>,
    /// Where the kernel-side figures came from ("ebpf" or "daemon").
    pub kernel_source: Option<String>,
}

impl Requests {
    pub fn from_deltas(deltas: &[StatsSnapshot]) -> Option<Requests> {
        if deltas.is_empty() {
            return None;
        }
        let n = deltas.len() as f64;
        let mut r = Requests { reps: deltas.len() as u32, ..Default::default() };
        for d in deltas {
            r.total_per_rep += d.requests_total as f64 / n;
            for (k, (c, e)) in &d.opcodes {
                *r.opcodes_per_rep.entry(k.clone()).or_default() += *c as f64 / n;
                r.errors_per_rep += *e as f64 / n;
            }
            for (k, v) in &d.paths {
                *r.paths_per_rep.entry(k.clone()).or_default() += *v as f64 / n;
            }
        }
        Some(r)
    }
}

/// One workload on one system.
#[derive(Clone, Debug, Serialize)]
pub struct SystemRun {
    pub system: String,
    pub ok: bool,
    /// Which step failed, and why.
    pub error: Option<String>,
    pub reps: Vec<Figures>,
    pub median: Figures,
    pub requests: Option<Requests>,
    pub commands: Vec<String>,
    /// Wall time of its own steps over the workload: mounts, fill, caches,
    /// repetitions, unmounts (the other systems' turns in between not counted).
    pub elapsed_s: f64,
    /// Machine-wide system calls and context switches of one extra,
    /// untimed repetition (`--count`).
    pub counted: Option<crate::counts::Counted>,
}

impl SystemRun {
    pub fn finish(
        system: &str,
        reps: Vec<Figures>,
        error: Option<String>,
        requests: Option<Requests>,
        commands: Vec<String>,
    ) -> SystemRun {
        let mut median = Figures::new();
        if let Some(first) = reps.first() {
            for k in first.keys() {
                let mut v: Vec<f64> = reps.iter().filter_map(|r| r.get(k).copied()).collect();
                v.sort_by(f64::total_cmp);
                median.insert(k.clone(), median_sorted(&v));
            }
        }
        SystemRun {
            system: system.to_string(),
            ok: error.is_none() && !reps.is_empty(),
            error,
            reps,
            median,
            requests,
            commands,
            elapsed_s: 0.0,
            counted: None,
        }
    }
}

fn median_sorted(v: &[f64]) -> f64 {
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct WorkloadResult {
    pub workload: Workload,
    pub runs: Vec<SystemRun>,
}

impl WorkloadResult {
    pub fn run(&self, system: &str) -> Option<&SystemRun> {
        self.runs.iter().find(|r| r.system == system)
    }

    /// `metric` on `system` relative to ext4 (rates: higher is better).
    pub fn ratio(&self, system: &str, metric: &str) -> Option<f64> {
        let base = self.run("ext4").filter(|r| r.ok)?.median.get(metric).copied()?;
        let v = self.run(system).filter(|r| r.ok)?.median.get(metric).copied()?;
        (base > 0.0 && v.is_finite()).then_some(v / base)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Meta {
    pub date_utc: String,
    pub host: String,
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub memory: String,
    pub disk: String,
    pub work_dir: String,
    pub efuse: String,
    pub fio: String,
    pub libfuse: String,
    /// The passthrough_hp given with `--libfuse-hp`, and its libfuse.
    pub libfuse_hp: String,
    /// What the machine-dependent datasets hold.
    pub datasets: crate::datasets::Made,
    pub command_line: String,
    pub installed: Vec<String>,
    pub duration_s: f64,
    pub scale: Scale,
    pub scale_text: String,
    pub systems: Vec<(String, String)>,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Results {
    pub meta: Meta,
    pub results: Vec<WorkloadResult>,
}

/// A number with sensible precision for a table.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.abs() >= 100_000.0 {
        let s = format!("{:.0}", v);
        // Thousands separators.
        let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if v.abs() >= 100.0 {
        format!("{:.0}", v)
    } else if v.abs() >= 10.0 {
        format!("{:.1}", v)
    } else {
        format!("{:.2}", v)
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{r:.2}x"))
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// results.md.
pub fn markdown(res: &Results, charts: &[String]) -> String {
    let m = &res.meta;
    let mut o = String::new();
    let _ = writeln!(o, "# efuse bench results\n");
    let _ = writeln!(o, "Generated by `{}` on {} (took {:.0} s).\n", m.command_line, m.date_utc, m.duration_s);
    let _ = writeln!(o, "## Machine\n");
    let _ = writeln!(o, "| | |\n|---|---|");
    for (k, v) in [
        ("host", &m.host),
        ("kernel", &m.kernel),
        ("cpu", &format!("{} ({} CPUs)", m.cpu, m.cpus)),
        ("memory", &m.memory),
        ("disk (work dir)", &m.disk),
        ("work dir", &m.work_dir),
        ("efuse", &m.efuse),
        ("fio", &m.fio),
        ("libfuse", &m.libfuse),
        ("libfuse passthrough_hp", &m.libfuse_hp),
    ] {
        let _ = writeln!(o, "| {k} | {} |", md_escape(v));
    }
    if !m.installed.is_empty() {
        let _ = writeln!(o, "| installed by the bench | {} |", m.installed.join(", "));
    }
    let _ = writeln!(o, "\n## Scale\n\n{}", m.scale_text);
    if m.datasets.src_files > 0 {
        let _ = writeln!(
            o,
            "\nThe source tree here: {} files, {} MiB.",
            m.datasets.src_files,
            fmt_num(m.datasets.src_bytes as f64 / 1048576.0)
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "## Systems\n");
    let _ = writeln!(o, "| system | mounted with |\n|---|---|");
    for (name, cmd) in &m.systems {
        let _ = writeln!(o, "| {name} | `{}` |", md_escape(cmd));
    }
    for n in &m.notes {
        let _ = writeln!(o, "\n{n}");
    }

    let systems: Vec<&str> = m.systems.iter().map(|(s, _)| s.as_str()).collect();
    let _ = writeln!(o, "\n## Summary: speed relative to ext4 (median; higher is better)\n");
    let _ = write!(o, "| workload | cache | metric |");
    for s in &systems {
        let _ = write!(o, " {s} |");
    }
    let _ = write!(o, "\n|---|---|---|");
    for _ in &systems {
        let _ = write!(o, "---:|");
    }
    let _ = writeln!(o);
    for w in &res.results {
        for met in w.workload.metrics.iter().filter(|x| x.chart.is_some()) {
            let _ = write!(o, "| {} | {} | {} |", w.workload.name, w.workload.cache.label(), met.label);
            for s in &systems {
                let cell = match w.run(s) {
                    None => "not run".to_string(),
                    Some(r) if !r.ok => "**failed**".to_string(),
                    Some(r) if via_page_cache(w, r, &m.scale) => format!("{} (cached)", fmt_ratio(w.ratio(s, met.key))),
                    Some(_) => fmt_ratio(w.ratio(s, met.key)),
                };
                let _ = write!(o, " {cell} |");
            }
            let _ = writeln!(o);
        }
    }
    if !charts.is_empty() {
        let _ = writeln!(o, "\n## Charts (ratio to ext4, log scale)\n");
        for c in charts {
            let _ = writeln!(o, "![{c}]({c})\n");
        }
    }

    let _ = writeln!(o, "\n## Workloads\n");
    for w in &res.results {
        workload_section(&mut o, w, &systems);
    }
    o
}

/// A direct=1 fio run that went through the backing page cache.
fn via_page_cache(w: &WorkloadResult, r: &SystemRun, scale: &Scale) -> bool {
    match w.workload.kind {
        Kind::Fio { n, direct: true } => crate::workloads::went_through_page_cache(scale, n, &r.median),
        _ => false,
    }
}

fn workload_section(o: &mut String, w: &WorkloadResult, systems: &[&str]) {
    let wl = &w.workload;
    let _ = writeln!(o, "### {}\n\n{}.\n\nCache state: {}\n", wl.name, wl.description, wl.cache_text());
    let charted: Vec<&Metric> = wl.metrics.iter().filter(|m| m.chart.is_some()).collect();
    let _ = write!(o, "| system |");
    for met in &wl.metrics {
        let _ = write!(o, " {} |", met.label);
    }
    for met in &charted {
        let _ = write!(o, " {} vs ext4 |", met.label);
    }
    let _ = write!(o, " reps |\n|---|");
    for _ in 0..wl.metrics.len() + charted.len() {
        let _ = write!(o, "---:|");
    }
    let _ = writeln!(o, "---:|");
    for s in systems {
        let Some(r) = w.run(s) else { continue };
        let _ = write!(o, "| {s} |");
        if !r.ok {
            let err = r.error.as_deref().unwrap_or("no repetition finished");
            let _ = write!(o, " **failed**: {} |", md_escape(err));
            for _ in 1..wl.metrics.len() + charted.len() {
                let _ = write!(o, " |");
            }
            let _ = writeln!(o, " {} |", r.reps.len());
            continue;
        }
        for met in &wl.metrics {
            let _ = write!(o, " {} |", r.median.get(met.key).map_or("-".into(), |v| fmt_num(*v)));
        }
        for met in &charted {
            let _ = write!(o, " {} |", fmt_ratio(w.ratio(s, met.key)));
        }
        let _ = writeln!(o, " {} |", r.reps.len());
    }
    let with_requests: Vec<&SystemRun> = w.runs.iter().filter(|r| r.requests.is_some()).collect();
    if !with_requests.is_empty() {
        let plain = w.run("efuse-plain").and_then(|r| r.requests.as_ref()).map(|q| q.total_per_rep);
        let _ = writeln!(o, "\nFUSE requests per repetition (daemon counters, `efuse stats --json` deltas):\n");
        let _ = writeln!(
            o,
            "| system | requests | efuse vs efuse-plain | errors | top opcodes | opens: passthrough / cached / direct | daemon context switches | kernel-side p50/p99 µs (eBPF) |\n|---|---:|---:|---:|---|---|---:|---|"
        );
        for r in with_requests {
            let Some(q) = &r.requests else { continue };
            let mut ops: Vec<(&String, &f64)> = q.opcodes_per_rep.iter().collect();
            ops.sort_by(|a, b| b.1.total_cmp(a.1));
            let top: Vec<String> = ops.iter().take(5).map(|(k, v)| format!("{k} {}", fmt_num(**v))).collect();
            let path = |k: &str| fmt_num(q.paths_per_rep.get(k).copied().unwrap_or(0.0));
            let vs = match plain {
                Some(p) if p > 0.0 && r.system.starts_with("efuse") && r.system != "efuse-plain" => {
                    format!("{:.3}x", q.total_per_rep / p)
                }
                _ => "-".into(),
            };
            let cs = q.context_switches_per_rep.map_or("-".into(), fmt_num);
            let lat: Vec<String> =
                q.kernel_latency.iter().map(|(op, p50, p99)| format!("{op} {p50:.0}/{p99:.0}")).collect();
            let lat = if lat.is_empty() { "-".to_string() } else { lat.join(", ") };
            let _ = writeln!(
                o,
                "| {} | {} | {vs} | {} | {} | {} / {} / {} | {cs} | {lat} |",
                r.system,
                fmt_num(q.total_per_rep),
                fmt_num(q.errors_per_rep),
                top.join(", "),
                path("passthrough"),
                path("cached"),
                path("direct")
            );
        }
    }
    let counted: Vec<(&SystemRun, &crate::counts::Counted)> =
        w.runs.iter().filter_map(|r| r.counted.as_ref().map(|c| (r, c))).collect();
    if !counted.is_empty() {
        let _ = writeln!(
            o,
            "\nSystem calls and context switches of one more repetition, untimed, machine-wide (every process: \
             the workload's, the daemon's, the bench's; system calls by eBPF on raw_syscalls:sys_enter, context \
             switches from /proc/stat):\n"
        );
        let _ =
            writeln!(o, "| system | system calls | vs ext4 | context switches | vs ext4 |\n|---|---:|---:|---:|---:|");
        let base = w.run("ext4").and_then(|r| r.counted.as_ref());
        let ratio = |v: f64, b: Option<f64>| match b {
            Some(b) if b > 0.0 => format!("{:.2}x", v / b),
            _ => "-".into(),
        };
        for (r, c) in counted {
            let sc = c.syscalls.map_or("-".into(), |v| fmt_num(v as f64));
            let sr =
                c.syscalls.map_or("-".into(), |v| ratio(v as f64, base.and_then(|b| b.syscalls).map(|b| b as f64)));
            let cs = fmt_num(c.context_switches as f64);
            let cr = ratio(c.context_switches as f64, base.map(|b| b.context_switches as f64));
            let _ = writeln!(o, "| {} | {sc} | {sr} | {cs} | {cr} |", r.system);
        }
    }
    if let Some(r) = w.runs.iter().find(|r| !r.commands.is_empty()) {
        let _ =
            writeln!(o, "\nCommands (as run on {}; other systems run the same in their own directory):\n", r.system);
        let _ = writeln!(o, "```");
        let mut seen = std::collections::BTreeSet::new();
        for c in &r.commands {
            if seen.insert(c) {
                let _ = writeln!(o, "{c}");
            }
        }
        let _ = writeln!(o, "```");
    }
    let _ = writeln!(o);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_delta() {
        let a = StatsSnapshot::parse(r#"{"requests_total":10,"opcodes":{"LOOKUP":{"count":4,"errors":1}},"paths":{"passthrough":1,"cached":0,"direct":2}}"#).unwrap();
        let b = StatsSnapshot::parse(r#"{"requests_total":25,"opcodes":{"LOOKUP":{"count":9,"errors":1},"READ":{"count":3,"errors":0}},"paths":{"passthrough":4,"cached":0,"direct":2}}"#).unwrap();
        let d = b.since(&a);
        assert_eq!(d.requests_total, 15);
        assert_eq!(d.opcodes["LOOKUP"], (5, 0));
        assert_eq!(d.opcodes["READ"], (3, 0));
        assert_eq!(d.paths["passthrough"], 3);
        let r = Requests::from_deltas(&[d.clone(), d]).unwrap();
        assert_eq!(r.total_per_rep, 15.0);
    }

    fn meta(scale: Scale, systems: &[&str]) -> Meta {
        Meta {
            date_utc: "now".into(),
            host: "h".into(),
            kernel: "k".into(),
            cpu: "c".into(),
            cpus: 2,
            memory: "m".into(),
            disk: "d".into(),
            work_dir: "w".into(),
            efuse: "e".into(),
            fio: "f".into(),
            libfuse: "l".into(),
            libfuse_hp: "not run".into(),
            datasets: Default::default(),
            command_line: "efuse bench".into(),
            installed: vec![],
            duration_s: 1.0,
            scale_text: scale.describe(),
            scale,
            systems: systems.iter().map(|s| (s.to_string(), format!("mount {s}"))).collect(),
            notes: vec![],
        }
    }

    #[test]
    fn the_report_states_cache_states_and_page_cache_runs() {
        let scale = Scale::quick();
        let all = Workload::all(&scale);
        let pick = |n: &str| all.iter().find(|w| w.name == n).cloned().unwrap();
        let fig = |iops: f64, cached: Option<f64>| {
            let mut f = Figures::from([("iops".to_string(), iops)]);
            if let Some(c) = cached {
                f.insert(crate::workloads::BACKING_CACHED.into(), c);
            }
            f
        };
        let run = |sys: &str, f: Figures| SystemRun::finish(sys, vec![f], None, None, vec![]);
        let res = Results {
            meta: meta(scale.clone(), &["ext4", "efuse-plain", "efuse"]),
            results: vec![
                WorkloadResult {
                    workload: pick("fio-w1-direct"),
                    runs: vec![
                        run("ext4", fig(1000.0, Some(0.0))),
                        run("efuse-plain", fig(2000.0, Some(200.0))),
                        run("efuse", fig(900.0, Some(0.0))),
                    ],
                },
                WorkloadResult {
                    workload: pick("fio-w1-buffered"),
                    runs: vec![run("ext4", fig(1000.0, None)), run("efuse", fig(500.0, None))],
                },
            ],
        };
        let md = markdown(&res, &[]);
        assert!(md.contains("| workload | cache | metric | ext4 | efuse-plain | efuse |"), "{md}");
        assert!(md.contains("| fio-w1-direct | cold | IOPS (r+w) | 1.00x | 2.00x (cached) | 0.90x |"), "{md}");
        assert!(md.contains("| fio-w1-buffered | warm | IOPS (r+w) | 1.00x | not run | 0.50x |"), "{md}");
        assert!(md.contains("Cache state: **cold** ("), "{md}");
        assert!(md.contains("Cache state: **warm** ("), "{md}");
        assert!(md.contains("`--invalidate=0`"), "{md}");
    }

    #[test]
    fn medians() {
        let reps = vec![
            Figures::from([("x".to_string(), 3.0)]),
            Figures::from([("x".to_string(), 1.0)]),
            Figures::from([("x".to_string(), 2.0)]),
        ];
        let r = SystemRun::finish("ext4", reps, None, None, vec![]);
        assert_eq!(r.median["x"], 2.0);
        assert!(r.ok);
        assert_eq!(fmt_num(1234567.0), "1,234,567");
        assert_eq!(fmt_num(0.123), "0.12");
    }
}

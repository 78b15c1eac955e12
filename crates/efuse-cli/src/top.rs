//! `efuse top MOUNTPOINT [--once] [--json]`: the kernel-side view of a mount
//! (eBPF: per-opcode requests, errors, send-to-reply latency) beside the
//! daemon's own counters, live in the terminal or as one JSON snapshot.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use efuse::observe::TopReport;
use efuse::stats::StatsReport;

const REFRESH: Duration = Duration::from_secs(1);

fn query<T: serde::de::DeserializeOwned>(mp: &Path, command: &str) -> Result<T> {
    let text = efuse::control::query(mp, command)
        .with_context(|| format!("is {} an efuse mount with a live daemon?", mp.display()))?;
    serde_json::from_str(&text).with_context(|| format!("the daemon answered `{command}` with: {}", text.trim()))
}

/// One reading of both sources.
struct Sample {
    at: Instant,
    top: TopReport,
    stats: StatsReport,
}

fn sample(mp: &Path) -> Result<Sample> {
    Ok(Sample { top: query(mp, "top")?, stats: query(mp, "stats")?, at: Instant::now() })
}

pub fn run(mountpoint: &Path, once: bool, json: bool) -> Result<()> {
    let mp = efuse::mount::absolute_mountpoint(mountpoint)
        .with_context(|| format!("mount point {}", mountpoint.display()))?;
    let first = sample(&mp)?;
    if let Some(why) = &first.top.bpf_unavailable {
        eprintln!("efuse top: eBPF counters unavailable ({why}); showing the daemon's own counts, without kernel-side latency");
    }
    if json {
        if !once {
            bail!("--json prints one snapshot: use it with --once");
        }
        println!("{}", serde_json::to_string(&first.top)?);
        return Ok(());
    }
    if once || !std::io::stdout().is_terminal() {
        print!("{}", render_text(&first, None));
        return Ok(());
    }
    live(&mp, first)
}

/// Per-second rates between two samples.
fn rate(now: u64, before: Option<u64>, secs: f64) -> Option<f64> {
    before.map(|b| now.saturating_sub(b) as f64 / secs.max(1e-3))
}

struct Row {
    name: String,
    rate: Option<f64>,
    requests: u64,
    errors: u64,
    p50: Option<f64>,
    p99: Option<f64>,
    daemon: u64,
}

fn rows(s: &Sample, prev: Option<&Sample>) -> Vec<Row> {
    let secs = prev.map(|p| s.at.duration_since(p.at).as_secs_f64()).unwrap_or(1.0);
    let mut names: Vec<&String> = s.top.opcodes.keys().chain(s.stats.opcodes.keys()).collect();
    names.sort();
    names.dedup();
    let mut out: Vec<Row> = names
        .into_iter()
        .map(|name| {
            let t = s.top.opcodes.get(name);
            let before = prev.map(|p| p.top.opcodes.get(name).map_or(0, |o| o.requests));
            Row {
                name: name.clone(),
                rate: rate(t.map_or(0, |o| o.requests), before, secs),
                requests: t.map_or(0, |o| o.requests),
                errors: t.map_or(0, |o| o.errors),
                p50: t.and_then(|o| o.p50_us),
                p99: t.and_then(|o| o.p99_us),
                daemon: s.stats.opcodes.get(name).map_or(0, |o| o.count),
            }
        })
        .collect();
    out.sort_by(|a, b| b.rate.unwrap_or(0.0).total_cmp(&a.rate.unwrap_or(0.0)).then(b.requests.cmp(&a.requests)));
    out
}

fn us(v: Option<f64>) -> String {
    match v {
        Some(x) if x >= 1000.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.1}"),
        None => "-".into(),
    }
}

fn opt_rate(v: Option<f64>) -> String {
    v.map_or("-".into(), |r| format!("{r:.0}"))
}

fn header_lines(s: &Sample, prev: Option<&Sample>) -> Vec<String> {
    let secs = prev.map(|p| s.at.duration_since(p.at).as_secs_f64()).unwrap_or(1.0);
    let st = &s.stats;
    let total_rate = rate(s.top.requests_total, prev.map(|p| p.top.requests_total), secs);
    let cs_rate = rate(s.top.context_switches, prev.map(|p| p.top.context_switches), secs);
    let source = match &s.top.bpf_unavailable {
        None => "kernel (eBPF tracepoints)".to_string(),
        Some(why) => format!("daemon counters (eBPF unavailable: {why})"),
    };
    vec![
        format!(
            "{} on {}  pid {}  up {:.0}s  transport {} x{}  source: {source}",
            st.fs, st.mountpoint, st.pid, st.uptime_secs, st.transport, st.threads
        ),
        format!(
            "requests: {} sent by the kernel ({}/s), {} served by the daemon   context switches: {} ({}/s)",
            s.top.requests_total,
            opt_rate(total_rate),
            st.requests_total,
            s.top.context_switches,
            opt_rate(cs_rate)
        ),
        format!(
            "opens: {} passthrough, {} cached, {} direct{}",
            st.paths.passthrough,
            st.paths.cached,
            st.paths.direct,
            s.top.syscalls.map(|n| format!("   daemon syscalls: {n}")).unwrap_or_default()
        ),
    ]
}

const COLUMNS: [&str; 7] = ["OPCODE", "REQ/S", "REQUESTS", "ERRORS", "P50 us", "P99 us", "DAEMON"];

fn render_text(s: &Sample, prev: Option<&Sample>) -> String {
    let mut out = header_lines(s, prev).join("\n");
    out.push('\n');
    out.push_str(&format!(
        "{:<16} {:>9} {:>10} {:>8} {:>9} {:>9} {:>10}\n",
        COLUMNS[0], COLUMNS[1], COLUMNS[2], COLUMNS[3], COLUMNS[4], COLUMNS[5], COLUMNS[6]
    ));
    for r in rows(s, prev) {
        out.push_str(&format!(
            "{:<16} {:>9} {:>10} {:>8} {:>9} {:>9} {:>10}\n",
            r.name,
            opt_rate(r.rate),
            r.requests,
            r.errors,
            us(r.p50),
            us(r.p99),
            r.daemon
        ));
    }
    out
}

fn live(mp: &Path, first: Sample) -> Result<()> {
    use crossterm::event::{self, Event, KeyCode, KeyModifiers};
    use ratatui::layout::{Constraint, Layout};
    use ratatui::style::{Modifier, Style};
    use ratatui::widgets::{Block, Borders, Paragraph, Row as TRow, Table};

    let mut terminal = ratatui::try_init().context("setting up the terminal")?;
    let result = (|| -> Result<()> {
        let mut prev: Option<Sample> = None;
        let mut cur = first;
        let mut last_error: Option<String> = None;
        loop {
            let header = header_lines(&cur, prev.as_ref());
            let table_rows: Vec<TRow> = rows(&cur, prev.as_ref())
                .into_iter()
                .map(|r| {
                    TRow::new(vec![
                        r.name,
                        opt_rate(r.rate),
                        r.requests.to_string(),
                        r.errors.to_string(),
                        us(r.p50),
                        us(r.p99),
                        r.daemon.to_string(),
                    ])
                })
                .collect();
            let footer = match &last_error {
                Some(e) => format!("q: quit   (last refresh failed: {e})"),
                None => "q: quit   refresh 1s   latency: kernel send -> daemon reply".to_string(),
            };
            terminal.draw(|f| {
                let [top, table, bottom] =
                    Layout::vertical([Constraint::Length(5), Constraint::Min(3), Constraint::Length(1)])
                        .areas(f.area());
                f.render_widget(
                    Paragraph::new(header.join("\n"))
                        .block(Block::default().borders(Borders::ALL).title(" efuse top ")),
                    top,
                );
                let widths = [
                    Constraint::Length(16),
                    Constraint::Length(9),
                    Constraint::Length(11),
                    Constraint::Length(8),
                    Constraint::Length(9),
                    Constraint::Length(9),
                    Constraint::Length(11),
                ];
                f.render_widget(
                    Table::new(table_rows, widths)
                        .header(TRow::new(COLUMNS.to_vec()).style(Style::default().add_modifier(Modifier::BOLD))),
                    table,
                );
                f.render_widget(Paragraph::new(footer), bottom);
            })?;
            let deadline = Instant::now() + REFRESH;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                if event::poll(left)? {
                    if let Event::Key(k) = event::read()? {
                        let ctrl_c = k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                        if ctrl_c || matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) {
                            return Ok(());
                        }
                    }
                }
            }
            match sample(mp) {
                Ok(next) => {
                    prev = Some(std::mem::replace(&mut cur, next));
                    last_error = None;
                }
                Err(e) => last_error = Some(format!("{e:#}")),
            }
        }
    })();
    ratatui::restore();
    result
}

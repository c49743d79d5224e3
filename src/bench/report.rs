//! What a bench run reports: one row per transport (and the baseline), as a terminal table,
//! JSON and an SVG latency CDF; and the SVG time chart of a soak (`soak.rs` has its figures).

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;
use serde::Serialize;

use super::process::Machine;

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
    /// Samples.
    pub count: u64,
}

impl Latency {
    /// Percentiles of a histogram of microseconds.
    pub fn of(histogram: &Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            p50: ms(histogram.value_at_quantile(0.5)),
            p90: ms(histogram.value_at_quantile(0.9)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p999: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
            mean: histogram.mean() / 1000.0,
            count: histogram.len(),
        }
    }
}

/// One transport's results.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Transport name (or `baseline-ws`).
    pub transport: String,
    /// Subscribers.
    pub clients: usize,
    /// Messages per second published.
    pub rate: f64,
    /// Seconds from the first session's creation to the last member's join with its
    /// transport attached (with `--concurrent`, for all transports together).
    pub join_secs: f64,
    /// Messages the server accepted.
    pub published: u64,
    /// Messages the publishers could not send.
    pub publish_errors: u64,
    /// First deliveries of a message to a subscriber (whole run).
    pub delivered: u64,
    /// published x clients.
    pub expected: u64,
    /// Accepted messages a subscriber never received.
    pub lost: u64,
    /// Repeated deliveries.
    pub duplicated: u64,
    /// Deliveries older than an earlier one from the same publisher.
    pub out_of_order: u64,
    /// `seq` jumps other than +1.
    pub seq_gaps: u64,
    /// `error`/`reset` events and failed requests seen by subscribers.
    pub errors: u64,
    /// Transports that ended before the bench stopped them.
    pub disconnects: u64,
    /// Deliveries per second in the measurement window.
    pub deliveries_per_sec: f64,
    /// Latency from due time to arrival (messages due in the window).
    pub latency_ms: Latency,
    /// Bytes through the subscribers' sockets per delivery, both directions, headers and
    /// framing included.
    pub bytes_per_delivery: f64,
    /// Server CPU time per delivery in the window (`--spawn` only; shared by all rows with
    /// `--concurrent`).
    pub server_cpu_us_per_delivery: Option<f64>,
    /// Server CPU use in the window, percent of one core.
    pub server_cpu_percent: Option<f64>,
    /// Server peak resident memory (`--spawn` only).
    pub server_peak_rss_bytes: Option<u64>,
    /// Events the server counted as delivered on this transport during the run (/metrics).
    pub server_events_delivered: Option<u64>,
    /// The generator's own CPU use in the window, percent of one core.
    pub generator_cpu_percent: Option<f64>,
    /// Latency histogram, for the chart.
    #[serde(skip)]
    pub histogram: Option<Histogram<u64>>,
    /// With `--resume`: the resumes and each second's latency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume: Option<Resumes>,
}

impl Row {
    /// Whether anything was lost, repeated, reordered or refused (with `--resume`, transports
    /// cut off and refused requests are what the run is about: only a loss, a duplicate, a
    /// reordering or a seq gap counts).
    pub fn unhealthy(&self) -> bool {
        let refused = match self.resume {
            Some(_) => 0,
            None => self.publish_errors + self.errors + self.disconnects,
        };
        self.lost + self.duplicated + self.out_of_order + self.seq_gaps + refused > 0
    }
}

/// What `--resume` measured for one transport.
#[derive(Debug, Clone, Serialize)]
pub struct Resumes {
    /// Subscribers whose transport was cut off at least once.
    pub cut_subscribers: u64,
    /// Transports attached again after a cut.
    pub resumed: u64,
    /// From a transport's end to its next one attached.
    pub resume_ms: Latency,
    /// Second by second since message 0 was due.
    pub seconds: Vec<Second>,
}

/// One second of a `--resume` run.
#[derive(Debug, Clone, Serialize)]
pub struct Second {
    /// Seconds since message 0 was due.
    pub second: usize,
    /// Latency of the messages that arrived in it, to subscribers never cut off.
    pub survivors_ms: Option<Latency>,
    /// The same, to subscribers cut off at least once.
    pub resumed_ms: Option<Latency>,
    /// Transports cut off in it.
    pub cuts: u64,
    /// Transports attached again in it.
    pub resumes: u64,
}

/// The `--resume` table: per transport, the resumes, then each second.
pub fn resume_table(rows: &[Row]) -> String {
    let mut out = String::new();
    for row in rows {
        let Some(resume) = &row.resume else {
            continue;
        };
        let r = &resume.resume_ms;
        out.push_str(&format!(
            "{}: {} subscribers cut off, {} resumes; resume took p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms\n",
            row.transport, resume.cut_subscribers, resume.resumed, r.p50, r.p99, r.max
        ));
        out.push_str(&format!(
            "{:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>6} {:>7}\n",
            "second",
            "surv p50",
            "surv p99",
            "surv max",
            "res p50",
            "res p99",
            "res max",
            "cuts",
            "resumes"
        ));
        for second in &resume.seconds {
            let cells = |l: &Option<Latency>| match l {
                Some(l) => format!("{:>10.1} {:>10.1} {:>10.1}", l.p50, l.p99, l.max),
                None => format!("{:>10} {:>10} {:>10}", "-", "-", "-"),
            };
            out.push_str(&format!(
                "{:>6} {} {} {:>6} {:>7}\n",
                second.second,
                cells(&second.survivors_ms),
                cells(&second.resumed_ms),
                second.cuts,
                second.resumes
            ));
        }
    }
    out
}

/// Idle memory of one transport.
#[derive(Debug, Clone, Serialize)]
pub struct IdleRow {
    /// Transport name.
    pub transport: String,
    /// Sessions opened.
    pub sessions: usize,
    /// Sessions whose transport was open when memory was read.
    pub attached: usize,
    /// Server RSS before opening them.
    pub rss_before_bytes: u64,
    /// Server RSS with all of them open.
    pub rss_after_bytes: u64,
    /// (after - before) / attached.
    pub bytes_per_session: f64,
    /// Server CPU use while they idled, percent of one core.
    pub server_cpu_percent: Option<f64>,
}

/// The whole run, as written by `--json`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The flags of the run.
    pub config: serde_json::Value,
    /// The machine.
    pub machine: Machine,
    /// One per transport.
    pub transports: Vec<Row>,
    /// `--idle` results.
    pub idle: Vec<IdleRow>,
}

fn opt(value: Option<f64>, digits: usize) -> String {
    value.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// The readable table.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<14} {:>6} {:>7} {:>5} {:>9} {:>5} {:>4} {:>4} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8} {:>7} {:>8} {:>6}\n",
        "transport", "subs", "join s", "rate", "delivered", "lost", "dup", "ooo", "deliv/s",
        "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "B/deliv", "srv us/d", "srv %",
        "srv MiB", "gen %"
    ));
    for row in rows {
        let l = &row.latency_ms;
        out.push_str(&format!(
            "{:<14} {:>6} {:>7.2} {:>5} {:>9} {:>5} {:>4} {:>4} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7.0} {:>8} {:>7} {:>8} {:>6}\n",
            row.transport, row.clients, row.join_secs, row.rate, row.delivered, row.lost, row.duplicated,
            row.out_of_order, row.deliveries_per_sec, l.p50, l.p90, l.p99, l.p999, l.max,
            row.bytes_per_delivery, opt(row.server_cpu_us_per_delivery, 2),
            opt(row.server_cpu_percent, 0),
            opt(row.server_peak_rss_bytes.map(|b| b as f64 / 1048576.0), 1),
            opt(row.generator_cpu_percent, 0),
        ));
    }
    for row in rows.iter().filter(|r| r.unhealthy()) {
        out.push_str(&format!(
            "\n!!! {}: NOT A HEALTHY RUN: lost {}, duplicated {}, out of order {}, seq gaps {}, \
             publish errors {}, error events {}, disconnects {} (of {} expected deliveries)\n",
            row.transport,
            row.lost,
            row.duplicated,
            row.out_of_order,
            row.seq_gaps,
            row.publish_errors,
            row.errors,
            row.disconnects,
            row.expected
        ));
    }
    out
}

/// The idle-memory table.
pub fn idle_table(rows: &[IdleRow]) -> String {
    let mut out = format!(
        "{:<14} {:>8} {:>8} {:>12} {:>12} {:>14} {:>6}\n",
        "transport", "sessions", "attached", "RSS before", "RSS after", "per session", "srv %"
    );
    for row in rows {
        out.push_str(&format!(
            "{:<14} {:>8} {:>8} {:>10.1}Mi {:>10.1}Mi {:>11.2} KiB {:>6}\n",
            row.transport,
            row.sessions,
            row.attached,
            row.rss_before_bytes as f64 / 1048576.0,
            row.rss_after_bytes as f64 / 1048576.0,
            row.bytes_per_session / 1024.0,
            opt(row.server_cpu_percent, 0),
        ));
    }
    out
}

/// Line colours, in the order curves are drawn.
const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(100, 100, 100),
];

/// Draws each curve in its colour, with a legend at `legend`.
fn draw_curves<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    curves: &[(impl AsRef<str>, Vec<(f64, f64)>)],
    legend: SeriesLabelPosition,
) -> Result<(), Box<dyn std::error::Error>>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (i, (name, points)) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(name.as_ref())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// One panel of a time chart: what its y axis shows, its curves and its markers.
#[derive(Debug, Clone)]
pub struct Panel<'a> {
    /// The y axis's description.
    pub y_desc: &'a str,
    /// (name, points) of each curve.
    pub curves: Vec<(String, Vec<(f64, f64)>)>,
    /// (name, x) of each vertical marker line, drawn in grey.
    pub markers: Vec<(String, f64)>,
}

/// Draws `panels` stacked, on one linear x axis (`x_desc`), each y axis from 0.
pub fn timeline_svg(
    panels: &[Panel<'_>],
    x_desc: &str,
    title: &str,
    path: &Path,
) -> Result<(), String> {
    let points = || {
        panels
            .iter()
            .flat_map(|p| p.curves.iter().flat_map(|c| &c.1))
    };
    if points().next().is_none() {
        return Err("no samples to draw".into());
    }
    let x_high = points().map(|p| p.0).fold(0.0, f64::max).max(1.0);
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let height = 80 + 300 * panels.len() as u32;
        let root = SVGBackend::new(path, (900, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, ("sans-serif", 20))?;
        for (panel, area) in panels.iter().zip(root.split_evenly((panels.len(), 1))) {
            let y_high = panel
                .curves
                .iter()
                .flat_map(|c| c.1.iter().map(|p| p.1))
                .fold(0.0, f64::max)
                .max(1.0);
            let mut chart = ChartBuilder::on(&area)
                .margin(16)
                .x_label_area_size(44)
                .y_label_area_size(64)
                .build_cartesian_2d(0.0..x_high * 1.02, 0.0..y_high * 1.1)?;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(panel.y_desc)
                .draw()?;
            for (name, x) in &panel.markers {
                let grey = RGBColor(150, 150, 150);
                chart
                    .draw_series(LineSeries::new([(*x, 0.0), (*x, y_high * 1.1)], grey))?
                    .label(name.as_str())
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], grey));
            }
            draw_curves(&mut chart, &panel.curves, SeriesLabelPosition::LowerRight)?;
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| format!("drawing {}: {e}", path.display()))
}

/// Draws the latency CDF of every row on a log latency axis.
pub fn svg(rows: &[Row], title: &str, path: &Path) -> Result<(), String> {
    let curves: Vec<(&str, Vec<(f64, f64)>)> = rows
        .iter()
        .filter_map(|row| {
            let histogram = row.histogram.as_ref().filter(|h| !h.is_empty())?;
            let mut points = Vec::new();
            let mut q = 0.0;
            while q <= 0.9999 {
                let ms = histogram.value_at_quantile(q) as f64 / 1000.0;
                points.push((ms.max(0.001), q * 100.0));
                q += if q < 0.9 { 0.005 } else { (1.0 - q) / 10.0 };
            }
            points.push((histogram.max() as f64 / 1000.0, 100.0));
            Some((row.transport.as_str(), points))
        })
        .collect();
    if curves.is_empty() {
        return Err("no latency samples to draw".into());
    }
    let low = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|p| p.0))
        .fold(f64::INFINITY, f64::min);
    let high = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|p| p.0))
        .fold(0.0, f64::max);
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(
                ((low * 0.8).max(0.001)..(high * 1.25)).log_scale(),
                0.0..100.0,
            )?;
        chart
            .configure_mesh()
            .x_desc("latency from scheduled send, ms (log)")
            .y_desc("deliveries, % at or below")
            .draw()?;
        draw_curves(&mut chart, &curves, SeriesLabelPosition::LowerRight)?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| format!("drawing {}: {e}", path.display()))
}

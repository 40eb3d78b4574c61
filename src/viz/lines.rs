//! Line plots: SSM state norms per token, losses and other metrics of one or several runs.

use super::*;

// ---------------------------------------------------------------------------------------------
// Line plots: state norms, losses

/// One curve.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    /// `(x, y)` points in order of x.
    pub points: Vec<(f64, f64)>,
}

/// A line chart.
#[derive(Debug, Clone)]
pub(super) struct LineFigure {
    pub(super) title: String,
    x_label: String,
    y_label: String,
    series: Vec<Series>,
    /// Shaded x ranges with their legend label.
    bands: Vec<(Range<f64>, String)>,
    log_y: bool,
    legend: bool,
    note: Option<String>,
}

impl LineFigure {
    fn draw_on<DB, Y>(&self, root: &DrawingArea<DB, Shift>, x: Range<f64>, y: Y) -> Result<()>
    where
        DB: DrawingBackend,
        Y: AsRangedCoord<Value = f64>,
        Y::CoordDescType: ValueFormatter<f64>,
    {
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, font(22))
            .margin(16)
            .x_label_area_size(50)
            .y_label_area_size(80)
            .build_cartesian_2d(x, y)
            .map_err(de)?;
        chart
            .configure_mesh()
            .x_desc(self.x_label.as_str())
            .y_desc(self.y_label.as_str())
            .label_style(font(15))
            .axis_desc_style(font(17))
            .light_line_style(RGBColor(235, 235, 235))
            .bold_line_style(RGBColor(205, 205, 205))
            .x_label_formatter(&|v| tick(*v))
            .y_label_formatter(&|v| tick(*v))
            .draw()
            .map_err(de)?;
        let (y_lo, y_hi) = {
            let r = chart.y_range();
            (r.start, r.end)
        };
        for (range, label) in &self.bands {
            let band = RGBColor(255, 200, 200).mix(0.45);
            chart
                .draw_series([Rectangle::new(
                    [(range.start, y_lo), (range.end, y_hi)],
                    band.filled(),
                )])
                .map_err(de)?
                .label(label.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 18, y + 6)], band.filled()));
        }
        let n = self.series.len();
        for (i, s) in self.series.iter().enumerate() {
            let color = series_color(i, n);
            let drawn = chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(if n > 12 { 1 } else { 2 }),
                ))
                .map_err(de)?;
            if self.legend {
                drawn.label(s.label.as_str()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
                });
            }
        }
        if self.legend || !self.bands.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(150, 150, 150))
                .label_font(font(15))
                .draw()
                .map_err(de)?;
        }
        if let Some(note) = &self.note {
            let (_, h) = root.dim_in_pixel();
            root.draw(&Text::new(note.clone(), (90, h as i32 - 22), font(14)))
                .map_err(de)?;
        }
        Ok(())
    }
}

impl Draw for LineFigure {
    fn size(&self) -> (u32, u32) {
        (1000, 620)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let pts = || self.series.iter().flat_map(|s| s.points.iter());
        let finite = |v: &f64| v.is_finite();
        let xs: Vec<f64> = pts().map(|p| p.0).filter(finite).collect();
        let ys: Vec<f64> = pts()
            .map(|p| p.1)
            .filter(finite)
            .filter(|&y| !self.log_y || y > 0.0)
            .collect();
        if xs.is_empty() || ys.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: nothing to plot (no finite{} points)",
                self.title,
                if self.log_y { " positive" } else { "" }
            )));
        }
        let (mut x0, mut x1) = min_max(&xs);
        for (r, _) in &self.bands {
            x0 = x0.min(r.start);
            x1 = x1.max(r.end);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        let (y0, y1) = min_max(&ys);
        if self.log_y {
            let (lo, hi) = (y0 / 1.25, if y1 > y0 { y1 * 1.25 } else { y0 * 2.0 });
            let (bold, light) = log_ticks(lo, hi);
            self.draw_on(
                root,
                x0..x1,
                (lo..hi)
                    .log_scale()
                    .with_key_points(bold)
                    .with_light_points(light),
            )
        } else {
            let pad = if y1 > y0 { (y1 - y0) * 0.06 } else { 1.0 };
            let lo = if y0 >= 0.0 && y0 - pad < 0.0 {
                0.0
            } else {
                y0 - pad
            };
            self.draw_on(root, x0..x1, lo..y1 + pad)
        }
    }
}

/// An axis label: integers as integers, others with up to 3 significant decimals, very large or
/// small numbers in scientific notation.
pub(super) fn tick(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e6).contains(&a) {
        return format!("{v:.1e}");
    }
    if (v - v.round()).abs() < 1e-9 * a.max(1.0) {
        return format!("{v:.0}");
    }
    let decimals = (2 - a.log10().floor() as i32).clamp(0, 6) as usize;
    let s = format!("{v:.decimals$}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Labelled ticks at 1, 2, 5 x 10^k and faint grid lines at every integer multiple of 10^k
/// between `lo` and `hi` (> 0).
fn log_ticks(lo: f64, hi: f64) -> (Vec<f64>, Vec<f64>) {
    let (mut bold, mut light) = (Vec::new(), Vec::new());
    let decades = (hi / lo).log10();
    let steps: &[f64] = if decades > 4.0 {
        &[1.0]
    } else {
        &[1.0, 2.0, 5.0]
    };
    let mut e = lo.log10().floor() as i32;
    while 10f64.powi(e) <= hi {
        let base = 10f64.powi(e);
        for m in 1..10 {
            let v = m as f64 * base;
            if v >= lo && v <= hi {
                light.push(v);
                if steps.contains(&(m as f64)) {
                    bold.push(v);
                }
            }
        }
        e += 1;
    }
    (bold, light)
}

pub(super) fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        })
}

/// Draw curves `series` (a legend entry each) to `path`; `log_y` plots y on a log scale
/// (non-positive values are left out).
pub fn plot_lines(
    series: &[Series],
    title: &str,
    x_label: &str,
    y_label: &str,
    log_y: bool,
    path: &Path,
) -> Result<()> {
    lines_figure(series, title, x_label, y_label, log_y)?.save(path)
}

/// The figure of [`plot_lines`], in memory.
pub fn lines_figure(
    series: &[Series],
    title: &str,
    x_label: &str,
    y_label: &str,
    log_y: bool,
) -> Result<Figure> {
    Ok(Figure::new(FigureKind::Lines(LineFigure {
        title: title.to_string(),
        x_label: x_label.to_string(),
        y_label: y_label.to_string(),
        series: series.to_vec(),
        bands: Vec::new(),
        log_y,
        legend: true,
        note: None,
    })))
}

/// The Frobenius norm of each head's SSM state after every token (`norms`: `[heads, T]`, from
/// [`crate::model::mamba2::state_norms`]), image token spans shaded.
pub fn plot_state_norms(
    norms: &Tensor,
    spans: &[Range<usize>],
    title: &str,
    path: &Path,
) -> Result<()> {
    state_norms_figure(norms, spans, title)?.save(path)
}

/// The figure of [`plot_state_norms`], in memory.
pub fn state_norms_figure(norms: &Tensor, spans: &[Range<usize>], title: &str) -> Result<Figure> {
    let rows = match norms.rank() {
        1 => vec![norms.to_dtype(DType::F32)?.to_vec1::<f32>()?],
        2 => norms.to_dtype(DType::F32)?.to_vec2::<f32>()?,
        _ => {
            return Err(Error::Invalid(format!(
                "state norms: expected [heads, T], got {:?}",
                norms.dims()
            )))
        }
    };
    let heads = rows.len();
    let series: Vec<Series> = rows
        .iter()
        .enumerate()
        .map(|(h, r)| Series {
            label: format!("head {h}"),
            points: r
                .iter()
                .enumerate()
                .map(|(t, &v)| (t as f64, v as f64))
                .collect(),
        })
        .collect();
    // Beyond a dozen heads a legend would hide the plot: colour runs along viridis instead.
    let legend = heads <= 12;
    let note = (!legend).then(|| {
        format!(
            "colour: head 0 (dark purple) to head {} (yellow-green)",
            heads - 1
        )
    });
    Ok(Figure::new(FigureKind::Lines(LineFigure {
        title: title.to_string(),
        x_label: "token position t".into(),
        y_label: "||S_t|| (Frobenius, per head)".into(),
        series,
        bands: spans
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let label = if spans.len() == 1 {
                    "image tokens".to_string()
                } else {
                    format!("image {i} tokens")
                };
                (s.start as f64 - 0.5..s.end as f64 - 0.5, label)
            })
            .collect(),
        log_y: false,
        legend,
        note,
    })))
}

/// One metric of a run's `metrics.jsonl` as a curve over `step`: the records of kind `kind`
/// ("train" or "eval") holding a number under `key` (e.g. "loss", "lr", a loss term). `path` is
/// the metrics file or the run folder holding it; the label is `label`.
pub fn read_metric_series(path: &Path, kind: &str, key: &str, label: &str) -> Result<Series> {
    let file = if path.is_dir() {
        path.join(crate::train::run::METRICS)
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
    let mut points = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::BadConfig {
            path: file.clone(),
            reason: format!("line {}: {e}", i + 1),
        })?;
        if v.get("kind").and_then(|k| k.as_str()) != Some(kind) {
            continue;
        }
        if let (Some(step), Some(y)) = (
            v.get("step").and_then(|s| s.as_f64()),
            v.get(key).and_then(|s| s.as_f64()),
        ) {
            points.push((step, y));
        }
    }
    if points.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no `{kind}` record has a number under `{key}`",
            file.display()
        )));
    }
    Ok(Series {
        label: label.to_string(),
        points,
    })
}

/// Curves of `keys` ("train" records) from one or several runs (`runs`: label and run folder or
/// metrics file) on one chart, legend `"{run}: {key}"` (just the run with one key, just the key
/// with one run). Log y-axis when every value is positive and they span more than 20x.
pub fn plot_runs(runs: &[(&str, &Path)], keys: &[&str], title: &str, path: &Path) -> Result<()> {
    runs_figure(runs, keys, title)?.save(path)
}

/// The figure of [`plot_runs`], in memory.
pub fn runs_figure(runs: &[(&str, &Path)], keys: &[&str], title: &str) -> Result<Figure> {
    let mut series = Vec::new();
    for (run, file) in runs {
        for key in keys {
            let label = match (runs.len(), keys.len()) {
                (_, 1) => run.to_string(),
                (1, _) => key.to_string(),
                _ => format!("{run}: {key}"),
            };
            series.push(read_metric_series(file, "train", key, &label)?);
        }
    }
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .collect();
    let (lo, hi) = min_max(&ys);
    let log_y = lo > 0.0 && hi / lo > 20.0;
    let y_label = if keys.len() == 1 { keys[0] } else { "value" };
    lines_figure(&series, title, "step", y_label, log_y)
}

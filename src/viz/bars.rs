//! Bar charts: one bar per label, for sweeps.

use super::*;

// ---------------------------------------------------------------------------------------------
// Bars

#[derive(Debug, Clone)]
pub(super) struct BarFigure {
    pub(super) title: String,
    y_label: String,
    bars: Vec<(String, f64)>,
}

impl Draw for BarFigure {
    fn size(&self) -> (u32, u32) {
        ((160 + 90 * self.bars.len() as u32).clamp(600, 1800), 600)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let n = self.bars.len();
        let values: Vec<f64> = self.bars.iter().map(|b| b.1).collect();
        let (lo, hi) = min_max(&values);
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        let pad = if hi > lo { (hi - lo) * 0.12 } else { 1.0 };
        let y = (if lo < 0.0 { lo - pad } else { 0.0 })..(hi + pad);
        let labels: Vec<String> = self.bars.iter().map(|b| b.0.clone()).collect();
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, font(22))
            .margin(16)
            .x_label_area_size(50)
            .y_label_area_size(80)
            // Integer ranges include their end: 0..n-1 makes n segments.
            .build_cartesian_2d((0..n as i32 - 1).into_segmented(), y)
            .map_err(de)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc(self.y_label.as_str())
            .label_style(font(15))
            .axis_desc_style(font(17))
            .x_labels(n)
            .y_label_formatter(&|v| tick(*v))
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => labels.get(*i as usize).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(de)?;
        chart
            .draw_series(self.bars.iter().enumerate().map(|(i, (_, v))| {
                let mut r = Rectangle::new(
                    [
                        (SegmentValue::Exact(i as i32), 0.0),
                        (SegmentValue::Exact(i as i32 + 1), *v),
                    ],
                    PALETTE[0].filled(),
                );
                r.set_margin(0, 0, 12, 12);
                r
            }))
            .map_err(de)?;
        chart
            .draw_series(self.bars.iter().enumerate().map(|(i, (_, v))| {
                let pos = if *v >= 0.0 { VPos::Bottom } else { VPos::Top };
                Text::new(
                    format_bar_value(*v),
                    (SegmentValue::CenterOf(i as i32), *v),
                    font(14).pos(Pos::new(HPos::Center, pos)),
                )
            }))
            .map_err(de)?;
        Ok(())
    }
}

fn format_bar_value(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e4 || v.abs() < 1e-3) {
        format!("{v:.3e}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.4}")
    }
}

/// One bar per `(label, value)`, in order, each with its value written above it (sweeps:
/// ratio -> accuracy, loss -> agreement, ...).
pub fn plot_bars(bars: &[(String, f64)], title: &str, y_label: &str, path: &Path) -> Result<()> {
    bars_figure(bars, title, y_label)?.save(path)
}

/// The figure of [`plot_bars`], in memory.
pub fn bars_figure(bars: &[(String, f64)], title: &str, y_label: &str) -> Result<Figure> {
    if bars.is_empty() {
        return Err(Error::Invalid(format!("{title}: no bars to plot")));
    }
    if let Some((l, _)) = bars.iter().find(|b| !b.1.is_finite()) {
        return Err(Error::Invalid(format!("{title}: bar `{l}` is not finite")));
    }
    Ok(Figure::new(FigureKind::Bars(BarFigure {
        title: title.to_string(),
        y_label: y_label.to_string(),
        bars: bars.to_vec(),
    })))
}

//! Attention maps: heat maps of attention (or implicit attention) weights, head average then
//! every head, image tokens marked.

use super::*;

// ---------------------------------------------------------------------------------------------
// Attention maps

/// How heat maps are drawn.
#[derive(Debug, Clone)]
pub struct MapStyle {
    /// Colour = `(|w| / max|w|)^gamma` per map; below 1 lifts small weights out of the dark
    /// (attention often piles onto a few tokens).
    pub gamma: f64,
    /// At most this many cells per axis in the average maps (longer sequences are averaged in
    /// blocks, keeping the token axis).
    pub max_cells: usize,
    /// The same for each head's small map.
    pub max_head_cells: usize,
}

impl Default for MapStyle {
    fn default() -> Self {
        Self {
            gamma: 0.5,
            max_cells: 160,
            max_head_cells: 48,
        }
    }
}

/// One square matrix `[T, T]` block-averaged to at most `cells` per side: returns the block
/// boundaries (token positions, `n + 1` of them) and the `n x n` means of `|w|`.
fn pool(map: &[Vec<f32>], cells: usize) -> (Vec<f64>, Vec<Vec<f64>>) {
    let t = map.len();
    let n = t.min(cells.max(1));
    let edges: Vec<usize> = (0..=n).map(|i| i * t / n).collect();
    let mut out = vec![vec![0.0; n]; n];
    for (bi, row) in out.iter_mut().enumerate() {
        for (bj, cell) in row.iter_mut().enumerate() {
            let mut sum = 0.0f64;
            for r in &map[edges[bi]..edges[bi + 1]] {
                sum += r[edges[bj]..edges[bj + 1]]
                    .iter()
                    .map(|v| v.abs() as f64)
                    .sum::<f64>();
            }
            let count = (edges[bi + 1] - edges[bi]) * (edges[bj + 1] - edges[bj]);
            *cell = sum / count.max(1) as f64;
        }
    }
    (edges.iter().map(|&e| e as f64).collect(), out)
}

/// `[H, T, T]` (or `[T, T]`) as nested f32 vectors, with the mean over heads appended last.
fn maps_with_mean(t: &Tensor, what: &str) -> Result<Vec<Vec<Vec<f32>>>> {
    let t = match t.rank() {
        2 => t.unsqueeze(0)?,
        3 => t.clone(),
        _ => {
            return Err(Error::Invalid(format!(
                "{what}: expected [heads, T, T], got {:?}",
                t.dims()
            )))
        }
    };
    let (_, a, b) = t.dims3()?;
    if a != b {
        return Err(Error::Invalid(format!(
            "{what}: maps must be square, got {:?}",
            t.dims()
        )));
    }
    let t = t.to_dtype(DType::F32)?;
    let mean = t.mean_keepdim(0)?;
    Ok(Tensor::cat(&[&t, &mean], 0)?.to_vec3::<f32>()?)
}

/// Draw one heat map into `area`: token axes, query down and key across, image spans marked.
fn draw_map<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    map: &[Vec<f32>],
    caption: &str,
    spans: &[Range<usize>],
    style: &MapStyle,
    cells: usize,
    axes: bool,
) -> Result<()> {
    let t = map.len() as f64;
    let (edges, cells) = pool(map, cells);
    let max = cells
        .iter()
        .flatten()
        .copied()
        .fold(0.0f64, f64::max)
        .max(1e-30);
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, font(if axes { 18 } else { 13 }))
        .margin(if axes { 8 } else { 3 });
    if axes {
        builder.x_label_area_size(42).y_label_area_size(52);
    }
    let mut chart = builder.build_cartesian_2d(0f64..t, t..0f64).map_err(de)?;
    if axes {
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("key token s")
            .y_desc("query token t")
            .label_style(font(13))
            .axis_desc_style(font(14))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .x_labels(6)
            .y_labels(6)
            .draw()
            .map_err(de)?;
    }
    let n = cells.len();
    let mut rects = Vec::with_capacity(n * n);
    for i in 0..n {
        for j in 0..n {
            // Blocks wholly above the diagonal are causally masked: left blank.
            if edges[j] >= edges[i + 1] {
                continue;
            }
            let v = (cells[i][j] / max).powf(style.gamma) as f32;
            rects.push(Rectangle::new(
                [(edges[j], edges[i]), (edges[j + 1], edges[i + 1])],
                ViridisRGB::get_color(v.clamp(0.0, 1.0)).filled(),
            ));
        }
    }
    chart.draw_series(rects).map_err(de)?;
    let width = if axes { 2 } else { 1 };
    for s in spans {
        let (a, b) = (s.start as f64, s.end as f64);
        // The image block of the matrix (queries and keys both image tokens), and the band of
        // text queries reading image keys below it.
        chart
            .draw_series([
                PathElement::new(
                    vec![(a, a), (b, a), (b, b), (a, b), (a, a)],
                    IMAGE_MARK.stroke_width(width),
                ),
                PathElement::new(vec![(a, b), (a, t)], IMAGE_MARK.stroke_width(width)),
                PathElement::new(vec![(b, b), (b, t)], IMAGE_MARK.stroke_width(width)),
            ])
            .map_err(de)?;
    }
    // A frame, so blank (masked) corners still read as part of the map.
    chart
        .draw_series([PathElement::new(
            vec![(0.0, 0.0), (t, 0.0), (t, t), (0.0, t), (0.0, 0.0)],
            BLACK.stroke_width(1),
        )])
        .map_err(de)?;
    Ok(())
}

/// A vertical colour bar from 0 to "max" with the gamma stated.
fn draw_colorbar<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, gamma: f64) -> Result<()> {
    let (w, h) = area.dim_in_pixel();
    let (x0, x1) = (10i32, 34i32);
    let (y0, y1) = (40i32, h as i32 - 60);
    let steps = 100;
    for k in 0..steps {
        let v = 1.0 - k as f32 / steps as f32;
        let ya = y0 + (y1 - y0) * k / steps;
        let yb = y0 + (y1 - y0) * (k + 1) / steps;
        area.draw(&Rectangle::new(
            [(x0, ya), (x1, yb + 1)],
            ViridisRGB::get_color(v).filled(),
        ))
        .map_err(de)?;
    }
    area.draw(&Rectangle::new([(x0, y0), (x1, y1)], BLACK.stroke_width(1)))
        .map_err(de)?;
    area.draw(&Text::new("max", (x1 + 4, y0 - 6), font(13)))
        .map_err(de)?;
    area.draw(&Text::new("0", (x1 + 4, y1 - 8), font(13)))
        .map_err(de)?;
    let note = if (gamma - 1.0).abs() < 1e-9 {
        "linear".to_string()
    } else {
        format!("(|w|/max)^{gamma}")
    };
    area.draw(&Text::new(note, (2, y1 + 12), font(12)))
        .map_err(de)?;
    let _ = w;
    Ok(())
}

/// Two rows of attention maps for one input and one layer (or any two `[H, T, T]` stacks on
/// the same tokens).
#[derive(Debug, Clone)]
pub(super) struct AttentionFigure {
    pub(super) title: String,
    rows: Vec<(String, Vec<Vec<Vec<f32>>>)>,
    spans: Vec<Range<usize>>,
    style: MapStyle,
}

impl AttentionFigure {
    fn heads(&self) -> usize {
        self.rows.iter().map(|r| r.1.len() - 1).max().unwrap_or(1)
    }
    fn grid(&self) -> (usize, usize) {
        let h = self.heads();
        // Near-square grids up to 16 heads, then twice as wide as tall (32 heads: 8 x 4).
        let cols = if h <= 16 {
            (h as f64).sqrt().ceil() as usize
        } else {
            ((2 * h) as f64).sqrt().ceil() as usize
        }
        .clamp(1, h.max(1));
        (cols, h.div_ceil(cols))
    }
    fn tile(&self) -> u32 {
        let (cols, rows) = self.grid();
        // Tiles fill about the height of the average map beside them.
        (440 / rows as u32).clamp(95, 220).min(1000 / cols as u32)
    }
    const AVG: u32 = 470;
    /// Room for a head tile's caption above its square map.
    const CAP: u32 = 20;
    const TITLE: u32 = 56;
    const LABEL: u32 = 34;
    const BAR: u32 = 110;
}

impl Draw for AttentionFigure {
    fn size(&self) -> (u32, u32) {
        let (cols, rows) = self.grid();
        let tile = self.tile();
        let row_h = Self::AVG.max(rows as u32 * (tile + Self::CAP));
        let w = Self::AVG + cols as u32 * tile + Self::BAR + 30;
        let h = Self::TITLE + self.rows.len() as u32 * (Self::LABEL + row_h) + 40;
        (w, h)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let (w, h) = self.size();
        let (cols, grid_rows) = self.grid();
        let tile = self.tile();
        let row_h = Self::AVG.max(grid_rows as u32 * (tile + Self::CAP));
        root.draw(&Text::new(self.title.clone(), (16, 14), font(22)))
            .map_err(de)?;
        let spans = self
            .spans
            .iter()
            .map(|s| format!("{} to {}", s.start, s.end - 1))
            .collect::<Vec<_>>()
            .join(", ");
        let legend = if spans.is_empty() {
            "no image tokens".to_string()
        } else {
            format!(
                "red box and lines: image tokens at positions {spans}; text tokens elsewhere \
                 (token 0 is the first token of the prompt)"
            )
        };
        root.draw(&Text::new(legend, (16, 38), font(14).color(&IMAGE_MARK)))
            .map_err(de)?;
        for (r, (label, maps)) in self.rows.iter().enumerate() {
            let top = (Self::TITLE + r as u32 * (Self::LABEL + row_h)) as i32;
            root.draw(&Text::new(label.clone(), (16, top + 8), font(19)))
                .map_err(de)?;
            let body_top = top + Self::LABEL as i32;
            let avg_area = root.clone().shrink((0, body_top), (Self::AVG, Self::AVG));
            let heads = maps.len() - 1;
            draw_map(
                &avg_area,
                &maps[heads],
                &format!("mean over {heads} heads"),
                &self.spans,
                &self.style,
                self.style.max_cells,
                true,
            )?;
            for (k, map) in maps[..heads].iter().enumerate() {
                let (gx, gy) = ((k % cols) as u32, (k / cols) as u32);
                let area = root.clone().shrink(
                    (
                        (Self::AVG + 10 + gx * tile) as i32,
                        body_top + (gy * (tile + Self::CAP)) as i32,
                    ),
                    (tile, tile + Self::CAP),
                );
                draw_map(
                    &area,
                    map,
                    &format!("head {k}"),
                    &self.spans,
                    &self.style,
                    self.style.max_head_cells,
                    false,
                )?;
            }
        }
        let bar = root.clone().shrink(
            (
                (w - Self::BAR) as i32,
                Self::TITLE as i32 + Self::LABEL as i32,
            ),
            (Self::BAR, h - Self::TITLE - Self::LABEL),
        );
        draw_colorbar(&bar.shrink((0, 0), (Self::BAR, 420)), self.style.gamma)
    }
}

/// Teacher attention `[H, T, T]` above the hybrid's implicit attention `[H', T, T]` for one input
/// and layer, head averages on the left and every head on the right, image token spans marked
/// (`spans`, token positions), to `path`. Each map is coloured by `|w|` relative to its own
/// maximum.
pub fn plot_attention_maps(
    teacher: &Tensor,
    hybrid: &Tensor,
    spans: &[Range<usize>],
    title: &str,
    style: &MapStyle,
    path: &Path,
) -> Result<()> {
    attention_maps_figure(teacher, hybrid, spans, title, style)?.save(path)
}

/// The figure of [`plot_attention_maps`], in memory.
pub fn attention_maps_figure(
    teacher: &Tensor,
    hybrid: &Tensor,
    spans: &[Range<usize>],
    title: &str,
    style: &MapStyle,
) -> Result<Figure> {
    let a = maps_with_mean(teacher, "teacher attention")?;
    let b = maps_with_mean(hybrid, "implicit attention")?;
    if a[0].len() != b[0].len() {
        return Err(Error::Invalid(format!(
            "teacher maps cover {} tokens, hybrid maps {}",
            a[0].len(),
            b[0].len()
        )));
    }
    let t = a[0].len();
    if let Some(s) = spans.iter().find(|s| s.end > t || s.start >= s.end) {
        return Err(Error::Invalid(format!(
            "image span {}..{} does not fit {t} tokens",
            s.start, s.end
        )));
    }
    let fig = AttentionFigure {
        title: title.to_string(),
        rows: vec![
            ("Teacher: softmax attention weights".to_string(), a),
            (
                "Hybrid: Mamba-2 implicit attention |C_t.B_s exp(sum dt A) dt_s|".to_string(),
                b,
            ),
        ],
        spans: spans.to_vec(),
        style: style.clone(),
    };
    Ok(Figure::new(FigureKind::Attention(fig)))
}

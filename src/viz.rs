//! Figures, to PNG or SVG (chosen by the file extension), written atomically.
//!
//! * [`plot_attention_maps`] / [`plot_attention_vs_ssm`]: for one input and one layer, the
//!   teacher's attention (head average, then every head) above the hybrid's implicit attention
//!   ([`crate::model::mamba2::implicit_attention`]), on the same token axes, image tokens marked.
//! * [`plot_state_norms`]: the norm of each head's SSM state after every token.
//! * [`plot_lines`] / [`plot_runs`]: curves such as losses, from a run's `metrics.jsonl`
//!   ([`read_metric_series`]), one or several runs.
//! * [`plot_bars`]: one bar per label, for sweeps.
//!
//! Every plotting function takes plain data (tensors, vectors, labels), so scripts and notebooks
//! can call it with what they have; [`attention_vs_ssm`] gathers the data for the first one from
//! a teacher and a hybrid with the decoder's capture mechanism.
//!
//! Text is drawn with DejaVu Sans embedded in the crate (a subset), or with the TrueType font that
//! `$MATVLM_FONT` names.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Tensor};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::checkpoint::write_atomic;
use crate::model::decoder::{Capture, Mixer};
use crate::model::mamba2::{implicit_attention, state_norms};
use crate::model::vlm::Vlm;
use crate::tokenize::{single_turn_prompt, IMAGE_TOKEN};
use crate::{Error, Result};

// ---------------------------------------------------------------------------------------------
// Fonts and output

/// The environment variable naming a TrueType font file to draw text with.
pub const FONT_ENV: &str = "MATVLM_FONT";

const FONT: &str = "sans-serif";

/// The font every figure is drawn with unless [`FONT_ENV`] names another: DejaVu Sans cut down to
/// Latin, Greek, arrows and maths symbols (49 KB; licence in assets/fonts/), so that figures look
/// the same on every machine and need no system font.
const EMBEDDED_FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans-subset.ttf");

/// Register the font once per process; every later call returns the first outcome.
fn ensure_font() -> Result<()> {
    static FONT_READY: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    FONT_READY
        .get_or_init(|| {
            let (bytes, what): (&'static [u8], String) = match std::env::var_os(FONT_ENV) {
                Some(p) => {
                    let path = PathBuf::from(p);
                    let bytes = std::fs::read(&path).map_err(|e| {
                        format!("cannot read the font {} ({FONT_ENV}): {e}", path.display())
                    })?;
                    // plotters keeps fonts for the life of the process; one leak per process.
                    (
                        Box::leak(bytes.into_boxed_slice()),
                        path.display().to_string(),
                    )
                }
                None => (EMBEDDED_FONT, "the embedded DejaVu Sans".into()),
            };
            plotters::style::register_font(FONT, FontStyle::Normal, bytes)
                .map_err(|_| format!("{what} is not a TrueType/OpenType font"))?;
            Ok(())
        })
        .clone()
        .map_err(Error::Other)
}

fn font(size: u32) -> TextStyle<'static> {
    (FONT, size).into_font().color(&BLACK)
}

/// A drawing error as ours.
fn de<E: std::fmt::Display>(e: E) -> Error {
    Error::Other(format!("drawing a figure: {e}"))
}

/// Something drawable: a size in pixels and a way to draw itself on any plotters backend.
trait Draw {
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>;
}

/// `fig` as PNG bytes.
fn render_png<F: Draw>(fig: &F) -> Result<Vec<u8>> {
    ensure_font()?;
    let (w, h) = fig.size();
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(de)?;
        fig.draw(&root)?;
        root.present().map_err(de)?;
    }
    let img = image::RgbImage::from_raw(w, h, buf)
        .ok_or_else(|| Error::Other("figure buffer has the wrong size".into()))?;
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| Error::Other(format!("encoding a figure as PNG: {e}")))?;
    Ok(out.into_inner())
}

/// `fig` as SVG text.
fn render_svg<F: Draw>(fig: &F) -> Result<String> {
    ensure_font()?;
    let (w, h) = fig.size();
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(de)?;
        fig.draw(&root)?;
        root.present().map_err(de)?;
    }
    Ok(text)
}

/// The kinds of figure this module draws.
#[derive(Debug, Clone)]
enum FigureKind {
    Attention(AttentionFigure),
    Lines(LineFigure),
    Bars(BarFigure),
}

/// A figure held in memory, drawn when asked for: as PNG bytes ([`Figure::png`]), SVG text
/// ([`Figure::svg`]), a file ([`Figure::save`]) or inline in a Jupyter notebook (evcxr calls
/// `evcxr_display`, see [`crate::display`]). Every `plot_*` function of this module is its
/// `*_figure` twin followed by [`Figure::save`].
#[derive(Debug, Clone)]
pub struct Figure {
    kind: FigureKind,
}

impl Figure {
    fn new(kind: FigureKind) -> Self {
        Self { kind }
    }

    /// Width and height in pixels (of the PNG; the SVG has the same user units).
    pub fn size(&self) -> (u32, u32) {
        match &self.kind {
            FigureKind::Attention(f) => f.size(),
            FigureKind::Lines(f) => f.size(),
            FigureKind::Bars(f) => f.size(),
        }
    }

    /// The title drawn on top.
    pub fn title(&self) -> &str {
        match &self.kind {
            FigureKind::Attention(f) => &f.title,
            FigureKind::Lines(f) => &f.title,
            FigureKind::Bars(f) => &f.title,
        }
    }

    /// The figure as PNG bytes.
    pub fn png(&self) -> Result<Vec<u8>> {
        match &self.kind {
            FigureKind::Attention(f) => render_png(f),
            FigureKind::Lines(f) => render_png(f),
            FigureKind::Bars(f) => render_png(f),
        }
    }

    /// The figure as SVG text.
    pub fn svg(&self) -> Result<String> {
        match &self.kind {
            FigureKind::Attention(f) => render_svg(f),
            FigureKind::Lines(f) => render_svg(f),
            FigureKind::Bars(f) => render_svg(f),
        }
    }

    /// Write the figure to `path` as PNG or SVG, chosen by the extension (`.png`, `.svg`),
    /// atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        let bytes = match ext.as_str() {
            "png" => self
                .png()
                .map_err(|e| Error::Other(format!("{}: {e}", path.display())))?,
            "svg" => self.svg()?.into_bytes(),
            _ => {
                return Err(Error::Invalid(format!(
                    "{}: figures are written as .png or .svg",
                    path.display()
                )))
            }
        };
        write_atomic(path, &bytes)
    }
}

/// Ten well-separated line colours (matplotlib's tab10).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Colour of series `i` of `n`: the palette for up to 10, a viridis ramp beyond.
fn series_color(i: usize, n: usize) -> RGBColor {
    if n <= PALETTE.len() {
        PALETTE[i]
    } else {
        ViridisRGB::get_color(i as f32 / (n - 1).max(1) as f32 * 0.9)
    }
}

/// Colour marking image tokens.
const IMAGE_MARK: RGBColor = RGBColor(230, 30, 30);

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
struct AttentionFigure {
    title: String,
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

// ---------------------------------------------------------------------------------------------
// Attention vs SSM: the data

/// Everything the attention-vs-SSM figures show, for one input and one layer.
#[derive(Debug, Clone)]
pub struct AttentionVsSsm {
    pub layer: usize,
    /// The teacher's attention weights `[heads, T, T]` (f32).
    pub teacher_attention: Tensor,
    /// The hybrid mixer's implicit attention `[heads, T, T]` (f32).
    pub implicit_attention: Tensor,
    /// The hybrid mixer's SSM state norms `[heads, T]` (f32).
    pub state_norms: Tensor,
    /// Token positions of each image.
    pub image_spans: Vec<Range<usize>>,
}

/// Run `teacher` and `hybrid` on one input row (token ids with [`IMAGE_TOKEN`] placeholders,
/// and the images' pixel values `[N, 3, H, W]`), capturing layer `layer`: the teacher's attention
/// weights there, and the hybrid mixer's input, from which its implicit attention and state
/// norms are computed. The layer must be attention in the teacher and Mamba in the hybrid.
pub fn attention_vs_ssm(
    teacher: &Vlm,
    hybrid: &Vlm,
    row: &[i64],
    pixel_values: Option<&Tensor>,
    layer: usize,
) -> Result<AttentionVsSsm> {
    let mamba = match hybrid.decoder.blocks.get(layer).map(|b| &b.mixer) {
        Some(Mixer::Mamba2(m)) => m,
        Some(Mixer::Attention(_)) => {
            return Err(Error::Invalid(format!(
                "layer {layer} of the hybrid is attention; its Mamba layers are {:?}",
                hybrid.decoder.mamba_layers()
            )))
        }
        None => {
            return Err(Error::Invalid(format!(
                "the hybrid has no layer {layer} ({} layers)",
                hybrid.decoder.blocks.len()
            )))
        }
    };
    if !matches!(
        teacher.decoder.blocks.get(layer).map(|b| &b.mixer),
        Some(Mixer::Attention(_))
    ) {
        return Err(Error::Invalid(format!(
            "layer {layer} of the teacher is not an attention layer"
        )));
    }
    let only = Some(vec![layer]);
    let (_, got) = teacher.forward(
        &[row.to_vec()],
        pixel_values,
        &Capture {
            attn_weights: true,
            layers: only.clone(),
            ..Capture::default()
        },
    )?;
    let key = format!("layers.{layer}.attn_weights");
    let teacher_attention = got
        .get(&key)
        .ok_or_else(|| Error::Other(format!("the teacher forward did not capture {key}")))?
        .squeeze(0)?
        .to_dtype(DType::F32)?;
    let (_, got) = hybrid.forward(
        &[row.to_vec()],
        pixel_values,
        &Capture {
            mixer: true,
            layers: only,
            ..Capture::default()
        },
    )?;
    let key = format!("layers.{layer}.mixer_input");
    let x = got
        .get(&key)
        .ok_or_else(|| Error::Other(format!("the hybrid forward did not capture {key}")))?;
    let implicit = implicit_attention(mamba, x)?.to_dtype(DType::F32)?;
    let norms = state_norms(mamba, x)?.to_dtype(DType::F32)?;
    let len = implicit.dim(1)?;
    // Each placeholder became the same number of image vectors: `len = text + k * n`.
    let markers: Vec<usize> = row
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == IMAGE_TOKEN)
        .map(|(i, _)| i)
        .collect();
    let mut image_spans = Vec::new();
    if !markers.is_empty() {
        let per_image = (len + markers.len() - row.len()) / markers.len();
        for (k, &m) in markers.iter().enumerate() {
            let start = m - k + k * per_image;
            image_spans.push(start..start + per_image);
        }
    }
    Ok(AttentionVsSsm {
        layer,
        teacher_attention,
        implicit_attention: implicit,
        state_norms: norms,
        image_spans,
    })
}

/// [`attention_vs_ssm`] for a question about an optional image file, with the teacher's
/// tokenizer, prompt template and image preprocessing.
pub fn attention_vs_ssm_prompt(
    teacher: &Vlm,
    hybrid: &Vlm,
    question: &str,
    image: Option<&Path>,
    layer: usize,
) -> Result<AttentionVsSsm> {
    let prompt = single_turn_prompt(question, image.is_some());
    let row = teacher.tokenizer()?.encode_prompt(&prompt)?;
    let pixels = image.map(|p| teacher.pixel_values(p)).transpose()?;
    attention_vs_ssm(teacher, hybrid, &row, pixels.as_ref(), layer)
}

/// The attention maps of `data` ([`plot_attention_maps`]) to `path`.
pub fn plot_attention_vs_ssm(data: &AttentionVsSsm, path: &Path) -> Result<()> {
    attention_vs_ssm_figure(data)?.save(path)
}

/// The attention maps of `data` ([`attention_maps_figure`]), in memory.
pub fn attention_vs_ssm_figure(data: &AttentionVsSsm) -> Result<Figure> {
    attention_maps_figure(
        &data.teacher_attention,
        &data.implicit_attention,
        &data.image_spans,
        &format!(
            "Layer {}: attention vs Mamba-2 implicit attention ({} tokens)",
            data.layer,
            data.teacher_attention.dim(1)?
        ),
        &MapStyle::default(),
    )
}

/// The state norms of `data` ([`state_norms_figure`]), titled with its layer.
pub fn attention_vs_ssm_norms_figure(data: &AttentionVsSsm) -> Result<Figure> {
    state_norms_figure(
        &data.state_norms,
        &data.image_spans,
        &format!("Layer {}: SSM state norm per head", data.layer),
    )
}

/// Pearson correlation between the teacher's head-averaged attention and the hybrid's
/// head-averaged |implicit attention| of `data`, over the causal (lower-triangle) entries: how
/// much the two layers look at the same tokens (1 for maps equal up to scale and shift).
pub fn mean_map_correlation(data: &AttentionVsSsm) -> Result<f64> {
    let a = data.teacher_attention.mean(0)?;
    let b = data.implicit_attention.abs()?.mean(0)?;
    let t = a.dim(0)?;
    let mask = Tensor::tril2(t, DType::F32, a.device())?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let (a, b) = (
        a.flatten_all()?.to_vec1::<f32>()?,
        b.flatten_all()?.to_vec1::<f32>()?,
    );
    let pairs: Vec<(f64, f64)> = mask
        .iter()
        .zip(a.iter().zip(&b))
        .filter(|(m, _)| **m > 0.0)
        .map(|(_, (x, y))| (*x as f64, *y as f64))
        .collect();
    let n = pairs.len() as f64;
    let (mx, my) = (
        pairs.iter().map(|p| p.0).sum::<f64>() / n,
        pairs.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let cov: f64 = pairs.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let vx: f64 = pairs.iter().map(|(x, _)| (x - mx).powi(2)).sum();
    let vy: f64 = pairs.iter().map(|(_, y)| (y - my).powi(2)).sum();
    Ok(cov / (vx * vy).sqrt().max(1e-30))
}

/// Write both figures of `data` as PNG and SVG into `dir`: `{stem}_maps.{png,svg}` and
/// `{stem}_state_norms.{png,svg}`. Returns the paths written.
pub fn save_attention_vs_ssm(
    data: &AttentionVsSsm,
    dir: &Path,
    stem: &str,
) -> Result<Vec<PathBuf>> {
    let (maps_fig, norms_fig) = (
        attention_vs_ssm_figure(data)?,
        attention_vs_ssm_norms_figure(data)?,
    );
    let mut out = Vec::new();
    for ext in ["png", "svg"] {
        let maps = dir.join(format!("{stem}_maps.{ext}"));
        maps_fig.save(&maps)?;
        let norms = dir.join(format!("{stem}_state_norms.{ext}"));
        norms_fig.save(&norms)?;
        out.extend([maps, norms]);
    }
    Ok(out)
}

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
struct LineFigure {
    title: String,
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
fn tick(v: f64) -> String {
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

fn min_max(v: &[f64]) -> (f64, f64) {
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

// ---------------------------------------------------------------------------------------------
// Bars

#[derive(Debug, Clone)]
struct BarFigure {
    title: String,
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

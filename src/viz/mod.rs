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

use crate::io::write_atomic;
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
const EMBEDDED_FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-subset.ttf");

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

mod bars;
mod compare;
mod lines;
mod maps;

pub use bars::*;
pub use compare::*;
pub use lines::*;
pub use maps::*;

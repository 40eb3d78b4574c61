//! Inline display in Jupyter notebooks run by the evcxr kernel.
//!
//! evcxr shows the value of a cell's last expression by calling its `evcxr_display(&self)`
//! method when the type has one (otherwise it prints `{:?}`). The method prints one or more
//! blocks framed as
//!
//! ```text
//! EVCXR_BEGIN_CONTENT image/png
//! <base64 of the PNG>
//! EVCXR_END_CONTENT
//! ```
//!
//! (or `text/html` with the HTML itself) to standard output, and the kernel turns each block into
//! a rich output of that MIME type. This module gives the library's notebook-facing types such a
//! method, each built on a `*_html` / `display_string` function that returns the framed text, so
//! that what a notebook shows can be checked without a kernel:
//!
//! * [`crate::viz::Figure`]: the figure as a PNG image;
//! * [`TensorSummary`] (a tensor's shape, dtype, device and statistics): an HTML table;
//! * [`Vlm`]: its layer map (attention or Mamba-2 per decoder layer) and sizes, as HTML;
//! * [`EvalReport`], [`AgreementReport`], [`SpeedReport`] and [`Comparison`]: HTML tables.

use std::fmt::Write as _;

use base64::Engine as _;
use candle_core::{DType, Tensor};

use crate::eval::benchmarks::Comparison;
use crate::eval::{AgreementReport, EvalReport, SpeedReport};
use crate::model::hybrid::MixerKind;
use crate::model::vlm::Vlm;
use crate::viz::Figure;
use crate::Result;

/// The line that opens a rich-output block, followed by the MIME type.
pub const BEGIN: &str = "EVCXR_BEGIN_CONTENT";
/// The line that closes it.
pub const END: &str = "EVCXR_END_CONTENT";

/// One evcxr output block of `mime` holding `body` (already text: HTML, SVG, or base64).
pub fn block(mime: &str, body: &str) -> String {
    format!("{BEGIN} {mime}\n{body}\n{END}\n")
}

/// An HTML block.
pub fn html_block(html: &str) -> String {
    block("text/html", html)
}

/// A PNG image block (the bytes base64-encoded, as the Jupyter protocol carries images).
pub fn png_block(png: &[u8]) -> String {
    block(
        "image/png",
        &base64::engine::general_purpose::STANDARD.encode(png),
    )
}

/// `text` with HTML's special characters escaped.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// An HTML table with an optional caption, a header row and body rows (cells escaped).
pub fn html_table(caption: &str, header: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = String::from("<table>");
    if !caption.is_empty() {
        let _ = write!(s, "<caption>{}</caption>", escape(caption));
    }
    s.push_str("<thead><tr>");
    for h in header {
        let _ = write!(s, "<th>{}</th>", escape(h));
    }
    s.push_str("</tr></thead><tbody>");
    for row in rows {
        s.push_str("<tr>");
        for cell in row {
            let _ = write!(s, "<td>{}</td>", escape(cell));
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table>");
    s
}

/// Print `text` for evcxr (a failure to render is shown as plain text instead).
fn emit(text: Result<String>) {
    match text {
        Ok(t) => print!("{t}"),
        Err(e) => println!("(cannot display: {e})"),
    }
}

fn percent(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// The evcxr pair of each type shown as HTML, from its `html()`: `display_string` (one HTML
/// block) and `evcxr_display` (evcxr calls it on a cell's last value). Inherent methods, so a
/// notebook needs no trait in scope.
macro_rules! html_display {
    ($($t:ty),* $(,)?) => {$(
        impl $t {
            /// The evcxr output: one HTML block.
            pub fn display_string(&self) -> String {
                html_block(&self.html())
            }

            /// Show it inline in a Jupyter notebook.
            pub fn evcxr_display(&self) {
                print!("{}", self.display_string());
            }
        }
    )*};
}

html_display!(
    TensorSummary,
    Vlm,
    EvalReport,
    AgreementReport,
    SpeedReport,
    Comparison
);

// ---------------------------------------------------------------------------------------------
// Figures

impl Figure {
    /// The evcxr output of this figure: one PNG block.
    pub fn display_string(&self) -> Result<String> {
        Ok(png_block(&self.png()?))
    }

    /// Show the figure inline in a Jupyter notebook (evcxr calls this on a cell's last value).
    pub fn evcxr_display(&self) {
        emit(self.display_string());
    }
}

// ---------------------------------------------------------------------------------------------
// Tensors

/// A tensor described by its shape, dtype, device and value statistics, for looking at
/// activations and weights in a notebook without printing thousands of numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSummary {
    pub shape: Vec<usize>,
    pub dtype: DType,
    /// `cpu`, `cuda:0`, ...
    pub device: String,
    /// Statistics over every element, computed in f64: minimum, maximum, mean, standard
    /// deviation (population) and mean absolute value. `None` for an empty tensor.
    pub stats: Option<TensorStats>,
    /// The first few values in row-major order.
    pub head: Vec<f64>,
}

/// See [`TensorSummary::stats`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TensorStats {
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub std: f64,
    pub mean_abs: f64,
}

/// How many leading values a summary keeps.
pub const SUMMARY_HEAD: usize = 8;

impl TensorSummary {
    /// Summarise `t` (copied to the host in f64).
    pub fn of(t: &Tensor) -> Result<Self> {
        let values = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let stats = (!values.is_empty()).then(|| {
            let n = values.len() as f64;
            let mean = values.iter().sum::<f64>() / n;
            let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            TensorStats {
                min: values.iter().copied().fold(f64::INFINITY, f64::min),
                max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                mean,
                std: var.sqrt(),
                mean_abs: values.iter().map(|v| v.abs()).sum::<f64>() / n,
            }
        });
        let device = match t.device().location() {
            candle_core::DeviceLocation::Cpu => "cpu".to_string(),
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        };
        Ok(Self {
            shape: t.dims().to_vec(),
            dtype: t.dtype(),
            device,
            stats,
            head: values.into_iter().take(SUMMARY_HEAD).collect(),
        })
    }

    /// The summary as an HTML table, one row per property.
    pub fn html(&self) -> String {
        let g = |x: f64| format!("{x:.6}");
        let mut rows = vec![
            vec!["shape".to_string(), format!("{:?}", self.shape)],
            vec!["dtype".to_string(), self.dtype.as_str().to_string()],
            vec!["device".to_string(), self.device.clone()],
        ];
        if let Some(s) = &self.stats {
            rows.extend([
                vec!["min".to_string(), g(s.min)],
                vec!["max".to_string(), g(s.max)],
                vec!["mean".to_string(), g(s.mean)],
                vec!["std".to_string(), g(s.std)],
                vec!["mean |x|".to_string(), g(s.mean_abs)],
            ]);
        }
        let head: Vec<String> = self.head.iter().map(|v| format!("{v:.4}")).collect();
        rows.push(vec![
            format!("first {}", self.head.len()),
            format!("[{}]", head.join(", ")),
        ]);
        html_table("Tensor", &["property", "value"], &rows)
    }
}

// ---------------------------------------------------------------------------------------------
// Models

impl Vlm {
    /// The model as HTML: kind, sizes, and its layer map (one column per decoder layer,
    /// attention or Mamba-2).
    pub fn html(&self) -> String {
        let kinds = self.layer_kinds();
        let mamba = self.mamba_layers().len();
        let text = &self.config.text_config;
        let summary = html_table(
            if mamba == 0 {
                "Teacher (all attention)"
            } else {
                "Hybrid (attention + Mamba-2)"
            },
            &["parameters", "decoder", "vision", "dtype"],
            &[vec![
                self.parameter_count().to_string(),
                format!(
                    "{} layers ({mamba} Mamba-2), hidden {}, {} heads, vocab {}",
                    kinds.len(),
                    text.hidden_size,
                    text.num_attention_heads,
                    text.vocab_size
                ),
                format!(
                    "{} px, patch {}, hidden {}",
                    self.config.vision_config.image_size,
                    self.config.vision_config.patch_size,
                    self.config.vision_config.hidden_size
                ),
                self.dtype.as_str().to_string(),
            ]],
        );
        let header: Vec<String> = (0..kinds.len()).map(|i| i.to_string()).collect();
        let mut map = String::from("<table><caption>Layer map</caption><thead><tr><th>layer</th>");
        for h in &header {
            let _ = write!(map, "<th>{h}</th>");
        }
        map.push_str("</tr></thead><tbody><tr><th>mixer</th>");
        for &k in kinds {
            // Colour makes the placement readable at a glance.
            let colour = match k {
                MixerKind::Mamba2 => "#fde0c5",
                MixerKind::Attention => "#d6e6f5",
            };
            let _ = write!(map, "<td style=\"background:{colour}\">{k}</td>");
        }
        map.push_str("</tr></tbody></table>");
        format!("{summary}{map}")
    }
}

// ---------------------------------------------------------------------------------------------
// Reports

impl EvalReport {
    /// Accuracy overall and per question type, as an HTML table.
    pub fn html(&self) -> String {
        let mut rows = vec![vec![
            "overall".to_string(),
            self.n.to_string(),
            self.correct.to_string(),
            percent(self.accuracy),
        ]];
        rows.extend(self.per_type.iter().map(|(t, s)| {
            vec![
                t.clone(),
                s.n.to_string(),
                s.correct.to_string(),
                percent(s.accuracy),
            ]
        }));
        // Seen / unseen compositions (a world with a hold-out): the group, then its types.
        for (c, g) in &self.per_composition {
            rows.push(vec![
                c.clone(),
                g.n.to_string(),
                g.correct.to_string(),
                percent(g.accuracy),
            ]);
            rows.extend(g.per_type.iter().map(|(t, s)| {
                vec![
                    format!("{c} {t}"),
                    s.n.to_string(),
                    s.correct.to_string(),
                    percent(s.accuracy),
                ]
            }));
        }
        let caption = format!(
            "Evaluation ({:?}, {:?} images) on {}",
            self.mode, self.image, self.source
        );
        let mut html = html_table(
            &caption,
            &["question type", "n", "correct", "accuracy"],
            &rows,
        );
        if !self.mistakes.is_empty() {
            let rows: Vec<Vec<String>> = self
                .mistakes
                .iter()
                .map(|m| {
                    vec![
                        m.record.to_string(),
                        m.question_type.clone(),
                        m.question.clone(),
                        m.expected.clone(),
                        m.got.clone(),
                    ]
                })
                .collect();
            html.push_str(&html_table(
                "Some wrong answers",
                &["record", "type", "question", "expected", "got"],
                &rows,
            ));
        }
        html
    }
}

impl AgreementReport {
    /// Agreement and KL as an HTML table.
    pub fn html(&self) -> String {
        html_table(
            &format!("Teacher agreement on {}", self.source),
            &[
                "positions",
                "samples",
                "compared",
                "top-1 agreement",
                "KL (nats)",
            ],
            &[vec![
                format!("{:?}", self.positions).to_lowercase(),
                self.samples.to_string(),
                self.n_positions.to_string(),
                percent(self.agreement),
                format!("{:.4}", self.kl),
            ]],
        )
    }
}

impl SpeedReport {
    /// Decode speed as an HTML table.
    pub fn html(&self) -> String {
        html_table(
            "Greedy decode speed (best of repeats)",
            &[
                "prompt tokens",
                "new tokens",
                "prefill (s)",
                "decode (s)",
                "tokens/s",
            ],
            &[vec![
                self.prompt_tokens.to_string(),
                self.new_tokens.to_string(),
                format!("{:.4}", self.prefill_s),
                format!("{:.4}", self.decode_s),
                format!("{:.1}", self.tokens_per_s),
            ]],
        )
    }
}

impl Comparison {
    /// Models side by side as an HTML table: one row per (benchmark, metric), `-` where a
    /// model was not measured.
    pub fn html(&self) -> String {
        let mut header = vec!["benchmark", "metric"];
        header.extend(self.models.iter().map(String::as_str));
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                let mut row = vec![r.benchmark.clone(), r.metric.clone()];
                row.extend(
                    r.values
                        .iter()
                        .map(|v| v.map_or("-".to_string(), |x| format!("{x:.4}"))),
                );
                row
            })
            .collect();
        html_table("Comparison", &header, &rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The body between the framing lines of the only block in `s`, and its MIME type.
    fn unframe(s: &str) -> (String, String) {
        let lines: Vec<&str> = s.lines().collect();
        assert!(lines.len() >= 3, "too short: {s:?}");
        let mime = lines[0]
            .strip_prefix(&format!("{BEGIN} "))
            .unwrap_or_else(|| panic!("first line is not a BEGIN line: {:?}", lines[0]));
        assert_eq!(*lines.last().unwrap(), END);
        assert!(s.ends_with('\n'));
        (mime.to_string(), lines[1..lines.len() - 1].join("\n"))
    }

    #[test]
    fn blocks_are_framed_with_the_mime_type() {
        let (mime, body) = unframe(&html_block("<b>x</b>"));
        assert_eq!((mime.as_str(), body.as_str()), ("text/html", "<b>x</b>"));
        let png = [0x89u8, b'P', b'N', b'G', 0, 255, 7];
        let (mime, body) = unframe(&png_block(&png));
        assert_eq!(mime, "image/png");
        let back = base64::engine::general_purpose::STANDARD
            .decode(body.trim())
            .unwrap();
        assert_eq!(back, png);
    }

    #[test]
    fn html_tables_escape_their_cells() {
        let t = html_table("a<b", &["h&"], &[vec!["<script>".into()]]);
        assert!(t.contains("<caption>a&lt;b</caption>"), "{t}");
        assert!(t.contains("<th>h&amp;</th>"), "{t}");
        assert!(t.contains("<td>&lt;script&gt;</td>"), "{t}");
        assert!(!t.contains("<script>"));
    }

    #[test]
    fn tensor_summary_statistics_and_html() {
        let values = [1.0f32, -3.0, 2.0, 4.0];
        let t = Tensor::from_slice(&values, (2, 2), &candle_core::Device::Cpu).unwrap();
        let s = TensorSummary::of(&t).unwrap();
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
        let std = (values
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        let st = s.stats.unwrap();
        assert_eq!((st.min, st.max), (-3.0, 4.0));
        assert!((st.mean - mean).abs() < 1e-12 && (st.std - std).abs() < 1e-12);
        assert!((st.mean_abs - 2.5).abs() < 1e-12);
        assert_eq!(s.shape, vec![2, 2]);
        let (mime, body) = unframe(&s.display_string());
        assert_eq!(mime, "text/html");
        assert!(
            body.contains("<td>[2, 2]</td>") && body.contains("<td>f32</td>"),
            "{body}"
        );
        let empty = Tensor::zeros((0, 3), DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(TensorSummary::of(&empty).unwrap().stats.is_none());
    }

    #[test]
    fn reports_show_as_html_tables() {
        let mut cmp = Comparison::new();
        cmp.set("teacher", "val", "accuracy", 0.5);
        cmp.set("hybrid <0.25>", "val", "accuracy", 0.25);
        let (mime, body) = unframe(&cmp.display_string());
        assert_eq!(mime, "text/html");
        assert!(body.contains("<th>hybrid &lt;0.25&gt;</th>"), "{body}");
        assert!(body.contains("<td>0.5000</td><td>0.2500</td>"), "{body}");
        let agree = AgreementReport {
            positions: crate::loss::Positions::Answers,
            source: "val.json".into(),
            samples: 4,
            n_positions: 10,
            agreement: 0.7,
            kl: 0.125,
        };
        let (_, body) = unframe(&agree.display_string());
        assert!(body.contains("<td>70.0%</td><td>0.1250</td>"), "{body}");
    }
}

//! Attention vs SSM: the teacher's attention next to the hybrid's implicit attention and state
//! norms, for one input and one layer (data gathered with the decoder's capture mechanism).

use super::*;

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

//! Draw every figure of `matvlm::viz` into a folder, as PNG and SVG.
//!
//! ```text
//! cargo run --example figures -- OUT_DIR [--teacher DIR] [--hybrid DIR] [--layer L]
//!     [--question TEXT] [--image FILE] [--run LABEL=RUN_DIR]...
//! ```
//! * `attention_vs_ssm_layer{L}_maps`: teacher attention vs the hybrid's implicit attention;
//! * `attention_vs_ssm_layer{L}_state_norms`: the hybrid mixer's state norm per head;
//! * `similarity_by_layer`: bars, per Mamba layer, of the correlation between the teacher's
//!   head-averaged attention and the hybrid's head-averaged |implicit attention|;
//! * `loss` (only with `--run`): the train loss of each run's `metrics.jsonl`.
//!
//! The teacher defaults to the test fixture; the hybrid defaults to the teacher with every other
//! layer replaced by a Mamba-2 mixer initialised from its attention (not distilled).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use matvlm::model::hybrid::HybridSpec;
use matvlm::model::vlm::Vlm;
use matvlm::viz;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(
        args.next()
            .ok_or_else(|| anyhow::anyhow!("usage: figures OUT_DIR [options]"))?,
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut teacher_dir = root.join("tests/fixtures/teacher");
    let mut hybrid_dir: Option<PathBuf> = None;
    let mut layer: Option<usize> = None;
    let mut question = "What is in the picture?".to_string();
    let mut image: Option<PathBuf> = None;
    let mut runs: Vec<(String, PathBuf)> = Vec::new();
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--teacher" => teacher_dir = value()?.into(),
            "--hybrid" => hybrid_dir = Some(value()?.into()),
            "--layer" => layer = Some(value()?.parse()?),
            "--question" => question = value()?,
            "--image" => image = Some(value()?.into()),
            "--run" => {
                let v = value()?;
                let (label, dir) = v
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--run takes LABEL=RUN_DIR"))?;
                runs.push((label.to_string(), dir.into()));
            }
            other => anyhow::bail!("unknown option {other}"),
        }
    }
    let image = image.unwrap_or_else(|| teacher_dir.join("test_image.png"));
    let teacher = Vlm::load(
        teacher_dir.to_str().unwrap_or_default(),
        DType::F32,
        &Device::Cpu,
    )?;
    let hybrid = match &hybrid_dir {
        Some(d) => Vlm::load(d.to_str().unwrap_or_default(), DType::F32, &Device::Cpu)?,
        None => teacher.hybrid(&HybridSpec::ratio(0.5))?,
    };
    let mamba = hybrid.mamba_layers();
    let shown = layer
        .or(mamba.first().copied())
        .ok_or_else(|| anyhow::anyhow!("the hybrid has no Mamba layer"))?;
    std::fs::create_dir_all(&out)?;

    let mut bars = Vec::new();
    for &l in mamba {
        let data = viz::attention_vs_ssm_prompt(&teacher, &hybrid, &question, Some(&image), l)?;
        if l == shown {
            for p in viz::save_attention_vs_ssm(&data, &out, &format!("attention_vs_ssm_layer{l}"))?
            {
                println!("{}", p.display());
            }
        }
        bars.push((format!("layer {l}"), viz::mean_map_correlation(&data)?));
    }
    for ext in ["png", "svg"] {
        let p = out.join(format!("similarity_by_layer.{ext}"));
        viz::plot_bars(
            &bars,
            "Teacher attention vs |implicit attention|, head means",
            "Pearson correlation (causal entries)",
            &p,
        )?;
        println!("{}", p.display());
    }
    if !runs.is_empty() {
        let runs: Vec<(&str, &Path)> = runs
            .iter()
            .map(|(l, d)| (l.as_str(), d.as_path()))
            .collect();
        for ext in ["png", "svg"] {
            let p = out.join(format!("loss.{ext}"));
            viz::plot_runs(&runs, &["loss"], "Training loss", &p)?;
            println!("{}", p.display());
        }
    }
    Ok(())
}

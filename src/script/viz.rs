//! Figures and comparisons from scripts: `plot_attention_vs_ssm`, `plot_run`, `plot_bars`,
//! `compare`. Each writes files through [`crate::viz`] (PNG or SVG by the extension of `out`)
//! or [`crate::eval::benchmarks::Comparison`], and returns what it wrote.

use std::path::{Path, PathBuf};

use rhai::{Array, Dynamic, Map};

use super::convert::{runtime_error, Opts, OrRhai, RhaiResult};
use super::model::Model;
use super::train::Run;
use crate::eval::benchmarks::Comparison;
use crate::eval::{AgreementReport, EvalReport, SpeedReport};
use crate::viz;

/// The required `out` option: a path ending in `.png` or `.svg`.
fn figure_path(o: &Opts, what: &str) -> RhaiResult<PathBuf> {
    let out = o.path("out")?.ok_or_else(|| {
        runtime_error(format!(
            "{what}: option `out` (a .png or .svg path) is required"
        ))
    })?;
    let ext = out
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if ext != "png" && ext != "svg" {
        return Err(runtime_error(format!(
            "{what}: `out` must end in .png or .svg, not {}",
            out.display()
        )));
    }
    Ok(out)
}

/// `dir/stem_state_norms.ext` beside `dir/stem.ext`.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let stem = path
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().to_string());
    let ext = path
        .extension()
        .map_or_else(String::new, |e| e.to_string_lossy().to_string());
    path.with_file_name(format!("{stem}{suffix}.{ext}"))
}

fn path_string(p: &Path) -> Dynamic {
    Dynamic::from(p.display().to_string())
}

/// A run folder (or metrics file) from a `Run` or a string.
fn run_path(v: &Dynamic) -> RhaiResult<PathBuf> {
    if let Some(r) = v.read_lock::<Run>() {
        return Ok(r.run_dir.clone());
    }
    v.clone().into_string().map(PathBuf::from).map_err(|_| {
        runtime_error(format!(
            "plot_run: expected a Run, a run folder or an array of them, not {}",
            v.type_name()
        ))
    })
}

/// The legend label of a run: its folder's name (the file's folder for a metrics file).
fn run_label(p: &Path) -> String {
    let dir = if p.extension().is_some_and(|e| e == "jsonl") {
        p.parent().unwrap_or(p)
    } else {
        p
    };
    dir.file_name().map_or_else(
        || dir.display().to_string(),
        |n| n.to_string_lossy().to_string(),
    )
}

/// A number from a rhai value (int or float).
fn number(v: &Dynamic, what: &str) -> RhaiResult<f64> {
    match (v.as_float(), v.as_int()) {
        (Ok(f), _) => Ok(f),
        (_, Ok(i)) => Ok(i as f64),
        _ => Err(runtime_error(format!(
            "{what} must be a number, not {}",
            v.type_name()
        ))),
    }
}

/// The bars of a `#{ label: value }` map (in key order) or an array of `[label, value]` pairs
/// (in order).
fn bars_of(v: &Dynamic) -> RhaiResult<Vec<(String, f64)>> {
    if let Some(map) = v.read_lock::<Map>() {
        return map
            .iter()
            .map(|(k, x)| Ok((k.to_string(), number(x, &format!("plot_bars: bar `{k}`"))?)))
            .collect();
    }
    let arr = v.clone().into_array().map_err(|_| {
        runtime_error(format!(
            "plot_bars: expected a map #{{ label: value }} or an array of [label, value], not {}",
            v.type_name()
        ))
    })?;
    arr.iter()
        .enumerate()
        .map(|(i, pair)| {
            let bad = || runtime_error(format!("plot_bars: item {i} is not a [label, value] pair"));
            let pair = pair.clone().into_array().map_err(|_| bad())?;
            if pair.len() != 2 {
                return Err(bad());
            }
            let label = pair[0].to_string();
            Ok((
                label.clone(),
                number(&pair[1], &format!("plot_bars: bar `{label}`"))?,
            ))
        })
        .collect()
}

/// The benchmark name of a report's data file: `data/val.json` is "val".
fn benchmark_name(source: &str) -> String {
    Path::new(source)
        .file_stem()
        .map_or_else(|| source.to_string(), |s| s.to_string_lossy().to_string())
}

/// Add one report map (from `evaluate`, `agreement` or `tokens_per_second`) to `cmp`.
fn add_report(cmp: &mut Comparison, model: &str, report: &Dynamic) -> RhaiResult<()> {
    let json: serde_json::Value = rhai::serde::from_dynamic(report)
        .map_err(|e| runtime_error(format!("compare: `{model}`: {e}")))?;
    let has = |k: &str| json.get(k).is_some();
    let bad = |e: serde_json::Error| runtime_error(format!("compare: `{model}`: {e}"));
    if has("per_type") {
        let r: EvalReport = serde_json::from_value(json).map_err(bad)?;
        cmp.add_eval(model, &benchmark_name(&r.source), &r);
    } else if has("agreement") {
        let r: AgreementReport = serde_json::from_value(json).map_err(bad)?;
        cmp.add_agreement(model, &benchmark_name(&r.source), &r);
    } else if has("tokens_per_s") {
        let r: SpeedReport = serde_json::from_value(json).map_err(bad)?;
        cmp.add_speed(model, "speed", &r);
    } else {
        return Err(runtime_error(format!(
            "compare: `{model}`: not a report of evaluate, agreement or tokens_per_second"
        )));
    }
    Ok(())
}

#[rhai::export_module]
pub mod api {
    use super::*;

    /// `plot_attention_vs_ssm(teacher, hybrid, #{ prompt, image, layer, out })`: for one input
    /// (a question, templated as in `logits`, about an optional image file) and one layer
    /// (default: the hybrid's first Mamba layer), the teacher's attention maps above the
    /// hybrid's implicit attention, written to `out` (.png or .svg), and the mixer's state norm
    /// per head beside it (`{out stem}_state_norms.{ext}`). Returns both paths.
    #[rhai_fn(return_raw)]
    pub fn plot_attention_vs_ssm(teacher: Model, hybrid: Model, options: Map) -> RhaiResult<Array> {
        let what = "plot_attention_vs_ssm";
        let o = Opts::new(what, options, &["prompt", "image", "layer", "out"])?;
        let out = figure_path(&o, what)?;
        let prompt = o
            .string("prompt")?
            .ok_or_else(|| runtime_error(format!("{what}: option `prompt` is required")))?;
        let image = o.path("image")?;
        let layer =
            match o.count("layer")? {
                Some(l) => l,
                None => *hybrid.vlm.mamba_layers().first().ok_or_else(|| {
                    runtime_error(format!("{what}: the hybrid has no Mamba layer"))
                })?,
            };
        let data = viz::attention_vs_ssm_prompt(
            &teacher.vlm,
            &hybrid.vlm,
            &prompt,
            image.as_deref(),
            layer,
        )
        .or_rhai()?;
        viz::attention_vs_ssm_figure(&data)
            .and_then(|f| f.save(&out))
            .or_rhai()?;
        let norms = beside(&out, "_state_norms");
        viz::attention_vs_ssm_norms_figure(&data)
            .and_then(|f| f.save(&norms))
            .or_rhai()?;
        Ok(vec![path_string(&out), path_string(&norms)])
    }

    /// `plot_run(runs, #{ keys: ["loss"], out, title })`: curves of the train records' `keys`
    /// (e.g. "loss", "lr", a loss term) over the step, from one run or several: `runs` is a Run,
    /// a run folder (or its metrics.jsonl), or an array of them; each is labelled by its folder
    /// name. Writes `out` (.png or .svg) and returns its path.
    #[rhai_fn(return_raw)]
    pub fn plot_run(runs: Dynamic, options: Map) -> RhaiResult<String> {
        let what = "plot_run";
        let o = Opts::new(what, options, &["keys", "out", "title"])?;
        let out = figure_path(&o, what)?;
        let keys: Vec<String> = match o.value("keys") {
            None => vec!["loss".to_string()],
            Some(v) if v.is_string() => vec![v.to_string()],
            Some(v) => v
                .into_array()
                .map_err(|_| {
                    runtime_error(format!(
                        "{what}: `keys` must be a string or an array of strings"
                    ))
                })?
                .iter()
                .map(|k| k.to_string())
                .collect(),
        };
        let paths: Vec<PathBuf> = match runs.read_lock::<Array>() {
            Some(arr) => arr.iter().map(run_path).collect::<RhaiResult<_>>()?,
            None => vec![run_path(&runs)?],
        };
        if paths.is_empty() {
            return Err(runtime_error(format!("{what}: no runs given")));
        }
        let labels: Vec<String> = paths.iter().map(|p| run_label(p)).collect();
        let pairs: Vec<(&str, &Path)> = labels
            .iter()
            .zip(&paths)
            .map(|(l, p)| (l.as_str(), p.as_path()))
            .collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let title = o.string("title")?.unwrap_or_else(|| "Training".to_string());
        viz::runs_figure(&pairs, &keys, &title)
            .and_then(|f| f.save(&out))
            .or_rhai()?;
        Ok(out.display().to_string())
    }

    /// `plot_bars(bars, #{ out, title, y_label })`: one bar per label with its value written
    /// above it (sweeps); `bars` is a map `#{ label: value }` (bars in key order) or an array of
    /// `[label, value]` pairs (in that order). Writes `out` (.png or .svg), returns its path.
    #[rhai_fn(return_raw)]
    pub fn plot_bars(bars: Dynamic, options: Map) -> RhaiResult<String> {
        let what = "plot_bars";
        let o = Opts::new(what, options, &["out", "title", "y_label"])?;
        let out = figure_path(&o, what)?;
        let bars = bars_of(&bars)?;
        let title = o.string("title")?.unwrap_or_default();
        let y_label = o.string("y_label")?.unwrap_or_else(|| "value".to_string());
        viz::bars_figure(&bars, &title, &y_label)
            .and_then(|f| f.save(&out))
            .or_rhai()?;
        Ok(out.display().to_string())
    }

    /// `compare(#{ name: report, ... })`: the models side by side as a markdown table, one row
    /// per (data set, metric), one column per name. A report is the map `evaluate`,
    /// `agreement` or `tokens_per_second` returned, or an array of such maps.
    #[rhai_fn(name = "compare", return_raw)]
    pub fn compare(reports: Map) -> RhaiResult<String> {
        compare_with(reports, Map::new())
    }

    /// `compare(reports, #{ out })`: as `compare(reports)`, also written to `out` (JSON for a
    /// `.json` path, the markdown table otherwise).
    #[rhai_fn(name = "compare", return_raw)]
    pub fn compare_with(reports: Map, options: Map) -> RhaiResult<String> {
        let o = Opts::new("compare", options, &["out"])?;
        let mut cmp = Comparison::new();
        for (model, value) in &reports {
            match value.read_lock::<Array>() {
                Some(arr) => {
                    for r in arr.iter() {
                        add_report(&mut cmp, model, r)?;
                    }
                }
                None => add_report(&mut cmp, model, value)?,
            }
        }
        if let Some(out) = o.path("out")? {
            cmp.save(&out).or_rhai()?;
        }
        Ok(cmp.to_markdown())
    }
}

//! Where should the Mamba layers go? Per-layer replaceability and a placement search.
//!
//! MaTVLM places its Mamba-2 layers by a fixed rule. Here each candidate is measured instead:
//! a placement's layers become attention-initialised Mamba-2 mixers, a short local distillation
//! trains those mixers alone on the teacher's own hidden states (the layer-wise loss only: the
//! cheap part of the recipe, enough to undo the worst of the swap), and the result is scored by
//! the mean KL(teacher || hybrid) of the next-token distributions on validation answers.
//!
//! * [`layer_sensitivity`]: that score for every single layer (the placement `[i]`);
//! * [`placement_search`]: the `k` best-scoring layers, then (optionally) swaps of a chosen layer
//!   for an unchosen neighbour, each candidate placement measured as a whole (so what layers do
//!   to each other is measured, not assumed), kept while the KL improves, within a budget of
//!   measured placements.
//!
//! Every measured placement is saved in the search folder (`placement-{layers}.json`, with its
//! short run beside it), so an interrupted search resumes where it stopped and a second search
//! over the same folder reuses what the first measured.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::eval::{agreement, AgreementOptions};
use crate::loss::DistillLoss;
use crate::model::hybrid::{layers_for_ratio, HybridSpec};
use crate::model::vlm::Vlm;
use crate::train::distill::{distill, DistillConfig, Trainable};
use crate::train::{ProgressMode, StopReason};
use crate::{Error, Result};

/// How one placement is measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeasureOptions {
    /// Optimiser steps of the short local distillation of the new mixers.
    pub steps: usize,
    /// Samples per step.
    pub batch_size: usize,
    /// Peak learning rate (the recipe's schedule and optimiser otherwise).
    pub lr: f64,
    /// Validation samples the KL is measured on (all when `None`).
    pub limit: Option<usize>,
    /// Seeds the batches and the mixers' fresh parts; the same for every placement, so that
    /// placements differ only in their layers.
    pub seed: u64,
}

impl Default for MeasureOptions {
    fn default() -> Self {
        Self {
            steps: 30,
            batch_size: 16,
            lr: crate::train::distill::TINY_DISTILL_LR,
            limit: Some(128),
            seed: 0,
        }
    }
}

/// One measured placement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlacementScore {
    pub layers: Vec<usize>,
    /// Mean KL(teacher || hybrid) per validation answer position after the short distillation.
    pub kl: f64,
    /// Top-1 agreement with the teacher on the same positions.
    pub agreement: f64,
    /// The layer-wise loss of the last short-distillation step (its only loss term).
    pub hidden_loss: f64,
    /// What it was measured with.
    pub options: MeasureOptions,
}

/// Measure one placement (see the module doc), or read it back from `dir` if a run with the same
/// options measured it before.
pub fn measure_placement(
    teacher: &Vlm,
    layers: &[usize],
    train: Arc<Dataset>,
    val: &Dataset,
    opts: &MeasureOptions,
    dir: &Path,
    cancel: Option<&AtomicBool>,
) -> Result<PlacementScore> {
    Ok(measure(teacher, layers, train, val, opts, dir, cancel)?.0)
}

/// [`measure_placement`], and whether it ran a short distillation (false: read back).
fn measure(
    teacher: &Vlm,
    layers: &[usize],
    train: Arc<Dataset>,
    val: &Dataset,
    opts: &MeasureOptions,
    dir: &Path,
    cancel: Option<&AtomicBool>,
) -> Result<(PlacementScore, bool)> {
    let mut layers = layers.to_vec();
    layers.sort_unstable();
    let key = layers
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join("-");
    let file = dir.join(format!("placement-{key}.json"));
    if file.is_file() {
        let saved: PlacementScore = crate::io::read_json(&file)?;
        if saved.options == *opts {
            return Ok((saved, false));
        }
    }
    let hybrid = teacher.hybrid(&HybridSpec::layers(layers.clone()))?;
    let mut cfg = DistillConfig::upstream(opts.steps);
    cfg.loss = DistillLoss {
        kl: 0.0,
        hidden: 1.0,
        ..DistillLoss::default()
    };
    cfg.trainable = Trainable::Mixers;
    cfg.batch_size = opts.batch_size;
    cfg.train.lr = opts.lr;
    cfg.train.seed = opts.seed;
    cfg.train.save_every = 0;
    cfg.train.eval_every = 0;
    cfg.train.keep_last = 1;
    cfg.train.progress = ProgressMode::Silent;
    let run_dir = dir.join(format!("run-{key}"));
    // A short run left half-way by an interruption is simply redone.
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, e))?;
    }
    let (student, summary) = distill(teacher, &hybrid, train, None, &cfg, &run_dir, cancel)?;
    if summary.stop == StopReason::Cancelled {
        return Err(Error::Other(format!(
            "placement {key}: cancelled after {} of {} steps",
            summary.step, opts.steps
        )));
    }
    let report = agreement(
        teacher,
        &student,
        val,
        &AgreementOptions {
            limit: opts.limit,
            ..AgreementOptions::default()
        },
    )?;
    let score = PlacementScore {
        layers,
        kl: report.kl,
        agreement: report.agreement,
        hidden_loss: summary.last_loss.unwrap_or(f64::NAN),
        options: opts.clone(),
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    crate::io::write_json(&file, &score)?;
    Ok((score, true))
}

/// Every decoder layer's score as the only Mamba layer (placement `[i]`), in layer order.
pub fn layer_sensitivity(
    teacher: &Vlm,
    train: Arc<Dataset>,
    val: &Dataset,
    opts: &MeasureOptions,
    dir: &Path,
    cancel: Option<&AtomicBool>,
) -> Result<Vec<PlacementScore>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    (0..teacher.decoder.blocks.len())
        .map(|i| measure_placement(teacher, &[i], train.clone(), val, opts, dir, cancel))
        .collect()
}

/// What [`placement_search`] looks for and how long it may look.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SearchOptions {
    /// Fraction of the decoder's layers to make Mamba (a whole number of layers).
    pub ratio: f64,
    /// Try swaps after the greedy pick.
    pub refine: bool,
    /// Placements of several layers the refinement may measure (the single-layer scores and the
    /// greedy pick are not counted).
    pub budget: usize,
    pub measure: MeasureOptions,
}

impl Default for SearchOptions {
    fn default() -> Self {
        Self {
            ratio: 0.25,
            refine: true,
            budget: 8,
            measure: MeasureOptions::default(),
        }
    }
}

/// A search's answer and how it got there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchResult {
    /// The best placement found, ascending.
    pub layers: Vec<usize>,
    /// Its measured score.
    pub best: PlacementScore,
    /// The greedy pick (the `k` lowest single-layer KLs) and its score.
    pub greedy: PlacementScore,
    /// Every single-layer score, in layer order.
    pub scores: Vec<PlacementScore>,
    /// Every placement the refinement measured, in order, and whether it was kept.
    pub tried: Vec<(PlacementScore, bool)>,
    /// Short distillations run by this call (placements read back from the folder not counted).
    pub measured: usize,
}

/// Search a placement of `ratio * layers` Mamba layers for `teacher` (see the module doc).
/// Writes every measurement into `dir`, and the result into `dir/search.json`.
pub fn placement_search(
    teacher: &Vlm,
    train: Arc<Dataset>,
    val: &Dataset,
    opts: &SearchOptions,
    dir: &Path,
    cancel: Option<&AtomicBool>,
) -> Result<SearchResult> {
    let n = teacher.decoder.blocks.len();
    let k = layers_for_ratio(opts.ratio, n)?;
    if k == 0 {
        return Err(Error::Invalid(format!(
            "placement search: ratio {} of {n} layers leaves no Mamba layer",
            opts.ratio
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut measured = 0;
    let mut run = |layers: &[usize]| -> Result<PlacementScore> {
        let (score, fresh) = measure(
            teacher,
            layers,
            train.clone(),
            val,
            &opts.measure,
            dir,
            cancel,
        )?;
        measured += usize::from(fresh);
        Ok(score)
    };
    let scores: Vec<PlacementScore> = (0..n).map(|i| run(&[i])).collect::<Result<_>>()?;
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].kl.total_cmp(&scores[b].kl));
    let mut chosen: Vec<usize> = order[..k].to_vec();
    chosen.sort_unstable();
    let greedy = run(&chosen)?;
    let mut best = greedy.clone();
    let mut tried = Vec::new();
    if opts.refine && k < n {
        'improve: while tried.len() < opts.budget {
            // Worst single-layer score first: the layer most likely to be misplaced.
            let mut by_score = best.layers.clone();
            by_score.sort_by(|&a, &b| scores[b].kl.total_cmp(&scores[a].kl));
            for &out in &by_score {
                for into in [out.wrapping_sub(1), out + 1] {
                    if into >= n || best.layers.contains(&into) {
                        continue;
                    }
                    let mut candidate: Vec<usize> = best
                        .layers
                        .iter()
                        .map(|&l| if l == out { into } else { l })
                        .collect();
                    candidate.sort_unstable();
                    if tried
                        .iter()
                        .any(|(s, _): &(PlacementScore, bool)| s.layers == candidate)
                    {
                        continue;
                    }
                    let score = run(&candidate)?;
                    let better = score.kl < best.kl;
                    tried.push((score.clone(), better));
                    if better {
                        best = score;
                        continue 'improve;
                    }
                    if tried.len() >= opts.budget {
                        break 'improve;
                    }
                }
            }
            break;
        }
    }
    let result = SearchResult {
        layers: best.layers.clone(),
        best,
        greedy,
        scores,
        tried,
        measured,
    };
    crate::io::write_json(&dir.join("search.json"), &result)?;
    Ok(result)
}

/// The folder a search writes into when the caller names none: `runs/placement-search`.
pub fn default_dir() -> PathBuf {
    PathBuf::from("runs").join("placement-search")
}

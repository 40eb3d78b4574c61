//! The distillation mode of the trainer on a reduced random teacher and a small generated world:
//! the trainable sets, gradients reaching only them, chunked logit terms and f32 master weights
//! against the plain path, a short run lowering the KL with every term in the metrics, bit-exact
//! resume, teacher agreement and answer perplexity against plain computations.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use matvlm::loss::{DistillLoss, Positions};
use std::collections::{BTreeMap, HashMap};

use crate::distill::log_softmax;
use matvlm::model::decoder::Capture;
use matvlm::model::hybrid::HybridSpec;
use matvlm::model::vlm::Vlm;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use matvlm::data::Dataset;
use matvlm::data::SupervisedBatch;
use matvlm::eval::{agreement, AgreementOptions};
use matvlm::teacher::{init_tensors_with_std, vlm_from_tensors, TeacherDims};
use matvlm::tokenize::{PromptTokenizer, IGNORE_INDEX};
use matvlm::train::distill::{distill, distill_step, DistillConfig, Trainable};
use matvlm::train::{LrSchedule, ProgressMode, RunDir, StopReason, Trainer};

/// A small generated world: train and val splits, the world's own tokenizer.
pub(crate) fn small_world(dir: &Path) -> PromptTokenizer {
    crate::common::small_world(dir, 11, (96, 16, 8))
}

/// A reduced teacher of 4 decoder layers (so ratio 0.5 swaps layers 0 and 2), randomly
/// initialised with a larger spread than usual so that its next-token distributions are far
/// from uniform and the KL has something to measure.
pub(crate) fn reduced_teacher(tok: &PromptTokenizer, seed: u64) -> Vlm {
    let dims = TeacherDims {
        layers: 4,
        ..TeacherDims::reduced()
    };
    let config = dims.config(tok).unwrap();
    let init = init_tensors_with_std(&config, seed, 0.2).unwrap();
    vlm_from_tensors(&config, tok, init.into_iter().collect(), &Device::Cpu).unwrap()
}

/// The first `n` samples of `ds` as one batch for `vlm`.
pub(crate) fn probe(ds: &Dataset, vlm: &Vlm, n: usize) -> SupervisedBatch {
    let idx: Vec<usize> = (0..n).collect();
    SupervisedBatch::from_batch(
        &ds.batch(&idx).unwrap(),
        &idx,
        &vlm.preprocessor,
        vlm.config.image_tokens(),
        &Device::Cpu,
    )
    .unwrap()
}

pub(crate) fn term(out: &matvlm::train::StepOutput, name: &str) -> f64 {
    out.terms
        .iter()
        .find(|(k, _)| k == name)
        .unwrap_or_else(|| panic!("no term `{name}` in {:?}", out.terms))
        .1
}

fn copies(vlm: &Vlm) -> BTreeMap<String, Tensor> {
    vlm.named_tensors()
        .into_iter()
        .map(|(k, t)| (k, t.copy().unwrap()))
        .collect()
}

pub(crate) fn same_bits(a: &Tensor, b: &Tensor) -> bool {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Each trainable set, against the names picked by hand from the hybrid's tensor list; the
/// student's trainable tensors are `Var`s and its frozen ones plain tensors.
#[test]
fn trainable_sets_select_the_expected_names() {
    let world = tempfile::tempdir().unwrap();
    let tok = small_world(world.path());
    let teacher = reduced_teacher(&tok, 1);
    let hybrid = teacher.hybrid(&HybridSpec::ratio(0.5)).unwrap();
    assert_eq!(hybrid.mamba_layers(), vec![0, 2]);
    let names: Vec<String> = hybrid.named_tensors().into_iter().map(|(k, _)| k).collect();
    let mixer_tensors = [
        "in_proj.weight",
        "conv1d.weight",
        "conv1d.bias",
        "dt_bias",
        "A_log",
        "D",
        "norm.weight",
        "out_proj.weight",
    ];
    let mixers: BTreeSet<String> = [0, 2]
        .iter()
        .flat_map(|i| {
            mixer_tensors
                .iter()
                .map(move |t| format!("language_model.model.layers.{i}.mamba.{t}"))
        })
        .collect();
    let connector: BTreeSet<String> = names
        .iter()
        .filter(|n| n.starts_with("connector._connector."))
        .cloned()
        .collect();
    assert_eq!(connector.len(), 4, "two linears with biases");
    let all_but_vision: BTreeSet<String> = names
        .iter()
        .filter(|n| !n.starts_with("vision_tower."))
        .cloned()
        .collect();
    let expected = [
        (Trainable::Mixers, mixers.clone()),
        (
            Trainable::MixersConnector,
            mixers.union(&connector).cloned().collect(),
        ),
        (Trainable::AllButVision, all_but_vision),
    ];
    for (trainable, want) in expected {
        let student = trainable.student(&hybrid).unwrap();
        let got: BTreeSet<String> = student.params.names().map(String::from).collect();
        assert_eq!(got, want, "{trainable:?}");
        for (name, t) in student.vlm.named_tensors() {
            assert_eq!(
                t.is_variable(),
                want.contains(&name),
                "{trainable:?}: {name} is_variable"
            );
        }
    }
    // Mixers only: the Mamba layers' LayerNorm and MLP stay frozen.
    assert!(!mixers
        .iter()
        .any(|n| n.contains("mlp") || n.contains("layernorm")));
    // A teacher has no mixer to train.
    let err = Trainable::Mixers.student(&teacher).err().unwrap();
    assert!(err.to_string().contains("no Mamba layer"), "{err}");
    // The upstream default.
    assert_eq!(
        DistillConfig::upstream(10).trainable,
        Trainable::MixersConnector
    );
    assert_eq!(Trainable::default(), Trainable::MixersConnector);
}

/// One step's backward reaches every trainable tensor and no frozen one, nor the teacher.
#[test]
fn gradients_reach_only_the_trainable_tensors() {
    let world = tempfile::tempdir().unwrap();
    let tok = small_world(world.path());
    let teacher = reduced_teacher(&tok, 1);
    let hybrid = teacher.hybrid(&HybridSpec::ratio(0.5)).unwrap();
    let train = load_split(world.path(), "train", &tok, teacher.config.image_tokens());
    let student = Trainable::MixersConnector.student(&hybrid).unwrap();
    let batch = probe(&train, &teacher, 4);
    let out = distill_step(&teacher, &student.vlm, &batch, &DistillLoss::default()).unwrap();
    let store = out.loss.backward().unwrap();
    for (name, t) in student.vlm.named_tensors() {
        let trainable = student.params.get(&name).is_some();
        assert_eq!(
            store.get(&t).is_some(),
            trainable,
            "{name}: gradient present vs trainable"
        );
    }
    for (name, t) in teacher.named_tensors() {
        assert!(store.get(&t).is_none(), "teacher {name} got a gradient");
    }
}

/// The logit terms computed over chunks of positions (the memory-saving path) give the same
/// terms, loss and gradients as computed at once: every term on, labels on, a chunk size that
/// does not divide the sequence; f32, relative 1e-5 (only the summation order differs).
#[test]
fn chunked_logit_terms_equal_the_whole_sequence() {
    let world = tempfile::tempdir().unwrap();
    let tok = small_world(world.path());
    let teacher = reduced_teacher(&tok, 1);
    let hybrid = teacher.hybrid(&HybridSpec::ratio(0.5)).unwrap();
    let train = load_split(world.path(), "train", &tok, teacher.config.image_tokens());
    let student = Trainable::MixersConnector.student(&hybrid).unwrap();
    let batch = probe(&train, &teacher, 4);
    let whole = DistillLoss {
        kl: 1.0,
        temperature: 2.0,
        reverse_kl: 0.5,
        jsd: 0.5,
        ce_teacher: 0.3,
        ce_labels: 0.7,
        hidden: 1.0,
        ..DistillLoss::default()
    };
    let chunked = DistillLoss {
        chunk_positions: 7,
        ..whole.clone()
    };
    assert!(batch.pixel_values.is_some() && batch.tokens > 7);
    let a = distill_step(&teacher, &student.vlm, &batch, &whole).unwrap();
    let b = distill_step(&teacher, &student.vlm, &batch, &chunked).unwrap();
    let close = |x: f64, y: f64, what: &str| {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs().max(y.abs()).max(1e-3),
            "{what}: {x} vs {y}"
        );
    };
    assert_eq!(a.terms.len(), 6);
    for ((na, va), (nb, vb)) in a.terms.iter().zip(&b.terms) {
        assert_eq!(na, nb);
        close(*va, *vb, na);
    }
    let la = a.loss.to_scalar::<f32>().unwrap() as f64;
    close(la, b.loss.to_scalar::<f32>().unwrap() as f64, "loss");
    let (ga, gb) = (a.loss.backward().unwrap(), b.loss.backward().unwrap());
    let mut compared = 0;
    for (name, t) in student.vlm.named_tensors() {
        if let (Some(x), Some(y)) = (ga.get(&t), gb.get(&t)) {
            let scale = max_abs_diff(x, &x.zeros_like().unwrap()).max(1e-6);
            let diff = max_abs_diff(x, y);
            assert!(
                diff <= 1e-5 * scale,
                "{name}: gradients differ by {diff} (scale {scale})"
            );
            compared += 1;
        }
    }
    assert!(compared > 10, "{compared} gradients compared");
}

/// The same model with every tensor in `dtype`.
fn in_dtype(v: &Vlm, dtype: DType) -> Vlm {
    let tensors = v.named_tensors().into_iter().collect();
    let vb = candle_nn::VarBuilder::from_tensors(tensors, dtype, &Device::Cpu);
    Vlm::from_var_builder_with_plan(
        vb,
        v.config.clone(),
        v.tokenizer.clone(),
        v.preprocessor.clone(),
        "test model",
        v.decoder.plan(),
    )
    .unwrap()
}

/// f32 master weights under a bf16 student: the trainable tensors and their AdamW state are
/// checkpointed in f32 while the model runs (and comes back) in bf16, and the KL on a fixed
/// batch falls; without the switch they train in bf16. On an f32 student the switch changes
/// nothing (bit-identical weights).
#[test]
fn master_f32_weights_under_a_bf16_student() {
    let world = tempfile::tempdir().unwrap();
    let tok = small_world(world.path());
    let teacher32 = reduced_teacher(&tok, 1);
    let hybrid32 = teacher32.hybrid(&HybridSpec::ratio(0.5)).unwrap();
    let train = load_split(world.path(), "train", &tok, teacher32.config.image_tokens());
    let (teacher, hybrid) = (
        in_dtype(&teacher32, DType::BF16),
        in_dtype(&hybrid32, DType::BF16),
    );
    let mut cfg = DistillConfig::upstream(6);
    cfg.batch_size = 8;
    cfg.train.lr = 3e-3;
    cfg.train.save_every = 0;
    cfg.train.progress = ProgressMode::Silent;
    let kl_only = DistillLoss {
        hidden: 0.0,
        ..DistillLoss::default()
    };
    let fixed = probe(&train, &teacher, 8);
    let kl = |student: &Vlm| {
        term(
            &distill_step(&teacher, student, &fixed, &kl_only).unwrap(),
            "kl",
        )
    };
    let kl_before = kl(&hybrid);
    let run = |master: bool, teacher: &Vlm, hybrid: &Vlm| {
        let dir = tempfile::tempdir().unwrap();
        let cfg = DistillConfig {
            master_f32: master,
            ..cfg.clone()
        };
        let (student, _) =
            distill(teacher, hybrid, train.clone(), None, &cfg, dir.path(), None).unwrap();
        let ck = RunDir::open(dir.path())
            .unwrap()
            .load_latest(&Device::Cpu)
            .unwrap()
            .unwrap();
        (student, ck)
    };
    let (student, ck) = run(true, &teacher, &hybrid);
    assert_eq!(student.dtype, DType::BF16);
    assert!(!ck.weights.is_empty());
    for (name, t) in &ck.weights {
        assert_eq!(t.dtype(), DType::F32, "master weight {name}");
    }
    let moments: Vec<_> = ck
        .optimizer
        .iter()
        .filter(|(name, _)| !name.starts_with("step."))
        .collect();
    assert!(!moments.is_empty());
    for (name, t) in moments {
        assert_eq!(t.dtype(), DType::F32, "optimizer state {name}");
    }
    let kl_after = kl(&student);
    assert!(kl_after < kl_before, "KL {kl_before} -> {kl_after}");
    let (_, ck16) = run(false, &teacher, &hybrid);
    for (name, t) in &ck16.weights {
        assert_eq!(t.dtype(), DType::BF16, "bf16 weight {name}");
    }

    let (a, _) = run(true, &teacher32, &hybrid32);
    let (b, _) = run(false, &teacher32, &hybrid32);
    for ((na, ta), (_, tb)) in a.named_tensors().iter().zip(b.named_tensors().iter()) {
        assert!(same_bits(ta, tb), "{na} differs on an f32 student");
    }
}

/// A short distillation: the KL on a fixed batch falls, every loss term is logged per step and
/// the evaluations land in metrics.jsonl; afterwards the teacher and every frozen student tensor
/// are bit-identical to before, every trainable one moved, and only trainable tensors have
/// optimiser state.
#[test]
fn a_short_distillation_lowers_the_kl_and_trains_only_the_trainable_set() {
    let world = tempfile::tempdir().unwrap();
    let tok = small_world(world.path());
    let teacher = reduced_teacher(&tok, 1);
    let hybrid = teacher.hybrid(&HybridSpec::ratio(0.5)).unwrap();
    let image_tokens = teacher.config.image_tokens();
    let (train, val) = (
        load_split(world.path(), "train", &tok, image_tokens),
        load_split(world.path(), "val", &tok, image_tokens),
    );
    let teacher_before = copies(&teacher);
    let hybrid_before = copies(&hybrid);

    const STEPS: usize = 30;
    let mut cfg = DistillConfig::upstream(STEPS);
    cfg.loss = DistillLoss {
        kl: 1.0,
        hidden: 1.0,
        ce_labels: 0.5,
        reverse_kl: 0.5,
        ..DistillLoss::default()
    };
    cfg.batch_size = 8;
    cfg.train.lr = 3e-3;
    cfg.train.eval_every = 15;
    cfg.train.save_every = 0;
    cfg.train.progress = ProgressMode::Silent;
    cfg.train.resume = false;

    let kl_only = DistillLoss {
        hidden: 0.0,
        ..DistillLoss::default()
    };
    let fixed = probe(&train, &teacher, 16);
    let kl_before = term(
        &distill_step(&teacher, &hybrid, &fixed, &kl_only).unwrap(),
        "kl",
    );

    let run = tempfile::tempdir().unwrap();
    let (student, summary) = distill(
        &teacher,
        &hybrid,
        train.clone(),
        Some(val),
        &cfg,
        run.path(),
        None,
    )
    .unwrap();
    assert_eq!((summary.stop, summary.step), (StopReason::Completed, STEPS));
    let kl_after = term(
        &distill_step(&teacher, &student, &fixed, &kl_only).unwrap(),
        "kl",
    );
    assert!(
        kl_after < 0.8 * kl_before,
        "KL on a fixed batch went from {kl_before} to {kl_after}"
    );

    // Metrics: every loss term on every step, evaluations at 15 and 30.
    let metrics = RunDir::open(run.path()).unwrap().read_metrics().unwrap();
    let train_lines: Vec<_> = metrics.iter().filter(|m| m["kind"] == "train").collect();
    assert_eq!(train_lines.len(), STEPS);
    for m in &train_lines {
        for key in ["kl", "hidden", "ce_labels", "reverse_kl"] {
            let v = m[key].as_f64();
            assert!(
                v.is_some_and(f64::is_finite),
                "step {}: `{key}` missing or not finite in {m}",
                m["step"]
            );
        }
    }
    let evals: Vec<_> = metrics.iter().filter(|m| m["kind"] == "eval").collect();
    assert_eq!(
        evals
            .iter()
            .map(|m| m["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [15, 30]
    );
    for m in &evals {
        for key in ["val_agree", "val_kl", "val_acc", "val_teacher_acc"] {
            assert!(m[key].as_f64().is_some(), "eval line lacks `{key}`: {m}");
        }
    }
    let config = RunDir::open(run.path())
        .unwrap()
        .read_config()
        .unwrap()
        .unwrap();
    assert_eq!(config["trainable"], "mixers_connector");
    assert_eq!(config["loss"]["ce_labels"], 0.5);

    // The gradient check.
    for (k, t) in teacher.named_tensors() {
        assert!(same_bits(&t, &teacher_before[&k]), "teacher {k} changed");
    }
    let trainable = Trainable::MixersConnector.selection();
    let mut n_trainable = 0;
    for (k, t) in student.named_tensors() {
        let moved = !same_bits(&t, &hybrid_before[&k]);
        assert_eq!(moved, trainable.matches(&k), "{k}: moved = {moved}");
        n_trainable += usize::from(trainable.matches(&k));
    }
    let ck = RunDir::open(run.path())
        .unwrap()
        .load_latest(&Device::Cpu)
        .unwrap()
        .unwrap();
    let with_state: BTreeSet<&str> = ck
        .optimizer
        .keys()
        .filter_map(|k| k.strip_prefix("exp_avg."))
        .collect();
    assert_eq!(with_state.len(), n_trainable);
    assert!(with_state.iter().all(|k| trainable.matches(k)));
    assert_eq!(
        ck.weights.len(),
        n_trainable,
        "checkpoints hold only trainable weights"
    );
}

/// Stopped after step k and resumed (by `distill` itself) ends bit-identical to an
/// uninterrupted `distill` run, losses included.
#[test]
fn a_resumed_distillation_is_bit_identical_to_an_uninterrupted_one() {
    const STEPS: usize = 8;
    const STOP_AT: usize = 3;
    let world = tempfile::tempdir().unwrap();
    let tok = small_world(world.path());
    let teacher = reduced_teacher(&tok, 2);
    let hybrid = teacher.hybrid(&HybridSpec::ratio(0.5)).unwrap();
    let train = load_split(world.path(), "train", &tok, teacher.config.image_tokens());
    let mut cfg = DistillConfig::upstream(STEPS);
    cfg.batch_size = 4;
    cfg.train.lr = 3e-3;
    cfg.train.warmup_steps = 2;
    cfg.train.schedule = LrSchedule::default();
    cfg.train.save_every = 0;
    cfg.train.progress = ProgressMode::Silent;

    let dir_a = tempfile::tempdir().unwrap();
    let (a, sa) = distill(
        &teacher,
        &hybrid,
        train.clone(),
        None,
        &cfg,
        dir_a.path(),
        None,
    )
    .unwrap();
    assert_eq!(sa.step, STEPS);

    // B, first process: the loop by hand, cancelled from inside step STOP_AT.
    let dir_b = tempfile::tempdir().unwrap();
    {
        let student = cfg.trainable.student(&hybrid).unwrap();
        let mut source = cfg.source(train.clone(), &student.vlm).unwrap();
        let cancel = AtomicBool::new(false);
        let mut trainer = Trainer::new(
            cfg.train.clone(),
            &student.params,
            RunDir::open(dir_b.path()).unwrap(),
        )
        .unwrap()
        .with_cancel(&cancel);
        let sb = trainer
            .fit(&mut source, |ctx, batch| {
                if ctx.step == STOP_AT {
                    cancel.store(true, Ordering::SeqCst);
                }
                distill_step(&teacher, &student.vlm, batch, &cfg.loss)
            })
            .unwrap();
        assert_eq!((sb.stop, sb.step), (StopReason::Cancelled, STOP_AT));
    }
    // B, second process: `distill` finds the checkpoint and continues.
    let (b, sb) = distill(&teacher, &hybrid, train, None, &cfg, dir_b.path(), None).unwrap();
    assert_eq!((sb.start_step, sb.step), (STOP_AT, STEPS));
    assert!(sb.resumed_from.is_some());

    let b: HashMap<String, Tensor> = b.named_tensors().into_iter().collect();
    for (k, t) in a.named_tensors() {
        assert!(same_bits(&t, &b[&k]), "{k} differs after resume");
    }
    let lines = |dir: &Path| -> Vec<serde_json::Value> {
        RunDir::open(dir)
            .unwrap()
            .read_metrics()
            .unwrap()
            .into_iter()
            .filter(|m| m["kind"] == "train")
            .collect()
    };
    let (la, lb) = (lines(dir_a.path()), lines(dir_b.path()));
    assert_eq!(lb.len(), STEPS);
    for (x, y) in la.iter().zip(&lb) {
        for key in ["step", "loss", "kl", "hidden", "grad_norm"] {
            assert_eq!(x[key], y[key], "{key} at step {}", x["step"]);
        }
    }
}

/// A model agrees fully with itself at KL 0; a differently initialised one does not; the
/// batched report equals a plain computation sample by sample, unbatched and unpadded.
#[test]
fn agreement_against_itself_another_model_and_a_plain_computation() {
    let world = tempfile::tempdir().unwrap();
    let tok = small_world(world.path());
    let teacher = reduced_teacher(&tok, 1);
    let other = reduced_teacher(&tok, 7);
    let val = load_split(world.path(), "val", &tok, teacher.config.image_tokens());
    let answers = AgreementOptions {
        batch_size: 4,
        limit: Some(6),
        ..AgreementOptions::default()
    };
    let all = AgreementOptions {
        positions: Positions::All,
        ..answers.clone()
    };

    let batch = probe(&val, &teacher, 6);
    let n_answers = batch.target_count();
    let n_all: usize = batch
        .lengths
        .iter()
        .map(|&n| n - 1 + teacher.config.image_tokens())
        .sum();
    for (opts, n) in [(&answers, n_answers), (&all, n_all)] {
        let same = agreement(&teacher, &teacher, &val, opts).unwrap();
        assert_eq!(same.n_positions, n, "{:?}", opts.positions);
        assert_eq!(same.samples, 6);
        assert_eq!(same.agreement, 1.0);
        assert!(same.kl.abs() < 1e-6, "KL with itself {}", same.kl);
        let diff = agreement(&teacher, &other, &val, opts).unwrap();
        assert!(diff.agreement < 1.0, "{:?}", opts.positions);
        assert!(diff.kl > 1e-3, "{:?}: KL {}", opts.positions, diff.kl);
    }

    // Independent: each sample alone (no padding, no batching), math in f64.
    let got = agreement(&teacher, &other, &val, &answers).unwrap();
    let (mut agree, mut kl, mut count) = (0usize, 0f64, 0usize);
    for i in 0..6 {
        let one = probe_at(&val, &teacher, i);
        let (tl, _) = teacher
            .forward(&one.rows, one.pixel_values.as_ref(), &Default::default())
            .unwrap();
        let (sl, _) = other
            .forward(&one.rows, one.pixel_values.as_ref(), &Default::default())
            .unwrap();
        let tl: Vec<Vec<f32>> = tl.squeeze(0).unwrap().to_vec2().unwrap();
        let sl: Vec<Vec<f32>> = sl.squeeze(0).unwrap().to_vec2().unwrap();
        let labels = &one.labels[0];
        assert_eq!(labels.len(), tl.len());
        for pos in 0..tl.len() - 1 {
            if labels[pos + 1] == IGNORE_INDEX {
                continue;
            }
            let (lp, lq) = (log_softmax(&tl[pos], 1.0), log_softmax(&sl[pos], 1.0));
            kl += lp
                .iter()
                .zip(&lq)
                .map(|(p, q)| p.exp() * (p - q))
                .sum::<f64>();
            let top = |v: &[f32]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
            agree += usize::from(top(&tl[pos]) == top(&sl[pos]));
            count += 1;
        }
    }
    assert_eq!(got.n_positions, count);
    assert_eq!(got.agreement, agree as f64 / count as f64);
    let want = kl / count as f64;
    assert!(
        (got.kl - want).abs() <= 1e-4 * want.max(1e-3),
        "KL {} vs {want}",
        got.kl
    );
}

/// Sample `i` of `ds` alone.
fn probe_at(ds: &Dataset, vlm: &Vlm, i: usize) -> SupervisedBatch {
    SupervisedBatch::from_batch(
        &ds.batch(&[i]).unwrap(),
        &[i],
        &vlm.preprocessor,
        vlm.config.image_tokens(),
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn answer_perplexity_of_a_uniform_model_is_the_vocabulary_and_batching_changes_nothing() {
    use matvlm::eval::{answer_perplexity, EvalOptions};
    let world = tempfile::tempdir().unwrap();
    let tok = small_world(world.path());
    let model = reduced_teacher(&tok, 3);
    let val = load_split(world.path(), "val", &tok, model.config.image_tokens());
    let opts = EvalOptions {
        batch_size: 4,
        limit: Some(6),
        ..EvalOptions::default()
    };

    // Zero lm_head: every logit is 0, so every token has probability 1 / vocab.
    let uniform: HashMap<String, Tensor> = model
        .named_tensors()
        .into_iter()
        .map(|(name, t)| {
            let t = if name.contains("lm_head") {
                t.zeros_like().unwrap()
            } else {
                t
            };
            (name, t)
        })
        .collect();
    let uniform = model.rebuilt(uniform).unwrap();
    let vocab = model.config.text_config.vocab_size as f64;
    let r = answer_perplexity(&uniform, &val, &opts).unwrap();
    assert!(
        (r.perplexity - vocab).abs() <= 1e-4 * vocab,
        "uniform model: perplexity {} for a vocabulary of {vocab}",
        r.perplexity
    );

    // The batched value against one sample at a time with a plain f64 log-softmax.
    let (mut total, mut count) = (0.0f64, 0usize);
    for i in 0..6 {
        let b = probe_at(&val, &model, i);
        let (logits, _) = model
            .forward(&b.rows, b.pixel_values.as_ref(), &Capture::none())
            .unwrap();
        let logits: Vec<Vec<f32>> = logits.squeeze(0).unwrap().to_vec2().unwrap();
        let labels = &b.labels[0];
        for t in 1..labels.len() {
            if labels[t] == IGNORE_INDEX {
                continue;
            }
            let row: Vec<f64> = logits[t - 1].iter().map(|&x| x as f64).collect();
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            total += lse - row[labels[t] as usize];
            count += 1;
        }
    }
    let r = answer_perplexity(&model, &val, &opts).unwrap();
    assert_eq!(r.tokens, count);
    let expected = (total / count as f64).exp();
    assert!(
        (r.perplexity - expected).abs() <= 1e-4 * expected,
        "batched {} vs one at a time {expected}",
        r.perplexity
    );
    assert!(r.perplexity > 1.0 && r.perplexity < vocab * 10.0);
}

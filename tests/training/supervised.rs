//! Supervised training and evaluation on a small generated world with a reduced teacher: label
//! expansion and shift, the cross-entropy against a plain-Rust computation, gradients reaching
//! every parameter, the loss falling over a few steps, evaluation reports, and the save/load
//! round trip of a teacher-shaped VLM.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::load_split;
use candle_core::{DType, Device, Tensor};
use matvlm::data::Loader;
use matvlm::data::{expand_labels, SupervisedBatch};
use matvlm::eval::{evaluate, EvalMode, EvalOptions, EvalReport, ImageInput};
use matvlm::generate::GenerateOptions;
use matvlm::loss::shifted_cross_entropy;
use matvlm::model::decoder::Capture;
use matvlm::model::vlm::Vlm;
use matvlm::teacher::{init_tensors, vlm_from_tensors, TeacherDims};
use matvlm::tokenize::{PromptTokenizer, IGNORE_INDEX, IMAGE_TOKEN};
use matvlm::train::supervised::{supervised_step, SupervisedSource};
use matvlm::train::{LrSchedule, ParamSet, ProgressMode, RunDir, Selection, TrainConfig, Trainer};

/// A small world: a few hundred training samples, the default layout (48 px, 3 x 3 grid).
fn small_world(dir: &Path) -> PromptTokenizer {
    crate::common::small_world(dir, 7, (256, 24, 36))
}

/// A reduced teacher over Vars, its parameter set and its config.
fn reduced(tok: &PromptTokenizer, seed: u64) -> (Vlm, ParamSet) {
    let config = TeacherDims::reduced().config(tok).unwrap();
    let init = init_tensors(&config, seed).unwrap();
    let (params, tensors) = ParamSet::select(&init, &Selection::all()).unwrap();
    let vlm = vlm_from_tensors(&config, tok, tensors, &Device::Cpu).unwrap();
    (vlm, params)
}

#[test]
fn labels_expand_over_the_image_positions() {
    let ids = [11, 12, IMAGE_TOKEN, 13, 14, 15];
    let labels = [
        IGNORE_INDEX,
        IGNORE_INDEX,
        IGNORE_INDEX,
        IGNORE_INDEX,
        14,
        15,
    ];
    let got = expand_labels(&ids, &labels, 3).unwrap();
    let ig = IGNORE_INDEX;
    assert_eq!(got, vec![ig, ig, ig, ig, ig, ig, 14, 15]);
    assert!(expand_labels(&ids, &labels[..5], 3).is_err());
}

/// The loss against log-softmax and picking done by hand on the raw numbers; positions whose
/// next label is ignored, and the last position, do not count.
#[test]
fn cross_entropy_matches_a_plain_computation() {
    let (b, t, v) = (2usize, 5usize, 7usize);
    let data: Vec<f32> = (0..b * t * v)
        .map(|i| ((i * 37 % 23) as f32 - 11.0) / 3.0)
        .collect();
    let logits = Tensor::from_vec(data.clone(), (b, t, v), &Device::Cpu).unwrap();
    let ig = IGNORE_INDEX;
    let labels = vec![vec![ig, ig, 3, 6, 0], vec![ig, 2, ig, ig, 5]];
    let (loss, n) = shifted_cross_entropy(&logits, &labels).unwrap();

    let mut total = 0.0f64;
    let mut count = 0;
    for (row, lab) in labels.iter().enumerate() {
        for pos in 0..t - 1 {
            let y = lab[pos + 1];
            if y == ig {
                continue;
            }
            let z = &data[(row * t + pos) * v..(row * t + pos + 1) * v];
            let max = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max + z.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            total += lse - z[y as usize] as f64;
            count += 1;
        }
    }
    assert_eq!(n, count);
    assert_eq!(n, 5);
    let got = loss.to_scalar::<f32>().unwrap() as f64;
    assert!(
        (got - total / count as f64).abs() < 1e-5,
        "{got} vs {}",
        total / count as f64
    );

    let bad = vec![vec![ig, ig, 3, 6, 9], vec![ig, 2, ig, ig, 5]];
    assert!(
        shifted_cross_entropy(&logits, &bad).is_err(),
        "label past the vocabulary"
    );
    let none = vec![vec![ig; t], vec![5, ig, ig, ig, ig]];
    assert!(
        shifted_cross_entropy(&logits, &none).is_err(),
        "nothing to learn"
    );
}

/// Gradients reach every weight, then a few steps on a fixed small world bring the loss on a
/// fixed batch down.
#[test]
fn a_reduced_teacher_learns() {
    let world = tempfile::tempdir().unwrap();
    let tok = small_world(world.path());
    let (vlm, params) = reduced(&tok, 1);
    let train = load_split(world.path(), "train", &tok, vlm.config.image_tokens());

    let probe_idx: Vec<usize> = (0..32).collect();
    let probe = SupervisedBatch::from_batch(
        &train.batch(&probe_idx).unwrap(),
        &probe_idx,
        &vlm.preprocessor,
        vlm.config.image_tokens(),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        probe.pixel_values.as_ref().unwrap().dims(),
        &[32, 3, 48, 48]
    );
    let out = supervised_step(&vlm, &probe).unwrap();
    let before = out.loss.to_scalar::<f32>().unwrap();
    let grads = params.grads(&out.loss.backward().unwrap());
    let missing: Vec<&str> = params
        .names()
        .zip(grads.iter())
        .filter(|(_, g)| g.is_none())
        .map(|(n, _)| n)
        .collect();
    assert!(missing.is_empty(), "no gradient for {missing:?}");

    let run = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        steps: 25,
        lr: 3e-3,
        betas: (0.9, 0.98),
        weight_decay: 0.0,
        clip: Some(1.0),
        schedule: LrSchedule::Constant,
        warmup_steps: 2,
        save_every: 0,
        progress: ProgressMode::Silent,
        resume: false,
        ..TrainConfig::default()
    };
    let loader = Loader::new(train.len(), 16, 0).unwrap();
    let mut source = SupervisedSource::for_model(train.clone(), loader, &vlm);
    let mut trainer = Trainer::new(cfg, &params, RunDir::open(run.path()).unwrap()).unwrap();
    let summary = trainer
        .fit(&mut source, |_, batch| supervised_step(&vlm, batch))
        .unwrap();
    assert_eq!(summary.step, 25);
    let metrics = trainer.run_dir().read_metrics().unwrap();
    assert!(metrics.iter().any(|m| m.get("token_acc").is_some()));

    let after = supervised_step(&vlm, &probe)
        .unwrap()
        .loss
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        after < 0.7 * before,
        "loss on the probe batch went from {before} to {after}"
    );
}

/// Reports count every sample once, per type and overall; the teacher-forced prediction of the
/// first answer token is the token greedy generation starts with (the two paths line up).
#[test]
fn evaluation_reports_and_paths_agree() {
    let world = tempfile::tempdir().unwrap();
    let tok = small_world(world.path());
    let config = TeacherDims::reduced().config(&tok).unwrap();
    let init = init_tensors(&config, 3).unwrap();
    let vlm = vlm_from_tensors(&config, &tok, init.into_iter().collect(), &Device::Cpu).unwrap();
    let test = load_split(world.path(), "test", &tok, config.image_tokens());

    let mut reports: Vec<EvalReport> = Vec::new();
    for (mode, image) in [
        (EvalMode::TeacherForced, ImageInput::Real),
        (EvalMode::TeacherForced, ImageInput::Blank),
        (EvalMode::Generate, ImageInput::Real),
        (EvalMode::Generate, ImageInput::Blank),
    ] {
        let opts = EvalOptions {
            mode,
            image,
            batch_size: 8,
            limit: Some(20),
            max_new_tokens: 8,
        };
        let r = evaluate(&vlm, &test, &opts).unwrap();
        assert_eq!(r.n, 20);
        assert_eq!(r.per_type.values().map(|s| s.n).sum::<usize>(), 20);
        assert_eq!(
            r.per_type.values().map(|s| s.correct).sum::<usize>(),
            r.correct
        );
        assert!((r.accuracy - r.correct as f64 / 20.0).abs() < 1e-12);
        let mut types: BTreeMap<String, usize> = BTreeMap::new();
        for rec in &test.records[..20] {
            *types.entry(rec.question_type.clone().unwrap()).or_default() += 1;
        }
        let counted: BTreeMap<String, usize> =
            r.per_type.iter().map(|(k, s)| (k.clone(), s.n)).collect();
        assert_eq!(counted, types);
        let back: EvalReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        reports.push(r);
    }

    // First answer token: argmax under teacher forcing == first greedily generated token.
    let idx: Vec<usize> = (0..6).collect();
    let inputs = SupervisedBatch::from_batch(
        &test.batch(&idx).unwrap(),
        &idx,
        &vlm.preprocessor,
        config.image_tokens(),
        &Device::Cpu,
    )
    .unwrap();
    let (logits, _) = vlm
        .forward(&inputs.rows, inputs.pixel_values.as_ref(), &Capture::none())
        .unwrap();
    let argmax: Vec<Vec<u32>> = logits.argmax(2).unwrap().to_vec2().unwrap();
    for (row, i) in idx.iter().enumerate() {
        let first = inputs.labels[row]
            .iter()
            .position(|&l| l != IGNORE_INDEX)
            .unwrap();
        let rec = &test.records[*i];
        let prompt = matvlm::tokenize::single_turn_prompt(&rec.turns[0].question, true);
        let ids = tok.encode_prompt_with_images(&prompt, 1).unwrap();
        let pixels = inputs
            .pixel_values
            .as_ref()
            .unwrap()
            .narrow(0, row, 1)
            .unwrap();
        let opts = GenerateOptions {
            max_new_tokens: 1,
            stop_at_eos: false,
            ..GenerateOptions::default()
        };
        let (out, _) = vlm
            .generate_ids(&ids, Some(&pixels), &opts, &mut |_| true)
            .unwrap();
        assert_eq!(out[0], argmax[row][first - 1], "sample {i}");
    }
}

/// A teacher-shaped VLM saved in bf16 loads back with the same config and weights equal to the
/// bf16 rounding of the originals.
#[test]
fn a_teacher_saves_and_loads_in_the_tinyllava_layout() {
    let world = tempfile::tempdir().unwrap();
    let tok = small_world(world.path());
    let config = TeacherDims::reduced().config(&tok).unwrap();
    let init = init_tensors(&config, 5).unwrap();
    let vlm = vlm_from_tensors(
        &config,
        &tok,
        init.clone().into_iter().collect(),
        &Device::Cpu,
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    vlm.save(out.path(), DType::BF16, None).unwrap();
    let back = Vlm::load(out.path().to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(back.config.image_tokens(), 8);
    assert_eq!(back.layer_kinds(), vec!["attn"; 2]);
    assert_eq!(back.tokenizer().unwrap().vocab_size(), tok.vocab_size());
    let saved: BTreeMap<String, Tensor> = back.named_tensors().into_iter().collect();
    assert_eq!(
        saved.keys().collect::<Vec<_>>(),
        init.keys().collect::<Vec<_>>()
    );
    for (name, t) in &init {
        let rounded = t
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let diff = (&saved[name] - rounded)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{name}");
    }
    // Initialisation: LayerNorm weights one, biases zero, matrices about N(0, 0.02).
    let ln = &init["language_model.model.final_layernorm.weight"];
    assert_eq!(ln.min(0).unwrap().to_scalar::<f32>().unwrap(), 1.0);
    let fc1 = init["language_model.model.layers.0.mlp.fc1.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mean = fc1.iter().sum::<f32>() / fc1.len() as f32;
    let std = (fc1.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / fc1.len() as f32).sqrt();
    assert!(
        mean.abs() < 0.003 && (std - 0.02).abs() < 0.002,
        "mean {mean} std {std}"
    );
    let bias = &init["language_model.model.layers.0.mlp.fc1.bias"];
    assert_eq!(
        bias.abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
}

/// With a world that holds compositions out, reports also count seen and unseen records apart,
/// overall and per type, and name them in the metrics; a record is counted in the group its tag
/// says.
#[test]
fn evaluation_reports_seen_and_unseen_apart() {
    let world = tempfile::tempdir().unwrap();
    let cfg = matvlm::data::WorldConfig {
        seed: 9,
        train: 64,
        val: 8,
        test: 24,
        vocab_size: 400,
        holdout: Some(matvlm::teacher::teacher_holdout(
            &matvlm::data::WorldConfig::default(),
        )),
        ..matvlm::data::WorldConfig::default()
    };
    matvlm::data::generate_world(&cfg, world.path()).unwrap();
    let tok = PromptTokenizer::from_file(&world.path().join("tokenizer.json")).unwrap();
    let (vlm, _) = reduced(&tok, 4);
    let test = load_split(world.path(), "test", &tok, vlm.config.image_tokens());
    let opts = EvalOptions {
        batch_size: 8,
        ..EvalOptions::default()
    };
    let r = evaluate(&vlm, &test, &opts).unwrap();
    assert_eq!(r.n, 24);
    let names: Vec<&str> = r.per_composition.keys().map(String::as_str).collect();
    assert_eq!(names, ["seen", "unseen"]);
    for (c, g) in &r.per_composition {
        let tagged: Vec<_> = test
            .records
            .iter()
            .filter(|rec| rec.composition.as_deref() == Some(c.as_str()))
            .collect();
        assert_eq!(g.n, tagged.len(), "{c}");
        assert_eq!(g.n, 12, "{c}: half the test split");
        assert_eq!(g.per_type.values().map(|s| s.n).sum::<usize>(), g.n);
        assert_eq!(
            g.per_type.values().map(|s| s.correct).sum::<usize>(),
            g.correct
        );
        assert!((g.accuracy - g.correct as f64 / g.n as f64).abs() < 1e-12);
    }
    assert_eq!(
        r.per_composition.values().map(|g| g.correct).sum::<usize>(),
        r.correct
    );
    let metrics: BTreeMap<String, f64> = r.metrics("val_").into_iter().collect();
    assert_eq!(
        metrics["val_acc_unseen"],
        r.per_composition["unseen"].accuracy
    );
    assert!(metrics.keys().any(|k| k.starts_with("val_acc_seen_")));
    assert!(r.summary().contains("| unseen "), "{}", r.summary());
    let back: EvalReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    assert_eq!(back, r);
}

/// The committed tiny teacher answers questions about scenes it never saw: a fresh world from
/// the teacher's config with another seed, tokenised with the teacher's own tokenizer (a small
/// world's BPE numbers its tokens differently from the 100 000-sample world the teacher learnt),
/// teacher forced; and with blank images it falls to about the question-only level.
///
/// Thresholds, not values, so that a retrained teacher passes and a broken one does not: seen
/// compositions at >= 95% (the committed teacher: 99%+), unseen ones clearly above what blank
/// images give (how far a teacher generalises to held-out compositions is what is measured, not
/// assumed).
#[test]
fn the_committed_teacher_knows_its_world() {
    let teacher_dir = matvlm::teacher::default_teacher_path().unwrap();
    let teacher = Vlm::load(teacher_dir.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = matvlm::data::WorldConfig {
        seed: 7,
        train: 8,
        val: 8,
        test: 300,
        ..matvlm::teacher::teacher_world_config()
    };
    matvlm::data::generate_world(&cfg, dir.path()).unwrap();
    let tok = teacher.tokenizer().unwrap();
    let test = load_split(dir.path(), "test", tok, teacher.config.image_tokens());
    let opts = |image| EvalOptions {
        mode: EvalMode::TeacherForced,
        image,
        ..EvalOptions::default()
    };
    let real = evaluate(&teacher, &test, &opts(ImageInput::Real)).unwrap();
    let seen = &real.per_composition["seen"];
    assert!(seen.accuracy >= 0.95, "{}", real.summary());
    let blank = evaluate(&teacher, &test, &opts(ImageInput::Blank)).unwrap();
    assert!(blank.accuracy <= 0.35, "{}", blank.summary());
    println!("real: {}\nblank: {}", real.summary(), blank.summary());
    let unseen = &real.per_composition["unseen"];
    assert!(
        unseen.accuracy >= blank.accuracy + 0.1,
        "{} against blank {}",
        real.summary(),
        blank.summary()
    );
}

//! The trainer: AdamW and clipping against torch, schedules against transformers, and the loop
//! (loss falls, frozen weights stay, metrics, checkpoints, bit-exact resume) on a toy model.
//!
//! Fixtures: tests/fixtures/train/, made by scripts/fixtures/make_train_fixtures.py.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use matvlm::train::{
    clip_grad_norm, glob, AdamW, AdamWConfig, BatchSource, CheckpointState, Grads, IndexedSource,
    LrSchedule, ParamSet, ProgressMode, Resumable, RunDir, Schedule, Selection, StepCtx,
    StepOutput, StopReason, TrainConfig, Trainer,
};
use matvlm::Error;
use rand::{rngs::StdRng, Rng, SeedableRng};

type R<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn fixture(name: &str) -> PathBuf {
    crate::common::fixture("train").join(name)
}

fn load_fixture(name: &str) -> R<HashMap<String, Tensor>> {
    Ok(matvlm::checkpoint::load_safetensors(
        &fixture(name),
        &Device::Cpu,
    )?)
}

fn values(t: &Tensor) -> R<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// A fresh, empty folder under the target dir's tmp (removed first if a previous run left it).
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("train-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------------
// AdamW and clipping against torch

/// Tolerance of the torch comparisons: |ours - torch| <= 1e-6 * max(1, |torch|). torch's
/// vectorised CPU kernels fuse some multiply-adds, so a few ulps of f32 are expected.
const TORCH_TOL: f32 = 1e-6;

fn assert_close(what: &str, ours: &[f32], theirs: &[f32], tol: f32) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths differ");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        let err = (a - b).abs();
        assert!(
            err <= tol * b.abs().max(1.0),
            "{what}[{i}]: ours {a} vs reference {b} (err {err:e})"
        );
    }
}

#[derive(serde::Deserialize)]
struct AdamMeta {
    names: Vec<String>,
    betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
    max_norm: f64,
    lrs: Vec<f64>,
    steps: usize,
    decay: Vec<String>,
}

#[test]
fn adamw_with_clipping_matches_torch() -> R<()> {
    let meta: AdamMeta = serde_json::from_str(&std::fs::read_to_string(fixture("adamw.json"))?)?;
    let fx = load_fixture("adamw.safetensors")?;
    let vars = meta
        .names
        .iter()
        .map(|n| Ok((n.clone(), Var::from_tensor(&fx[&format!("init.{n}")])?)))
        .collect::<R<Vec<_>>>()?;
    let params = ParamSet::new(vars)?;
    let mut opt = AdamW::new(
        &params,
        AdamWConfig {
            lr: meta.lrs[0],
            betas: meta.betas,
            eps: meta.eps,
            weight_decay: meta.weight_decay,
        },
    )?;
    let mut decayed: Vec<&str> = opt.decayed_names().collect();
    decayed.sort();
    assert_eq!(decayed, meta.decay, "which parameters get weight decay");

    for t in 0..meta.steps {
        let named: HashMap<String, Tensor> = meta
            .names
            .iter()
            .filter_map(|n| {
                fx.get(&format!("grad.{t}.{n}"))
                    .map(|g| (n.clone(), g.clone()))
            })
            .collect();
        let mut grads = Grads::from_named(&params, &named)?;
        let norm = clip_grad_norm(&mut grads, meta.max_norm)?;
        let want = values(&fx[&format!("norm.{t}")])?[0];
        assert_close(
            &format!("grad norm at step {t}"),
            &[norm as f32],
            &[want],
            TORCH_TOL,
        );
        opt.set_lr(meta.lrs[t]);
        opt.step(&grads)?;
        for (name, var) in params.iter() {
            let want = values(&fx[&format!("param.{t}.{name}")])?;
            assert_close(
                &format!("{name} after step {t}"),
                &values(var.as_tensor())?,
                &want,
                TORCH_TOL,
            );
        }
    }
    let state = opt.state_tensors()?;
    for name in &meta.names {
        for key in ["exp_avg", "exp_avg_sq"] {
            let k = format!("{key}.{name}");
            assert_close(&k, &values(&state[&k])?, &values(&fx[&k])?, TORCH_TOL);
        }
        let torch_steps = values(&fx[&format!("step.{name}")])?[0] as u64;
        assert_eq!(
            opt.step_count(name),
            Some(torch_steps),
            "step count of {name}"
        );
    }
    // The fixture leaves one parameter without a gradient at one step; torch then skips it.
    assert!(meta
        .names
        .iter()
        .any(|n| opt.step_count(n) != Some(meta.steps as u64)));
    Ok(())
}

#[test]
fn adamw_state_round_trips_through_safetensors() -> R<()> {
    let dev = Device::Cpu;
    let mk = || -> R<ParamSet> {
        Ok(ParamSet::new(vec![
            (
                "a.weight".into(),
                Var::from_tensor(&Tensor::arange(0f32, 6., &dev)?.reshape((2, 3))?)?,
            ),
            (
                "a.bias".into(),
                Var::from_tensor(&Tensor::new(&[0.5f32, -1.0], &dev)?)?,
            ),
        ])?)
    };
    let (p1, p2) = (mk()?, mk()?);
    let mut o1 = AdamW::new(&p1, AdamWConfig::default())?;
    let mut o2 = AdamW::new(&p2, AdamWConfig::default())?;
    let grads = |p: &ParamSet, k: f32| -> R<Grads> {
        let named = p
            .iter()
            .map(|(n, v)| Ok((n.to_string(), (v.as_detached_tensor().sin()? * k as f64)?)))
            .collect::<R<HashMap<_, _>>>()?;
        Ok(Grads::from_named(p, &named)?)
    };
    for k in [1.0, -2.0] {
        o1.step(&grads(&p1, k)?)?;
    }
    let path = scratch("adamw-state").join("optimizer.safetensors");
    o1.save(&path)?;
    // Same weights, restored state: both must continue identically.
    p2.load(&p1.named_tensors().into_iter().collect(), "p1")?;
    o2.load(&path)?;
    for k in [0.5, 3.0] {
        o1.step(&grads(&p1, k)?)?;
        o2.step(&grads(&p2, k)?)?;
    }
    for ((n, a), (_, b)) in p1.iter().zip(p2.iter()) {
        assert_eq!(values(a.as_tensor())?, values(b.as_tensor())?, "{n}");
    }
    // A state file for other parameters names the missing key.
    let other = ParamSet::new(vec![(
        "b.weight".into(),
        Var::zeros((2, 3), DType::F32, &dev)?,
    )])?;
    match AdamW::new(&other, AdamWConfig::default())?.load(&path) {
        Err(Error::MissingKey { key, .. }) => assert_eq!(key, "exp_avg.b.weight"),
        other => panic!("expected MissingKey, got {other:?}"),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Schedules against transformers

#[derive(serde::Deserialize)]
struct ScheduleCase {
    schedule: LrSchedule,
    warmup_steps: usize,
    total_steps: usize,
    base_lr: f64,
    lrs: Vec<f64>,
}

#[test]
fn schedules_match_transformers() -> R<()> {
    let cases: Vec<ScheduleCase> =
        serde_json::from_str(&std::fs::read_to_string(fixture("schedules.json"))?)?;
    assert!(cases.len() >= 10);
    for c in &cases {
        let s = Schedule::new(c.schedule.clone(), c.base_lr, c.warmup_steps, c.total_steps)?;
        for (step, want) in c.lrs.iter().enumerate() {
            let got = s.lr(step);
            assert!(
                (got - want).abs() <= 1e-12 * want.abs() + 1e-18,
                "{:?} warmup {} total {}: step {step}: {got} vs transformers {want}",
                c.schedule,
                c.warmup_steps,
                c.total_steps
            );
        }
    }
    Ok(())
}

#[test]
fn impossible_schedules_are_refused() {
    let wsd = LrSchedule::Wsd {
        decay_steps: Some(8),
        decay_fraction: 0.1,
        warmup_type: matvlm::train::Ramp::Linear,
        decay_type: matvlm::train::Ramp::Cosine,
        min_lr_ratio: 0.0,
        num_cycles: 0.5,
    };
    assert!(matches!(
        Schedule::new(wsd, 1e-3, 5, 10),
        Err(Error::Invalid(_))
    ));
    let bad = TrainConfig {
        accum: 0,
        ..TrainConfig::default()
    };
    assert!(matches!(bad.validate(), Err(Error::Invalid(_))));
    assert!(TrainConfig::default().validate().is_ok());
}

// ---------------------------------------------------------------------------------------------
// Parameter selection

#[test]
fn glob_patterns_select_by_name() -> R<()> {
    assert!(glob(
        "*.mamba.*",
        "language_model.model.layers.0.mamba.in_proj.weight"
    ));
    assert!(!glob(
        "*.mamba.*",
        "language_model.model.layers.1.self_attn.dense.weight"
    ));
    assert!(glob("connector.*", "connector._connector.0.weight"));
    assert!(!glob("connector.*", "vision_tower.connector"));
    assert!(glob("*bias", "mixer.dt_bias"));
    assert!(glob("a*b*c", "aXXbYYbc"));
    assert!(!glob("a*b*c", "aXXbYYbcd"));
    assert!(glob("exact", "exact") && !glob("exact", "exactly"));

    let sel = Selection::new(["*.mamba.*", "connector.*"], ["*.norm.*"]);
    assert!(sel.matches("m.layers.0.mamba.in_proj.weight"));
    assert!(!sel.matches("m.layers.0.mamba.norm.weight"));
    assert!(sel.matches("connector.2.bias"));
    assert!(!sel.matches("m.layers.1.mlp.fc1.weight"));

    let dev = Device::Cpu;
    let mut all = BTreeMap::new();
    all.insert(
        "x.mamba.w".to_string(),
        Tensor::ones((2, 2), DType::F32, &dev)?,
    );
    all.insert(
        "x.mlp.w".to_string(),
        Tensor::ones((2, 2), DType::F32, &dev)?,
    );
    let (params, merged) = ParamSet::select(&all, &Selection::new(["*.mamba.*"], [""; 0]))?;
    assert_eq!(params.names().collect::<Vec<_>>(), ["x.mamba.w"]);
    assert_eq!(params.num_params(), 4);
    assert!(merged["x.mamba.w"].is_variable() && !merged["x.mlp.w"].is_variable());
    let none = ParamSet::select(&all, &Selection::new(["*.conv.*"], [""; 0]));
    assert!(matches!(none, Err(Error::Invalid(_))));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The loop on a toy model: frozen linear embedding, then a trainable 2-layer MLP, regression.

const IN: usize = 4;
const HID: usize = 16;
const BATCH: usize = 16;

/// Initial weights, seeded: the frozen `embed.weight` and the trainable `mlp.*`.
fn toy_weights(seed: u64) -> R<BTreeMap<String, Tensor>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = |shape: &[usize], scale: f32| -> R<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    };
    let mut w = BTreeMap::new();
    w.insert("embed.weight".into(), t(&[IN, IN], 1.0)?);
    w.insert("mlp.fc1.weight".into(), t(&[HID, IN], 0.5)?);
    w.insert("mlp.fc1.bias".into(), t(&[HID], 0.1)?);
    w.insert("mlp.fc2.weight".into(), t(&[1, HID], 0.25)?);
    w.insert("mlp.fc2.bias".into(), t(&[1], 0.1)?);
    Ok(w)
}

struct Toy {
    embed: Tensor,
    fc1_w: Tensor,
    fc1_b: Tensor,
    fc2_w: Tensor,
    fc2_b: Tensor,
}

impl Toy {
    /// Built through a VarBuilder over the map from `ParamSet::select`, as a real model is.
    fn new(vb: VarBuilder) -> R<Self> {
        Ok(Self {
            embed: vb.get((IN, IN), "embed.weight")?,
            fc1_w: vb.get((HID, IN), "mlp.fc1.weight")?,
            fc1_b: vb.get(HID, "mlp.fc1.bias")?,
            fc2_w: vb.get((1, HID), "mlp.fc2.weight")?,
            fc2_b: vb.get(1, "mlp.fc2.bias")?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = x.matmul(&self.embed.t()?)?;
        let h = h
            .matmul(&self.fc1_w.t()?)?
            .broadcast_add(&self.fc1_b)?
            .tanh()?;
        h.matmul(&self.fc2_w.t()?)?.broadcast_add(&self.fc2_b)
    }
}

/// Batch `i` of a fixed regression task, a pure function of `i`.
fn toy_batch(i: usize) -> candle_core::Result<(Tensor, Tensor)> {
    let mut rng = StdRng::seed_from_u64(1000 + i as u64);
    let xs: Vec<f32> = (0..BATCH * IN)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let ys: Vec<f32> = xs
        .chunks(IN)
        .map(|x| (x[0] * 1.5 - x[1]).sin() + 0.5 * x[2] * x[3])
        .collect();
    Ok((
        Tensor::from_vec(xs, (BATCH, IN), &Device::Cpu)?,
        Tensor::from_vec(ys, (BATCH, 1), &Device::Cpu)?,
    ))
}

fn toy_source(limit: usize) -> impl BatchSource<Batch = (Tensor, Tensor)> {
    IndexedSource::new(move |i| {
        if i >= limit {
            Ok(None)
        } else {
            Ok(Some(toy_batch(i)?))
        }
    })
}

/// One micro-batch: MSE, with input noise drawn from the step's seeded rng (so resume must
/// reproduce the randomness too), and a second term for the logs.
fn toy_step(model: &Toy, ctx: &StepCtx, batch: &(Tensor, Tensor)) -> matvlm::Result<StepOutput> {
    let (x, y) = batch;
    let mut rng = ctx.rng();
    let noise: Vec<f32> = (0..x.elem_count())
        .map(|_| rng.random_range(-0.01..0.01))
        .collect();
    let x = (x + Tensor::from_vec(noise, x.shape(), x.device())?)?;
    let err = (model.forward(&x)? - y)?;
    let loss = err.sqr()?.mean_all()?;
    let mae = err.abs()?.mean_all()?.to_scalar::<f32>()? as f64;
    Ok(StepOutput {
        terms: vec![
            ("mse".into(), loss.to_scalar::<f32>()? as f64),
            ("mae".into(), mae),
        ],
        loss,
        tokens: x.dim(0)?,
        grads: None,
    })
}

fn toy_setup(seed: u64) -> R<(ParamSet, Toy)> {
    let (params, tensors) =
        ParamSet::select(&toy_weights(seed)?, &Selection::new(["mlp.*"], [""; 0]))?;
    let model = Toy::new(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu))?;
    Ok((params, model))
}

fn toy_config(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        lr: 2e-2,
        schedule: LrSchedule::Cosine {
            num_cycles: 0.5,
            min_lr_ratio: 0.1,
        },
        warmup_steps: 3,
        clip: Some(1.0),
        accum: 2,
        save_every: 0,
        keep_last: 2,
        progress: ProgressMode::Silent,
        ..TrainConfig::default()
    }
}

fn train_lines(run: &Path) -> R<Vec<serde_json::Value>> {
    Ok(RunDir::open(run)?
        .read_metrics()?
        .into_iter()
        .filter(|r| r["kind"] == "train")
        .collect())
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn toy_training_lowers_the_loss_and_keeps_frozen_weights() -> R<()> {
    let dir = scratch("loss-falls");
    let (params, model) = toy_setup(7)?;
    let before = params.snapshot()?;
    let embed_before = values(&model.embed)?;
    let cfg = toy_config(60);
    let schedule = cfg.schedule()?;
    let mut data = toy_source(usize::MAX);
    let summary = Trainer::new(cfg, &params, RunDir::open(&dir)?)?
        .fit(&mut data, |ctx, b| toy_step(&model, ctx, b))?;
    assert_eq!(summary.stop, StopReason::Completed);
    assert_eq!(summary.step, 60);
    assert_eq!(summary.tokens, (60 * 2 * BATCH) as u64);
    assert_eq!(data.state()["next"], 120, "two micro-batches per step");

    let lines = train_lines(&dir)?;
    assert_eq!(lines.len(), 60, "one train line per step");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["step"], i + 1);
        for key in ["loss", "mse", "mae", "lr", "grad_norm", "tokens_per_s"] {
            assert!(l[key].is_number(), "step {}: `{key}` missing in {l}", i + 1);
        }
        assert_eq!(
            l["lr"].as_f64(),
            Some(schedule.lr(i)),
            "lr of step {}",
            i + 1
        );
        // The loss is the mse term (averaged over the micro-batches the same way).
        let (loss, mse) = (l["loss"].as_f64().unwrap(), l["mse"].as_f64().unwrap());
        assert!((loss - mse).abs() <= 1e-6 * loss.abs());
    }
    let mean = |ls: &[serde_json::Value]| {
        ls.iter().map(|l| l["loss"].as_f64().unwrap()).sum::<f64>() / ls.len() as f64
    };
    let (first, last) = (mean(&lines[..5]), mean(&lines[55..]));
    assert!(
        last < 0.5 * first,
        "loss did not fall: first {first}, last {last}"
    );

    assert_eq!(
        values(&model.embed)?,
        embed_before,
        "the frozen embedding moved"
    );
    for (name, t) in &before {
        assert_ne!(
            values(params.get(name).unwrap().as_tensor())?,
            values(t)?,
            "{name} did not train"
        );
    }
    // The final checkpoint is there, complete, and nothing temporary is left behind.
    let run = RunDir::open(&dir)?;
    let latest = run.latest_dir()?.expect("a checkpoint");
    assert!(latest.ends_with("step-000060"));
    assert!(dir.join("config.json").is_file());
    let tmp: Vec<_> = files_under(&dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".tmp"))
        .collect();
    assert!(tmp.is_empty(), "temporary files left: {tmp:?}");
    Ok(())
}

/// The must-show: a run stopped after step k and resumed ends with exactly the weights (and
/// optimiser state, and logged losses) of an uninterrupted run.
#[test]
fn resumed_run_is_bit_identical_to_an_uninterrupted_one() -> R<()> {
    const STEPS: usize = 12;
    const STOP_AT: usize = 7;
    let cfg = TrainConfig {
        save_every: 5,
        ..toy_config(STEPS)
    };

    // A: straight through.
    let dir_a = scratch("resume-a");
    let (params_a, model_a) = toy_setup(11)?;
    let mut trainer = Trainer::new(cfg.clone(), &params_a, RunDir::open(&dir_a)?)?;
    let sa = trainer.fit(&mut toy_source(usize::MAX), |ctx, b| {
        toy_step(&model_a, ctx, b)
    })?;
    assert_eq!((sa.stop, sa.step), (StopReason::Completed, STEPS));
    let opt_a = trainer.optimizer().state_tensors()?;

    // B, first process: cancelled from inside step STOP_AT, so it stops at that step boundary.
    let dir_b = scratch("resume-b");
    {
        let (params, model) = toy_setup(11)?;
        let cancel = AtomicBool::new(false);
        let sb = Trainer::new(cfg.clone(), &params, RunDir::open(&dir_b)?)?
            .with_cancel(&cancel)
            .fit(&mut toy_source(usize::MAX), |ctx, b| {
                if ctx.step == STOP_AT {
                    cancel.store(true, Ordering::SeqCst);
                }
                toy_step(&model, ctx, b)
            })?;
        assert_eq!((sb.stop, sb.step), (StopReason::Cancelled, STOP_AT));
        assert!(sb.last_checkpoint.unwrap().ends_with("step-000007"));
    }
    // A crash after the checkpoint would leave lines of steps the resumed run redoes.
    {
        let mut run = RunDir::open(&dir_b)?;
        run.log(&serde_json::json!({"kind": "train", "step": STOP_AT + 1, "loss": -1.0}))?;
    }
    let ck: CheckpointState = serde_json::from_str(&std::fs::read_to_string(
        dir_b.join("checkpoints/step-000007/state.json"),
    )?)?;
    assert_eq!(
        ck.data["next"],
        2 * STOP_AT,
        "data position saved with the checkpoint"
    );
    assert_eq!((ck.step, ck.lr), (STOP_AT, cfg.schedule()?.lr(STOP_AT - 1)));

    // B, second process: everything rebuilt from scratch, then resumed from the run dir.
    let (params_b, model_b) = toy_setup(11)?;
    let mut trainer = Trainer::new(cfg, &params_b, RunDir::open(&dir_b)?)?;
    let sb = trainer.fit(&mut toy_source(usize::MAX), |ctx, b| {
        toy_step(&model_b, ctx, b)
    })?;
    assert_eq!(
        (sb.stop, sb.start_step, sb.step),
        (StopReason::Completed, STOP_AT, STEPS)
    );
    assert!(sb.resumed_from.unwrap().ends_with("step-000007"));

    for (name, a) in params_a.iter() {
        let b = params_b.get(name).unwrap();
        let (a, b) = (values(a.as_tensor())?, values(b.as_tensor())?);
        let same_bits =
            a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same_bits, "{name} differs after resume:\n{a:?}\n{b:?}");
    }
    let opt_b = trainer.optimizer().state_tensors()?;
    for (k, a) in &opt_a {
        if a.dtype() == DType::F32 {
            assert_eq!(values(a)?, values(&opt_b[k])?, "optimiser {k}");
        } else {
            assert_eq!(
                a.to_vec0::<i64>()?,
                opt_b[k].to_vec0::<i64>()?,
                "optimiser {k}"
            );
        }
    }
    let (la, lb) = (train_lines(&dir_a)?, train_lines(&dir_b)?);
    assert_eq!(
        lb.len(),
        STEPS,
        "the stale line was dropped and no step logged twice"
    );
    for (a, b) in la.iter().zip(&lb) {
        assert_eq!(a["step"], b["step"]);
        assert_eq!(a["loss"], b["loss"], "loss at step {}", a["step"]);
        assert_eq!(
            a["grad_norm"], b["grad_norm"],
            "grad norm at step {}",
            a["step"]
        );
    }
    // keep_last = 2: of 5, 7, 10, 12 only the newest two remain.
    let kept: Vec<usize> = RunDir::open(&dir_b)?
        .checkpoints()?
        .into_iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(kept, [10, 12]);
    Ok(())
}

#[test]
fn accumulation_averages_micro_batches() -> R<()> {
    // Two micro-batches of 16 rows with accum 2 take the same steps as one batch of their 32 rows.
    let steps = 4;
    let cfg = |accum| TrainConfig {
        accum,
        clip: None,
        ..toy_config(steps)
    };
    let plain_step = |model: &Toy, b: &(Tensor, Tensor)| -> matvlm::Result<StepOutput> {
        let loss = (model.forward(&b.0)? - &b.1)?.sqr()?.mean_all()?;
        Ok(StepOutput {
            loss,
            terms: vec![],
            tokens: b.0.dim(0)?,
            grads: None,
        })
    };
    let (p1, m1) = toy_setup(3)?;
    Trainer::new(cfg(2), &p1, RunDir::open(scratch("accum-2"))?)?
        .fit(&mut toy_source(usize::MAX), |_, b| plain_step(&m1, b))?;
    let (p2, m2) = toy_setup(3)?;
    let mut joined = IndexedSource::new(|i: usize| -> matvlm::Result<Option<(Tensor, Tensor)>> {
        let (a, b) = (toy_batch(2 * i)?, toy_batch(2 * i + 1)?);
        Ok(Some((
            Tensor::cat(&[a.0, b.0], 0)?,
            Tensor::cat(&[a.1, b.1], 0)?,
        )))
    });
    Trainer::new(cfg(1), &p2, RunDir::open(scratch("accum-1"))?)?
        .fit(&mut joined, |_, b| plain_step(&m2, b))?;
    for (name, a) in p1.iter() {
        let b = p2.get(name).unwrap();
        assert_close(name, &values(a.as_tensor())?, &values(b.as_tensor())?, 1e-5);
    }
    Ok(())
}

#[test]
fn data_exhaustion_and_evaluation() -> R<()> {
    let dir = scratch("exhaust");
    let (params, model) = toy_setup(5)?;
    let cfg = TrainConfig {
        eval_every: 2,
        // Plain lines (captured by the test harness): exercises the non-terminal display.
        progress: ProgressMode::Lines,
        log_every: 1,
        ..toy_config(10)
    };
    let mut evals = Vec::new();
    let held_out = toy_batch(999_999)?;
    // 5 batches, 2 per step: steps of (0,1), (2,3), then (4) alone, then nothing.
    let summary = Trainer::new(cfg, &params, RunDir::open(&dir)?)?
        .with_eval(|step| {
            evals.push(step);
            let loss = (model.forward(&held_out.0)? - &held_out.1)?
                .sqr()?
                .mean_all()?;
            Ok(vec![("eval_mse".into(), loss.to_scalar::<f32>()? as f64)])
        })
        .fit(&mut toy_source(5), |ctx, b| toy_step(&model, ctx, b))?;
    assert_eq!((summary.stop, summary.step), (StopReason::DataExhausted, 3));
    assert_eq!(summary.tokens, (5 * BATCH) as u64);
    assert_eq!(evals, [2]);
    let metrics = RunDir::open(&dir)?.read_metrics()?;
    let eval_lines: Vec<_> = metrics.iter().filter(|r| r["kind"] == "eval").collect();
    assert_eq!(eval_lines.len(), 1);
    assert_eq!(eval_lines[0]["step"], 2);
    assert!(eval_lines[0]["eval_mse"].as_f64().unwrap().is_finite());
    assert!(RunDir::open(&dir)?
        .latest_dir()?
        .unwrap()
        .ends_with("step-000003"));
    Ok(())
}

#[test]
fn bad_step_outputs_are_errors() -> R<()> {
    let (params, model) = toy_setup(1)?;
    let run = |name: &str| RunDir::open(scratch(name));
    // A loss that is not a scalar.
    let err = Trainer::new(toy_config(3), &params, run("bad-shape")?)?
        .fit(&mut toy_source(10), |_, b| {
            Ok(StepOutput {
                loss: (model.forward(&b.0)? - &b.1)?,
                terms: vec![],
                tokens: 1,
                grads: None,
            })
        })
        .unwrap_err();
    assert!(
        matches!(err, Error::Invalid(ref m) if m.contains("scalar")),
        "{err}"
    );
    // A term that would overwrite a metrics field.
    let err = Trainer::new(toy_config(3), &params, run("bad-term")?)?
        .fit(&mut toy_source(10), |ctx, b| {
            let mut out = toy_step(&model, ctx, b)?;
            out.terms.push(("lr".into(), 0.0));
            Ok(out)
        })
        .unwrap_err();
    assert!(
        matches!(err, Error::Invalid(ref m) if m.contains("`lr`")),
        "{err}"
    );
    // A NaN loss stops the run before it touches the weights.
    let before = params.snapshot()?;
    let dir = scratch("nan");
    let err = Trainer::new(toy_config(3), &params, RunDir::open(&dir)?)?
        .fit(&mut toy_source(10), |ctx, b| {
            let mut out = toy_step(&model, ctx, b)?;
            if ctx.step == 1 {
                out.loss = (out.loss * f64::NAN)?;
            }
            Ok(out)
        })
        .unwrap_err();
    assert!(err.to_string().contains("step 1"), "{err}");
    for (name, t) in &before {
        assert_eq!(
            values(params.get(name).unwrap().as_tensor())?,
            values(t)?,
            "{name}"
        );
    }
    assert!(RunDir::open(&dir)?.latest_dir()?.is_none());
    Ok(())
}

#[test]
fn checkpoints_are_atomic_and_found_without_the_pointer() -> R<()> {
    let dir = scratch("rundir");
    let mut run = RunDir::open(&dir)?;
    let dev = Device::Cpu;
    let w: BTreeMap<String, Tensor> = [("w".to_string(), Tensor::new(&[1f32, 2.], &dev)?)].into();
    let o: BTreeMap<String, Tensor> =
        [("exp_avg.w".to_string(), Tensor::new(&[0f32, 0.], &dev)?)].into();
    let state = |step| CheckpointState {
        format: matvlm::train::run::CHECKPOINT_FORMAT,
        step,
        lr: 1e-3,
        data: serde_json::json!({"next": step}),
        train_config: serde_json::json!({}),
        tokens: 0,
        extra: serde_json::Value::Null,
    };
    // Leftovers of a save interrupted mid-way: a temp folder, and a folder without state.json.
    let stale_tmp = dir.join("checkpoints/.step-000009.1234.tmp");
    std::fs::create_dir_all(&stale_tmp)?;
    std::fs::create_dir_all(dir.join("checkpoints/step-000099"))?;
    for step in [1, 2, 3] {
        run.save_checkpoint(&w, &o, &state(step), 2)?;
    }
    let steps: Vec<usize> = run.checkpoints()?.into_iter().map(|c| c.0).collect();
    assert_eq!(
        steps,
        [2, 3],
        "keep_last 2; the incomplete step-000099 does not count"
    );
    assert!(
        !stale_tmp.exists(),
        "the interrupted save's temp folder is cleaned up"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("checkpoints/latest"))?,
        "step-000003"
    );
    let leftovers: Vec<_> = files_under(&dir.join("checkpoints"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let ck = run.load_latest(&dev)?.unwrap();
    assert_eq!(ck.state, state(3));
    assert_eq!(values(&ck.weights["w"])?, [1.0, 2.0]);
    // Without the pointer, the newest complete checkpoint is found by scanning.
    std::fs::remove_file(dir.join("checkpoints/latest"))?;
    assert!(run.latest_dir()?.unwrap().ends_with("step-000003"));
    // A truncated weights file is reported with its path.
    std::fs::write(
        dir.join("checkpoints/step-000003/model.safetensors"),
        b"\x10\0\0",
    )?;
    match run.load_latest(&dev) {
        Err(Error::BadSafetensors { path, .. }) => assert!(path.ends_with("model.safetensors")),
        other => panic!("expected BadSafetensors, got {other:?}"),
    }
    Ok(())
}

#[test]
fn a_finished_run_is_not_restarted_over_its_checkpoints() -> R<()> {
    let dir = scratch("no-clobber");
    let (params, model) = toy_setup(2)?;
    Trainer::new(toy_config(2), &params, RunDir::open(&dir)?)?
        .fit(&mut toy_source(100), |ctx, b| toy_step(&model, ctx, b))?;
    let fresh = TrainConfig {
        resume: false,
        ..toy_config(2)
    };
    let err = Trainer::new(fresh, &params, RunDir::open(&dir)?)?
        .fit(&mut toy_source(100), |ctx, b| toy_step(&model, ctx, b))
        .unwrap_err();
    assert!(
        matches!(err, Error::Invalid(ref m) if m.contains("step-000002")),
        "{err}"
    );
    // Resuming a finished run does nothing and keeps the log as it was.
    let before = train_lines(&dir)?;
    let s = Trainer::new(toy_config(2), &params, RunDir::open(&dir)?)?
        .fit(&mut toy_source(100), |ctx, b| toy_step(&model, ctx, b))?;
    assert_eq!(
        (s.stop, s.start_step, s.step),
        (StopReason::Completed, 2, 2)
    );
    assert_eq!(train_lines(&dir)?, before);
    Ok(())
}

#[test]
fn progress_line_shows_every_term() {
    let terms = vec![("l2".to_string(), 12.5), ("kl".to_string(), 0.0321)];
    let line = matvlm::train::StepReport {
        step: 3,
        total: 10,
        loss: 0.75,
        terms: &terms,
        lr: 2e-4,
        grad_norm: 0.5,
        tokens_per_s: 1234.0,
    }
    .summary();
    for piece in [
        "loss 0.7500",
        "l2 12.5000",
        "kl 0.0321",
        "lr 2.00e-4",
        "gnorm 0.5000",
        "1234 tok/s",
    ] {
        assert!(line.contains(piece), "`{piece}` missing from `{line}`");
    }
}

#[test]
fn step_rng_depends_only_on_seed_step_and_micro() {
    let ctx = |seed, step, micro| StepCtx {
        step,
        micro,
        accum: 2,
        seed,
    };
    let draw = |c: StepCtx| c.rng().random::<u64>();
    assert_eq!(draw(ctx(1, 5, 0)), draw(ctx(1, 5, 0)));
    assert_ne!(draw(ctx(1, 5, 0)), draw(ctx(1, 5, 1)));
    assert_ne!(draw(ctx(1, 5, 0)), draw(ctx(1, 6, 0)));
    assert_ne!(draw(ctx(1, 5, 0)), draw(ctx(2, 5, 0)));
}

#[test]
fn ctrlc_flag_is_installed_once() -> R<()> {
    let a = matvlm::train::ctrlc_flag()?;
    let b = matvlm::train::ctrlc_flag()?;
    assert!(std::sync::Arc::ptr_eq(&a, &b));
    assert!(!a.load(Ordering::SeqCst));
    Ok(())
}

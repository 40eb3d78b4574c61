//! Distillation at scale on a reduced random teacher: gradient accumulation against one big
//! batch, gradient checkpointing against the plain backward, data parallelism (in-process
//! ranks) against one rank, resume with another world size, and the launcher's rules.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use matvlm::data::Dataset;
use matvlm::loss::{DistillLoss, HiddenLoss};
use matvlm::model::hybrid::HybridSpec;
use matvlm::model::vlm::Vlm;
use matvlm::train::collective::{all_reduce_grads, Collective, LocalGroup};
use matvlm::train::distill::{distill, student_step, DistillConfig, Trainable};
use matvlm::train::parallel::{shard_rows, Backend, Parallel};
use matvlm::train::{Grads, LrSchedule, ProgressMode, RunDir};

use crate::common::{load_split, max_abs_diff};
use crate::distill_mode::{reduced_teacher, same_bits, small_world};

struct Setup {
    world: tempfile::TempDir,
    tok: matvlm::tokenize::PromptTokenizer,
    teacher: Vlm,
    hybrid: Vlm,
    train: Arc<Dataset>,
}

fn setup(seed: u64) -> Setup {
    let world = tempfile::tempdir().unwrap();
    let tok = small_world(world.path());
    let teacher = reduced_teacher(&tok, seed);
    let hybrid = teacher.hybrid(&HybridSpec::ratio(0.5)).unwrap();
    let train = load_split(world.path(), "train", &tok, teacher.config.image_tokens());
    Setup {
        world,
        tok,
        teacher,
        hybrid,
        train,
    }
}

/// A short run's settings: a constant learning rate after one warmup step, so that a run cut
/// short and resumed with more steps sees the same rates.
fn short_cfg(batch: usize, accum: usize) -> DistillConfig {
    let mut cfg = DistillConfig::upstream(3);
    cfg.batch_size = batch;
    cfg.train.accum = accum;
    cfg.train.lr = 3e-3;
    cfg.train.schedule = LrSchedule::Constant;
    cfg.train.warmup_steps = 1;
    cfg.train.save_every = 0;
    cfg.train.progress = ProgressMode::Silent;
    cfg
}

fn run(s: &Setup, cfg: &DistillConfig, dir: &Path) -> HashMap<String, Tensor> {
    let (student, _) =
        distill(&s.teacher, &s.hybrid, s.train.clone(), None, cfg, dir, None).unwrap();
    student.named_tensors().into_iter().collect()
}

fn train_lines(dir: &Path) -> Vec<serde_json::Value> {
    RunDir::open(dir)
        .unwrap()
        .read_metrics()
        .unwrap()
        .into_iter()
        .filter(|m| m["kind"] == "train")
        .collect()
}

fn assert_same_weights(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>, what: &str) {
    assert_eq!(a.len(), b.len());
    for (k, t) in a {
        assert!(same_bits(t, &b[k]), "{what}: {k} differs");
    }
}

/// Gradients of a step, lined up with `params`: from the step itself or by differentiating.
fn step_grads(
    s: &Setup,
    student: &matvlm::train::Student,
    rows: std::ops::Range<usize>,
    loss: &DistillLoss,
    checkpoint: bool,
) -> (Grads, f64, Vec<(String, f64)>) {
    let idx: Vec<usize> = rows.collect();
    let batch = matvlm::data::SupervisedBatch::from_batch(
        &s.train.batch(&idx).unwrap(),
        &idx,
        &s.teacher.preprocessor,
        s.teacher.config.image_tokens(),
        &Device::Cpu,
    )
    .unwrap();
    let out = student_step(&s.teacher, student, &batch, loss, checkpoint).unwrap();
    let value = out.loss.to_scalar::<f32>().unwrap() as f64;
    let grads = match out.grads {
        Some(g) => g,
        None => student.params.grads(&out.loss.backward().unwrap()),
    };
    (grads, value, out.terms)
}

fn assert_close_grads(a: &Grads, b: &Grads, names: &[String], rel: f64) -> usize {
    let mut compared = 0;
    for (i, name) in names.iter().enumerate() {
        match (a.get(i), b.get(i)) {
            (Some(x), Some(y)) => {
                let scale = max_abs_diff(x, &x.zeros_like().unwrap()).max(1e-6);
                let diff = max_abs_diff(x, y);
                assert!(
                    diff <= rel * scale,
                    "{name}: gradients differ by {diff} (scale {scale})"
                );
                compared += 1;
            }
            (None, None) => {}
            (x, y) => panic!("{name}: one side has no gradient ({x:?} vs {y:?})"),
        }
    }
    compared
}

/// Gradient checkpointing gives the loss, every term and every gradient of the plain backward
/// (f32; relative 1e-5 of each gradient's largest element: the recomputation sums the same
/// products in another order), with the logit terms at once and in chunks, for the default
/// trainable set (mixers and connector: the gradient goes down to the image features) and for
/// everything but the vision tower (lm_head and final norm trainable too).
#[test]
fn checkpointed_blocks_give_the_gradients_of_the_plain_backward() {
    let s = setup(3);
    let loss = DistillLoss {
        kl: 1.0,
        temperature: 2.0,
        reverse_kl: 0.5,
        ce_labels: 0.7,
        hidden: 1.0,
        ..DistillLoss::default()
    };
    for trainable in [Trainable::MixersConnector, Trainable::AllButVision] {
        let student = trainable.student(&s.hybrid).unwrap();
        let names: Vec<String> = student.params.names().map(String::from).collect();
        for chunk in [0, 7] {
            let loss = DistillLoss {
                chunk_positions: chunk,
                hidden_kind: if chunk == 0 {
                    HiddenLoss::L2Norm
                } else {
                    HiddenLoss::Mse
                },
                ..loss.clone()
            };
            let (plain, lp, tp) = step_grads(&s, &student, 0..4, &loss, false);
            let (ckpt, lc, tc) = step_grads(&s, &student, 0..4, &loss, true);
            assert!((lp - lc).abs() <= 1e-5 * lp.abs(), "loss {lp} vs {lc}");
            assert_eq!(tp.len(), 4, "{tp:?}");
            for ((na, va), (nb, vb)) in tp.iter().zip(&tc) {
                assert_eq!(na, nb);
                assert!(
                    (va - vb).abs() <= 1e-5 * va.abs().max(1e-3),
                    "{na}: {va} vs {vb}"
                );
            }
            let compared = assert_close_grads(&plain, &ckpt, &names, 1e-5);
            assert!(
                compared >= 10,
                "{trainable:?}: {compared} gradients compared"
            );
            let connector = names.iter().position(|n| n.starts_with("connector."));
            assert!(
                ckpt.get(connector.unwrap()).is_some(),
                "no connector gradient"
            );
        }
    }
}

/// Accumulation: two micro-batches of 4 give the gradient of one batch of 8 (their mean), for a
/// loss that is a mean over samples (the KL: summed over positions, divided by the batch);
/// f32 within relative 1e-5 (the big batch sums its samples in another order). Through the
/// trainer, the first step's loss and gradient norm of `accum: 2` x 4 equal those of 1 x 8.
#[test]
fn accumulated_micro_batches_equal_one_big_batch() {
    let s = setup(4);
    let kl_only = DistillLoss {
        hidden: 0.0,
        ..DistillLoss::default()
    };
    let student = Trainable::MixersConnector.student(&s.hybrid).unwrap();
    let names: Vec<String> = student.params.names().map(String::from).collect();
    let (mut acc, _, _) = step_grads(&s, &student, 0..4, &kl_only, false);
    acc.accumulate(step_grads(&s, &student, 4..8, &kl_only, false).0)
        .unwrap();
    acc.scale(0.5).unwrap();
    let (big, _, _) = step_grads(&s, &student, 0..8, &kl_only, false);
    assert!(assert_close_grads(&acc, &big, &names, 1e-5) >= 10);

    let first = |batch: usize, accum: usize| {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = short_cfg(batch, accum);
        cfg.loss = kl_only.clone();
        cfg.train.steps = 1;
        run(&s, &cfg, dir.path());
        train_lines(dir.path()).remove(0)
    };
    let (a, b) = (first(4, 2), first(8, 1));
    for key in ["loss", "kl", "grad_norm"] {
        let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
        assert!((x - y).abs() <= 1e-5 * x.abs(), "{key}: {x} vs {y}");
    }
}

/// Data parallelism on the CPU: 2 and 4 in-process ranks sharing each global micro-batch of 8
/// train to weights bit-identical to one rank accumulating the same 8 samples as 2 x 4 or
/// 4 x 2 (same products, and the ranks' gradients added in rank order as accumulation adds
/// micro-batches), with the default loss (KL + the per-micro-batch L2 norm); rank 0 alone
/// writes the metrics, with the loss and gradient norm of the single rank's.
#[test]
fn data_parallel_ranks_train_the_weights_of_one_rank_accumulating() {
    let s = setup(5);
    for world in [2, 4] {
        let (dir_dp, dir_one) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut dp = short_cfg(8, 1);
        dp.parallel = Parallel {
            ranks: world,
            backend: Backend::Local,
            // Small buckets: several all-reduces per step.
            bucket_mb: 0.01,
        };
        let a = run(&s, &dp, dir_dp.path());
        let b = run(&s, &short_cfg(8 / world, world), dir_one.path());
        assert_same_weights(&a, &b, &format!("{world} ranks"));
        let (la, lb) = (train_lines(dir_dp.path()), train_lines(dir_one.path()));
        assert_eq!(la.len(), 3, "one metrics line per step, from rank 0 only");
        for (x, y) in la.iter().zip(&lb) {
            for key in ["loss", "kl", "hidden", "grad_norm", "tokens"] {
                assert_eq!(
                    x[key], y[key],
                    "{key} at step {} ({world} ranks)",
                    x["step"]
                );
            }
        }
    }
}

/// A run started on 2 ranks and resumed on 4 (same global batch) ends with the weights of one
/// rank that accumulated 2 x 4 and then 4 x 2: the checkpoint holds the global loader
/// position, and rank 0's weights and optimiser state are every rank's.
#[test]
fn a_data_parallel_run_resumes_with_another_world_size() {
    let s = setup(6);
    let (dir_dp, dir_one) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let parallel = |ranks| Parallel {
        ranks,
        ..Parallel::default()
    };
    let mut first = short_cfg(8, 1);
    first.parallel = parallel(2);
    run(&s, &first, dir_dp.path());
    let mut second = short_cfg(8, 1);
    second.train.steps = 5;
    second.parallel = parallel(4);
    let a = run(&s, &second, dir_dp.path());

    run(&s, &short_cfg(4, 2), dir_one.path());
    let mut second_one = short_cfg(2, 4);
    second_one.train.steps = 5;
    let b = run(&s, &second_one, dir_one.path());
    assert_same_weights(&a, &b, "resumed on 4 ranks");
    let steps: Vec<u64> = train_lines(dir_dp.path())
        .iter()
        .map(|m| m["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5]);
}

/// One rank of an in-process group is the plain trainer: the same weights, bit for bit.
#[test]
fn world_size_one_is_the_plain_path() {
    let s = setup(7);
    let student_a = Trainable::MixersConnector.student(&s.hybrid).unwrap();
    let student_b = Trainable::MixersConnector.student(&s.hybrid).unwrap();
    let cfg = short_cfg(4, 2);
    let group = LocalGroup::new(1).unwrap();
    let fit = |student: &matvlm::train::Student, comm: Option<&dyn Collective>| {
        let dir = tempfile::tempdir().unwrap();
        let mut source = cfg.source(s.train.clone(), &student.vlm).unwrap();
        let mut trainer = matvlm::train::Trainer::new(
            cfg.train.clone(),
            &student.params,
            RunDir::open(dir.path()).unwrap(),
        )
        .unwrap();
        if let Some(c) = comm {
            trainer = trainer.with_collective(c, 1024);
        }
        trainer
            .fit(&mut source, |_, batch| {
                student_step(&s.teacher, student, batch, &cfg.loss, false)
            })
            .unwrap();
        student.params.snapshot().unwrap()
    };
    let a = fit(&student_a, None);
    let b = fit(&student_b, Some(&group[0]));
    for (k, t) in &a {
        assert!(same_bits(t, &b[k]), "{k} differs");
    }
}

/// The in-process all-reduce: every rank gets the sum, added in rank order; buckets split and
/// rejoin the gradients whatever their size; a failing rank releases the others.
#[test]
fn in_process_all_reduce_sums_in_rank_order_and_aborts() {
    let world = 3;
    let group = LocalGroup::new(world).unwrap();
    // Values whose sum depends on the order: 1e8 + 1 - 1e8 in f32.
    let values = [1e8f32, 1.0, -1e8];
    let sums: Vec<Vec<f32>> = std::thread::scope(|scope| {
        let handles: Vec<_> = group
            .iter()
            .map(|c| {
                scope.spawn(move || -> matvlm::Result<Vec<f32>> {
                    let mine = Tensor::new(&[values[c.rank()], c.rank() as f32], &Device::Cpu)?;
                    let mut out = Vec::new();
                    for _ in 0..3 {
                        out = c.all_reduce_sum(&mine)?.to_vec1::<f32>()?;
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    let in_order = (1e8f32 + 1.0) + -1e8;
    for s in &sums {
        assert_eq!(s, &vec![in_order, 3.0]);
    }

    // Bucketed gradients: three parameters, buckets of 8 bytes (each tensor its own bucket, or
    // the two small ones together).
    let params = matvlm::train::ParamSet::new(vec![
        (
            "a".into(),
            candle_core::Var::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            "b".into(),
            candle_core::Var::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            "c".into(),
            candle_core::Var::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap(),
        ),
    ])
    .unwrap();
    let group = LocalGroup::new(2).unwrap();
    let reduced: Vec<Grads> = std::thread::scope(|scope| {
        let handles: Vec<_> = group
            .iter()
            .map(|c| {
                let params = &params;
                scope.spawn(move || {
                    let r = c.rank() as f32;
                    let a = Tensor::full(r + 1.0, (2, 3), &Device::Cpu).unwrap();
                    // Rank 1 has no gradient for `b`; nobody has one for `c`.
                    let b = (c.rank() == 0).then(|| Tensor::new(&[5f32], &Device::Cpu).unwrap());
                    let mut g = Grads::from_vec(params, vec![Some(a), b, None]).unwrap();
                    all_reduce_grads(c, params, &mut g, &[true, true, false], 8).unwrap();
                    g
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for g in &reduced {
        let a: Vec<f32> = g.get(0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, vec![3.0; 6]);
        assert_eq!(g.get(1).unwrap().to_vec1::<f32>().unwrap(), vec![5.0]);
        assert!(g.get(2).is_none());
    }

    let group = LocalGroup::new(2).unwrap();
    let waiting = std::thread::scope(|scope| {
        let h = scope.spawn(|| group[1].all_reduce_sum(&Tensor::new(&[1f32], &Device::Cpu)?));
        std::thread::sleep(std::time::Duration::from_millis(50));
        group[0].abort("test failure");
        h.join().unwrap()
    });
    let err = waiting.unwrap_err().to_string();
    assert!(err.contains("rank 0 failed: test failure"), "{err}");
}

/// The launcher and the layout rules, without GPUs: `--gpus N` means N NCCL ranks on
/// cuda:0..N-1 with models on cuda:0 (refused in a build without NCCL, or with another device);
/// shares of a batch are equal, in order and cover it; a global micro-batch the ranks cannot
/// share equally is refused.
#[test]
fn launcher_and_layout_rules() {
    let (par, device) = Parallel::launch(None, "cpu").unwrap();
    assert_eq!(
        (par.ranks, par.backend, device.as_str()),
        (1, Backend::Local, "cpu")
    );
    assert!(!par.is_parallel());
    let gpus = Parallel::launch(Some(4), "cpu");
    if cfg!(feature = "nccl") {
        let (par, device) = gpus.unwrap();
        assert_eq!(
            (par.ranks, par.backend, device.as_str()),
            (4, Backend::Nccl, "cuda:0")
        );
    } else {
        let err = gpus.unwrap_err().to_string();
        assert!(err.contains("--features nccl"), "{err}");
    }
    let err = Parallel::launch(Some(2), "cuda:1").unwrap_err().to_string();
    assert!(err.contains("cuda:0"), "{err}");
    assert!(Parallel::launch(Some(0), "cpu").is_err());

    for (n, world) in [(8, 4), (8, 2), (7, 3), (2, 2)] {
        let shares: Vec<_> = (0..world).map(|r| shard_rows(n, r, world)).collect();
        assert_eq!(shares[0].start, 0);
        assert_eq!(shares[world - 1].end, n);
        for w in shares.windows(2) {
            assert_eq!(w[0].end, w[1].start);
        }
        if n % world == 0 {
            assert!(shares.iter().all(|s| s.len() == n / world));
        }
    }
    let local = |ranks| Parallel {
        ranks,
        ..Parallel::default()
    };
    assert!(local(4).check(8).is_ok());
    let err = local(3).check(8).unwrap_err().to_string();
    assert!(err.contains("batch_size 8"), "{err}");
    assert!(local(0).check(8).is_err());
}

/// The memory plan's exact parts are the models' real sizes: on a small teacher's config, its
/// parameter counts equal those of the built teacher (the test fixture's), hybrid and trainable set, the optimiser
/// parts are 4 (master) + 4 (gradient) + 8 (moments) bytes per trainable parameter, and
/// checkpointing lowers the peak while the weights stay.
#[test]
fn memory_plan_counts_the_real_models() {
    use matvlm::train::memory::{MemoryOptions, MemoryPlan};
    let teacher = crate::common::teacher();
    let config = crate::common::fixture("teacher").join("config.json");
    let opts = MemoryOptions {
        config: config.display().to_string(),
        ratio: 0.5,
        batch: 4,
        seq_len: 64,
        dtype: "bf16".into(),
        ..MemoryOptions::default()
    };
    let plan = MemoryPlan::distill(&opts).unwrap();
    let count = |v: &Vlm| {
        v.named_tensors()
            .iter()
            .map(|(_, t)| t.elem_count() as u64)
            .sum::<u64>()
    };
    let hybrid = teacher.hybrid(&HybridSpec::ratio(0.5)).unwrap();
    assert_eq!(plan.teacher_params, count(&teacher));
    assert_eq!(plan.student_params, count(&hybrid));
    let student = Trainable::MixersConnector.student(&hybrid).unwrap();
    assert_eq!(plan.trainable_params, student.params.num_params() as u64);
    let part = |p: &MemoryPlan, name: &str| {
        p.parts
            .iter()
            .find(|x| x.name == name)
            .unwrap_or_else(|| panic!("no part `{name}` in {}", p.table()))
            .bytes
    };
    let n = plan.trainable_params;
    assert_eq!(part(&plan, "master weights f32"), 4 * n);
    assert_eq!(part(&plan, "gradients of the trainable set"), 4 * n);
    assert_eq!(part(&plan, "AdamW moments f32"), 8 * n);
    assert_eq!(part(&plan, "teacher weights"), 2 * plan.teacher_params);
    let ck = MemoryPlan::distill(&MemoryOptions {
        checkpoint_blocks: true,
        ..opts.clone()
    })
    .unwrap();
    assert!(
        ck.total_bytes < plan.total_bytes,
        "{}\n{}",
        ck.table(),
        plan.table()
    );
    assert_eq!(part(&ck, "teacher weights"), part(&plan, "teacher weights"));
    let bf16 = MemoryPlan::distill(&MemoryOptions {
        master_f32: false,
        ..opts
    })
    .unwrap();
    assert_eq!(part(&bf16, "gradients of the trainable set"), 2 * n);
    assert!(bf16.parts.iter().all(|p| p.name != "master weights f32"));
}

/// The lazy LLaVA stream as the training source of a data-parallel run (each rank's stream
/// prepares its own share on worker threads) trains the weights of the loaded data set's run,
/// bit for bit.
#[test]
fn a_data_parallel_run_over_lazy_streams_equals_the_loaded_data() {
    use matvlm::data::{LazyLlava, LlavaStream, LoadOptions, Loader, OnBadRecord, StreamOptions};
    use matvlm::train::distill::{distill_from, Shard};
    let s = setup(8);
    let mut cfg = short_cfg(8, 1);
    cfg.parallel = Parallel {
        ranks: 2,
        ..Parallel::default()
    };
    let dir_a = tempfile::tempdir().unwrap();
    let a = run(&s, &cfg, dir_a.path());

    let json = s.world.path().join("train.json");
    let lazy = Arc::new(LazyLlava::open(&json, s.world.path()).unwrap());
    let tok = Arc::new(s.tok.clone());
    let source = |shard: Shard, student: &Vlm| -> matvlm::Result<LlavaStream> {
        let loader = Loader::new(lazy.len(), cfg.batch_size, cfg.train.seed)?.with_drop_last(true);
        let opts = StreamOptions {
            workers: 2,
            prefetch: 2,
            load: LoadOptions {
                max_len: 256,
                on_bad: OnBadRecord::Fail,
                image_tokens: student.config.image_tokens(),
                ..LoadOptions::default()
            },
            image_tokens: student.config.image_tokens(),
        };
        let stream = LlavaStream::new(
            lazy.clone(),
            loader,
            tok.clone(),
            student.preprocessor.clone(),
            opts,
            student.device.clone(),
        )?;
        Ok(match shard {
            Some((rank, world)) => stream.with_shard(rank, world),
            None => stream,
        })
    };
    let dir_b = tempfile::tempdir().unwrap();
    let (b, summary) = distill_from(
        &s.teacher,
        &s.hybrid,
        &source,
        None,
        &cfg,
        dir_b.path(),
        None,
    )
    .unwrap();
    assert_eq!(summary.step, 3);
    let b: HashMap<String, Tensor> = b.named_tensors().into_iter().collect();
    assert_same_weights(&a, &b, "lazy streams");
}

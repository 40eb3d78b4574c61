//! The training and evaluation bindings against the library; unknown options; Ctrl-C.

use super::*;

/// Run `code` after a prelude that loads the fixture's teacher `t` and its `train`, `val` and
/// `test` splits; `TEACHER`, `TRAIN`, `VAL`, `TEST` (paths) and `DIR` (the fixture's folder) are
/// defined.
fn run_code(
    fx: &Fixture,
    session: &Session,
    code: &str,
) -> Result<Dynamic, Box<rhai::EvalAltResult>> {
    run_code_with(fx, &script::engine(session), code)
}

/// [`run_code`] on a given engine.
fn run_code_with(
    fx: &Fixture,
    engine: &rhai::Engine,
    code: &str,
) -> Result<Dynamic, Box<rhai::EvalAltResult>> {
    let mut constants = vec![("TEACHER", fx.teacher_dir().display().to_string())];
    for (name, split) in [("TRAIN", "train"), ("VAL", "val"), ("TEST", "test")] {
        let path = fx.world().join(format!("{split}.json"));
        constants.push((name, path.display().to_string()));
    }
    constants.push(("DIR", fx.dir.path().display().to_string()));
    let prelude = "let t = load_model(TEACHER);\n\
        let train = dataset(TRAIN, #{ tokenizer: t });\n\
        let val = dataset(VAL, #{ tokenizer: t });\n\
        let test = dataset(TEST, #{ tokenizer: t });\n";
    eval_with_constants(engine, &constants, &format!("{prelude}{code}"))
}

fn logits_of(v: &Vlm) -> Vec<f32> {
    v.prompt_logits(&matvlm::tokenize::single_turn_prompt("hi", false), None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn distill_and_train_are_the_librarys_runs() {
    use matvlm::train::distill::{DistillConfig, Trainable};
    use matvlm::train::supervised::SupervisedConfig;
    use matvlm::train::ProgressMode;

    let fx = Fixture::new();
    let session = Session::default();
    let out = run_code(
        &fx,
        &session,
        "let h = t.hybrid(#{ ratio: 0.25 });\n\
         let r = distill(t, h, train, #{ steps: 3, batch: 4, lr: 0.002, run_dir: DIR + \"/d\",\n\
             loss: #{ kl: 1, hidden: 0.5, ce_labels: 0.25, positions: \"answers\" },\n\
             trainable: \"mixers\", progress: \"silent\", save_every: 0 });\n\
         let s = train(t, train, #{ steps: 2, batch: 4, run_dir: DIR + \"/s\", progress: \"silent\",\n\
             val: val, eval_every: 2 });\n\
         r.model.save(DIR + \"/dm\"); s.model.save(DIR + \"/sm\");\n\
         #{ steps: r.steps, completed: r.completed, stopped: r.stopped, ck: r.checkpoint,\n\
            metrics: r.metrics, layers: r.model.mamba_layers(), s_steps: s.steps,\n\
            s_metrics: s.metrics, shown: `${r}` }",
    )
    .unwrap();
    let m: Map = out.cast();
    assert_eq!(m["steps"].as_int().unwrap(), 3);
    assert!(m["completed"].as_bool().unwrap());
    assert!(!m["stopped"].as_bool().unwrap());
    let ck = m["ck"].clone().into_string().unwrap();
    assert!(Path::new(&ck).join("state.json").is_file(), "{ck}");
    let metrics: Vec<Map> = m["metrics"]
        .clone()
        .into_array()
        .unwrap()
        .into_iter()
        .map(|v| v.cast())
        .collect();
    assert_eq!(metrics.len(), 3);
    for key in ["kl", "hidden", "ce_labels", "loss"] {
        assert!(metrics[2].contains_key(key), "{key}: {metrics:?}");
    }
    assert!(m["shown"]
        .clone()
        .into_string()
        .unwrap()
        .contains("completed"));
    let s_metrics = m["s_metrics"].clone().into_array().unwrap();
    assert!(
        s_metrics.iter().any(|v| v.clone().cast::<Map>()["kind"]
            .clone()
            .into_string()
            .unwrap()
            == "eval"),
        "the val evaluation is logged"
    );

    // The same runs through the library directly give the same weights.
    let teacher = fx.teacher();
    let hybrid = teacher.hybrid(&HybridSpec::ratio(0.25)).unwrap();
    let mut cfg = DistillConfig::upstream(3);
    cfg.batch_size = 4;
    cfg.train.lr = 0.002;
    cfg.train.save_every = 0;
    cfg.train.progress = ProgressMode::Silent;
    cfg.trainable = Trainable::Mixers;
    cfg.loss.hidden = 0.5;
    cfg.loss.ce_labels = 0.25;
    cfg.loss.positions = matvlm::loss::Positions::Answers;
    let dir = tempfile::tempdir().unwrap();
    let (lib_student, _) = matvlm::train::distill::distill(
        &teacher,
        &hybrid,
        fx.split("train"),
        None,
        &cfg,
        &dir.path().join("d"),
        None,
    )
    .unwrap();
    let script_student = Vlm::load(
        fx.dir.path().join("dm").to_str().unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(logits_of(&script_student), logits_of(&lib_student));
    assert_ne!(logits_of(&script_student), logits_of(&hybrid), "it trained");

    let mut scfg = SupervisedConfig::quick(2);
    scfg.batch_size = 4;
    scfg.train.progress = ProgressMode::Silent;
    let (lib_trained, _) = matvlm::train::supervised::train(
        &teacher,
        fx.split("train"),
        None,
        &scfg,
        &dir.path().join("s"),
        None,
    )
    .unwrap();
    let script_trained = Vlm::load(
        fx.dir.path().join("sm").to_str().unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(logits_of(&script_trained), logits_of(&lib_trained));
    assert_ne!(logits_of(&script_trained), logits_of(&teacher));
}

/// The scale options reach the library from a script: two in-process ranks with checkpointed
/// blocks train the weights of one rank accumulating the same two micro-batches (bit for bit),
/// the session's layout (`matrepl --gpus N` sets it) applies when the options give none, and
/// `distill_memory_plan` prints a plan in which checkpointing lowers the peak.
#[test]
fn scale_options_and_the_memory_plan() {
    use matvlm::train::parallel::Parallel;
    let fx = Fixture::new();
    let common =
        "steps: 2, lr: 0.002, progress: \"silent\", save_every: 0, checkpoint_blocks: true";
    let code = format!(
        "let h = t.hybrid(#{{ ratio: 0.25 }});\n\
         let a = distill(t, h, train, #{{ {common}, batch: 4, run_dir: DIR + \"/p2\",\n\
             parallel: #{{ ranks: 2, bucket_mb: 0.01 }} }});\n\
         let b = distill(t, h, train, #{{ {common}, batch: 2, accum: 2, run_dir: DIR + \"/p1\",\n\
             parallel: #{{ ranks: 1 }} }});\n\
         let c = distill(t, h, train, #{{ {common}, batch: 4, run_dir: DIR + \"/p3\" }});\n\
         a.model.save(DIR + \"/a\"); b.model.save(DIR + \"/b\"); c.model.save(DIR + \"/c\");\n\
         #{{ plan: distill_memory_plan(#{{ batch: 8 }}),\n\
            plan_ck: distill_memory_plan(#{{ batch: 8, checkpoint_blocks: true }}),\n\
            a_lines: a.metrics.len(), c_lines: c.metrics.len() }}"
    );
    let session = Session::default().with_parallel(Parallel {
        ranks: 2,
        ..Parallel::default()
    });
    let m: Map = run_code(&fx, &session, &code).unwrap().cast();
    let load = |name: &str| {
        Vlm::load(
            fx.dir.path().join(name).to_str().unwrap(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let (a, b, c) = (load("a"), load("b"), load("c"));
    let t = fx.teacher().hybrid(&HybridSpec::ratio(0.25)).unwrap();
    assert!(
        logits_of(&a) == logits_of(&b),
        "2 ranks = 1 rank accumulating 2"
    );
    assert!(logits_of(&c) == logits_of(&a), "the session's 2 ranks");
    assert!(logits_of(&a) != logits_of(&t), "it trained");
    assert_eq!(m["a_lines"].as_int().unwrap(), 2);
    assert_eq!(m["c_lines"].as_int().unwrap(), 2);
    let total = |k: &str| m[k].clone().cast::<Map>()["total_bytes"].as_int().unwrap();
    assert!(
        total("plan_ck") < total("plan"),
        "{} vs {}",
        total("plan_ck"),
        total("plan")
    );
    let table = m["plan"].clone().cast::<Map>()["table"]
        .clone()
        .into_string()
        .unwrap();
    assert!(
        table.contains("AdamW moments f32") && table.contains("total"),
        "{table}"
    );
}

#[test]
fn evaluate_agreement_and_speed_are_the_librarys() {
    let fx = Fixture::new();
    let out = run_code(
        &fx,
        &Session::default(),
        "let h = t.hybrid(#{ ratio: 0.5, init: \"random\", seed: 3 });\n\
         h.save(DIR + \"/h\");\n\
         #{ tf: evaluate(t, test), gen: evaluate(t, test, #{ mode: \"generate\", limit: 3, blank: true }),\n\
            agree: agreement(t, h, test, #{ positions: \"all\", limit: 5 }),\n\
            speed: tokens_per_second(h, #{ new_tokens: 5, repeats: 2 }) }",
    )
    .unwrap();
    let m: Map = out.cast();
    let teacher = fx.teacher();
    let test = fx.split("test");
    let tf = evaluate(&teacher, &test, &EvalOptions::default()).unwrap();
    let tf_map: Map = m["tf"].clone().cast();
    assert_eq!(tf_map["accuracy"].as_float().unwrap(), tf.accuracy);
    assert_eq!(tf_map["n"].as_int().unwrap() as usize, tf.n);
    let per_type: Map = tf_map["per_type"].clone().cast();
    let types: Vec<String> = per_type.keys().map(|k| k.to_string()).collect();
    let lib_types: Vec<String> = tf.per_type.keys().cloned().collect();
    assert_eq!(types, lib_types);

    let gen = evaluate(
        &teacher,
        &test,
        &EvalOptions {
            mode: EvalMode::Generate,
            limit: Some(3),
            image: matvlm::eval::ImageInput::Blank,
            ..EvalOptions::default()
        },
    )
    .unwrap();
    let gen_map: Map = m["gen"].clone().cast();
    assert_eq!(gen_map["accuracy"].as_float().unwrap(), gen.accuracy);
    assert_eq!(gen_map["n"].as_int().unwrap(), 3);
    assert_eq!(gen_map["image"].clone().into_string().unwrap(), "blank");

    let hybrid = Vlm::load(
        fx.dir.path().join("h").to_str().unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let agree = agreement(
        &teacher,
        &hybrid,
        &test,
        &AgreementOptions {
            positions: matvlm::loss::Positions::All,
            limit: Some(5),
            ..AgreementOptions::default()
        },
    )
    .unwrap();
    let a: Map = m["agree"].clone().cast();
    assert_eq!(a["agreement"].as_float().unwrap(), agree.agreement);
    assert_eq!(
        a["n_positions"].as_int().unwrap() as usize,
        agree.n_positions
    );
    assert!(agree.kl > 0.0);

    let speed: Map = m["speed"].clone().cast();
    assert_eq!(speed["new_tokens"].as_int().unwrap(), 5);
    let tps = speed["tokens_per_s"].as_float().unwrap();
    let decode_s = speed["decode_s"].as_float().unwrap();
    assert!(tps > 0.0 && decode_s > 0.0);
    assert!(
        (tps - 4.0 / decode_s).abs() < 1e-6 * tps,
        "{tps} vs 4 / {decode_s}"
    );
}

#[test]
fn unknown_options_are_errors_that_name_the_key() {
    let fx = Fixture::new();
    let s = Session::default();
    let cases = [
        (
            "distill(t, t.hybrid(#{ ratio: 0.5 }), train, #{ stepz: 3 })",
            "stepz",
        ),
        (
            "distill(t, t.hybrid(#{ ratio: 0.5 }), train, #{ loss: #{ kll: 1 } })",
            "kll",
        ),
        (
            "distill(t, t.hybrid(#{ ratio: 0.5 }), train, #{ trainable: \"everything\" })",
            "everything",
        ),
        ("train(t, train, #{ loss: #{ kl: 1 } })", "loss"),
        ("evaluate(t, test, #{ mode: \"greedy\" })", "greedy"),
        ("evaluate(t, test, #{ limt: 3 })", "limt"),
        ("agreement(t, t, test, #{ position: \"all\" })", "position"),
        ("tokens_per_second(t, #{ tokens: 3 })", "tokens"),
        ("tokens_per_second(t, #{ new_tokens: 1 })", "new_tokens"),
        ("t.hidden_states(#{ prompt: \"x\", img: \"y\" })", "img"),
    ];
    for (code, key) in cases {
        let err = run_code(&fx, &s, code).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(key), "`{code}`: {msg}");
        assert_eq!(err.position().line(), Some(5), "`{code}`: {msg}");
    }
}

/// Ctrl-C during training: the trainer reads the session's cancel flag at every step boundary,
/// stops there with a checkpoint, and the binding returns the Run and consumes the flag, so the
/// script goes on. The flag is set between two steps of one run without any timing: a first call
/// trains 2 steps into the run folder, `interrupt()` then sets the flag as the Ctrl-C handler does,
/// and the same run, resumed for 6 steps, must stop at its first step boundary (step 2).
#[test]
fn ctrl_c_stops_training_at_a_step_boundary_and_returns_the_run() {
    let fx = Fixture::new();
    let session = Session::default();
    let mut engine = script::engine(&session);
    let flag = session.cancel.clone();
    engine.register_fn("interrupt", move || flag.store(true, Ordering::SeqCst));
    // The engine's own check of the flag stops plain script code at its next operation (see
    // script::a_set_cancel_flag_stops_scripts); here the flag must reach the trainer instead, as a
    // Ctrl-C arriving during the call does, so that check is off for this engine.
    engine.on_progress(|_| None);
    let out = run_code_with(
        &fx,
        &engine,
        "let h = t.hybrid(#{ ratio: 0.25 });\n\
         let opts = #{ steps: 2, batch: 2, run_dir: DIR + \"/c\", progress: \"silent\", save_every: 0 };\n\
         let first = distill(t, h, train, opts);\n\
         interrupt();\n\
         opts.steps = 6;\n\
         let r = distill(t, h, train, opts);\n\
         #{ first: first.steps, first_completed: first.completed, stopped: r.stopped,\n\
            completed: r.completed, steps: r.steps, ck: r.checkpoint,\n\
            layers: r.model.layers().len() }",
    )
    .unwrap();
    let m: Map = out.cast();
    assert_eq!(m["first"].as_int().unwrap(), 2);
    assert!(m["first_completed"].as_bool().unwrap());
    assert!(m["stopped"].as_bool().unwrap());
    assert!(!m["completed"].as_bool().unwrap());
    assert_eq!(
        m["steps"].as_int().unwrap(),
        2,
        "stopped at the first boundary"
    );
    let ck = m["ck"].clone().into_string().unwrap();
    assert!(ck.ends_with("step-000002"), "{ck}");
    assert_eq!(m["layers"].as_int().unwrap(), 8);
    assert!(
        !session.cancel.load(Ordering::SeqCst),
        "the flag is consumed"
    );
    // So a script on the session's own engine, which does check the flag, goes on.
    let after = run_code(&fx, &session, "1 + 1").unwrap();
    assert_eq!(after.as_int().unwrap(), 2, "the script goes on");
}

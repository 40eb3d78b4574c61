//! The recipe scripts (scripts/*.rhai) end to end in their `--smoke` setting, through the
//! `matrepl` binary, against a reduced random teacher of the tiny teacher's depth (8 layers) on
//! a small synthetic world; their numbers checked against the library computing the same
//! things. Then the training and evaluation bindings against the library, unknown options,
//! Ctrl-C during training, and how script errors are reported.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use matvlm::data::{ensure_world, Dataset, LoadOptions, WorldConfig};
use matvlm::eval::{agreement, evaluate, AgreementOptions, EvalMode, EvalOptions};
use matvlm::generate::GenerateOptions;
use matvlm::model::hybrid::HybridSpec;
use matvlm::model::placement::Placement;
use matvlm::model::vlm::Vlm;
use matvlm::script::{self, Session};
use matvlm::teacher::{init_vlm, TeacherDims};
use matvlm::tokenize::PromptTokenizer;
use rhai::{Dynamic, Map, Scope};
use serde_json::Value;

/// A small world and a random teacher that knows its tokenizer, in a temporary folder.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let world = dir.path().join("world");
        let cfg = WorldConfig {
            train: 24,
            val: 8,
            test: 8,
            ..WorldConfig::default()
        };
        ensure_world(&world, &cfg).unwrap();
        let tok = PromptTokenizer::from_file(&world.join("tokenizer.json")).unwrap();
        // The tiny teacher's depth (so that every ratio has whole layers), the reduced width.
        let dims = TeacherDims {
            layers: 8,
            ..TeacherDims::reduced()
        };
        let vlm = init_vlm(&dims.config(&tok).unwrap(), &tok, 0, &Device::Cpu).unwrap();
        vlm.save(&dir.path().join("teacher"), DType::F32, None)
            .unwrap();
        Self { dir }
    }

    fn world(&self) -> PathBuf {
        self.dir.path().join("world")
    }

    fn teacher_dir(&self) -> PathBuf {
        self.dir.path().join("teacher")
    }

    fn teacher(&self) -> Vlm {
        Vlm::load(
            self.teacher_dir().to_str().unwrap(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    }

    fn split(&self, name: &str) -> Arc<Dataset> {
        let tok = PromptTokenizer::from_file(&self.world().join("tokenizer.json")).unwrap();
        let (ds, _) = Dataset::load_with(
            &self.world().join(format!("{name}.json")),
            &self.world(),
            &tok,
            &LoadOptions::default(),
        )
        .unwrap();
        Arc::new(ds)
    }

    /// The script arguments that point a recipe script at this fixture.
    fn args(&self) -> Vec<String> {
        let w = self.world();
        let s = |p: PathBuf| p.display().to_string();
        vec![
            "--teacher".into(),
            s(self.teacher_dir()),
            "--data".into(),
            s(w.join("train.json")),
            "--val".into(),
            s(w.join("val.json")),
            "--test".into(),
            s(w.join("test.json")),
            "--images".into(),
            s(w.clone()),
        ]
    }
}

fn script_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

/// Run `matrepl SCRIPT ARGS` in `cwd` with `stdin`, and report how long it took.
fn matrepl(script: &Path, args: &[String], cwd: &Path, stdin: &str) -> Output {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_matrepl"))
        .arg(script)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    eprintln!(
        "{} {}: {:.1} s",
        script.file_name().unwrap().to_string_lossy(),
        args.iter()
            .filter(|a| a.starts_with("--") && *a != "--teacher")
            .cloned()
            .collect::<Vec<_>>()
            .join(" "),
        started.elapsed().as_secs_f64()
    );
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

#[test]
fn train_scripts_run_end_to_end_and_report_what_the_library_measures() {
    let fx = Fixture::new();
    let teacher = fx.teacher();
    let test = fx.split("test");
    for ratio in ["0.125", "0.25", "0.5"] {
        let out_dir = fx.dir.path().join(format!("out-{ratio}"));
        let mut args = fx.args();
        args.extend([
            "--smoke".into(),
            "--out".into(),
            out_dir.display().to_string(),
        ]);
        let out = matrepl(
            &script_path(&format!("train_{ratio}.rhai")),
            &args,
            fx.dir.path(),
            "",
        );
        assert_success(&out);
        let stdout = text(&out.stdout);
        for row in [
            "test exact match",
            "agreement",
            "decode speed",
            "inference cache",
        ] {
            assert!(stdout.contains(row), "no `{row}` row:\n{stdout}");
        }

        let summary = read_json(&out_dir.join("summary.json"));
        let r: f64 = ratio.parse().unwrap();
        let expected_layers = Placement::Upstream(r).layers(8).unwrap();
        assert_eq!(ids(&summary["mamba_layers"]), expected_layers, "{ratio}");
        assert_eq!(summary["steps"], 2);

        // The saved hybrid is the one evaluated: the library gets the same numbers from it.
        let hybrid = Vlm::load(
            out_dir.join("model").to_str().unwrap(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(hybrid.mamba_layers(), expected_layers);
        let gen = EvalOptions {
            mode: EvalMode::Generate,
            limit: Some(4),
            ..EvalOptions::default()
        };
        let lib_acc = evaluate(&hybrid, &test, &gen).unwrap();
        assert_eq!(
            summary["hybrid"]["accuracy"]["accuracy"].as_f64().unwrap(),
            lib_acc.accuracy
        );
        assert_eq!(summary["hybrid"]["accuracy"]["n"], 4);
        let lib_teacher = evaluate(&teacher, &test, &gen).unwrap();
        assert_eq!(
            summary["teacher"]["accuracy"]["accuracy"].as_f64().unwrap(),
            lib_teacher.accuracy
        );
        let agree = agreement(
            &teacher,
            &hybrid,
            &test,
            &AgreementOptions {
                limit: Some(4),
                ..AgreementOptions::default()
            },
        )
        .unwrap();
        let kl = summary["agreement"]["kl"].as_f64().unwrap();
        assert!(
            (kl - agree.kl).abs() <= 1e-6 * agree.kl.max(1.0),
            "{kl} vs {}",
            agree.kl
        );
        assert_eq!(
            summary["agreement"]["agreement"].as_f64().unwrap(),
            agree.agreement
        );
        assert_eq!(
            summary["hybrid"]["cache_bytes"].as_u64().unwrap() as usize,
            hybrid.cache_bytes(1, 256)
        );
        assert_eq!(
            summary["teacher"]["cache_bytes"].as_u64().unwrap() as usize,
            teacher.cache_bytes(1, 256)
        );
        assert!(summary["hybrid"]["speed"]["tokens_per_s"].as_f64().unwrap() > 0.0);

        // Two distillation steps, each loss term logged.
        let metrics = std::fs::read_to_string(out_dir.join("run/metrics.jsonl")).unwrap();
        let train: Vec<Value> = metrics
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|v| v["kind"] == "train")
            .collect();
        assert_eq!(train.len(), 2);
        assert!(train
            .iter()
            .all(|v| v["kl"].is_number() && v["hidden"].is_number()));
    }
}

#[test]
fn placement_sweep_runs_every_distinct_placement() {
    let fx = Fixture::new();
    let out_dir = fx.dir.path().join("sweep");
    let mut args = fx.args();
    args.extend([
        "--smoke".into(),
        "--out".into(),
        out_dir.display().to_string(),
    ]);
    let out = matrepl(
        &script_path("placement_sweep.rhai"),
        &args,
        fx.dir.path(),
        "",
    );
    assert_success(&out);
    let mut expected: Vec<Vec<usize>> = Vec::new();
    for p in ["upstream", "even", "first", "last"] {
        let layers = Placement::from_ratio(p, 0.25, 8)
            .unwrap()
            .layers(8)
            .unwrap();
        if !expected.contains(&layers) {
            expected.push(layers);
        }
    }
    let summary = read_json(&out_dir.join("summary.json"));
    let got: Vec<Vec<usize>> = summary["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| ids(&r["mamba_layers"]))
        .collect();
    assert_eq!(got, expected);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("placement sweep at ratio 0.25"), "{stdout}");
}

/// The `kind: "train"` lines of a run directory's metrics.jsonl, in order.
fn train_metrics(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|m| m["kind"] == "train")
        .collect()
}

#[test]
fn init_compare_distils_both_inits_and_reports_their_kl_curves() {
    let fx = Fixture::new();
    let out_dir = fx.dir.path().join("init");
    let mut args = fx.args();
    args.extend([
        "--smoke".into(),
        "--steps".into(),
        "3".into(),
        "--out".into(),
        out_dir.display().to_string(),
    ]);
    let out = matrepl(&script_path("init_compare.rhai"), &args, fx.dir.path(), "");
    assert_success(&out);
    let summary = read_json(&out_dir.join("summary.json"));
    let runs = summary["runs"].as_array().unwrap();
    let inits: Vec<&str> = runs.iter().map(|r| r["init"].as_str().unwrap()).collect();
    assert_eq!(inits, ["attention", "random"]);
    for (r, init) in runs.iter().zip(inits) {
        // The curve in the summary is the run's own `kl` metric, step by step.
        let logged: Vec<f64> = train_metrics(&out_dir.join("runs").join(init))
            .iter()
            .map(|m| m["kl"].as_f64().unwrap())
            .collect();
        let curve: Vec<f64> = r["kl"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(curve, logged, "{init}");
        assert_eq!(curve.len(), 3);
    }
    // Same seed and data: the two runs differ only by the mixers' initial weights.
    assert_ne!(runs[0]["kl"][0], runs[1]["kl"][0]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("Attention vs random initialisation"),
        "{stdout}"
    );
}

#[test]
fn loss_ablation_runs_each_loss_with_only_its_terms() {
    let fx = Fixture::new();
    let out_dir = fx.dir.path().join("ablation");
    let mut args = fx.args();
    args.extend([
        "--smoke".into(),
        "--losses".into(),
        "kl,kl_l2,reverse_kl".into(),
        "--out".into(),
        out_dir.display().to_string(),
    ]);
    let out = matrepl(&script_path("loss_ablation.rhai"), &args, fx.dir.path(), "");
    assert_success(&out);
    let summary = read_json(&out_dir.join("summary.json"));
    let names: Vec<&str> = summary["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["loss"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["kl", "kl_l2", "reverse_kl"]);
    // The logged total is the weighted sum of the terms the loss switches on, and only those.
    for (name, on) in [
        ("kl", vec!["kl"]),
        ("kl_l2", vec!["kl", "hidden"]),
        ("reverse_kl", vec!["reverse_kl"]),
    ] {
        for m in train_metrics(&out_dir.join("runs").join(name)) {
            let sum: f64 = on.iter().map(|k| m[*k].as_f64().unwrap()).sum();
            let loss = m["loss"].as_f64().unwrap();
            assert!(
                (loss - sum).abs() <= 1e-3 * loss.abs().max(1.0),
                "{name}: loss {loss} but its terms {on:?} sum to {sum}"
            );
        }
    }
    let stdout = text(&out.stdout);
    assert!(stdout.contains("Loss ablation"), "{stdout}");
}

#[test]
fn chat_answers_each_stdin_line_as_the_library_does() {
    let fx = Fixture::new();
    let test = fx.split("test");
    let image = test.records[0].image.clone().unwrap();
    let image = fx.world().join(image);
    let questions = ["What color is the circle?", "How many shapes are there?"];
    let mut args = fx.args();
    args.extend([
        "--smoke".into(),
        "--image".into(),
        image.display().to_string(),
    ]);
    let out = matrepl(
        &script_path("chat.rhai"),
        &args,
        fx.dir.path(),
        &format!("{}\n\n{}\n", questions[0], questions[1]),
    );
    assert_success(&out);
    let stdout = text(&out.stdout);
    assert_eq!(stdout.matches("\nA: ").count(), 2, "{stdout}");
    let teacher = fx.teacher();
    let opts = GenerateOptions {
        max_new_tokens: 4,
        ..GenerateOptions::default()
    };
    for q in questions {
        let expected = teacher
            .generate(
                &matvlm::tokenize::single_turn_prompt(q, true),
                Some(&image),
                &opts,
                &mut |_| true,
            )
            .unwrap()
            .text;
        assert!(
            stdout.contains(&format!("Q: {q}\nA: {expected}\n")),
            "{q} -> {expected:?}:\n{stdout}"
        );
    }
}

#[test]
fn probe_shows_layers_logits_and_hidden_norms() {
    let fx = Fixture::new();
    let mut args = fx.args();
    args.extend(["--smoke".into(), "--prompt".into(), "What is it?".into()]);
    let out = matrepl(&script_path("probe.rhai"), &args, fx.dir.path(), "");
    assert_success(&out);
    let stdout = text(&out.stdout);
    let teacher = fx.teacher();
    let logits = teacher
        .prompt_logits(
            &matvlm::tokenize::single_turn_prompt("What is it?", false),
            None,
        )
        .unwrap();
    assert!(
        stdout.contains(&format!("logits: {:?}", logits.dims())),
        "{stdout}"
    );
    let hidden = teacher
        .prompt_hidden_states(
            &matvlm::tokenize::single_turn_prompt("What is it?", false),
            None,
        )
        .unwrap();
    assert_eq!(hidden.len(), 9);
    assert!(stdout.contains("embeddings"), "{stdout}");
    assert!(stdout.contains("7 attn"), "{stdout}");
    // The embeddings row: the mean norm the library's hidden state gives.
    let norms = hidden[0]
        .sqr()
        .unwrap()
        .sum(1)
        .unwrap()
        .sqrt()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let row = stdout
        .lines()
        .find(|l| l.starts_with("embeddings"))
        .unwrap();
    let shown: f64 = row.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!((shown - norms as f64).abs() < 1e-3, "{row} vs {norms}");
}

// ---- the bindings against the library ---------------------------------------------------

/// An engine with `TEACHER`, `TRAIN`, `VAL`, `TEST` (paths) defined.
fn run_code(
    fx: &Fixture,
    session: &Session,
    code: &str,
) -> Result<Dynamic, Box<rhai::EvalAltResult>> {
    let engine = script::engine(session);
    let mut scope = Scope::new();
    scope.push_constant("TEACHER", fx.teacher_dir().display().to_string());
    for split in ["train", "val", "test"] {
        scope.push_constant(
            split.to_uppercase(),
            fx.world()
                .join(format!("{split}.json"))
                .display()
                .to_string(),
        );
    }
    scope.push_constant("DIR", fx.dir.path().display().to_string());
    let prelude = "let t = load_model(TEACHER);\n\
        let train = dataset(TRAIN, #{ tokenizer: t });\n\
        let val = dataset(VAL, #{ tokenizer: t });\n\
        let test = dataset(TEST, #{ tokenizer: t });\n";
    engine.eval_with_scope::<Dynamic>(&mut scope, &format!("{prelude}{code}"))
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
    cfg.loss.positions = matvlm::distill::Positions::Answers;
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

    let mut scfg = SupervisedConfig::tiny_teacher(2);
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
            positions: matvlm::distill::Positions::All,
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

#[test]
fn ctrl_c_stops_training_at_a_step_boundary_and_returns_the_run() {
    let fx = Fixture::new();
    let session = Session::default();
    let flag = session.cancel.clone();
    let metrics = fx.dir.path().join("c/metrics.jsonl");
    // Set the flag once the first step is logged, as a Ctrl-C in the middle of training would.
    let setter = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(120) {
            let steps = std::fs::read_to_string(&metrics)
                .map(|t| t.lines().count())
                .unwrap_or(0);
            if steps >= 1 {
                flag.store(true, Ordering::SeqCst);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let out = run_code(
        &fx,
        &session,
        "let r = distill(t, t.hybrid(#{ ratio: 0.25 }), train, #{ steps: 100000, batch: 2,\n\
             run_dir: DIR + \"/c\", progress: \"silent\", save_every: 0 });\n\
         let after = 1 + 1;\n\
         #{ stopped: r.stopped, completed: r.completed, steps: r.steps, ck: r.checkpoint,\n\
            after: after, layers: r.model.layers().len() }",
    )
    .unwrap();
    setter.join().unwrap();
    let m: Map = out.cast();
    assert!(m["stopped"].as_bool().unwrap());
    assert!(!m["completed"].as_bool().unwrap());
    let steps = m["steps"].as_int().unwrap();
    assert!((1..100000).contains(&steps), "{steps}");
    let ck = m["ck"].clone().into_string().unwrap();
    assert!(ck.ends_with(&format!("step-{steps:06}")), "{ck}");
    assert_eq!(m["after"].as_int().unwrap(), 2, "the script goes on");
    assert_eq!(m["layers"].as_int().unwrap(), 8);
    assert!(
        !session.cancel.load(Ordering::SeqCst),
        "the flag is consumed"
    );
}

// ---- how script errors are reported ------------------------------------------------------

fn run_bad(dir: &Path, name: &str, code: &str) -> (Option<i32>, String, PathBuf) {
    let path = dir.join(name);
    std::fs::write(&path, code).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_matrepl"))
        .arg(&path)
        .current_dir(dir)
        .output()
        .unwrap();
    (out.status.code(), text(&out.stderr), path)
}

#[test]
fn script_errors_exit_non_zero_with_file_line_col_and_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let (code, err, path) = run_bad(
        d,
        "wrong_type.rhai",
        "let a = 1;\nlet b = evaluate(a, \"x\");\n",
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.starts_with(&format!("{}:2:9: ", path.display())),
        "{err}"
    );
    assert!(err.contains("Function not found: evaluate (i64, "), "{err}");
    assert!(err.contains("line 2: let b = evaluate"), "{err}");

    let (code, err, path) = run_bad(d, "unknown_fn.rhai", "\n\n  frobnicate(3);\n");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.starts_with(&format!("{}:3:3: ", path.display())),
        "{err}"
    );
    assert!(err.contains("frobnicate"), "{err}");

    let (code, err, path) = run_bad(d, "parse.rhai", "let x = (1 + ;\n");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.starts_with(&format!("{}:1:", path.display())), "{err}");

    // An error raised inside an imported module points into the module file.
    std::fs::create_dir_all(d.join("lib")).unwrap();
    std::fs::write(
        d.join("lib/helper.rhai"),
        "fn check(x) {\n    if x > 1 {\n        throw `too big: ${x}`;\n    }\n    x\n}\n",
    )
    .unwrap();
    let (code, err, path) = run_bad(
        d,
        "uses_module.rhai",
        "import \"lib/helper\" as h;\nh::check(1);\nh::check(5);\n",
    );
    assert_eq!(code, Some(1), "{err}");
    let module = d.join("lib/helper.rhai");
    assert!(
        err.starts_with(&format!("{}:3:9: ", module.display())),
        "{err}"
    );
    assert!(err.contains("too big: 5"), "{err}");
    assert!(
        err.contains(&format!("called at {}:3:", path.display())),
        "{err}"
    );

    // A file that is not there.
    let missing = d.join("no_such.rhai");
    let out = Command::new(env!("CARGO_BIN_EXE_matrepl"))
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains(&missing.display().to_string()), "{err}");

    // A library error names what was wrong, at the line of the call.
    let (code, err, path) = run_bad(
        d,
        "lib_error.rhai",
        "let m = load_model(\"/no/such/model\");\n",
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.starts_with(&format!("{}:1:9: ", path.display())),
        "{err}"
    );
    assert!(err.contains("/no/such/model"), "{err}");
}

#[test]
fn recipe_scripts_reject_unknown_arguments() {
    let dir = tempfile::tempdir().unwrap();
    for script in [
        "train_0.25.rhai",
        "placement_sweep.rhai",
        "chat.rhai",
        "probe.rhai",
    ] {
        let out = matrepl(
            &script_path(script),
            &["--stepz".into(), "3".into()],
            dir.path(),
            "",
        );
        assert_eq!(out.status.code(), Some(1), "{script}");
        let err = text(&out.stderr);
        assert!(
            err.contains("unknown script argument --stepz"),
            "{script}: {err}"
        );
        assert!(err.contains("recipe.rhai:"), "{script}: {err}");
    }
}

#[test]
fn train_script_runs_on_the_embedded_teacher_or_says_how_to_build_it() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let out = matrepl(
        &script_path("train_0.25.rhai"),
        &[
            "--smoke".into(),
            "--out".into(),
            out_dir.display().to_string(),
        ],
        dir.path(),
        "",
    );
    let teacher_dir = matvlm::teacher::default_teacher_path();
    if teacher_dir.join("config.json").is_file() {
        assert_success(&out);
        let summary = read_json(&out_dir.join("summary.json"));
        let teacher = Vlm::load(teacher_dir.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
        let n = teacher.layer_kinds().len();
        assert_eq!(
            ids(&summary["mamba_layers"]),
            Placement::Upstream(0.25).layers(n).unwrap()
        );
        let acc = summary["teacher"]["accuracy"]["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{acc}");
    } else {
        assert_eq!(out.status.code(), Some(1));
        let err = text(&out.stderr);
        assert!(err.contains(&teacher_dir.display().to_string()), "{err}");
        assert!(
            err.contains(matvlm::script::model::TINY_TEACHER_COMMAND),
            "{err}"
        );
        assert!(err.contains("recipe.rhai:"), "{err}");
    }
}

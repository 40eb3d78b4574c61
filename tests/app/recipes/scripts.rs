//! The recipe scripts end to end through `matrepl` (train, placement sweep, init comparison,
//! loss ablation, chat, probe), their arguments, and the embedded teacher.

use super::*;

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
        let expected_layers = Placement::ratio(r).layers(8).unwrap();
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
        let layers = Placement::Ratio {
            rule: p.parse().unwrap(),
            ratio: 0.25,
        }
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

/// The main job's script without `--teacher` runs on the embedded tiny teacher, which is
/// committed (assets/tiny-teacher).
#[test]
fn train_script_runs_on_the_embedded_teacher() {
    let teacher_dir = matvlm::teacher::default_teacher_path().unwrap();
    assert!(
        teacher_dir.join("config.json").is_file(),
        "{} is committed",
        teacher_dir.display()
    );
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
    assert_success(&out);
    let summary = read_json(&out_dir.join("summary.json"));
    let teacher = Vlm::load(teacher_dir.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let n = teacher.layer_kinds().len();
    assert_eq!(
        ids(&summary["mamba_layers"]),
        Placement::ratio(0.25).layers(n).unwrap()
    );
    let acc = summary["teacher"]["accuracy"]["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc), "{acc}");
}

#[test]
fn placement_search_scores_every_layer_and_distils_what_it_found() {
    let fx = Fixture::new();
    let out_dir = fx.dir.path().join("search");
    let mut args = fx.args();
    args.extend([
        "--smoke".into(),
        "--out".into(),
        out_dir.display().to_string(),
    ]);
    let out = matrepl(
        &script_path("placement_search.rhai"),
        &args,
        fx.dir.path(),
        "",
    );
    assert_success(&out);
    let summary = read_json(&out_dir.join("summary.json"));
    let search = &summary["search"];
    let scores = search["scores"].as_array().unwrap();
    assert_eq!(scores.len(), 8);
    for (i, s) in scores.iter().enumerate() {
        assert_eq!(ids(&s["layers"]), vec![i]);
        assert!(s["kl"].as_f64().unwrap() > 0.0);
    }
    let found = ids(&search["layers"]);
    assert_eq!(found.len(), 2, "ratio 0.25 of 8 layers");
    let results = summary["results"].as_array().unwrap();
    assert_eq!(ids(&results[0]["mamba_layers"]), found);
    let upstream = Placement::ratio(0.25).layers(8).unwrap();
    if found != upstream {
        assert_eq!(ids(&results[1]["mamba_layers"]), upstream);
    }
    crate::common::check_png(&out_dir.join("layer_scores.png"));
    // The measurements stay in the folder: running again measures nothing new for the search;
    // --exhaustive then measures all 28 pairs of 8 layers, the search's among them.
    args.push("--exhaustive".into());
    let again = matrepl(
        &script_path("placement_search.rhai"),
        &args,
        fx.dir.path(),
        "",
    );
    assert_success(&again);
    assert!(
        text(&again.stdout).contains("0 placements measured now"),
        "{}",
        text(&again.stdout)
    );
    let summary = read_json(&out_dir.join("summary.json"));
    let all = summary["exhaustive"]["placements"].as_array().unwrap();
    assert_eq!(all.len(), 28);
    let kls: Vec<f64> = all.iter().map(|p| p["kl"].as_f64().unwrap()).collect();
    assert!(kls.windows(2).all(|w| w[0] <= w[1]), "sorted by KL");
    let rank = summary["exhaustive"]["searched_rank"].as_u64().unwrap() as usize;
    assert_eq!(ids(&all[rank - 1]["layers"]), found);
    assert_eq!(
        all[rank - 1]["kl"].as_f64(),
        summary["search"]["best"]["kl"].as_f64()
    );
}

//! The figure and comparison bindings (`plot_attention_vs_ssm`, `plot_run`, `plot_bars`,
//! `compare`) against the library calls they wrap, on the fixture teacher; and what notebooks
//! show (`evcxr_display` of figures and models) and the notebook teacher helper.

use std::path::{Path, PathBuf};

use crate::common::*;
use base64::Engine as _;
use matvlm::eval::benchmarks::Comparison;
use matvlm::eval::{AgreementReport, EvalReport};
use matvlm::model::hybrid::HybridSpec;
use matvlm::script::{self, Session};
use matvlm::{display, notebook, viz};
use rhai::{Dynamic, EvalAltResult};

/// Run `code` with `TEACHER` (the fixture folder), `IMAGE` (its test image) and `DIR` (a
/// scratch folder) defined.
fn run(code: &str, dir: &Path) -> Result<Dynamic, Box<EvalAltResult>> {
    let mut constants = teacher_constants();
    constants.push(("DIR", dir.display().to_string()));
    eval_with_constants(&script::engine(&Session::default()), &constants, code)
}

#[test]
fn plot_attention_vs_ssm_writes_the_librarys_figures() {
    let dir = tempfile::tempdir().unwrap();
    let question = "What is in the picture?";
    for ext in ["png", "svg"] {
        let code = format!(
            "let t = load_model(TEACHER);\n\
             let h = t.hybrid(#{{ ratio: 0.5 }});\n\
             plot_attention_vs_ssm(t, h, #{{ prompt: {question:?}, image: IMAGE, \
             out: DIR + \"/maps.{ext}\" }})"
        );
        let paths = strings(run(&code, dir.path()).unwrap());
        let expected: Vec<String> = ["maps", "maps_state_norms"]
            .iter()
            .map(|s| dir.path().join(format!("{s}.{ext}")).display().to_string())
            .collect();
        assert_eq!(paths, expected);
    }
    // The same figures drawn by the library for the hybrid's first Mamba layer (the default).
    let t = teacher();
    let h = t.hybrid(&HybridSpec::ratio(0.5)).unwrap();
    let layer = h.mamba_layers()[0];
    let image = fixture("teacher").join("test_image.png");
    let data = viz::attention_vs_ssm_prompt(&t, &h, question, Some(&image), layer).unwrap();
    let maps = viz::attention_vs_ssm_figure(&data).unwrap();
    let norms = viz::attention_vs_ssm_norms_figure(&data).unwrap();
    let written = |name: &str| dir.path().join(name);
    assert_eq!(check_png(&written("maps.png")), maps.size());
    assert_eq!(check_png(&written("maps_state_norms.png")), norms.size());
    assert_eq!(
        std::fs::read(written("maps.png")).unwrap(),
        maps.png().unwrap()
    );
    assert_eq!(
        std::fs::read(written("maps_state_norms.png")).unwrap(),
        norms.png().unwrap()
    );
    check_svg(&written("maps.svg"), &format!("Layer {layer}"));
    check_svg(&written("maps_state_norms.svg"), "head 0");

    // A layer that is attention in the hybrid, and an output that is not a figure.
    let attn = h.layer_kinds().iter().position(|k| *k == "attn").unwrap();
    let err = run(
        &format!(
            "let t = load_model(TEACHER); plot_attention_vs_ssm(t, t.hybrid(#{{ ratio: 0.5 }}), \
             #{{ prompt: \"hi\", layer: {attn}, out: DIR + \"/x.png\" }})"
        ),
        dir.path(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(&format!("layer {attn} of the hybrid is attention")),
        "{err}"
    );
    let err = run(
        "let t = load_model(TEACHER); plot_attention_vs_ssm(t, t.hybrid(#{ ratio: 0.5 }), \
         #{ prompt: \"hi\", out: DIR + \"/x.jpg\" })",
        dir.path(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains(".png or .svg"), "{err}");
}

/// Two runs' metrics.jsonl files in the trainer's format (losses 10/step and 5/step).
fn write_runs(dir: &Path) -> Vec<PathBuf> {
    ["run_a", "run_b"]
        .iter()
        .zip([1.0, 0.5])
        .map(|(name, scale)| {
            let d = dir.join(name);
            std::fs::create_dir_all(&d).unwrap();
            let mut text = String::new();
            for step in 1..=30 {
                let loss = scale * 10.0 / step as f64;
                let rec = serde_json::json!({"kind": "train", "step": step, "loss": loss, "kl": loss / 3.0});
                text.push_str(&format!("{rec}\n"));
            }
            std::fs::write(d.join("metrics.jsonl"), text).unwrap();
            d
        })
        .collect()
}

#[test]
fn plot_run_draws_one_or_several_runs() {
    let dir = tempfile::tempdir().unwrap();
    let runs = write_runs(dir.path());
    for ext in ["png", "svg"] {
        let code = format!(
            "plot_run([DIR + \"/run_a\", DIR + \"/run_b/metrics.jsonl\"], \
             #{{ keys: [\"loss\", \"kl\"], out: DIR + \"/loss.{ext}\", title: \"Distillation\" }})"
        );
        let out = run(&code, dir.path()).unwrap().into_string().unwrap();
        assert_eq!(
            out,
            dir.path().join(format!("loss.{ext}")).display().to_string()
        );
    }
    let lib = viz::runs_figure(
        &[
            ("run_a", &runs[0]),
            ("run_b", &runs[1].join("metrics.jsonl")),
        ],
        &["loss", "kl"],
        "Distillation",
    )
    .unwrap();
    let png = dir.path().join("loss.png");
    assert_eq!(check_png(&png), lib.size());
    assert_eq!(std::fs::read(&png).unwrap(), lib.png().unwrap());
    check_svg(&dir.path().join("loss.svg"), "run_b: kl");

    // One run folder, the default key (loss).
    let out = run(
        "plot_run(DIR + \"/run_a\", #{ out: DIR + \"/one.svg\" })",
        dir.path(),
    )
    .unwrap()
    .into_string()
    .unwrap();
    check_svg(Path::new(&out), "run_a");
    let err = run(
        "plot_run(DIR + \"/run_a\", #{ keys: [\"nope\"], out: DIR + \"/x.png\" })",
        dir.path(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("`nope`"), "{err}");
}

#[test]
fn plot_bars_from_a_map_or_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let bars = vec![
        ("ratio 0.125".to_string(), 0.71),
        ("ratio 0.25".to_string(), 0.64),
        ("ratio 0.5".to_string(), 0.5),
    ];
    for ext in ["png", "svg"] {
        let _ = run(
            &format!(
                "plot_bars([[\"ratio 0.125\", 0.71], [\"ratio 0.25\", 0.64], [\"ratio 0.5\", 0.5]], \
                 #{{ out: DIR + \"/pairs.{ext}\", title: \"Sweep\", y_label: \"accuracy\" }})"
            ),
            dir.path(),
        )
        .unwrap();
        // A map gives its bars in key order: the same three here.
        let _ = run(
            &format!(
                "plot_bars(#{{ \"ratio 0.5\": 0.5, \"ratio 0.125\": 0.71, \"ratio 0.25\": 0.64 }}, \
                 #{{ out: DIR + \"/map.{ext}\", title: \"Sweep\", y_label: \"accuracy\" }})"
            ),
            dir.path(),
        )
        .unwrap();
    }
    let lib = viz::bars_figure(&bars, "Sweep", "accuracy").unwrap();
    let pairs = dir.path().join("pairs.png");
    assert_eq!(check_png(&pairs), lib.size());
    assert_eq!(std::fs::read(&pairs).unwrap(), lib.png().unwrap());
    assert_eq!(
        std::fs::read(dir.path().join("map.png")).unwrap(),
        lib.png().unwrap()
    );
    check_svg(&dir.path().join("pairs.svg"), "ratio 0.25");
    check_svg(&dir.path().join("map.svg"), "ratio 0.125");
    for bad in ["[[\"a\"]]", "#{ a: \"x\" }", "42"] {
        let err = run(
            &format!("plot_bars({bad}, #{{ out: DIR + \"/b.png\" }})"),
            dir.path(),
        );
        assert!(err.is_err(), "{bad} was accepted");
    }
}

#[test]
fn compare_puts_reports_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let eval = |acc: f64, color: f64| {
        format!(
            "#{{ mode: \"teacher_forced\", image: \"real\", source: \"data/val.json\", n: 4, \
             correct: {c}, accuracy: {acc}, per_type: #{{ color: #{{ n: 2, correct: 1, \
             accuracy: {color} }} }} }}",
            c = (acc * 4.0) as i64
        )
    };
    let agree = "#{ positions: \"answers\", source: \"data/val.json\", samples: 4, \
                 n_positions: 12, agreement: 0.75, kl: 0.25 }";
    let code = format!(
        "compare(#{{ teacher: {}, hybrid: [{}, {agree}] }}, #{{ out: DIR + \"/cmp.json\" }})",
        eval(1.0, 1.0),
        eval(0.5, 0.5)
    );
    let table = run(&code, dir.path()).unwrap().into_string().unwrap();

    // The same comparison built with the library (rhai maps iterate in key order).
    let report = |acc: f64, color: f64| -> EvalReport {
        serde_json::from_value(serde_json::json!({
            "mode": "teacher_forced", "image": "real", "source": "data/val.json", "n": 4,
            "correct": (acc * 4.0) as usize, "accuracy": acc,
            "per_type": {"color": {"n": 2, "correct": 1, "accuracy": color}}
        }))
        .unwrap()
    };
    let a: AgreementReport = serde_json::from_value(serde_json::json!({
        "positions": "answers", "source": "data/val.json", "samples": 4, "n_positions": 12,
        "agreement": 0.75, "kl": 0.25
    }))
    .unwrap();
    let mut cmp = Comparison::new();
    cmp.add_eval("hybrid", "val", &report(0.5, 0.5));
    cmp.add_agreement("hybrid", "val", &a);
    cmp.add_eval("teacher", "val", &report(1.0, 1.0));
    assert_eq!(table, cmp.to_markdown());
    assert_eq!(Comparison::load(&dir.path().join("cmp.json")).unwrap(), cmp);
    assert!(
        table.contains("| val | teacher agreement | 0.7500 | - |"),
        "{table}"
    );

    let err = run("compare(#{ m: #{ x: 1 } })", dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("`m`"), "{err}");
}

/// The body of the single evcxr block in `s`, checking its framing and MIME type.
fn block_body(s: &str, mime: &str) -> String {
    let body = s
        .strip_prefix(&format!("{} {mime}\n", display::BEGIN))
        .unwrap_or_else(|| panic!("not a {mime} block: {:.80}", s));
    body.strip_suffix(&format!("\n{}\n", display::END))
        .unwrap_or_else(|| panic!("block not closed"))
        .to_string()
}

#[test]
fn figures_and_models_display_inline() {
    let lib = viz::bars_figure(&[("a".into(), 1.0), ("b".into(), 2.0)], "Bars", "y").unwrap();
    let body = block_body(&lib.display_string().unwrap(), "image/png");
    let png = base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap();
    let img = image::load_from_memory_with_format(&png, image::ImageFormat::Png).unwrap();
    assert_eq!((img.width(), img.height()), lib.size());

    let t = teacher();
    let h = t.hybrid(&HybridSpec::ratio(0.5)).unwrap();
    for m in [&t, &h] {
        let html = block_body(&m.display_string(), "text/html");
        // The layer map's cells, in layer order.
        let cells: Vec<&str> = html
            .split("<td style=")
            .skip(1)
            .map(|c| {
                let c = &c[c.find('>').unwrap() + 1..];
                &c[..c.find('<').unwrap()]
            })
            .collect();
        assert_eq!(cells, m.layer_kinds());
        assert!(html.contains(&m.parameter_count().to_string()), "{html}");
    }
}

/// The notebooks' teacher is the committed trained one (assets/tiny-teacher), not the random
/// stand-in they fall back to without it.
#[test]
fn notebook_teacher_is_the_committed_trained_one() {
    let dir = tempfile::tempdir().unwrap();
    let world = notebook::world(&dir.path().join("world")).unwrap();
    let nt = notebook::teacher_or_random(&world, 3).unwrap();
    let committed = matvlm::teacher::default_teacher_path().unwrap();
    assert!(
        committed.join("config.json").is_file(),
        "{}",
        committed.display()
    );
    assert!(nt.trained, "{}", nt.description);
    assert!(
        nt.description.contains(&committed.display().to_string()),
        "{}",
        nt.description
    );
    assert_eq!(nt.vlm.layer_kinds().len(), 8);
    assert!(!nt.markdown().contains("RANDOMLY INITIALISED"));
    let md = block_body(&nt.display_string(), "text/markdown");
    assert_eq!(md, nt.markdown());
    let val = notebook::load_split(&nt.vlm, &world, "val").unwrap();
    assert_eq!(val.len(), notebook::world_config().val);
}

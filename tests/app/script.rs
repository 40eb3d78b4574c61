//! The rhai API against the fixture teacher (tests/fixtures/teacher): scripts load it, look at
//! its layers, compute logits and generate, and get the same numbers as the library and as HF;
//! tensor operations against plain Rust arithmetic; errors carry the script line; arguments.

use std::sync::{Arc, Mutex};

use crate::common::*;
use candle_core::{DType, Device};
use matvlm::generate::GenerateOptions;
use matvlm::model::vlm::Vlm;
use matvlm::script::{self, Session};
use matvlm::tokenize::single_turn_prompt;
use rhai::{Array, Dynamic, Engine, EvalAltResult, Map, Scope};

/// An engine on the CPU in f32, with `print` captured.
fn engine() -> (Engine, Arc<Mutex<Vec<String>>>) {
    let mut engine = script::engine(&Session::default());
    let printed = Arc::new(Mutex::new(Vec::new()));
    let sink = printed.clone();
    engine.on_print(move |s| sink.lock().unwrap().push(s.to_string()));
    (engine, printed)
}

/// Run `code` with `TEACHER` (the fixture folder) and `IMAGE` (its test image) defined.
fn run(code: &str) -> Result<Dynamic, Box<EvalAltResult>> {
    run_with(&engine().0, code)
}

fn run_with(engine: &Engine, code: &str) -> Result<Dynamic, Box<EvalAltResult>> {
    eval_with_constants(engine, &teacher_constants(), code)
}

fn ints(v: Dynamic) -> Vec<i64> {
    v.into_array()
        .unwrap()
        .into_iter()
        .map(|x| x.as_int().unwrap())
        .collect()
}

fn floats(v: &Dynamic) -> Vec<f64> {
    v.clone()
        .into_array()
        .unwrap()
        .into_iter()
        .flat_map(|x| match x.as_float() {
            Ok(f) => vec![f],
            Err(_) => floats(&x),
        })
        .collect()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn layers_are_the_libraries_layer_kinds() {
    let kinds = strings(run("load_model(TEACHER).layers()").unwrap());
    let expected: Vec<String> = teacher()
        .layer_kinds()
        .iter()
        .map(|k| k.name().to_string())
        .collect();
    assert_eq!(kinds, expected);
    assert!(kinds.iter().all(|k| k == "attn"), "{kinds:?}");
}

#[test]
fn image_logits_match_hf() {
    let r = reference("teacher", "reference.safetensors");
    let j = reference_json("teacher", "reference.json");
    let q = j["image_question"].as_str().unwrap();
    let code = format!(
        "let l = load_model(TEACHER).logits(#{{ prompt: {q:?}, image: IMAGE }});\n\
         [l.shape(), l.to_array()]"
    );
    let out = run(&code).unwrap().into_array().unwrap();
    let shape: Vec<usize> = ints(out[0].clone())
        .into_iter()
        .map(|x| x as usize)
        .collect();
    assert_eq!(shape, r["image_logits"].dims());
    let expected: Vec<f64> = r["image_logits"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let diff = max_diff(&floats(&out[1]), &expected);
    assert!(diff <= 1e-4, "logits differ from HF by {diff}");
}

#[test]
fn a_plain_prompt_gets_the_template_and_a_templated_one_is_left_alone() {
    let j = reference_json("teacher", "reference.json");
    let q = j["text_question"].as_str().unwrap();
    let templated = single_turn_prompt(q, false);
    let code = format!(
        "let m = load_model(TEACHER);\n\
         let a = m.logits({q:?});\n\
         let b = m.logits({templated:?});\n\
         let c = m.logits(#{{ prompt: {q:?}, raw: true }});\n\
         [a.shape(), (a - b).abs().max().item(), c.shape()]"
    );
    let out = run(&code).unwrap().into_array().unwrap();
    let r = reference("teacher", "reference.safetensors");
    let text_len = r["text_prompt_ids"].dims()[0] as i64;
    assert_eq!(ints(out[0].clone()), vec![text_len, 448]);
    assert_eq!(out[1].as_float().unwrap(), 0.0);
    let raw_len = teacher()
        .tokenizer()
        .unwrap()
        .encode_prompt(q)
        .unwrap()
        .len() as i64;
    assert_eq!(ints(out[2].clone()), vec![raw_len, 448]);
    assert!(raw_len < text_len);
}

#[test]
fn greedy_generation_matches_hf() {
    let r = reference("teacher", "reference.safetensors");
    let j = reference_json("teacher", "reference.json");
    let q = j["text_question"].as_str().unwrap();
    let code = format!(
        "let m = load_model(TEACHER);\n\
         m.generate(#{{ prompt: {q:?}, max_new_tokens: 8, stop_at_eos: false }})"
    );
    let text = run(&code).unwrap().into_string().unwrap();
    let ids: Vec<u32> = ids_i64(&r["text_greedy_ids"])
        .into_iter()
        .map(|i| i as u32)
        .collect();
    let decoded = teacher().tokenizer().unwrap().decode(&ids).unwrap();
    // The prompt gets the template, so the answer starts after its `ASSISTANT: ` space.
    let expected = decoded.strip_prefix(' ').unwrap_or(&decoded);
    assert_eq!(text, expected);
}

#[test]
fn sampling_with_a_seed_is_reproducible_and_equals_the_library() {
    let code = "let m = load_model(TEACHER);\n\
        let o = #{ prompt: \"What is in the picture?\", image: IMAGE, max_new_tokens: 6,\n\
                   temperature: 0.9, top_p: 0.9, seed: 7, stop_at_eos: false };\n\
        let a = m.generate(o);\n\
        let b = m.generate(o);\n\
        o.seed = 8;\n\
        let c = m.generate(o);\n\
        [a, b, c]";
    let out = strings(run(code).unwrap());
    assert_eq!(out[0], out[1], "same seed, same text");
    assert_ne!(out[0], out[2], "another seed samples differently");
    let image = fixture("teacher").join("test_image.png");
    let opts = GenerateOptions {
        max_new_tokens: 6,
        temperature: 0.9,
        top_p: 0.9,
        seed: 7,
        stop_at_eos: false,
    };
    let lib = teacher()
        .generate(
            &single_turn_prompt("What is in the picture?", true),
            Some(&image),
            &opts,
            &mut |_| true,
        )
        .unwrap();
    assert_eq!(out[0], lib.text);
}

#[test]
fn tokenize_and_decode_round_trip() {
    let out = run("let m = load_model(TEACHER);\n\
         let ids = m.tokenize(\"<image>\\nred ball\");\n\
         [ids, m.decode(ids.extract(1))]")
    .unwrap()
    .into_array()
    .unwrap();
    let ids = ints(out[0].clone());
    assert_eq!(ids[0], -200, "the image marker is the placeholder id");
    let tok = teacher().tokenizer().unwrap().clone();
    let expected: Vec<i64> = tok
        .encode_text("\nred ball")
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    assert_eq!(&ids[1..], expected.as_slice());
    assert_eq!(out[1].clone().into_string().unwrap(), "\nred ball");
}

#[test]
fn tensor_operations_match_plain_arithmetic() {
    let data = [[1.0f64, 2.0, 3.0], [4.0, 5.0, 6.5]];
    let out = run("let t = tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.5]]);\n\
         #{ shape: t.shape(), dtype: t.dtype(), affine: (t * 2 + 1).to_array(),\n\
            rdiv: (1.0 / t).to_array(), rsub: (10 - t).to_array(),\n\
            row: t[1].to_array(), last: t[-1].to_array(), slice: t[0..1].shape(),\n\
            col: t.select(1, 2).to_array(), narrow: t.narrow(1, 1, 2).to_array(),\n\
            sum: t.sum().item(), sum0: t.sum(0).to_array(), mean: t.mean().item(),\n\
            max: t.max().item(), argmax: t.argmax().to_array(), argmax0: t.argmax(0).to_array(),\n\
            softmax: t.softmax().to_array(), tt: t.transpose(0, 1).shape(),\n\
            gram: t.matmul(t.transpose(0, 1)).to_array(), diff: (t - t[0]).to_array(),\n\
            reshape: t.reshape([3, 2]).to_array() }")
    .unwrap();
    let m: Map = out.cast();
    let get = |k: &str| m[k].clone();
    let flat: Vec<f64> = data.iter().flatten().copied().collect();
    assert_eq!(ints(get("shape")), vec![2, 3]);
    assert_eq!(get("dtype").into_string().unwrap(), "f32");
    let close = |a: Vec<f64>, b: Vec<f64>| assert!(max_diff(&a, &b) < 1e-5, "{a:?} vs {b:?}");
    close(
        floats(&get("affine")),
        flat.iter().map(|x| x * 2.0 + 1.0).collect(),
    );
    close(floats(&get("rdiv")), flat.iter().map(|x| 1.0 / x).collect());
    close(
        floats(&get("rsub")),
        flat.iter().map(|x| 10.0 - x).collect(),
    );
    close(floats(&get("row")), data[1].to_vec());
    close(floats(&get("last")), data[1].to_vec());
    assert_eq!(ints(get("slice")), vec![1, 3]);
    close(floats(&get("col")), vec![3.0, 6.5]);
    close(floats(&get("narrow")), vec![2.0, 3.0, 5.0, 6.5]);
    close(
        vec![get("sum").as_float().unwrap()],
        vec![flat.iter().sum()],
    );
    close(floats(&get("sum0")), vec![5.0, 7.0, 9.5]);
    close(
        vec![get("mean").as_float().unwrap()],
        vec![flat.iter().sum::<f64>() / 6.0],
    );
    close(vec![get("max").as_float().unwrap()], vec![6.5]);
    assert_eq!(ints(get("argmax")), vec![2, 2]);
    assert_eq!(ints(get("argmax0")), vec![1, 1, 1]);
    let softmax: Vec<f64> = data
        .iter()
        .flat_map(|row| {
            let z: f64 = row.iter().map(|x| x.exp()).sum();
            row.iter().map(move |x| x.exp() / z)
        })
        .collect();
    close(floats(&get("softmax")), softmax);
    assert_eq!(ints(get("tt")), vec![3, 2]);
    let gram: Vec<f64> = (0..2)
        .flat_map(|i| (0..2).map(move |j| (0..3).map(|k| data[i][k] * data[j][k]).sum()))
        .collect();
    close(floats(&get("gram")), gram);
    close(
        floats(&get("diff")),
        data.iter()
            .flat_map(|row| row.iter().zip(data[0]).map(|(x, y)| x - y))
            .collect(),
    );
    close(floats(&get("reshape")), flat.clone());
    let reshaped = get("reshape").into_array().unwrap();
    assert_eq!(reshaped.len(), 3, "reshape gives 3 rows");
}

#[test]
fn logits_argmax_is_the_greedy_token() {
    // The last position's argmax is the first greedily generated token.
    let out = run("let m = load_model(TEACHER);\n\
         let l = m.logits(\"Tell me a short story about a red ball.\");\n\
         let next = l[-1].argmax().item();\n\
         let p = l[-1].softmax();\n\
         [next, p.sum().item(), p[next].item() >= p.max().item(),\n\
          m.decode([next]), m.generate(#{ prompt: \"Tell me a short story about a red ball.\",\n\
          max_new_tokens: 1, stop_at_eos: false })]")
    .unwrap()
    .into_array()
    .unwrap();
    let r = reference("teacher", "reference.safetensors");
    assert_eq!(out[0].as_int().unwrap(), ids_i64(&r["text_greedy_ids"])[0]);
    assert!((out[1].as_float().unwrap() - 1.0).abs() < 1e-5);
    assert!(out[2].as_bool().unwrap());
    // The token carries the space that follows the template's `ASSISTANT:`; the answer does not.
    let token = out[3].clone().into_string().unwrap();
    assert_eq!(
        token.strip_prefix(' ').unwrap_or(&token),
        out[4].clone().into_string().unwrap()
    );
}

#[test]
fn errors_carry_the_script_line() {
    let err =
        run("let a = 1;\nlet b = 2;\nlet m = load_model(\"/no/such/checkpoint\");\n").unwrap_err();
    assert_eq!(err.position().line(), Some(3), "{err}");
    assert!(err.to_string().contains("/no/such/checkpoint"), "{err}");

    let err =
        run("let t = tensor([1.0, 2.0]);\n\nlet u = t + tensor([1.0, 2.0, 3.0]);").unwrap_err();
    assert_eq!(err.position().line(), Some(3), "{err}");
    assert!(err.to_string().contains("shape"), "{err}");

    let err = run("let m = load_model(TEACHER);\nm.generate(#{ prompt: \"hi\", max_tokens: 3 })")
        .unwrap_err();
    assert_eq!(err.position().line(), Some(2), "{err}");
    assert!(
        err.to_string().contains("max_tokens") && err.to_string().contains("max_new_tokens"),
        "names the unknown option and the known ones: {err}"
    );

    let err = run("let t = tensor([[1.0], [2.0, 3.0]]);").unwrap_err();
    assert!(err.to_string().contains("ragged"), "{err}");
    let err = run("tensor([1.0, 2.0])[5]").unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
    let err =
        run("load_model(TEACHER).logits(#{ prompt: \"x\", image: \"/no/such.png\" })").unwrap_err();
    assert!(err.to_string().contains("/no/such.png"), "{err}");
}

#[test]
fn script_arguments_are_typed_variables() {
    let args: Vec<String> = [
        "--steps",
        "10",
        "--lr",
        "2e-4",
        "--name",
        "run-a",
        "--verbose",
        "--max-len",
        "-1",
        "--ratio=0.25",
        "--on",
        "false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let parsed = script::parse_script_args(&args).unwrap();
    let names: Vec<&str> = parsed.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["steps", "lr", "name", "verbose", "max_len", "ratio", "on"]
    );
    let (engine, printed) = engine();
    let mut scope = Scope::new();
    script::push_args(&mut scope, &parsed);
    let out: Array = engine
        .eval_with_scope(
            &mut scope,
            "print(type_of(lr)); [steps * 2, lr * 1e4, name, verbose, max_len, ratio, on,\n\
             ARGS.steps, ARGS.missing ?? 7]",
        )
        .unwrap();
    assert_eq!(printed.lock().unwrap().as_slice(), ["f64"]);
    assert_eq!(out[0].as_int().unwrap(), 20);
    assert!((out[1].as_float().unwrap() - 2.0).abs() < 1e-12);
    assert_eq!(out[2].clone().into_string().unwrap(), "run-a");
    assert!(out[3].as_bool().unwrap());
    assert_eq!(out[4].as_int().unwrap(), -1);
    assert_eq!(out[5].as_float().unwrap(), 0.25);
    assert!(!out[6].as_bool().unwrap());
    assert_eq!(out[7].as_int().unwrap(), 10);
    assert_eq!(out[8].as_int().unwrap(), 7);

    for bad in [
        vec!["steps", "3"],
        vec!["--1x", "3"],
        vec!["--a", "1", "--a", "2"],
    ] {
        let bad: Vec<String> = bad.iter().map(|s| s.to_string()).collect();
        assert!(script::parse_script_args(&bad).is_err(), "{bad:?}");
    }
}

#[test]
fn devices_and_dtypes_parse_or_explain() {
    assert!(matches!(script::parse_device("cpu").unwrap(), Device::Cpu));
    assert_eq!(script::parse_dtype("bf16").unwrap(), DType::BF16);
    let e = script::parse_dtype("f8").unwrap_err().to_string();
    assert!(e.contains("f8") && e.contains("bf16"), "{e}");
    let e = script::parse_device("tpu").unwrap_err().to_string();
    assert!(e.contains("tpu"), "{e}");
    if !cfg!(feature = "cuda") {
        let e = script::parse_device("cuda:1").unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }
}

#[test]
fn a_bf16_session_loads_bf16_models() {
    let engine = script::engine(&Session::new(Device::Cpu, DType::BF16));
    let out = run_with(
        &engine,
        "let m = load_model(TEACHER); [m.dtype(), m.logits(\"hi\").dtype()]",
    )
    .unwrap();
    assert_eq!(strings(out), ["bf16", "bf16"]);
    let out = run("load_model(TEACHER, #{ dtype: \"f16\" }).dtype()").unwrap();
    assert_eq!(out.into_string().unwrap(), "f16");
}

#[test]
fn saved_models_and_tensors_load_back() {
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("copy");
    let file = dir.path().join("t.safetensors");
    let folder = dir.path().join("tensors");
    let code = format!(
        "let m = load_model(TEACHER);\n\
         m.save({saved:?});\n\
         let again = load_model({saved:?});\n\
         let d = (m.logits(\"hi\") - again.logits(\"hi\")).abs().max().item();\n\
         let t = tensor([[1.5, -2.0], [0.25, 4.0]]);\n\
         save_safetensors({file:?}, #{{ a: t, b: t * 2 }});\n\
         save_safetensors({folder:?}, #{{ a: t }});\n\
         let back = load_safetensors({file:?});\n\
         [d, back.b.to_array()]",
        saved = saved.display().to_string(),
        file = file.display().to_string(),
        folder = folder.display().to_string(),
    );
    let out = run(&code).unwrap().into_array().unwrap();
    assert_eq!(
        out[0].as_float().unwrap(),
        0.0,
        "saved weights load back exactly"
    );
    assert_eq!(floats(&out[1]), vec![3.0, -4.0, 0.5, 8.0]);
    let lib = matvlm::checkpoint::load_safetensors(&file, &Device::Cpu).unwrap();
    assert_eq!(
        lib["a"].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![1.5, -2.0, 0.25, 4.0]
    );
    assert!(folder.join("model.safetensors").is_file());
    let err = run("save_safetensors(\"/tmp/x.safetensors\", #{ a: 1 })").unwrap_err();
    assert!(err.to_string().contains("`a`"), "{err}");
}

#[test]
fn a_synthetic_dataset_is_the_librarys_world_split() {
    let dir = tempfile::tempdir().unwrap();
    let code = format!(
        "let d = dataset(\"synthetic\", #{{ dir: {dir:?}, train: 6, val: 2, test: 2, seed: 3 }});\n\
         let v = dataset(\"synthetic\", #{{ dir: {dir:?}, split: \"val\", train: 6, val: 2, test: 2, seed: 3 }});\n\
         [d.len(), v.len(), d.sample(0), d.sample(-1).turns[0].answer]",
        dir = dir.path().display().to_string()
    );
    let out = run(&code).unwrap().into_array().unwrap();
    assert_eq!(out[0].as_int().unwrap(), 6);
    assert_eq!(out[1].as_int().unwrap(), 2);
    let sample: Map = out[2].clone().cast();
    let tok =
        matvlm::tokenize::PromptTokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    let (ds, _) = matvlm::data::Dataset::load(
        &dir.path().join("train.json"),
        dir.path(),
        &tok,
        3072,
        matvlm::data::OnBadRecord::Fail,
    )
    .unwrap();
    let lib = ds.sample(0).unwrap();
    assert_eq!(ints(sample["input_ids"].clone()), lib.input_ids);
    assert_eq!(ints(sample["labels"].clone()), lib.labels);
    assert!(lib.input_ids.contains(&-200));
    assert_eq!(
        out[3].clone().into_string().unwrap(),
        ds.records[5].turns[0].answer.clone().unwrap()
    );

    let err = run("dataset(\"synthetic\", #{ train: 4 })").unwrap_err();
    assert!(err.to_string().contains("dir"), "{err}");
    let err = run(&format!(
        "dataset(\"synthetic\", #{{ dir: {:?}, colour: 1 }})",
        dir.path().display().to_string()
    ))
    .unwrap_err();
    assert!(err.to_string().contains("colour"), "{err}");
    let err = run("dataset(\"some.json\")").unwrap_err();
    assert!(err.to_string().contains("tokenizer"), "{err}");
}

/// `teacher()` is the embedded tiny teacher, which is committed (assets/tiny-teacher): the
/// trained 8-layer teacher loads. Without that folder `teacher()` fails naming it and the command
/// that builds it; the tests cannot reach that branch without removing a committed folder.
#[test]
fn teacher_loads_the_committed_embedded_teacher() {
    let dir = matvlm::teacher::default_teacher_path().unwrap();
    assert!(
        dir.join("config.json").is_file(),
        "{} is committed",
        dir.display()
    );
    let layers = strings(run("teacher().layers()").unwrap());
    assert_eq!(layers, vec!["attn"; 8]);
}

#[test]
fn a_set_cancel_flag_stops_scripts() {
    let session = Session::default();
    let engine = script::engine(&session);
    session
        .cancel
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let err = engine
        .eval::<Dynamic>("let x = 0; loop { x += 1; }")
        .unwrap_err();
    assert!(matches!(*err, EvalAltResult::ErrorTerminated(..)), "{err}");
}

#[test]
fn shipped_example_script_runs_on_the_fixture() {
    let (engine, printed) = engine();
    let mut scope = Scope::new();
    let args = script::parse_script_args(&[
        "--model".into(),
        fixture("teacher").display().to_string(),
        "--image".into(),
        fixture("teacher")
            .join("test_image.png")
            .display()
            .to_string(),
    ])
    .unwrap();
    script::push_args(&mut scope, &args);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/inspect.rhai");
    let _ = script::run_file(&engine, &mut scope, &path).unwrap();
    let printed = printed.lock().unwrap().join("\n");
    assert!(
        printed.contains("layers: [\"attn\", \"attn\", \"attn\", \"attn\"]"),
        "{printed}"
    );
    assert!(printed.contains("logits: [56, 448]"), "{printed}");
}

#[test]
fn hybrids_are_the_librarys_hybrids() {
    use matvlm::model::hybrid::placement::Placement;
    use matvlm::model::hybrid::HybridSpec;
    use matvlm::model::hybrid::InitOptions;

    let t = teacher();
    let lib_half = t.hybrid(&HybridSpec::ratio(0.5)).unwrap();
    let lib_random = t
        .hybrid(&HybridSpec {
            placement: Placement::Explicit(vec![1, 3]),
            init: InitOptions::random(5),
            mamba: None,
        })
        .unwrap();
    let prompt = single_turn_prompt("hi", false);
    let lib_logits = |v: &Vlm| -> Vec<f64> {
        v.prompt_logits(&prompt, None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    };
    let out = run("let m = load_model(TEACHER);\n\
         let h = m.hybrid(#{ ratio: 0.5 });\n\
         let r = m.hybrid(#{ mamba_layers: [1, 3], init: \"random\", seed: 5 });\n\
         #{ layers: h.layers(), mamba: h.mamba_layers(), teacher: m.layers(),\n\
            h: h.logits(\"hi\").to_array(), r: r.logits(\"hi\").to_array(),\n\
            params: h.parameter_count(), cache: h.cache_bytes(2, 100),\n\
            r_layers: r.layers(), last: m.hybrid(#{ ratio: 0.25, placement: \"last\" }).mamba_layers() }")
    .unwrap();
    let m: Map = out.cast();
    let expect_kinds: Vec<String> = lib_half
        .layer_kinds()
        .iter()
        .map(|k| k.name().to_string())
        .collect();
    assert_eq!(strings(m["layers"].clone()), expect_kinds);
    assert_eq!(
        strings(m["layers"].clone()),
        ["mamba", "attn", "mamba", "attn"]
    );
    assert_eq!(
        strings(m["teacher"].clone()),
        ["attn"; 4],
        "the teacher is unchanged"
    );
    assert_eq!(ints(m["mamba"].clone()), [0, 2]);
    assert_eq!(
        strings(m["r_layers"].clone()),
        ["attn", "mamba", "attn", "mamba"]
    );
    assert_eq!(ints(m["last"].clone()), [3]);
    assert_eq!(
        floats(&m["h"]),
        lib_logits(&lib_half),
        "same hybrid, same logits"
    );
    assert_eq!(
        floats(&m["r"]),
        lib_logits(&lib_random),
        "seeded random init"
    );
    assert_eq!(
        m["params"].as_int().unwrap() as usize,
        lib_half.parameter_count()
    );
    assert_eq!(
        m["cache"].as_int().unwrap() as usize,
        lib_half.cache_bytes(2, 100)
    );

    let err = run("load_model(TEACHER).hybrid(#{ ratio: 0.5, mamba_layers: [0] })").unwrap_err();
    assert!(err.to_string().contains("either"), "{err}");
    let err = run("load_model(TEACHER).hybrid(#{ mamba_layers: [0, 7] })").unwrap_err();
    assert!(err.to_string().contains("layer id 7"), "{err}");
    let err = run("load_model(TEACHER).hybrid(#{ ratio: 0.5, init: \"zeros\" })").unwrap_err();
    assert!(err.to_string().contains("zeros"), "{err}");
}

#[test]
fn saved_hybrids_load_back_as_hybrids() {
    let dir = tempfile::tempdir().unwrap();
    let code = format!(
        "let h = load_model(TEACHER).hybrid(#{{ mamba_layers: [0, 2], init: \"random\", seed: 1 }});\n\
         h.save({dir:?});\n\
         let back = load_model({dir:?});\n\
         [back.layers(), (h.logits(\"hi\") - back.logits(\"hi\")).abs().max().item(),\n\
          load_model({fixture:?}).mamba_layers()]",
        dir = dir.path().display().to_string(),
        fixture = fixture("hybrid").display().to_string(),
    );
    let out = run(&code).unwrap().into_array().unwrap();
    assert_eq!(strings(out[0].clone()), ["mamba", "attn", "mamba", "attn"]);
    assert_eq!(out[1].as_float().unwrap(), 0.0);
    assert!(dir.path().join("mamba_config.json").is_file());
    let upstream = Vlm::load(
        fixture("hybrid").to_str().unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let expected: Vec<i64> = upstream.mamba_layers().iter().map(|&i| i as i64).collect();
    assert_eq!(ints(out[2].clone()), expected);
    assert!(!expected.is_empty());
}

#[test]
fn shipped_hybrid_script_reports_the_kl_the_library_computes() {
    use matvlm::model::hybrid::HybridSpec;

    let out_dir = tempfile::tempdir().unwrap();
    let (engine, printed) = engine();
    let mut scope = Scope::new();
    let args = script::parse_script_args(&[
        "--model".into(),
        fixture("teacher").display().to_string(),
        "--ratio".into(),
        "0.5".into(),
        "--prompt".into(),
        "Tell me a story.".into(),
        "--out".into(),
        out_dir.path().display().to_string(),
    ])
    .unwrap();
    script::push_args(&mut scope, &args);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/hybrid.rhai");
    let _ = script::run_file(&engine, &mut scope, &path).unwrap();
    let printed = printed.lock().unwrap().clone();
    let kl: f64 = printed
        .iter()
        .find_map(|l| l.strip_prefix("KL(teacher || hybrid) = "))
        .expect("the script prints the KL")
        .parse()
        .unwrap();

    let t = teacher();
    let h = t.hybrid(&HybridSpec::ratio(0.5)).unwrap();
    let prompt = single_turn_prompt("Tell me a story.", false);
    let rows = |v: &Vlm| -> Vec<Vec<f64>> {
        v.prompt_logits(&prompt, None)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
            .into_iter()
            .map(|r| r.into_iter().map(f64::from).collect())
            .collect()
    };
    let log_softmax = |r: &[f64]| -> Vec<f64> {
        let m = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z = r.iter().map(|x| (x - m).exp()).sum::<f64>().ln() + m;
        r.iter().map(|x| x - z).collect()
    };
    let (tr, hr) = (rows(&t), rows(&h));
    let expected = tr
        .iter()
        .zip(&hr)
        .map(|(a, b)| {
            let (la, lb) = (log_softmax(a), log_softmax(b));
            la.iter()
                .zip(&lb)
                .map(|(x, y)| x.exp() * (x - y))
                .sum::<f64>()
        })
        .sum::<f64>()
        / tr.len() as f64;
    assert!(
        (kl - expected).abs() < 1e-4,
        "script {kl} vs library {expected}"
    );
    assert!(kl > 0.0);
    assert!(
        printed.iter().any(|l| l == "mamba layers: [0, 2]"),
        "{printed:?}"
    );
    let saved = Vlm::load(out_dir.path().to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(saved.mamba_layers(), vec![0, 2]);
}

/// `generate_batch` answers each prompt as `generate` does alone (greedy), in order, with and
/// without an image; a prompt that is not a map is an error naming its index.
#[test]
fn generate_batch_gives_each_prompt_its_own_answer() {
    let code = "let m = load_model(TEACHER);\n\
        let o = #{ max_new_tokens: 6, stop_at_eos: false };\n\
        let qs = [#{ prompt: \"What is in the picture?\", image: IMAGE }, #{ prompt: \"Hi\" },\n\
                  #{ prompt: \"Name the shape and its colour, please.\" }];\n\
        let alone = qs.map(|q| m.generate(q + o));\n\
        [alone, m.generate_batch(qs, o)]";
    let out = run(code).unwrap().into_array().unwrap();
    let texts = |v: &Dynamic| -> Vec<String> {
        v.clone()
            .into_array()
            .unwrap()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect()
    };
    let (alone, batched) = (texts(&out[0]), texts(&out[1]));
    assert_eq!(alone.len(), 3);
    assert_eq!(batched, alone);
    let err = run("load_model(TEACHER).generate_batch([\"hi\"], #{})")
        .unwrap_err()
        .to_string();
    assert!(err.contains("prompt 0 is not a map"), "{err}");
    let err = run("load_model(TEACHER).generate_batch([#{ prompt: \"hi\" }], #{ max_tokens: 3 })")
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_tokens"), "{err}");
}

/// `random_model` builds the fixture's architecture with random weights (a hybrid when asked),
/// and `bench` times it: one prefill and one record per decoded length and batch size.
#[test]
fn random_model_and_bench() {
    let config = fixture("teacher").join("config.json");
    let code = format!(
        "let m = random_model(#{{ config: {:?}, mamba_layers: [1], seed: 3 }});\n\
         let r = bench(m, #{{ prompt_tokens: 12, batches: [1, 3], gen_lens: [2, 5], prefill_reps: 1 }});\n\
         [m.layers(), r]",
        config.display().to_string()
    );
    let out = run(&code).unwrap().into_array().unwrap();
    let layers: Vec<String> = out[0]
        .clone()
        .into_array()
        .unwrap()
        .into_iter()
        .map(|s| s.into_string().unwrap())
        .collect();
    assert_eq!(layers, ["attn", "mamba", "attn", "attn"]);
    let records: Vec<Map> = out[1]
        .clone()
        .into_array()
        .unwrap()
        .into_iter()
        .map(|r| r.cast::<Map>())
        .collect();
    let key = |r: &Map| {
        (
            r["phase"].clone().into_string().unwrap(),
            r["batch"].as_int().unwrap(),
            r["gen_len"].as_int().unwrap(),
        )
    };
    let keys: Vec<_> = records.iter().map(key).collect();
    let expected: Vec<(String, i64, i64)> = [1, 3]
        .iter()
        .flat_map(|&b| {
            [("prefill", b, 0), ("decode", b, 2), ("decode", b, 5)]
                .map(|(p, b, g)| (p.to_string(), b, g))
        })
        .collect();
    assert_eq!(keys, expected);
    for r in &records {
        let ms = r["ms"].as_float().unwrap();
        let tps = r["tokens_per_s"].as_float().unwrap();
        let (_, b, g) = key(r);
        let positions = if g == 0 { 12 * b } else { g * b };
        assert!(ms > 0.0);
        assert!(
            ((positions as f64) / (ms / 1e3) - tps).abs() <= 1e-6 * tps,
            "{r:?}"
        );
    }
    let err = run("bench(random_model(#{ config: \"nope\" }), #{})")
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope"), "{err}");
}

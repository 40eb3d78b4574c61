//! The whole TinyLLaVA teacher (vision tower + connector + decoder, loaded from the sharded
//! fixture checkpoint) against HF transformers, generation, and the errors a user meets when a
//! checkpoint, a config, an image or a prompt is wrong. Tolerance: f32 logits <= 1e-4.

use std::collections::HashMap;
use std::path::Path;

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use matvlm::generate::GenerateOptions;
use matvlm::model::vlm::Vlm;
use matvlm::tokenize::single_turn_prompt;
use matvlm::Error;

const TOL: f64 = 1e-4;

fn load(dir: &Path) -> matvlm::Result<Vlm> {
    Vlm::load(dir.to_str().unwrap(), DType::F32, &Device::Cpu)
}

#[test]
fn image_prompt_logits_match_hf() {
    let r = reference("teacher", "reference.safetensors");
    let vlm = teacher();
    let ids = ids_i64(&r["image_prompt_ids"]);
    let (logits, _) = vlm
        .forward(&[ids], Some(&r["pixel_values"]), &Default::default())
        .unwrap();
    let diff = max_abs_diff(&logits.squeeze(0).unwrap(), &r["image_logits"]);
    assert!(diff <= TOL, "image logits differ by {diff}");
}

#[test]
fn logits_from_the_image_file_match_hf() {
    let r = reference("teacher", "reference.safetensors");
    let j = reference_json("teacher", "reference.json");
    let vlm = teacher();
    let prompt = single_turn_prompt(j["image_question"].as_str().unwrap(), true);
    let image = fixture("teacher").join("test_image.png");
    let logits = vlm.prompt_logits(&prompt, Some(&image)).unwrap();
    let diff = max_abs_diff(&logits, &r["image_logits"]);
    assert!(diff <= TOL, "logits via preprocessing differ by {diff}");
    let text_prompt = single_turn_prompt(j["text_question"].as_str().unwrap(), false);
    let logits = vlm.prompt_logits(&text_prompt, None).unwrap();
    let diff = max_abs_diff(&logits, &r["text_logits"]);
    assert!(diff <= TOL, "text logits differ by {diff}");
}

#[test]
fn greedy_generation_matches_hf() {
    let r = reference("teacher", "reference.safetensors");
    let vlm = teacher();
    let opts = GenerateOptions {
        max_new_tokens: 8,
        stop_at_eos: false,
        ..Default::default()
    };
    for (which, pixels) in [("image", Some(&r["pixel_values"])), ("text", None)] {
        let ids = ids_i64(&r[&format!("{which}_prompt_ids")]);
        let (out, _) = vlm
            .generate_ids(&ids, pixels, &opts, &mut |_| true)
            .unwrap();
        let out: Vec<i64> = out.into_iter().map(i64::from).collect();
        assert_eq!(out, ids_i64(&r[&format!("{which}_greedy_ids")]), "{which}");
    }
}

#[test]
fn sampling_is_seeded_and_streams_every_token() {
    let vlm = teacher();
    let image = fixture("teacher").join("test_image.png");
    let prompt = single_turn_prompt("What is in the picture?", true);
    let opts = GenerateOptions {
        max_new_tokens: 6,
        temperature: 0.9,
        top_p: 0.9,
        seed: 7,
        stop_at_eos: false,
    };
    let mut streamed = String::new();
    let a = vlm
        .generate(&prompt, Some(&image), &opts, &mut |piece| {
            streamed.push_str(piece);
            true
        })
        .unwrap();
    let b = vlm
        .generate(&prompt, Some(&image), &opts, &mut |_| true)
        .unwrap();
    assert_eq!(a.tokens, b.tokens, "same seed, same tokens");
    assert_eq!(a.tokens.len(), 6);
    assert_eq!(streamed, a.text, "the streamed pieces add up to the text");
    let c = vlm
        .generate(
            &prompt,
            Some(&image),
            &GenerateOptions {
                seed: 8,
                ..opts.clone()
            },
            &mut |_| true,
        )
        .unwrap();
    assert_ne!(a.tokens, c.tokens, "another seed samples differently");
    // The callback can stop generation (streaming UIs and Ctrl-C use this).
    let mut n = 0;
    let d = vlm
        .generate(&prompt, Some(&image), &opts, &mut |_| {
            n += 1;
            n < 2
        })
        .unwrap();
    assert_eq!(d.tokens.len(), 2);
}

/// The answer of a templated prompt is the answer alone: the space that the template puts after
/// `ASSISTANT:` travels on the answer's first token (` red`) but is not part of the text, nor of
/// the streamed pieces. On the committed tiny teacher, which answers colour questions of its
/// world without error: the text is exactly the expected answer.
#[test]
fn generated_answers_come_without_the_templates_space() {
    use matvlm::data::synthetic::{generate_world, read_world_split, Composition, QuestionType};
    let world = tempfile::tempdir().unwrap();
    let cfg = matvlm::data::WorldConfig {
        seed: 5,
        train: 50,
        val: 0,
        test: 24,
        ..matvlm::data::WorldConfig::default()
    };
    generate_world(&cfg, world.path()).unwrap();
    let records = read_world_split(&world.path().join("test.json")).unwrap();
    // A scene of compositions the teacher's training shows: the claim is about the template's
    // space, not about generalising to held-out compositions.
    let holdout = matvlm::teacher::teacher_holdout(&cfg);
    let record = records
        .iter()
        .find(|r| {
            r.question_type == QuestionType::Color
                && holdout.composition(&r.scene) == Composition::Seen
        })
        .expect("a colour question about a seen scene among 24");
    let vlm = Vlm::load(
        matvlm::teacher::default_teacher_path()
            .unwrap()
            .to_str()
            .unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let image = world.path().join(&record.image);
    let prompt = single_turn_prompt(record.question(), true);
    assert!(prompt.ends_with("ASSISTANT:"), "{prompt:?}");
    let mut streamed = String::new();
    let g = vlm
        .generate(
            &prompt,
            Some(&image),
            &GenerateOptions::default(),
            &mut |piece| {
                streamed.push_str(piece);
                true
            },
        )
        .unwrap();
    assert_eq!(g.text, record.answer(), "{}", record.question());
    assert_eq!(streamed, g.text);
    let tokens = vlm.tokenizer().unwrap().decode(&g.tokens).unwrap();
    assert_eq!(
        tokens,
        format!(" {}", g.text),
        "the space is on the first token"
    );
    let asked = vlm
        .ask(record.question(), Some(&image), &GenerateOptions::default())
        .unwrap();
    assert_eq!(asked, g.text);
}

#[test]
fn single_file_checkpoint_loads_like_the_sharded_one() {
    let dir = scratch_copy("teacher");
    let mut all: HashMap<String, Tensor> = HashMap::new();
    for f in matvlm::checkpoint::weight_files(dir.path()).unwrap() {
        all.extend(matvlm::checkpoint::load_safetensors(&f, &Device::Cpu).unwrap());
        std::fs::remove_file(f).unwrap();
    }
    std::fs::remove_file(dir.path().join("model.safetensors.index.json")).unwrap();
    candle_core::safetensors::save(&all, dir.path().join("model.safetensors")).unwrap();
    let vlm = load(dir.path()).unwrap();
    let r = reference("teacher", "reference.safetensors");
    let (logits, _) = vlm
        .forward(&[ids_i64(&r["text_prompt_ids"])], None, &Default::default())
        .unwrap();
    assert!(max_abs_diff(&logits.squeeze(0).unwrap(), &r["text_logits"]) <= TOL);
}

#[test]
fn half_precision_weights_load_and_stay_close() {
    let r = reference("teacher", "reference.safetensors");
    for dtype in [DType::BF16, DType::F16] {
        let vlm = Vlm::load(fixture("teacher").to_str().unwrap(), dtype, &Device::Cpu).unwrap();
        let (logits, _) = vlm
            .forward(&[ids_i64(&r["text_prompt_ids"])], None, &Default::default())
            .unwrap();
        assert_eq!(logits.dtype(), dtype);
        let diff = max_abs_diff(&logits.squeeze(0).unwrap(), &r["text_logits"]);
        // Half precision rounds every weight and activation; logits of magnitude ~7 keep
        // about two correct digits.
        assert!(diff <= 0.5, "{dtype:?} logits differ by {diff}");
    }
}

/// Rewrite the shard holding `key` with `edit` applied to its tensors.
fn edit_shard(dir: &Path, key: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    for f in matvlm::checkpoint::weight_files(dir).unwrap() {
        let mut t = matvlm::checkpoint::load_safetensors(&f, &Device::Cpu).unwrap();
        if t.contains_key(key) {
            edit(&mut t);
            candle_core::safetensors::save(&t, &f).unwrap();
            return;
        }
    }
    panic!("no shard holds {key}");
}

#[test]
fn a_truncated_shard_is_named() {
    let dir = scratch_copy("teacher");
    let shard = dir.path().join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, Error::BadSafetensors { .. }), "{err:?}");
    assert!(
        err.to_string().contains("model-00002-of-00002.safetensors"),
        "{err}"
    );
}

#[test]
fn a_missing_shard_is_named() {
    let dir = scratch_copy("teacher");
    std::fs::remove_file(dir.path().join("model-00001-of-00002.safetensors")).unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(
        err.to_string().contains("model-00001-of-00002.safetensors"),
        "{err}"
    );
}

#[test]
fn a_missing_key_is_named() {
    let dir = scratch_copy("teacher");
    let key = "language_model.model.layers.2.mlp.fc1.weight";
    edit_shard(dir.path(), key, |t| {
        t.remove(key);
    });
    let err = load(dir.path()).unwrap_err();
    match &err {
        Error::MissingKey { key: k, .. } => assert_eq!(k, key),
        other => panic!("expected MissingKey, got {other:?}"),
    }
    assert!(err.to_string().contains(key));
}

#[test]
fn a_shape_mismatch_names_key_and_shapes() {
    let dir = scratch_copy("teacher");
    let key = "language_model.model.layers.1.self_attn.q_proj.weight";
    edit_shard(dir.path(), key, |t| {
        t.insert(
            key.into(),
            Tensor::zeros((80, 40), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    match load(dir.path()).unwrap_err() {
        Error::ShapeMismatch {
            key: k,
            expected,
            found,
        } => {
            assert_eq!(k, key);
            assert_eq!(expected, vec![80, 80]);
            assert_eq!(found, vec![80, 40]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn unknown_connector_and_activation_are_typed_errors() {
    let dir = scratch_copy("teacher");
    edit_config(dir.path(), |v| v["connector_type"] = "qformer_xl".into());
    match load(dir.path()).unwrap_err() {
        Error::UnknownConnector(name) => assert_eq!(name, "qformer_xl"),
        other => panic!("expected UnknownConnector, got {other:?}"),
    }
    let dir = scratch_copy("teacher");
    edit_config(dir.path(), |v| {
        v["text_config"]["hidden_act"] = "swiglu_9000".into()
    });
    match load(dir.path()).unwrap_err() {
        Error::UnknownActivation(name) => assert_eq!(name, "swiglu_9000"),
        other => panic!("expected UnknownActivation, got {other:?}"),
    }
}

#[test]
fn a_broken_config_names_the_file() {
    let dir = scratch_copy("teacher");
    std::fs::write(dir.path().join("config.json"), "{\"text_config\": ").unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, Error::BadConfig { .. }), "{err:?}");
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn bad_images_and_prompts_are_errors_not_panics() {
    let vlm = teacher();
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("not_an_image.png");
    std::fs::write(&fake, "this is text").unwrap();
    let prompt = single_turn_prompt("What is it?", true);
    let opts = GenerateOptions::default();
    for path in [fake.clone(), dir.path().join("missing.png")] {
        match vlm
            .generate(&prompt, Some(&path), &opts, &mut |_| true)
            .unwrap_err()
        {
            Error::BadImage { path: p, .. } => assert_eq!(p, path),
            other => panic!("expected BadImage, got {other:?}"),
        }
    }
    let image = fixture("teacher").join("test_image.png");
    let two = "USER: <image>\n<image>\nWhat is it? ASSISTANT:";
    match vlm
        .generate(two, Some(&image), &opts, &mut |_| true)
        .unwrap_err()
    {
        Error::Prompt(msg) => assert!(msg.contains("2 `<image>` marker"), "{msg}"),
        other => panic!("expected Prompt, got {other:?}"),
    }
    let err = vlm
        .forward(&[vec![1, 2, 99_999]], None, &Default::default())
        .unwrap_err();
    assert!(err.to_string().contains("99999"), "{err}");
}

#[test]
fn layer_kinds_of_a_teacher_are_all_attention() {
    assert_eq!(teacher().layer_kinds(), vec!["attn"; 4]);
}

#[test]
fn save_then_load_is_bit_exact() {
    let vlm = teacher();
    let dir = tempfile::tempdir().unwrap();
    // A small shard limit forces several shards plus an index.
    vlm.save(dir.path(), DType::F32, Some(400_000)).unwrap();
    assert!(dir.path().join("model.safetensors.index.json").is_file());
    let back = load(dir.path()).unwrap();
    let a = vlm.named_tensors();
    let b: HashMap<String, Tensor> = back.named_tensors().into_iter().collect();
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        let u = &b[k];
        assert_eq!(t.dims(), u.dims(), "{k}");
        assert_eq!(max_abs_diff(t, u), 0.0, "{k} changed in the round trip");
    }
    let no_tmp = std::fs::read_dir(dir.path())
        .unwrap()
        .all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".tmp"));
    assert!(no_tmp, "temporary files left behind");
}

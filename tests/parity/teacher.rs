//! The TinyLLaVA teacher against HF transformers on the tiny fixture checkpoint made by
//! scripts/fixtures/make_teacher_fixtures.py (random weights, the exact TinyLLaVA layout).
//! Tolerance: f32 logits max abs difference <= 1e-4.

use crate::common::*;
use candle_core::{DType, Device};
use matvlm::checkpoint::CheckpointFiles;
use matvlm::config::TinyLlavaConfig;
use matvlm::model::decoder::{Capture, Captured, Decoder};
use matvlm::tokenize::{encode_conversation, PromptTokenizer, Turn};

const TOL: f64 = 1e-4;

fn decoder() -> Decoder {
    let files = CheckpointFiles::from_dir(&fixture("teacher")).unwrap();
    let cfg = TinyLlavaConfig::from_file(&files.config).unwrap();
    let vb = files.var_builder(DType::F32, &Device::Cpu).unwrap();
    Decoder::load(
        vb.pp("language_model"),
        &cfg.text_config,
        &matvlm::model::hybrid::LayerPlan::attention(cfg.text_config.num_hidden_layers),
    )
    .unwrap()
}

fn tokenizer() -> PromptTokenizer {
    PromptTokenizer::from_file(&fixture("teacher").join("tokenizer.json")).unwrap()
}

#[test]
fn prompt_tokenisation_matches_tinyllava() {
    let r = reference_json("teacher", "reference.json");
    let tok = tokenizer();
    for which in ["image", "text"] {
        let prompt = r[format!("{which}_prompt")].as_str().unwrap();
        let expected = json_i64s(&r[format!("{which}_prompt_ids")]);
        assert_eq!(
            tok.encode_prompt(prompt).unwrap(),
            expected,
            "{which} prompt"
        );
    }
    // The template itself: rebuild the image prompt from the question.
    let q = r["image_question"].as_str().unwrap();
    let prompt = matvlm::tokenize::single_turn_prompt(q, true);
    assert_eq!(prompt, r["image_prompt"].as_str().unwrap());
    let q = r["text_question"].as_str().unwrap();
    assert_eq!(
        matvlm::tokenize::single_turn_prompt(q, false),
        r["text_prompt"].as_str().unwrap()
    );
}

#[test]
fn conversation_labels_match_make_labels() {
    let r = reference_json("teacher", "reference.json");
    let conv = r["conversation"].as_array().unwrap();
    let turns: Vec<Turn> = conv
        .chunks(2)
        .map(|p| Turn {
            question: p[0]["value"].as_str().unwrap().to_string(),
            answer: Some(p[1]["value"].as_str().unwrap().to_string()),
        })
        .collect();
    let (ids, labels) = encode_conversation(&tokenizer(), &turns).unwrap();
    assert_eq!(
        matvlm::tokenize::phi_prompt(&turns),
        r["conversation_prompt"].as_str().unwrap()
    );
    assert_eq!(ids, json_i64s(&r["conversation_input_ids"]));
    assert_eq!(labels, json_i64s(&r["conversation_labels"]));
}

#[test]
fn text_logits_match_hf() {
    let reference = reference("teacher", "reference.safetensors");
    let dec = decoder();
    let ids = ids_i64(&reference["text_prompt_ids"]);
    let embeds = dec.embed(&ids_tensor(&ids)).unwrap();
    let mut cache = dec.new_cache();
    let logits = dec
        .forward(&embeds, &mut cache, &Capture::none(), &mut Captured::new())
        .unwrap()
        .squeeze(0)
        .unwrap();
    let diff = max_abs_diff(&logits, &reference["text_logits"]);
    assert!(diff <= TOL, "text logits differ by {diff}");
}

#[test]
fn decoder_on_spliced_embeddings_matches_hf_layer_by_layer() {
    let reference = reference("teacher", "reference.safetensors");
    let dec = decoder();
    let embeds = reference["image_inputs_embeds"].unsqueeze(0).unwrap();
    let mut cache = dec.new_cache();
    let mut captured = Captured::new();
    let logits = dec
        .forward(
            &embeds,
            &mut cache,
            &Capture::hidden_states(),
            &mut captured,
        )
        .unwrap()
        .squeeze(0)
        .unwrap();
    let hidden = &reference["image_decoder_hidden_states"];
    for i in 0..dec.blocks.len() {
        let ours = captured[&format!("layers.{i}.output")].squeeze(0).unwrap();
        let diff = max_abs_diff(&ours, &hidden.get(i + 1).unwrap());
        assert!(diff <= TOL, "layer {i} output differs by {diff}");
    }
    let diff = max_abs_diff(&logits, &reference["image_logits"]);
    assert!(diff <= TOL, "image logits differ by {diff}");
}

/// Greedy decoding through the KV cache gives HF's continuation, and every cached step's logits
/// equal those of a full recomputation over the whole sequence.
#[test]
fn kv_cache_decoding_equals_full_recomputation() {
    let reference = reference("teacher", "reference.safetensors");
    let dec = decoder();
    let ids = ids_i64(&reference["text_prompt_ids"]);
    let expected = ids_i64(&reference["text_greedy_ids"]);
    let (generated, cache) = greedy_decode_checked(&dec, &ids, expected.len());
    assert_eq!(generated, expected);
    assert_eq!(cache.seq_len, ids.len() + generated.len() - 1);
}

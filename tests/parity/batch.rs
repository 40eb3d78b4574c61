//! The generation engine: preallocated caches, left-padded batches and random full-size models.
//!
//! The reference for a batch is the same model run one prompt at a time (whose logits the
//! `teacher` and `hybrid` tests hold to HF and mamba_ssm): a batched row must give the tokens its
//! prompt gives alone. All f32 on the CPU, so tokens must be identical.

use candle_core::{DType, Device, Tensor};
use matvlm::config::TinyLlavaConfig;
use matvlm::generate::{GenerateOptions, PromptIds, StopReason};
use matvlm::model::decoder::{Capture, Captured};
use matvlm::model::random::{random_model, RandomModelOptions};
use matvlm::model::vlm::Vlm;

use crate::common::{fixture, ids_i64, ids_tensor, max_abs_diff, reference};

fn load(area: &str) -> Vlm {
    Vlm::load(fixture(area).to_str().unwrap(), DType::F32, &Device::Cpu).unwrap()
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        stop_at_eos: false,
        ..Default::default()
    }
}

/// Prompts of different lengths, with and without the image, from the fixture's own prompts.
fn prompts() -> (Vec<Vec<i64>>, Tensor) {
    let r = reference("teacher", "reference.safetensors");
    let text = ids_i64(&r["text_prompt_ids"]);
    let image = ids_i64(&r["image_prompt_ids"]);
    let rows = vec![
        text.clone(),
        image.clone(),
        text[..text.len() / 2].to_vec(),
        text[..3].to_vec(),
        image[..image.len() - 2].to_vec(),
    ];
    (rows, r["pixel_values"].clone())
}

fn batched_equals_alone(vlm: &Vlm) {
    let (rows, pixels) = prompts();
    let has_image = |ids: &[i64]| ids.contains(&matvlm::tokenize::IMAGE_TOKEN);
    let opts = greedy(10);
    let alone: Vec<Vec<u32>> = rows
        .iter()
        .map(|ids| {
            let px = has_image(ids).then_some(&pixels);
            vlm.generate_ids(ids, px, &opts, &mut |_| true).unwrap().0
        })
        .collect();
    let batch: Vec<PromptIds> = rows
        .iter()
        .map(|ids| PromptIds {
            ids,
            pixel_values: has_image(ids).then_some(&pixels),
            max_new_tokens: None,
        })
        .collect();
    let together = vlm
        .generate_ids_batch(&batch, &opts, &mut |_| true)
        .unwrap();
    for (r, ((tokens, stop), alone)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(tokens, alone, "row {r} (prompt of {} ids)", rows[r].len());
        assert_eq!(*stop, StopReason::MaxTokens);
    }
    // A different order regroups the padding: still the same answers.
    let reversed: Vec<PromptIds> = batch.iter().rev().copied().collect();
    let back = vlm
        .generate_ids_batch(&reversed, &opts, &mut |_| true)
        .unwrap();
    for (r, (tokens, _)) in back.iter().rev().enumerate() {
        assert_eq!(tokens, &alone[r], "row {r} in reversed order");
    }
}

/// Greedy tokens of every row of a left-padded batch (five prompts from 3 to 50+ positions, two
/// with the image) equal that prompt's tokens alone: teacher fixture.
#[test]
fn teacher_batched_greedy_equals_one_at_a_time() {
    batched_equals_alone(&load("teacher"));
}

/// The same for the upstream hybrid fixture (Mamba layers 0 and 2, chunk 16): padding must stay
/// out of the conv and SSM states, across chunk boundaries.
#[test]
fn hybrid_batched_greedy_equals_one_at_a_time() {
    batched_equals_alone(&load("hybrid"));
}

/// Rows stop on their own: a row limited to 2 tokens stops at 2 while the others go on, EOS
/// ends a row, and a callback returning false stops every row still running.
#[test]
fn rows_stop_on_their_own() {
    let vlm = load("teacher");
    let (rows, _) = prompts();
    let text = &rows[0];
    let short = &rows[2];
    let opts = greedy(6);
    let batch = [
        PromptIds {
            ids: text,
            pixel_values: None,
            max_new_tokens: Some(2),
        },
        PromptIds {
            ids: short,
            pixel_values: None,
            max_new_tokens: None,
        },
    ];
    let out = vlm
        .generate_ids_batch(&batch, &opts, &mut |_| true)
        .unwrap();
    assert_eq!(out[0].0.len(), 2);
    assert_eq!(out[1].0.len(), 6);
    let alone = vlm
        .generate_ids(text, None, &greedy(2), &mut |_| true)
        .unwrap();
    assert_eq!(out[0].0, alone.0);

    // Make row 1's third greedy token its EOS: the row stops there, row 0 is unaffected.
    let mut eos_vlm = vlm.clone();
    eos_vlm.tokenizer = None;
    eos_vlm.decoder.cfg.eos_token_id = out[1].0[2];
    let with_eos = GenerateOptions {
        stop_at_eos: true,
        ..opts.clone()
    };
    let stopped = eos_vlm
        .generate_ids_batch(&batch, &with_eos, &mut |_| true)
        .unwrap();
    assert_eq!(stopped[1].0, out[1].0[..2].to_vec());
    assert_eq!(stopped[1].1, StopReason::Eos);

    let mut steps = 0;
    let cut = vlm
        .generate_ids_batch(&batch, &opts, &mut |_| {
            steps += 1;
            steps < 4
        })
        .unwrap();
    assert_eq!(cut[1].0.len(), 4);
    assert_eq!(cut[1].1, StopReason::Callback);
    assert_eq!(cut[0].1, StopReason::MaxTokens);
}

/// A cache allocated once at its capacity and written in place gives the logits of a cache grown
/// by appending (<= 1e-5 over a prefill and 6 steps), holds exactly its capacity, and refuses a
/// step beyond it with an error naming both sizes.
#[test]
fn preallocated_cache_equals_grown_cache() {
    let vlm = load("hybrid");
    let dec = &vlm.decoder;
    let (rows, _) = prompts();
    let prompt = &rows[0];
    let steps = 6;
    let capacity = prompt.len() + steps;
    let mut fixed = dec
        .cache_for(capacity, vec![0], DType::F32, &Device::Cpu)
        .unwrap();
    let mut grown = dec.new_cache();
    let mut input = dec.embed(&ids_tensor(prompt)).unwrap();
    for step in 0..steps {
        let a = dec.forward_last(&input, &mut fixed).unwrap();
        let b = dec
            .forward(&input, &mut grown, &Capture::none(), &mut Captured::new())
            .unwrap();
        let b_last = b.get(0).unwrap().get(b.dim(1).unwrap() - 1).unwrap();
        let diff = max_abs_diff(&a.squeeze(0).unwrap(), &b_last);
        assert!(diff <= 1e-5, "step {step}: logits differ by {diff}");
        let next = b_last.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        input = dec.embed(&ids_tensor(&[next as i64])).unwrap();
    }
    assert_eq!(fixed.bytes(), vlm.cache_bytes(1, capacity));
    // One more position fits (the capacity counts the last token), a second one does not.
    dec.forward_last(&input, &mut fixed).unwrap();
    let err = dec
        .forward_last(&input, &mut fixed)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("holds {capacity} positions")),
        "{err}"
    );
}

/// Random weights build the same architecture as the checkpoint (same names, shapes and
/// parameter count) for a teacher and a hybrid, deterministically on the CPU, with finite logits.
#[test]
fn random_models_have_the_checkpoint_architecture() {
    let config = fixture("teacher").join("config.json");
    let teacher = load("teacher");
    let opts = RandomModelOptions {
        config: config.to_str().unwrap().into(),
        dtype: "f32".into(),
        ..Default::default()
    };
    let random = random_model(&opts, &Device::Cpu).unwrap();
    let shapes = |v: &Vlm| -> Vec<(String, Vec<usize>)> {
        let mut s: Vec<_> = v
            .named_tensors()
            .into_iter()
            .map(|(k, t)| (k, t.dims().to_vec()))
            .collect();
        s.sort();
        s
    };
    assert_eq!(shapes(&random), shapes(&teacher));

    let hybrid_opts = RandomModelOptions {
        mamba_layers: vec![1, 3],
        seed: 7,
        ..opts.clone()
    };
    let a = random_model(&hybrid_opts, &Device::Cpu).unwrap();
    let b = random_model(&hybrid_opts, &Device::Cpu).unwrap();
    assert_eq!(a.mamba_layers(), &[1, 3]);
    let ids = vec![vec![1i64, 5, 9, 11]];
    let (la, _) = a.forward(&ids, None, &Capture::none()).unwrap();
    let (lb, _) = b.forward(&ids, None, &Capture::none()).unwrap();
    assert_eq!(max_abs_diff(&la, &lb), 0.0, "same seed, same model");
    let finite = la.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(finite.iter().all(|x| x.is_finite()));
    let (lt, _) = random.forward(&ids, None, &Capture::none()).unwrap();
    assert!(
        max_abs_diff(&la, &lt) > 0.0,
        "the Mamba layers change the output"
    );

    let err = random_model(
        &RandomModelOptions {
            config: "no-such-model".into(),
            ..Default::default()
        },
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("no-such-model") && err.contains("tinyllava-3.1b"),
        "{err}"
    );
}

/// The full-size preset is TinyLLaVA-Phi-2-SigLIP-3.1B: Phi-2's decoder (32 layers of 32 heads x
/// 80, rotary on 32 dims, 51,200 words), SigLIP-so400m at 384 px giving 728 image tokens.
#[test]
fn full_size_preset_has_the_papers_dimensions() {
    let c = TinyLlavaConfig::tinyllava_3_1b();
    let t = &c.text_config;
    assert_eq!(
        (
            t.hidden_size,
            t.num_hidden_layers,
            t.num_attention_heads,
            t.head_dim()
        ),
        (2560, 32, 32, 80)
    );
    assert_eq!(
        (t.rotary_dim(), t.vocab_size, t.intermediate_size),
        (32, 51200, 10240)
    );
    let v = &c.vision_config;
    assert_eq!(
        (v.hidden_size, v.num_hidden_layers, v.image_size),
        (1152, 27, 384)
    );
    assert_eq!(c.image_tokens(), 728);
}

//! Hybrids built from the fixture teacher: the attention -> Mamba-2 initialisation checked element
//! by element against the teacher's weights, decoding with the mixed cache against full
//! recomputation, the upstream save format, bad inputs, and the full TinyLLaVA-3.1B shapes.

use std::collections::HashMap;

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use matvlm::config::TinyLlavaConfig;
use matvlm::model::decoder::{Capture, Captured, Mixer};
use matvlm::model::hybrid::HybridSpec;
use matvlm::model::hybrid::InitOptions;
use matvlm::model::hybrid::Placement;
use matvlm::model::mamba2::Mamba2;
use matvlm::model::phi::PhiAttention;
use matvlm::model::vlm::Vlm;

fn attention(vlm: &Vlm, layer: usize) -> PhiAttention {
    match &vlm.decoder.blocks[layer].mixer {
        Mixer::Attention(a) => a.clone(),
        Mixer::Mamba2(_) => panic!("layer {layer} is not attention"),
    }
}

fn mamba(vlm: &Vlm, layer: usize) -> Mamba2 {
    match &vlm.decoder.blocks[layer].mixer {
        Mixer::Mamba2(m) => m.clone(),
        Mixer::Attention(_) => panic!("layer {layer} is not Mamba"),
    }
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.dims() == b.dims() && max_abs_diff(a, b) == 0.0
}

#[test]
fn init_from_attention_copies_exactly_what_the_method_says() {
    let t = teacher();
    let h = t.hybrid(&HybridSpec::ratio(0.5)).unwrap();
    assert_eq!(h.layer_kinds(), vec!["mamba", "attn", "mamba", "attn"]);
    assert_eq!(h.mamba_layers(), vec![0, 2]);
    for layer in [0, 2] {
        let a = attention(&t, layer);
        let m = mamba(&h, layer);
        let c = &m.cfg;
        assert_eq!(
            (c.d_state, c.n_heads, c.n_groups, c.d_inner),
            (20, 4, 4, 80)
        );
        let w = &m.in_proj.weight;
        let (di, gs) = (c.d_inner, c.n_groups * c.d_state);
        assert!(
            same(&w.narrow(0, di, di).unwrap(), &a.v_proj.weight),
            "x <- v_proj"
        );
        assert!(
            same(&w.narrow(0, 2 * di, gs).unwrap(), &a.k_proj.weight),
            "B <- k_proj"
        );
        assert!(
            same(&w.narrow(0, 2 * di + gs, gs).unwrap(), &a.q_proj.weight),
            "C <- q_proj"
        );
        assert!(
            same(&m.out_proj.weight, &a.dense.weight),
            "out_proj <- dense"
        );
        assert!(
            m.in_proj.bias.is_none() && m.out_proj.bias.is_none(),
            "no biases carried"
        );
        let d: Vec<f32> = m.d.to_vec1().unwrap();
        assert!(d.iter().all(|&x| x == 1.0), "D = 1");
        let norm: Vec<f32> = m.norm_weight.to_vec1().unwrap();
        assert!(norm.iter().all(|&x| x == 1.0), "norm weight = 1");
        let a_log: Vec<f32> = m.a_log.to_vec1().unwrap();
        assert!(
            a_log
                .iter()
                .all(|&x| (0.0..=16f32.ln() + 1e-6).contains(&x)),
            "A_log = log U(1,16)"
        );
        let dt_bias: Vec<f32> = m.dt_bias.to_vec1().unwrap();
        for b in dt_bias {
            let dt = (1.0 + (b as f64).exp()).ln(); // softplus
            assert!(
                (1e-4 - 1e-9..=0.1 + 1e-6).contains(&dt),
                "dt {dt} outside [1e-4, 0.1]"
            );
        }
    }
    // Everything else is the teacher's own tensors.
    let (tn, hn): (HashMap<_, _>, HashMap<_, _>) = (
        t.named_tensors().into_iter().collect(),
        h.named_tensors().into_iter().collect(),
    );
    for (k, v) in &hn {
        if !k.contains(".mamba.") {
            assert!(same(v, &tn[k]), "{k} changed");
        }
    }
    for k in tn.keys() {
        let replaced = k.starts_with("language_model.model.layers.0.self_attn")
            || k.starts_with("language_model.model.layers.2.self_attn");
        assert_eq!(hn.contains_key(k), !replaced, "{k}");
    }
}

#[test]
fn random_parts_are_seeded_and_switches_work() {
    let t = teacher();
    let spec = |init: InitOptions| HybridSpec {
        placement: Placement::Explicit(vec![1]),
        init,
        mamba: None,
    };
    let a = mamba(&t.hybrid(&spec(InitOptions::default())).unwrap(), 1);
    let b = mamba(&t.hybrid(&spec(InitOptions::default())).unwrap(), 1);
    for ((k, x), (_, y)) in a.named_tensors().iter().zip(b.named_tensors().iter()) {
        assert!(
            same(x, y),
            "{k} differs between two builds with the same seed"
        );
    }
    let c = mamba(
        &t.hybrid(&spec(InitOptions {
            seed: 1,
            ..Default::default()
        }))
        .unwrap(),
        1,
    );
    assert!(
        !same(&a.conv_weight, &c.conv_weight),
        "another seed, another conv init"
    );
    let att = attention(&t, 1);
    let di = 80;
    // The random baseline copies nothing.
    let r = mamba(&t.hybrid(&spec(InitOptions::random(0))).unwrap(), 1);
    assert!(!same(
        &r.in_proj.weight.narrow(0, di, di).unwrap(),
        &att.v_proj.weight
    ));
    assert!(!same(&r.out_proj.weight, &att.dense.weight));
    // Each copy can be switched off on its own.
    let no_x = mamba(
        &t.hybrid(&spec(InitOptions {
            copy_x: false,
            ..Default::default()
        }))
        .unwrap(),
        1,
    );
    assert!(!same(
        &no_x.in_proj.weight.narrow(0, di, di).unwrap(),
        &att.v_proj.weight
    ));
    assert!(same(
        &no_x.in_proj.weight.narrow(0, 2 * di, di).unwrap(),
        &att.k_proj.weight
    ));
    // Carrying biases: in_proj gets q/k/v biases in the C/B/x rows, out_proj the dense bias.
    let biased = mamba(
        &t.hybrid(&spec(InitOptions {
            carry_biases: true,
            ..Default::default()
        }))
        .unwrap(),
        1,
    );
    let ib = biased.in_proj.bias.as_ref().unwrap();
    assert!(same(
        &ib.narrow(0, di, di).unwrap(),
        att.v_proj.bias.as_ref().unwrap()
    ));
    assert!(same(
        &ib.narrow(0, 3 * di, di).unwrap(),
        att.q_proj.bias.as_ref().unwrap()
    ));
    assert!(same(
        biased.out_proj.bias.as_ref().unwrap(),
        att.dense.bias.as_ref().unwrap()
    ));
}

/// Prefill then single steps through the mixed cache (KV for attention, conv + SSM state for
/// Mamba) give the same logits as recomputing the whole sequence each time.
#[test]
fn mixed_cache_decoding_equals_full_recomputation() {
    let r = reference("teacher", "reference.safetensors");
    let mut spec = HybridSpec::ratio(0.5);
    // A small chunk so the prompt crosses chunk boundaries in prefill.
    let mut cfg = matvlm::model::mamba2::Mamba2Config::from_attention(80, 4, 20);
    cfg.chunk_size = 16;
    spec.mamba = Some(cfg);
    let h = teacher().hybrid(&spec).unwrap();
    let dec = &h.decoder;
    let mut ids = ids_i64(&r["text_prompt_ids"]);
    let (generated, cache) = greedy_decode_checked(dec, &ids, 6);
    ids.extend(&generated);
    // The cache of a hybrid is smaller than the teacher's for the same sequence.
    let teacher_cache = {
        let t = teacher();
        let mut c = t.decoder.new_cache();
        let e = t.decoder.embed(&ids_tensor(&ids)).unwrap();
        t.decoder
            .forward(&e, &mut c, &Capture::none(), &mut Captured::new())
            .unwrap();
        c.bytes()
    };
    assert_eq!(teacher_cache, teacher().cache_bytes(1, ids.len()));
    assert_eq!(cache.bytes(), h.cache_bytes(1, ids.len() - 1));
}

#[test]
fn hybrid_save_load_round_trip_is_bit_exact() {
    let h = teacher().hybrid(&HybridSpec::ratio(0.25)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    h.save(dir.path(), DType::F32, None).unwrap();
    let file: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("mamba_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(file["attn_layers"], serde_json::json!([1, 2, 3]));
    assert_eq!(file["n_layer"], 4);
    let back = Vlm::load(dir.path().to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(back.layer_kinds(), vec!["mamba", "attn", "attn", "attn"]);
    let b: HashMap<String, Tensor> = back.named_tensors().into_iter().collect();
    for (k, t) in h.named_tensors() {
        assert!(same(&t, &b[&k]), "{k} changed in the round trip");
    }
    // Half precision round trip: bf16 on disk, loaded as bf16, equal to the cast.
    let dir16 = tempfile::tempdir().unwrap();
    h.save(dir16.path(), DType::BF16, None).unwrap();
    let back16 = Vlm::load(dir16.path().to_str().unwrap(), DType::BF16, &Device::Cpu).unwrap();
    let b16: HashMap<String, Tensor> = back16.named_tensors().into_iter().collect();
    for (k, t) in h.named_tensors() {
        assert!(
            same(&t.to_dtype(DType::BF16).unwrap(), &b16[&k]),
            "{k} (bf16)"
        );
    }
}

#[test]
fn bad_hybrid_inputs_are_clear_errors() {
    let t = teacher();
    let err = t.hybrid(&HybridSpec::layers(vec![0, 7])).unwrap_err();
    assert!(
        err.to_string().contains("layer id 7 is out of range"),
        "{err}"
    );
    let err = t.hybrid(&HybridSpec::ratio(0.3)).unwrap_err();
    assert!(err.to_string().contains("not a whole number"), "{err}");

    let h = t.hybrid(&HybridSpec::ratio(0.5)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    h.save(dir.path(), DType::F32, None).unwrap();
    let path = dir.path().join("mamba_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["attn_layers"] = serde_json::json!([0, 1, 3]);
    std::fs::write(&path, v.to_string()).unwrap();
    let err = Vlm::load(dir.path().to_str().unwrap(), DType::F32, &Device::Cpu).unwrap_err();
    assert!(
        err.to_string()
            .contains("lists layer 0 in attn_layers, but the weights hold a Mamba"),
        "{err}"
    );
    v["attn_layers"] = serde_json::json!([1, 3, 9]);
    std::fs::write(&path, v.to_string()).unwrap();
    let err = Vlm::load(dir.path().to_str().unwrap(), DType::F32, &Device::Cpu).unwrap_err();
    assert!(
        err.to_string()
            .contains("attention layer 9 is out of range"),
        "{err}"
    );
}

/// The full TinyLLaVA-Phi-2-SigLIP-3.1B shapes, with no weights in memory: parameter counts and
/// cache bytes of the teacher and of the MaTVLM hybrids (printed; run with --nocapture).
#[test]
fn full_size_parameter_and_cache_budget() {
    let cfg: TinyLlavaConfig =
        serde_json::from_str(r#"{"text_config": {}, "vision_config": {}}"#).unwrap();
    assert_eq!(cfg.image_tokens(), 728);
    let build = |mamba: Option<(Vec<usize>, matvlm::model::mamba2::Mamba2Config)>| {
        let (vlm, shapes) = matvlm::model::shapes::ShapeRecorder::record(DType::BF16, |vb| {
            let n = cfg.text_config.num_hidden_layers;
            let plan = match &mamba {
                Some((l, c)) => matvlm::model::hybrid::LayerPlan::hybrid(n, l, c.clone())?,
                None => matvlm::model::hybrid::LayerPlan::attention(n),
            };
            Vlm::from_var_builder_with_plan(
                vb,
                cfg.clone(),
                None,
                matvlm::image::ImagePreprocessor::siglip(384),
                "full-size shapes",
                &plan,
            )
        })
        .unwrap();
        (vlm, matvlm::model::shapes::parameter_count(&shapes))
    };
    let (teacher, teacher_params) = build(None);
    assert_eq!(teacher.parameter_count(), teacher_params);
    let mixer = matvlm::model::mamba2::Mamba2Config::from_attention(2560, 32, 80);
    assert_eq!(mixer.in_proj_dim(), 10272);
    let teacher_token = teacher.cache_bytes(1, 2) - teacher.cache_bytes(1, 1);
    assert_eq!(
        teacher_token,
        32 * 2 * 2560 * 2,
        "bf16 K and V of 32 layers"
    );
    println!("teacher: {teacher_params} parameters, {teacher_token} cache bytes per token (bf16)");
    for ratio in [0.125, 0.25, 0.5] {
        let layers = matvlm::model::hybrid::placement::upstream_layers(ratio, 32).unwrap();
        let (h, params) = build(Some((layers.clone(), mixer.clone())));
        assert_eq!(h.mamba_layers(), layers);
        let per_token = h.cache_bytes(1, 2) - h.cache_bytes(1, 1);
        let fixed = h.cache_bytes(1, 0);
        let at_1024 = h.cache_bytes(1, 1024) as f64 / teacher.cache_bytes(1, 1024) as f64;
        println!(
            "hybrid {ratio}: {params} parameters ({:+}), {per_token} cache bytes per token, \
             {fixed} bytes of Mamba state, cache at 1024 tokens = {at_1024:.3} x teacher",
            params as i64 - teacher_params as i64
        );
        assert_eq!(per_token, (32 - layers.len()) * 2 * 2560 * 2);
        assert_eq!(fixed, layers.len() * (7680 * 4 + 32 * 80 * 80) * 4);
    }
}

/// The upstream-layout hybrid fixture (scripts/fixtures/make_hybrid_fixtures.py: HF Phi with
/// layers 0 and 2 replaced by the mamba_ssm reference mixer, params perturbed away from the init)
/// loads as a hybrid and matches the reference: f32 logits and hidden states <= 1e-4, the Mamba
/// layers' mixer outputs and final conv / SSM states <= 1e-5, greedy ids identical (the greedy run
/// decodes through the mixed cache).
#[test]
fn upstream_hybrid_fixture_matches_the_reference() {
    let r = reference("hybrid", "reference.safetensors");
    let h = Vlm::load(
        fixture("hybrid").to_str().unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(h.layer_kinds(), vec!["mamba", "attn", "mamba", "attn"]);
    let cfg = h.mamba_config().unwrap();
    assert_eq!((cfg.head_dim, cfg.d_state, cfg.chunk_size), (20, 20, 16));

    let embeds = r["image_inputs_embeds"].unsqueeze(0).unwrap();
    let mut cache = h.new_cache();
    let mut captured = Captured::new();
    let capture = Capture {
        hidden: true,
        mixer: true,
        ..Capture::default()
    };
    let logits = h
        .decoder
        .forward(&embeds, &mut cache, &capture, &mut captured)
        .unwrap()
        .squeeze(0)
        .unwrap();
    for i in 0..4 {
        let ours = captured[&format!("layers.{i}.output")].squeeze(0).unwrap();
        let diff = max_abs_diff(&ours, &r["image_decoder_hidden_states"].get(i + 1).unwrap());
        assert!(diff <= 1e-4, "layer {i} output differs by {diff}");
    }
    let diff = max_abs_diff(&logits, &r["image_logits"]);
    assert!(diff <= 1e-4, "image logits differ by {diff}");
    // The Mamba layers on their own: the mixer's output (before the MLP and the residual are
    // added) and the states it leaves, as README states, within 1e-5 of mamba_ssm's maths.
    for layer in [0usize, 2] {
        let ours = captured[&format!("layers.{layer}.mixer_output")]
            .squeeze(0)
            .unwrap();
        let diff = max_abs_diff(&ours, &r[&format!("image_mixer_out_layer{layer}")]);
        assert!(diff <= 1e-5, "layer {layer} mixer output differs by {diff}");
        let matvlm::model::cache::LayerCache::Mamba(Some(state)) = &cache.layers[layer] else {
            panic!("layer {layer} has no Mamba state");
        };
        let conv = state.conv.squeeze(0).unwrap();
        let ssm = state.ssm.squeeze(0).unwrap();
        let diff = max_abs_diff(&conv, &r[&format!("image_conv_state_layer{layer}")]);
        assert!(diff <= 1e-5, "layer {layer} conv state differs by {diff}");
        let diff = max_abs_diff(&ssm, &r[&format!("image_ssm_state_layer{layer}")]);
        assert!(diff <= 1e-5, "layer {layer} SSM state differs by {diff}");
    }

    let (logits, _) = h
        .forward(&[ids_i64(&r["text_prompt_ids"])], None, &Default::default())
        .unwrap();
    let diff = max_abs_diff(&logits.squeeze(0).unwrap(), &r["text_logits"]);
    assert!(diff <= 1e-4, "text logits differ by {diff}");

    let opts = matvlm::generate::GenerateOptions {
        max_new_tokens: 8,
        stop_at_eos: false,
        ..Default::default()
    };
    let (out, _) = h
        .generate_ids(&ids_i64(&r["text_prompt_ids"]), None, &opts, &mut |_| true)
        .unwrap();
    let out: Vec<i64> = out.into_iter().map(i64::from).collect();
    assert_eq!(out, ids_i64(&r["text_greedy_ids"]));
    // With the image: the vision side is the teacher's, so its reference pixels apply.
    let pixels = &reference("teacher", "reference.safetensors")["pixel_values"];
    let (out, _) = h
        .generate_ids(
            &ids_i64(&r["image_prompt_ids"]),
            Some(pixels),
            &opts,
            &mut |_| true,
        )
        .unwrap();
    let out: Vec<i64> = out.into_iter().map(i64::from).collect();
    assert_eq!(out, ids_i64(&r["image_greedy_ids"]));
}

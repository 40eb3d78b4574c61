//! The implicit attention of a Mamba-2 mixer checked against its own scan, and every figure
//! written as a valid PNG and SVG.
// The plots take a list of highlighted spans; a list of one span is what these tests mean.
#![allow(clippy::single_range_in_vec_init)]

use crate::common::*;
use candle_core::{DType, Device, Tensor, D};
use matvlm::model::hybrid::HybridSpec;
use matvlm::model::mamba2::{implicit_attention, ssd, state_norms, Mamba2, Mamba2Config};
use matvlm::tokenize::{single_turn_prompt, IMAGE_TOKEN};
use matvlm::viz::*;

/// A small mixer with grouped B/C (4 heads, 2 groups) and a chunk smaller than the sequence, so
/// the chunked scan crosses chunk boundaries.
fn small_mixer(dtype: DType, seed: u64) -> Mamba2 {
    let mut cfg = Mamba2Config::new(16, 4, 8, 6, 2);
    cfg.chunk_size = 5;
    // Larger steps than the default init, so the decay matters over 13 tokens.
    cfg.dt_min = 0.05;
    cfg.dt_max = 0.5;
    Mamba2::random(&cfg, dtype, &Device::Cpu, seed).unwrap()
}

/// `M x + D x` per head, against the mixer's SSD output before gating and norm.
fn check_reconstruction(dtype: DType, tol: f64) {
    let m = small_mixer(dtype, 7);
    let len = 13;
    let x = Tensor::randn(0f32, 1.0, (1, len, 16), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let p = m.project(&x, None).unwrap();
    let (y_ssd, _) = ssd::chunked(
        &p.x,
        &p.dt,
        &m.a().unwrap(),
        &p.b,
        &p.c,
        Some(&m.d),
        m.cfg.chunk_size,
        None,
    )
    .unwrap();
    let mat = implicit_attention(&m, &x).unwrap();
    assert_eq!(mat.dims(), &[4, len, len]);
    let xh =
        p.x.squeeze(0)
            .unwrap()
            .transpose(0, 1)
            .unwrap()
            .contiguous()
            .unwrap(); // [H, T, P]
    let xh = xh.to_dtype(mat.dtype()).unwrap();
    let d =
        m.d.to_dtype(mat.dtype())
            .unwrap()
            .reshape((4, 1, 1))
            .unwrap();
    let y = (mat.matmul(&xh).unwrap() + xh.broadcast_mul(&d).unwrap()).unwrap();
    let want = y_ssd
        .squeeze(0)
        .unwrap()
        .transpose(0, 1)
        .unwrap()
        .to_dtype(mat.dtype())
        .unwrap();
    let scale = max_abs_diff(&want, &want.zeros_like().unwrap());
    let err = max_abs_diff(&y, &want);
    assert!(scale > 1e-3, "degenerate test output (max |y| = {scale})");
    assert!(
        err <= tol * scale,
        "{dtype:?}: |Mx + Dx - ssd| = {err}, max |y| = {scale}"
    );
    // Causal: nothing above the diagonal.
    let upper = mat
        .broadcast_mul(&Tensor::triu2(len, mat.dtype(), &Device::Cpu).unwrap())
        .unwrap()
        .broadcast_sub(
            &mat.broadcast_mul(&Tensor::eye(len, mat.dtype(), &Device::Cpu).unwrap())
                .unwrap(),
        )
        .unwrap();
    assert_eq!(max_abs_diff(&upper, &upper.zeros_like().unwrap()), 0.0);
}

#[test]
fn implicit_attention_times_x_plus_skip_is_the_ssd_output_f64() {
    check_reconstruction(DType::F64, 1e-10);
}

#[test]
fn implicit_attention_times_x_plus_skip_is_the_ssd_output_f32() {
    check_reconstruction(DType::F32, 1e-4);
}

#[test]
fn state_norms_end_at_the_scans_final_state() {
    let m = small_mixer(DType::F64, 11);
    let x = Tensor::randn(0f64, 1.0, (1, 9, 16), &Device::Cpu).unwrap();
    let norms = state_norms(&m, &x).unwrap();
    assert_eq!(norms.dims(), &[4, 9]);
    let (_, fin) = m.forward(&x, None).unwrap();
    // Frobenius norm of the state the chunked scan ends with.
    let want = fin
        .ssm
        .sqr()
        .unwrap()
        .sum((2, 3))
        .unwrap()
        .sqrt()
        .unwrap()
        .squeeze(0)
        .unwrap();
    let last = norms.narrow(1, 8, 1).unwrap().squeeze(1).unwrap();
    assert!(max_abs_diff(&last, &want) < 1e-10, "{last} vs {want}");
    // Bad input shapes are refused with the shape named.
    let err = implicit_attention(
        &m,
        &Tensor::zeros((2, 3, 16), DType::F64, &Device::Cpu).unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("[2, 3, 16]"), "{err}");
}

#[test]
fn attention_vs_ssm_on_the_fixture_teacher_and_its_hybrid() {
    let t = teacher();
    let h = t.hybrid(&HybridSpec::ratio(0.5)).unwrap();
    let image = fixture("teacher").join("test_image.png");
    let data = attention_vs_ssm_prompt(&t, &h, "What is in the picture?", Some(&image), 2).unwrap();
    let tok = t.tokenizer().unwrap();
    let row = tok
        .encode_prompt(&single_turn_prompt("What is in the picture?", true))
        .unwrap();
    let pixels = t.pixel_values(&image).unwrap();
    let n_img = t.encode_images(&pixels).unwrap().dim(1).unwrap();
    let len = row.len() - 1 + n_img;
    let heads = t.decoder.cfg.num_attention_heads;
    assert_eq!(data.teacher_attention.dims(), &[heads, len, len]);
    assert_eq!(data.implicit_attention.dims(), &[heads, len, len]);
    assert_eq!(data.state_norms.dims(), &[heads, len]);
    let marker = row.iter().position(|&t| t == IMAGE_TOKEN).unwrap();
    assert_eq!(data.image_spans, vec![marker..marker + n_img]);
    // Softmax rows sum to one.
    let sums = data.teacher_attention.sum(D::Minus1).unwrap();
    assert!(max_abs_diff(&sums, &sums.ones_like().unwrap()) < 1e-4);

    // Layer 1 of the hybrid is attention: refused, naming the Mamba layers.
    let err = attention_vs_ssm(&t, &h, &row, Some(&pixels), 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("[0, 2]"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let written = save_attention_vs_ssm(&data, dir.path(), "layer2").unwrap();
    assert_eq!(written.len(), 4);
    for p in &written {
        match p.extension().unwrap().to_str().unwrap() {
            "png" => {
                check_png(p);
            }
            _ => check_svg(p, "Layer 2"),
        }
    }
}

/// Attention maps of a long sequence with many heads (block-averaged), a state-norm plot with
/// more heads than legend entries, and both in SVG.
#[test]
fn maps_and_state_norms_of_many_heads_and_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (heads, len) = (12, 300);
    let scores = Tensor::randn(0f32, 2.0, (heads, len, len), &Device::Cpu).unwrap();
    let mask = Tensor::tril2(len, DType::F32, &Device::Cpu).unwrap();
    let neg = ((mask.ones_like().unwrap() - &mask).unwrap() * -1e9).unwrap();
    let attn = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&neg).unwrap()).unwrap();
    let implicit = (scores.broadcast_mul(&mask).unwrap() * 0.1).unwrap();
    for ext in ["png", "svg"] {
        let p = dir.path().join(format!("maps.{ext}"));
        plot_attention_maps(
            &attn,
            &implicit,
            &[20..120],
            "Synthetic maps",
            &MapStyle::default(),
            &p,
        )
        .unwrap();
        if ext == "png" {
            let (w, h) = check_png(&p);
            assert!(w > 800 && h > 800, "{w}x{h}");
        } else {
            check_svg(&p, "Synthetic maps");
        }
        let norms = Tensor::rand(0f32, 5.0, (20, len), &Device::Cpu).unwrap();
        let p = dir.path().join(format!("norms.{ext}"));
        plot_state_norms(&norms, &[20..120], "Synthetic norms", &p).unwrap();
        if ext == "png" {
            check_png(&p);
        } else {
            check_svg(&p, "Synthetic norms");
        }
    }
    // Mismatched token counts and spans outside the sequence are refused.
    let short = attn.narrow(1, 0, 10).unwrap().narrow(2, 0, 10).unwrap();
    let p = dir.path().join("bad.png");
    assert!(plot_attention_maps(&attn, &short, &[], "x", &MapStyle::default(), &p).is_err());
    assert!(
        plot_attention_maps(&attn, &implicit, &[290..310], "x", &MapStyle::default(), &p).is_err()
    );
    assert!(plot_attention_maps(
        &attn,
        &implicit,
        &[],
        "x",
        &MapStyle::default(),
        &dir.path().join("x.jpg")
    )
    .is_err());
    assert!(!p.exists());
}

#[test]
fn loss_curves_from_metrics_files_and_bars() {
    let dir = tempfile::tempdir().unwrap();
    // Two runs in the trainer's metrics.jsonl format, with an eval line in between.
    for (run, scale) in [("run_a", 1.0), ("run_b", 0.5)] {
        let d = dir.path().join(run);
        std::fs::create_dir_all(&d).unwrap();
        let mut text = String::new();
        for step in 1..=40 {
            let loss = scale * 10.0 / step as f64;
            text.push_str(
                &serde_json::json!({"kind": "train", "step": step, "loss": loss, "lr": 1e-3, "kl": loss / 2.0})
                    .to_string(),
            );
            text.push('\n');
            if step % 10 == 0 {
                text.push_str(
                    &serde_json::json!({"kind": "eval", "step": step, "accuracy": 0.5}).to_string(),
                );
                text.push('\n');
            }
        }
        std::fs::write(d.join("metrics.jsonl"), text).unwrap();
    }
    let a = dir.path().join("run_a");
    let s = read_metric_series(&a, "train", "loss", "a").unwrap();
    assert_eq!(s.points.len(), 40);
    assert_eq!(s.points[3], (4.0, 2.5));
    let e = read_metric_series(&a.join("metrics.jsonl"), "eval", "accuracy", "a").unwrap();
    assert_eq!(e.points.len(), 4);
    assert!(read_metric_series(&a, "train", "nope", "a").is_err());

    let b = dir.path().join("run_b");
    for ext in ["png", "svg"] {
        let p = dir.path().join(format!("loss.{ext}"));
        plot_runs(
            &[("run a", &a), ("run b", &b)],
            &["loss", "kl"],
            "Distillation loss",
            &p,
        )
        .unwrap();
        if ext == "png" {
            check_png(&p);
        } else {
            check_svg(&p, "run b: kl");
        }
        let p = dir.path().join(format!("bars.{ext}"));
        let bars = vec![
            ("ratio 0.125".to_string(), 0.71),
            ("ratio 0.25".to_string(), 0.64),
            ("ratio 0.5".to_string(), 0.52),
        ];
        plot_bars(&bars, "Accuracy by Mamba ratio", "accuracy", &p).unwrap();
        if ext == "png" {
            check_png(&p);
        } else {
            check_svg(&p, "ratio 0.25");
        }
    }
    assert!(plot_bars(&[], "empty", "y", &dir.path().join("e.png")).is_err());
    assert!(plot_bars(
        &[("nan".into(), f64::NAN)],
        "nan",
        "y",
        &dir.path().join("n.png")
    )
    .is_err());
}

//! Vision side of the teacher against HF transformers: image preprocessing, the SigLIP tower and
//! the connector, on the tiny checkpoint of `tests/fixtures/teacher` (made by
//! `scripts/fixtures/make_teacher_fixtures.py`, which also wrote the reference outputs).

use std::collections::HashMap;
use std::path::PathBuf;

use crate::common::{fixture, max_abs_diff};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use matvlm::checkpoint::{load_safetensors, CheckpointFiles};
use matvlm::config::{PreprocessorConfig, TinyLlavaConfig};
use matvlm::image::{load_image, ImagePreprocessor};
use matvlm::io::read_json;
use matvlm::model::connector::Connector;
use matvlm::model::siglip::SiglipVisionTower;
use matvlm::Error;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Features and connector outputs must match HF to this (f32 everywhere).
const TOL: f64 = 1e-4;
/// One step of the 8-bit input after normalisation with std 0.5: (1/255) / 0.5.
const PIXEL_STEP: f64 = 2.0 / 255.0;
/// The resize reproduces PIL's bicubic exactly, so only the f32 rounding of
/// `(x / 255 - 0.5) / 0.5` may differ (HF rescales in f64). A tenth of a step is far below any
/// resize discrepancy (the `image` crate's Catmull-Rom was 3 steps off on this image).
const PIXEL_TOL: f64 = 1e-6;

fn dir() -> PathBuf {
    fixture("teacher")
}

fn reference() -> HashMap<String, Tensor> {
    crate::common::reference("teacher", "reference.safetensors")
}

fn config() -> TinyLlavaConfig {
    TinyLlavaConfig::from_file(&dir().join("config.json")).expect("config.json")
}

fn weights() -> VarBuilder<'static> {
    CheckpointFiles::from_dir(&dir())
        .expect("checkpoint files")
        .var_builder(DType::F32, &Device::Cpu)
        .expect("var builder")
}

fn tower_vb(vb: &VarBuilder<'static>) -> VarBuilder<'static> {
    vb.pp("vision_tower").pp("_vision_tower").pp("vision_model")
}

fn load_tower(cfg: &TinyLlavaConfig) -> SiglipVisionTower {
    let layers = cfg.vision_layers_used().expect("layers used");
    SiglipVisionTower::load(tower_vb(&weights()), &cfg.vision_config, layers).expect("tower")
}

#[test]
fn config_describes_the_fixture() -> TestResult {
    let cfg = config();
    let notes: serde_json::Value = read_json(&dir().join("reference.json"))?;
    assert_eq!(cfg.model_type, "tinyllava");
    assert_eq!(cfg.connector_type, "mlp2x_gelu");
    assert_eq!(cfg.image_token_index, -200);
    assert_eq!(cfg.text_config.hidden_size, 80);
    assert_eq!(cfg.text_config.head_dim(), 20);
    assert_eq!(cfg.text_config.rotary_dim(), 8);
    assert_eq!(cfg.vision_config.hidden_size, 48);
    assert_eq!(cfg.vision_config.num_patches(), 16);
    assert_eq!(
        cfg.image_tokens(),
        notes["image_tokens"].as_u64().unwrap() as usize
    );
    assert_eq!(
        cfg.vision_layers_used()?,
        notes["vision_layers_used"].as_u64().unwrap() as usize
    );
    assert_eq!(
        cfg.text_config.vocab_size,
        notes["model_vocab_size"].as_u64().unwrap() as usize
    );
    Ok(())
}

#[test]
fn pixel_values_match_hf() -> TestResult {
    let pre_cfg: PreprocessorConfig = read_json(&dir().join("preprocessor_config.json"))?;
    let pre = ImagePreprocessor::from_config(&pre_cfg)?;
    assert_eq!(pre, ImagePreprocessor::siglip(32));

    let img = load_image(&dir().join("test_image.png"))?;
    assert_eq!((img.width(), img.height()), (45, 37));
    let ours = pre.preprocess(&img, &Device::Cpu, DType::F32)?;
    let theirs = reference()["pixel_values"].squeeze(0)?;
    assert_eq!(ours.dims(), &[3, 32, 32]);

    let d = max_abs_diff(&ours, &theirs);
    println!(
        "pixel values: max diff {d:e} ({:.1e} steps of 1/255)",
        d / PIXEL_STEP
    );
    assert!(d <= PIXEL_TOL, "pixel values: max diff {d}");

    // Crops that make the resize enlarge one axis or both.
    let r = reference();
    let mut crops = 0;
    for (key, theirs) in r
        .iter()
        .filter(|(k, _)| k.starts_with("pixel_values_crop_"))
    {
        // pixel_values_crop_{left}_{top}_{w}x{h}
        let spec: Vec<u32> = key["pixel_values_crop_".len()..]
            .split(['_', 'x'])
            .map(|v| v.parse().expect("crop spec"))
            .collect();
        let crop = img.crop_imm(spec[0], spec[1], spec[2], spec[3]);
        let ours = pre.preprocess(&crop, &Device::Cpu, DType::F32)?;
        let d = max_abs_diff(&ours, &theirs.squeeze(0)?);
        println!("{key}: max diff {d:e}");
        assert!(d <= PIXEL_TOL, "{key}: max diff {d}");
        crops += 1;
    }
    assert_eq!(crops, 2, "the fixture records two crops");

    // A batch is the same images stacked.
    let flipped = img.fliph();
    let batch = pre.preprocess_batch(&[img, flipped.clone()], &Device::Cpu, DType::F32)?;
    assert_eq!(batch.dims(), &[2, 3, 32, 32]);
    assert_eq!(max_abs_diff(&batch.get(0)?, &ours), 0.0);
    let single = pre.preprocess(&flipped, &Device::Cpu, DType::F32)?;
    assert_eq!(max_abs_diff(&batch.get(1)?, &single), 0.0);
    Ok(())
}

#[test]
fn vision_tower_matches_hf_hidden_states() -> TestResult {
    let cfg = config();
    let tower = load_tower(&cfg);
    let r = reference();
    let pixels = &r["pixel_values"];
    let hf_states = &r["vision_hidden_states"];

    let states = tower.forward_hidden_states(pixels)?;
    assert_eq!(states.len(), tower.layers_used() + 1);
    for (i, s) in states.iter().enumerate() {
        let d = max_abs_diff(&s.squeeze(0)?, &hf_states.get(i)?);
        println!("vision hidden state {i}: max diff {d:e}");
        assert!(d <= TOL, "vision hidden state {i}: max diff {d}");
    }

    let feats = tower.features(pixels, &cfg.vision_feature_select_strategy)?;
    assert_eq!(feats.dims(), &[1, cfg.image_tokens(), 48]);
    let d = max_abs_diff(&feats, &r["vision_features"]);
    println!("vision features: max diff {d:e}");
    assert!(d <= TOL, "vision features: max diff {d}");

    // `cls_patch` keeps the first token; unknown strategies are errors.
    let all = tower.features(pixels, "cls_patch")?;
    assert_eq!(all.dim(1)?, cfg.vision_config.num_patches());
    assert!(matches!(
        tower.features(pixels, "cls"),
        Err(Error::Invalid(m)) if m.contains("cls")
    ));
    Ok(())
}

#[test]
fn connector_matches_hf() -> TestResult {
    let cfg = config();
    let r = reference();
    let vb = weights().pp("connector").pp("_connector");
    let conn = Connector::load(vb, &cfg.connector_type, 48, cfg.text_config.hidden_size)?;
    let out = conn.forward(&r["vision_features"])?;
    let d = max_abs_diff(&out, &r["connector_out"]);
    println!("connector: max diff {d:e}");
    assert!(d <= TOL, "connector: max diff {d}");

    let names: Vec<String> = conn.named_tensors().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["0.weight", "0.bias", "2.weight", "2.bias"]);
    Ok(())
}

#[test]
fn batched_images_give_per_image_results() -> TestResult {
    let cfg = config();
    let tower = load_tower(&cfg);
    let pixels = reference()["pixel_values"].clone();
    let other = pixels.flip(&[3])?.affine(0.5, 0.1)?;
    let batch = Tensor::cat(&[&pixels, &other], 0)?;
    let both = tower.features(&batch, "patch")?;
    for (i, single) in [&pixels, &other].into_iter().enumerate() {
        let alone = tower.features(single, "patch")?;
        let d = max_abs_diff(&both.get(i)?, &alone.squeeze(0)?);
        assert!(d <= 1e-5, "image {i} of the batch differs by {d}");
    }
    Ok(())
}

#[test]
fn tower_is_differentiable_and_tracked_path_agrees() -> TestResult {
    // With a tracked input, LayerNorm and softmax take their composed (differentiable) forms;
    // the result must still be HF's, and gradients must reach the pixels.
    let cfg = config();
    let tower = load_tower(&cfg);
    let r = reference();
    let pixels = Var::from_tensor(&r["pixel_values"])?;
    let feats = tower.features(pixels.as_tensor(), "patch")?;
    let d = max_abs_diff(&feats, &r["vision_features"]);
    assert!(d <= TOL, "tracked path: max diff {d}");

    let grads = feats.sqr()?.sum_all()?.backward()?;
    let g = grads
        .get(pixels.as_tensor())
        .expect("gradient for the pixels");
    assert_eq!(g.dims(), pixels.dims());
    let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
    assert!(norm.is_finite() && norm > 0.0, "gradient norm {norm}");

    // Directional derivative against a central finite difference.
    let dir = g.affine(1.0 / norm.sqrt() as f64, 0.0)?;
    let loss = |x: &Tensor| -> f64 {
        let f = tower.features(x, "patch").unwrap();
        f.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let eps = 1e-2;
    let plus = loss(&(pixels.as_tensor() + dir.affine(eps, 0.0)?)?);
    let minus = loss(&(pixels.as_tensor() - dir.affine(eps, 0.0)?)?);
    let numeric = (plus - minus) / (2.0 * eps);
    let analytic = norm.sqrt() as f64;
    let rel = (numeric - analytic).abs() / analytic.abs();
    assert!(
        rel < 1e-2,
        "gradient {analytic} vs finite difference {numeric}"
    );
    Ok(())
}

#[test]
fn tower_loads_only_the_layers_it_needs() -> TestResult {
    // A checkpoint cut down to the embeddings and the layers used (no last layer, no
    // post_layernorm, no head) still loads; asking for one layer more names the missing key.
    let cfg = config();
    let used = cfg.vision_layers_used()?;
    let prefix = "vision_tower._vision_tower.vision_model.";
    let mut kept = HashMap::new();
    for file in CheckpointFiles::from_dir(&dir())?.weights {
        for (name, t) in load_safetensors(&file, &Device::Cpu)? {
            let Some(rest) = name.strip_prefix(prefix) else {
                continue;
            };
            let needed = rest.starts_with("embeddings.")
                || (0..used).any(|i| rest.starts_with(&format!("encoder.layers.{i}.")));
            if needed {
                kept.insert(rest.to_string(), t);
            }
        }
    }
    let vb = VarBuilder::from_tensors(kept, DType::F32, &Device::Cpu);
    let tower = SiglipVisionTower::load(vb.clone(), &cfg.vision_config, used)?;
    let d = max_abs_diff(
        &tower.forward(&reference()["pixel_values"])?,
        &reference()["vision_hidden_states"]
            .get(used)?
            .unsqueeze(0)?,
    );
    assert!(d <= TOL);
    assert_eq!(
        tower.named_tensors().len(),
        3 + 16 * used,
        "embeddings (3) + 16 tensors per layer"
    );

    match SiglipVisionTower::load(vb, &cfg.vision_config, used + 1) {
        Err(Error::MissingKey { key, .. }) => {
            assert!(key.contains(&format!("encoder.layers.{used}.")), "{key}")
        }
        other => panic!("expected MissingKey, got {other:?}"),
    }
    Ok(())
}

#[test]
fn tower_rejects_bad_inputs_and_configs() -> TestResult {
    let cfg = config();
    let tower = load_tower(&cfg);
    for shape in [vec![3, 32, 32], vec![1, 3, 32, 40], vec![1, 1, 32, 32]] {
        let x = Tensor::zeros(shape.clone(), DType::F32, &Device::Cpu)?;
        match tower.forward(&x) {
            Err(Error::Invalid(m)) => assert!(m.contains("[batch, 3, 32, 32]"), "{m}"),
            other => panic!("shape {shape:?}: expected Invalid, got {other:?}"),
        }
    }
    let too_many = cfg.vision_config.num_hidden_layers + 1;
    assert!(matches!(
        SiglipVisionTower::load(tower_vb(&weights()), &cfg.vision_config, too_many),
        Err(Error::Invalid(_))
    ));
    let mut bad_act = cfg.vision_config.clone();
    bad_act.hidden_act = "swiglu9".into();
    assert!(matches!(
        SiglipVisionTower::load(tower_vb(&weights()), &bad_act, 1),
        Err(Error::UnknownActivation(a)) if a == "swiglu9"
    ));
    Ok(())
}

#[test]
fn unknown_connector_is_an_error() {
    for name in ["mlp2x_relu", "resampler", "mlp0x_gelu", "qformer", ""] {
        let vb = weights().pp("connector").pp("_connector");
        match Connector::load(vb, name, 48, 80) {
            Err(Error::UnknownConnector(n)) => {
                assert_eq!(n, name);
                let msg = Error::UnknownConnector(n).to_string();
                assert!(msg.contains(&format!("`{name}`")), "{msg}");
            }
            other => panic!("{name}: expected UnknownConnector, got {other:?}"),
        }
    }
}

#[test]
fn connector_shape_mismatch_names_the_key() {
    // The fixture connector is 48 -> 80; claiming 64 inputs must fail on `0.weight`.
    let vb = weights().pp("connector").pp("_connector");
    match Connector::load(vb, "mlp2x_gelu", 64, 80) {
        Err(Error::ShapeMismatch { key, .. }) => {
            assert!(key.contains("_connector.0.weight"), "{key}")
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

#[test]
fn linear_and_deeper_mlp_connectors() -> TestResult {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (2, 5, 6), &dev)?;
    let w = |o: usize, i: usize| Tensor::randn(0f32, 0.5, (o, i), &dev).unwrap();
    let b = |o: usize| Tensor::randn(0f32, 0.5, o, &dev).unwrap();
    // Independent reference: plain matmuls and the GELU written with erf.
    let affine = |x: &Tensor, w: &Tensor, b: &Tensor| -> Tensor {
        x.broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(b)
            .unwrap()
    };
    let gelu = |x: &Tensor| -> Tensor {
        let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let g: Vec<f32> = v
            .iter()
            .map(|&x| 0.5 * x * (1.0 + erf(x as f64 / std::f64::consts::SQRT_2) as f32))
            .collect();
        Tensor::from_vec(g, x.dims(), &dev).unwrap()
    };

    // linear: weight and bias directly under the prefix.
    let (w0, b0) = (w(4, 6), b(4));
    let ts = HashMap::from([
        ("weight".to_string(), w0.clone()),
        ("bias".to_string(), b0.clone()),
    ]);
    let conn = Connector::load(
        VarBuilder::from_tensors(ts, DType::F32, &dev),
        "linear",
        6,
        4,
    )?;
    assert!(max_abs_diff(&conn.forward(&x)?, &affine(&x, &w0, &b0)) <= 1e-5);
    let names: Vec<String> = conn.named_tensors().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["weight", "bias"]);

    // mlp3x_gelu: Linears at 0, 2, 4.
    let (w2, b2, w4, b4) = (w(4, 4), b(4), w(4, 4), b(4));
    let ts = HashMap::from([
        ("0.weight".to_string(), w0.clone()),
        ("0.bias".to_string(), b0.clone()),
        ("2.weight".to_string(), w2.clone()),
        ("2.bias".to_string(), b2.clone()),
        ("4.weight".to_string(), w4.clone()),
        ("4.bias".to_string(), b4.clone()),
    ]);
    let conn = Connector::load(
        VarBuilder::from_tensors(ts, DType::F32, &dev),
        "mlp3x_gelu",
        6,
        4,
    )?;
    let expected = affine(
        &gelu(&affine(&gelu(&affine(&x, &w0, &b0)), &w2, &b2)),
        &w4,
        &b4,
    );
    let d = max_abs_diff(&conn.forward(&x)?, &expected);
    assert!(d <= 1e-5, "mlp3x_gelu: max diff {d}");
    assert_eq!(conn.named_tensors().len(), 6);
    assert_eq!(conn.connector_type(), "mlp3x_gelu");
    Ok(())
}

/// erf from its Maclaurin series, saturated beyond |x| = 4 (where 1 - |erf| < 2e-8).
fn erf(x: f64) -> f64 {
    if x.abs() > 4.0 {
        return x.signum();
    }
    let mut term = x;
    let mut sum = x;
    for n in 1..200 {
        term *= -x * x / n as f64;
        let add = term / (2 * n + 1) as f64;
        sum += add;
        if add.abs() < 1e-17 {
            break;
        }
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

#[test]
fn unreadable_images_are_bad_image_errors() -> TestResult {
    let tmp = std::env::temp_dir().join(format!("matvlm-vision-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let fake = tmp.join("notes.png");
    std::fs::write(&fake, "this is a text file, not a picture\n")?;
    let missing = tmp.join("nowhere.png");
    for path in [&fake, &missing] {
        match load_image(path) {
            Err(e @ Error::BadImage { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&path.display().to_string()), "{msg}");
            }
            other => panic!("{}: expected BadImage, got {other:?}", path.display()),
        }
    }
    // A real PNG under a misleading extension still loads (format guessed from content).
    let renamed = tmp.join("picture.jpg");
    std::fs::copy(dir().join("test_image.png"), &renamed)?;
    assert_eq!(load_image(&renamed)?.width(), 45);
    std::fs::remove_dir_all(&tmp)?;
    Ok(())
}

//! The Mamba-2 mixer against upstream references, against itself (chunked vs sequential, prefill vs
//! decode) and against finite differences.
//!
//! Fixtures: scripts/fixtures/make_mamba2_fixtures.py, built from mamba_ssm 2.3.2.post1's pure
//! torch references (`ssd_minimal_discrete`, `rms_norm_ref`, `selective_state_update_ref`) and
//! cross-checked there against transformers' `Mamba2Mixer`.

use std::collections::HashMap;

use crate::common::{fixture, max_abs_diff, reference_json};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarBuilder;
use matvlm::model::mamba2::{naive, ssd, Mamba2, Mamba2Config, Mamba2State, Scan};

/// Max abs difference allowed between f32 results and the (f64-computed) references, on outputs
/// and final states.
const TOL_F32: f64 = 1e-5;

/// Assert `max |got - want| <= tol`; returns the difference.
fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) -> f64 {
    let diff = max_abs_diff(got, want);
    assert!(diff <= tol, "{what}: max |diff| {diff:e} > {tol:e}");
    diff
}

// ------------------------------------------------------------------------------------ fixtures

struct Fixture {
    cfg: Mamba2Config,
    lengths: Vec<usize>,
    split: usize,
    steps: usize,
    t: HashMap<String, Tensor>,
}

impl Fixture {
    fn load(name: &str) -> Self {
        let dir = fixture("mamba2");
        let meta = reference_json("mamba2", &format!("{name}.json"));
        let cfg: Mamba2Config = serde_json::from_value(meta["config"].clone()).unwrap();
        let usizes = |v: &serde_json::Value| v.as_u64().unwrap() as usize;
        let t =
            candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu)
                .unwrap();
        Fixture {
            cfg,
            lengths: meta["lengths"]
                .as_array()
                .unwrap()
                .iter()
                .map(usizes)
                .collect(),
            split: usizes(&meta["split"]),
            steps: usizes(&meta["steps"]),
            t,
        }
    }

    fn get(&self, key: &str) -> &Tensor {
        self.t
            .get(key)
            .unwrap_or_else(|| panic!("fixture lacks {key}"))
    }

    fn mixer(&self) -> Mamba2 {
        let vb = VarBuilder::from_tensors(self.t.clone(), DType::F32, &Device::Cpu);
        Mamba2::load(vb.pp("mamba"), &self.cfg).unwrap()
    }
}

fn check_fixture(name: &str) {
    let fx = Fixture::load(name);
    let m = fx.mixer();
    let input = fx.get("input");
    let mut worst: f64 = 0.0;
    let mut check = |what: String, got: &Tensor, want: &Tensor| {
        worst = worst.max(assert_close(&what, got, want, TOL_F32));
    };
    for &n in &fx.lengths {
        for scan in [Scan::Chunked, Scan::Naive] {
            let (y, st) = m
                .forward_with(&input.narrow(1, 0, n).unwrap(), None, scan)
                .unwrap();
            let what = format!("{name} L={n} {scan:?}");
            check(format!("{what} output"), &y, fx.get(&format!("out_{n}")));
            check(
                format!("{what} conv state"),
                &st.conv,
                fx.get(&format!("conv_state_{n}")),
            );
            check(
                format!("{what} ssm state"),
                &st.ssm,
                fx.get(&format!("ssm_state_{n}")),
            );
            assert_eq!(st.ssm.dtype(), DType::F32);
        }
    }

    // A prefill that continues from the states of an earlier one.
    let total = input.dim(1).unwrap();
    let (_, st) = m
        .forward(&input.narrow(1, 0, fx.split).unwrap(), None)
        .unwrap();
    let (y, st) = m
        .forward(
            &input.narrow(1, fx.split, total - fx.split).unwrap(),
            Some(&st),
        )
        .unwrap();
    check(format!("{name} continued output"), &y, fx.get("cont_out"));
    check(
        format!("{name} continued conv state"),
        &st.conv,
        fx.get("cont_conv_state"),
    );
    check(
        format!("{name} continued ssm state"),
        &st.ssm,
        fx.get("cont_ssm_state"),
    );

    // Decoding after the full prefill.
    let (_, mut st) = m.forward(input, None).unwrap();
    let steps_in = fx.get("step_input");
    let steps_out = fx.get("step_out");
    for i in 0..fx.steps {
        let y = m.step(&steps_in.get(i).unwrap(), &mut st).unwrap();
        check(
            format!("{name} decode step {i}"),
            &y,
            &steps_out.get(i).unwrap(),
        );
    }
    check(
        format!("{name} decode conv state"),
        &st.conv,
        fx.get("step_conv_state"),
    );
    check(
        format!("{name} decode ssm state"),
        &st.ssm,
        fx.get("step_ssm_state"),
    );
    eprintln!("{name}: worst max |diff| against the references {worst:e} (tolerance {TOL_F32:e})");
}

/// Two groups of two heads, expand 2, lengths 5, 8 and 19 with chunk 8.
#[test]
fn matches_upstream_references_groups() {
    check_fixture("groups2");
}

/// One group per head (MaTVLM's layout), projection biases, no conv bias, d_conv 3, a dt clamp.
#[test]
fn matches_upstream_references_heads_with_dt_limit() {
    check_fixture("heads_limit");
}

// ------------------------------------------------------------------------------- self-consistency

/// A tiny config with lively dynamics (dt up to 1, so states decay visibly within a chunk).
fn tiny_config(n_groups: usize) -> Mamba2Config {
    let mut cfg = Mamba2Config::new(12, 4, 4, 5, n_groups);
    cfg.chunk_size = 8;
    cfg.dt_min = 0.05;
    cfg.dt_max = 1.0;
    cfg
}

fn randn(shape: &[usize], dtype: DType, seed: u64) -> Tensor {
    // Deterministic pseudo-random values without a device RNG: a hashed counter in [-1, 1).
    let n: usize = shape.iter().product();
    let vals: Vec<f64> = (0..n as u64)
        .map(|i| {
            let mut z = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ seed.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect();
    Tensor::from_vec(vals, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Prefill n tokens, decode k more one by one: the same outputs and states as prefilling n + k.
#[test]
fn prefill_then_decode_equals_longer_prefill() {
    for groups in [2, 4] {
        let cfg = tiny_config(groups);
        let m = Mamba2::random(&cfg, DType::F32, &Device::Cpu, 7).unwrap();
        let k = 5;
        for n in [0, 1, cfg.chunk_size, cfg.chunk_size + 3] {
            let x = randn(&[2, n + k, cfg.d_model], DType::F32, n as u64);
            let (want, want_state) = m.forward(&x, None).unwrap();
            let mut state = if n == 0 {
                Mamba2State::zeros(&cfg, 2, &Device::Cpu).unwrap()
            } else {
                let (y, s) = m.forward(&x.narrow(1, 0, n).unwrap(), None).unwrap();
                assert_close("prefix", &y, &want.narrow(1, 0, n).unwrap(), TOL_F32);
                s
            };
            for i in n..n + k {
                let y = m
                    .step(&x.narrow(1, i, 1).unwrap().squeeze(1).unwrap(), &mut state)
                    .unwrap();
                let what = format!("groups {groups}, n {n}: decode token {i}");
                assert_close(
                    &what,
                    &y,
                    &want.narrow(1, i, 1).unwrap().squeeze(1).unwrap(),
                    TOL_F32,
                );
            }
            assert_close("conv state", &state.conv, &want_state.conv, TOL_F32);
            assert_close("ssm state", &state.ssm, &want_state.ssm, TOL_F32);
        }
    }
}

/// Splitting a prefill anywhere (inside a chunk, at a boundary, shorter than d_conv) changes nothing.
#[test]
fn chained_prefills_equal_one_prefill() {
    let cfg = tiny_config(2);
    let m = Mamba2::random(&cfg, DType::F32, &Device::Cpu, 3).unwrap();
    let x = randn(&[1, 29, cfg.d_model], DType::F32, 99);
    let (want, want_state) = m.forward(&x, None).unwrap();
    for cuts in [vec![2, 29], vec![8, 16, 29], vec![3, 14, 15, 29]] {
        let mut state: Option<Mamba2State> = None;
        let mut outs = vec![];
        let mut start = 0;
        for &end in &cuts {
            let (y, s) = m
                .forward(&x.narrow(1, start, end - start).unwrap(), state.as_ref())
                .unwrap();
            outs.push(y);
            state = Some(s);
            start = end;
        }
        let got = Tensor::cat(&outs, 1).unwrap();
        assert_close(&format!("cuts {cuts:?}"), &got, &want, TOL_F32);
        let state = state.unwrap();
        assert_close("ssm state", &state.ssm, &want_state.ssm, TOL_F32);
        assert_close("conv state", &state.conv, &want_state.conv, TOL_F32);
    }
}

/// The chunked scan equals the sequential recurrence for lengths below, at and above the chunk,
/// with and without an initial state; in f64 the agreement is to rounding.
#[test]
fn chunked_scan_equals_sequential_recurrence() {
    let (b, h, p, g, n, q) = (2, 4, 3, 2, 5, 8);
    for dtype in [DType::F64, DType::F32] {
        let tol = if dtype == DType::F64 { 1e-12 } else { TOL_F32 };
        for len in [1, 7, 8, 9, 16, 23] {
            let x = randn(&[b, len, h, p], dtype, 1);
            // dt in (0, 2), A in [-4, -0.5]: decays from mild to strong.
            let dt = (randn(&[b, len, h], dtype, 2) + 1.0).unwrap();
            let a = (randn(&[h], dtype, 3).affine(1.75, -2.25)).unwrap();
            let bm = randn(&[b, len, g, n], dtype, 4);
            let cm = randn(&[b, len, g, n], dtype, 5);
            let d = randn(&[h], dtype, 6);
            let init = randn(&[b, h, p, n], dtype, 7);
            for initial in [None, Some(&init)] {
                let (y1, s1) = ssd::chunked(&x, &dt, &a, &bm, &cm, Some(&d), q, initial).unwrap();
                let (y2, s2) = naive::scan(&x, &dt, &a, &bm, &cm, Some(&d), initial).unwrap();
                let what = format!("{dtype:?} L={len} initial={}", initial.is_some());
                assert_close(&format!("{what} y"), &y1, &y2, tol);
                assert_close(&format!("{what} state"), &s1, &s2, tol);
            }
        }
    }
}

/// The packed entry the mixer calls (x, B, C side by side, as its conv output has them) is the
/// scan of the three blocks, gate included, and its gradient is theirs side by side; a packed
/// tensor of the wrong width is refused with the arithmetic in the message.
#[test]
fn packed_scan_is_the_scan_of_its_blocks() {
    use matvlm::model::mamba2::fused;
    let (b, len, h, p, g, n, q) = (2, 11, 4, 3, 2, 5, 4);
    let xbc = Var::from_tensor(&randn(&[b, len, h * p + 2 * g * n], DType::F32, 1)).unwrap();
    let dt = (randn(&[b, len, h], DType::F32, 2) + 1.0).unwrap();
    let a = randn(&[h], DType::F32, 3).affine(1.75, -2.25).unwrap();
    let d = randn(&[h], DType::F32, 4);
    let z = randn(&[b, len, h, p], DType::F32, 5);
    let init = randn(&[b, h, p, n], DType::F32, 6);
    let w = randn(&[b, len, h, p], DType::F32, 7);
    let (y, s) = fused::chunked_scan_packed(
        xbc.as_tensor(),
        (h, p, g, n),
        &dt,
        &a,
        Some(&d),
        Some(&z),
        q,
        Some(&init),
    )
    .unwrap();

    let t = xbc.as_tensor();
    let x = Var::from_tensor(
        &t.narrow(2, 0, h * p)
            .unwrap()
            .reshape((b, len, h, p))
            .unwrap(),
    )
    .unwrap();
    let bm = Var::from_tensor(
        &t.narrow(2, h * p, g * n)
            .unwrap()
            .reshape((b, len, g, n))
            .unwrap(),
    )
    .unwrap();
    let cm = Var::from_tensor(
        &t.narrow(2, h * p + g * n, g * n)
            .unwrap()
            .reshape((b, len, g, n))
            .unwrap(),
    )
    .unwrap();
    let (y2, s2) = fused::chunked_scan(
        x.as_tensor(),
        &dt,
        &a,
        bm.as_tensor(),
        cm.as_tensor(),
        Some(&d),
        Some(&z),
        q,
        Some(&init),
    )
    .unwrap();
    assert_close("packed y", &y, &y2, 1e-6);
    assert_close("packed state", &s, &s2, 1e-6);

    let g1 = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (y2 * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let flat = |v: &Var, cols: usize| {
        g2.get(v.as_tensor())
            .unwrap()
            .reshape((b, len, cols))
            .unwrap()
    };
    let want = Tensor::cat(&[flat(&x, h * p), flat(&bm, g * n), flat(&cm, g * n)], 2).unwrap();
    assert_close(
        "packed gradient",
        g1.get(xbc.as_tensor()).unwrap(),
        &want,
        1e-6,
    );

    let narrow = t.narrow(2, 0, h * p + 2 * g * n - 1).unwrap();
    let err = fused::chunked_scan_packed(&narrow, (h, p, g, n), &dt, &a, Some(&d), None, q, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("31 channels") && err.contains("= 32"), "{err}");
}

/// Half-precision inputs: the scan runs and keeps its state in f32, and lands close to f32.
#[test]
fn half_precision_scan_accumulates_in_f32() {
    let (b, len, h, p, g, n) = (1, 40, 4, 8, 2, 8);
    let x = randn(&[b, len, h, p], DType::F32, 11);
    let dt = randn(&[b, len, h], DType::F32, 12)
        .affine(0.1, 0.12)
        .unwrap();
    let a = (randn(&[h], DType::F32, 13) - 2.0).unwrap();
    let bm = randn(&[b, len, g, n], DType::F32, 14);
    let cm = randn(&[b, len, g, n], DType::F32, 15);
    let (want, want_state) = ssd::chunked(&x, &dt, &a, &bm, &cm, None, 16, None).unwrap();
    for half in [DType::BF16, DType::F16] {
        let cast = |t: &Tensor| t.to_dtype(half).unwrap();
        let (y, s) = ssd::chunked(
            &cast(&x),
            &cast(&dt),
            &cast(&a),
            &cast(&bm),
            &cast(&cm),
            None,
            16,
            None,
        )
        .unwrap();
        assert_eq!(y.dtype(), half);
        assert_eq!(s.dtype(), DType::F32, "the state accumulates in f32");
        // Only the inputs were rounded to half: errors stay at the inputs' precision.
        let scale = max_abs_diff(&want, &want.zeros_like().unwrap());
        assert_close(&format!("{half:?} y"), &y, &want, 3e-2 * scale);
        assert_close(&format!("{half:?} state"), &s, &want_state, 3e-2 * scale);
    }
}

// ------------------------------------------------------------------------------------ gradients

/// The parameters of a tiny f64 mixer with every optional bias present and an initial state.
fn grad_setup(
    dt_limit: Option<(f64, f64)>,
) -> (Mamba2Config, HashMap<String, Tensor>, Tensor, Mamba2State) {
    let mut cfg = Mamba2Config::new(5, 2, 3, 4, 1);
    cfg.chunk_size = 4;
    cfg.d_conv = 3;
    cfg.in_proj_bias = true;
    cfg.out_proj_bias = true;
    cfg.dt_min = 0.1;
    cfg.dt_max = 1.0;
    cfg.dt_limit = dt_limit;
    let mut params = Mamba2::init_tensors(&cfg, DType::F64, &Device::Cpu, 5).unwrap();
    // Move D and the norm weight off their constant init so their gradients are generic.
    params.insert("D".into(), (randn(&[2], DType::F64, 21) + 1.0).unwrap());
    params.insert(
        "norm.weight".into(),
        randn(&[6], DType::F64, 22).affine(0.3, 1.0).unwrap(),
    );
    let x = randn(&[2, 10, cfg.d_model], DType::F64, 23); // 2 full chunks + 2
    let state = Mamba2State {
        conv: (randn(&[2, cfg.conv_dim(), cfg.d_conv], DType::F64, 24) * 0.5).unwrap(),
        ssm: (randn(&[2, 2, 3, 4], DType::F64, 25) * 0.5).unwrap(),
        constants: None,
    };
    (cfg, params, x, state)
}

/// A scalar that depends on every output and on the final SSM state.
fn grad_loss(m: &Mamba2, x: &Tensor, state: &Mamba2State) -> Tensor {
    let (y, s) = m.forward(x, Some(state)).unwrap();
    let wy = randn(y.dims(), DType::F64, 31);
    let ws = randn(s.ssm.dims(), DType::F64, 32);
    ((y * wy).unwrap().sum_all().unwrap() + (s.ssm * ws).unwrap().sum_all().unwrap()).unwrap()
}

/// Every parameter's and the input's gradient matches central differences (rel. error <= 1e-3).
#[test]
fn gradients_match_finite_differences() {
    check_gradients(None);
}

/// The same with a dt clamp that some steps hit on either side.
#[test]
fn gradients_match_finite_differences_with_dt_limit() {
    check_gradients(Some((0.15, 0.3)));
}

fn check_gradients(dt_limit: Option<(f64, f64)>) {
    let (cfg, params, x, state) = grad_setup(dt_limit);
    if let Some((lo, hi)) = dt_limit {
        // The clamp must actually bite, on both sides, for this test to mean something.
        let mut free = cfg.clone();
        free.dt_limit = None;
        let raw = Mamba2::from_tensors(params.clone(), &free).unwrap();
        let dt: Vec<f64> = raw
            .project(&x, None)
            .unwrap()
            .dt
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            dt.iter().any(|&d| d < lo) && dt.iter().any(|&d| d > hi),
            "{dt:?}"
        );
        assert!(dt.iter().any(|&d| d > lo && d < hi), "{dt:?}");
    }
    let vars: HashMap<String, Var> = params
        .iter()
        .map(|(k, v)| (k.clone(), Var::from_tensor(v).unwrap()))
        .collect();
    let x_var = Var::from_tensor(&x).unwrap();
    let m = Mamba2::from_tensors(
        vars.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect(),
        &cfg,
    )
    .unwrap();
    let grads = grad_loss(&m, x_var.as_tensor(), &state).backward().unwrap();

    let loss_with = |name: &str, value: &Tensor| -> f64 {
        let (m, x) = if name == "input" {
            (
                Mamba2::from_tensors(params.clone(), &cfg).unwrap(),
                value.clone(),
            )
        } else {
            let mut p = params.clone();
            p.insert(name.to_string(), value.clone());
            (Mamba2::from_tensors(p, &cfg).unwrap(), x.clone())
        };
        grad_loss(&m, &x, &state).to_scalar::<f64>().unwrap()
    };

    let mut names: Vec<String> = params.keys().cloned().collect();
    names.sort();
    names.push("input".into());
    assert_eq!(
        names.len(),
        11,
        "all 8 checkpoint tensors, 2 biases and the input"
    );
    let eps = 1e-6;
    for name in &names {
        let (base, analytic) = if name == "input" {
            (x.clone(), grads.get(x_var.as_tensor()).unwrap().clone())
        } else {
            let v = vars[name].as_tensor();
            (
                v.clone(),
                grads
                    .get(v)
                    .unwrap_or_else(|| panic!("no gradient for {name}"))
                    .clone(),
            )
        };
        let shape = base.dims().to_vec();
        let flat: Vec<f64> = base.flatten_all().unwrap().to_vec1().unwrap();
        let analytic: Vec<f64> = analytic.flatten_all().unwrap().to_vec1().unwrap();
        let mut worst: f64 = 0.0;
        for i in 0..flat.len() {
            let probe = |delta: f64| {
                let mut v = flat.clone();
                v[i] += delta;
                loss_with(
                    name,
                    &Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap(),
                )
            };
            let numeric = (probe(eps) - probe(-eps)) / (2.0 * eps);
            let rel =
                (numeric - analytic[i]).abs() / numeric.abs().max(analytic[i].abs()).max(1e-4);
            worst = worst.max(rel);
        }
        let norm: f64 = analytic.iter().map(|g| g * g).sum::<f64>().sqrt();
        assert!(norm > 0.0, "{name}: gradient is identically zero");
        assert!(worst <= 1e-3, "{name}: worst relative error {worst:e}");
    }
}

// ------------------------------------------------------------------------------- API and errors

#[test]
fn config_from_attention_is_the_phi2_hybrid_shape() {
    let cfg = Mamba2Config::from_attention(2560, 32, 80);
    assert_eq!(
        (
            cfg.d_inner,
            cfg.n_heads,
            cfg.head_dim,
            cfg.d_state,
            cfg.n_groups
        ),
        (2560, 32, 80, 80, 32)
    );
    assert_eq!((cfg.d_conv, cfg.chunk_size, cfg.conv_bias), (4, 256, true));
    assert!(!cfg.in_proj_bias && !cfg.out_proj_bias);
    assert_eq!(cfg.in_proj_dim(), 10272);
    assert_eq!(cfg.conv_dim(), 7680);
    assert_eq!(cfg.norm_group(), 80);
    cfg.validate().unwrap();
    let json = serde_json::to_string(&cfg).unwrap();
    let back: Mamba2Config = serde_json::from_str(&json).unwrap();
    assert_eq!(back, cfg);

    let state = Mamba2State::zeros(&cfg, 1, &Device::Cpu).unwrap();
    assert_eq!(state.conv.dims(), &[1, 7680, 4]);
    assert_eq!(state.ssm.dims(), &[1, 32, 80, 80]);
    assert_eq!(state.bytes(), (7680 * 4 + 32 * 80 * 80) * 4);

    let mut bad = cfg.clone();
    bad.n_groups = 3;
    assert!(bad.validate().is_err(), "32 heads cannot form 3 groups");
    let mut bad = cfg;
    bad.head_dim = 81;
    assert!(bad.validate().is_err(), "heads * head_dim must be d_inner");
}

#[test]
fn named_tensors_round_trip_with_checkpoint_names() {
    let cfg = tiny_config(2);
    let m = Mamba2::random(&cfg, DType::F32, &Device::Cpu, 1).unwrap();
    let named = m.named_tensors();
    let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "in_proj.weight",
            "conv1d.weight",
            "conv1d.bias",
            "dt_bias",
            "A_log",
            "D",
            "norm.weight",
            "out_proj.weight"
        ]
    );
    let back = Mamba2::from_tensors(named.into_iter().collect(), &cfg).unwrap();
    let x = randn(&[1, 5, cfg.d_model], DType::F32, 4);
    let (y1, _) = m.forward(&x, None).unwrap();
    let (y2, _) = back.forward(&x, None).unwrap();
    assert_close("reloaded", &y1, &y2, 0.0);

    // Upstream's init: A in [1, 16], D = 1, dt = softplus(dt_bias) inside [dt_min, dt_max].
    let a = m.a().unwrap().to_vec1::<f32>().unwrap();
    assert!(a.iter().all(|&a| (-16.0..=-1.0).contains(&a)), "{a:?}");
    let dt = ssd::softplus(&m.dt_bias).unwrap().to_vec1::<f32>().unwrap();
    assert!(
        dt.iter()
            .all(|&d| (0.05 * 0.999..=1.0 * 1.001).contains(&d)),
        "{dt:?}"
    );
}

#[test]
fn empty_sequence_keeps_the_state() {
    let cfg = tiny_config(2);
    let m = Mamba2::random(&cfg, DType::F32, &Device::Cpu, 1).unwrap();
    let (_, st) = m
        .forward(&randn(&[1, 3, cfg.d_model], DType::F32, 2), None)
        .unwrap();
    let (y, st2) = m
        .forward(
            &Tensor::zeros((1, 0, cfg.d_model), DType::F32, &Device::Cpu).unwrap(),
            Some(&st),
        )
        .unwrap();
    assert_eq!(y.dims(), &[1, 0, cfg.d_model]);
    assert_close("ssm", &st2.ssm, &st.ssm, 0.0);
    assert_close("conv", &st2.conv, &st.conv, 0.0);
}

#[test]
fn bad_shapes_are_errors_naming_the_culprit() {
    let cfg = tiny_config(2);
    let m = Mamba2::random(&cfg, DType::F32, &Device::Cpu, 1).unwrap();
    let err = m
        .forward(
            &Tensor::zeros((1, 4, 7), DType::F32, &Device::Cpu).unwrap(),
            None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("[1, 4, 7]"), "{err}");
    let mut state = Mamba2State::zeros(&cfg, 2, &Device::Cpu).unwrap();
    let err = m
        .step(
            &Tensor::zeros((1, cfg.d_model), DType::F32, &Device::Cpu).unwrap(),
            &mut state,
        )
        .unwrap_err();
    assert!(err.to_string().contains("conv state"), "{err}");
    let err = m
        .forward(
            &Tensor::zeros((1, 4, cfg.d_model), DType::F64, &Device::Cpu).unwrap(),
            None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("dtype"), "{err}");

    // A checkpoint missing a tensor names it.
    let mut named: HashMap<String, Tensor> = m.named_tensors().into_iter().collect();
    named.remove("A_log");
    let err = Mamba2::from_tensors(named, &cfg).unwrap_err();
    assert!(err.to_string().contains("A_log"), "{err}");
    // A norm weight of the wrong size is caught by the load.
    let mut named: HashMap<String, Tensor> = m.named_tensors().into_iter().collect();
    named.insert(
        "norm.weight".into(),
        Tensor::ones(3, DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(Mamba2::from_tensors(named, &cfg).is_err());
}

/// The pieces are usable on their own: projection shapes and the gated norm's grouping.
#[test]
fn projection_and_norm_pieces() {
    let cfg = tiny_config(2);
    let m = Mamba2::random(&cfg, DType::F32, &Device::Cpu, 1).unwrap();
    let p = m
        .project(&randn(&[2, 6, cfg.d_model], DType::F32, 3), None)
        .unwrap();
    assert_eq!(p.x.dims(), &[2, 6, 4, 4]);
    assert_eq!(p.b.dims(), &[2, 6, 2, 5]);
    assert_eq!(p.c.dims(), &[2, 6, 2, 5]);
    assert_eq!(p.dt.dims(), &[2, 6, 4]);
    assert_eq!(p.z.dims(), &[2, 6, 16]);
    assert_eq!(p.conv_state.dims(), &[2, cfg.conv_dim(), 4]);

    // Each group of the gated norm has unit RMS before the weight (eps aside).
    let y = randn(&[3, 8], DType::F64, 8);
    let z = (randn(&[3, 8], DType::F64, 9) + 2.0).unwrap();
    let w = Tensor::ones(8, DType::F64, &Device::Cpu).unwrap();
    let out = matvlm::model::mamba2::norm::gated_rms_norm(&y, &z, &w, 4, 0.0).unwrap();
    let rms = out
        .reshape((3, 2, 4))
        .unwrap()
        .sqr()
        .unwrap()
        .mean(D::Minus1)
        .unwrap();
    assert_close(
        "group rms",
        &rms,
        &Tensor::ones((3, 2), DType::F64, &Device::Cpu).unwrap(),
        1e-12,
    );
}

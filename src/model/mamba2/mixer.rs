//! The Mamba-2 mixer: parameters in the upstream checkpoint layout, prefill, decode, state.
//!
//! `in_proj -> z | xBC | dt`; causal depthwise conv + SiLU over `xBC`; split into x (per head),
//! B and C (per group); `dt = softplus(dt + dt_bias)`; SSD scan with the `D` skip;
//! `RMSNorm_group(y * silu(z)) * w`; `out_proj`.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{compute_dtype, fused, naive, ssd, Mamba2Config};
use crate::model::layers::Linear;
use crate::{Error, Result};

/// The recurrent state of one mixer, owned by the caller (one per sequence batch and layer).
#[derive(Debug, Clone)]
pub struct Mamba2State {
    /// The last `d_conv` pre-conv `xBC` inputs, oldest first: `[B, conv_dim, d_conv]`.
    pub conv: Tensor,
    /// The SSM state `[B, n_heads, head_dim, d_state]`, f32 (f64 for an f64 model).
    pub ssm: Tensor,
    /// The parameters in the form a decode step reads them, made by the prefill that made this
    /// state when no gradient was tracked (`None` otherwise: each step then derives them).
    pub constants: Option<Arc<StepConstants>>,
}

/// What a decode step reads from the mixer's parameters, in the compute dtype (f32 for half
/// models) and contiguous, with `A = -exp(A_log)`: each is a conversion launch on the GPU, so a
/// generation makes them once, with its state, instead of once per token and layer. Tied to one
/// generation (the parameters may be trained between two).
#[derive(Debug)]
pub struct StepConstants {
    pub a: Tensor,
    pub d: Tensor,
    pub dt_bias: Tensor,
    /// `[conv_dim, 1, d_conv]`, as the checkpoint holds it.
    pub conv_weight: Tensor,
    pub conv_bias: Option<Tensor>,
    pub norm_weight: Tensor,
}

impl Mamba2State {
    /// The state before any token: zeros, f32.
    pub fn zeros(cfg: &Mamba2Config, batch: usize, device: &Device) -> Result<Self> {
        Self::zeros_for(cfg, batch, DType::F32, device)
    }

    /// Zeros in the precision a model of `dtype` keeps its state in (f32 for half models).
    pub fn zeros_for(
        cfg: &Mamba2Config,
        batch: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let cd = compute_dtype(dtype);
        Ok(Self {
            conv: Tensor::zeros((batch, cfg.conv_dim(), cfg.d_conv), cd, device)?,
            ssm: Tensor::zeros((batch, cfg.n_heads, cfg.head_dim, cfg.d_state), cd, device)?,
            constants: None,
        })
    }

    /// Memory held by the state.
    pub fn bytes(&self) -> usize {
        [&self.conv, &self.ssm]
            .iter()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// The same state cut from the autograd graph (truncated backprop through time).
    pub fn detach(&self) -> Self {
        Self {
            conv: self.conv.detach(),
            ssm: self.ssm.detach(),
            constants: self.constants.clone(),
        }
    }
}

/// Which scan a prefill uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// The chunked SSD algorithm (matmuls; the default).
    Chunked,
    /// The token-by-token recurrence (reference; slow).
    Naive,
}

/// Everything the mixer computes before the scan, per token: the inputs of the SSM.
#[derive(Debug, Clone)]
pub struct Projection {
    /// Gate `[B, L, d_inner]` (model dtype).
    pub z: Tensor,
    /// Post-conv, post-SiLU x, B and C packed `[B, L, conv_dim]`, as the scan kernels read them
    /// (`x`, `b`, `c` below are views of it).
    pub xbc: Tensor,
    /// Post-conv, post-SiLU x per head `[B, L, H, P]` (model dtype).
    pub x: Tensor,
    /// Post-conv B per group `[B, L, G, N]`.
    pub b: Tensor,
    /// Post-conv C per group `[B, L, G, N]`.
    pub c: Tensor,
    /// Step sizes after softplus (and clamp) `[B, L, H]`, compute dtype.
    pub dt: Tensor,
    /// Conv state after the last token `[B, conv_dim, d_conv]`.
    pub conv_state: Tensor,
}

/// A Mamba-2 mixer with upstream's parameter names (see [`Mamba2::named_tensors`]).
#[derive(Debug, Clone)]
pub struct Mamba2 {
    /// `[in_proj_dim, d_model]`, rows `z | x | B | C | dt`.
    pub in_proj: Linear,
    /// Depthwise taps `[conv_dim, 1, d_conv]` (torch layout).
    pub conv_weight: Tensor,
    pub conv_bias: Option<Tensor>,
    /// `[H]`, added to dt before the softplus.
    pub dt_bias: Tensor,
    /// `[H]`, `A = -exp(A_log)`.
    pub a_log: Tensor,
    /// `[H]` skip weights.
    pub d: Tensor,
    /// `[d_inner]` gated RMSNorm weight.
    pub norm_weight: Tensor,
    /// `[d_model, d_inner]`.
    pub out_proj: Linear,
    pub cfg: Mamba2Config,
}

fn config_error(e: Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl Mamba2 {
    /// Load from a `VarBuilder` positioned at the mixer's prefix (`...layers.{i}.mamba`); keys:
    /// `in_proj.weight`, `conv1d.weight`, `conv1d.bias`, `dt_bias`, `A_log`, `D`, `norm.weight`,
    /// `out_proj.weight` (plus `in_proj.bias`/`out_proj.bias` if the config has them).
    pub fn load(vb: VarBuilder, cfg: &Mamba2Config) -> candle_core::Result<Self> {
        cfg.validate().map_err(config_error)?;
        let h = cfg.n_heads;
        let in_proj = Linear::load(
            vb.pp("in_proj"),
            cfg.d_model,
            cfg.in_proj_dim(),
            cfg.in_proj_bias,
        )?;
        let conv_weight = vb.get((cfg.conv_dim(), 1, cfg.d_conv), "conv1d.weight")?;
        let conv_bias = if cfg.conv_bias {
            Some(vb.get(cfg.conv_dim(), "conv1d.bias")?)
        } else {
            None
        };
        Ok(Self {
            in_proj,
            conv_weight,
            conv_bias,
            dt_bias: vb.get(h, "dt_bias")?,
            a_log: vb.get(h, "A_log")?,
            d: vb.get(h, "D")?,
            norm_weight: vb.get(cfg.d_inner, "norm.weight")?,
            out_proj: Linear::load(
                vb.pp("out_proj"),
                cfg.d_inner,
                cfg.d_model,
                cfg.out_proj_bias,
            )?,
            cfg: cfg.clone(),
        })
    }

    /// Build from named tensors (the names of [`Mamba2::named_tensors`]), keeping the tensors
    /// themselves, so `Var`s passed in stay trainable. Dtype and device are those of
    /// `in_proj.weight`.
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        cfg: &Mamba2Config,
    ) -> candle_core::Result<Self> {
        let first =
            tensors
                .get("in_proj.weight")
                .ok_or_else(|| candle_core::Error::CannotFindTensor {
                    path: "in_proj.weight".into(),
                })?;
        let (dtype, device) = (first.dtype(), first.device().clone());
        Self::load(VarBuilder::from_tensors(tensors, dtype, &device), cfg)
    }

    /// Fresh parameters with upstream `Mamba2`'s initialisation: projections and conv as torch's
    /// default `Linear`/`Conv1d` (uniform in ±1/sqrt(fan_in), biases too), `dt_bias` the inverse
    /// softplus of dt sampled log-uniformly in `[dt_min, dt_max]` (floored at `dt_init_floor`),
    /// `A_log = log U(a_init_range)`, `D = 1`, norm weight 1. Deterministic in `seed`.
    pub fn init_tensors(
        cfg: &Mamba2Config,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<HashMap<String, Tensor>> {
        cfg.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut out = HashMap::new();
        let mut put = |name: &str, values: Vec<f64>, shape: &[usize]| -> Result<()> {
            let t = Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?;
            out.insert(name.to_string(), t);
            Ok(())
        };
        let mut uniform = |n: usize, lo: f64, hi: f64| -> Vec<f64> {
            (0..n)
                .map(|_| lo + (hi - lo) * rng.random::<f64>())
                .collect()
        };
        let (dm, di, h) = (cfg.d_model, cfg.d_inner, cfg.n_heads);
        let (ip, cd, k) = (cfg.in_proj_dim(), cfg.conv_dim(), cfg.d_conv);

        let bound = 1.0 / (dm as f64).sqrt();
        put("in_proj.weight", uniform(ip * dm, -bound, bound), &[ip, dm])?;
        if cfg.in_proj_bias {
            put("in_proj.bias", uniform(ip, -bound, bound), &[ip])?;
        }
        let bound = 1.0 / (k as f64).sqrt();
        put("conv1d.weight", uniform(cd * k, -bound, bound), &[cd, 1, k])?;
        if cfg.conv_bias {
            put("conv1d.bias", uniform(cd, -bound, bound), &[cd])?;
        }
        let (lmin, lmax) = (cfg.dt_min.ln(), cfg.dt_max.ln());
        let dt_bias = uniform(h, 0.0, 1.0)
            .into_iter()
            .map(|u| {
                let dt = (lmin + u * (lmax - lmin)).exp().max(cfg.dt_init_floor);
                // inverse softplus: dt + log(1 - exp(-dt))
                dt + (-(-dt).exp_m1()).ln()
            })
            .collect();
        put("dt_bias", dt_bias, &[h])?;
        let (alo, ahi) = cfg.a_init_range;
        let a_log = uniform(h, alo, ahi).into_iter().map(f64::ln).collect();
        put("A_log", a_log, &[h])?;
        put("D", vec![1.0; h], &[h])?;
        put("norm.weight", vec![1.0; di], &[di])?;
        let bound = 1.0 / (di as f64).sqrt();
        put(
            "out_proj.weight",
            uniform(dm * di, -bound, bound),
            &[dm, di],
        )?;
        if cfg.out_proj_bias {
            put("out_proj.bias", uniform(dm, -bound, bound), &[dm])?;
        }
        Ok(out)
    }

    /// A mixer with fresh parameters ([`Mamba2::init_tensors`]).
    pub fn random(cfg: &Mamba2Config, dtype: DType, device: &Device, seed: u64) -> Result<Self> {
        let tensors = Self::init_tensors(cfg, dtype, device, seed)?;
        Self::from_tensors(tensors, cfg)
            .map_err(|e| crate::error::classify_candle(e, "Mamba2::random"))
    }

    /// The checkpoint names and tensors of every parameter, in upstream order.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("in_proj.weight".to_string(), self.in_proj.weight.clone())];
        if let Some(b) = &self.in_proj.bias {
            out.push(("in_proj.bias".into(), b.clone()));
        }
        out.push(("conv1d.weight".into(), self.conv_weight.clone()));
        if let Some(b) = &self.conv_bias {
            out.push(("conv1d.bias".into(), b.clone()));
        }
        out.push(("dt_bias".into(), self.dt_bias.clone()));
        out.push(("A_log".into(), self.a_log.clone()));
        out.push(("D".into(), self.d.clone()));
        out.push(("norm.weight".into(), self.norm_weight.clone()));
        out.push(("out_proj.weight".into(), self.out_proj.weight.clone()));
        if let Some(b) = &self.out_proj.bias {
            out.push(("out_proj.bias".into(), b.clone()));
        }
        out
    }

    /// Dtype of the parameters (inputs must match).
    pub fn dtype(&self) -> DType {
        self.in_proj.weight.dtype()
    }

    /// `A = -exp(A_log)` per head, compute dtype.
    pub fn a(&self) -> Result<Tensor> {
        ssd::a_from_log(&self.a_log)
    }

    /// Check an input is `[batch, len, d_model]` (`forward`) or `[batch, d_model]` (`step`) in
    /// the parameters' dtype.
    fn check_input(&self, x: &Tensor, what: &str) -> Result<()> {
        let (rank, expected) = if what == "step" {
            (2, "[batch, d_model]")
        } else {
            (3, "[batch, len, d_model]")
        };
        if x.rank() != rank || x.dims()[rank - 1] != self.cfg.d_model {
            return Err(Error::Invalid(format!(
                "Mamba2::{what}: input has shape {:?}, expected {expected} with d_model = {}",
                x.dims(),
                self.cfg.d_model
            )));
        }
        if x.dtype() != self.dtype() {
            return Err(Error::Invalid(format!(
                "Mamba2::{what}: input dtype {:?} differs from the parameters' {:?}",
                x.dtype(),
                self.dtype()
            )));
        }
        Ok(())
    }

    /// Split the last dim of an `in_proj` output into `(z, xBC, dt_raw)`.
    fn split_zxbcdt(&self, t: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let last = t.rank() - 1;
        let (di, cd, h) = (self.cfg.d_inner, self.cfg.conv_dim(), self.cfg.n_heads);
        Ok((
            t.narrow(last, 0, di)?,
            t.narrow(last, di, cd)?,
            t.narrow(last, di + cd, h)?,
        ))
    }

    /// Split the last dim of a post-conv `xBC` into x per head, B and C per group.
    fn split_xbc(&self, t: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let lead = &t.dims()[..t.rank() - 1];
        let last = t.rank() - 1;
        let cfg = &self.cfg;
        let gn = cfg.n_groups * cfg.d_state;
        let shape = |a: usize, b: usize| [lead, &[a, b]].concat();
        Ok((
            t.narrow(last, 0, cfg.d_inner)?
                .reshape(shape(cfg.n_heads, cfg.head_dim))?,
            t.narrow(last, cfg.d_inner, gn)?
                .reshape(shape(cfg.n_groups, cfg.d_state))?,
            t.narrow(last, cfg.d_inner + gn, gn)?
                .reshape(shape(cfg.n_groups, cfg.d_state))?,
        ))
    }

    /// The SSM inputs of a sequence: in_proj, conv (continuing from `conv_state` if given),
    /// SiLU, split, dt discretisation. `x`: `[B, L, d_model]`.
    pub fn project(&self, x: &Tensor, conv_state: Option<&Tensor>) -> Result<Projection> {
        self.project_masked(x, conv_state, None)
    }

    /// [`Mamba2::project`] where positions with `keep = 0` (`[B, L]`) are padding: their conv
    /// input and their step size are zeroed, so they add nothing to the conv or SSM state
    /// (`dt = 0` decays by `exp(0) = 1` and adds `0 * B x`). A row left-padded this way ends in
    /// the state it would reach alone.
    fn project_masked(
        &self,
        x: &Tensor,
        conv_state: Option<&Tensor>,
        keep: Option<&Tensor>,
    ) -> Result<Projection> {
        self.check_input(x, "project")?;
        let (z, xbc, dt_raw) = self.split_zxbcdt(&self.in_proj.forward(x)?)?;
        let xbc = match keep {
            Some(k) => xbc.broadcast_mul(&k.to_dtype(xbc.dtype())?.unsqueeze(2)?)?,
            None => xbc,
        };
        let (xbc, conv_state) =
            fused::conv_silu(&xbc, &self.conv_weight, self.conv_bias.as_ref(), conv_state)?;
        let (xs, b, c) = self.split_xbc(&xbc)?;
        let dt = ssd::discretize_dt(&dt_raw, &self.dt_bias, self.cfg.dt_limit)?;
        let dt = match keep {
            Some(k) => dt.broadcast_mul(&k.to_dtype(dt.dtype())?.unsqueeze(2)?)?,
            None => dt,
        };
        Ok(Projection {
            z,
            xbc,
            x: xs,
            b,
            c,
            dt,
            conv_state,
        })
    }

    /// Prefill: run a sequence `x` (`[B, L, d_model]`) from `state` (zeros if `None`) with the
    /// chunked scan. Returns the output `[B, L, d_model]` and the state after the last token.
    pub fn forward(
        &self,
        x: &Tensor,
        state: Option<&Mamba2State>,
    ) -> Result<(Tensor, Mamba2State)> {
        self.forward_with(x, state, Scan::Chunked)
    }

    /// [`Mamba2::forward`] over left-padded rows: `keep` (`[B, L]`, 0 at padding) keeps padding
    /// out of the states (see [`Mamba2::project`]'s masked form).
    pub fn forward_masked(
        &self,
        x: &Tensor,
        state: Option<&Mamba2State>,
        keep: Option<&Tensor>,
    ) -> Result<(Tensor, Mamba2State)> {
        self.run(x, state, Scan::Chunked, keep)
    }

    /// [`Mamba2::forward`] with a choice of scan.
    pub fn forward_with(
        &self,
        x: &Tensor,
        state: Option<&Mamba2State>,
        scan: Scan,
    ) -> Result<(Tensor, Mamba2State)> {
        self.run(x, state, scan, None)
    }

    fn run(
        &self,
        x: &Tensor,
        state: Option<&Mamba2State>,
        scan: Scan,
        keep: Option<&Tensor>,
    ) -> Result<(Tensor, Mamba2State)> {
        self.check_input(x, "forward")?;
        let (batch, len, _) = x.dims3()?;
        let state_in = match state {
            Some(s) => s.clone(),
            None => Mamba2State::zeros_for(&self.cfg, batch, x.dtype(), x.device())?,
        };
        if len == 0 {
            return Ok((x.clone(), state_in));
        }
        let p = self.project_masked(x, Some(&state_in.conv), keep)?;
        let a = self.a()?;
        let (y, ssm) = match scan {
            Scan::Chunked => fused::chunked_scan_packed(
                &p.xbc,
                (
                    self.cfg.n_heads,
                    self.cfg.head_dim,
                    self.cfg.n_groups,
                    self.cfg.d_state,
                ),
                &p.dt,
                &a,
                Some(&self.d),
                None,
                self.cfg.chunk_size,
                Some(&state_in.ssm),
            )?,
            Scan::Naive => naive::scan(
                &p.x,
                &p.dt,
                &a,
                &p.b,
                &p.c,
                Some(&self.d),
                Some(&state_in.ssm),
            )?,
        };
        let y = y.reshape((batch, len, self.cfg.d_inner))?;
        let y = fused::gated_rms_norm(
            &y,
            &p.z,
            &self.norm_weight,
            self.cfg.norm_group(),
            self.cfg.norm_eps,
        )?;
        let out = self.out_proj.forward(&y)?;
        let constants = match state_in.constants {
            Some(c) => Some(c),
            None if !x.track_op() => Some(Arc::new(self.step_constants(x.dtype())?)),
            None => None,
        };
        Ok((
            out,
            Mamba2State {
                conv: p.conv_state,
                ssm,
                constants,
            },
        ))
    }

    /// Decode one token per sequence: `x` is `[B, d_model]`; `state` advances in place. With
    /// the CUDA kernels the state's buffers are updated in place, so a clone of the state taken
    /// before (which shares them) advances too: snapshot with a copy, not a clone.
    pub fn step(&self, x: &Tensor, state: &mut Mamba2State) -> Result<Tensor> {
        self.check_input(x, "step")?;
        let k = match &state.constants {
            Some(k) => k.clone(),
            None => Arc::new(self.step_constants(x.dtype())?),
        };
        let (z, xbc, dt_raw) = self.split_zxbcdt(&self.in_proj.forward(x)?)?;
        let xbc =
            fused::conv_silu_step(&xbc, &k.conv_weight, k.conv_bias.as_ref(), &mut state.conv)?;
        let (xs, b, c) = self.split_xbc(&xbc)?;
        let dt = fused::discretize_dt(&dt_raw, &k.dt_bias, self.cfg.dt_limit)?;
        let y = fused::scan_step(&xs, &dt, &k.a, &b, &c, Some(&k.d), None, &mut state.ssm)?;
        let y = y.reshape((x.dim(0)?, self.cfg.d_inner))?;
        let y = fused::gated_rms_norm(
            &y,
            &z,
            &k.norm_weight,
            self.cfg.norm_group(),
            self.cfg.norm_eps,
        )?;
        Ok(self.out_proj.forward(&y)?)
    }

    /// The parameters a decode step reads, for inputs of `dtype` (see [`StepConstants`]).
    /// Detached: a generation reads them, it does not train them.
    pub fn step_constants(&self, dtype: DType) -> Result<StepConstants> {
        let cd = compute_dtype(dtype);
        let conv = |t: &Tensor| -> Result<Tensor> { Ok(t.detach().to_dtype(cd)?.contiguous()?) };
        Ok(StepConstants {
            a: ssd::a_from_log(&self.a_log.detach())?
                .to_dtype(cd)?
                .contiguous()?,
            d: conv(&self.d)?,
            dt_bias: conv(&self.dt_bias)?,
            conv_weight: conv(&self.conv_weight)?,
            conv_bias: self.conv_bias.as_ref().map(conv).transpose()?,
            norm_weight: conv(&self.norm_weight)?,
        })
    }
}

//! Learning-rate schedules with warmup, computed as transformers' `get_*_schedule_with_warmup`
//! and `get_wsd_schedule` compute them.
//!
//! Convention (the HF Trainer's): the optimiser step with 0-based index `s` uses
//! `base_lr * factor(s)`. With a warmup the very first step therefore runs at lr 0 when
//! warmup > 0, exactly as in HF training runs.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The shape of a warmup or decay ramp (transformers' `warmup_type` / `decay_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ramp {
    #[serde(rename = "linear")]
    Linear,
    #[serde(rename = "cosine")]
    Cosine,
    #[serde(rename = "1-sqrt")]
    OneMinusSqrt,
}

/// A schedule kind. Every kind has a linear warmup from 0 (WSD: from `min_lr_ratio`, with a
/// chosen ramp) over the warmup steps given to [`Schedule`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// `get_constant_schedule_with_warmup`.
    Constant,
    /// `get_linear_schedule_with_warmup`: linear decay to 0 at the last step.
    Linear,
    /// `get_cosine_schedule_with_warmup`; with `min_lr_ratio` > 0,
    /// `get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=...)`.
    Cosine {
        #[serde(default = "half")]
        num_cycles: f64,
        #[serde(default)]
        min_lr_ratio: f64,
    },
    /// Warmup-stable-decay, `get_wsd_schedule`: warmup, a constant stretch, then a decay over the
    /// last `decay_steps` steps (or `round(decay_fraction * total)` when `decay_steps` is unset).
    Wsd {
        #[serde(default)]
        decay_steps: Option<usize>,
        #[serde(default = "tenth")]
        decay_fraction: f64,
        #[serde(default = "linear")]
        warmup_type: Ramp,
        #[serde(default = "cosine")]
        decay_type: Ramp,
        #[serde(default)]
        min_lr_ratio: f64,
        #[serde(default = "half")]
        num_cycles: f64,
    },
}

fn half() -> f64 {
    0.5
}
fn tenth() -> f64 {
    0.1
}
fn linear() -> Ramp {
    Ramp::Linear
}
fn cosine() -> Ramp {
    Ramp::Cosine
}

impl Default for LrSchedule {
    /// Warmup-stable-decay with a cosine decay over the last 10% of steps, to 0.
    fn default() -> Self {
        LrSchedule::Wsd {
            decay_steps: None,
            decay_fraction: 0.1,
            warmup_type: Ramp::Linear,
            decay_type: Ramp::Cosine,
            min_lr_ratio: 0.0,
            num_cycles: 0.5,
        }
    }
}

/// A schedule bound to a run: kind, base learning rate, warmup and total step counts.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub kind: LrSchedule,
    pub base_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    /// Check the pieces fit together (a WSD decay longer than the run after warmup is refused
    /// rather than silently producing transformers' odd lr curve).
    pub fn new(
        kind: LrSchedule,
        base_lr: f64,
        warmup_steps: usize,
        total_steps: usize,
    ) -> Result<Self> {
        let s = Self {
            kind,
            base_lr,
            warmup_steps,
            total_steps,
        };
        if let LrSchedule::Wsd { decay_fraction, .. } = &s.kind {
            if !(0.0..=1.0).contains(decay_fraction) {
                return Err(Error::Invalid(format!(
                    "wsd decay_fraction must lie in [0, 1], got {decay_fraction}"
                )));
            }
            let decay = s.wsd_decay_steps();
            if warmup_steps + decay > total_steps {
                return Err(Error::Invalid(format!(
                    "wsd schedule: warmup {warmup_steps} + decay {decay} steps exceed the {total_steps} total steps"
                )));
            }
        }
        Ok(s)
    }

    fn wsd_decay_steps(&self) -> usize {
        match &self.kind {
            LrSchedule::Wsd {
                decay_steps,
                decay_fraction,
                ..
            } => decay_steps.unwrap_or((decay_fraction * self.total_steps as f64).round() as usize),
            _ => 0,
        }
    }

    /// The learning rate of the optimiser step with 0-based index `step`.
    pub fn lr(&self, step: usize) -> f64 {
        self.base_lr * self.factor(step)
    }

    /// The multiplier of the base learning rate at 0-based step `step`.
    pub fn factor(&self, step: usize) -> f64 {
        let warmup = self.warmup_steps;
        let total = self.total_steps;
        let linear_warmup = || step as f64 / warmup.max(1) as f64;
        match &self.kind {
            LrSchedule::Constant => {
                if step < warmup {
                    linear_warmup()
                } else {
                    1.0
                }
            }
            LrSchedule::Linear => {
                if step < warmup {
                    return linear_warmup();
                }
                let left = total as f64 - step as f64;
                (left / (total.saturating_sub(warmup)).max(1) as f64).max(0.0)
            }
            LrSchedule::Cosine {
                num_cycles,
                min_lr_ratio,
            } => {
                if step < warmup {
                    return linear_warmup();
                }
                let progress =
                    (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
                let f = 0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos());
                (f * (1.0 - min_lr_ratio) + min_lr_ratio).max(0.0)
            }
            LrSchedule::Wsd {
                warmup_type,
                decay_type,
                min_lr_ratio,
                num_cycles,
                ..
            } => {
                let decay = self.wsd_decay_steps();
                let stable = total.saturating_sub(warmup + decay);
                let min = *min_lr_ratio;
                if step < warmup {
                    let progress = linear_warmup();
                    let f = match warmup_type {
                        Ramp::Linear => progress,
                        Ramp::Cosine => 0.5 * (1.0 - (std::f64::consts::PI * progress).cos()),
                        Ramp::OneMinusSqrt => 1.0 - (1.0 - progress).sqrt(),
                    };
                    return (f * (1.0 - min) + min).max(0.0);
                }
                if step < warmup + stable {
                    return 1.0;
                }
                if step < warmup + stable + decay {
                    let progress = (step - warmup - stable) as f64 / decay.max(1) as f64;
                    let f = match decay_type {
                        Ramp::Linear => 1.0 - progress,
                        Ramp::Cosine => {
                            0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos())
                        }
                        Ramp::OneMinusSqrt => 1.0 - progress.sqrt(),
                    };
                    return (f * (1.0 - min) + min).max(0.0);
                }
                min
            }
        }
    }
}

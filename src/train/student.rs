//! What every training mode shares around the loop ([`crate::train::Trainer::fit`]): the model
//! rebuilt over its trainable `Var`s ([`Student`]), and [`fit_student`], which opens the run,
//! builds the trainer and fits. Supervised training, distillation and the tiny teacher's binary
//! each pick their trainable set, batch source and step, and call it.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use serde::Serialize;

use super::params::{ParamSet, Selection};
use super::run::RunDir;
use super::trainer::{BatchSource, StepOutput, TrainConfig, TrainSummary, Trainer};
use crate::model::vlm::Vlm;
use crate::{Error, Result};

/// A model ready to train: the tensors `selection` picks as `Var`s (copies: training never
/// writes into the model it started from, nor into a teacher sharing its tensors), the rest
/// shared, and the model built over them.
pub struct Student {
    pub params: ParamSet,
    pub vlm: Vlm,
}

impl Student {
    pub fn new(model: &Vlm, selection: &Selection) -> Result<Self> {
        let tensors = model.named_tensors().into_iter().collect();
        let (params, tensors) = ParamSet::select(&tensors, selection)?;
        let vlm = model.rebuilt(tensors)?;
        Ok(Self { params, vlm })
    }

    /// The same model over detached tensors that share storage with the `Var`s: it follows the
    /// training (every optimiser step shows in it) but never records a graph, so evaluation
    /// through it costs no gradient bookkeeping.
    pub fn detached(&self) -> Result<Vlm> {
        let tensors = self
            .vlm
            .named_tensors()
            .into_iter()
            .map(|(name, t)| (name, t.detach()))
            .collect();
        self.vlm.rebuilt(tensors)
    }
}

/// Evaluation lines of a run (`val_acc`, ...), asked for every `eval_every` steps.
pub type EvalFn<'a> = Box<dyn FnMut(usize) -> Result<Vec<(String, f64)>> + 'a>;

/// Where a run goes and what may stop or watch it.
pub struct RunSetup<'a, C: Serialize> {
    /// The run directory; one holding a checkpoint is resumed (when `train.resume`).
    pub dir: &'a Path,
    /// Written to the run's `config.json` when the run is new.
    pub config: &'a C,
    /// Set (by Ctrl-C) to stop at the next step boundary with a checkpoint.
    pub cancel: Option<&'a AtomicBool>,
    pub eval: Option<EvalFn<'a>>,
}

/// Train `student.params` per `train` over `source`, with `step` computing each micro-batch's
/// loss: the run skeleton every training mode shares.
pub fn fit_student<S: BatchSource, C: Serialize>(
    student: &Student,
    train: &TrainConfig,
    setup: RunSetup<'_, C>,
    source: &mut S,
    mut step: impl FnMut(&S::Batch) -> Result<StepOutput>,
) -> Result<TrainSummary> {
    let run = RunDir::open(setup.dir)?;
    if run.read_config()?.is_none() {
        let config = serde_json::to_value(setup.config)
            .map_err(|e| Error::Other(format!("serialising the run config: {e}")))?;
        run.write_config(&config)?;
    }
    let mut trainer = Trainer::new(train.clone(), &student.params, run)?;
    if let Some(flag) = setup.cancel {
        trainer = trainer.with_cancel(flag);
    }
    if let Some(eval) = setup.eval {
        trainer = trainer.with_eval(eval);
    }
    trainer.fit(source, |_, batch| step(batch))
}

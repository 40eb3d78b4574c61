//! What every training mode shares around the loop ([`crate::train::Trainer::fit`]): the model
//! rebuilt over its trainable `Var`s ([`Student`]), and [`fit_student`], which opens the run,
//! builds the trainer and fits. Supervised training, distillation and the tiny teacher's binary
//! each pick their trainable set, batch source and step, and call it.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use serde::Serialize;

use super::collective::Collective;
use super::params::{ParamSet, Selection};
use super::run::RunDir;
use super::trainer::{BatchSource, StepOutput, TrainConfig, TrainSummary, Trainer};
use candle_core::DType;

use crate::model::vlm::Vlm;
use crate::{Error, Result};

/// A model ready to train: the tensors `selection` picks as `Var`s (copies: training never
/// writes into the model it started from, nor into a teacher sharing its tensors), the rest
/// shared, and the model built over them.
///
/// With master weights ([`Student::with_master`]) the `Var`s are kept in a wider dtype than the
/// model's (f32 under a bf16 model, as upstream's DeepSpeed bf16 setting keeps them): the
/// optimiser and its state work on those, and each step's model ([`Student::model`]) reads them
/// cast to the model's dtype, so the gradient flows back through the cast; `vlm` is then the
/// model as it was given (its configuration, preprocessing and device; its trainable tensors
/// are the starting point, not the training state).
pub struct Student {
    pub params: ParamSet,
    pub vlm: Vlm,
    /// With master weights: the model before selection (its frozen tensors are shared).
    master_of: Option<Vlm>,
}

impl Student {
    pub fn new(model: &Vlm, selection: &Selection) -> Result<Self> {
        let tensors = model.named_tensors().into_iter().collect();
        let (params, tensors) = ParamSet::select(&tensors, selection)?;
        let vlm = model.rebuilt(tensors)?;
        Ok(Self {
            params,
            vlm,
            master_of: None,
        })
    }

    /// [`Student::new`] with the trainable `Var`s in `master` (e.g. f32 under a bf16 model).
    /// A `master` equal to the model's dtype is plain [`Student::new`].
    pub fn with_master(model: &Vlm, selection: &Selection, master: DType) -> Result<Self> {
        if master == model.dtype {
            return Self::new(model, selection);
        }
        let tensors = model.named_tensors().into_iter().collect();
        let (params, _) = ParamSet::select_as(&tensors, selection, Some(master))?;
        // `vlm` stays the model as given (no cast copy of the trainable tensors is kept: every
        // step casts the masters afresh in `model()`).
        Ok(Self {
            params,
            vlm: model.clone(),
            master_of: Some(model.clone()),
        })
    }

    /// The model one training step runs: `self.vlm`, or, with master weights, the model over
    /// fresh casts of the `Var`s (a cast made before the last optimiser step would be stale).
    pub fn model(&self) -> Result<Vlm> {
        let Some(base) = &self.master_of else {
            return Ok(self.vlm.clone());
        };
        let mut tensors: std::collections::HashMap<String, candle_core::Tensor> =
            base.named_tensors().into_iter().collect();
        for (name, var) in self.params.iter() {
            tensors.insert(name.to_string(), var.as_tensor().clone());
        }
        base.rebuilt(tensors)
    }

    /// The current model over detached tensors: no graph is recorded through it, so evaluation
    /// costs no gradient bookkeeping. Without master weights it shares storage with the `Var`s
    /// and follows the training; with them it is a snapshot (ask again after more steps).
    pub fn detached(&self) -> Result<Vlm> {
        let model = self.model()?;
        let tensors = model
            .named_tensors()
            .into_iter()
            .map(|(name, t)| (name, t.detach()))
            .collect();
        model.rebuilt(tensors)
    }

    /// Whether the trainable weights are kept in a wider dtype than the model's.
    pub fn has_master_weights(&self) -> bool {
        self.master_of.is_some()
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
    /// Data parallelism: the group this run is one rank of, and the all-reduce bucket size in
    /// bytes ([`Trainer::with_collective`]).
    pub comm: Option<(&'a dyn Collective, usize)>,
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
    let writer = setup.comm.is_none_or(|(c, _)| c.rank() == 0);
    if writer && run.read_config()?.is_none() {
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
    if let Some((comm, bucket_bytes)) = setup.comm {
        trainer = trainer.with_collective(comm, bucket_bytes);
    }
    trainer.fit(source, |_, batch| step(batch))
}

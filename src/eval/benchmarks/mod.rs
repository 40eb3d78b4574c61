//! Scoring against standard VLM benchmarks, from local copies of their files, with the metrics
//! their official scripts compute; and a side-by-side report of several models.
//!
//! * VQAv2-style answers: [`vqa_normalize`] follows the official `vqaEval.py` rules (punctuation,
//!   number words to digits, articles dropped, contractions restored), [`vqa_accuracy`] its
//!   "min(1, matches / 3)" averaged over leave-one-out subsets of the annotators' answers.
//! * POPE ([`read_pope`], [`score_pope`]): yes/no object-existence questions; accuracy,
//!   precision, recall, F1 (positive class "yes") and the share of "yes" answers.
//! * MME ([`read_mme_results_dir`], [`read_mme_jsonl`], [`score_mme`]): two yes/no questions per
//!   image; per category accuracy, accuracy+ (both questions of an image right) and the score
//!   `100 * (acc + acc+)`, summed over the perception and cognition categories.
//! * Multiple choice, ScienceQA / MMBench style ([`read_choice_jsonl`], [`extract_choice`],
//!   [`score_choice`]): the option letter read from free text, accuracy overall and per
//!   category, and MMBench's circular evaluation ([`circular_variants`]).
//! * TextVQA ([`textvqa_accuracy`]) and the VQAv2 submission use the EvalAI answer processor
//!   ([`evalai_normalize`]).
//! * [`Comparison`]: models side by side, as a markdown table or JSON.
//! * [`run`]: a model over the benchmarks in their released layouts (questions, images,
//!   annotations), answers and submission files written, every metric scored.
//!
//! Predictions are plain strings aligned with the items (the i-th prediction answers the i-th
//! item); [`read_predictions`] and [`align_predictions`] turn an answers file into that order.
//! Fractions are in `[0, 1]`; only MME scores are in the benchmark's own points (max 200 per
//! category).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, Result};

mod choice;
mod compare;
mod evalai;
mod files;
mod mme;
mod pope;
mod predictions;
pub mod run;
mod vqa;

pub use choice::*;
pub use compare::*;
pub use evalai::*;
use files::*;
pub use mme::*;
pub use pope::*;
pub use predictions::*;
pub use vqa::*;

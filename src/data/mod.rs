//! Training data: LLaVA conversation JSON, the synthetic visual-QA world, batching.
//!
//! * [`llava`]: read LLaVA / ShareGPT4V records, check them, tokenise them with the phi template
//!   (labels on the answers only) into a [`Dataset`] whose images are decoded once and cached.
//! * [`batch`]: the seeded, resumable [`Loader`] of sample indices and the padded [`Batch`].
//! * [`inputs`]: a [`Batch`] as model inputs ([`SupervisedBatch`]: pixel values, stretched labels).
//! * [`stream`]: a LLaVA file read lazily, samples prepared on worker threads with prefetch
//!   (ShareGPT4V-sized data in bounded memory).
//! * [`synthetic`]: a small visual-QA world generated from a seed into the same JSON + PNG format,
//!   with its own byte-level BPE tokenizer.

pub mod batch;
pub mod inputs;
pub mod llava;
pub(crate) mod rng;
pub mod stream;
pub mod synthetic;

pub use batch::{Batch, Loader, LoaderState};
pub use inputs::{expand_labels, SupervisedBatch};
pub use llava::{
    read_llava_json, BadRecord, Dataset, ImageCheck, LoadOptions, OnBadRecord, Record, Sample,
};
pub use stream::{LazyLlava, LlavaStream, StreamOptions};
pub use synthetic::{
    ensure_world, generate_world, normalize_answer, read_world_split, train_world_tokenizer,
    world_overlap, Composition, Holdout, QuestionType, WorldConfig, WorldOverlap, WorldRecord,
    WorldSummary,
};

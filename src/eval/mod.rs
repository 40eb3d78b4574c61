//! Measuring models: exact-match accuracy ([`accuracy`]), agreement of a student with its teacher
//! ([`agreement`]), decode speed ([`speed`]), answer perplexity ([`perplexity`]), and the
//! standard VLM benchmarks' scorers and tables ([`benchmarks`]).

pub mod accuracy;
pub mod agreement;
pub mod benchmarks;
pub mod perplexity;
pub mod speed;

pub use accuracy::{
    blank_images, evaluate, teacher_forced_correct, EvalMode, EvalOptions, EvalReport, GroupScore,
    ImageInput, Mistake, Score,
};
pub use agreement::{agreement, AgreementOptions, AgreementReport};
pub use perplexity::{answer_perplexity, PerplexityReport};
pub use speed::{
    bench_generation, decode_speed, GenerationBenchOptions, GenerationRecord, SpeedOptions,
    SpeedReport,
};

//! Standard VLM benchmarks from scripts: `evaluate_benchmark` runs a model over one benchmark's
//! released layout ([`crate::eval::benchmarks::run::evaluate_benchmark`]), `score_benchmark`
//! scores an answers file already there, `benchmark_table` lays summaries out as the paper's
//! table.

use rhai::{Array, Dynamic, Map, NativeCallContext};

use super::convert::{from_map, runtime_error, OrRhai, RhaiResult};
use super::model::Model;
use super::session_of;
use crate::eval::benchmarks::run::{self, Bench, BenchOptions};

fn to_map(v: &serde_json::Value) -> RhaiResult<Map> {
    rhai::serde::to_dynamic(v)?
        .try_cast::<Map>()
        .ok_or_else(|| runtime_error("a benchmark summary is not a map".into()))
}

#[rhai::export_module]
pub mod api {
    use super::*;

    /// `evaluate_benchmark(model, "pope", #{ root, out, limit, batch: 8, max_new_tokens: 128,
    /// skip_bad: false, circular: true, model_id, progress: false })`: answer the benchmark's
    /// questions from its released layout under `root` (greedy, in batches; answers already in
    /// `out/<bench>/answers.jsonl` are kept), write the scorer / submission files under `out`,
    /// and return its metrics (also merged into `out/summary.json`). Benchmarks: pope, mme,
    /// gqa, textvqa, scienceqa, mmbench, seed, mmmu, vqav2, mmvet. Ctrl-C stops after the batch
    /// in flight; running again continues.
    #[rhai_fn(return_raw)]
    pub fn evaluate_benchmark(
        ctx: NativeCallContext,
        model: Model,
        bench: &str,
        options: Map,
    ) -> RhaiResult<Map> {
        let s = session_of(&ctx)?;
        let mut options = options;
        if !options.contains_key("model_id") {
            options.insert("model_id".into(), Dynamic::from(model.source.clone()));
        }
        let opts: BenchOptions = from_map("evaluate_benchmark", options)?;
        let bench = Bench::parse(bench).or_rhai()?;
        let summary = run::evaluate_benchmark(&model.vlm, bench, &opts, Some(&s.cancel));
        to_map(&summary.or_rhai()?)
    }

    /// `score_benchmark("pope", #{ root, out, limit })`: score an answers file already at
    /// `out/<bench>/answers.jsonl` (no model): scorer / submission files and metrics, as
    /// `evaluate_benchmark` writes and returns them.
    #[rhai_fn(return_raw)]
    pub fn score_benchmark(bench: &str, options: Map) -> RhaiResult<Map> {
        let opts: BenchOptions = from_map("score_benchmark", options)?;
        let bench = Bench::parse(bench).or_rhai()?;
        to_map(&run::score_benchmark(bench, &opts).or_rhai()?)
    }

    /// `benchmark_table([#{ model: "teacher", summary: #{ pope: ..., mme: ... } }, ...])`: the
    /// paper's table as markdown, one row per model (POPE F1, MME perception, accuracies in
    /// percent; VQAv2 and MM-Vet are scored elsewhere and show `submit`).
    #[rhai_fn(return_raw)]
    pub fn benchmark_table(rows: Array) -> RhaiResult<String> {
        let rows = rows
            .into_iter()
            .map(|r| {
                let v: serde_json::Value = rhai::serde::from_dynamic(&r)?;
                let model = v["model"].as_str().map(str::to_owned).ok_or_else(|| {
                    runtime_error("benchmark_table: each row needs `model` and `summary`".into())
                })?;
                Ok((model, v["summary"].clone()))
            })
            .collect::<RhaiResult<Vec<_>>>()?;
        Ok(run::paper_table(&rows))
    }
}

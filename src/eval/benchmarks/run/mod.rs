//! A model over the standard VLM benchmarks in their released layouts: the questions answered
//! greedily in batches (resumably), the answers in LLaVA's format, the files each benchmark's
//! official scorer or submission server takes, and every metric the benchmark reports, computed
//! by this crate's scorers.
//!
//! The layout is the one LLaVA documents (`docs/Evaluation.md` and `scripts/v1_5/eval/*.sh` of
//! github.com/haotian-liu/LLaVA, the `playground/data/eval` folder of its `eval.zip`) and
//! TinyLLaVA Factory follows (`scripts/eval/*.sh` and `tinyllava/eval/*.py` of
//! github.com/TinyLLaVA/TinyLLaVA_Factory): `root` holds `eval/<bench>/...` (or is that `eval`
//! folder itself). Prompts are sent as TinyLLaVA Factory's evaluation sends them: the question
//! file's text (its suffix, e.g. "Answer the question using a single word or phrase.",
//! included) after `<image>\n`, in the phi template, decoded greedily.
//!
//! | bench | question file (under `eval/`) | images | annotations | files written | source |
//! |---|---|---|---|---|---|
//! | `pope` | `pope/llava_pope_test.jsonl` | `pope/val2014/` | `pope/coco/coco_pope_<category>.json` | — (the scorer reads the answers) | `scripts/eval/pope.sh`, `eval_pope.py` |
//! | `mme` | `MME/llava_mme.jsonl` | `MME/MME_Benchmark_release_version/` | the same folder's `questions_answers_YN` / `<category>/*.txt` | `mme/results/<category>.txt` (`image, question, answer, prediction`) for `eval_tool/calculation.py` | `scripts/eval/mme.sh`, `convert_answer_to_mme.py` |
//! | `gqa` | `gqa/llava_gqa_testdev_balanced.jsonl` | `gqa/data/images/` | `gqa/data/testdev_balanced_questions.json` | `gqa/testdev_balanced_predictions.json` | `scripts/eval/gqa.sh`, `convert_gqa_for_eval.py` |
//! | `textvqa` | `textvqa/llava_textvqa_val_v051_ocr.jsonl` | `textvqa/train_images/` | `textvqa/TextVQA_0.5.1_val.json` | — | `scripts/eval/textvqa.sh`, `eval_textvqa.py`, `m4c_evaluator.py` |
//! | `scienceqa` | `scienceqa/llava_test_CQM-A.json` | `scienceqa/images/test/` | `scienceqa/problems.json`, `pid_splits.json` | — | `scripts/eval/sqa.sh`, `model_vqa_science.py`, `eval_science_qa.py` |
//! | `mmbench` | `mmbench/mmbench_dev_20230712.tsv` | in the TSV (base64) | the TSV's `answer` column (dev) | `mmbench/submission.xlsx` (+ `.tsv`) | LLaVA `scripts/v1_5/eval/mmbench.sh`, `model_vqa_mmbench.py`, `convert_mmbench_for_submission.py` |
//! | `seed` | `seed_bench/llava-seed-bench.jsonl` | `seed_bench/` | `seed_bench/SEED-Bench.json` | `seed/answers_upload.jsonl` | LLaVA `scripts/v1_5/eval/seed.sh`, `convert_seed_for_submission.py` |
//! | `mmmu` | `MMMU/anns_for_eval.json` | `MMMU/all_images/` | `MMMU/eval/answer_dict_val.json` | `mmmu/mmmu_output.json` for `main_eval_only.py` | `scripts/eval/mmmu.sh`, `model_vqa_mmmu.py`, `convert_answer_to_mmmu.py` |
//! | `vqav2` | `vqav2/llava_vqav2_mscoco_test-dev2015.jsonl` | `vqav2/test2015/` | — (server-side) | `vqav2/answers_upload.json` | `scripts/eval/vqav2.sh`, `convert_vqav2_for_submission.py` |
//! | `mmvet` | `mm-vet/llava-mm-vet.jsonl` | `mm-vet/images/` | — (GPT-4 judge) | `mmvet/results.json` | `scripts/eval/mmvet.sh`, `convert_mmvet_for_eval.py` |
//!
//! Everything is written under `out`: `out/<bench>/answers.jsonl`, the files above, and
//! `out/summary.json` (one entry per benchmark, merged across runs).

mod answer;
mod mmbench;
mod questions;
mod score;
mod score_choice;
mod table;
mod xlsx;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use answer::{index_answers, read_answers, AnswerLine};
pub use mmbench::{mmbench_questions, read_mmbench_rows, MmbenchRow};
pub use questions::question_key;
pub use questions::{
    read_llava_questions, read_mmmu_questions, read_sqa_questions, Bad, ImageSource, Question,
    CHOICE_SUFFIX,
};
pub use score_choice::{mmmu_parse_choice, sqa_parse_answer};
pub use table::{column, headline, paper_table};

use crate::model::vlm::Vlm;
use crate::{Error, Result};

/// A supported benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bench {
    Pope,
    Mme,
    Gqa,
    TextVqa,
    ScienceQa,
    MmBench,
    Seed,
    Mmmu,
    Vqav2,
    MmVet,
}

impl Bench {
    pub const ALL: [Bench; 10] = [
        Bench::Pope,
        Bench::Mme,
        Bench::Gqa,
        Bench::TextVqa,
        Bench::ScienceQa,
        Bench::MmBench,
        Bench::Seed,
        Bench::Mmmu,
        Bench::Vqav2,
        Bench::MmVet,
    ];

    /// The name used for `out/<name>/` and in scripts.
    pub fn name(self) -> &'static str {
        match self {
            Bench::Pope => "pope",
            Bench::Mme => "mme",
            Bench::Gqa => "gqa",
            Bench::TextVqa => "textvqa",
            Bench::ScienceQa => "scienceqa",
            Bench::MmBench => "mmbench",
            Bench::Seed => "seed",
            Bench::Mmmu => "mmmu",
            Bench::Vqav2 => "vqav2",
            Bench::MmVet => "mmvet",
        }
    }

    /// A name or a common alias (`sqa`, `mm-vet`, `seed-bench`, ...), any case.
    pub fn parse(name: &str) -> Result<Bench> {
        let n = name.trim().to_lowercase().replace(['-', '_'], "");
        let alias = match n.as_str() {
            "sqa" | "sqaimg" | "scienceqaimg" => "scienceqa",
            "seedbench" | "seedimg" => "seed",
            "mmb" => "mmbench",
            "vqa" => "vqav2",
            other => other,
        };
        Bench::ALL
            .into_iter()
            .find(|b| b.name() == alias)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown benchmark `{name}` (known: {})",
                    Bench::ALL.map(Bench::name).join(", ")
                ))
            })
    }

    /// The question file, relative to the `eval` folder.
    pub fn question_file(self) -> &'static str {
        match self {
            Bench::Pope => "pope/llava_pope_test.jsonl",
            Bench::Mme => "MME/llava_mme.jsonl",
            Bench::Gqa => "gqa/llava_gqa_testdev_balanced.jsonl",
            Bench::TextVqa => "textvqa/llava_textvqa_val_v051_ocr.jsonl",
            Bench::ScienceQa => "scienceqa/llava_test_CQM-A.json",
            Bench::MmBench => "mmbench/mmbench_dev_20230712.tsv",
            Bench::Seed => "seed_bench/llava-seed-bench.jsonl",
            Bench::Mmmu => "MMMU/anns_for_eval.json",
            Bench::Vqav2 => "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl",
            Bench::MmVet => "mm-vet/llava-mm-vet.jsonl",
        }
    }

    /// The folder the question file's image names are relative to.
    pub fn image_folder(self) -> &'static str {
        match self {
            Bench::Pope => "pope/val2014",
            Bench::Mme => "MME/MME_Benchmark_release_version",
            Bench::Gqa => "gqa/data/images",
            Bench::TextVqa => "textvqa/train_images",
            Bench::ScienceQa => "scienceqa/images/test",
            Bench::MmBench => "mmbench",
            Bench::Seed => "seed_bench",
            Bench::Mmmu => "MMMU/all_images",
            Bench::Vqav2 => "vqav2/test2015",
            Bench::MmVet => "mm-vet/images",
        }
    }
}

/// How [`evaluate_benchmark`] runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BenchOptions {
    /// The folder holding `eval/<bench>/...` (or the `eval` folder itself).
    pub root: PathBuf,
    /// Where everything is written.
    pub out: PathBuf,
    /// Only the first `limit` questions (MMBench: rows), for a quick look.
    pub limit: Option<usize>,
    /// Questions generated together.
    pub batch: usize,
    /// Token limit of an answer (TinyLLaVA Factory's loader default).
    pub max_new_tokens: usize,
    /// Set aside and count bad records (missing images, malformed lines) instead of failing.
    pub skip_bad: bool,
    /// MMBench's circular evaluation (every rotation of the options) where the file has answers.
    pub circular: bool,
    /// `model_id` of the answers file.
    pub model_id: String,
    /// A line on stderr after each batch.
    pub progress: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            root: PathBuf::from("."),
            out: PathBuf::from("bench-out"),
            limit: None,
            batch: 8,
            max_new_tokens: 128,
            skip_bad: false,
            circular: true,
            model_id: "matvlm".into(),
            progress: false,
        }
    }
}

impl BenchOptions {
    /// The `eval` folder: `root/eval` when it exists, else `root`.
    pub fn eval_dir(&self) -> PathBuf {
        let nested = self.root.join("eval");
        if nested.is_dir() {
            nested
        } else {
            self.root.clone()
        }
    }

    /// `out/<bench>`.
    pub fn bench_dir(&self, bench: Bench) -> PathBuf {
        self.out.join(bench.name())
    }
}

/// The questions of a benchmark, in file order, and what was set aside.
pub struct Loaded {
    /// Every question of the file (for ordering the answers file).
    pub all: Vec<Question>,
    /// The ones to answer and score (the first `limit`, bad ones left out).
    pub asked: Vec<Question>,
    pub bad: Bad,
    /// Questions outside the benchmark's scored subset (MMMU without one image or not multiple
    /// choice; SEED's video questions).
    pub skipped: usize,
}

/// Read a benchmark's questions from its released layout.
pub fn load_questions(bench: Bench, opts: &BenchOptions) -> Result<Loaded> {
    let dir = opts.eval_dir();
    let path = dir.join(bench.question_file());
    let images = dir.join(bench.image_folder());
    let mut bad = Bad::new(opts.skip_bad);
    let mut skipped = 0;
    let mut all = match bench {
        Bench::ScienceQa => read_sqa_questions(&path, &images, &mut bad)?,
        Bench::Mmmu => read_mmmu_questions(&path, &images, &mut bad, &mut skipped)?,
        Bench::MmBench => {
            let mut rows = read_mmbench_rows(&path, &mut bad)?;
            if let Some(n) = opts.limit {
                rows.truncate(n);
            }
            let circular = opts.circular && rows.iter().all(|r| r.answer.is_some());
            mmbench_questions(&path, &rows, circular)
        }
        _ => read_llava_questions(&path, &images, &mut bad)?,
    };
    if bench == Bench::Seed {
        let image_ids = score_choice::seed_image_questions(&dir)?;
        let before = all.len();
        all.retain(|q| image_ids.contains(&q.key));
        skipped += before - all.len();
    }
    bad.check(&path)?;
    let mut asked = all.clone();
    if let Some(n) = opts.limit.filter(|_| bench != Bench::MmBench) {
        asked.truncate(n);
    }
    Ok(Loaded {
        all,
        asked,
        bad,
        skipped,
    })
}

/// Answer a benchmark's questions with `vlm` (those already in `out/<bench>/answers.jsonl` are
/// kept), write the scorer / submission files and merge the benchmark's metrics into
/// `out/summary.json`; returns them. `cancel` (Ctrl-C) stops after the batch in flight.
pub fn evaluate_benchmark(
    vlm: &Vlm,
    bench: Bench,
    opts: &BenchOptions,
    cancel: Option<&AtomicBool>,
) -> Result<Value> {
    let mut loaded = load_questions(bench, opts)?;
    let answers = opts.bench_dir(bench).join("answers.jsonl");
    let run = answer::AnswerRun {
        bench: bench.name(),
        model_id: &opts.model_id,
        batch: opts.batch,
        max_new_tokens: opts.max_new_tokens,
        progress: opts.progress,
        cancel,
    };
    let stats = answer::answer_questions(
        vlm,
        &loaded.asked,
        &loaded.all,
        &answers,
        &run,
        &mut loaded.bad,
    )?;
    loaded.bad.check(&answers)?;
    if opts.progress && !loaded.bad.records.is_empty() {
        eprintln!(
            "{}: {} bad record(s) skipped, e.g. {}",
            bench.name(),
            loaded.bad.records.len(),
            loaded.bad.records[0]
        );
    }
    let mut summary = score_loaded(bench, opts, &loaded)?;
    if let Value::Object(m) = &mut summary {
        m.insert("generated".into(), Value::from(stats.generated));
        m.insert("generation_seconds".into(), Value::from(stats.seconds));
        if stats.generated > 0 {
            m.insert(
                "seconds_per_question".into(),
                Value::from(stats.seconds / stats.generated as f64),
            );
        }
    }
    merge_summary(&opts.out, bench, &summary)?;
    Ok(summary)
}

/// Score an existing `out/<bench>/answers.jsonl` (no model): the scorer / submission files and
/// the metrics, merged into `out/summary.json` and returned.
pub fn score_benchmark(bench: Bench, opts: &BenchOptions) -> Result<Value> {
    let loaded = load_questions(bench, opts)?;
    let summary = score_loaded(bench, opts, &loaded)?;
    merge_summary(&opts.out, bench, &summary)?;
    Ok(summary)
}

/// The answers of the asked questions, in their order; bad records (skipped) are left out, a
/// question without an answer is an error.
fn aligned_answers(bench: Bench, opts: &BenchOptions, loaded: &Loaded) -> Result<Vec<Value>> {
    let path = opts.bench_dir(bench).join("answers.jsonl");
    let lines = read_answers(&path)?;
    let index = index_answers(&lines);
    let mut missing = Vec::new();
    let mut out = Vec::new();
    for q in &loaded.asked {
        match index.get(q.key.as_str()) {
            Some(&i) => out.push(lines[i].value.clone()),
            None if loaded
                .bad
                .records
                .iter()
                .any(|r| r.starts_with(&format!("{}: ", q.origin))) =>
            {
                out.push(Value::Null)
            }
            None => missing.push(q.key.clone()),
        }
    }
    if !missing.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: {} question(s) have no answer, e.g. {} (run the benchmark to answer them)",
            path.display(),
            missing.len(),
            missing
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(out)
}

fn score_loaded(bench: Bench, opts: &BenchOptions, loaded: &Loaded) -> Result<Value> {
    let answers = aligned_answers(bench, opts, loaded)?;
    // Questions set aside at generation (bad images) carry no answer.
    let (questions, answers): (Vec<Question>, Vec<Value>) = loaded
        .asked
        .iter()
        .cloned()
        .zip(answers)
        .filter(|(_, a)| !a.is_null())
        .unzip();
    let texts: Vec<String> = answers
        .iter()
        .map(|a| a["text"].as_str().unwrap_or_default().to_string())
        .collect();
    let ctx = score::Ctx {
        eval_dir: opts.eval_dir(),
        out_dir: opts.bench_dir(bench),
        questions: &questions,
        texts: &texts,
    };
    let mut summary = match bench {
        Bench::Pope => score::pope(&ctx)?,
        Bench::Mme => score::mme(&ctx)?,
        Bench::Gqa => score::gqa(&ctx)?,
        Bench::TextVqa => score::textvqa(&ctx)?,
        Bench::Vqav2 => score::vqav2(&ctx)?,
        Bench::MmVet => score::mmvet(&ctx)?,
        Bench::ScienceQa => score_choice::scienceqa(&ctx)?,
        Bench::MmBench => score_choice::mmbench(&ctx)?,
        Bench::Seed => score_choice::seed(&ctx)?,
        Bench::Mmmu => score_choice::mmmu(&ctx)?,
    };
    if let Value::Object(m) = &mut summary {
        m.insert("answered".into(), Value::from(questions.len()));
        m.insert("bad".into(), Value::from(loaded.bad.records.len()));
        if !loaded.bad.records.is_empty() {
            m.insert(
                "bad_records".into(),
                Value::from(loaded.bad.records.clone()),
            );
        }
        if loaded.skipped > 0 {
            m.insert("skipped".into(), Value::from(loaded.skipped));
        }
    }
    Ok(summary)
}

/// Put one benchmark's metrics into `out/summary.json` (created if absent; other benchmarks'
/// entries kept).
fn merge_summary(out: &Path, bench: Bench, summary: &Value) -> Result<()> {
    let path = out.join("summary.json");
    let mut all: serde_json::Map<String, Value> = if path.is_file() {
        crate::io::read_json(&path)?
    } else {
        Default::default()
    };
    all.insert(bench.name().into(), summary.clone());
    crate::io::write_json(&path, &all)
}

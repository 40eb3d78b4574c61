//! The benchmark scorers and the answer / submission files on the tiny copies of the benchmarks
//! (tests/fixtures/bench/eval, made by scripts/fixtures/make_bench_copies.py) with a fixed
//! answers file per benchmark (tests/fixtures/bench/answers): right or wrong in a pattern fixed
//! relative to the truth, so every expected number below is worked out from that pattern in the
//! comments.

use std::path::{Path, PathBuf};

use matvlm::eval::benchmarks::run::{score_benchmark, Bench, BenchOptions};
use serde_json::Value;

use crate::common::fixture;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

fn num(v: &Value, pointer: &str) -> f64 {
    v.pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no number at {pointer} in {v:#}"))
}

fn assert_num(v: &Value, pointer: &str, want: f64) {
    let got = num(v, pointer);
    assert!(close(got, want), "{pointer}: {got} != {want} in {v:#}");
}

/// Options over the fixture copies, writing into `out`, with the fixed answers of `bench` in
/// place as `out/<bench>/answers.jsonl`.
pub fn with_fixed_answers(bench: Bench, out: &Path) -> BenchOptions {
    let opts = BenchOptions {
        root: fixture("bench"),
        out: out.to_path_buf(),
        ..BenchOptions::default()
    };
    let dir = opts.bench_dir(bench);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        fixture("bench")
            .join("answers")
            .join(format!("{}.jsonl", bench.name())),
        dir.join("answers.jsonl"),
    )
    .unwrap();
    opts
}

fn score(bench: Bench) -> (Value, tempfile::TempDir) {
    let out = tempfile::tempdir().unwrap();
    let opts = with_fixed_answers(bench, out.path());
    let s = score_benchmark(bench, &opts).unwrap();
    (s, out)
}

fn read_json(p: PathBuf) -> Value {
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

#[test]
fn pope_metrics_per_category_and_their_mean() {
    let (s, _out) = score(Bench::Pope);
    // Labels yes, no, yes, no per category.
    // adversarial: "Yes" TP, "No, there is not." TN, "yes." TP, "No" TN: all 1, yes-ratio 1/2.
    for (k, v) in [
        ("accuracy", 1.0),
        ("precision", 1.0),
        ("recall", 1.0),
        ("f1", 1.0),
        ("yes_ratio", 0.5),
    ] {
        assert_num(&s, &format!("/categories/adversarial/{k}"), v);
    }
    // popular: "Yes" TP, "Yes" FP, "No" FN, "no" TN: 1/2 everywhere.
    for k in ["accuracy", "precision", "recall", "f1", "yes_ratio"] {
        assert_num(&s, &format!("/categories/popular/{k}"), 0.5);
    }
    // random: "There is one. No doubt." reads yes (only the first sentence counts) TP;
    // "Not at all" reads yes ("Not" is not one of No/no/not) FP; "Yes" TP; "No" TN.
    // accuracy 3/4, precision 2/3, recall 1, F1 2*(2/3)/(5/3) = 0.8, yes-ratio 3/4.
    assert_num(&s, "/categories/random/accuracy", 0.75);
    assert_num(&s, "/categories/random/precision", 2.0 / 3.0);
    assert_num(&s, "/categories/random/recall", 1.0);
    assert_num(&s, "/categories/random/f1", 0.8);
    assert_num(&s, "/categories/random/yes_ratio", 0.75);
    // Means over the three categories.
    assert_num(&s, "/average/accuracy", 0.75);
    assert_num(&s, "/average/precision", (1.0 + 0.5 + 2.0 / 3.0) / 3.0);
    assert_num(&s, "/average/recall", 2.5 / 3.0);
    assert_num(&s, "/average/f1", 2.3 / 3.0);
    assert_num(&s, "/average/yes_ratio", 1.75 / 3.0);
    assert_num(&s, "/answered", 12.0);
}

#[test]
fn mme_scores_and_the_official_results_files() {
    let (s, out) = score(Bench::Mme);
    // Each image: the first question's truth is Yes, the second's No.
    // existence: (Yes, No) both right; (Yes, "Yes") one right: acc 3/4, acc+ 1/2: 125.
    // position: (yes, no) right; ("No", "Yes") both wrong: acc 2/4, acc+ 1/2: 100.
    // numerical_calculation (cognition): ("Yes.", "No.") right (yes/no in the first four
    // characters); ("maybe", "No"): "maybe" reads as neither, so wrong: acc 3/4, acc+ 1/2: 125.
    assert_num(&s, "/perception", 225.0);
    assert_num(&s, "/cognition", 125.0);
    assert_num(&s, "/total", 350.0);
    let cats = s["categories"].as_array().unwrap();
    let other: u64 = cats.iter().map(|c| c["other"].as_u64().unwrap()).sum();
    assert_eq!(other, 1, "one answer (maybe) is neither yes nor no");
    // The eval tool's input: one file per category, `file, question, answer, prediction`, the
    // question with " Please answer yes or no." back and the short-answer suffix gone.
    let text =
        std::fs::read_to_string(out.path().join("mme/results/numerical_calculation.txt")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4);
    let cols: Vec<&str> = lines[2].split('\t').collect();
    assert_eq!(cols.len(), 4);
    assert!(cols[0].ends_with(".txt"), "{cols:?}");
    assert!(
        cols[1].ends_with("in total? Please answer yes or no."),
        "{cols:?}"
    );
    assert_eq!((cols[2], cols[3]), ("Yes", "maybe"));
    assert!(out.path().join("mme/results/existence.txt").is_file());
}

#[test]
fn gqa_accuracy_and_predictions_file() {
    let (s, out) = score(Bench::Gqa);
    // Answers: right, right + ".", wrong, right (the yes/no "verify" question), wrong,
    // capitalised right. Trailing periods go and case is folded: 4 of 6 right; binary 1/1,
    // open 3/5.
    assert_num(&s, "/accuracy", 4.0 / 6.0);
    assert_num(&s, "/binary/accuracy", 1.0);
    assert_num(&s, "/open/accuracy", 0.6);
    let preds = read_json(out.path().join("gqa/testdev_balanced_predictions.json"));
    let preds = preds.as_array().unwrap();
    assert_eq!(preds.len(), 6);
    assert_eq!(preds[0]["questionId"], "20100000");
    let p1 = preds[1]["prediction"].as_str().unwrap();
    assert!(!p1.ends_with('.') && p1 == p1.to_lowercase(), "{p1}");
}

#[test]
fn textvqa_soft_accuracy_with_the_evalai_processor() {
    let (s, _out) = score(Bench::TextVqa);
    // 10 references: 6 x "<c>", 3 x "the <c> one", 1 x "dark <c>".
    // "<C>." -> "<c>": 6 matches, any 9 of 10 hold >= 3: 1.
    // "The <c> one" -> "<c> 1" (article dropped, number word to digit), like "the <c> one":
    //   leaving out one of those 3 leaves 2 (2/3), the other 7 leave 3 (1): 0.9.
    // "dark <c>": 1 match: 0 when left out, 1/3 otherwise: 9/30 = 0.3.
    // "black": 0. Mean (1 + 0.9 + 0.3 + 0) / 4 = 0.55.
    assert_num(&s, "/accuracy", 0.55);
    assert_num(&s, "/n", 4.0);
}

#[test]
fn scienceqa_accuracy_and_img_accuracy() {
    let (s, _out) = score(Bench::ScienceQa);
    // The letter (right), "The answer is X." (right), the letter on the question without an
    // image (right), "I think (X)" (not a form the scorer reads: FAILED, wrong).
    assert_num(&s, "/accuracy", 0.75);
    assert_num(&s, "/img/accuracy", 2.0 / 3.0);
    assert_num(&s, "/img/n", 3.0);
    assert_num(&s, "/failed", 1.0);
}

#[test]
fn mmbench_circular_and_single_pass_and_submission() {
    let (s, out) = score(Bench::MmBench);
    // Row 100 (4 options, 4 rounds): every round right. Row 101 (3 options): rounds right,
    // wrong, right. Single pass (round 0): 2/2; circular: 1/2.
    assert_num(&s, "/single", 1.0);
    assert_num(&s, "/circular", 0.5);
    assert_num(&s, "/rounds", 7.0);
    assert_num(&s, "/per_category/attribute_recognition/accuracy", 0.5);
    let text = std::fs::read_to_string(out.path().join("mmbench/submission.tsv")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3);
    let header: Vec<&str> = lines[0].split('\t').collect();
    assert_eq!(header[6], "prediction");
    assert!(!header.contains(&"image") && !header.contains(&"hint"));
    // The server's .xlsx: a zip archive holding the sheet with the predictions.
    let xlsx = std::fs::read(out.path().join("mmbench/submission.xlsx")).unwrap();
    assert_eq!(&xlsx[..4], b"PK\x03\x04");
    let sheet = String::from_utf8_lossy(&xlsx);
    assert!(sheet.contains("xl/worksheets/sheet1.xml"));
    assert!(
        sheet.contains("<t xml:space=\"preserve\">prediction</t>"),
        "{sheet}"
    );
    assert!(sheet.contains("<c r=\"A2\"><v>100</v></c>"), "{sheet}");
}

#[test]
fn seed_image_subset_exact_letters() {
    let (s, out) = score(Bench::Seed);
    // Image questions: "A" right, "A." wrong (upstream compares exactly), wrong letter, right:
    // 2/4. The video question is outside the image subset (skipped).
    assert_num(&s, "/accuracy", 0.5);
    assert_num(&s, "/skipped", 1.0);
    assert_num(&s, "/per_type/Instance Identity/accuracy", 0.5);
    let upload = std::fs::read_to_string(out.path().join("seed/answers_upload.jsonl")).unwrap();
    assert_eq!(upload.lines().count(), 4);
}

#[test]
fn mmmu_parsed_letters_per_subject() {
    let (s, out) = score(Bench::Mmmu);
    // Art_1 "(X)" right, Art_2 a wrong letter, Math_3 "The answer is X because ..." (X alone)
    // right, Math_4 the option text in a sentence of more than five words right, Art_5
    // "I cannot tell" unparsed (wrong). The open question and the one without an image are
    // skipped. 3/5; Art 1/3, Math 2/2.
    assert_num(&s, "/accuracy", 0.6);
    assert_num(&s, "/per_subject/Art/accuracy", 1.0 / 3.0);
    assert_num(&s, "/per_subject/Math/accuracy", 1.0);
    assert_num(&s, "/unparsed", 1.0);
    assert_num(&s, "/skipped", 2.0);
    let output = read_json(out.path().join("mmmu/mmmu_output.json"));
    assert_eq!(output.as_object().unwrap().len(), 5);
    assert_eq!(output["validation_Art_5"], "");
}

#[test]
fn vqav2_and_mmvet_write_their_submission_files() {
    let (s, out) = score(Bench::Vqav2);
    assert_num(&s, "/n", 3.0);
    let upload = read_json(out.path().join("vqav2/answers_upload.json"));
    let answers: Vec<(u64, &str)> = upload
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["question_id"].as_u64().unwrap(),
                a["answer"].as_str().unwrap(),
            )
        })
        .collect();
    // Every test2015 question; the one outside test-dev unanswered; answers through the EvalAI
    // processor ("Two." -> "2", "The Red one" -> "red 1").
    assert_eq!(
        answers,
        vec![
            (262144000, "2"),
            (262144001, ""),
            (262144002, "red 1"),
            (262144003, "circle")
        ]
    );
    let (s, out) = score(Bench::MmVet);
    assert_num(&s, "/n", 2.0);
    let results = read_json(out.path().join("mmvet/results.json"));
    assert_eq!(results["v1_0"], "A red circle.");
    assert_eq!(results["v1_1"], "Nothing.");
}

#[test]
fn summary_json_collects_every_benchmark() {
    let out = tempfile::tempdir().unwrap();
    for bench in Bench::ALL {
        let opts = with_fixed_answers(bench, out.path());
        score_benchmark(bench, &opts).unwrap();
    }
    let summary = read_json(out.path().join("summary.json"));
    for bench in Bench::ALL {
        assert!(summary.get(bench.name()).is_some(), "{}", bench.name());
    }
    let table = matvlm::eval::benchmarks::run::paper_table(&[("fixed".into(), summary)]);
    // POPE F1 mean 76.7, MME perception 225.0, GQA 66.7, TextVQA 55.0, SQA-IMG 66.7, MMB 50.0,
    // SEED 50.0, MMMU 60.0; VQAv2 and MM-Vet are scored elsewhere.
    assert!(
        table.contains(
            "| fixed | 76.7 | 225.0 | 66.7 | 55.0 | 66.7 | 50.0 | 50.0 | 60.0 | submit | submit |"
        ),
        "{table}"
    );
}

#[test]
fn evalai_processor_matches_the_official_one() {
    // Pairs written by scripts/fixtures/crosscheck_bench.py --write-evalai-cases with LLaVA's
    // m4c_evaluator.EvalAIAnswerProcessor (TextVQA's scorer, the VQAv2 converter).
    let cases = read_json(fixture("bench").join("evalai_cases.json"));
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 30);
    for c in cases {
        let (input, want) = (c[0].as_str().unwrap(), c[1].as_str().unwrap());
        assert_eq!(
            matvlm::eval::benchmarks::evalai_normalize(input),
            want,
            "{input:?}"
        );
    }
}

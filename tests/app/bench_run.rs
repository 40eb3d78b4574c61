//! The benchmark runner on the embedded tiny teacher over the tiny benchmark copies
//! (tests/fixtures/bench): every benchmark answered in LLaVA's answer format, batched answers
//! equal to one-at-a-time ones, resuming after an interruption, bad records named or counted,
//! nothing written outside `out`, and `scripts/eval.rhai` printing the paper's table.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device};
use matvlm::eval::benchmarks::run::{
    evaluate_benchmark, load_questions, read_answers, Bench, BenchOptions,
};
use matvlm::model::vlm::Vlm;
use serde_json::Value;

use crate::common::{fixture, matrepl_command};

fn tiny_teacher() -> &'static Vlm {
    static T: OnceLock<Vlm> = OnceLock::new();
    T.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-teacher");
        Vlm::load(dir.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap()
    })
}

fn opts(root: &Path, out: &Path) -> BenchOptions {
    BenchOptions {
        root: root.to_path_buf(),
        out: out.to_path_buf(),
        batch: 4,
        max_new_tokens: 6,
        model_id: "tiny-teacher".into(),
        ..BenchOptions::default()
    }
}

/// Every file under `dir` with its bytes.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

/// A copy of the fixture copies (`eval/...`) that a test may damage.
fn scratch_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (rel, bytes) in tree(&fixture("bench").join("eval")) {
        let p = dir.path().join("eval").join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    dir
}

#[test]
fn every_benchmark_runs_on_the_tiny_teacher_in_llava_answer_format() {
    let root = scratch_root();
    let before = tree(root.path());
    let out = tempfile::tempdir().unwrap();
    let o = opts(root.path(), out.path());
    for bench in Bench::ALL {
        let asked = load_questions(bench, &o).unwrap().asked;
        let s = evaluate_benchmark(tiny_teacher(), bench, &o, None).unwrap();
        assert_eq!(s["answered"], asked.len(), "{}: {s:#}", bench.name());
        assert_eq!(s["generated"], asked.len(), "{}", bench.name());
        let lines = read_answers(&o.bench_dir(bench).join("answers.jsonl")).unwrap();
        let ids: Vec<(&Value, &str)> = lines
            .iter()
            .map(|l| (&l.value["question_id"], l.value["prompt"].as_str().unwrap()))
            .collect();
        let want: Vec<(&Value, &str)> = asked
            .iter()
            .map(|q| (&q.question_id, q.text.as_str()))
            .collect();
        assert_eq!(
            ids,
            want,
            "{}: one line per question, in order",
            bench.name()
        );
        for line in lines.iter().map(|l| &l.value) {
            for key in [
                "question_id",
                "prompt",
                "text",
                "answer_id",
                "model_id",
                "metadata",
            ] {
                assert!(
                    line.get(key).is_some(),
                    "{}: no {key} in {line}",
                    bench.name()
                );
            }
            assert_eq!(line["model_id"], "tiny-teacher");
        }
    }
    // The images reach the model: asked in POPE's phrasing (which the teacher never saw), it
    // still describes what the image holds, naming one of the world's shapes each time.
    let pope = read_answers(&o.bench_dir(Bench::Pope).join("answers.jsonl")).unwrap();
    let named = pope
        .iter()
        .filter(|l| {
            let t = l.value["text"].as_str().unwrap_or("");
            ["circle", "square", "triangle", "cross"]
                .iter()
                .any(|s| t.contains(s))
        })
        .count();
    assert!(named >= 10, "{pope:?}");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary.as_object().unwrap().len(), Bench::ALL.len());
    // Nothing was written next to the benchmark files.
    assert_eq!(tree(root.path()), before);
}

#[test]
fn batched_answers_equal_one_at_a_time_and_a_run_resumes() {
    let root = fixture("bench");
    let one = tempfile::tempdir().unwrap();
    let mut o1 = opts(&root, one.path());
    o1.batch = 1;
    evaluate_benchmark(tiny_teacher(), Bench::MmBench, &o1, None).unwrap();
    let batched = tempfile::tempdir().unwrap();
    let mut o = opts(&root, batched.path());
    o.batch = 8;
    // Interrupted after the first 5 POPE questions: a limited run, then a torn line as a killed
    // writer leaves it.
    o.limit = Some(5);
    let s = evaluate_benchmark(tiny_teacher(), Bench::Pope, &o, None).unwrap();
    assert_eq!(s["answered"], 5);
    let path = o.bench_dir(Bench::Pope).join("answers.jsonl");
    let first = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{first}{{\"question_id\": 6, \"pro")).unwrap();
    o.limit = None;
    let s = evaluate_benchmark(tiny_teacher(), Bench::Pope, &o, None).unwrap();
    assert_eq!(
        (s["answered"].as_u64(), s["generated"].as_u64()),
        (Some(12), Some(7))
    );
    let all = std::fs::read_to_string(&path).unwrap();
    assert!(all.starts_with(&first), "answers already written are kept");
    assert_eq!(all.lines().count(), 12);
    // Batch of 8 against batch of 1, on MMBench's circular rounds.
    evaluate_benchmark(tiny_teacher(), Bench::MmBench, &o, None).unwrap();
    let texts = |dir: &Path| -> Vec<String> {
        read_answers(&dir.join("mmbench/answers.jsonl"))
            .unwrap()
            .into_iter()
            .map(|l| l.value["text"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(texts(one.path()), texts(batched.path()));
}

#[test]
fn bad_records_name_file_and_line_or_are_counted_with_skip_bad() {
    let root = scratch_root();
    let out = tempfile::tempdir().unwrap();
    let mut o = opts(root.path(), out.path());
    let eval = root.path().join("eval");
    // A missing image and a malformed line in POPE's question file.
    let qfile = eval.join("pope/llava_pope_test.jsonl");
    let text = std::fs::read_to_string(&qfile).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines[2] = "{\"question_id\": 3, \"text\": ".into();
    std::fs::write(&qfile, lines.join("\n") + "\n").unwrap();
    let first: Value = serde_json::from_str(&lines[0]).unwrap();
    std::fs::remove_file(
        eval.join("pope/val2014")
            .join(first["image"].as_str().unwrap()),
    )
    .unwrap();
    let err = evaluate_benchmark(tiny_teacher(), Bench::Pope, &o, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("llava_pope_test.jsonl"), "{err}");
    assert!(
        err.contains("line 1") && err.contains("does not exist"),
        "{err}"
    );
    assert!(err.contains("line 3") && err.contains("not JSON"), "{err}");
    assert!(err.contains("--skip-bad"), "{err}");
    assert!(
        !o.bench_dir(Bench::Pope).exists(),
        "nothing written on error"
    );
    o.skip_bad = true;
    o.max_new_tokens = 2;
    let s = evaluate_benchmark(tiny_teacher(), Bench::Pope, &o, None).unwrap();
    // Labels are paired by image and question, so the questions after the bad ones keep theirs:
    // 10 answered and scored, 2 counted as bad.
    assert_eq!(
        (s["answered"].as_u64(), s["bad"].as_u64()),
        (Some(10), Some(2))
    );
    assert_eq!(s["bad_records"].as_array().unwrap().len(), 2);
    // A missing question file names itself.
    std::fs::remove_file(eval.join("gqa/llava_gqa_testdev_balanced.jsonl")).unwrap();
    let err = evaluate_benchmark(tiny_teacher(), Bench::Gqa, &o, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("llava_gqa_testdev_balanced.jsonl") && err.contains("does not exist"));
    // A malformed MMBench row (a column missing) names its line.
    let tsv = eval.join("mmbench/mmbench_dev_20230712.tsv");
    let text = std::fs::read_to_string(&tsv).unwrap();
    let cut: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == 2 {
                l.rsplit_once('\t').unwrap().0.to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(&tsv, cut.join("\n") + "\n").unwrap();
    o.skip_bad = false;
    let err = evaluate_benchmark(tiny_teacher(), Bench::MmBench, &o, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mmbench_dev_20230712.tsv") && err.contains("line 3"),
        "{err}"
    );
}

#[test]
fn eval_script_prints_the_paper_table_for_teacher_and_hybrid() {
    let out = tempfile::tempdir().unwrap();
    let result = matrepl_command()
        .current_dir(out.path())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/eval.rhai"))
        .args([
            "--model",
            "teacher,teacher@0.25",
            "--bench",
            "pope,sqa,mmbench",
        ])
        .args(["--root", fixture("bench").to_str().unwrap()])
        .args(["--out", out.path().join("runs").to_str().unwrap()])
        .args(["--max-new-tokens", "4", "--limit", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&result.stdout);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("| model | POPE (F1) | SQA-IMG | MMB |"),
        "{stdout}"
    );
    assert!(stdout.contains("| teacher | "), "{stdout}");
    assert!(stdout.contains("| teacher@0.25 | "), "{stdout}");
    for dir in ["teacher", "teacher_0.25"] {
        let s = out.path().join("runs").join(dir).join("summary.json");
        assert!(s.is_file(), "{}", s.display());
    }
    assert!(stderr.contains("pope: 2/2 answered"), "{stderr}");
}

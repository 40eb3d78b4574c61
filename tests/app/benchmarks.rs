//! Benchmark scoring on hand-made cases whose answers are worked out in the comments: VQAv2
//! normalisation and accuracy, POPE, MME, multiple choice (plain and circular), predictions
//! files, the comparison report, and bad input files.

use std::io::Write;

use matvlm::eval::benchmarks::*;
use matvlm::Error;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.path().join(name);
    std::fs::File::create(&p)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    p
}

#[test]
fn vqa_normalisation_follows_the_official_rules() {
    // Number words to digits, articles dropped, lower case, final period dropped.
    assert_eq!(vqa_normalize("Two dogs."), "2 dogs");
    assert_eq!(vqa_normalize("The Red one"), "red 1");
    // A slash between words becomes a space; next to a space it is deleted.
    assert_eq!(vqa_normalize("black/white"), "black white");
    assert_eq!(vqa_normalize("black / white"), "black white");
    // A digit-comma-digit group anywhere: every punctuation mark is deleted, not spaced.
    assert_eq!(vqa_normalize("1,000"), "1000");
    // A period followed by a digit stays.
    assert_eq!(vqa_normalize("3.5"), "3.5");
    // The apostrophe is punctuation: "man's" -> "man s"; "dont" is restored with upstream's
    // typographic apostrophe.
    assert_eq!(vqa_normalize("the man's hat"), "man s hat");
    assert_eq!(vqa_normalize("dont"), "don’t");
    // Newlines, tabs, runs of spaces.
    assert_eq!(vqa_normalize("  yes\n\tsir "), "yes sir");
    // '-' and '!' are not in the official list, so they stay.
    assert_eq!(vqa_normalize("t-shirt!"), "t-shirt!");
    // Idempotent on normalised text.
    for s in ["2 dogs", "man s hat", "don’t", "3.5"] {
        assert_eq!(vqa_normalize(s), s);
    }
    assert!(exact_match(" two ", "two"));
    assert!(!exact_match("Two", "two"));
    assert!(normalized_match("Two.", "2"));
}

#[test]
fn vqa_accuracy_is_the_leave_one_out_min_of_matches_over_three() {
    let refs = |spec: &[(&str, usize)]| -> Vec<String> {
        spec.iter()
            .flat_map(|(a, k)| std::iter::repeat_n(a.to_string(), *k))
            .collect()
    };
    // 10 answers, "2" given by 2 annotators. Leaving out one of the two "2"s leaves 1 match:
    // 1/3; leaving out any of the 8 others leaves 2 matches: 2/3.
    // (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 0.6
    let r = refs(&[("2", 2), ("3", 8)]);
    assert!(close(vqa_accuracy("two", &r), 0.6));
    // 3 annotators: leaving one of them out leaves 2 -> 2/3 (3 times), others leave 3 -> 1
    // (7 times): (3 * 2/3 + 7) / 10 = 0.9.
    let r = refs(&[("red", 3), ("blue", 7)]);
    assert!(close(vqa_accuracy("Red.", &r), 0.9));
    // 4 or more: always at least 3 left -> 1.
    let r = refs(&[("red", 4), ("blue", 6)]);
    assert!(close(vqa_accuracy("red", &r), 1.0));
    // No match: 0. One reference: normalised exact match.
    assert!(close(vqa_accuracy("green", &r), 0.0));
    assert!(close(vqa_accuracy("The cat", &["cat"]), 1.0));
    assert!(close(vqa_accuracy("dog", &["cat"]), 0.0));
    assert!(close(vqa_accuracy::<&str>("dog", &[]), 0.0));

    // Aggregation: item 1 gets 0.6 (type "how many"), item 2 gets 1 (type "what color"),
    // item 3 gets 0 (untyped). Mean 1.6 / 3.
    let items = vec![
        VqaItem {
            question_id: "1".into(),
            question: "How many?".into(),
            image: None,
            answers: refs(&[("2", 2), ("3", 8)]),
            question_type: Some("how many".into()),
            answer_type: Some("number".into()),
        },
        VqaItem {
            question_id: "2".into(),
            question: "What color?".into(),
            image: None,
            answers: vec!["red".into()],
            question_type: Some("what color".into()),
            answer_type: Some("other".into()),
        },
        VqaItem {
            question_id: "3".into(),
            question: "What?".into(),
            image: None,
            answers: vec!["cat".into()],
            question_type: None,
            answer_type: None,
        },
    ];
    let s = score_vqa(&items, &["two", "red", "dog"]).unwrap();
    assert_eq!(s.n, 3);
    assert!(close(s.accuracy, 1.6 / 3.0));
    // Exact match against the first reference: only "red" == "red" -> 1/3.
    assert!(close(s.exact_match, 1.0 / 3.0));
    // Normalised match against any reference: "two" ~ "2", "red" -> 2/3.
    assert!(close(s.normalized_match, 2.0 / 3.0));
    assert!(close(s.per_question_type["how many"].mean, 0.6));
    assert!(close(s.per_question_type["untyped"].mean, 0.0));
    assert_eq!(s.per_answer_type["other"].n, 1);
    assert!(matches!(
        score_vqa(&items, &["only one"]),
        Err(Error::Invalid(_))
    ));
}

#[test]
fn pope_scoring_matches_a_hand_count() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "pope.jsonl",
        r#"{"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"}
{"question_id": 2, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "no"}
{"question_id": 3, "image": "b.jpg", "text": "Is there a car in the image?", "label": "yes"}
{"question_id": 4, "image": "b.jpg", "text": "Is there a bus in the image?", "label": "no"}
{"question_id": 5, "image": "c.jpg", "question": "Is there a cup in the image?", "answer": "Yes"}
{"question_id": 6, "image": "c.jpg", "text": "Is there a fork in the image?", "label": "no"}
"#,
    );
    let items = read_pope(&path).unwrap();
    assert_eq!(items.len(), 6);
    assert_eq!(
        items.iter().map(|i| i.label).collect::<Vec<_>>(),
        vec![true, false, true, false, true, false]
    );
    // How POPE reads each answer:
    //   1 "Yes, there is a dog."            -> yes   (label yes: TP)
    //   2 "There is no cat."                -> no    (label no:  TN)
    //   3 "No. Wait, there is a car."       -> no    (first sentence "No"; label yes: FN)
    //   4 "Yes"                             -> yes   (label no:  FP)
    //   5 "I do not think so, but maybe."   -> no    ("not"; label yes: FN)
    //   6 "Nope"                            -> yes   ("Nope" is not a no-word; label no: FP)
    // TP 1, TN 1, FN 2, FP 2. accuracy 2/6, precision 1/3, recall 1/3, F1 1/3,
    // yes-ratio (TP + FP) / 6 = 3/6.
    let preds = [
        "Yes, there is a dog.",
        "There is no cat.",
        "No. Wait, there is a car.",
        "Yes",
        "I do not think so, but maybe.",
        "Nope",
    ];
    let s = score_pope(&items, &preds).unwrap();
    assert_eq!((s.tp, s.tn, s.fn_, s.fp), (1, 1, 2, 2));
    assert!(close(s.accuracy, 2.0 / 6.0));
    assert!(close(s.precision, 1.0 / 3.0));
    assert!(close(s.recall, 1.0 / 3.0));
    assert!(close(s.f1, 1.0 / 3.0));
    assert!(close(s.yes_ratio, 0.5));

    // A case with unequal precision and recall: labels yes yes yes no, answers
    // yes no no yes -> TP 1, FN 2, FP 1, TN 0: precision 1/2, recall 1/3,
    // F1 = 2 * (1/2)(1/3) / (1/2 + 1/3) = (1/3) / (5/6) = 2/5, accuracy 1/4, yes-ratio 2/4.
    let items4: Vec<PopeItem> = [true, true, true, false]
        .iter()
        .enumerate()
        .map(|(i, &label)| PopeItem {
            question_id: i.to_string(),
            image: String::new(),
            question: String::new(),
            label,
            category: Some(if i < 2 { "random" } else { "adversarial" }.into()),
        })
        .collect();
    let s = score_pope(&items4, &["yes", "no", "no", "yes"]).unwrap();
    assert!(close(s.precision, 0.5));
    assert!(close(s.recall, 1.0 / 3.0));
    assert!(close(s.f1, 0.4));
    assert!(close(s.accuracy, 0.25));
    assert!(close(s.yes_ratio, 0.5));
    // Per split: random = items 0, 1 (yes/yes, yes/no): TP 1, FN 1 -> accuracy 1/2;
    // adversarial = items 2, 3 (yes/no, no/yes): FN 1, FP 1 -> accuracy 0.
    let by = score_pope_by_category(&items4, &["yes", "no", "no", "yes"]).unwrap();
    assert!(close(by["random"].accuracy, 0.5));
    assert!(close(by["adversarial"].accuracy, 0.0));
    // All answers "no": precision is 0/0, reported as 0 (upstream would divide by zero).
    let s = score_pope(&items4, &["no"; 4]).unwrap();
    assert_eq!((s.precision, s.f1, s.yes_ratio), (0.0, 0.0, 0.0));
}

#[test]
fn mme_scoring_matches_a_hand_count() {
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results");
    std::fs::create_dir(&results).unwrap();
    // existence: 2 images x 2 questions, official results layout.
    std::fs::write(
        results.join("existence.txt"),
        "1.jpg\tIs there a dog?\tYes\tYes\n\
         1.jpg\tIs there a cat?\tNo\tNo, there is not.\n\
         2.jpg\tIs there a car?\tYes\tyes\n\
         2.jpg\tIs there a bus?\tNo\tYes\n",
    )
    .unwrap();
    // count: 2 images.
    std::fs::write(
        results.join("count.txt"),
        "3.jpg\tAre there two people?\tYes\tNot sure\n\
         3.jpg\tAre there three people?\tNo\tI think no\n\
         4.jpg\tIs there one apple?\tYes\tYes\n\
         4.jpg\tAre there two apples?\tNo\tNo\n",
    )
    .unwrap();
    // code_reasoning (cognition): 1 image.
    std::fs::write(
        results.join("code_reasoning.txt"),
        "5.png\tDoes it print 3?\tYes\tYes\n\
         5.png\tDoes it print 4?\tNo\tNo\n",
    )
    .unwrap();
    let items = read_mme_results_dir(&results).unwrap();
    assert_eq!(items.len(), 10);
    let preds = mme_stored_predictions(&items).unwrap();
    let s = score_mme(&items, &preds).unwrap();
    let cat = |name: &str| s.categories.iter().find(|c| c.category == name).unwrap();
    // existence: answers yes, no ("No, t" has "no" in its first 4 chars), yes, yes-for-no.
    //   3/4 right -> acc 0.75; image 1 both right, image 2 not -> acc+ 1/2 = 0.5;
    //   score 100 * (0.75 + 0.5) = 125.
    let e = cat("existence");
    assert_eq!((e.images, e.questions, e.other), (2, 4, 0));
    assert!(close(e.acc, 0.75) && close(e.acc_plus, 0.5) && close(e.score, 125.0));
    // count: "Not sure" -> "no" (prefix "not " contains "no") where "yes" was right: wrong;
    //   "I think no" -> prefix "i th": neither -> other, wrong; 4.jpg both right.
    //   acc 2/4 = 0.5; acc+ 1/2; score 100.
    let c = cat("count");
    assert_eq!(c.other, 1);
    assert!(close(c.acc, 0.5) && close(c.acc_plus, 0.5) && close(c.score, 100.0));
    // code_reasoning: both right -> 100 + 100 = 200.
    assert!(close(cat("code_reasoning").score, 200.0));
    // perception = existence + count = 225; cognition = 200; total 425.
    assert!(close(s.perception, 225.0));
    assert!(close(s.cognition, 200.0));
    assert!(close(s.total, 425.0));

    // The JSON-lines form reads the same questions; predictions passed separately override.
    let lines: Vec<String> = items
        .iter()
        .map(|i| {
            serde_json::json!({
                "category": i.category, "image": i.image, "question": i.question,
                "answer": if i.answer { "yes" } else { "no" },
            })
            .to_string()
        })
        .collect();
    let path = write(&dir, "mme.jsonl", &lines.join("\n"));
    let again = read_mme_jsonl(&path).unwrap();
    assert!(again.iter().all(|i| i.prediction.is_none()));
    assert!(matches!(
        mme_stored_predictions(&again),
        Err(Error::Invalid(_))
    ));
    // All answers "yes": every image gets one of its two right -> acc 0.5, acc+ 0, score 50
    // for each of the 3 categories.
    let s = score_mme(&again, &vec!["Yes"; again.len()]).unwrap();
    assert!(s.categories.iter().all(|c| close(c.score, 50.0)));
    assert!(close(s.total, 150.0));

    // A malformed line names the file and line.
    std::fs::write(results.join("OCR.txt"), "6.jpg\tWhat?\tmaybe\n").unwrap();
    match read_mme_results_dir(&results) {
        Err(Error::BadRecords {
            path,
            count,
            summary,
        }) => {
            assert!(path.ends_with("OCR.txt"));
            assert_eq!(count, 1);
            assert!(summary.contains("line 1"));
        }
        other => panic!("expected BadRecords, got {other:?}"),
    }
}

fn opts(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn option_letters_are_read_from_free_text() {
    let o = opts(&["red", "green", "dark blue", "yellow"]);
    let cases: &[(&str, Option<usize>)] = &[
        ("B", Some(1)),
        ("b", Some(1)),
        ("(C)", Some(2)),
        ("D.", Some(3)),
        ("The answer is A.", Some(0)),
        ("Answer: (C) dark blue", Some(2)),
        ("dark blue", Some(2)),
        ("I think it is yellow.", Some(3)),
        ("B. green", Some(1)),
        ("C) dark blue", Some(2)),
        ("Probably option D because of the sky", Some(3)),
        // Out of range, two letters, nothing recognisable.
        ("E", None),
        ("A or B", None),
        ("purple", None),
        ("", None),
    ];
    for (text, want) in cases {
        assert_eq!(extract_choice(text, &o), *want, "{text:?}");
    }
}

#[test]
fn multiple_choice_and_circular_scoring() {
    let dir = tempfile::tempdir().unwrap();
    // ScienceQA style (choices + index), MMBench style (A..D columns + letter).
    let path = write(
        &dir,
        "mc.jsonl",
        r#"{"id": "q1", "question": "Which is a mammal?", "choices": ["shark", "whale"], "answer": 1, "category": "biology"}
{"index": 7, "question": "Sky colour?", "hint": "Look up.", "A": "green", "B": "blue", "C": "red", "answer": "B", "category": "perception"}
{"id": "q3", "question": "2 + 2?", "options": ["3", "4", "5"], "answer": "A", "category": "math"}
"#,
    );
    let items = read_choice_jsonl(&path).unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[0].answer, 1);
    assert_eq!(items[1].id, "7");
    assert_eq!(items[1].options, opts(&["green", "blue", "red"]));
    assert_eq!(items[2].answer, 0);
    let prompt = choice_prompt(&items[1]);
    assert_eq!(
        prompt,
        "Look up.\nSky colour?\nA. green\nB. blue\nC. red\n\
         Answer with the option's letter from the given choices directly."
    );
    // q1 right ("whale" -> B), item 7 wrong (A), q3 unparsed -> 1/3, 1 unparsed.
    let s = score_choice(&items, &["whale", "A", "no idea"]).unwrap();
    assert_eq!((s.overall.n, s.overall.correct, s.unparsed), (3, 1, 1));
    assert!(close(s.overall.accuracy, 1.0 / 3.0));
    assert!(close(s.per_category["biology"].accuracy, 1.0));
    assert!(close(s.per_category["perception"].accuracy, 0.0));
    assert!(s.circular.is_none());

    // Circular evaluation of item 7 (3 options): rotations
    //   #0 green blue red (answer B), #1 blue red green (A), #2 red green blue (C).
    let rot = circular_variants(&items[1]);
    assert_eq!(rot.len(), 3);
    assert_eq!(rot[1].options, opts(&["blue", "red", "green"]));
    assert_eq!(
        rot.iter().map(|r| r.answer).collect::<Vec<_>>(),
        vec![1, 0, 2]
    );
    for r in &rot {
        assert_eq!(r.options[r.answer], "blue");
    }
    // Plus q1's 2 rotations: shark whale (B), whale shark (A).
    let mut all = rot.clone();
    all.extend(circular_variants(&items[0]));
    // Item 7 right in all 3 rotations; q1 right once, wrong once.
    // Per question 4/5 right; circular: item 7 passes, q1 fails -> 1/2.
    let s = score_choice(&all, &["B", "A", "C", "B", "B"]).unwrap();
    assert_eq!(s.overall.correct, 4);
    let c = s.circular.unwrap();
    assert_eq!((c.n, c.correct), (2, 1));
    assert!(close(c.accuracy, 0.5));
}

#[test]
fn predictions_files_align_with_items() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "answers.jsonl",
        r#"{"question_id": 2, "text": "no"}
{"question_id": "1", "answer": "yes"}
"#,
    );
    let preds = read_predictions(&path).unwrap();
    assert_eq!(preds.len(), 2);
    assert_eq!(
        align_predictions(&["1", "2"], &preds).unwrap(),
        vec!["yes", "no"]
    );
    match align_predictions(&["1", "3"], &preds) {
        Err(Error::Invalid(msg)) => assert!(msg.contains('3'), "{msg}"),
        other => panic!("expected a missing-id error, got {other:?}"),
    }
    let dup = write(
        &dir,
        "dup.jsonl",
        "{\"question_id\": 1, \"text\": \"a\"}\n{\"question_id\": 1, \"text\": \"b\"}\n",
    );
    assert!(matches!(
        read_predictions(&dup),
        Err(Error::BadRecords { count: 1, .. })
    ));
    let broken = write(&dir, "broken.jsonl", "{\"question_id\": 1\n");
    match read_pope(&broken) {
        Err(Error::BadConfig { path, reason }) => {
            assert!(path.ends_with("broken.jsonl"));
            assert!(reason.contains("line 1"));
        }
        other => panic!("expected BadConfig, got {other:?}"),
    }
    let bad_label = write(
        &dir,
        "bad.jsonl",
        "{\"question_id\": 1, \"text\": \"q\", \"label\": \"maybe\"}\n",
    );
    assert!(matches!(
        read_pope(&bad_label),
        Err(Error::BadRecords { count: 1, .. })
    ));
}

#[test]
fn comparison_report_as_markdown_and_json() {
    let mut c = Comparison::new();
    c.set("teacher", "POPE", "f1", 0.87);
    c.set("hybrid-0.25", "POPE", "f1", 0.81);
    c.set_lower_better("teacher", "answers", "perplexity", 3.5);
    c.set_lower_better("hybrid-0.25", "answers", "perplexity", 4.25);
    c.set("hybrid-0.25", "MME", "perception", 1200.0);
    assert_eq!(c.models, vec!["teacher", "hybrid-0.25"]);
    assert_eq!(c.get("teacher", "MME", "perception"), None);
    assert_eq!(c.get("hybrid-0.25", "MME", "perception"), Some(1200.0));
    let md = c.to_markdown();
    let lines: Vec<&str> = md.lines().collect();
    assert_eq!(lines[0], "| benchmark | metric | teacher | hybrid-0.25 |");
    assert_eq!(lines[1], "|---|---|---:|---:|");
    // Best in bold: the larger F1, the smaller perplexity; one value alone is not bolded.
    assert_eq!(lines[2], "| POPE | f1 | **0.8700** | 0.8100 |");
    assert_eq!(lines[3], "| answers | perplexity | **3.5000** | 4.2500 |");
    assert_eq!(lines[4], "| MME | perception | - | 1200.0 |");

    // Scores of each benchmark go in through the add_* helpers.
    let items: Vec<PopeItem> = [true, false]
        .iter()
        .map(|&label| PopeItem {
            question_id: String::new(),
            image: String::new(),
            question: String::new(),
            label,
            category: None,
        })
        .collect();
    let pope = score_pope(&items, &["yes", "no"]).unwrap();
    c.add_pope("student", "POPE", &pope);
    assert_eq!(c.get("student", "POPE", "accuracy"), Some(1.0));
    assert_eq!(c.get("student", "POPE", "yes_ratio"), Some(0.5));
    assert_eq!(c.get("teacher", "POPE", "accuracy"), None);

    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("cmp.json");
    c.save(&json).unwrap();
    assert_eq!(Comparison::load(&json).unwrap(), c);
    let md_path = dir.path().join("cmp.md");
    c.save(&md_path).unwrap();
    assert_eq!(std::fs::read_to_string(&md_path).unwrap(), c.to_markdown());
}

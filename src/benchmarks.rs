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
//! * [`Comparison`]: models side by side, as a markdown table or JSON.
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

// ---------------------------------------------------------------------------------------------
// VQAv2 answer normalisation and accuracy

/// Punctuation the official script removes or turns into a space (note: no `-`, `!` or `.`).
const VQA_PUNCT: &[char] = &[
    ';', ':', '/', '\'', '[', ']', '"', '(', ')', '=', '+', '\\', '_', '>', '<', '@', '`', ',', '?',
];

const VQA_ARTICLES: &[&str] = &["a", "an", "the"];

/// Number words the official script maps to digits (only up to ten, and "none" to 0).
fn vqa_number(word: &str) -> Option<&'static str> {
    Some(match word {
        "none" | "zero" => "0",
        "one" => "1",
        "two" => "2",
        "three" => "3",
        "four" => "4",
        "five" => "5",
        "six" => "6",
        "seven" => "7",
        "eight" => "8",
        "nine" => "9",
        "ten" => "10",
        _ => return None,
    })
}

/// Contractions written without an apostrophe, restored the way the official script does.
/// Upstream's table spells most of them with a typographic apostrophe (’) and a few with a plain
/// one; we keep its spelling, so results match the official numbers exactly.
fn vqa_contraction(word: &str) -> Option<&'static str> {
    Some(match word {
        "aint" => "ain't",
        "arent" => "aren't",
        "cant" => "can't",
        "couldve" => "could've",
        "couldnt" => "couldn't",
        "couldn'tve" | "couldnt’ve" => "couldn’t’ve",
        "didnt" => "didn’t",
        "doesnt" => "doesn’t",
        "dont" => "don’t",
        "hadnt" => "hadn’t",
        "hadnt’ve" | "hadn'tve" => "hadn’t’ve",
        "hasnt" => "hasn’t",
        "havent" => "haven’t",
        "hed" => "he’d",
        "hed’ve" | "he’dve" => "he’d’ve",
        "hes" => "he’s",
        "howd" => "how’d",
        "howll" => "how’ll",
        "hows" => "how’s",
        "Id’ve" | "I’dve" => "I’d’ve",
        "Im" => "I’m",
        "Ive" => "I’ve",
        "isnt" => "isn’t",
        "itd" => "it’d",
        "itd’ve" | "it’dve" => "it’d’ve",
        "itll" => "it’ll",
        "let’s" => "let’s",
        "maam" => "ma’am",
        "mightnt" => "mightn’t",
        "mightnt’ve" | "mightn’tve" => "mightn’t’ve",
        "mightve" => "might’ve",
        "mustnt" => "mustn’t",
        "mustve" => "must’ve",
        "neednt" => "needn’t",
        "notve" => "not’ve",
        "oclock" => "o’clock",
        "oughtnt" => "oughtn’t",
        "ow’s’at" | "’ows’at" | "’ow’sat" => "’ow’s’at",
        "shant" => "shan’t",
        "shed’ve" | "she’dve" => "she’d’ve",
        "she’s" => "she’s",
        "shouldve" => "should’ve",
        "shouldnt" => "shouldn’t",
        "shouldnt’ve" | "shouldn’tve" => "shouldn’t’ve",
        "somebody’d" => "somebodyd",
        "somebodyd’ve" | "somebody’dve" => "somebody’d’ve",
        "somebodyll" => "somebody’ll",
        "somebodys" => "somebody’s",
        "someoned" => "someone’d",
        "someoned’ve" | "someone’dve" => "someone’d’ve",
        "someonell" => "someone’ll",
        "someones" => "someone’s",
        "somethingd" => "something’d",
        "somethingd’ve" | "something’dve" => "something’d’ve",
        "somethingll" => "something’ll",
        "thats" => "that’s",
        "thered" => "there’d",
        "thered’ve" | "there’dve" => "there’d’ve",
        "therere" => "there’re",
        "theres" => "there’s",
        "theyd" => "they’d",
        "theyd’ve" | "they’dve" => "they’d’ve",
        "theyll" => "they’ll",
        "theyre" => "they’re",
        "theyve" => "they’ve",
        "twas" => "’twas",
        "wasnt" => "wasn’t",
        "wed’ve" | "we’dve" => "we’d’ve",
        "weve" => "we've",
        "werent" => "weren’t",
        "whatll" => "what’ll",
        "whatre" => "what’re",
        "whats" => "what’s",
        "whatve" => "what’ve",
        "whens" => "when’s",
        "whered" => "where’d",
        "wheres" => "where's",
        "whereve" => "where’ve",
        "whod" => "who’d",
        "whod’ve" | "who’dve" => "who’d’ve",
        "wholl" => "who’ll",
        "whos" => "who’s",
        "whove" => "who've",
        "whyll" => "why’ll",
        "whyre" => "why’re",
        "whys" => "why’s",
        "wont" => "won’t",
        "wouldve" => "would’ve",
        "wouldnt" => "wouldn’t",
        "wouldnt’ve" | "wouldn’tve" => "wouldn’t’ve",
        "yall" => "y’all",
        "yall’ll" | "y’allll" => "y’all’ll",
        "yall’d’ve" | "y’alld’ve" | "y’all’dve" => "y’all’d’ve",
        "youd" => "you’d",
        "youd’ve" | "you’dve" => "you’d’ve",
        "youll" => "you’ll",
        "youre" => "you’re",
        "youve" => "you’ve",
        _ => return None,
    })
}

/// The official `processPunctuation`: a punctuation mark next to a space, or any mark at all in
/// an answer holding a digit-comma-digit group ("1,000"), is deleted; otherwise it becomes a
/// space ("black/white" -> "black white"). Then every period not followed by a digit goes
/// ("3.5" keeps its point).
fn vqa_punctuation(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let has_digit_comma_digit = chars
        .windows(3)
        .any(|w| w[0].is_ascii_digit() && w[1] == ',' && w[2].is_ascii_digit());
    let mut out = text.to_string();
    for &p in VQA_PUNCT {
        // Upstream tests the *input* text, not the partly processed one; so do we.
        let spaced = text.contains(&format!("{p} ")) || text.contains(&format!(" {p}"));
        let with = if spaced || has_digit_comma_digit {
            ""
        } else {
            " "
        };
        out = out.replace(p, with);
    }
    let chars: Vec<char> = out.chars().collect();
    chars
        .iter()
        .enumerate()
        .filter(|&(i, &c)| c != '.' || chars.get(i + 1).is_some_and(|n| n.is_ascii_digit()))
        .map(|(_, &c)| c)
        .collect()
}

/// The official `processDigitArticle`: lower-case, split on whitespace, number words to digits,
/// articles dropped, apostrophe-less contractions restored, words joined by one space.
fn vqa_digit_article(text: &str) -> String {
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower
        .split_whitespace()
        .map(|w| vqa_number(w).unwrap_or(w))
        .filter(|w| !VQA_ARTICLES.contains(w))
        .map(|w| vqa_contraction(w).unwrap_or(w))
        .collect();
    words.join(" ")
}

/// Normalise an answer as the official VQAv2 evaluation does: newlines and tabs to spaces,
/// trimmed, punctuation handled, lower-cased, number words to digits, articles dropped,
/// contractions restored. `"Two dogs."` -> `"2 dogs"`, `"The man's hat"` -> `"man s hat"`.
pub fn vqa_normalize(answer: &str) -> String {
    let text = answer.replace(['\n', '\t'], " ");
    vqa_digit_article(&vqa_punctuation(text.trim()))
}

/// VQAv2 accuracy of one prediction against the annotators' answers (10 in VQAv2): for each
/// leave-one-out subset of the references, `min(1, matches / 3)`, averaged. With a single
/// reference the official formula always gives 0 (the left-out subset is empty), so a single
/// reference is scored as a normalised exact match instead. Both sides go through
/// [`vqa_normalize`] (upstream assumes pre-normalised references; normalising is idempotent on
/// those). No references: 0.
pub fn vqa_accuracy<S: AsRef<str>>(prediction: &str, references: &[S]) -> f64 {
    let pred = vqa_normalize(prediction);
    let refs: Vec<String> = references
        .iter()
        .map(|r| vqa_normalize(r.as_ref()))
        .collect();
    match refs.len() {
        0 => 0.0,
        1 => f64::from(u8::from(refs[0] == pred)),
        n => {
            let total_matches = refs.iter().filter(|r| **r == pred).count();
            let sum: f64 = refs
                .iter()
                .map(|r| {
                    let others = total_matches - usize::from(*r == pred);
                    (others as f64 / 3.0).min(1.0)
                })
                .sum();
            sum / n as f64
        }
    }
}

/// Exact string match after trimming surrounding whitespace (nothing else forgiven).
pub fn exact_match(prediction: &str, reference: &str) -> bool {
    prediction.trim() == reference.trim()
}

/// Match after [`vqa_normalize`] on both sides.
pub fn normalized_match(prediction: &str, reference: &str) -> bool {
    vqa_normalize(prediction) == vqa_normalize(reference)
}

/// One open-ended question with its reference answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VqaItem {
    pub question_id: String,
    pub question: String,
    #[serde(default)]
    pub image: Option<String>,
    /// The annotators' answers (one or more).
    pub answers: Vec<String>,
    #[serde(default)]
    pub question_type: Option<String>,
    #[serde(default)]
    pub answer_type: Option<String>,
}

/// Mean accuracy and count of one group of items.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Mean {
    pub n: usize,
    pub mean: f64,
}

impl Mean {
    fn add(&mut self, x: f64) {
        self.n += 1;
        self.mean += (x - self.mean) / self.n as f64;
    }
}

/// The outcome of [`score_vqa`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VqaScore {
    pub n: usize,
    /// Mean [`vqa_accuracy`].
    pub accuracy: f64,
    /// Share of predictions equal to the first reference after trimming.
    pub exact_match: f64,
    /// Share of predictions equal to any reference after [`vqa_normalize`].
    pub normalized_match: f64,
    /// Mean VQA accuracy per question type / answer type (`"untyped"` when absent).
    pub per_question_type: BTreeMap<String, Mean>,
    pub per_answer_type: BTreeMap<String, Mean>,
}

/// Score open-ended answers (`predictions[i]` answers `items[i]`).
pub fn score_vqa<S: AsRef<str>>(items: &[VqaItem], predictions: &[S]) -> Result<VqaScore> {
    check_aligned("VQA", items.len(), predictions.len())?;
    let (mut acc, mut em, mut nm) = (Mean::default(), Mean::default(), Mean::default());
    let mut per_q: BTreeMap<String, Mean> = BTreeMap::new();
    let mut per_a: BTreeMap<String, Mean> = BTreeMap::new();
    let typed = |t: &Option<String>| t.clone().unwrap_or_else(|| "untyped".into());
    for (item, pred) in items.iter().zip(predictions) {
        let pred = pred.as_ref();
        let a = vqa_accuracy(pred, &item.answers);
        acc.add(a);
        let first = item.answers.first().map(String::as_str).unwrap_or("");
        em.add(f64::from(u8::from(exact_match(pred, first))));
        let any = item.answers.iter().any(|r| normalized_match(pred, r));
        nm.add(f64::from(u8::from(any)));
        per_q.entry(typed(&item.question_type)).or_default().add(a);
        per_a.entry(typed(&item.answer_type)).or_default().add(a);
    }
    Ok(VqaScore {
        n: items.len(),
        accuracy: acc.mean,
        exact_match: em.mean,
        normalized_match: nm.mean,
        per_question_type: per_q,
        per_answer_type: per_a,
    })
}

/// Read open-ended questions from JSON lines: `question_id` (or `id`), `question` (or `text`),
/// optional `image`, the references as `answers` (strings, or VQAv2's `{"answer": ...}` objects)
/// or a single `answer`, optional `question_type` and `answer_type`.
pub fn read_vqa_jsonl(path: &Path) -> Result<Vec<VqaItem>> {
    let rows = read_jsonl(path)?;
    let mut bad = BadLines::new(path);
    let mut out = Vec::with_capacity(rows.len());
    for (line, row) in rows {
        let answers: Option<Vec<String>> = match (row.get("answers"), row.get("answer")) {
            (Some(Value::Array(a)), _) => a
                .iter()
                .map(|x| match x {
                    Value::String(s) => Some(s.clone()),
                    Value::Object(o) => o.get("answer").and_then(Value::as_str).map(str::to_owned),
                    _ => None,
                })
                .collect(),
            (_, Some(Value::String(s))) => Some(vec![s.clone()]),
            _ => None,
        };
        let (Some(id), Some(question), Some(answers)) = (
            id_field(&row, &["question_id", "id"]),
            str_field(&row, &["question", "text"]),
            answers.filter(|a| !a.is_empty()),
        ) else {
            bad.push(line, "needs question_id, question and answers (or answer)");
            continue;
        };
        out.push(VqaItem {
            question_id: id,
            question,
            image: str_field(&row, &["image"]),
            answers,
            question_type: str_field(&row, &["question_type"]),
            answer_type: str_field(&row, &["answer_type"]),
        });
    }
    bad.finish(out)
}

// ---------------------------------------------------------------------------------------------
// POPE

/// One POPE question: "Is there a <object> in the image?" with its yes/no label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PopeItem {
    pub question_id: String,
    pub image: String,
    pub question: String,
    /// `true` for "yes".
    pub label: bool,
    /// The POPE split (random, popular, adversarial) when the file says.
    #[serde(default)]
    pub category: Option<String>,
}

/// Read POPE questions from JSON lines, as POPE and LLaVA ship them (`question_id`, `image`,
/// `text`, `label`) or with `question` / `answer` field names; labels are "yes" or "no" in any
/// case.
pub fn read_pope(path: &Path) -> Result<Vec<PopeItem>> {
    let rows = read_jsonl(path)?;
    let mut bad = BadLines::new(path);
    let mut out = Vec::with_capacity(rows.len());
    for (line, row) in rows {
        let label = str_field(&row, &["label", "answer"]).and_then(|l| yes_no(&l));
        let (Some(id), Some(question), Some(label)) = (
            id_field(&row, &["question_id", "id"]),
            str_field(&row, &["text", "question"]),
            label,
        ) else {
            bad.push(line, "needs question_id, text (or question), label yes/no");
            continue;
        };
        out.push(PopeItem {
            question_id: id,
            image: str_field(&row, &["image"]).unwrap_or_default(),
            question,
            label,
            category: str_field(&row, &["category"]),
        });
    }
    bad.finish(out)
}

/// POPE's reading of a free-text answer: only the first sentence counts (up to the first `.`),
/// commas are dropped, and the answer is "no" when one of its space-separated words is exactly
/// `No`, `no` or `not`; anything else is "yes". Returns `true` for yes.
pub fn pope_parse_answer(text: &str) -> bool {
    let first = text.split('.').next().unwrap_or("");
    let cleaned = first.replace(',', "");
    !cleaned
        .split(' ')
        .any(|w| w == "No" || w == "no" || w == "not")
}

/// POPE's metrics, "yes" being the positive class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PopeScore {
    pub n: usize,
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    #[serde(rename = "fn")]
    pub fn_: usize,
    pub accuracy: f64,
    /// `tp / (tp + fp)`; 0 when nothing was answered "yes" (upstream divides by zero).
    pub precision: f64,
    /// `tp / (tp + fn)`; 0 when no label is "yes".
    pub recall: f64,
    /// Harmonic mean of precision and recall; 0 when both are 0.
    pub f1: f64,
    /// Share of answers read as "yes" (about 0.5 for an unbiased model on balanced POPE).
    pub yes_ratio: f64,
}

fn ratio(num: usize, den: usize) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

/// Score POPE answers (`predictions[i]` answers `items[i]`), each read by [`pope_parse_answer`].
pub fn score_pope<S: AsRef<str>>(items: &[PopeItem], predictions: &[S]) -> Result<PopeScore> {
    check_aligned("POPE", items.len(), predictions.len())?;
    let (mut tp, mut fp, mut tn, mut fn_) = (0, 0, 0, 0);
    for (item, pred) in items.iter().zip(predictions) {
        match (pope_parse_answer(pred.as_ref()), item.label) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, false) => tn += 1,
            (false, true) => fn_ += 1,
        }
    }
    let n = items.len();
    let (precision, recall) = (ratio(tp, tp + fp), ratio(tp, tp + fn_));
    let f1 = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    Ok(PopeScore {
        n,
        tp,
        fp,
        tn,
        fn_,
        accuracy: ratio(tp + tn, n),
        precision,
        recall,
        f1,
        yes_ratio: ratio(tp + fp, n),
    })
}

/// [`score_pope`] per POPE split (the items' `category`, `"all"` when absent).
pub fn score_pope_by_category<S: AsRef<str>>(
    items: &[PopeItem],
    predictions: &[S],
) -> Result<BTreeMap<String, PopeScore>> {
    check_aligned("POPE", items.len(), predictions.len())?;
    let mut groups: BTreeMap<String, (Vec<PopeItem>, Vec<&str>)> = BTreeMap::new();
    for (item, pred) in items.iter().zip(predictions) {
        let key = item.category.clone().unwrap_or_else(|| "all".into());
        let g = groups.entry(key).or_default();
        g.0.push(item.clone());
        g.1.push(pred.as_ref());
    }
    groups
        .into_iter()
        .map(|(k, (items, preds))| Ok((k, score_pope(&items, &preds)?)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// MME

/// MME's perception categories (their scores sum to the perception score, max 2000).
pub const MME_PERCEPTION: &[&str] = &[
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
];

/// MME's cognition categories (max 800).
pub const MME_COGNITION: &[&str] = &[
    "commonsense_reasoning",
    "numerical_calculation",
    "text_translation",
    "code_reasoning",
];

/// One MME question. Each image is asked two questions, one answered "yes", one "no".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmeItem {
    pub category: String,
    pub image: String,
    pub question: String,
    /// `true` for "yes".
    pub answer: bool,
    /// The model's answer when the file holds one (the official results layout does).
    #[serde(default)]
    pub prediction: Option<String>,
}

/// Read MME from the official evaluation tool's layout: a folder of `<category>.txt` files, one
/// question per line, tab-separated `image, question, answer[, prediction]`. Categories come in
/// file-name order.
pub fn read_mme_results_dir(dir: &Path) -> Result<Vec<MmeItem>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::NotFound(format!(
            "no MME <category>.txt files in {}",
            dir.display()
        )));
    }
    let mut out = Vec::new();
    for path in files {
        let category = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let mut bad = BadLines::new(&path);
        let mut items = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let cols: Vec<&str> = line.split('\t').collect();
            let answer = cols.get(2).and_then(|a| yes_no(a));
            match (cols.len(), answer) {
                (3 | 4, Some(answer)) => items.push(MmeItem {
                    category: category.clone(),
                    image: cols[0].to_string(),
                    question: cols[1].to_string(),
                    answer,
                    prediction: cols.get(3).map(|p| p.to_string()),
                }),
                _ => bad.push(
                    i + 1,
                    "expected image<TAB>question<TAB>yes|no[<TAB>prediction]",
                ),
            }
        }
        out.extend(bad.finish(items)?);
    }
    Ok(out)
}

/// Read MME from JSON lines: `category`, `image`, `question`, `answer` (yes/no), optional
/// `prediction`.
pub fn read_mme_jsonl(path: &Path) -> Result<Vec<MmeItem>> {
    let rows = read_jsonl(path)?;
    let mut bad = BadLines::new(path);
    let mut out = Vec::with_capacity(rows.len());
    for (line, row) in rows {
        let answer = str_field(&row, &["answer", "label"]).and_then(|a| yes_no(&a));
        let (Some(category), Some(image), Some(question), Some(answer)) = (
            str_field(&row, &["category"]),
            str_field(&row, &["image"]),
            str_field(&row, &["question", "text"]),
            answer,
        ) else {
            bad.push(line, "needs category, image, question and answer yes/no");
            continue;
        };
        out.push(MmeItem {
            category,
            image,
            question,
            answer,
            prediction: str_field(&row, &["prediction"]),
        });
    }
    bad.finish(out)
}

/// MME's reading of an answer: lower-cased; exactly "yes" or "no", else "yes" or "no" found in
/// the first four characters ("yes" tested first; "not sure" reads as "no", as upstream's
/// does); else neither (`None`, always wrong).
pub fn mme_parse_answer(text: &str) -> Option<bool> {
    let lower = text.trim_end_matches(['\n', '\r']).to_lowercase();
    match lower.as_str() {
        "yes" => return Some(true),
        "no" => return Some(false),
        _ => {}
    }
    let prefix: String = lower.chars().take(4).collect();
    if prefix.contains("yes") {
        Some(true)
    } else if prefix.contains("no") {
        Some(false)
    } else {
        None
    }
}

/// MME metrics of one category.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmeCategoryScore {
    pub category: String,
    pub images: usize,
    pub questions: usize,
    /// Share of questions answered right.
    pub acc: f64,
    /// Share of images whose questions are all answered right.
    pub acc_plus: f64,
    /// `100 * (acc + acc_plus)`, at most 200.
    pub score: f64,
    /// Answers read as neither yes nor no.
    pub other: usize,
}

/// The outcome of [`score_mme`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmeScore {
    pub categories: Vec<MmeCategoryScore>,
    /// Sum of the [`MME_PERCEPTION`] category scores present.
    pub perception: f64,
    /// Sum of the [`MME_COGNITION`] category scores present.
    pub cognition: f64,
    /// Sum of every category's score (categories outside both lists included).
    pub total: f64,
}

/// Score MME answers (`predictions[i]` answers `items[i]`). Questions are grouped per category,
/// then per image in order of first appearance; upstream pairs consecutive lines, which is the
/// same on MME's files, where an image's two questions are adjacent. Accuracy+ counts an image
/// when all its questions are right (both, on MME).
pub fn score_mme<S: AsRef<str>>(items: &[MmeItem], predictions: &[S]) -> Result<MmeScore> {
    check_aligned("MME", items.len(), predictions.len())?;
    // category -> (image -> (questions, right)), each in order of first appearance
    let mut cats: Vec<(String, Vec<(String, usize, usize)>, usize)> = Vec::new();
    for (item, pred) in items.iter().zip(predictions) {
        let parsed = mme_parse_answer(pred.as_ref());
        let ci = match cats.iter().position(|c| c.0 == item.category) {
            Some(i) => i,
            None => {
                cats.push((item.category.clone(), Vec::new(), 0));
                cats.len() - 1
            }
        };
        let (_, images, other) = &mut cats[ci];
        *other += usize::from(parsed.is_none());
        let ii = match images.iter().position(|im| im.0 == item.image) {
            Some(i) => i,
            None => {
                images.push((item.image.clone(), 0, 0));
                images.len() - 1
            }
        };
        images[ii].1 += 1;
        images[ii].2 += usize::from(parsed == Some(item.answer));
    }
    let categories: Vec<MmeCategoryScore> = cats
        .into_iter()
        .map(|(category, images, other)| {
            let questions: usize = images.iter().map(|i| i.1).sum();
            let right: usize = images.iter().map(|i| i.2).sum();
            let all_right = images.iter().filter(|i| i.1 == i.2).count();
            let acc = ratio(right, questions);
            let acc_plus = ratio(all_right, images.len());
            MmeCategoryScore {
                category,
                images: images.len(),
                questions,
                acc,
                acc_plus,
                score: 100.0 * (acc + acc_plus),
                other,
            }
        })
        .collect();
    let sum_of = |names: &[&str]| -> f64 {
        categories
            .iter()
            .filter(|c| names.contains(&c.category.as_str()))
            .map(|c| c.score)
            .sum()
    };
    Ok(MmeScore {
        perception: sum_of(MME_PERCEPTION),
        cognition: sum_of(MME_COGNITION),
        total: categories.iter().map(|c| c.score).sum(),
        categories,
    })
}

/// The predictions stored in MME items (the official results layout), in item order; an error
/// names the first item without one.
pub fn mme_stored_predictions(items: &[MmeItem]) -> Result<Vec<String>> {
    items
        .iter()
        .map(|it| {
            it.prediction.clone().ok_or_else(|| {
                Error::Invalid(format!(
                    "MME item {} / {} ({:?}) has no prediction",
                    it.category, it.image, it.question
                ))
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Multiple choice (ScienceQA, MMBench)

/// One multiple-choice question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChoiceItem {
    pub id: String,
    pub question: String,
    /// A context or hint shown before the question (MMBench's `hint`, ScienceQA's lecture).
    #[serde(default)]
    pub hint: Option<String>,
    #[serde(default)]
    pub image: Option<String>,
    /// Option texts, labelled A, B, C, ... in this order.
    pub options: Vec<String>,
    /// Index of the right option.
    pub answer: usize,
    #[serde(default)]
    pub category: Option<String>,
    /// Items sharing a group are rotations of one question (MMBench circular evaluation).
    #[serde(default)]
    pub circular_group: Option<String>,
}

/// The letter of option `i` (A, B, ...).
pub fn option_letter(i: usize) -> char {
    (b'A' + (i % 26) as u8) as char
}

/// The prompt LLaVA-style evaluations use: hint, question, lettered options, and the request
/// to answer with the letter.
pub fn choice_prompt(item: &ChoiceItem) -> String {
    let mut s = String::new();
    if let Some(h) = item.hint.as_deref().filter(|h| !h.trim().is_empty()) {
        s.push_str(h.trim());
        s.push('\n');
    }
    s.push_str(item.question.trim());
    for (i, o) in item.options.iter().enumerate() {
        s.push_str(&format!("\n{}. {}", option_letter(i), o.trim()));
    }
    s.push_str("\nAnswer with the option's letter from the given choices directly.");
    s
}

/// Read multiple-choice questions from JSON lines. Options come from `options` or `choices`
/// (a list) or from the keys `A`, `B`, ... (MMBench's columns); the answer is a letter or a
/// 0-based index (ScienceQA); `id` / `index` / `question_id` names the item; optional `hint`,
/// `image`, `category`, `circular_group`.
pub fn read_choice_jsonl(path: &Path) -> Result<Vec<ChoiceItem>> {
    let rows = read_jsonl(path)?;
    let mut bad = BadLines::new(path);
    let mut out = Vec::with_capacity(rows.len());
    for (line, row) in rows {
        let options: Vec<String> = match row.get("options").or_else(|| row.get("choices")) {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect(),
            _ => (0..26)
                .map_while(|i| str_field(&row, &[&option_letter(i).to_string()]))
                .collect(),
        };
        let answer = match row.get("answer") {
            Some(Value::Number(n)) => n.as_u64().map(|n| n as usize),
            Some(Value::String(s)) => {
                let s = s.trim();
                let mut chars = s.chars();
                match (chars.next(), chars.next()) {
                    (Some(c), None) if c.is_ascii_uppercase() => Some((c as u8 - b'A') as usize),
                    _ => s.parse::<usize>().ok(),
                }
            }
            _ => None,
        };
        let (Some(id), Some(question), Some(answer)) = (
            id_field(&row, &["id", "index", "question_id"]),
            str_field(&row, &["question"]),
            answer.filter(|&a| a < options.len()),
        ) else {
            bad.push(
                line,
                "needs id, question, at least one option and an answer letter or index among them",
            );
            continue;
        };
        out.push(ChoiceItem {
            id,
            question,
            hint: str_field(&row, &["hint"]),
            image: str_field(&row, &["image"]),
            options,
            answer,
            category: str_field(&row, &["category"]),
            circular_group: id_field(&row, &["circular_group"]),
        });
    }
    bad.finish(out)
}

/// The rotations of an item for MMBench's circular evaluation: with n options, n items whose
/// options are shifted by 0..n places (the answer index follows), all in one `circular_group`
/// (the item's id), ids suffixed `#k`.
pub fn circular_variants(item: &ChoiceItem) -> Vec<ChoiceItem> {
    let n = item.options.len();
    (0..n)
        .map(|k| {
            let mut v = item.clone();
            v.options = (0..n).map(|i| item.options[(i + k) % n].clone()).collect();
            v.answer = (item.answer + n - k) % n;
            v.id = format!("{}#{k}", item.id);
            v.circular_group = Some(item.id.clone());
            v
        })
        .collect()
}

fn squash(s: &str) -> String {
    s.to_lowercase()
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Read the chosen option from a free-text answer; `None` when it cannot be told (scored wrong).
/// In order:
/// 1. the whole answer is one letter, maybe bracketed or followed by punctuation (`"b"`,
///    `"(C)"`, `"D."`);
/// 2. "answer is X" / "answer: X" (ScienceQA's "The answer is A.");
/// 3. the answer is, or contains, exactly one option's text (compared lower-case, punctuation
///    dropped);
/// 4. it starts with a letter and a separator (`"B. red"`, `"C) ..."`, `"A: ..."`);
/// 5. exactly one distinct capital option letter stands alone as a word.
pub fn extract_choice(text: &str, options: &[String]) -> Option<usize> {
    let n = options.len();
    let letter_index = |c: char| -> Option<usize> {
        let i = (c.to_ascii_uppercase() as u32).checked_sub('A' as u32)? as usize;
        (c.is_ascii_alphabetic() && i < n).then_some(i)
    };
    let t = text.trim();
    let bare = t.trim_matches(|c: char| !c.is_alphanumeric());
    if bare.chars().count() == 1 {
        return bare.chars().next().and_then(letter_index);
    }
    let lower = t.to_lowercase();
    for cue in ["answer is", "answer:"] {
        if let Some(pos) = lower.find(cue) {
            let rest: Vec<char> = t[pos + cue.len()..]
                .trim_start_matches(|c: char| c.is_whitespace() || c == '(' || c == ':')
                .chars()
                .collect();
            if let Some(&c) = rest.first() {
                if c.is_ascii_uppercase() && !rest.get(1).is_some_and(|x| x.is_alphanumeric()) {
                    if let Some(i) = letter_index(c) {
                        return Some(i);
                    }
                }
            }
        }
    }
    let said = squash(t);
    let squashed: Vec<String> = options.iter().map(|o| squash(o)).collect();
    let equal: Vec<usize> = (0..n).filter(|&i| squashed[i] == said).collect();
    if equal.len() == 1 {
        return Some(equal[0]);
    }
    let padded = format!(" {said} ");
    let contained: Vec<usize> = (0..n)
        .filter(|&i| !squashed[i].is_empty() && padded.contains(&format!(" {} ", squashed[i])))
        .collect();
    if contained.len() == 1 {
        return Some(contained[0]);
    }
    let chars: Vec<char> = t.chars().collect();
    let lead = if chars.first() == Some(&'(') { 1 } else { 0 };
    if let (Some(&c), Some(&sep)) = (chars.get(lead), chars.get(lead + 1)) {
        if c.is_ascii_uppercase() && matches!(sep, '.' | ')' | ':') {
            if let Some(i) = letter_index(c) {
                return Some(i);
            }
        }
    }
    let mut found: Vec<usize> = t
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() == 1)
        .filter_map(|w| w.chars().next())
        .filter(|c| c.is_ascii_uppercase())
        .filter_map(letter_index)
        .collect();
    found.sort_unstable();
    found.dedup();
    (found.len() == 1).then(|| found[0])
}

/// Correct / total of a group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub n: usize,
    pub correct: usize,
    pub accuracy: f64,
}

impl Tally {
    fn add(&mut self, ok: bool) {
        self.n += 1;
        self.correct += usize::from(ok);
        self.accuracy = ratio(self.correct, self.n);
    }
}

/// The outcome of [`score_choice`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChoiceScore {
    pub overall: Tally,
    /// Answers from which no option could be read.
    pub unparsed: usize,
    pub per_category: BTreeMap<String, Tally>,
    /// MMBench circular evaluation: a group counts when every rotation in it is right. `None`
    /// when no item has a `circular_group`.
    pub circular: Option<Tally>,
}

/// Score multiple-choice answers (`predictions[i]` answers `items[i]`), each read by
/// [`extract_choice`].
pub fn score_choice<S: AsRef<str>>(items: &[ChoiceItem], predictions: &[S]) -> Result<ChoiceScore> {
    check_aligned("multiple-choice", items.len(), predictions.len())?;
    let mut overall = Tally::default();
    let mut unparsed = 0;
    let mut per_category: BTreeMap<String, Tally> = BTreeMap::new();
    let mut groups: BTreeMap<String, bool> = BTreeMap::new();
    for (item, pred) in items.iter().zip(predictions) {
        let got = extract_choice(pred.as_ref(), &item.options);
        unparsed += usize::from(got.is_none());
        let ok = got == Some(item.answer);
        overall.add(ok);
        let cat = item
            .category
            .clone()
            .unwrap_or_else(|| "uncategorized".into());
        per_category.entry(cat).or_default().add(ok);
        if let Some(g) = &item.circular_group {
            *groups.entry(g.clone()).or_insert(true) &= ok;
        }
    }
    let circular = (!groups.is_empty()).then(|| {
        let mut t = Tally::default();
        groups.values().for_each(|&ok| t.add(ok));
        t
    });
    Ok(ChoiceScore {
        overall,
        unparsed,
        per_category,
        circular,
    })
}

// ---------------------------------------------------------------------------------------------
// Predictions files

/// Read model answers from JSON lines keyed by `question_id` (or `id` / `index`), the text under
/// `text` (LLaVA's answers files), `answer`, `prediction` or `output`.
pub fn read_predictions(path: &Path) -> Result<HashMap<String, String>> {
    let rows = read_jsonl(path)?;
    let mut bad = BadLines::new(path);
    let mut out = HashMap::with_capacity(rows.len());
    for (line, row) in rows {
        match (
            id_field(&row, &["question_id", "id", "index"]),
            str_field(&row, &["text", "answer", "prediction", "output"]),
        ) {
            (Some(id), Some(text)) => {
                if out.insert(id.clone(), text).is_some() {
                    bad.push(line, &format!("question_id {id} answered twice"));
                }
            }
            _ => bad.push(line, "needs question_id and text (or answer/prediction)"),
        }
    }
    bad.finish(out)
}

/// Put predictions in the order of `ids`; an error lists the ids without an answer.
pub fn align_predictions<S: AsRef<str>>(
    ids: &[S],
    predictions: &HashMap<String, String>,
) -> Result<Vec<String>> {
    let missing: Vec<&str> = ids
        .iter()
        .map(AsRef::as_ref)
        .filter(|id| !predictions.contains_key(*id))
        .collect();
    if !missing.is_empty() {
        let shown: Vec<&str> = missing.iter().take(8).copied().collect();
        return Err(Error::Invalid(format!(
            "{} question(s) have no prediction, e.g. {}",
            missing.len(),
            shown.join(", ")
        )));
    }
    Ok(ids
        .iter()
        .map(|id| predictions[id.as_ref()].clone())
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Side-by-side comparison

/// One metric across models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComparisonRow {
    pub benchmark: String,
    pub metric: String,
    /// One value per model, in the order of [`Comparison::models`]; `None` where not measured.
    pub values: Vec<Option<f64>>,
    /// Whether a larger value is better (bolds the best in the markdown table).
    pub higher_is_better: bool,
}

/// Several models side by side: rows are (benchmark, metric), columns are models.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub models: Vec<String>,
    pub rows: Vec<ComparisonRow>,
}

impl Comparison {
    pub fn new() -> Self {
        Self::default()
    }

    fn model_index(&mut self, model: &str) -> usize {
        match self.models.iter().position(|m| m == model) {
            Some(i) => i,
            None => {
                self.models.push(model.to_string());
                for r in &mut self.rows {
                    r.values.push(None);
                }
                self.models.len() - 1
            }
        }
    }

    /// Record one value (a new model or row is added as needed; an existing value is replaced).
    pub fn set(&mut self, model: &str, benchmark: &str, metric: &str, value: f64) {
        self.set_with(model, benchmark, metric, value, true);
    }

    /// [`Comparison::set`] for a metric where smaller is better (perplexity, KL, yes-ratio gap).
    pub fn set_lower_better(&mut self, model: &str, benchmark: &str, metric: &str, value: f64) {
        self.set_with(model, benchmark, metric, value, false);
    }

    fn set_with(&mut self, model: &str, benchmark: &str, metric: &str, value: f64, higher: bool) {
        let m = self.model_index(model);
        let n = self.models.len();
        let row = match self
            .rows
            .iter()
            .position(|r| r.benchmark == benchmark && r.metric == metric)
        {
            Some(i) => &mut self.rows[i],
            None => {
                self.rows.push(ComparisonRow {
                    benchmark: benchmark.to_string(),
                    metric: metric.to_string(),
                    values: vec![None; n],
                    higher_is_better: higher,
                });
                self.rows.last_mut().expect("just pushed")
            }
        };
        row.values[m] = Some(value);
    }

    /// A value, if recorded.
    pub fn get(&self, model: &str, benchmark: &str, metric: &str) -> Option<f64> {
        let m = self.models.iter().position(|x| x == model)?;
        self.rows
            .iter()
            .find(|r| r.benchmark == benchmark && r.metric == metric)?
            .values[m]
    }

    /// Add POPE's accuracy, precision, recall, F1 and yes-ratio for `model`.
    pub fn add_pope(&mut self, model: &str, benchmark: &str, s: &PopeScore) {
        self.set(model, benchmark, "accuracy", s.accuracy);
        self.set(model, benchmark, "precision", s.precision);
        self.set(model, benchmark, "recall", s.recall);
        self.set(model, benchmark, "f1", s.f1);
        // Neither high nor low is good (about 0.5 is ideal on balanced POPE): never bolded.
        self.set(model, benchmark, "yes_ratio", s.yes_ratio);
    }

    /// Add MME's perception, cognition and total scores, and each category's score.
    pub fn add_mme(&mut self, model: &str, benchmark: &str, s: &MmeScore) {
        self.set(model, benchmark, "perception", s.perception);
        self.set(model, benchmark, "cognition", s.cognition);
        self.set(model, benchmark, "total", s.total);
        for c in &s.categories {
            self.set(
                model,
                benchmark,
                &format!("{} (acc+acc+)", c.category),
                c.score,
            );
        }
    }

    /// Add multiple-choice accuracy (and circular accuracy when measured).
    pub fn add_choice(&mut self, model: &str, benchmark: &str, s: &ChoiceScore) {
        self.set(model, benchmark, "accuracy", s.overall.accuracy);
        if let Some(c) = &s.circular {
            self.set(model, benchmark, "circular accuracy", c.accuracy);
        }
    }

    /// Add VQA accuracy, exact match and normalised match.
    pub fn add_vqa(&mut self, model: &str, benchmark: &str, s: &VqaScore) {
        self.set(model, benchmark, "vqa accuracy", s.accuracy);
        self.set(model, benchmark, "exact match", s.exact_match);
        self.set(model, benchmark, "normalized match", s.normalized_match);
    }

    /// Add an [`crate::eval::EvalReport`]: accuracy overall and per question type.
    pub fn add_eval(&mut self, model: &str, benchmark: &str, r: &crate::eval::EvalReport) {
        self.set(model, benchmark, "accuracy", r.accuracy);
        for (t, score) in &r.per_type {
            self.set(model, benchmark, &format!("accuracy {t}"), score.accuracy);
        }
    }

    /// Add an [`crate::eval::AgreementReport`]: top-1 agreement, and KL (lower is better).
    pub fn add_agreement(
        &mut self,
        model: &str,
        benchmark: &str,
        r: &crate::eval::AgreementReport,
    ) {
        self.set(model, benchmark, "teacher agreement", r.agreement);
        self.set_lower_better(model, benchmark, "KL to teacher", r.kl);
    }

    /// Add a [`crate::eval::SpeedReport`]: decode tokens per second.
    pub fn add_speed(&mut self, model: &str, benchmark: &str, r: &crate::eval::SpeedReport) {
        self.set(model, benchmark, "tokens/s", r.tokens_per_s);
    }

    /// A markdown table: one row per (benchmark, metric), one column per model, the best value
    /// of each row in bold (when at least two models have one), `-` where not measured.
    pub fn to_markdown(&self) -> String {
        let mut s = String::from("| benchmark | metric |");
        for m in &self.models {
            s.push_str(&format!(" {} |", m.replace('|', "\\|")));
        }
        s.push_str("\n|---|---|");
        s.push_str(&"---:|".repeat(self.models.len()));
        s.push('\n');
        for r in &self.rows {
            let present: Vec<f64> = r.values.iter().flatten().copied().collect();
            let best =
                if present.len() >= 2 && r.metric != "yes_ratio" {
                    present.iter().copied().reduce(|a, b| {
                        if (b > a) == r.higher_is_better {
                            b
                        } else {
                            a
                        }
                    })
                } else {
                    None
                };
            s.push_str(&format!("| {} | {} |", r.benchmark, r.metric));
            for v in &r.values {
                let cell = match v {
                    None => "-".to_string(),
                    Some(x) if Some(*x) == best => format!("**{}**", format_value(*x)),
                    Some(x) => format_value(*x),
                };
                s.push_str(&format!(" {cell} |"));
            }
            s.push('\n');
        }
        s
    }

    /// As pretty JSON.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| Error::Other(format!("serialising a comparison: {e}")))
    }

    /// Write the table atomically: JSON for a `.json` path, markdown otherwise.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = if path.extension().is_some_and(|e| e == "json") {
            self.to_json()?
        } else {
            self.to_markdown()
        };
        crate::checkpoint::write_atomic(path, text.as_bytes())
    }

    /// Read a comparison saved as JSON.
    pub fn load(path: &Path) -> Result<Self> {
        crate::config::read_json(path)
    }
}

/// Four decimals for fractions, one for scores in points.
fn format_value(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.4}")
    }
}

// ---------------------------------------------------------------------------------------------
// File helpers

fn check_aligned(what: &str, items: usize, predictions: usize) -> Result<()> {
    if items != predictions {
        return Err(Error::Invalid(format!(
            "{what}: {items} items but {predictions} predictions (they must be aligned)"
        )));
    }
    Ok(())
}

/// `"yes"` / `"no"` in any case and surrounding whitespace.
fn yes_no(s: &str) -> Option<bool> {
    match s.trim().to_lowercase().as_str() {
        "yes" => Some(true),
        "no" => Some(false),
        _ => None,
    }
}

/// The first of `keys` holding a string.
fn str_field(row: &Value, keys: &[&str]) -> Option<String> {
    keys.iter()
        .find_map(|k| row.get(*k).and_then(Value::as_str).map(str::to_owned))
}

/// The first of `keys` holding a string or a number, as a string.
fn id_field(row: &Value, keys: &[&str]) -> Option<String> {
    keys.iter().find_map(|k| match row.get(*k)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

/// Non-empty lines of a JSON-lines file with their 1-based line numbers; a line that is not
/// JSON is an error naming the file and line.
fn read_jsonl(path: &Path) -> Result<Vec<(usize, Value)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map(|v| (i + 1, v))
                .map_err(|e| Error::BadConfig {
                    path: path.to_path_buf(),
                    reason: format!("line {}: {e}", i + 1),
                })
        })
        .collect()
}

/// Collects bad records of one file and turns them into [`Error::BadRecords`].
struct BadLines {
    path: PathBuf,
    lines: Vec<(usize, String)>,
}

impl BadLines {
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            lines: Vec::new(),
        }
    }

    fn push(&mut self, line: usize, why: &str) {
        self.lines.push((line, why.to_string()));
    }

    fn finish<T>(self, value: T) -> Result<T> {
        if self.lines.is_empty() {
            return Ok(value);
        }
        let summary = self
            .lines
            .iter()
            .take(5)
            .map(|(l, why)| format!("line {l}: {why}"))
            .collect::<Vec<_>>()
            .join("; ");
        Err(Error::BadRecords {
            path: self.path,
            count: self.lines.len(),
            summary,
        })
    }
}

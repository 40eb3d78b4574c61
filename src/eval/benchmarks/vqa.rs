//! VQAv2 answer normalisation and accuracy.

use super::*;

/// Punctuation the official script removes or turns into a space (note: no `-`, `!` or `.`).
pub(super) const VQA_PUNCT: &[char] = &[
    ';', ':', '/', '\'', '[', ']', '"', '(', ')', '=', '+', '\\', '_', '>', '<', '@', '`', ',', '?',
];

pub(super) const VQA_ARTICLES: &[&str] = &["a", "an", "the"];

/// Number words the official script maps to digits (only up to ten, and "none" to 0).
pub(super) fn vqa_number(word: &str) -> Option<&'static str> {
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
pub(super) fn vqa_contraction(word: &str) -> Option<&'static str> {
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
pub(super) fn vqa_punctuation(text: &str) -> String {
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
pub(super) fn vqa_digit_article(text: &str) -> String {
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

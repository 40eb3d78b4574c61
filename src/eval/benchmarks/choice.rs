//! Multiple choice (ScienceQA, MMBench).

use super::*;

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

pub(super) fn squash(s: &str) -> String {
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

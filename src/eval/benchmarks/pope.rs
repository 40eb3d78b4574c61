//! POPE.

use super::*;

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

pub(super) fn ratio(num: usize, den: usize) -> f64 {
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

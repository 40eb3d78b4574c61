//! Predictions files.

use super::*;

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

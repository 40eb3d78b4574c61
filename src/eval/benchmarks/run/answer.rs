//! Greedy answers in batches, appended to `answers.jsonl` as they come (LLaVA's answer format),
//! so that an interrupted run continues where it stopped; then the file is rewritten in question
//! order.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use base64::Engine as _;
use candle_core::Tensor;
use serde_json::{Map, Value};

use super::questions::{id_text, Bad, ImageSource, Question};
use crate::generate::{GenerateOptions, PromptIds};
use crate::model::vlm::Vlm;
use crate::tokenize::single_turn_prompt;
use crate::{Error, Result};

/// One line of an answers file.
#[derive(Debug, Clone)]
pub struct AnswerLine {
    /// `question_id`, plus `#round_id` when the line has one.
    pub key: String,
    /// `key|prompt`: what identifies a question whose id the question file repeats (MME asks
    /// two questions per image under one id).
    pub keyed_prompt: String,
    pub value: Value,
}

fn answer_line(value: Value) -> Option<AnswerLine> {
    let id = id_text(value.get("question_id")?)?;
    value.get("text")?.as_str()?;
    let key = match value.get("round_id").and_then(Value::as_u64) {
        Some(r) => format!("{id}#{r}"),
        None => id,
    };
    let prompt = value
        .get("prompt")
        .and_then(Value::as_str)
        .unwrap_or_default();
    Some(AnswerLine {
        keyed_prompt: format!("{key}|{prompt}"),
        key,
        value,
    })
}

/// The lines of an answers file, in file order. A last line cut short (a run killed while
/// writing) is dropped; any other line that is not JSON with a `question_id` and a string `text`,
/// or that answers a question twice, is an error naming the file and line.
pub fn read_answers(path: &Path) -> Result<Vec<AnswerLine>> {
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let bad = |i: usize, why: String| Error::BadRecords {
        path: path.to_path_buf(),
        count: 1,
        summary: format!("line {}: {why}", i + 1),
    };
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line)
            .ok()
            .and_then(answer_line)
        {
            Some(a) => {
                if !seen.insert(a.keyed_prompt.clone()) {
                    return Err(bad(i, format!("question {} answered twice", a.key)));
                }
                out.push(a);
            }
            None if i + 1 == lines.len() && !text.ends_with('\n') => {}
            None => {
                return Err(bad(
                    i,
                    "not an answer (JSON with question_id and text)".into(),
                ))
            }
        }
    }
    Ok(out)
}

/// Where each question key finds its line in `lines` (by `key` and by `keyed_prompt`).
pub fn index_answers(lines: &[AnswerLine]) -> HashMap<&str, usize> {
    let mut index = HashMap::new();
    for (i, l) in lines.iter().enumerate() {
        index.insert(l.key.as_str(), i);
        index.insert(l.keyed_prompt.as_str(), i);
    }
    index
}

fn to_jsonl(lines: &[&Value]) -> String {
    lines.iter().map(|v| format!("{v}\n")).collect()
}

/// A stable answer id (upstream draws a random one): FNV-1a of model and key, in hex.
fn answer_id(model_id: &str, key: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in model_id.bytes().chain([0]).chain(key.bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// The pixel values `[1, 3, H, W]` of a question's image.
fn pixels(vlm: &Vlm, source: &ImageSource) -> Result<Tensor> {
    let img = match source {
        ImageSource::File(p) => crate::image::load_image(p)?,
        ImageSource::Base64(data) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data.trim())
                .map_err(|e| Error::Invalid(format!("image is not base64: {e}")))?;
            image::load_from_memory(&bytes)
                .map_err(|e| Error::Invalid(format!("base64 image does not decode: {e}")))?
        }
    };
    Ok(vlm
        .preprocessor
        .preprocess(&img, &vlm.device, vlm.dtype)?
        .unsqueeze(0)?)
}

/// How [`answer_questions`] runs.
pub struct AnswerRun<'a> {
    pub bench: &'a str,
    pub model_id: &'a str,
    pub batch: usize,
    pub max_new_tokens: usize,
    pub progress: bool,
    pub cancel: Option<&'a AtomicBool>,
}

/// What [`answer_questions`] did.
#[derive(Debug, Clone, Default)]
pub struct Answered {
    /// Questions generated in this call (the others were in the file already).
    pub generated: usize,
    /// Seconds spent generating them.
    pub seconds: f64,
}

/// Answer the `questions` not yet in `path`, `run.batch` at a time, appending each batch's
/// lines; then rewrite the file with every line in the order of `order` (the benchmark's whole
/// question list; lines of other keys stay at the end). Images that do not load are bad records
/// (set aside with `skip_bad`). Ctrl-C (`cancel`) stops after the batch in flight, whose answers
/// are kept. An answer stops at `run.max_new_tokens` or where the model's positions end,
/// whichever comes first.
pub fn answer_questions(
    vlm: &Vlm,
    questions: &[Question],
    order: &[Question],
    path: &Path,
    run: &AnswerRun,
    bad: &mut Bad,
) -> Result<Answered> {
    let existing = read_answers(path)?;
    // Rewrite first: drops a torn last line so appends start on a fresh line.
    let existing_lines: Vec<&Value> = existing.iter().map(|l| &l.value).collect();
    crate::io::write_atomic(path, to_jsonl(&existing_lines).as_bytes())?;
    let done = index_answers(&existing);
    let todo: Vec<&Question> = questions
        .iter()
        .filter(|q| !done.contains_key(q.key.as_str()))
        .collect();
    let tok = vlm.tokenizer()?;
    let opts = GenerateOptions {
        max_new_tokens: run.max_new_tokens,
        ..GenerateOptions::default()
    };
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| Error::write(path, e))?;
    // A row stops where the model's positions end (the tiny teacher has 256).
    let context = vlm.config.text_config.max_position_embeddings;
    let started = Instant::now();
    let total = todo.len();
    let mut stats = Answered::default();
    if run.progress && total > 0 {
        eprintln!(
            "{}: {} of {} questions to answer ({} already in {})",
            run.bench,
            total,
            questions.len(),
            questions.len() - total,
            path.display()
        );
    }
    for chunk in todo.chunks(run.batch.max(1)) {
        if run.cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
            return Err(Error::Other(format!(
                "{}: interrupted after {} new answers; run again to continue",
                run.bench, stats.generated
            )));
        }
        let mut ids = Vec::new();
        let mut px = Vec::new();
        let mut asked = Vec::new();
        let mut limits = Vec::new();
        for q in chunk {
            let image = match &q.image {
                Some(src) => match pixels(vlm, src) {
                    Ok(t) => Some(t),
                    Err(e) if bad.skip => {
                        bad.push(&q.origin, &e.to_string());
                        continue;
                    }
                    Err(e) => return Err(Error::Invalid(format!("{}: {e}", q.origin))),
                },
                None => None,
            };
            let prompt = single_turn_prompt(&q.text, image.is_some());
            let n_images = usize::from(image.is_some());
            let row = tok.encode_prompt_with_images(&prompt, n_images)?;
            let positions = row.len() - n_images + n_images * vlm.config.image_tokens();
            let room = context.saturating_sub(positions);
            if room == 0 {
                let why =
                    format!("the prompt takes {positions} positions, the model has {context}");
                if bad.skip {
                    bad.push(&q.origin, &why);
                    continue;
                }
                return Err(Error::Invalid(format!("{}: {why}", q.origin)));
            }
            ids.push(row);
            px.push(image);
            limits.push(room);
            asked.push(*q);
        }
        let rows: Vec<PromptIds> = PromptIds::rows(&ids, &px)
            .into_iter()
            .zip(&limits)
            .map(|(r, &room)| PromptIds {
                max_new_tokens: Some(room),
                ..r
            })
            .collect();
        let out = vlm.generate_ids_batch(&rows, &opts, &mut |_| true)?;
        let mut text = String::new();
        for (q, (tokens, _)) in asked.iter().zip(out) {
            let mut line = Map::new();
            line.insert("question_id".into(), q.question_id.clone());
            line.insert("prompt".into(), Value::from(q.text.clone()));
            line.insert("text".into(), Value::from(tok.decode(&tokens)?.trim()));
            line.insert(
                "answer_id".into(),
                Value::from(answer_id(run.model_id, &q.key)),
            );
            line.insert("model_id".into(), Value::from(run.model_id));
            line.insert("metadata".into(), Value::Object(Map::new()));
            for (k, v) in &q.extra {
                line.insert(k.clone(), v.clone());
            }
            text.push_str(&format!("{}\n", Value::Object(line)));
        }
        file.write_all(text.as_bytes())
            .and_then(|_| file.sync_data())
            .map_err(|e| Error::write(path, e))?;
        stats.generated += asked.len();
        stats.seconds = started.elapsed().as_secs_f64();
        if run.progress {
            let per = stats.seconds / stats.generated.max(1) as f64;
            eprintln!(
                "{}: {}/{} answered, {:.3} s/question, about {:.0} s left",
                run.bench,
                stats.generated,
                total,
                per,
                per * (total - stats.generated.min(total)) as f64
            );
        }
    }
    drop(file);
    let lines = read_answers(path)?;
    let index = index_answers(&lines);
    let mut used = vec![false; lines.len()];
    let mut ordered: Vec<&Value> = Vec::with_capacity(lines.len());
    for q in order {
        if let Some(&i) = index.get(q.key.as_str()) {
            if !used[i] {
                used[i] = true;
                ordered.push(&lines[i].value);
            }
        }
    }
    ordered.extend(
        lines
            .iter()
            .zip(&used)
            .filter(|(_, u)| !**u)
            .map(|(l, _)| &l.value),
    );
    crate::io::write_atomic(path, to_jsonl(&ordered).as_bytes())?;
    Ok(stats)
}

//! Question files in their released layouts, read into [`Question`]s: LLaVA's question JSON
//! lines, ScienceQA's conversation file, MMBench's TSV with base64 images, MMMU's
//! `anns_for_eval.json`. Every bad record names its file and line (or entry); with `skip_bad`
//! it is set aside and counted instead.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::{Error, Result};

/// LLaVA's and TinyLLaVA Factory's suffix for multiple-choice questions (`--single-pred-prompt`).
pub const CHOICE_SUFFIX: &str = "Answer with the option's letter from the given choices directly.";

/// Where a question's image comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageSource {
    File(PathBuf),
    /// MMBench keeps its images in the TSV, base64-encoded.
    Base64(String),
}

/// One question to answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    /// The id as the file writes it (a number or a string), echoed in the answers file.
    pub question_id: Value,
    /// Unique within a run: the id, plus `#round` for MMBench's circular rounds.
    pub key: String,
    /// The user's text as sent (suffixes included), without `<image>` and the chat template.
    pub text: String,
    pub image: Option<ImageSource>,
    pub category: Option<String>,
    /// File and line (or entry) for messages.
    pub origin: String,
    /// Fields the answers line carries besides LLaVA's (MMBench: `round_id`, `options`,
    /// `option_char`).
    pub extra: Map<String, Value>,
    /// What scoring needs beyond the answer (MMMU: `all_choices`, `index2ans`), not written.
    pub meta: Map<String, Value>,
}

/// Records set aside (with `skip_bad`) or to report as one error.
#[derive(Debug, Default)]
pub struct Bad {
    pub skip: bool,
    pub records: Vec<String>,
}

impl Bad {
    pub fn new(skip: bool) -> Self {
        Self {
            skip,
            records: Vec::new(),
        }
    }

    pub fn push(&mut self, origin: &str, why: &str) {
        self.records.push(format!("{origin}: {why}"));
    }

    /// Fails (naming the first records) unless bad records may be skipped.
    pub fn check(&self, path: &Path) -> Result<()> {
        if self.skip || self.records.is_empty() {
            return Ok(());
        }
        Err(Error::BadRecords {
            path: path.to_path_buf(),
            count: self.records.len(),
            summary: format!(
                "{} (pass skip_bad / --skip-bad to skip and count them)",
                self.records
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        })
    }
}

pub(super) fn read_text(path: &Path) -> Result<String> {
    if !path.is_file() {
        return Err(Error::NotFound(format!(
            "benchmark file {} does not exist",
            path.display()
        )));
    }
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

pub(super) fn read_json_value(path: &Path) -> Result<Value> {
    serde_json::from_str(&read_text(path)?).map_err(|e| Error::BadConfig {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// A number or a string, as a key.
pub(super) fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The image file, checked to exist. A name `<folder>/<file>` also finds
/// `<folder>/images/<file>`: MME's release keeps some categories' images there while question
/// files name them without it.
fn image_file(dir: &Path, name: &str, origin: &str, bad: &mut Bad) -> Option<ImageSource> {
    let path = dir.join(name);
    let nested = Path::new(name)
        .parent()
        .zip(Path::new(name).file_name())
        .map(|(folder, file)| dir.join(folder).join("images").join(file));
    match nested {
        _ if path.is_file() => Some(ImageSource::File(path)),
        Some(n) if n.is_file() => Some(ImageSource::File(n)),
        _ => {
            bad.push(origin, &format!("image {} does not exist", path.display()));
            None
        }
    }
}

/// LLaVA's question format, one JSON object a line: `question_id`, `image` (under
/// `image_dir`), `text` (the suffix included), optional `category`.
pub fn read_llava_questions(path: &Path, image_dir: &Path, bad: &mut Bad) -> Result<Vec<Question>> {
    let text = read_text(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let origin = format!("{} line {}", path.display(), i + 1);
        let row: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                bad.push(&origin, &format!("not JSON ({e})"));
                continue;
            }
        };
        let id = row.get("question_id").cloned().unwrap_or(Value::Null);
        let (Some(key), Some(q)) = (id_text(&id), row.get("text").and_then(Value::as_str)) else {
            bad.push(&origin, "needs `question_id` (number or string) and `text`");
            continue;
        };
        let image = match row.get("image").and_then(Value::as_str) {
            Some(name) => match image_file(image_dir, name, &origin, bad) {
                Some(img) => Some(img),
                None => continue,
            },
            None => None,
        };
        out.push(Question {
            question_id: id,
            key,
            text: q.to_string(),
            image,
            category: row
                .get("category")
                .and_then(Value::as_str)
                .map(str::to_owned),
            origin,
            extra: Map::new(),
            meta: Map::new(),
        });
    }
    unique_keys(&mut out, bad);
    Ok(out)
}

/// Ids the file repeats (MME: both questions about an image share it) key their questions by
/// id and text; a question asked twice is a bad record.
fn unique_keys(questions: &mut Vec<Question>, bad: &mut Bad) {
    let mut count: std::collections::HashMap<String, usize> = Default::default();
    for q in questions.iter() {
        *count.entry(q.key.clone()).or_default() += 1;
    }
    let mut seen = std::collections::HashSet::new();
    questions.retain_mut(|q| {
        q.key = question_key(&q.key, &q.text, count[&q.key] > 1);
        let fresh = seen.insert(q.key.clone());
        if !fresh {
            bad.push(&q.origin, &format!("question {} occurs twice", q.key));
        }
        fresh
    });
}

/// ScienceQA in LLaVA's conversation file (`llava_test_CQM-A.json`, a JSON list): `id`,
/// optional `image` (under `image_dir`), the question in `conversations[0].value`. The prompt is
/// that value without `<image>`, plus [`CHOICE_SUFFIX`] on its own line (TinyLLaVA's
/// `model_vqa_science.py --single-pred-prompt`).
pub fn read_sqa_questions(path: &Path, image_dir: &Path, bad: &mut Bad) -> Result<Vec<Question>> {
    let Value::Array(rows) = read_json_value(path)? else {
        return Err(Error::BadConfig {
            path: path.to_path_buf(),
            reason: "expected a JSON list of questions".into(),
        });
    };
    let mut out = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let origin = format!("{} entry {i}", path.display());
        let id = row.get("id").cloned().unwrap_or(Value::Null);
        let value = row
            .get("conversations")
            .and_then(|c| c.get(0))
            .and_then(|c| c.get("value"))
            .and_then(Value::as_str);
        let (Some(key), Some(value)) = (id_text(&id), value) else {
            bad.push(&origin, "needs `id` and `conversations[0].value`");
            continue;
        };
        let image = match row.get("image").and_then(Value::as_str) {
            Some(name) => match image_file(image_dir, name, &origin, bad) {
                Some(img) => Some(img),
                None => continue,
            },
            None => None,
        };
        let question = value.replace(crate::tokenize::IMAGE_MARKER, "");
        out.push(Question {
            question_id: id,
            key,
            text: format!("{}\n{CHOICE_SUFFIX}", question.trim()),
            image,
            category: None,
            origin,
            extra: Map::new(),
            meta: Map::new(),
        });
    }
    unique_keys(&mut out, bad);
    Ok(out)
}

/// MMMU as TinyLLaVA Factory's `model_vqa_mmmu.py` reads it (`anns_for_eval.json`, a JSON list):
/// `id`, `question_type`, `prompt` (options and instruction included), optional `image`,
/// `all_choices`, `index2ans`. Only multiple-choice questions with one image are asked; the
/// others are counted in `skipped` (upstream answers them with a random letter or a fixed
/// string).
pub fn read_mmmu_questions(
    path: &Path,
    image_dir: &Path,
    bad: &mut Bad,
    skipped: &mut usize,
) -> Result<Vec<Question>> {
    let Value::Array(rows) = read_json_value(path)? else {
        return Err(Error::BadConfig {
            path: path.to_path_buf(),
            reason: "expected a JSON list of questions".into(),
        });
    };
    let mut out = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let origin = format!("{} entry {i}", path.display());
        let id = row.get("id").cloned().unwrap_or(Value::Null);
        let (Some(key), Some(prompt), Some(kind)) = (
            id_text(&id),
            row.get("prompt").and_then(Value::as_str),
            row.get("question_type").and_then(Value::as_str),
        ) else {
            bad.push(&origin, "needs `id`, `prompt` and `question_type`");
            continue;
        };
        let name = row.get("image").and_then(Value::as_str);
        if kind != "multiple-choice" || name.is_none() {
            *skipped += 1;
            continue;
        }
        let choices = row.get("all_choices").filter(|c| c.is_array());
        let index2ans = row.get("index2ans").filter(|c| c.is_object());
        let (Some(choices), Some(index2ans)) = (choices, index2ans) else {
            bad.push(
                &origin,
                "a multiple-choice question needs `all_choices` and `index2ans`",
            );
            continue;
        };
        let Some(image) = image_file(image_dir, name.unwrap_or_default(), &origin, bad) else {
            continue;
        };
        let mut meta = Map::new();
        meta.insert("all_choices".into(), choices.clone());
        meta.insert("index2ans".into(), index2ans.clone());
        out.push(Question {
            question_id: id,
            key,
            text: prompt.to_string(),
            image: Some(image),
            category: None,
            origin,
            extra: Map::new(),
            meta,
        });
    }
    unique_keys(&mut out, bad);
    Ok(out)
}

/// The key a question with this id and text has: the id, or `id|text` when the question file
/// repeats the id (`AnswerLine::keyed_prompt` matches it).
pub fn question_key(id: &str, text: &str, repeated: bool) -> String {
    if repeated {
        format!("{id}|{text}")
    } else {
        id.to_string()
    }
}

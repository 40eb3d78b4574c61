//! MMBench's released TSV (`mmbench_dev_20230712.tsv`): a header, then one row per question with
//! `index`, `question`, `hint`, options `A`..`D`, `answer` (dev only), `category`, `l2-category`,
//! `source`, `split`, `image` (base64). Read as pandas' `read_table` does (tab-separated, fields
//! in double quotes may hold tabs and newlines, `""` inside quotes is one quote).
//!
//! The prompt follows LLaVA's `llava/eval/model_vqa_mmbench.py` with `--single-pred-prompt`:
//! `hint` (when not empty / `nan` / `none`) and the question on separate lines, one line
//! `X. option` per option, then [`CHOICE_SUFFIX`]. Circular evaluation (`--all-rounds`) asks
//! each question once per option, the option texts rotated one place each round while the
//! letters stay A, B, C...; `option_char` records which original letter each shown position
//! holds.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Map, Value};

use super::questions::{read_text, Bad, ImageSource, Question, CHOICE_SUFFIX};
use crate::Result;

const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

/// One TSV record with the line it starts on.
struct Record {
    line: usize,
    fields: Vec<String>,
}

/// Split TSV text into records (quoted fields may span lines).
fn parse_tsv(text: &str) -> Vec<Record> {
    let mut records = Vec::new();
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut at_start = true;
    let mut line = 1;
    let mut start_line = 1;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if at_start => {
                quoted = true;
                at_start = false;
            }
            '\t' => {
                fields.push(std::mem::take(&mut field));
                at_start = true;
            }
            '\r' => {}
            '\n' => {
                fields.push(std::mem::take(&mut field));
                if fields.iter().any(|f| !f.is_empty()) {
                    records.push(Record {
                        line: start_line,
                        fields: std::mem::take(&mut fields),
                    });
                }
                fields.clear();
                line += 1;
                start_line = line;
                at_start = true;
            }
            _ => {
                field.push(c);
                at_start = false;
            }
        }
    }
    if !field.is_empty() || !fields.is_empty() {
        fields.push(field);
        records.push(Record {
            line: start_line,
            fields,
        });
    }
    records
}

/// pandas' missing values as MMBench's readers test them.
fn is_none(v: &str) -> bool {
    let l = v.trim().to_lowercase();
    l.is_empty() || l == "nan" || l == "none"
}

/// One MMBench row, by column name.
#[derive(Debug, Clone)]
pub struct MmbenchRow {
    pub line: usize,
    pub index: String,
    pub question: String,
    pub hint: Option<String>,
    pub options: Vec<String>,
    pub answer: Option<String>,
    pub category: Option<String>,
    pub image: String,
    /// Every column, for the submission file.
    pub columns: Vec<(String, String)>,
}

/// Read the TSV's rows; a row without `index`, `question`, an option or `image` is bad.
pub fn read_mmbench_rows(path: &Path, bad: &mut Bad) -> Result<Vec<MmbenchRow>> {
    let text = read_text(path)?;
    let mut records = parse_tsv(&text).into_iter();
    let Some(header) = records.next() else {
        bad.push(
            &format!("{} line 1", path.display()),
            "empty file, no header",
        );
        return Ok(Vec::new());
    };
    let col: HashMap<&str, usize> = header
        .fields
        .iter()
        .enumerate()
        .map(|(i, h)| (h.as_str(), i))
        .collect();
    let mut out = Vec::new();
    for r in records {
        let origin = format!("{} line {}", path.display(), r.line);
        let get = |name: &str| -> Option<String> {
            col.get(name)
                .and_then(|&i| r.fields.get(i))
                .filter(|v| !is_none(v))
                .cloned()
        };
        if r.fields.len() != header.fields.len() {
            bad.push(
                &origin,
                &format!(
                    "{} columns, the header has {}",
                    r.fields.len(),
                    header.fields.len()
                ),
            );
            continue;
        }
        let options: Vec<String> = LETTERS.iter().map_while(|l| get(l)).collect();
        let (Some(index), Some(question), Some(image)) =
            (get("index"), get("question"), get("image"))
        else {
            bad.push(&origin, "needs `index`, `question` and `image`");
            continue;
        };
        if options.is_empty() {
            bad.push(&origin, "has no option A");
            continue;
        }
        out.push(MmbenchRow {
            line: r.line,
            index,
            question,
            hint: get("hint"),
            options,
            answer: get("answer"),
            category: get("category"),
            image,
            columns: header.fields.iter().cloned().zip(r.fields).collect(),
        });
    }
    Ok(out)
}

/// The questions of the rows: one per row, or with `circular` one per option and row (round
/// `r` shows the options rotated `r` places). Keys are `index#round`.
pub fn mmbench_questions(path: &Path, rows: &[MmbenchRow], circular: bool) -> Vec<Question> {
    let mut out = Vec::new();
    for row in rows {
        let rounds = if circular { row.options.len() } else { 1 };
        let n = row.options.len();
        for round in 0..rounds {
            let shown: Vec<&String> = (0..n).map(|i| &row.options[(i + round) % n]).collect();
            let chars: Vec<&str> = (0..n).map(|i| LETTERS[(i + round) % n]).collect();
            let mut text = match &row.hint {
                Some(h) => format!("{h}\n{}", row.question),
                None => row.question.clone(),
            };
            for (letter, option) in LETTERS.iter().zip(&shown) {
                text.push_str(&format!("\n{letter}. {option}"));
            }
            text.push_str(&format!("\n{CHOICE_SUFFIX}"));
            let id = match row.index.parse::<i64>() {
                Ok(n) => Value::from(n),
                Err(_) => Value::from(row.index.clone()),
            };
            let mut extra = Map::new();
            extra.insert("round_id".into(), Value::from(round));
            extra.insert(
                "options".into(),
                Value::from(shown.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
            );
            extra.insert(
                "option_char".into(),
                Value::from(chars.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
            );
            out.push(Question {
                question_id: id,
                key: format!("{}#{round}", row.index),
                text,
                image: Some(ImageSource::Base64(row.image.clone())),
                category: row.category.clone(),
                origin: format!("{} line {}", path.display(), row.line),
                extra,
                meta: [
                    ("index".to_string(), Value::from(row.index.clone())),
                    (
                        "answer".to_string(),
                        row.answer.clone().map_or(Value::Null, Value::from),
                    ),
                ]
                .into_iter()
                .collect(),
            });
        }
    }
    out
}

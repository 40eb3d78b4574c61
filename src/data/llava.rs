//! LLaVA / ShareGPT4V conversation data: the JSON records, their validation and their token ids.
//!
//! A data file is a JSON array of records such as
//!
//! ```json
//! {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
//!  "conversations": [{"from": "human", "value": "<image>\nWhat are the colors of the bus?"},
//!                    {"from": "gpt", "value": "The bus is white and red."}]}
//! ```
//!
//! (a `.jsonl` file with one record per line is read too). Records without `image` are text-only.
//! Fields we do not use are ignored, except `question_type` and `composition` which the synthetic
//! world adds for per-type and seen/unseen evaluation.
//!
//! Turns follow TinyLLaVA Factory's `Template.get_list_from_message`: a first message that is not
//! from `human` is dropped, then messages alternate question / answer. Upstream only asserts that
//! the numbers match; we also require the roles to alternate `human` / `gpt`, so a record whose
//! roles are out of order is reported instead of silently read with questions and answers swapped.
//!
//! Every problem with a record is a [`BadRecord`] carrying the record's index in the file; the
//! caller picks whether bad records are skipped or fail the run ([`OnBadRecord`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use image::RgbImage;
use serde_json::Value;

use crate::tokenize::{
    encode_conversation, PromptTokenizer, Turn, IGNORE_INDEX, IMAGE_MARKER, IMAGE_TOKEN,
};
use crate::{Error, Result};

/// One conversation record, as read from the JSON file.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Position of the record in the file (0-based), the index every report uses.
    pub index: usize,
    /// The record's `id` (numbers are turned into strings); empty when the record has none.
    pub id: String,
    /// Image path relative to the image folder; `None` for a text-only record.
    pub image: Option<String>,
    /// Question/answer pairs, every answer present.
    pub turns: Vec<Turn>,
    /// The synthetic world's question type (`color`, `count`, ...), when present.
    pub question_type: Option<String>,
    /// The synthetic world's `seen` / `unseen` tag (a world with held-out compositions), when
    /// present.
    pub composition: Option<String>,
}

/// What to do with a record that cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnBadRecord {
    /// Leave it out and report it.
    #[default]
    Skip,
    /// Stop: loading returns [`Error::BadRecords`] listing the bad records.
    Fail,
}

/// A record that was left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// Position of the record in the file (0-based; for `.jsonl`, the line's record number).
    pub index: usize,
    /// The record's id, when it could be read.
    pub id: Option<String>,
    pub reason: String,
}

impl std::fmt::Display for BadRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.id {
            Some(id) => write!(f, "record {} (id {id:?}): {}", self.index, self.reason),
            None => write!(f, "record {}: {}", self.index, self.reason),
        }
    }
}

/// Read a LLaVA-format file (a JSON array, or JSON Lines when the name ends in `.jsonl`).
///
/// A file that cannot be read or is not a JSON array is an error; a record that does not have the
/// expected structure is returned as a [`BadRecord`] with its index, the others as [`Record`]s.
/// Image files are not looked at here (see [`Dataset::load`]).
pub fn read_llava_json(path: &Path) -> Result<(Vec<Record>, Vec<BadRecord>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let is_jsonl = path.extension().and_then(|e| e.to_str()) == Some("jsonl");
    let values: Vec<std::result::Result<Value, String>> = if is_jsonl {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| format!("not valid JSON: {e}")))
            .collect()
    } else {
        let root: Value = serde_json::from_str(&text).map_err(|e| Error::BadConfig {
            path: path.to_path_buf(),
            reason: format!("not valid JSON: {e}"),
        })?;
        match root {
            Value::Array(items) => items.into_iter().map(Ok).collect(),
            _ => {
                return Err(Error::BadConfig {
                    path: path.to_path_buf(),
                    reason: "expected a JSON array of conversation records".into(),
                })
            }
        }
    };

    let mut records = Vec::with_capacity(values.len());
    let mut bad = Vec::new();
    for (index, value) in values.into_iter().enumerate() {
        let outcome = match &value {
            Ok(v) => parse_record(index, v).map_err(|reason| (record_id(v), reason)),
            Err(reason) => Err((None, reason.clone())),
        };
        match outcome {
            Ok(record) => records.push(record),
            Err((id, reason)) => bad.push(BadRecord { index, id, reason }),
        }
    }
    Ok((records, bad))
}

fn record_id(v: &Value) -> Option<String> {
    match v.get("id")? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Structure checks and TinyLLaVA's question/answer pairing for one record.
pub(crate) fn parse_record(index: usize, v: &Value) -> std::result::Result<Record, String> {
    let obj = v.as_object().ok_or("a record must be a JSON object")?;
    let id = match obj.get("id") {
        None => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => return Err("`id` must be a string or a number".into()),
    };
    let image = match obj.get("image") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
        Some(Value::String(_)) => return Err("`image` is empty".into()),
        Some(_) => return Err("`image` must be a string (one image per record)".into()),
    };
    let question_type = match obj.get("question_type") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("`question_type` must be a string".into()),
    };
    let composition = match obj.get("composition") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("`composition` must be a string".into()),
    };
    let convs = obj
        .get("conversations")
        .ok_or("no `conversations` field")?
        .as_array()
        .ok_or("`conversations` must be an array")?;

    let mut messages = Vec::with_capacity(convs.len());
    for (k, m) in convs.iter().enumerate() {
        let from = m
            .get("from")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("conversation turn {k} has no string `from`"))?;
        let value = m
            .get("value")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("conversation turn {k} has no string `value`"))?;
        messages.push((k, from, value));
    }
    // TinyLLaVA drops a leading message that is not a question.
    if messages
        .first()
        .is_some_and(|(_, from, _)| *from != "human")
    {
        messages.remove(0);
    }
    if messages.is_empty() {
        return Err("the conversation has no turns".into());
    }
    if messages.len() % 2 == 1 {
        return Err(format!(
            "{} question(s) but {} answer(s): the last question has no answer",
            messages.len() / 2 + 1,
            messages.len() / 2
        ));
    }
    let mut turns = Vec::with_capacity(messages.len() / 2);
    for pair in messages.chunks(2) {
        let (kq, from_q, question) = pair[0];
        let (ka, from_a, answer) = pair[1];
        if from_q != "human" {
            return Err(format!("conversation turn {kq} is from {from_q:?} where a question from \"human\" is expected"));
        }
        if from_a != "gpt" {
            return Err(format!("conversation turn {ka} is from {from_a:?} where an answer from \"gpt\" is expected"));
        }
        turns.push(Turn {
            question: question.to_string(),
            answer: Some(answer.to_string()),
        });
    }

    let markers_in_questions: usize = turns
        .iter()
        .map(|t| t.question.matches(IMAGE_MARKER).count())
        .sum();
    let markers_in_answers: usize = turns
        .iter()
        .map(|t| {
            t.answer
                .as_deref()
                .unwrap_or("")
                .matches(IMAGE_MARKER)
                .count()
        })
        .sum();
    if markers_in_answers > 0 {
        return Err(format!("an answer contains `{IMAGE_MARKER}`"));
    }
    match (&image, markers_in_questions) {
        (Some(_), 0) => {
            return Err(format!(
                "an image is given but no question contains `{IMAGE_MARKER}`"
            ))
        }
        (Some(_), 1) | (None, 0) => {}
        (Some(_), n) => {
            return Err(format!(
                "one image is given but the questions contain {n} `{IMAGE_MARKER}` markers"
            ))
        }
        (None, n) => {
            return Err(format!(
                "no image is given but the questions contain {n} `{IMAGE_MARKER}` marker(s)"
            ))
        }
    }

    Ok(Record {
        index,
        id,
        image,
        turns,
        question_type,
        composition,
    })
}

/// How closely image files are checked while loading a [`Dataset`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageCheck {
    /// Only that the file exists.
    Exists,
    /// The file exists and its header is that of a known image format with a non-zero size
    /// (cheap: the pixels are not decoded).
    #[default]
    Header,
    /// Decode every image now (and keep it in the cache): a file that is damaged past its header
    /// is reported at load time instead of in the middle of training. Right for small data sets
    /// such as the synthetic world.
    Decode,
}

/// Everything [`Dataset::load_with`] can be told.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The most positions a sample may take; longer samples are cut at the end, as TinyLLaVA's
    /// collator cuts to `tokenizer_model_max_length`.
    pub max_len: usize,
    pub on_bad: OnBadRecord,
    pub image_check: ImageCheck,
    /// How many positions the image placeholder counts for in `max_len`. 1 (the default) counts
    /// the placeholder as one token, as TinyLLaVA's collator does; pass the vision tower's number
    /// of image tokens to bound the sequence the decoder really sees.
    pub image_tokens: usize,
    /// Keep decoded images in memory (decoded once per dataset). Turn off for data sets whose
    /// images do not fit in memory; each batch then decodes its images again.
    pub cache_images: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_len: 3072,
            on_bad: OnBadRecord::Skip,
            image_check: ImageCheck::Header,
            image_tokens: 1,
            cache_images: true,
        }
    }
}

/// One training example: token ids with the image placeholder, and labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Token ids; the image sits at the single [`IMAGE_TOKEN`] (-200), if any.
    pub input_ids: Vec<i64>,
    /// Same length as `input_ids`: the id to predict at that position, or [`IGNORE_INDEX`]
    /// (prompt, image placeholder). Not shifted: the model shifts, as in HF.
    pub labels: Vec<i64>,
    /// Full path of the image file.
    pub image: Option<PathBuf>,
    /// Index of the record in the JSON file.
    pub record: usize,
}

/// Token ids of one usable record.
#[derive(Debug, Clone)]
struct Encoded {
    input_ids: Vec<i64>,
    labels: Vec<i64>,
    image_slot: Option<usize>,
}

/// A loaded data set: the usable records, tokenised, and their images (decoded on first use and
/// then cached).
#[derive(Debug)]
pub struct Dataset {
    /// The usable records, in file order; `records[i]` is sample `i`.
    pub records: Vec<Record>,
    /// The folder that records' `image` paths are relative to.
    pub image_root: PathBuf,
    encoded: Vec<Encoded>,
    /// Distinct image files (several records may share one), and their decoded pixels.
    image_paths: Vec<PathBuf>,
    image_cache: Vec<OnceLock<Arc<RgbImage>>>,
    cache_images: bool,
    pad_id: i64,
    source: PathBuf,
}

impl Dataset {
    /// Load a LLaVA-format JSON file with default options except the maximum length and what to
    /// do with bad records. Returns the data set and the records that were left out.
    pub fn load(
        json: &Path,
        image_root: &Path,
        tok: &PromptTokenizer,
        max_len: usize,
        on_bad: OnBadRecord,
    ) -> Result<(Dataset, Vec<BadRecord>)> {
        let opts = LoadOptions {
            max_len,
            on_bad,
            ..LoadOptions::default()
        };
        Self::load_with(json, image_root, tok, &opts)
    }

    /// Load a LLaVA-format JSON file: read and check the records, tokenise them with the phi
    /// template (labels on the answers only), cut them to `max_len`, check the images.
    ///
    /// With [`OnBadRecord::Skip`] the bad records are returned beside the data set, sorted by
    /// index; with [`OnBadRecord::Fail`] all of them are collected first and then reported in one
    /// [`Error::BadRecords`].
    pub fn load_with(
        json: &Path,
        image_root: &Path,
        tok: &PromptTokenizer,
        opts: &LoadOptions,
    ) -> Result<(Dataset, Vec<BadRecord>)> {
        if opts.max_len == 0 || opts.image_tokens == 0 {
            return Err(Error::Invalid(format!(
                "max_len ({}) and image_tokens ({}) must be at least 1",
                opts.max_len, opts.image_tokens
            )));
        }
        let (candidates, mut bad) = read_llava_json(json)?;

        let mut records = Vec::with_capacity(candidates.len());
        let mut encoded = Vec::with_capacity(candidates.len());
        let mut image_paths: Vec<PathBuf> = Vec::new();
        let mut image_cache: Vec<OnceLock<Arc<RgbImage>>> = Vec::new();
        // One check per distinct file: the slot it got, or why it is unusable.
        let mut checked: HashMap<PathBuf, std::result::Result<usize, String>> = HashMap::new();

        for record in candidates {
            let report = |reason: String| BadRecord {
                index: record.index,
                id: (!record.id.is_empty()).then(|| record.id.clone()),
                reason,
            };
            let (input_ids, labels) = match encode_record(tok, &record, opts) {
                Ok(x) => x,
                Err(reason) => {
                    bad.push(report(reason));
                    continue;
                }
            };
            let image_slot = match &record.image {
                None => None,
                Some(rel) => {
                    let path = image_root.join(rel);
                    let outcome = checked.entry(path.clone()).or_insert_with(|| {
                        let pixels = check_image(&path, opts.image_check)?;
                        let slot = image_paths.len();
                        image_paths.push(path.clone());
                        let cell = OnceLock::new();
                        if let (Some(img), true) = (pixels, opts.cache_images) {
                            let _ = cell.set(Arc::new(img));
                        }
                        image_cache.push(cell);
                        Ok(slot)
                    });
                    match outcome {
                        Ok(slot) => Some(*slot),
                        Err(reason) => {
                            bad.push(report(reason.clone()));
                            continue;
                        }
                    }
                }
            };
            encoded.push(Encoded {
                input_ids,
                labels,
                image_slot,
            });
            records.push(record);
        }

        bad.sort_by_key(|b| b.index);
        if opts.on_bad == OnBadRecord::Fail && !bad.is_empty() {
            let summary = bad
                .iter()
                .take(5)
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            return Err(Error::BadRecords {
                path: json.to_path_buf(),
                count: bad.len(),
                summary,
            });
        }
        let dataset = Dataset {
            records,
            image_root: image_root.to_path_buf(),
            encoded,
            image_paths,
            image_cache,
            cache_images: opts.cache_images,
            pad_id: tok.eos_id() as i64,
            source: json.to_path_buf(),
        };
        Ok((dataset, bad))
    }

    /// Number of usable samples.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The id that pads `input_ids` in a batch: the tokenizer's EOS (Phi's pad = eos).
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// The JSON file the data set was read from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Number of token ids of sample `i` (the image placeholder counting one), `None` when out
    /// of range.
    pub fn sample_len(&self, i: usize) -> Option<usize> {
        self.encoded.get(i).map(|e| e.input_ids.len())
    }

    /// Number of token ids of every sample, in order (for [`crate::data::Loader::with_length_grouping`]).
    pub fn lengths(&self) -> Vec<usize> {
        self.encoded.iter().map(|e| e.input_ids.len()).collect()
    }

    /// Sample `i`: token ids, labels, image path and record index.
    pub fn sample(&self, i: usize) -> Result<Sample> {
        let enc = self.encoded_at(i)?;
        Ok(Sample {
            input_ids: enc.input_ids.clone(),
            labels: enc.labels.clone(),
            image: enc.image_slot.map(|s| self.image_paths[s].clone()),
            record: self.records[i].index,
        })
    }

    /// Token ids and labels of sample `i`, borrowed.
    pub fn tokens(&self, i: usize) -> Result<(&[i64], &[i64])> {
        let enc = self.encoded_at(i)?;
        Ok((&enc.input_ids, &enc.labels))
    }

    /// The decoded RGB image of sample `i` (`None` for a text-only sample). Decoded on first use
    /// and then kept, unless the data set was loaded with `cache_images: false`.
    pub fn image(&self, i: usize) -> Result<Option<Arc<RgbImage>>> {
        let Some(slot) = self.encoded_at(i)?.image_slot else {
            return Ok(None);
        };
        let cell = &self.image_cache[slot];
        if let Some(img) = cell.get() {
            return Ok(Some(img.clone()));
        }
        let path = &self.image_paths[slot];
        let img = Arc::new(decode_image(path).map_err(|reason| Error::BadImage {
            path: path.clone(),
            reason: format!("record {}: {reason}", self.records[i].index),
        })?);
        if self.cache_images {
            // Another thread may have won the race; either copy is the same picture.
            let _ = cell.set(img.clone());
        }
        Ok(Some(img))
    }

    fn encoded_at(&self, i: usize) -> Result<&Encoded> {
        self.encoded.get(i).ok_or_else(|| {
            Error::Invalid(format!(
                "sample {i} out of range: {} has {} usable samples",
                self.source.display(),
                self.encoded.len()
            ))
        })
    }
}

/// Tokenise a record with the phi template and cut it to `opts.max_len`; a reason when the
/// record cannot make a training sample.
pub(crate) fn encode_record(
    tok: &PromptTokenizer,
    record: &Record,
    opts: &LoadOptions,
) -> std::result::Result<(Vec<i64>, Vec<i64>), String> {
    let (mut input_ids, mut labels) =
        encode_conversation(tok, &record.turns).map_err(|e| format!("cannot tokenise: {e}"))?;
    let image_pos = input_ids.iter().position(|&t| t == IMAGE_TOKEN);
    let extra = image_pos.map_or(0, |_| opts.image_tokens - 1);
    if input_ids.len() + extra > opts.max_len {
        if let Some(p) = image_pos {
            if p + opts.image_tokens > opts.max_len {
                return Err(format!(
                    "cutting the sample to max_len {} would cut the image out (the image starts at position {p} and takes {} position(s))",
                    opts.max_len, opts.image_tokens
                ));
            }
        }
        let keep = opts.max_len - extra;
        input_ids.truncate(keep);
        labels.truncate(keep);
    }
    if labels.iter().all(|&l| l == IGNORE_INDEX) {
        return Err(format!(
            "no answer token left to learn from ({} token(s); answers masked by a tokenisation mismatch or cut by max_len {})",
            input_ids.len(),
            opts.max_len
        ));
    }
    Ok((input_ids, labels))
}

/// Check an image file to the level asked; with [`ImageCheck::Decode`] the pixels come back.
fn check_image(path: &Path, level: ImageCheck) -> std::result::Result<Option<RgbImage>, String> {
    if !path.is_file() {
        return Err(format!("image file {} not found", path.display()));
    }
    match level {
        ImageCheck::Exists => Ok(None),
        ImageCheck::Header => {
            let (w, h) = image::ImageReader::open(path)
                .and_then(|r| r.with_guessed_format())
                .map_err(|e| format!("cannot read image {}: {e}", path.display()))?
                .into_dimensions()
                .map_err(|e| format!("{} is not a readable image: {e}", path.display()))?;
            if w == 0 || h == 0 {
                return Err(format!("image {} is empty ({w}x{h})", path.display()));
            }
            Ok(None)
        }
        ImageCheck::Decode => decode_image(path).map(Some),
    }
}

/// Decode an image file into RGB (as upstream's `Image.open(...).convert("RGB")`).
pub(crate) fn decode_image(path: &Path) -> std::result::Result<RgbImage, String> {
    let img = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| format!("cannot read image {}: {e}", path.display()))?
        .decode()
        .map_err(|e| format!("{} is not a readable image: {e}", path.display()))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(format!("image {} is empty", path.display()));
    }
    Ok(img.to_rgb8())
}

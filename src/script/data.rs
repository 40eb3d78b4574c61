//! The `Data` type of scripts: a tokenised data set (LLaVA-format JSON, or a split of the
//! synthetic visual-QA world), ready for training and evaluation.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rhai::{Array, Dynamic, Map, NativeCallContext, INT};

use super::convert::{index, runtime_error, Opts, OrRhai, RhaiResult};
use super::model::Model;
use crate::data::{Dataset, ImageCheck, LoadOptions, OnBadRecord, WorldConfig};
use crate::tokenize::PromptTokenizer;

/// A loaded data set and the tokenizer it was tokenised with.
#[derive(Clone)]
pub struct Data {
    pub dataset: Arc<Dataset>,
    pub tokenizer: PromptTokenizer,
    /// Records left out as unusable.
    pub skipped: usize,
}

impl fmt::Display for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Data({} samples from {}",
            self.dataset.len(),
            self.dataset.source().display()
        )?;
        if self.skipped > 0 {
            write!(f, ", {} bad records skipped", self.skipped)?;
        }
        write!(f, ")")
    }
}

/// The options `dataset("synthetic", ...)` reads itself; every other key is a [`WorldConfig`]
/// field.
const SYNTHETIC_KEYS: [&str; 4] = ["dir", "split", "max_len", "tokenizer"];

fn synthetic(options: Map) -> RhaiResult<Data> {
    // WorldConfig rejects the keys that are neither ours nor its fields (deny_unknown_fields).
    let o = Opts::open("dataset", options);
    let world_fields = o.rest(&SYNTHETIC_KEYS);
    let custom = !world_fields.is_empty();
    let cfg: WorldConfig = if custom {
        rhai::serde::from_dynamic(&Dynamic::from_map(world_fields))
            .map_err(|e| runtime_error(format!("dataset(\"synthetic\"): {e}")))?
    } else {
        crate::teacher::teacher_world_config()
    };
    let dir =
        match (o.path("dir")?, custom) {
            (Some(d), _) => d,
            (None, false) => crate::teacher::default_world_dir().or_rhai()?,
            (None, true) => return Err(runtime_error(
                "dataset(\"synthetic\"): give `dir` for a world other than the default one, so \
                 that it does not replace the default world (runs/world)"
                    .into(),
            )),
        };
    let split = o.string("split")?.unwrap_or_else(|| "train".into());
    if !crate::data::synthetic::SPLITS.contains(&split.as_str()) {
        return Err(runtime_error(format!(
            "dataset(\"synthetic\"): unknown split `{split}` (train, val, test)"
        )));
    }
    crate::data::ensure_world(&dir, &cfg).or_rhai()?;
    // A model's tokenizer wins over the world's own: a world's BPE depends on its samples, so a
    // smaller world made from the same config numbers its tokens differently from the teacher's.
    let tokenizer = match tokenizer_option(&o)? {
        Some(t) => t,
        None => PromptTokenizer::from_file(&dir.join("tokenizer.json")).or_rhai()?,
    };
    let opts = LoadOptions {
        max_len: o
            .count("max_len")?
            .unwrap_or(LoadOptions::default().max_len),
        on_bad: OnBadRecord::Fail,
        image_check: ImageCheck::Decode,
        ..LoadOptions::default()
    };
    let json = dir.join(format!("{split}.json"));
    let (dataset, bad) = Dataset::load_with(&json, &dir, &tokenizer, &opts).or_rhai()?;
    Ok(Data {
        dataset: Arc::new(dataset),
        tokenizer,
        skipped: bad.len(),
    })
}

/// The `tokenizer` option: a Model's tokenizer, or a tokenizer.json path.
fn tokenizer_option(o: &Opts<'_>) -> RhaiResult<Option<PromptTokenizer>> {
    let Some(v) = o.value("tokenizer") else {
        return Ok(None);
    };
    let tokenizer = match v.read_lock::<Model>() {
        Some(m) => m.vlm.tokenizer().or_rhai()?.clone(),
        None => {
            PromptTokenizer::from_file(&PathBuf::from(o.string("tokenizer")?.unwrap_or_default()))
                .or_rhai()?
        }
    };
    Ok(Some(tokenizer))
}

fn llava(path: &str, options: Map) -> RhaiResult<Data> {
    let o = Opts::new(
        "dataset",
        options,
        &["images", "tokenizer", "max_len", "on_bad"],
    )?;
    let json = PathBuf::from(path);
    let images = match o.path("images")? {
        Some(p) => p,
        None => json.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    let tokenizer = tokenizer_option(&o)?.ok_or_else(|| {
        runtime_error(
            "dataset: option `tokenizer` is required (a Model, or a tokenizer.json path)".into(),
        )
    })?;
    let on_bad = match o.string("on_bad")?.as_deref() {
        None | Some("skip") => OnBadRecord::Skip,
        Some("fail") => OnBadRecord::Fail,
        Some(other) => {
            return Err(runtime_error(format!(
                "dataset: on_bad must be \"skip\" or \"fail\", not \"{other}\""
            )))
        }
    };
    let opts = LoadOptions {
        max_len: o
            .count("max_len")?
            .unwrap_or(LoadOptions::default().max_len),
        on_bad,
        ..LoadOptions::default()
    };
    let (dataset, bad) = Dataset::load_with(&json, &images, &tokenizer, &opts).or_rhai()?;
    Ok(Data {
        dataset: Arc::new(dataset),
        tokenizer,
        skipped: bad.len(),
    })
}

#[rhai::export_module]
pub mod api {
    use super::*;

    /// A data set: `dataset("synthetic")` is the train split of the default synthetic world
    /// (generated on first use); `dataset("data.json", #{ tokenizer: model })` reads a
    /// LLaVA-format file.
    #[rhai_fn(name = "dataset", return_raw)]
    pub fn dataset(ctx: NativeCallContext, source: &str) -> RhaiResult<Data> {
        dataset_with(ctx, source, Map::new())
    }

    /// `dataset("synthetic", #{ dir, split: "train" | "val" | "test", max_len, tokenizer,
    /// ...world })`: a split of a synthetic world, generated into `dir` when missing or different
    /// (any field of the world config may be given: seed, train, val, test, image_size, grid, ...;
    /// a non-default world needs its own `dir`). Tokenised with `tokenizer` (a model or a
    /// tokenizer.json path) when given, else with the world's own tokenizer: pass the model you
    /// will train or evaluate, since a world's BPE numbering depends on its samples.
    /// `dataset("file.json", #{ tokenizer: model_or_path, images: dir, max_len: 3072,
    /// on_bad: "skip" | "fail" })`: LLaVA / ShareGPT4V records, images relative to `images`
    /// (default: the JSON's folder).
    #[rhai_fn(name = "dataset", return_raw)]
    pub fn dataset_with(_ctx: NativeCallContext, source: &str, options: Map) -> RhaiResult<Data> {
        if source == "synthetic" {
            synthetic(options)
        } else {
            llava(source, options)
        }
    }

    /// The number of usable samples.
    #[rhai_fn(name = "len", pure)]
    pub fn data_len(d: &mut Data) -> INT {
        d.dataset.len() as INT
    }

    /// Sample `i` as a map: `input_ids` (-200 marks the image), `labels` (-100 where no loss),
    /// `image` (path or ()), `turns` (the record's `#{ question, answer }` pairs).
    #[rhai_fn(pure, return_raw)]
    pub fn sample(d: &mut Data, i: INT) -> RhaiResult<Map> {
        let i = index(i, d.dataset.len(), "sample")?;
        let s = d.dataset.sample(i).or_rhai()?;
        let ints =
            |v: &[i64]| -> Array { v.iter().map(|&x| Dynamic::from_int(x as INT)).collect() };
        let turns: Array = d.dataset.records[i]
            .turns
            .iter()
            .map(|t| {
                let mut turn = Map::new();
                turn.insert("question".into(), Dynamic::from(t.question.clone()));
                turn.insert(
                    "answer".into(),
                    t.answer.clone().map_or(Dynamic::UNIT, Dynamic::from),
                );
                Dynamic::from_map(turn)
            })
            .collect();
        let mut m = Map::new();
        m.insert("input_ids".into(), Dynamic::from_array(ints(&s.input_ids)));
        m.insert("labels".into(), Dynamic::from_array(ints(&s.labels)));
        m.insert(
            "image".into(),
            s.image
                .map_or(Dynamic::UNIT, |p| Dynamic::from(p.display().to_string())),
        );
        m.insert("turns".into(), Dynamic::from_array(turns));
        Ok(m)
    }

    /// Size and origin.
    #[rhai_fn(global, name = "to_string", pure)]
    pub fn to_string(d: &mut Data) -> String {
        d.to_string()
    }
    #[rhai_fn(global, name = "to_debug", pure)]
    pub fn to_debug(d: &mut Data) -> String {
        d.to_string()
    }
}

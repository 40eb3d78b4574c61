//! Writing a world to disk: the split files, the images, the tokenizer and `world.json`; making
//! sure a folder holds a given world; reading a split back.

use super::*;

/// What [`generate_world`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct WorldSummary {
    pub dir: PathBuf,
    /// Samples per split.
    pub split_sizes: BTreeMap<String, usize>,
    /// Samples per split and question type.
    pub type_counts: BTreeMap<String, BTreeMap<QuestionType, usize>>,
    pub vocab_size: usize,
    pub eos_id: u32,
    /// Token ids per train sample with the phi template (the image placeholder counting one).
    pub mean_tokens: f64,
    pub max_tokens: usize,
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Generate the world described by `cfg` into `out_dir`: `train.json`, `val.json`, `test.json`,
/// `images/NNNNNN.png`, `tokenizer.json` and, last, `world.json` (the config; its presence marks a
/// complete world). Existing files of an earlier world there are replaced.
pub fn generate_world(cfg: &WorldConfig, out_dir: &Path) -> Result<WorldSummary> {
    cfg.validate()?;
    let images_dir = out_dir.join("images");
    std::fs::create_dir_all(&images_dir).map_err(|e| Error::io(&images_dir, e))?;
    let world_json = out_dir.join("world.json");
    if world_json.exists() {
        std::fs::remove_file(&world_json).map_err(|e| Error::io(&world_json, e))?;
    }
    remove_old_images(&images_dir)?;

    let mut split_sizes = BTreeMap::new();
    let mut type_counts = BTreeMap::new();
    let mut train_texts: Vec<String> = Vec::new();
    let mut train_turns: Vec<Vec<Turn>> = Vec::new();
    for (split, records) in SPLITS.iter().zip(make_world_records(cfg)?) {
        let n = records.len();

        let mut json = String::from("[\n");
        let mut counts: BTreeMap<QuestionType, usize> = BTreeMap::new();
        for (i, (record, scene)) in records.iter().enumerate() {
            let img = render_scene(cfg, scene);
            let path = out_dir.join(&record.image);
            img.save_with_format(&path, image::ImageFormat::Png)
                .map_err(|e| Error::BadImage {
                    path: path.clone(),
                    reason: format!("cannot write: {e}"),
                })?;
            let line = serde_json::to_string(record)
                .map_err(|e| Error::Other(format!("serialising record {}: {e}", record.id)))?;
            json.push_str(&line);
            json.push_str(if i + 1 < records.len() { ",\n" } else { "\n" });
            *counts.entry(record.question_type).or_default() += 1;
            if *split == "train" {
                let turn = Turn {
                    question: record.conversations[0].value.clone(),
                    answer: Some(record.answer().to_string()),
                };
                train_texts.push(crate::tokenize::phi_prompt(std::slice::from_ref(&turn)));
                train_turns.push(vec![turn]);
            }
        }
        json.push_str("]\n");
        write_file(&out_dir.join(format!("{split}.json")), json.as_bytes())?;
        split_sizes.insert(split.to_string(), n);
        type_counts.insert(split.to_string(), counts);
    }

    train_texts.extend(vocabulary_sheet(cfg));
    let whole: Vec<&str> = if cfg.system_prompt_token {
        vec![PHI_SYSTEM]
    } else {
        vec![]
    };
    let tokenizer = train_world_tokenizer(&train_texts, cfg.vocab_size, &whole)?;
    let tok_json = tokenizer
        .to_string(true)
        .map_err(|e| Error::Tokenizer(format!("serialising the world tokenizer: {e}")))?;
    write_file(&out_dir.join("tokenizer.json"), tok_json.as_bytes())?;

    let prompt_tok = PromptTokenizer::new(tokenizer)?;
    let mut total = 0usize;
    let mut max_tokens = 0usize;
    for turns in &train_turns {
        let (ids, _) = encode_conversation(&prompt_tok, turns)?;
        total += ids.len();
        max_tokens = max_tokens.max(ids.len());
    }

    let cfg_json = serde_json::to_string_pretty(cfg)
        .map_err(|e| Error::Other(format!("serialising the world config: {e}")))?;
    write_file(&world_json, format!("{cfg_json}\n").as_bytes())?;

    Ok(WorldSummary {
        dir: out_dir.to_path_buf(),
        split_sizes,
        type_counts,
        vocab_size: prompt_tok.vocab_size(),
        eos_id: prompt_tok.eos_id(),
        mean_tokens: total as f64 / train_turns.len().max(1) as f64,
        max_tokens,
    })
}

/// Delete the `NNNNNN.png` files an earlier generation left (and nothing else).
fn remove_old_images(images_dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(images_dir).map_err(|e| Error::io(images_dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(images_dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ours = name
            .strip_suffix(".png")
            .is_some_and(|stem| !stem.is_empty() && stem.bytes().all(|b| b.is_ascii_digit()));
        if ours {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// Make sure `dir` holds the world of `cfg`: generate it when it is missing, incomplete, or was
/// made from a different config. Processes sharing `dir` (parallel tests, a REPL beside a run)
/// take turns through a lock file there, so one generates and the others find it done.
pub fn ensure_world(dir: &Path, cfg: &WorldConfig) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let lock_path = dir.join(".generating.lock");
    let lock = std::fs::File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
    lock.lock().map_err(|e| Error::io(&lock_path, e))?;
    let complete = ["train.json", "val.json", "test.json", "tokenizer.json"]
        .iter()
        .all(|f| dir.join(f).is_file());
    let same_config = std::fs::read_to_string(dir.join("world.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<WorldConfig>(&text).ok())
        .is_some_and(|existing| existing == *cfg);
    if complete && same_config {
        return Ok(());
    }
    generate_world(cfg, dir).map(|_| ())
}

/// Read one of the world's split files with its scene metadata.
pub fn read_world_split(path: &Path) -> Result<Vec<WorldRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::BadConfig {
        path: path.to_path_buf(),
        reason: format!("not a world split file: {e}"),
    })
}

//! Where checkpoints come from and how their tensors are read and written.
//!
//! A checkpoint is a folder (or a hub repository, resolved to a folder in the hf-hub cache) holding
//! `config.json`, one `model.safetensors` or several shards listed by
//! `model.safetensors.index.json`, `tokenizer.json`, and for hybrids `mamba_config.json`.
//! Key names are never spelled here: the model files read them through [`VarBuilder`] prefixes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::io::{read_json, write_atomic, write_json};
use crate::{Error, Result};

pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "model.safetensors";
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";
pub const TOKENIZER: &str = "tokenizer.json";
pub const PREPROCESSOR: &str = "preprocessor_config.json";
pub const MAMBA_CONFIG: &str = "mamba_config.json";

/// The files of one checkpoint, resolved on the local disk.
#[derive(Debug, Clone)]
pub struct CheckpointFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub preprocessor: Option<PathBuf>,
    pub mamba_config: Option<PathBuf>,
    /// Load weights holding NaN or Inf instead of failing with [`Error::NonFinite`]: for
    /// inspecting a diverged checkpoint, never for training from one.
    pub allow_non_finite: bool,
}

impl CheckpointFiles {
    /// A local folder in TinyLLaVA / MaTVLM layout.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::NotFound(format!(
                "{} is not a folder",
                dir.display()
            )));
        }
        let config = dir.join(CONFIG);
        if !config.is_file() {
            return Err(Error::NotFound(format!(
                "{} has no {CONFIG}",
                dir.display()
            )));
        }
        let weights = weight_files(dir)?;
        let opt = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            weights,
            tokenizer: opt(TOKENIZER),
            preprocessor: opt(PREPROCESSOR),
            mamba_config: opt(MAMBA_CONFIG),
            allow_non_finite: false,
        })
    }

    /// The same files, loaded even when weights hold NaN or Inf (see
    /// [`CheckpointFiles::allow_non_finite`]).
    pub fn allowing_non_finite(mut self) -> Self {
        self.allow_non_finite = true;
        self
    }

    /// A local folder, or else a hub id (`owner/name`) looked up in the hf-hub cache first and
    /// downloaded only when missing there and `HF_HUB_OFFLINE` is not set.
    pub fn resolve(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.exists() {
            return Self::from_dir(path);
        }
        if spec.split('/').count() != 2 || spec.starts_with('.') || spec.starts_with('/') {
            return Err(Error::NotFound(format!(
                "`{spec}` is neither a local folder nor a hub id of the form owner/name"
            )));
        }
        hub::resolve(spec)
    }

    /// A VarBuilder over all weight files (memory-mapped), tensors converted to `dtype`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        for p in &self.weights {
            check_safetensors(p, self.allow_non_finite)?;
        }
        // SAFETY: the files are memory-mapped read-only; modifying them while a model is loaded
        // is undefined behaviour, as for every mmap-based loader.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&self.weights, dtype, device) }
            .map_err(|e| Error::BadSafetensors {
                path: self.dir.clone(),
                reason: e.to_string(),
            })?;
        Ok(vb)
    }

    pub fn location(&self) -> String {
        self.dir.display().to_string()
    }
}

/// The weight files of a folder: the shards named by the index if there is one, else
/// `model.safetensors`, else every `*.safetensors` in name order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(WEIGHTS_INDEX);
    if index.is_file() {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let idx: Index = read_json(&index)?;
        let mut files: Vec<String> = idx.weight_map.values().cloned().collect();
        files.sort();
        files.dedup();
        check_shard_names(&index, &files)?;
        let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
        if let Some(missing) = files.iter().find(|f| !f.is_file()) {
            return Err(Error::NotFound(format!(
                "{} lists {} which is missing",
                index.display(),
                missing.display()
            )));
        }
        return Ok(files);
    }
    let single = dir.join(WEIGHTS);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::NotFound(format!(
            "{} holds no .safetensors weights",
            dir.display()
        )));
    }
    Ok(files)
}

/// The index must name shards inside the checkpoint folder: a name with a path in it would read
/// files elsewhere on the disk.
fn check_shard_names(index: &Path, names: &[String]) -> Result<()> {
    if names.is_empty() {
        return Err(Error::BadConfig {
            path: index.to_path_buf(),
            reason: "`weight_map` lists no weight file".into(),
        });
    }
    let plain =
        |n: &str| !n.is_empty() && n != "." && n != ".." && !n.contains('/') && !n.contains('\\');
    match names.iter().find(|n| !plain(n)) {
        Some(bad) => Err(Error::BadConfig {
            path: index.to_path_buf(),
            reason: format!("`weight_map` names `{bad}`, which is not a file name in this folder"),
        }),
        None => Ok(()),
    }
}

/// Check that a file is a complete safetensors file (header parses, data fits the file) whose
/// float tensors hold no NaN or Inf.
pub fn validate_safetensors(path: &Path) -> Result<()> {
    check_safetensors(path, false)
}

/// [`validate_safetensors`], with non-finite values allowed when `allow_non_finite`. The header
/// (its size, shapes and offsets) is checked against the file's length before any tensor is
/// looked at, so an absurd shape is an error, not an allocation.
pub fn check_safetensors(path: &Path, allow_non_finite: bool) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    check_safetensors_bytes(path, &bytes, allow_non_finite)
}

/// [`check_safetensors`] of a file already read into `bytes`.
fn check_safetensors_bytes(path: &Path, bytes: &[u8], allow_non_finite: bool) -> Result<()> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::BadSafetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if allow_non_finite {
        return Ok(());
    }
    let mut names = st.names();
    // Reported in name order, so the same file always names the same tensor.
    names.sort();
    for name in names {
        let view = st.tensor(name).map_err(|e| Error::BadSafetensors {
            path: path.to_path_buf(),
            reason: format!("tensor `{name}`: {e}"),
        })?;
        let count = non_finite_count(view.dtype(), view.data());
        if count > 0 {
            return Err(Error::NonFinite {
                path: path.to_path_buf(),
                tensor: name.to_string(),
                count,
            });
        }
    }
    Ok(())
}

/// How many values of a little-endian float buffer are NaN or +-Inf (all exponent bits set); 0
/// for integer and boolean dtypes. One pass over the bytes, no decoding.
fn non_finite_count(dtype: safetensors::Dtype, data: &[u8]) -> usize {
    use safetensors::Dtype;
    fn count<const N: usize>(data: &[u8], bad: impl Fn([u8; N]) -> bool) -> usize {
        data.chunks_exact(N)
            .filter(|c| bad(<[u8; N]>::try_from(*c).expect("chunks of N bytes")))
            .count()
    }
    match dtype {
        Dtype::F16 => count::<2>(data, |b| u16::from_le_bytes(b) & 0x7c00 == 0x7c00),
        Dtype::BF16 => count::<2>(data, |b| u16::from_le_bytes(b) & 0x7f80 == 0x7f80),
        Dtype::F32 => count::<4>(data, |b| !f32::from_le_bytes(b).is_finite()),
        Dtype::F64 => count::<8>(data, |b| !f64::from_le_bytes(b).is_finite()),
        _ => 0,
    }
}

/// Load every tensor of one safetensors file (for fixtures and small checkpoints). Float tensors
/// holding NaN or Inf are an [`Error::NonFinite`] naming the tensor.
pub fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    load_safetensors_with(path, device, false)
}

/// [`load_safetensors`], with non-finite values allowed when `allow_non_finite` (to inspect a
/// diverged checkpoint).
pub fn load_safetensors_with(
    path: &Path,
    device: &Device,
    allow_non_finite: bool,
) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    check_safetensors_bytes(path, &bytes, allow_non_finite)?;
    candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| Error::BadSafetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Save named tensors as safetensors, atomically. With `max_shard_bytes`, larger sets are split
/// into `model-0000k-of-0000n.safetensors` shards plus `model.safetensors.index.json`, as HF does.
pub fn save_safetensors(
    dir: &Path,
    tensors: &BTreeMap<String, Tensor>,
    max_shard_bytes: Option<usize>,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let limit = max_shard_bytes.unwrap_or(usize::MAX);
    let mut shards: Vec<Vec<(&String, &Tensor)>> = vec![vec![]];
    let mut size = 0usize;
    for (name, t) in tensors {
        let bytes = t.elem_count() * t.dtype().size_in_bytes();
        if size > 0 && size + bytes > limit {
            shards.push(vec![]);
            size = 0;
        }
        size += bytes;
        shards.last_mut().expect("non-empty").push((name, t));
    }
    let n = shards.len();
    let mut written = Vec::new();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            WEIGHTS.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        let path = dir.join(&file);
        let data: Vec<(String, Tensor)> = shard
            .iter()
            .map(|(k, t)| Ok(((*k).clone(), t.contiguous()?)))
            .collect::<candle_core::Result<_>>()?;
        let bytes = safetensors::serialize(data.iter().map(|(k, t)| (k.as_str(), t)), None)
            .map_err(|e| Error::Other(format!("serialising {}: {e}", path.display())))?;
        write_atomic(&path, &bytes)?;
        for (k, _) in shard {
            weight_map.insert((*k).clone(), file.clone());
        }
        written.push(path);
    }
    let index = dir.join(WEIGHTS_INDEX);
    if n > 1 {
        let total: usize = tensors
            .values()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        let json = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&index, &json)?;
    } else if index.exists() {
        std::fs::remove_file(&index).map_err(|e| Error::io(&index, e))?;
    }
    Ok(written)
}

mod hub {
    use super::*;

    const FILES: [&str; 5] = [CONFIG, TOKENIZER, PREPROCESSOR, MAMBA_CONFIG, WEIGHTS_INDEX];

    fn offline() -> bool {
        std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v != "0" && !v.is_empty())
    }

    /// Resolve a hub id to a folder of the hf-hub cache. Cached files are used without any network
    /// access; the rest is downloaded unless offline.
    pub fn resolve(id: &str) -> Result<CheckpointFiles> {
        let cache = hf_hub::Cache::from_env();
        let cached = cache.model(id.to_string());
        let mut api_repo = None;
        let mut get = |name: &str, required: bool| -> Result<Option<PathBuf>> {
            if let Some(p) = cached.get(name) {
                return Ok(Some(p));
            }
            if offline() {
                return if required {
                    Err(Error::NotFound(format!(
                        "{id}: {name} is not in the hf-hub cache and HF_HUB_OFFLINE is set"
                    )))
                } else {
                    Ok(None)
                };
            }
            if api_repo.is_none() {
                let api = hf_hub::api::sync::ApiBuilder::from_env()
                    .with_progress(true)
                    .build()
                    .map_err(|e| Error::Other(format!("hf-hub: {e}")))?;
                api_repo = Some(api.model(id.to_string()));
            }
            match api_repo.as_ref().expect("set above").get(name) {
                Ok(p) => Ok(Some(p)),
                Err(e) if required => Err(Error::NotFound(format!("{id}/{name}: {e}"))),
                Err(_) => Ok(None),
            }
        };
        let mut found = HashMap::new();
        for name in FILES {
            if let Some(p) = get(name, name == CONFIG)? {
                found.insert(name, p);
            }
        }
        let mut weights = Vec::new();
        if let Some(index) = found.get(WEIGHTS_INDEX) {
            let dir = index.parent().map(Path::to_path_buf).unwrap_or_default();
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: BTreeMap<String, String>,
            }
            let idx: Index = read_json(index)?;
            let mut names: Vec<String> = idx.weight_map.into_values().collect();
            names.sort();
            names.dedup();
            check_shard_names(index, &names)?;
            for n in names {
                let p = get(&n, true)?.unwrap_or_else(|| dir.join(&n));
                weights.push(p);
            }
        } else if let Some(p) = get(WEIGHTS, true)? {
            weights.push(p);
        }
        let config = found.remove(CONFIG).expect("required");
        Ok(CheckpointFiles {
            dir: config.parent().map(Path::to_path_buf).unwrap_or_default(),
            config,
            weights,
            tokenizer: found.remove(TOKENIZER),
            preprocessor: found.remove(PREPROCESSOR),
            mamba_config: found.remove(MAMBA_CONFIG),
            allow_non_finite: false,
        })
    }
}

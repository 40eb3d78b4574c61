//! A run directory: everything a training run leaves on disk, written so that a crash or Ctrl-C
//! at any moment leaves a run that can be resumed.
//!
//! ```text
//! run/
//!   config.json                  the caller's full configuration (rewritten at every start)
//!   metrics.jsonl                one JSON object per line: train steps, evaluations
//!   checkpoints/
//!     step-000120/
//!       model.safetensors        the trainable weights
//!       optimizer.safetensors    AdamW moments and step counts
//!       state.json               step, lr, data position, train config (written last)
//!     step-000240/ ...
//!     latest                     the folder name of the newest complete checkpoint
//! ```
//! A checkpoint is written into a hidden temporary folder and renamed into place in one step, then
//! `latest` is replaced atomically; so a checkpoint folder either exists complete or not at all.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint::load_safetensors_with;
use crate::io::{write_atomic, Writer};
use crate::{Error, Result};

pub const RUN_CONFIG: &str = "config.json";
pub const METRICS: &str = "metrics.jsonl";
pub const CHECKPOINTS: &str = "checkpoints";
pub const LATEST: &str = "latest";
pub const CKPT_WEIGHTS: &str = "model.safetensors";
pub const CKPT_OPTIMIZER: &str = "optimizer.safetensors";
pub const CKPT_STATE: &str = "state.json";

/// Version of the checkpoint layout, stored in `state.json`.
pub const CHECKPOINT_FORMAT: u32 = 1;

/// Serialise named tensors to one safetensors file, atomically.
pub fn write_tensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    write_tensors_with(&Writer::files(), path, tensors)
}

/// [`write_tensors`] through `writer`.
pub fn write_tensors_with(
    writer: &Writer,
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<()> {
    let data: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.as_str(), t.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    let bytes = safetensors::serialize(data.iter().map(|(k, t)| (*k, t)), None)
        .map_err(|e| Error::Other(format!("serialising {}: {e}", path.display())))?;
    writer.write_atomic(path, &bytes)
}

/// The small, human-readable part of a checkpoint (`state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    pub format: u32,
    /// Optimiser steps completed; training resumes with step `step + 1`.
    pub step: usize,
    /// The learning rate of the last step taken.
    pub lr: f64,
    /// The data source's position ([`super::Resumable::state`]), opaque here.
    pub data: serde_json::Value,
    /// The training configuration that produced this checkpoint.
    pub train_config: serde_json::Value,
    /// Tokens consumed so far.
    pub tokens: u64,
    /// Free-form extras a caller wants kept with the checkpoint.
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// A checkpoint read back from disk.
#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub weights: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    pub state: CheckpointState,
}

/// An open run directory.
#[derive(Debug)]
pub struct RunDir {
    root: PathBuf,
    metrics: File,
    writer: Writer,
}

impl RunDir {
    /// Open the run directory `root`, creating it (and `checkpoints/`) when missing. Existing
    /// metrics and checkpoints are kept, ready for a resume.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let ck = root.join(CHECKPOINTS);
        std::fs::create_dir_all(&ck).map_err(|e| Error::io(&ck, e))?;
        let metrics = Self::open_metrics(&root)?;
        Ok(Self {
            root,
            metrics,
            writer: Writer::files(),
        })
    }

    /// Write checkpoints through `writer` (tests use one that fails like a full disk).
    pub fn with_writer(mut self, writer: Writer) -> Self {
        self.writer = writer;
        self
    }

    fn open_metrics(root: &Path) -> Result<File> {
        let path = root.join(METRICS);
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.root.join(METRICS)
    }

    pub fn checkpoints_dir(&self) -> PathBuf {
        self.root.join(CHECKPOINTS)
    }

    /// Write `config.json` (atomically, replacing an older one).
    pub fn write_config(&self, config: &serde_json::Value) -> Result<()> {
        let path = self.root.join(RUN_CONFIG);
        let text = serde_json::to_string_pretty(config)
            .map_err(|e| Error::Other(format!("serialising {}: {e}", path.display())))?;
        write_atomic(&path, text.as_bytes())
    }

    /// Read `config.json`, if there is one.
    pub fn read_config(&self) -> Result<Option<serde_json::Value>> {
        let path = self.root.join(RUN_CONFIG);
        if !path.is_file() {
            return Ok(None);
        }
        crate::io::read_json(&path).map(Some)
    }

    /// Append one record to `metrics.jsonl` and flush, so a crash loses no logged line.
    pub fn log(&mut self, record: &serde_json::Value) -> Result<()> {
        let path = self.metrics_path();
        let mut line = serde_json::to_string(record)
            .map_err(|e| Error::Other(format!("serialising a metrics record: {e}")))?;
        line.push('\n');
        self.metrics
            .write_all(line.as_bytes())
            .and_then(|_| self.metrics.flush())
            .map_err(|e| Error::io(&path, e))
    }

    /// Every record of `metrics.jsonl`, in order. Lines that do not parse are an error naming the
    /// line number.
    pub fn read_metrics(&self) -> Result<Vec<serde_json::Value>> {
        let path = self.metrics_path();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let mut out = Vec::new();
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| Error::io(&path, e))?;
            if line.trim().is_empty() {
                continue;
            }
            let v = serde_json::from_str(&line).map_err(|e| Error::BadConfig {
                path: path.clone(),
                reason: format!("line {}: {e}", i + 1),
            })?;
            out.push(v);
        }
        Ok(out)
    }

    /// Drop the metrics records of steps after `step` (those a crashed run logged after its last
    /// checkpoint, which the resumed run is about to redo). The file is rewritten atomically.
    ///
    /// A last line without its line end is the torn append of a crash (the line is written in
    /// one call, flushed, so nothing after it was logged): it is dropped, not an error.
    pub fn truncate_metrics_after(&mut self, step: usize) -> Result<()> {
        let path = self.metrics_path();
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        if !text.is_empty() && !text.ends_with('\n') {
            let whole = text.rfind('\n').map_or(0, |i| i + 1);
            write_atomic(&path, &text.as_bytes()[..whole])?;
            self.metrics = Self::open_metrics(&self.root)?;
        }
        let kept: Vec<serde_json::Value> = self
            .read_metrics()?
            .into_iter()
            .filter(|r| {
                r.get("step")
                    .and_then(serde_json::Value::as_u64)
                    .is_none_or(|s| s as usize <= step)
            })
            .collect();
        let mut text = String::new();
        for r in &kept {
            text.push_str(&r.to_string());
            text.push('\n');
        }
        let path = self.metrics_path();
        write_atomic(&path, text.as_bytes())?;
        self.metrics = Self::open_metrics(&self.root)?;
        Ok(())
    }

    /// The folder name of the checkpoint after `step` steps.
    pub fn checkpoint_name(step: usize) -> String {
        format!("step-{step:06}")
    }

    /// Write a checkpoint after `step` steps and point `latest` at it, then delete all but the
    /// newest `keep_last` checkpoints (0 keeps all). Returns the checkpoint folder.
    pub fn save_checkpoint(
        &mut self,
        weights: &BTreeMap<String, Tensor>,
        optimizer: &BTreeMap<String, Tensor>,
        state: &CheckpointState,
        keep_last: usize,
    ) -> Result<PathBuf> {
        let dir = self.checkpoints_dir();
        let name = Self::checkpoint_name(state.step);
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::write(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| Error::write(&tmp, e))?;
        let filled = self.fill_checkpoint(&tmp, weights, optimizer, state);
        if let Err(e) = filled {
            // A failed write (full disk, read-only folder) leaves the checkpoints as they were;
            // the partial folder goes now rather than at the next prune. Best effort: the
            // write error is the one to report.
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let dest = dir.join(&name);
        if dest.exists() {
            // A checkpoint of the same step from an earlier attempt: the new one replaces it.
            std::fs::remove_dir_all(&dest).map_err(|e| Error::write(&dest, e))?;
        }
        std::fs::rename(&tmp, &dest).map_err(|e| Error::write(&dest, e))?;
        sync_dir(&dir);
        self.writer
            .write_atomic(&dir.join(LATEST), name.as_bytes())?;
        self.prune(keep_last)?;
        Ok(dest)
    }

    /// The files of one checkpoint, into the folder `tmp`; `state.json` last, so that a folder
    /// with one is complete.
    fn fill_checkpoint(
        &self,
        tmp: &Path,
        weights: &BTreeMap<String, Tensor>,
        optimizer: &BTreeMap<String, Tensor>,
        state: &CheckpointState,
    ) -> Result<()> {
        write_tensors_with(&self.writer, &tmp.join(CKPT_WEIGHTS), weights)?;
        write_tensors_with(&self.writer, &tmp.join(CKPT_OPTIMIZER), optimizer)?;
        let text = serde_json::to_string_pretty(state)
            .map_err(|e| Error::Other(format!("serialising {CKPT_STATE}: {e}")))?;
        self.writer
            .write_atomic(&tmp.join(CKPT_STATE), text.as_bytes())
    }

    /// Complete checkpoints (those with a `state.json`), oldest first, as (step, folder).
    pub fn checkpoints(&self) -> Result<Vec<(usize, PathBuf)>> {
        let dir = self.checkpoints_dir();
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut out = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| Error::io(&dir, e))?.path();
            let Some(step) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("step-"))
                .and_then(|n| n.parse::<usize>().ok())
            else {
                continue;
            };
            if path.join(CKPT_STATE).is_file() {
                out.push((step, path));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Delete all but the newest `keep_last` checkpoints (0 keeps all); the one `latest` names is
    /// never deleted. Leftover temporary folders and files of interrupted saves are removed too.
    pub fn prune(&self, keep_last: usize) -> Result<()> {
        let dir = self.checkpoints_dir();
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        for entry in entries {
            let path = entry.map_err(|e| Error::io(&dir, e))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with(".step-") && name.ends_with(".tmp") && path.is_dir() {
                std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
            } else if name.starts_with('.') && name.ends_with(".tmp") && path.is_file() {
                // The temporary `latest` of a save killed before its rename.
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            }
        }
        if keep_last == 0 {
            return Ok(());
        }
        let latest = self.latest_dir()?;
        let all = self.checkpoints()?;
        let excess = all.len().saturating_sub(keep_last);
        for (_, path) in all.into_iter().take(excess) {
            if Some(&path) != latest.as_ref() {
                std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
            }
        }
        Ok(())
    }

    /// The newest complete checkpoint folder: the one `latest` names, or, when that pointer is
    /// missing or stale, the highest complete step folder.
    pub fn latest_dir(&self) -> Result<Option<PathBuf>> {
        let dir = self.checkpoints_dir();
        let pointer = dir.join(LATEST);
        if let Ok(name) = std::fs::read_to_string(&pointer) {
            let path = dir.join(name.trim());
            if !name.trim().is_empty() && path.join(CKPT_STATE).is_file() {
                return Ok(Some(path));
            }
        }
        Ok(self.checkpoints()?.pop().map(|(_, p)| p))
    }

    /// Read one checkpoint folder, its tensors onto `device`. A tensor holding NaN or Inf is an
    /// [`Error::NonFinite`] naming it (see [`RunDir::load_checkpoint_with`]).
    pub fn load_checkpoint(dir: &Path, device: &Device) -> Result<Checkpoint> {
        Self::load_checkpoint_with(dir, device, false)
    }

    /// [`RunDir::load_checkpoint`], with NaN and Inf allowed when `allow_non_finite` (to inspect
    /// a diverged run; never resume from one).
    pub fn load_checkpoint_with(
        dir: &Path,
        device: &Device,
        allow_non_finite: bool,
    ) -> Result<Checkpoint> {
        let state_path = dir.join(CKPT_STATE);
        let state: CheckpointState = crate::io::read_json(&state_path)?;
        if state.format != CHECKPOINT_FORMAT {
            return Err(Error::BadConfig {
                path: state_path,
                reason: format!(
                    "checkpoint format {} is not the supported {CHECKPOINT_FORMAT}",
                    state.format
                ),
            });
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            weights: load_safetensors_with(&dir.join(CKPT_WEIGHTS), device, allow_non_finite)?,
            optimizer: load_safetensors_with(&dir.join(CKPT_OPTIMIZER), device, allow_non_finite)?,
            state,
        })
    }

    /// Read the newest complete checkpoint, if any.
    pub fn load_latest(&self, device: &Device) -> Result<Option<Checkpoint>> {
        match self.latest_dir()? {
            Some(dir) => Self::load_checkpoint(&dir, device).map(Some),
            None => Ok(None),
        }
    }
}

/// Persist a rename on filesystems that need the parent folder synced; best effort, since some
/// platforms cannot open folders.
fn sync_dir(dir: &Path) {
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
}

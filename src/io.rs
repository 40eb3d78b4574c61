//! Files written so that a crash never leaves half of one, and JSON read with the file named in
//! every error. Every module that persists something (configs, checkpoints, run directories,
//! figures, benchmark files) goes through here.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::{Error, Result};

/// Read and parse a JSON file, naming the file in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::BadConfig {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Write JSON atomically (see [`write_atomic`]), pretty-printed.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Other(e.to_string()))?;
    write_atomic(path, text.as_bytes())
}

/// Write bytes to `path` through a temporary file in the same folder and a rename, so that a
/// crash or Ctrl-C leaves either the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Writer::files().write_atomic(path, bytes)
}

/// The temporary file a [`Writer`] fills before the rename.
pub trait Sink: Write {
    /// Make the written bytes durable (`fsync` for a file).
    fn sync(&mut self) -> std::io::Result<()>;
}

impl Sink for File {
    fn sync(&mut self) -> std::io::Result<()> {
        self.sync_all()
    }
}

type CreateSink = dyn Fn(&Path) -> std::io::Result<Box<dyn Sink>> + Send + Sync;

/// How atomic writes create their temporary files: on the file system ([`Writer::files`]), or
/// through a given function, so that a test can make writes fail the way a full disk or a
/// read-only folder does and check what a failed save leaves behind.
#[derive(Clone)]
pub struct Writer(Arc<CreateSink>);

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Writer")
    }
}

impl Default for Writer {
    fn default() -> Self {
        Self::files()
    }
}

impl Writer {
    /// Plain files.
    pub fn files() -> Self {
        Self::new(|p: &Path| Ok(Box::new(File::create(p)?) as Box<dyn Sink>))
    }

    /// Temporary files made by `create` (given the temporary path).
    pub fn new(
        create: impl Fn(&Path) -> std::io::Result<Box<dyn Sink>> + Send + Sync + 'static,
    ) -> Self {
        Self(Arc::new(create))
    }

    /// [`write_atomic`] through this writer. On failure the temporary file is removed, `path`
    /// keeps its old content (or stays absent), and the error names `path`.
    pub fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(dir) = dir {
            std::fs::create_dir_all(dir).map_err(|e| Error::write(dir, e))?;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        let written = (self.0)(&tmp).and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync()
        });
        if let Err(e) = written {
            // Best effort: the original error is the one to report.
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::write(path, e));
        }
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::write(path, e)
        })
    }
}

//! What the notebooks in `notebooks/` share: a small synthetic world, and a teacher that is the
//! trained tiny teacher when the source tree has it ([`crate::teacher::default_teacher_path`])
//! or else a small randomly initialised one, so that every notebook runs on a fresh checkout.
//!
//! A random teacher answers nonsense, but every step of the method (building a hybrid,
//! initialising it from attention, distilling, comparing, plotting) works the same on it; the
//! notebooks say which one they got ([`NotebookTeacher`] displays itself as a note).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};

use crate::data::{ensure_world, Dataset, ImageCheck, LoadOptions, OnBadRecord, WorldConfig};
use crate::model::vlm::Vlm;
use crate::teacher::{default_teacher_path, init_vlm, TeacherDims};
use crate::tokenize::PromptTokenizer;
use crate::{Error, Result};

/// The notebooks' synthetic world: the tiny teacher's world (same pictures, questions and
/// answer vocabulary) with small splits, generated in seconds.
pub fn world_config() -> WorldConfig {
    WorldConfig {
        train: 512,
        val: 64,
        test: 64,
        ..crate::teacher::teacher_world_config()
    }
}

/// Generate the notebooks' world into `dir` unless it is already there; returns `dir`.
pub fn world(dir: &Path) -> Result<PathBuf> {
    ensure_world(dir, &world_config())?;
    Ok(dir.to_path_buf())
}

/// The shape of the random stand-in teacher: the reduced test model with 4 decoder layers, so
/// that a 0.5 hybrid swaps 2 of them.
pub fn random_teacher_dims() -> TeacherDims {
    TeacherDims {
        layers: 4,
        ..TeacherDims::reduced()
    }
}

/// A teacher for a notebook, and which one it is.
#[derive(Debug, Clone)]
pub struct NotebookTeacher {
    pub vlm: Vlm,
    /// True for the trained tiny teacher, false for the random stand-in.
    pub trained: bool,
    /// One sentence saying which teacher this is and where it came from.
    pub description: String,
}

/// The trained tiny teacher if the source tree has it, else a teacher of
/// [`random_teacher_dims`] initialised with `seed` over the tokenizer of the world in
/// `world_dir` (see [`world`]). In f32 on the CPU.
pub fn teacher_or_random(world_dir: &Path, seed: u64) -> Result<NotebookTeacher> {
    let found = default_teacher_path()
        .ok()
        .filter(|dir| dir.join(crate::checkpoint::CONFIG).is_file());
    if let Some(dir) = found {
        let spec = dir.to_string_lossy().to_string();
        let vlm = Vlm::load(&spec, DType::F32, &Device::Cpu)?;
        let description = format!(
            "the trained tiny teacher from {} ({} parameters)",
            dir.display(),
            vlm.parameter_count()
        );
        return Ok(NotebookTeacher {
            vlm,
            trained: true,
            description,
        });
    }
    let tok_path = world_dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(Error::Invalid(format!(
            "{} is missing: generate the notebook world first (matvlm::notebook::world)",
            tok_path.display()
        )));
    }
    let tok = PromptTokenizer::from_file(&tok_path)?;
    let dims = random_teacher_dims();
    let vlm = init_vlm(&dims.config(&tok)?, &tok, seed, &Device::Cpu)?;
    let description = format!(
        "a RANDOMLY INITIALISED stand-in teacher (seed {seed}, {} parameters): the trained \
         tiny teacher is not in assets/tiny-teacher (build it with `cargo run --release --bin \
         train_teacher`); its answers are noise, but every step below works the same",
        vlm.parameter_count(),
    );
    Ok(NotebookTeacher {
        vlm,
        trained: false,
        description,
    })
}

impl NotebookTeacher {
    /// The note a notebook shows: which teacher it got, as markdown.
    pub fn markdown(&self) -> String {
        format!("**Teacher used:** {}.", self.description)
    }

    /// The evcxr output: one markdown block.
    pub fn display_string(&self) -> String {
        crate::display::block("text/markdown", &self.markdown())
    }

    /// Show the note inline in a Jupyter notebook.
    pub fn evcxr_display(&self) {
        print!("{}", self.display_string());
    }
}

/// Split `split` ("train", "val" or "test") of the world in `world_dir`, tokenised with
/// `model`'s tokenizer (the trained teacher's own, or the world's for the random one). Records
/// must be usable: a bad one is an error naming it.
pub fn load_split(model: &Vlm, world_dir: &Path, split: &str) -> Result<Arc<Dataset>> {
    let opts = LoadOptions {
        on_bad: OnBadRecord::Fail,
        image_check: ImageCheck::Decode,
        ..LoadOptions::default()
    };
    let json = world_dir.join(format!("{split}.json"));
    let (ds, _) = Dataset::load_with(&json, world_dir, model.tokenizer()?, &opts)?;
    Ok(Arc::new(ds))
}

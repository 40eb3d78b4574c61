//! The recipe scripts (scripts/*.rhai) end to end in their `--smoke` setting, through the
//! `matrepl` binary, against a reduced random teacher of the tiny teacher's depth (8 layers) on
//! a small synthetic world; their numbers checked against the library computing the same
//! things (`scripts`). Then the training and evaluation bindings against the library, unknown
//! options, Ctrl-C during training (`bindings`), and how script errors are reported (`errors`).
//! The shared fixture and helpers are here.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::common::{eval_with_constants, matrepl_command};
use candle_core::{DType, Device};
use matvlm::data::{ensure_world, Dataset, LoadOptions, WorldConfig};
use matvlm::eval::{agreement, evaluate, AgreementOptions, EvalMode, EvalOptions};
use matvlm::generate::GenerateOptions;
use matvlm::model::hybrid::HybridSpec;
use matvlm::model::hybrid::Placement;
use matvlm::model::vlm::Vlm;
use matvlm::script::{self, Session};
use matvlm::teacher::{init_vlm, TeacherDims};
use matvlm::tokenize::PromptTokenizer;
use rhai::{Dynamic, Map};
use serde_json::Value;

/// A small world and a random teacher that knows its tokenizer, in a temporary folder.
pub(crate) struct Fixture {
    pub(crate) dir: tempfile::TempDir,
}

impl Fixture {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let world = dir.path().join("world");
        let cfg = WorldConfig {
            train: 24,
            val: 8,
            test: 8,
            ..WorldConfig::default()
        };
        ensure_world(&world, &cfg).unwrap();
        let tok = PromptTokenizer::from_file(&world.join("tokenizer.json")).unwrap();
        // The tiny teacher's depth (so that every ratio has whole layers), the reduced width.
        let dims = TeacherDims {
            layers: 8,
            ..TeacherDims::reduced()
        };
        let vlm = init_vlm(&dims.config(&tok).unwrap(), &tok, 0, &Device::Cpu).unwrap();
        vlm.save(&dir.path().join("teacher"), DType::F32, None)
            .unwrap();
        Self { dir }
    }

    pub(crate) fn world(&self) -> PathBuf {
        self.dir.path().join("world")
    }

    pub(crate) fn teacher_dir(&self) -> PathBuf {
        self.dir.path().join("teacher")
    }

    fn teacher(&self) -> Vlm {
        Vlm::load(
            self.teacher_dir().to_str().unwrap(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    }

    fn split(&self, name: &str) -> Arc<Dataset> {
        let tok = PromptTokenizer::from_file(&self.world().join("tokenizer.json")).unwrap();
        let (ds, _) = Dataset::load_with(
            &self.world().join(format!("{name}.json")),
            &self.world(),
            &tok,
            &LoadOptions::default(),
        )
        .unwrap();
        Arc::new(ds)
    }

    /// The script arguments that point a recipe script at this fixture.
    fn args(&self) -> Vec<String> {
        let w = self.world();
        let s = |p: PathBuf| p.display().to_string();
        vec![
            "--teacher".into(),
            s(self.teacher_dir()),
            "--data".into(),
            s(w.join("train.json")),
            "--val".into(),
            s(w.join("val.json")),
            "--test".into(),
            s(w.join("test.json")),
            "--images".into(),
            s(w.clone()),
        ]
    }
}

fn script_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

/// Run `matrepl SCRIPT ARGS` in `cwd` with `stdin`, and report how long it took.
fn matrepl(script: &Path, args: &[String], cwd: &Path, stdin: &str) -> Output {
    let started = Instant::now();
    let mut child = matrepl_command()
        .arg(script)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    eprintln!(
        "{} {}: {:.1} s",
        script.file_name().unwrap().to_string_lossy(),
        args.iter()
            .filter(|a| a.starts_with("--") && *a != "--teacher")
            .cloned()
            .collect::<Vec<_>>()
            .join(" "),
        started.elapsed().as_secs_f64()
    );
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

mod bindings;
mod errors;
mod scripts;

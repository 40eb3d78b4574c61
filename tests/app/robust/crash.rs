//! Crash safety: a distillation run in the `matrepl` binary killed with SIGKILL at seeded
//! random moments (checkpoint writes included) and resumed each time ends bit-identical to an
//! uninterrupted run; failing writes (a read-only folder, a full disk) are errors naming the
//! path that leave the last good checkpoint intact and loadable.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use matvlm::io::{Sink, Writer};
use matvlm::train::{CheckpointState, RunDir};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::common::matrepl_command;
use crate::recipes::Fixture;

const STEPS: usize = 100;
const KILLS: usize = 20;

/// The run: the fixture's 8-layer teacher distilled into its 0.25 hybrid, a checkpoint every 2
/// steps (so kills land in checkpoint writes often), two kept.
const SCRIPT: &str = r#"
let t = load_model(teacher);
let data = dataset(train_json, #{ tokenizer: t });
let h = t.hybrid(#{ ratio: 0.25 });
let r = distill(t, h, data, #{ steps: steps, batch: 2, lr: 0.002, seed: 5, save_every: 2,
    keep_last: 2, progress: "silent", run_dir: run });
print(`done ${r.steps}`);
"#;

fn start(fx: &Fixture, script: &Path, run: &Path) -> Child {
    let s = |p: PathBuf| p.display().to_string();
    matrepl_command()
        .args(["--threads", "1"])
        .arg(script)
        .args(["--teacher", &s(fx.teacher_dir())])
        .args(["--train_json", &s(fx.world().join("train.json"))])
        .args(["--steps", &STEPS.to_string()])
        .args(["--run", &s(run.to_path_buf())])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("done {STEPS}")),
        "{out:?}"
    );
}

/// The temporary files and folders under `checkpoints/`: a checkpoint write in progress, or one
/// a kill interrupted.
fn temporaries(run: &Path) -> Vec<String> {
    match std::fs::read_dir(run.join("checkpoints")) {
        Ok(d) => d
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// How many lines `metrics.jsonl` holds (0 before it exists).
fn train_lines(run: &Path) -> usize {
    std::fs::read(run.join("metrics.jsonl"))
        .map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count())
}

/// The train records of `metrics.jsonl` without their timings.
fn train_records(run: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["kind"] == "train")
        .map(|mut r| {
            let o = r.as_object_mut().unwrap();
            for k in ["tokens_per_s", "step_s", "elapsed_s"] {
                o.remove(k);
            }
            r
        })
        .collect()
}

#[test]
fn sigkill_at_random_moments_then_resume_is_bit_identical() {
    let fx = Fixture::new();
    let script = fx.dir.path().join("crash.rhai");
    std::fs::write(&script, SCRIPT).unwrap();

    // The uninterrupted run, timed to place the kills.
    let straight = fx.dir.path().join("straight");
    let t0 = Instant::now();
    finish(start(&fx, &script, &straight));
    let full = t0.elapsed();

    let crashed = fx.dir.path().join("crashed");
    let mut rng = StdRng::seed_from_u64(21);
    let (mut kills, mut in_writes) = (0, 0);
    while kills < KILLS {
        let before = temporaries(&crashed);
        let writing = || temporaries(&crashed).iter().any(|t| !before.contains(t));
        let mut child = start(&fx, &script, &crashed);
        // Half the kills as soon as a checkpoint write is seen to start, half a random 0-3 ms
        // after the run has logged a random 0-3 more steps (at most a few steps per attempt, so
        // that twenty attempts cannot finish the run).
        let at_write = rng.random_bool(0.5);
        let more_steps = rng.random_range(0..=3);
        let delay = Duration::from_micros(rng.random_range(0..3000));
        let logged = || train_lines(&crashed);
        let base = logged();
        let mut reached: Option<Instant> = None;
        let give_up = Instant::now() + full * 3;
        let killed = loop {
            if child.try_wait().unwrap().is_some() {
                break false;
            }
            if !at_write && reached.is_none() && logged() >= base + more_steps {
                reached = Some(Instant::now());
            }
            let due = if at_write {
                writing() || Instant::now() >= give_up
            } else {
                reached.is_some_and(|t| t.elapsed() >= delay)
            };
            if due {
                child.kill().unwrap();
                break true;
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        let out = child.wait_with_output().unwrap();
        assert!(
            killed,
            "the run finished before kill {kills}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        kills += 1;
        in_writes += writing() as usize;
    }
    finish(start(&fx, &script, &crashed));
    eprintln!(
        "{kills} kills ({in_writes} inside a checkpoint write), uninterrupted run {:.1} s",
        full.as_secs_f64()
    );
    assert!(in_writes > 0, "no kill landed inside a checkpoint write");
    assert!(
        temporaries(&crashed).is_empty(),
        "the finished run left temporaries: {:?}",
        temporaries(&crashed)
    );

    // The final checkpoint, file for file, and the logged steps.
    let last = format!("checkpoints/step-{STEPS:06}");
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let a = std::fs::read(straight.join(&last).join(file)).unwrap();
        let b = std::fs::read(crashed.join(&last).join(file)).unwrap();
        assert!(
            a == b,
            "{file} of the final checkpoint differs after {kills} kills"
        );
    }
    let state = |run: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(run.join(&last).join("state.json")).unwrap())
            .unwrap()
    };
    assert_eq!(state(&straight), state(&crashed));
    let (a, b) = (train_records(&straight), train_records(&crashed));
    assert_eq!(a.len(), STEPS);
    let steps: Vec<u64> = b.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(
        b.len(),
        STEPS,
        "steps logged after {kills} kills: {steps:?}"
    );
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x, y, "a logged step differs after {kills} kills");
    }
}

/// A temporary file that takes `left` more bytes (shared by every file of one save), then fails
/// as a full disk does.
struct FullAfter {
    file: std::fs::File,
    left: Arc<AtomicUsize>,
}

impl Write for FullAfter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let left = self.left.load(Ordering::SeqCst);
        if left == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::StorageFull));
        }
        let n = self.file.write(&buf[..buf.len().min(left)])?;
        self.left.fetch_sub(n, Ordering::SeqCst);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Sink for FullAfter {
    fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_all()
    }
}

fn full_disk_after(bytes: usize) -> Writer {
    let left = Arc::new(AtomicUsize::new(bytes));
    Writer::new(move |p: &Path| {
        Ok(Box::new(FullAfter {
            file: std::fs::File::create(p)?,
            left: left.clone(),
        }) as Box<dyn Sink>)
    })
}

/// Creating any file fails, as in a read-only folder. (Permissions cannot show it: the tests may
/// run as root, which writes into read-only folders.)
fn read_only() -> Writer {
    Writer::new(|_: &Path| Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied)))
}

fn bytes_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    out
}

/// A save that fails part-way (a full disk after a seeded number of bytes, anywhere in the
/// checkpoint's three files or its `latest` pointer; or a read-only folder) is an error naming
/// the file being written, and the last good checkpoint stays the newest, byte for byte, and
/// loads; nothing temporary is left behind; the next save works.
#[test]
fn a_failed_save_leaves_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path();
    super::loaders::small_run(run);
    let good = run.join("checkpoints/step-000003");
    let good_bytes = bytes_of(&good);
    let t = |n: usize| {
        candle_core::Tensor::ones(n, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap()
    };
    let weights = BTreeMap::from([("w".to_string(), t(6)), ("b".to_string(), t(2))]);
    let optim = BTreeMap::from([("exp_avg.w".to_string(), t(6))]);
    let mut state: CheckpointState = serde_json::from_slice(
        &good_bytes
            .iter()
            .find(|(n, _)| n == "state.json")
            .unwrap()
            .1,
    )
    .unwrap();
    state.step = 6;

    // Every byte the save writes (the three files and `latest`), measured on a scratch run: a
    // full disk after any fewer fails it somewhere.
    let scratch = tempfile::tempdir().unwrap();
    let saved = RunDir::open(scratch.path())
        .unwrap()
        .save_checkpoint(&weights, &optim, &state, 2)
        .unwrap();
    let total: usize =
        bytes_of(&saved).iter().map(|(_, b)| b.len()).sum::<usize>() + "step-000006".len();
    let mut rng = StdRng::seed_from_u64(22);
    let mut writers: Vec<(String, Writer)> = (0..12)
        .map(|_| {
            let n = rng.random_range(0..total);
            (format!("full disk after {n} bytes"), full_disk_after(n))
        })
        .collect();
    writers.push(("read-only folder".into(), read_only()));
    for (what, writer) in writers {
        let err = RunDir::open(run)
            .unwrap()
            .with_writer(writer)
            .save_checkpoint(&weights, &optim, &state, 2)
            .map(|_| ())
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&run.join("checkpoints").display().to_string()),
            "{what}: the error names no file of the run: {msg}"
        );
        assert!(matches!(err, matvlm::Error::Write { .. }), "{what}: {msg}");
        let reopened = RunDir::open(run).unwrap();
        assert_eq!(
            reopened.latest_dir().unwrap().as_deref(),
            Some(good.as_path()),
            "{what}"
        );
        assert_eq!(
            bytes_of(&good),
            good_bytes,
            "{what}: the last good checkpoint changed"
        );
        let ck = reopened
            .load_latest(&candle_core::Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(ck.state.step, 3, "{what}");
        assert!(
            temporaries(run).is_empty(),
            "{what}: temporaries left: {:?}",
            temporaries(run)
        );
    }
    // The disk has room again: the same save succeeds and becomes the newest.
    let dest = RunDir::open(run)
        .unwrap()
        .save_checkpoint(&weights, &optim, &state, 2)
        .unwrap();
    assert!(dest.ends_with("step-000006"));
    assert_eq!(RunDir::open(run).unwrap().latest_dir().unwrap(), Some(dest));

    // The io module's own atomic write: the old content stays, no temporary file.
    let file = run.join("config.json");
    std::fs::write(&file, b"{\"old\": true}").unwrap();
    let err = full_disk_after(5)
        .write_atomic(&file, b"{\"new\": true, \"longer\": 1}")
        .unwrap_err();
    assert!(
        err.to_string().contains(&file.display().to_string()),
        "{err}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"{\"old\": true}");
    let left: Vec<_> = std::fs::read_dir(run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

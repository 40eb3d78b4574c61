//! The rhai scripting API: the library as seen from `.rhai` scripts, the REPL and `matrepl -e`.
//!
//! Bindings hold no logic (the rhai book's "domain-specific tools" pattern): each function
//! converts rhai values into library types, calls one library function and converts the result
//! back. Whatever a script can do, Rust code can do with the same library call.
//!
//! * [`engine`] builds an engine for a [`Session`] (device, dtype, cancel flag).
//! * One plugin module per area of the library: [`model`] (load, inspect, run, save models),
//!   [`tensor`] (the `Tensor` type), [`data`] (data sets), [`train`] (distillation, training,
//!   evaluation and the `Run` type), [`io`] (files, stdin, number formatting), [`viz`] (figures
//!   to PNG/SVG files, model comparisons), [`serve`] (the web chat and OpenAI-compatible server),
//!   [`bench`] (the standard VLM benchmarks in their released layouts).
//!   Adding a binding is one documented `pub fn` in the right module; its `///` comment is what
//!   the REPL's `:help` shows.
//! * [`run_file`], [`parse_script_args`], [`parse_device`], [`parse_dtype`]: what `matrepl` needs
//!   to run a script.
//!
//! Errors from the library come back as rhai runtime errors; rhai adds the position of the call.

pub mod bench;
pub mod convert;
pub mod data;
pub mod io;
pub mod model;
pub mod serve;
pub mod tensor;
pub mod train;
pub mod viz;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device};
use rhai::{Dynamic, Engine, EvalAltResult, Map, Scope, AST};

use crate::{Error, Result};

pub use convert::RhaiResult;

/// What every binding of one engine shares: where models are loaded, in which dtype, and the
/// flag that stops long calls (training, generation) at their next step.
#[derive(Debug, Clone)]
pub struct Session {
    pub device: Device,
    pub dtype: DType,
    /// Set (by Ctrl-C, or by the host) to stop the current call at its next step boundary and
    /// then the script. Whoever runs the next entry stores `false` back first.
    pub cancel: Arc<AtomicBool>,
    /// What one evaluation may use (operations, call depth, string and collection sizes).
    pub limits: ScriptLimits,
    /// The data-parallel layout training calls start from (`matrepl --gpus N`).
    pub parallel: crate::train::parallel::Parallel,
}

/// rhai's resource limits for the engines of a [`Session`]. The defaults are far above what the
/// recipe scripts use (a long training script spends its time inside library calls, which count
/// as one operation each), so they only stop a runaway: an unbounded recursion, a string or array
/// grown in a loop. Operations are unlimited by default; Ctrl-C stops a script that loops.
/// A limit of 0 means unlimited (call depth: 0 forbids calls).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScriptLimits {
    /// rhai operations of one evaluation.
    pub max_operations: u64,
    /// Nested calls of script functions.
    pub max_call_depth: usize,
    /// Bytes of one string.
    pub max_string_size: usize,
    /// Elements of one array.
    pub max_array_size: usize,
    /// Entries of one object map.
    pub max_map_size: usize,
}

impl Default for ScriptLimits {
    fn default() -> Self {
        Self {
            max_operations: 0,
            max_call_depth: 64,
            max_string_size: 256 << 20,
            max_array_size: 64 << 20,
            max_map_size: 1 << 20,
        }
    }
}

impl ScriptLimits {
    /// Set these limits on `engine`.
    pub fn apply(&self, engine: &mut Engine) {
        engine
            .set_max_operations(self.max_operations)
            .set_max_call_levels(self.max_call_depth)
            .set_max_string_size(self.max_string_size)
            .set_max_array_size(self.max_array_size)
            .set_max_map_size(self.max_map_size);
    }
}

impl Default for Session {
    fn default() -> Self {
        Self::new(Device::Cpu, DType::F32)
    }
}

impl Session {
    pub fn new(device: Device, dtype: DType) -> Self {
        Self {
            device,
            dtype,
            cancel: Arc::new(AtomicBool::new(false)),
            limits: ScriptLimits::default(),
            parallel: crate::train::parallel::Parallel::default(),
        }
    }

    /// Run training calls data-parallel per `parallel` unless their options say otherwise.
    pub fn with_parallel(mut self, parallel: crate::train::parallel::Parallel) -> Self {
        self.parallel = parallel;
        self
    }

    /// Other resource limits for the engines of this session.
    pub fn with_limits(mut self, limits: ScriptLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Share an existing flag, e.g. the one [`crate::train::ctrlc_flag`] sets on Ctrl-C.
    pub fn with_cancel(mut self, cancel: Arc<AtomicBool>) -> Self {
        self.cancel = cancel;
        self
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

/// A rhai engine with the whole matvlm API registered. The session travels as the engine's tag,
/// so that bindings which load or run things read the device, dtype and cancel flag from it.
///
/// A set cancel flag also stops plain script code (loops) at its next operation with an
/// "interrupted" error, so Ctrl-C always gets back to the prompt. The session's
/// [`ScriptLimits`] bound operations, call depth, strings, arrays and maps.
pub fn engine(session: &Session) -> Engine {
    let mut engine = Engine::new();
    engine.set_default_tag(Dynamic::from(session.clone()));
    engine
        .register_type_with_name::<model::Model>("Model")
        .register_type_with_name::<tensor::Tensor>("Tensor")
        .register_type_with_name::<data::Data>("Data")
        .register_type_with_name::<train::Run>("Run");
    engine.register_global_module(rhai::exported_module!(model::api).into());
    engine.register_global_module(rhai::exported_module!(tensor::api).into());
    engine.register_global_module(rhai::exported_module!(data::api).into());
    engine.register_global_module(rhai::exported_module!(io::api).into());
    engine.register_global_module(rhai::exported_module!(train::api).into());
    engine.register_global_module(rhai::exported_module!(viz::api).into());
    engine.register_global_module(rhai::exported_module!(serve::api).into());
    engine.register_global_module(rhai::exported_module!(bench::api).into());
    let cancel = session.cancel.clone();
    engine.on_progress(move |_| {
        cancel
            .load(Ordering::SeqCst)
            .then(|| Dynamic::from("interrupted"))
    });
    // Deeply nested expressions are legitimate in generated configs; the defaults are for
    // untrusted input, which scripts here are not.
    engine.set_max_expr_depths(256, 256);
    session.limits.apply(&mut engine);
    engine
}

/// The session an engine was built with (see [`engine`]).
pub fn session_of(ctx: &rhai::NativeCallContext) -> RhaiResult<Session> {
    ctx.tag()
        .and_then(|t| t.clone().try_cast::<Session>())
        .ok_or_else(|| {
            convert::runtime_error(
                "this engine was not built by matvlm::script::engine (no session)".into(),
            )
        })
}

/// Put script arguments into `scope`: each as a variable, and all of them in the constant map
/// `ARGS` (so that a script can write `let steps = ARGS.steps ?? 100;` for a default).
pub fn push_args(scope: &mut Scope, args: &[(String, Dynamic)]) {
    let mut map = Map::new();
    for (name, value) in args {
        scope.push_dynamic(name.as_str(), value.clone());
        map.insert(name.as_str().into(), value.clone());
    }
    scope.push_constant("ARGS", map);
}

/// Compile `path` (its name recorded as the AST's source) and run it in `scope`; returns the
/// value of the last statement. Reading the file fails with a runtime error naming it.
pub fn run_file(
    engine: &Engine,
    scope: &mut Scope,
    path: &Path,
) -> std::result::Result<Dynamic, Box<EvalAltResult>> {
    let source = std::fs::read_to_string(path)
        .map_err(|e| convert::runtime_error(format!("cannot read {}: {e}", path.display())))?;
    let mut ast: AST = engine.compile_with_scope(scope, &source)?;
    ast.set_source(path.display().to_string());
    engine.eval_ast_with_scope(scope, &ast)
}

/// Parse `--name value` pairs into typed script variables. `--name=value` works too; a flag
/// followed by another flag (or nothing) is `true`. Dashes in names become underscores
/// (`--max-steps` is `max_steps`). Values are parsed as int, then float, then bool, else kept as
/// a string.
pub fn parse_script_args(args: &[String]) -> Result<Vec<(String, Dynamic)>> {
    let mut out: Vec<(String, Dynamic)> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let Some(flag) = arg.strip_prefix("--") else {
            return Err(Error::Invalid(format!(
                "script argument `{arg}`: expected --name value"
            )));
        };
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => {
                let next = args.get(i + 1).filter(|v| !is_flag(v));
                if next.is_some() {
                    i += 1;
                }
                (flag, next.cloned())
            }
        };
        let name = name.replace('-', "_");
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_alphanumeric() || c == '_');
        if !valid {
            return Err(Error::Invalid(format!(
                "script argument `{arg}`: `{name}` is not a valid variable name"
            )));
        }
        if out.iter().any(|(n, _)| *n == name) {
            return Err(Error::Invalid(format!(
                "script argument `--{name}` is given twice"
            )));
        }
        let value = value.map_or(Dynamic::TRUE, |v| parse_value(&v));
        out.push((name, value));
        i += 1;
    }
    Ok(out)
}

/// `--x`, but not a negative number such as `-1` or `--` alone.
fn is_flag(s: &str) -> bool {
    s.len() > 2 && s.starts_with("--")
}

/// int, float, bool or string, in that order.
pub fn parse_value(s: &str) -> Dynamic {
    if let Ok(i) = s.parse::<rhai::INT>() {
        Dynamic::from_int(i)
    } else if let Ok(f) = s.parse::<rhai::FLOAT>() {
        Dynamic::from_float(f)
    } else if let Ok(b) = s.parse::<bool>() {
        Dynamic::from_bool(b)
    } else {
        Dynamic::from(s.to_string())
    }
}

pub use crate::device::{dtype_name, parse_device, parse_dtype};

/// How the REPL and `matrepl -e` show a value: the API's own types by their `to_string` (also
/// inside arrays and maps), strings quoted, everything else as rhai prints it.
pub fn display_value(v: &Dynamic) -> String {
    if let Some(arr) = v.read_lock::<rhai::Array>() {
        let items: Vec<String> = arr.iter().map(display_value).collect();
        return format!("[{}]", items.join(", "));
    }
    if let Some(map) = v.read_lock::<Map>() {
        let items: Vec<String> = map
            .iter()
            .map(|(k, v)| format!("{:?}: {}", k.as_str(), display_value(v)))
            .collect();
        return format!("#{{{}}}", items.join(", "));
    }
    if let Some(t) = v.read_lock::<tensor::Tensor>() {
        return tensor::describe(&t);
    }
    if let Some(m) = v.read_lock::<model::Model>() {
        return m.to_string();
    }
    if let Some(d) = v.read_lock::<data::Data>() {
        return d.to_string();
    }
    if let Some(r) = v.read_lock::<train::Run>() {
        return r.to_string();
    }
    if v.is_string() {
        return format!("{v:?}");
    }
    v.to_string()
}

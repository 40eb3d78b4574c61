//! Conversions between rhai values and library types, shared by the binding modules: errors,
//! option maps, paths, dimensions, and how values are shown in the REPL.

use std::path::PathBuf;

use rhai::{Dynamic, EvalAltResult, Map, Position, FLOAT, INT};

/// What a binding returns: the value, or a rhai error (rhai fills in the call's position).
pub type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

/// A runtime error with `msg`, positioned by rhai at the call that raised it.
pub fn runtime_error(msg: String) -> Box<EvalAltResult> {
    EvalAltResult::ErrorRuntime(msg.into(), Position::NONE).into()
}

/// A library error as a rhai error.
pub fn lib_error(err: crate::Error) -> Box<EvalAltResult> {
    match err {
        crate::Error::Candle(e) => candle_error(e),
        other => runtime_error(other.to_string()),
    }
}

/// A candle error as a rhai error.
pub fn candle_error(err: candle_core::Error) -> Box<EvalAltResult> {
    runtime_error(candle_message(&err))
}

/// A candle error's message without the backtrace candle attaches when `RUST_BACKTRACE` is
/// set: a script's user wants the line of the script, not of candle.
pub fn candle_message(err: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match err {
        E::WithBacktrace { inner, .. } => candle_message(inner),
        E::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        E::WithPath { inner, path } => format!("{}: {}", path.display(), candle_message(inner)),
        other => other.to_string(),
    }
}

/// `?` on library results inside bindings.
pub trait OrRhai<T> {
    fn or_rhai(self) -> RhaiResult<T>;
}

impl<T> OrRhai<T> for crate::Result<T> {
    fn or_rhai(self) -> RhaiResult<T> {
        self.map_err(lib_error)
    }
}

impl<T> OrRhai<T> for candle_core::Result<T> {
    fn or_rhai(self) -> RhaiResult<T> {
        self.map_err(candle_error)
    }
}

/// An options map (`#{ key: value, ... }`) read by key. Unknown keys are an error that lists the
/// known ones, so a typo (`max_token`) does not silently fall back to a default.
pub struct Opts<'a> {
    what: &'a str,
    map: Map,
}

impl<'a> Opts<'a> {
    /// `what` names the function in error messages; `known` lists every key it reads.
    pub fn new(what: &'a str, map: Map, known: &[&str]) -> RhaiResult<Self> {
        if let Some(bad) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(runtime_error(format!(
                "{what}: unknown option `{bad}` (known: {})",
                known.join(", ")
            )));
        }
        Ok(Self { what, map })
    }

    /// A map whose other keys someone else checks (see [`Opts::rest`]).
    pub fn open(what: &'a str, map: Map) -> Self {
        Self { what, map }
    }

    fn get(&self, key: &str) -> Option<&Dynamic> {
        self.map.get(key).filter(|v| !v.is_unit())
    }

    fn wrong(&self, key: &str, want: &str, v: &Dynamic) -> Box<EvalAltResult> {
        runtime_error(format!(
            "{}: option `{key}` must be {want}, not {}",
            self.what,
            v.type_name()
        ))
    }

    pub fn string(&self, key: &str) -> RhaiResult<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .clone()
                .into_string()
                .map(Some)
                .map_err(|_| self.wrong(key, "a string", v)),
        }
    }

    pub fn path(&self, key: &str) -> RhaiResult<Option<PathBuf>> {
        Ok(self.string(key)?.map(PathBuf::from))
    }

    pub fn int(&self, key: &str) -> RhaiResult<Option<INT>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_int()
                .map(Some)
                .map_err(|_| self.wrong(key, "an integer", v)),
        }
    }

    /// A non-negative integer as `usize`.
    pub fn count(&self, key: &str) -> RhaiResult<Option<usize>> {
        match self.int(key)? {
            None => Ok(None),
            Some(i) => usize::try_from(i).map(Some).map_err(|_| {
                runtime_error(format!(
                    "{}: option `{key}` must be >= 0, not {i}",
                    self.what
                ))
            }),
        }
    }

    /// A float; integers are accepted (`temperature: 1`).
    pub fn float(&self, key: &str) -> RhaiResult<Option<FLOAT>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match (v.as_float(), v.as_int()) {
                (Ok(f), _) => Ok(Some(f)),
                (_, Ok(i)) => Ok(Some(i as FLOAT)),
                _ => Err(self.wrong(key, "a number", v)),
            },
        }
    }

    pub fn bool(&self, key: &str) -> RhaiResult<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .map_err(|_| self.wrong(key, "true or false", v)),
        }
    }

    /// An array of non-negative integers.
    pub fn counts(&self, key: &str) -> RhaiResult<Option<Vec<usize>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                let arr = v
                    .clone()
                    .into_array()
                    .map_err(|_| self.wrong(key, "an array of integers", v))?;
                arr.iter()
                    .map(|x| {
                        x.as_int()
                            .ok()
                            .and_then(|i| usize::try_from(i).ok())
                            .ok_or_else(|| self.wrong(key, "an array of integers >= 0", v))
                    })
                    .collect::<RhaiResult<Vec<_>>>()
                    .map(Some)
            }
        }
    }

    /// The raw value of `key`, if given.
    pub fn value(&self, key: &str) -> Option<Dynamic> {
        self.get(key).cloned()
    }

    /// The map without `keys` (to hand the rest to serde).
    pub fn rest(&self, keys: &[&str]) -> Map {
        self.map
            .iter()
            .filter(|(k, _)| !keys.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// An integer as an index into `len` items; negative counts from the end (`-1` is the last).
pub fn index(i: INT, len: usize, what: &str) -> RhaiResult<usize> {
    let j = if i < 0 { i + len as INT } else { i };
    if j < 0 || j >= len as INT {
        return Err(runtime_error(format!(
            "{what} {i} is out of range for size {len}"
        )));
    }
    Ok(j as usize)
}

/// A non-negative integer as `usize` (`what` names it in the error).
pub fn to_usize(i: INT, what: &str) -> RhaiResult<usize> {
    usize::try_from(i).map_err(|_| runtime_error(format!("{what} must be >= 0, not {i}")))
}

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
    if let Some(t) = v.read_lock::<super::tensor::Tensor>() {
        return super::tensor::describe(&t);
    }
    if let Some(m) = v.read_lock::<super::model::Model>() {
        return m.to_string();
    }
    if let Some(d) = v.read_lock::<super::data::Data>() {
        return d.to_string();
    }
    if let Some(r) = v.read_lock::<super::train::Run>() {
        return r.to_string();
    }
    if v.is_string() {
        return format!("{v:?}");
    }
    v.to_string()
}

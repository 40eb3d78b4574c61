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

/// An options map as JSON, for [`crate::options::merged`] (a unit value counts as not given).
pub fn json_options(
    what: &str,
    map: Map,
) -> RhaiResult<serde_json::Map<String, serde_json::Value>> {
    let map: Map = map.into_iter().filter(|(_, v)| !v.is_unit()).collect();
    match rhai::serde::from_dynamic(&Dynamic::from_map(map)) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err(runtime_error(format!("{what}: options must be a map"))),
        Err(e) => Err(runtime_error(format!("{what}: {}", bare_message(&e)))),
    }
}

/// An options map read into one of the library's `Deserialize` option types: keys are its field
/// names, an unknown key or a wrong type is an error naming `what` and the key.
pub fn from_map<T: serde::de::DeserializeOwned>(what: &str, map: Map) -> RhaiResult<T> {
    let map: Map = map.into_iter().filter(|(_, v)| !v.is_unit()).collect();
    rhai::serde::from_dynamic::<T>(&Dynamic::from_map(map.clone())).map_err(|e| {
        let message = bare_message(&e);
        match culprit::<T>(&map) {
            Some(key) if !message.contains(&format!("`{key}`")) => {
                runtime_error(format!("{what}: option `{key}`: {message}"))
            }
            _ => runtime_error(format!("{what}: {message}")),
        }
    })
}

/// The key whose removal makes `map` deserialise, if there is one: rhai's serde errors say a
/// type was wrong but not where.
fn culprit<T: serde::de::DeserializeOwned>(map: &Map) -> Option<String> {
    map.keys()
        .find(|key| {
            let mut rest = map.clone();
            rest.remove(key.as_str());
            rhai::serde::from_dynamic::<T>(&Dynamic::from_map(rest)).is_ok()
        })
        .map(|k| k.to_string())
}

/// A rhai error's message without rhai's position suffix (the caller's position is added when
/// the binding's error surfaces).
fn bare_message(e: &EvalAltResult) -> String {
    match e {
        EvalAltResult::ErrorRuntime(v, _) => v.to_string(),
        // serde's messages (unknown field, unknown variant) arrive as parse errors.
        EvalAltResult::ErrorParsing(p, _) => p.to_string(),
        EvalAltResult::ErrorMismatchOutputType(want, got, _) => {
            format!("an option is {got} where {want} is expected")
        }
        other => other.to_string(),
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

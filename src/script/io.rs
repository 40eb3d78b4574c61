//! Files and the terminal: named tensors as safetensors files, JSON files, lines from stdin,
//! numbers formatted for tables.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use std::io::{BufRead, IsTerminal};

use rhai::{Dynamic, Map, NativeCallContext, FLOAT, INT};

use super::convert::{runtime_error, Opts, OrRhai, RhaiResult};
use super::session_of;
use super::tensor::Tensor;

/// The tensors of a `#{ name: tensor }` map; anything else in it is an error naming the key.
fn tensors_of(map: &Map) -> RhaiResult<BTreeMap<String, Tensor>> {
    map.iter()
        .map(|(k, v)| match v.read_lock::<Tensor>() {
            Some(t) => Ok((k.to_string(), t.clone())),
            None => Err(runtime_error(format!(
                "save_safetensors: `{k}` is a {}, not a Tensor",
                v.type_name()
            ))),
        })
        .collect()
}

#[rhai::export_module]
pub mod api {
    use super::*;

    /// Write `#{ name: tensor, ... }` as safetensors. A path ending in `.safetensors` is that
    /// one file; any other path is a folder that receives `model.safetensors` (written
    /// atomically, as checkpoints are).
    #[rhai_fn(return_raw)]
    pub fn save_safetensors(path: &str, tensors: Map) -> RhaiResult<()> {
        let tensors = tensors_of(&tensors)?;
        let p = Path::new(path);
        if p.extension().is_some_and(|e| e == "safetensors") {
            let map: HashMap<String, Tensor> = tensors.into_iter().collect();
            candle_core::safetensors::save(&map, p).or_rhai()
        } else {
            crate::checkpoint::save_safetensors(p, &tensors, None)
                .map(|_| ())
                .or_rhai()
        }
    }

    /// Read a safetensors file into a map `#{ name: tensor }`, on the session's device.
    #[rhai_fn(return_raw)]
    pub fn load_safetensors(ctx: NativeCallContext, path: &str) -> RhaiResult<Map> {
        let s = session_of(&ctx)?;
        let tensors = crate::checkpoint::load_safetensors(Path::new(path), &s.device).or_rhai()?;
        Ok(tensors
            .into_iter()
            .map(|(k, t)| (k.into(), Dynamic::from(t)))
            .collect())
    }

    /// `load_safetensors(path, #{ allow_non_finite: true })`: as `load_safetensors(path)`, but
    /// tensors holding NaN or Inf load (to inspect a diverged checkpoint) instead of failing.
    #[rhai_fn(name = "load_safetensors", return_raw)]
    pub fn load_safetensors_with(
        ctx: NativeCallContext,
        path: &str,
        options: Map,
    ) -> RhaiResult<Map> {
        let s = session_of(&ctx)?;
        let o = Opts::new("load_safetensors", options, &["allow_non_finite"])?;
        let allow = o.bool("allow_non_finite")?.unwrap_or(false);
        let tensors = crate::checkpoint::load_safetensors_with(Path::new(path), &s.device, allow)
            .or_rhai()?;
        Ok(tensors
            .into_iter()
            .map(|(k, t)| (k.into(), Dynamic::from(t)))
            .collect())
    }

    /// Write any value (maps, arrays, numbers, strings) as pretty JSON to `path`, atomically.
    #[rhai_fn(return_raw)]
    pub fn save_json(path: &str, value: Dynamic) -> RhaiResult<()> {
        let json: serde_json::Value = rhai::serde::from_dynamic(&value)
            .map_err(|e| runtime_error(format!("save_json: {e}")))?;
        let text = serde_json::to_string_pretty(&json)
            .map_err(|e| runtime_error(format!("save_json: {e}")))?;
        crate::io::write_atomic(Path::new(path), format!("{text}\n").as_bytes()).or_rhai()
    }

    /// The next line of standard input without its line ending, or () at the end of input.
    #[rhai_fn(return_raw)]
    pub fn read_line() -> RhaiResult<Dynamic> {
        let mut line = String::new();
        let n = std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| runtime_error(format!("read_line: reading stdin: {e}")))?;
        if n == 0 {
            return Ok(Dynamic::UNIT);
        }
        let trimmed = line.trim_end_matches(['\n', '\r']);
        Ok(Dynamic::from(trimmed.to_string()))
    }

    /// Print `text` without a line break and flush (a prompt before `read_line`, or a piece of
    /// a line being built).
    #[rhai_fn(name = "write")]
    pub fn write_text(text: &str) {
        use std::io::Write;
        print!("{text}");
        let _ = std::io::stdout().flush();
    }

    /// Whether standard input is a terminal (false when it is a pipe or a file).
    pub fn stdin_is_terminal() -> bool {
        std::io::stdin().is_terminal()
    }

    /// `x` with `digits` digits after the decimal point: `fixed(3.14159, 2)` is "3.14".
    #[rhai_fn(name = "fixed")]
    pub fn fixed(x: FLOAT, digits: INT) -> String {
        format!("{x:.*}", digits.clamp(0, 17) as usize)
    }

    /// An integer as a decimal string (`fixed(3, 2)` is "3.00").
    #[rhai_fn(name = "fixed")]
    pub fn fixed_int(x: INT, digits: INT) -> String {
        fixed(x as FLOAT, digits)
    }
}

//! Reading and writing named tensors as safetensors files.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use rhai::{Dynamic, Map, NativeCallContext};

use super::convert::{runtime_error, OrRhai, RhaiResult};
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
}

//! `serve(#{ models, port, ... })`: the web chat and OpenAI-compatible server from a script.

use std::sync::atomic::Ordering;

use rhai::{Dynamic, Map, NativeCallContext};

use super::convert::{from_map, runtime_error, OrRhai, RhaiResult};
use super::model::Model;
use super::session_of;
use crate::serve::{ServeOptions, ServedModel};

/// The models of `serve`'s `models` option: Models (served under their origin) or checkpoint
/// folders / hub ids, in an array; or a map `#{ name: model }` naming each.
fn served_models(ctx: &NativeCallContext, value: Dynamic) -> RhaiResult<Vec<ServedModel>> {
    let s = session_of(ctx)?;
    let one = |name: Option<String>, v: Dynamic| -> RhaiResult<ServedModel> {
        if let Some(m) = v.read_lock::<Model>() {
            return Ok(ServedModel::new(
                name.unwrap_or_else(|| m.source.clone()),
                m.vlm.clone(),
            ));
        }
        match v.clone().into_string() {
            Ok(spec) => crate::serve::load_models(std::slice::from_ref(&spec), &s.device, s.dtype)
                .map(|mut ms| {
                    let mut m = ms.remove(0);
                    if let Some(n) = name {
                        m.id = n;
                    }
                    m
                })
                .or_rhai(),
            Err(t) => Err(runtime_error(format!(
                "serve: option `models`: a {t} is neither a Model nor a checkpoint path"
            ))),
        }
    };
    if value.is_map() {
        let map = value.cast::<Map>();
        return map
            .into_iter()
            .map(|(k, v)| one(Some(k.to_string()), v))
            .collect();
    }
    match value.into_array() {
        Ok(arr) => arr.into_iter().map(|v| one(None, v)).collect(),
        Err(t) => Err(runtime_error(format!(
            "serve: option `models` must be an array or a map of models, not {t}"
        ))),
    }
}

#[rhai::export_module]
pub mod api {
    use super::*;

    /// `serve(#{ models: [teacher, hybrid], port: 8080, host: "127.0.0.1", api_key, cors,
    /// queue: 64, max_batch: 8, max_models_at_once: 2, max_body_bytes, max_image_bytes,
    /// max_images: 1, default_max_tokens: 128, image_dir })`: serve the web chat (`/`) and the
    /// OpenAI-compatible API (`/v1/chat/completions`, `/v1/models`, `/health`) until Ctrl-C.
    /// `models`: Models, checkpoint paths or hub ids (or a map naming each); left out, the
    /// embedded tiny teacher and its 0.25 hybrid. Binding another host than 127.0.0.1 needs an
    /// `api_key` (or $MATVLM_API_KEY).
    #[rhai_fn(return_raw)]
    pub fn serve(ctx: NativeCallContext, options: Map) -> RhaiResult<()> {
        let s = session_of(&ctx)?;
        let mut options = options;
        let models = match options.remove("models") {
            Some(v) if !v.is_unit() => served_models(&ctx, v)?,
            _ => crate::serve::default_models(&s.device, s.dtype).or_rhai()?,
        };
        let opts: ServeOptions = from_map("serve", options)?;
        s.cancel.store(false, Ordering::SeqCst);
        crate::serve::serve(models, opts, &s.cancel).or_rhai()
    }
}

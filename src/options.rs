//! Settings from flat maps of options, as scripts, notebooks and command lines give them. The
//! keys are the config's own field names, so no list of keys is written twice: a config struct
//! that derives `Serialize` and `Deserialize` is its own option schema.
//!
//! [`merged`] starts from a base config (a recipe), replaces the fields the map names and reads
//! the result back through serde, so unknown keys, wrong types and bad enum names are errors that
//! name the key. Three spellings keep maps short:
//! - the fields of a nested section (such as `train` of a training config) may be given at the
//!   top level;
//! - a string stands for a tagged variant without fields (`schedule: "constant"` is
//!   `schedule: #{ kind: "constant" }`);
//! - `false` switches an optional setting off (`clip: false`).

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::{Error, Result};

/// How a flat map maps onto a config: which nested sections it may reach into, and other names
/// for fields (`batch` for `batch_size`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Layout<'a> {
    pub sections: &'a [&'a str],
    pub aliases: &'a [(&'a str, &'a str)],
}

/// `base` with the fields `options` names replaced (see the module doc); `what` names the call in
/// errors.
pub fn merged<T: Serialize + DeserializeOwned>(
    what: &str,
    base: &T,
    options: Map<String, Value>,
    layout: Layout,
) -> Result<T> {
    let mut config = serde_json::to_value(base)
        .map_err(|e| Error::Other(format!("{what}: serialising the defaults: {e}")))?;
    let Value::Object(fields) = &mut config else {
        return Err(Error::Other(format!("{what}: the defaults are not a map")));
    };
    for (key, value) in options {
        let name = layout
            .aliases
            .iter()
            .find(|(alias, _)| *alias == key)
            .map_or(key.as_str(), |(_, field)| *field);
        let section = layout.sections.iter().find(|s| {
            fields
                .get(**s)
                .and_then(Value::as_object)
                .is_some_and(|sec| sec.contains_key(name))
        });
        let slot = if fields.contains_key(name) && !layout.sections.contains(&name) {
            fields.get_mut(name)
        } else if let Some(section) = section {
            fields
                .get_mut(*section)
                .and_then(Value::as_object_mut)
                .and_then(|sec| sec.get_mut(name))
        } else {
            None
        };
        let Some(slot) = slot else {
            let known = known_keys(&config, layout);
            return Err(Error::Invalid(format!(
                "{what}: unknown option `{key}` (known: {})",
                known.join(", ")
            )));
        };
        *slot = spelled_out(slot, value);
        // Read back after each key (the base reads back by construction), so that a wrong type
        // is reported with the key that brought it: serde's message names the type, not the key.
        if let Err(e) = serde_json::from_value::<T>(Value::Object(fields.clone())) {
            return Err(Error::Invalid(format!("{what}: option `{key}`: {e}")));
        }
    }
    serde_json::from_value(config).map_err(|e| Error::Invalid(format!("{what}: {e}")))
}

/// `value` in the form the field's current value `old` has (see the module doc).
fn spelled_out(old: &Value, value: Value) -> Value {
    match (old, value) {
        (Value::Object(o), Value::String(s)) if o.contains_key("kind") => {
            serde_json::json!({ "kind": s })
        }
        (Value::Null | Value::Number(_), Value::Bool(false)) => Value::Null,
        (_, v) => v,
    }
}

/// Every key a map may use with `layout`.
fn known_keys(config: &Value, layout: Layout) -> Vec<String> {
    let Value::Object(fields) = config else {
        return Vec::new();
    };
    let mut keys: Vec<String> = Vec::new();
    for (name, value) in fields {
        if layout.sections.contains(&name.as_str()) {
            if let Value::Object(section) = value {
                keys.extend(section.keys().cloned());
            }
        } else {
            keys.push(name.clone());
        }
    }
    keys.extend(layout.aliases.iter().map(|(a, _)| a.to_string()));
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        steps: usize,
        clip: Option<f64>,
        schedule: Sched,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "kind", rename_all = "snake_case")]
    enum Sched {
        Constant,
        Cosine { min: f64 },
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        train: Inner,
        batch_size: usize,
    }

    fn base() -> Outer {
        Outer {
            train: Inner {
                steps: 10,
                clip: Some(1.0),
                schedule: Sched::Cosine { min: 0.1 },
            },
            batch_size: 4,
        }
    }

    const LAYOUT: Layout = Layout {
        sections: &["train"],
        aliases: &[("batch", "batch_size")],
    };

    fn opts(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn flat_keys_reach_their_section_and_aliases_their_field() {
        let got = merged(
            "f",
            &base(),
            opts(
                serde_json::json!({"steps": 3, "batch": 2, "clip": false, "schedule": "constant"}),
            ),
            LAYOUT,
        )
        .unwrap();
        assert_eq!(got.train.steps, 3);
        assert_eq!(got.batch_size, 2);
        assert_eq!(got.train.clip, None);
        assert_eq!(got.train.schedule, Sched::Constant);
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_key() {
        let e = merged("f", &base(), opts(serde_json::json!({"stepz": 3})), LAYOUT).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("`stepz`") && msg.contains("batch_size, clip, schedule, steps, batch"),
            "{msg}"
        );
        let e = merged(
            "f",
            &base(),
            opts(serde_json::json!({"steps": "x"})),
            LAYOUT,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("f: option `steps`: invalid type"),
            "{e}"
        );
        let e = merged("f", &base(), opts(serde_json::json!({"train": 1})), LAYOUT).unwrap_err();
        assert!(
            e.to_string().contains("`train`"),
            "a section is not an option: {e}"
        );
    }
}

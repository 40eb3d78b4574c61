//! The registered functions' signatures and doc comments, read from the engine's metadata: what
//! `:help` prints and what completion offers.

use std::collections::BTreeSet;

use rhai::Engine;

/// One registered function (one overload).
#[derive(Debug, Clone, PartialEq)]
pub struct FnDoc {
    pub name: String,
    /// As a script calls it: `logits(m: Model, prompt: &str) -> Tensor`.
    pub signature: String,
    /// The doc comment, without the `///` markers; empty when there is none.
    pub doc: String,
    /// The type of the first parameter (`Model`, `Tensor`, ...), which a method call
    /// `x.name()` passes as `x`; `None` without parameters.
    pub receiver: Option<String>,
    /// How many parameters it takes, the receiver included.
    pub arity: usize,
    /// From rhai's standard library rather than matvlm's API.
    pub standard: bool,
}

/// Every function an engine knows, with its documentation.
#[derive(Debug, Clone, Default)]
pub struct Docs {
    pub functions: Vec<FnDoc>,
}

/// The metadata JSON, as far as we read it.
#[derive(serde::Deserialize)]
struct Metadata {
    #[serde(default)]
    functions: Vec<FnMeta>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct FnMeta {
    name: String,
    #[serde(default)]
    params: Vec<ParamMeta>,
    #[serde(default)]
    signature: String,
    #[serde(default)]
    doc_comments: Vec<String>,
}

#[derive(serde::Deserialize)]
struct ParamMeta {
    #[serde(rename = "type", default)]
    typ: Option<String>,
}

/// A name a script can type: not an operator, indexer or property accessor (`get$x`).
pub fn is_identifier(name: &str) -> bool {
    name.chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_alphanumeric() || c == '_')
}

/// `&mut Model` and `Model` are the same receiver.
fn bare_type(t: &str) -> String {
    t.trim_start_matches('&')
        .trim_start_matches("mut ")
        .trim()
        .to_string()
}

/// `/// text` lines (and `/** */` blocks) as plain text.
fn strip_comment_markers(comments: &[String]) -> String {
    comments
        .iter()
        .flat_map(|c| c.lines())
        .map(|l| {
            let l = l.trim();
            let l = l
                .strip_prefix("///")
                .or_else(|| l.strip_prefix("/**"))
                .unwrap_or(l);
            let l = l.strip_suffix("*/").unwrap_or(l);
            l.strip_prefix(' ').unwrap_or(l).trim_end().to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_string()
}

/// The signature as a script sees it: a receiver is passed by value as far as the script can
/// tell (`&mut Model` is `Model`), and a function that may fail returns its value
/// (`RhaiResult<T>` and `Result<T, Box<EvalAltResult>>` are `T`).
fn clean_signature(sig: &str) -> String {
    let sig = sig.replace("&mut ", "");
    for wrapper in ["RhaiResult<", "Result<"] {
        if let Some((head, tail)) = sig.split_once(&format!("-> {wrapper}")) {
            let inner = tail.strip_suffix('>').unwrap_or(tail);
            let inner = inner.strip_suffix(", Box<EvalAltResult>").unwrap_or(inner);
            return format!("{head}-> {inner}");
        }
    }
    sig
}

/// The first sentence of a doc comment, on one line, at most `max` characters.
fn first_sentence(doc: &str, max: usize) -> String {
    let para = doc
        .split("\n\n")
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let sentence = match para.find(". ") {
        Some(i) => &para[..=i],
        None => para.as_str(),
    };
    if sentence.chars().count() > max {
        sentence.chars().take(max - 3).collect::<String>() + "..."
    } else {
        sentence.to_string()
    }
}

impl Docs {
    /// Read the metadata of every function the engine has, standard library included.
    pub fn from_engine(engine: &Engine) -> Self {
        let ours = Self::parse(engine.gen_fn_metadata_to_json(false).ok().as_deref());
        let names: BTreeSet<String> = ours.iter().map(|f| f.signature.clone()).collect();
        let mut functions = ours;
        for mut f in Self::parse(engine.gen_fn_metadata_to_json(true).ok().as_deref()) {
            if !names.contains(&f.signature) {
                f.standard = true;
                functions.push(f);
            }
        }
        Self { functions }
    }

    fn parse(json: Option<&str>) -> Vec<FnDoc> {
        let Some(meta) = json.and_then(|j| serde_json::from_str::<Metadata>(j).ok()) else {
            return Vec::new();
        };
        meta.functions
            .into_iter()
            .filter(|f| !f.name.starts_with("anon$"))
            .map(|f| FnDoc {
                arity: f.params.len(),
                receiver: f
                    .params
                    .first()
                    .and_then(|p| p.typ.as_deref())
                    .map(bare_type),
                doc: strip_comment_markers(&f.doc_comments),
                signature: clean_signature(&f.signature),
                name: f.name,
                standard: false,
            })
            .collect()
    }

    /// Every overload of `name`.
    pub fn lookup(&self, name: &str) -> Vec<&FnDoc> {
        self.functions.iter().filter(|f| f.name == name).collect()
    }

    /// Names that can be typed as identifiers (no operators, no property getters).
    pub fn callable_names(&self) -> BTreeSet<String> {
        self.functions
            .iter()
            .map(|f| f.name.clone())
            .filter(|n| is_identifier(n))
            .collect()
    }

    /// The property `x` when `f` is its getter (`get$x`, read as `value.x`).
    pub fn property_name(f: &FnDoc) -> Option<&str> {
        f.name.strip_prefix("get$").filter(|p| is_identifier(p))
    }

    /// The help text for `name`: each overload's signature and doc.
    pub fn help(&self, name: &str) -> Option<String> {
        let found = self.lookup(name);
        if found.is_empty() {
            return None;
        }
        let mut out = String::new();
        for f in found {
            out.push_str(&f.signature);
            out.push('\n');
            for line in f.doc.lines() {
                out.push_str("    ");
                out.push_str(line);
                out.push('\n');
            }
        }
        Some(out.trim_end().to_string())
    }

    /// One line per function of matvlm's API: name and first doc line.
    pub fn overview(&self) -> String {
        let mut seen = BTreeSet::new();
        let mut lines = Vec::new();
        let mut ours: Vec<&FnDoc> = self
            .functions
            .iter()
            .filter(|f| !f.standard && is_identifier(&f.name))
            .collect();
        ours.sort_by(|a, b| a.name.cmp(&b.name));
        for f in ours {
            // Display hooks are not something to call by hand.
            if ["to_string", "to_debug"].contains(&f.name.as_str()) || !seen.insert(f.name.clone())
            {
                continue;
            }
            // Prefer a prose doc over one that opens with a call example.
            let overloads = self.lookup(&f.name);
            let first = overloads
                .iter()
                .find(|g| !g.doc.is_empty() && !g.doc.starts_with('`'))
                .or_else(|| overloads.iter().find(|g| !g.doc.is_empty()))
                .map(|g| first_sentence(&g.doc, 90))
                .unwrap_or_default();
            lines.push(format!("  {:<18} {first}", f.name));
        }
        lines.join("\n")
    }
}

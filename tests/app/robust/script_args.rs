//! Script arguments: every option of every binding that takes an options map, given values of
//! other types, gives an error naming the option (or runs, where the value happens to fit), and
//! never panics. The options are not listed here: each binding's own "unknown option" error
//! names them, so a binding that gains an option is covered without touching this file.

use std::panic::{catch_unwind, AssertUnwindSafe};

use matvlm::script::{self, Session};
use rhai::Dynamic;

use crate::common::eval_with_constants;
use crate::recipes::Fixture;

/// A binding: its name, the call with `OPTS` where the options map goes, and the options the
/// call needs to run at all (key, rhai expression).
type Call = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

const CALLS: &[Call] = &[
    ("load_model", "load_model(TEACHER, OPTS)", &[]),
    ("hybrid", "t.hybrid(OPTS)", &[("ratio", "0.25")]),
    (
        "generate",
        "t.generate(OPTS)",
        &[("prompt", "\"hi\""), ("max_new_tokens", "2")],
    ),
    ("logits", "t.logits(OPTS)", &[("prompt", "\"hi\"")]),
    (
        "hidden_states",
        "t.hidden_states(OPTS)",
        &[("prompt", "\"hi\"")],
    ),
    ("save", "t.save(DIR + \"/saved\", OPTS)", &[]),
    ("dataset", "dataset(TRAIN, OPTS)", &[("tokenizer", "t")]),
    (
        "distill",
        "distill(t, h, train, OPTS)",
        &[
            ("steps", "1"),
            ("batch", "2"),
            ("progress", "\"silent\""),
            ("run_dir", "DIR + \"/runs/\" + CASE"),
        ],
    ),
    (
        "train",
        "train(t, train, OPTS)",
        &[
            ("steps", "1"),
            ("batch", "2"),
            ("progress", "\"silent\""),
            ("run_dir", "DIR + \"/runs/\" + CASE"),
        ],
    ),
    ("evaluate", "evaluate(t, test, OPTS)", &[("limit", "2")]),
    (
        "agreement",
        "agreement(t, h, test, OPTS)",
        &[("limit", "2")],
    ),
];

/// Values of several types; each option is given every one of them (not `()`, which means "not
/// given").
const VALUES: &[&str] = &["\"x\"", "[1, \"a\"]", "#{ k: 1 }", "-2.5", "true"];

/// Options holding paths: a string there would write into the working directory.
fn path_like(key: &str) -> bool {
    ["dir", "out", "path", "file", "image", "save"]
        .iter()
        .any(|p| key.contains(p))
}

/// The option names an "unknown option" error lists: `known: a, b` (our reader) or serde's
/// `expected one of `a`, `b``.
fn known_options(message: &str) -> Vec<String> {
    if let Some(rest) = message.split("known: ").nth(1) {
        let list = rest.split(')').next().unwrap_or("");
        return list.split(", ").map(|s| s.trim().to_string()).collect();
    }
    if let Some(rest) = message.split("expected one of ").nth(1) {
        return rest
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect();
    }
    Vec::new()
}

#[test]
fn wrong_option_types_are_errors_naming_the_option() {
    let fx = Fixture::new();
    let session = Session::default();
    let engine = script::engine(&session);
    let w = fx.world();
    let constants = |case: &str| {
        vec![
            ("TEACHER", fx.teacher_dir().display().to_string()),
            ("TRAIN", w.join("train.json").display().to_string()),
            ("TEST", w.join("test.json").display().to_string()),
            ("DIR", fx.dir.path().display().to_string()),
            ("CASE", case.to_string()),
        ]
    };
    let prelude = "let t = load_model(TEACHER);\n\
        let h = t.hybrid(#{ ratio: 0.25 });\n\
        let train = dataset(TRAIN, #{ tokenizer: t });\n\
        let test = dataset(TEST, #{ tokenizer: t });\n";
    let map = |base: &[(&str, &str)], key: &str, value: &str| {
        let mut items: Vec<String> = base
            .iter()
            .filter(|(k, _)| *k != key)
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        items.push(format!("{key}: {value}"));
        format!("#{{ {} }}", items.join(", "))
    };
    let mut cases = 0;
    let mut errors = 0;
    for (name, call, base) in CALLS {
        let probe = call.replace("OPTS", &map(base, "zzz_not_an_option", "1"));
        let err = eval_with_constants(&engine, &constants("probe"), &format!("{prelude}{probe}"))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        let keys = known_options(&err);
        assert!(!keys.is_empty(), "{name}: no option list in {err}");
        for key in &keys {
            for value in VALUES {
                if path_like(key) && value.starts_with('"') {
                    continue;
                }
                cases += 1;
                let case = format!("{name}-{key}-{cases}");
                let code = format!("{prelude}{}", call.replace("OPTS", &map(base, key, value)));
                let out = catch_unwind(AssertUnwindSafe(|| {
                    eval_with_constants(&engine, &constants(&case), &code).map(|_: Dynamic| ())
                }));
                match out {
                    Err(_) => panic!("{name}: option `{key}` = {value} panicked"),
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        errors += 1;
                        let msg = e.to_string();
                        assert!(
                            msg.contains(key.as_str()),
                            "{name}: option `{key}` = {value}: the error does not name it: {msg}"
                        );
                    }
                }
            }
        }
    }
    eprintln!("{cases} option cases, {errors} errors");
    assert!(errors > cases / 2, "{errors} errors of {cases} cases");
}

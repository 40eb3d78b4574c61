//! How script errors are reported: exit status, file, line, column, message.

use super::*;

fn run_bad(dir: &Path, name: &str, code: &str) -> (Option<i32>, String, PathBuf) {
    let path = dir.join(name);
    std::fs::write(&path, code).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_matrepl"))
        .arg(&path)
        .current_dir(dir)
        .output()
        .unwrap();
    (out.status.code(), text(&out.stderr), path)
}

#[test]
fn script_errors_exit_non_zero_with_file_line_col_and_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let (code, err, path) = run_bad(
        d,
        "wrong_type.rhai",
        "let a = 1;\nlet b = evaluate(a, \"x\");\n",
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.starts_with(&format!("{}:2:9: ", path.display())),
        "{err}"
    );
    assert!(err.contains("Function not found: evaluate (i64, "), "{err}");
    assert!(err.contains("line 2: let b = evaluate"), "{err}");

    let (code, err, path) = run_bad(d, "unknown_fn.rhai", "\n\n  frobnicate(3);\n");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.starts_with(&format!("{}:3:3: ", path.display())),
        "{err}"
    );
    assert!(err.contains("frobnicate"), "{err}");

    let (code, err, path) = run_bad(d, "parse.rhai", "let x = (1 + ;\n");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.starts_with(&format!("{}:1:", path.display())), "{err}");

    // An error raised inside an imported module points into the module file.
    std::fs::create_dir_all(d.join("lib")).unwrap();
    std::fs::write(
        d.join("lib/helper.rhai"),
        "fn check(x) {\n    if x > 1 {\n        throw `too big: ${x}`;\n    }\n    x\n}\n",
    )
    .unwrap();
    let (code, err, path) = run_bad(
        d,
        "uses_module.rhai",
        "import \"lib/helper\" as h;\nh::check(1);\nh::check(5);\n",
    );
    assert_eq!(code, Some(1), "{err}");
    let module = d.join("lib/helper.rhai");
    assert!(
        err.starts_with(&format!("{}:3:9: ", module.display())),
        "{err}"
    );
    assert!(err.contains("too big: 5"), "{err}");
    assert!(
        err.contains(&format!("called at {}:3:", path.display())),
        "{err}"
    );

    // A file that is not there.
    let missing = d.join("no_such.rhai");
    let out = Command::new(env!("CARGO_BIN_EXE_matrepl"))
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains(&missing.display().to_string()), "{err}");

    // A library error names what was wrong, at the line of the call.
    let (code, err, path) = run_bad(
        d,
        "lib_error.rhai",
        "let m = load_model(\"/no/such/model\");\n",
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.starts_with(&format!("{}:1:9: ", path.display())),
        "{err}"
    );
    assert!(err.contains("/no/such/model"), "{err}");
}

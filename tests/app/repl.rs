//! The REPL's logic without a terminal (continuation, completion, commands, error display,
//! Ctrl-C), and the `matrepl` binary end to end with `-e` and with a script file.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::{fixture, matrepl_command};
use matvlm::repl::{format_error, is_incomplete, Outcome, Repl};
use matvlm::script::Session;
use rhai::Engine;

fn repl() -> Repl {
    Repl::new(Session::default())
}

fn output(o: Outcome) -> String {
    match o {
        Outcome::Output(s) => s,
        other => panic!("expected output, got {other:?}"),
    }
}

fn error(o: Outcome) -> String {
    match o {
        Outcome::Error(s) => s,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn teacher_path() -> String {
    fixture("teacher").display().to_string()
}

#[test]
fn unfinished_entries_continue_and_finished_ones_do_not() {
    let e = Engine::new_raw();
    for open in [
        "fn double(x) {",
        "if x > 1 {\n    print(x);",
        "let a = [1, 2,",
        "let m = #{ a: 1,",
        "foo(1, 2",
        "let x = 1 +",
        "let s = `multi\nline",
        "for i in 0..3 {\n  // a comment\n",
    ] {
        assert!(is_incomplete(&e, open), "should continue: {open:?}");
    }
    for done in [
        "let x = 1;",
        "fn double(x) { x * 2 }",
        "if x > 1 {\n    print(x);\n}",
        "let x = ;\nlet y = 2;",
        "}",
        "let s = \"abc",
        ":help",
        "1 + 2",
    ] {
        assert!(!is_incomplete(&e, done), "should not continue: {done:?}");
    }
}

#[test]
fn multi_line_functions_persist_across_entries() {
    let mut r = repl();
    assert_eq!(r.handle("fn double(x) {\n    x * 2\n}"), Outcome::Nothing);
    assert_eq!(r.handle("let n = 20;"), Outcome::Nothing);
    assert_eq!(output(r.handle("double(n + 1)")), "42");
    // Redefining replaces the earlier definition.
    r.handle("fn double(x) { x * 3 }");
    assert_eq!(output(r.handle("double(2)")), "6");
    assert_eq!(output(r.handle("\"text\"")), "\"text\"");
    // The API's types show as themselves, also inside arrays and maps.
    assert_eq!(
        output(r.handle("[tensor([1.5]), #{ a: \"s\", b: [2] }]")),
        "[Tensor[1] f32 [1.5], #{\"a\": \"s\", \"b\": [2]}]"
    );
}

#[test]
fn errors_show_the_line_and_a_caret_under_the_culprit() {
    let mut r = repl();
    let entry = "let a = 1;\nlet b = a + missing_var;";
    let msg = error(r.handle(entry));
    let lines: Vec<&str> = msg.lines().collect();
    assert_eq!(lines[0], "line 2: let b = a + missing_var;", "{msg}");
    let caret = lines[1].find('^').expect("a caret");
    assert_eq!(caret, lines[0].find("missing_var").unwrap(), "{msg}");
    assert!(lines[1].contains("missing_var"), "{msg}");

    // A library error inside a call points at the call.
    let msg = error(r.handle("let x = 1;\n  load_model(\"/no/such/dir\")"));
    assert!(msg.starts_with("line 2:   load_model"), "{msg}");
    assert!(msg.contains("/no/such/dir"), "{msg}");
    let lines: Vec<&str> = msg.lines().collect();
    assert_eq!(lines[1].find('^'), lines[0].find("load_model"), "{msg}");

    // Syntax errors too.
    let msg = error(r.handle("let = 3;"));
    assert!(msg.starts_with("line 1: let = 3;"), "{msg}");
    // Nothing was lost: the scope still works.
    assert_eq!(output(r.handle("a")), "1");
}

#[test]
fn format_error_without_a_position_is_the_message() {
    let err: rhai::EvalAltResult = "plain failure".into();
    assert_eq!(format_error("x", &err), "Runtime error: plain failure");
}

#[test]
fn completion_offers_functions_methods_variables_and_commands() {
    let mut r = repl();
    let c = r.completer();
    let (start, cands) = c.complete("let m = load_mo", 15);
    assert_eq!(start, 8);
    assert_eq!(cands, ["load_model"]);
    assert_eq!(c.complete(":he", 3), (1, vec!["help".to_string()]));
    assert!(c
        .complete(":help gen", 9)
        .1
        .contains(&"generate".to_string()));

    r.handle(&format!("let m = load_model({:?});", teacher_path()));
    r.handle("let t = tensor([1.0, 2.0]);");
    r.handle("let my_count = 3;");
    let mut c = r.completer();
    // Methods of the variable's own type, completed as calls: `()` when no overload takes more
    // than the receiver, an open `(` when one does.
    // (`m.la` would also offer `layer_sensitivity(`: a function whose first argument is a model
    // is a method of models too.)
    assert_eq!(c.complete("m.layers", 8), (2, vec!["layers()".to_string()]));
    assert!(c
        .complete("m.la", 4)
        .1
        .contains(&"layer_sensitivity(".to_string()));
    let (_, model_methods) = c.complete("m.", 2);
    assert!(model_methods.contains(&"generate(".to_string()));
    assert!(
        !model_methods.iter().any(|m| m.starts_with("softmax")),
        "{model_methods:?}"
    );
    let (_, tensor_methods) = c.complete("t.so", 4);
    assert_eq!(tensor_methods, ["softmax("]);
    // Already followed by its parenthesis: the name alone.
    assert_eq!(c.complete("m.layers()", 8), (2, vec!["layers".to_string()]));
    // The completed entry runs (a bare `m.layers` is an unknown property).
    let completed = format!("m.{}.len()", c.complete("m.layers", 8).1[0]);
    assert_eq!(output(r.handle(&completed)), "4");
    assert!(error(r.handle("m.layers")).contains("layers"));
    // Properties (getters) complete without parentheses.
    c.set_variables(vec![("run".into(), "Run".into())]);
    let (_, run_members) = c.complete("run.", 4);
    for property in ["model", "steps", "stopped", "checkpoint"] {
        assert!(
            run_members.contains(&property.to_string()),
            "{run_members:?}"
        );
    }
    assert!(
        !run_members.iter().any(|m| m.starts_with("model(")),
        "{run_members:?}"
    );
    assert_eq!(c.complete("run.sto", 7).1, ["stop", "stopped"]);
    let c = r.completer();
    // Variables in scope, beside functions and keywords.
    assert_eq!(c.complete("1 + my_c", 8), (4, vec!["my_count".to_string()]));
    let (_, cands) = c.complete("wh", 2);
    assert!(cands.contains(&"while".to_string()));
}

#[test]
fn help_shows_the_registered_docs() {
    let mut r = repl();
    let all = output(r.handle(":help"));
    for name in [
        "load_model",
        "teacher",
        "generate",
        "logits",
        "dataset",
        "save_safetensors",
    ] {
        assert!(all.contains(name), "{name} missing from :help\n{all}");
    }
    assert!(all.contains(":time"), "{all}");
    let logits = output(r.handle(":help logits"));
    assert!(
        logits.contains("logits(") && logits.contains("Tensor"),
        "{logits}"
    );
    assert!(
        logits.contains("phi chat template"),
        "the doc comment is shown: {logits}"
    );
    let none = output(r.handle(":help no_such_function"));
    assert!(none.contains("no_such_function"), "{none}");
}

#[test]
fn vars_time_load_quit_and_unknown_commands() {
    let mut r = repl();
    r.handle("let x = 41;");
    r.handle("let t = tensor([[1.0, 2.0]]);");
    let vars = output(r.handle(":vars"));
    assert!(vars.contains("x: i64 = 41"), "{vars}");
    assert!(vars.contains("t: Tensor = Tensor[1, 2] f32"), "{vars}");

    let timed = output(r.handle(":time x + 1"));
    let lines: Vec<&str> = timed.lines().collect();
    assert_eq!(lines[0], "42");
    assert!(
        lines[1].starts_with("time: ") && lines[1].ends_with(" s"),
        "{timed}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lib.rhai");
    std::fs::write(&file, "fn triple(v) { v * 3 }\nlet loaded = triple(x);\n").unwrap();
    r.handle(&format!(":load {}", file.display()));
    assert_eq!(output(r.handle("loaded")), "123");
    assert_eq!(output(r.handle("triple(2)")), "6");
    std::fs::write(&file, "let ok = 1;\nlet bad = nope;\n").unwrap();
    let msg = error(r.handle(&format!(":load {}", file.display())));
    assert!(msg.contains("line 2: let bad = nope;"), "{msg}");

    assert!(error(r.handle(":frobnicate")).contains(":help"));
    assert_eq!(r.handle(":quit"), Outcome::Quit);
    assert_eq!(r.handle("   "), Outcome::Nothing);
}

/// Ctrl-C during an entry stops it at its next operation or generated token and keeps the
/// session. The flag is set from another thread, as the Ctrl-C handler sets it, once the entry has
/// demonstrably started (it calls `started()`); and before an entry starts. Either way the entry
/// ends "interrupted": entering does not clear the flag, so no cancellation is lost. The REPL runs
/// in a thread of its own (an engine is not `Send`), so a lost cancellation fails the test after a
/// bounded wait instead of hanging it.
#[test]
fn ctrl_c_stops_a_long_call_and_keeps_the_session() {
    use std::sync::mpsc::{channel, RecvTimeoutError};
    const WAIT: Duration = Duration::from_secs(120);
    let (flag_tx, flag_rx) = channel();
    let (started_tx, started_rx) = channel::<()>();
    let (done_tx, done_rx) = channel::<()>();
    let worker = std::thread::spawn(move || {
        let mut r = repl();
        flag_tx.send(r.session.cancel.clone()).unwrap();
        r.engine.register_fn("started", move || {
            let _ = started_tx.send(());
        });
        r.handle(&format!("let m = load_model({:?});", teacher_path()));
        r.handle("let answers = [];");
        // Without the flag these loops never end.
        let endless = "loop {\n  started();\n  answers.push(m.generate(#{ prompt: \"hi\", max_new_tokens: 40, stop_at_eos: false }));\n}";
        let msg = error(r.handle(endless));
        assert!(msg.contains("interrupted"), "{msg}");
        // The model and what was computed so far are still there, and the next entry runs.
        let _answers_kept: i64 = output(r.handle("answers.len()")).parse().unwrap();
        assert_eq!(output(r.handle("m.layers().len()")), "4");
        assert!(!r.session.cancel.load(Ordering::SeqCst));

        // Set before the entry starts: it stops that entry, and only that one.
        r.session.cancel.store(true, Ordering::SeqCst);
        let msg = error(r.handle(endless));
        assert!(msg.contains("interrupted"), "{msg}");
        assert!(!r.session.cancel.load(Ordering::SeqCst));
        assert_eq!(output(r.handle("m.layers().len()")), "4");
        done_tx.send(()).unwrap();
    });
    let flag = flag_rx
        .recv_timeout(WAIT)
        .expect("the REPL thread did not start");
    started_rx
        .recv_timeout(WAIT)
        .expect("the endless entry did not start");
    flag.store(true, Ordering::SeqCst);
    match done_rx.recv_timeout(WAIT) {
        Ok(()) => worker.join().unwrap(),
        Err(RecvTimeoutError::Timeout) => {
            panic!("the entries were not interrupted within {WAIT:?} of the cancel flag")
        }
        Err(RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(worker.join().unwrap_err())
        }
    }
}

#[test]
fn binary_evaluates_an_expression() {
    let out = matrepl_command()
        .args(["-e", "let t = tensor([1.0, 2.0]); (t * 3).to_array()"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[3.0, 6.0]");

    let code = format!("load_model({:?}).layers().len()", teacher_path());
    let out = matrepl_command()
        .args(["--dtype", "bf16", "-e", &code])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "4");
}

/// `--gpus N`: NCCL ranks on cuda:0..N-1, so another `--device` is refused, and a build
/// without the `nccl` feature says which feature it needs (exit status 2, bad arguments).
#[test]
fn gpus_flag_needs_cuda_0_and_an_nccl_build() {
    let out = matrepl_command()
        .args(["--gpus", "2", "--device", "cuda:1", "-e", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cuda:0"),
        "{out:?}"
    );
    let out = matrepl_command()
        .args(["--gpus", "2", "-e", "1"])
        .output()
        .unwrap();
    if cfg!(feature = "nccl") {
        return;
    }
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--features nccl"),
        "{out:?}"
    );
}

#[test]
fn binary_runs_a_script_with_arguments_and_reports_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ok = dir.path().join("ok.rhai");
    std::fs::write(
        &ok,
        "print(steps * 2);\nprint(name);\nprint(ARGS.lr ?? 0.5);\n",
    )
    .unwrap();
    let out = matrepl_command()
        .arg(&ok)
        .args(["--steps", "21", "--name", "hi"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\nhi\n0.5\n");

    let bad = dir.path().join("bad.rhai");
    std::fs::write(
        &bad,
        "let a = 1;\nlet b = load_model(\"/no/such/model\");\n",
    )
    .unwrap();
    let out = matrepl_command().arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2: let b = load_model"), "{err}");
    assert!(err.contains("/no/such/model"), "{err}");

    let out = matrepl_command()
        .args(["--dtype", "f8", "-e", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("f8"));
    if !cfg!(feature = "cuda") {
        let out = matrepl_command()
            .args(["--device", "cuda", "-e", "1"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("cuda"));
    }
}

#[test]
fn binary_runs_the_shipped_inspect_script() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/inspect.rhai");
    let image = fixture("teacher").join("test_image.png");
    let out = matrepl_command()
        .arg(&script)
        .args(["--model", &teacher_path(), "--image"])
        .arg(&image)
        .args(["--max-new-tokens", "4"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("logits: [56, 448]"), "{stdout}");
    assert!(stdout.contains("answer: "), "{stdout}");
}

//! The `matrepl` REPL on a real pseudo-terminal, as a user meets it: rustyline reads keys in raw
//! mode, Tab completes (a method with its parentheses), an unfinished entry continues on the next line, errors show a caret, and
//! Ctrl-C during a training call stops it at a step boundary with the session going on.

use crate::common::{fixture, matrepl_command};
use rexpect::session::{spawn_command, PtySession};

const PROMPT: &str = "matvlm> ";

/// How long any one expected text may take to appear. Every step waits for an event (a text on
/// the terminal), never for a fixed time, and returns as soon as it comes; the bound only turns a
/// lost event into a failure. Each event takes well under a second on an idle machine; five
/// minutes leaves room for a 2-core machine busy with several builds.
const WAIT_MS: u64 = 300_000;

fn start(history: &std::path::Path) -> PtySession {
    let mut cmd = matrepl_command();
    cmd.arg("--history").arg(history).arg("--threads").arg("1");
    let mut p = spawn_command(cmd, Some(WAIT_MS)).expect("spawn matrepl on a pty");
    p.exp_string("Tab completes").unwrap();
    p.exp_string(PROMPT).unwrap();
    p
}

/// Send one line, wait for `expected` in what comes back (the answer, or a part of an error
/// message), then for the next prompt; a missing answer fails the test at the session's
/// timeout. The expected texts cannot match the echo of the typed line: rustyline redraws the
/// prompt and the line as keys arrive, so only an answer says the entry has run, and keys typed
/// before the next prompt may be dropped when the terminal mode switches back.
fn entry(p: &mut PtySession, line: &str, expected: &str) {
    p.send_line(line).unwrap();
    p.exp_string(expected)
        .unwrap_or_else(|e| panic!("{line:?} did not answer {expected:?}: {e}"));
    p.exp_string(PROMPT).unwrap();
}

#[test]
fn completion_multi_line_caret_and_ctrl_c_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = start(&dir.path().join("history"));

    // Tab completes the unique function name: typed `load_mo`, the line runs as `load_model`.
    let teacher = fixture("teacher").display().to_string();
    p.send("let m = load_mo").unwrap();
    p.send("\t").unwrap();
    p.flush().unwrap();
    p.exp_string("load_model").unwrap();
    entry(
        &mut p,
        &format!("({teacher:?}); m.layers().len() * 1001"),
        "4004",
    );
    // A method completes as a call: typed `m.layers`, the line runs as `m.layers()`.
    p.send("m.layers").unwrap();
    p.send("\t").unwrap();
    p.flush().unwrap();
    p.exp_string("layers()").unwrap();
    entry(&mut p, ".len() * 1001 + 2", "4006");

    // A function definition over three lines: the open brace keeps the entry going.
    p.send_line("fn twice(x) {").unwrap();
    p.send_line("  x * 2").unwrap();
    entry(&mut p, "} 1000 + twice(21)", "1042");

    // An error names the line and puts a caret under the culprit.
    p.send_line("let b = 1 + missing_var;").unwrap();
    p.exp_string("line 1: let b = 1 + missing_var;").unwrap();
    p.exp_string("^").unwrap();
    p.exp_string("missing_var").unwrap();
    p.exp_string(PROMPT).unwrap();

    // Ctrl-C during a (practically endless) training call: it stops at a step boundary, returns
    // its Run, and the session keeps its variables and functions.
    let world = dir.path().join("world").display().to_string();
    let run_dir = dir.path().join("run").display().to_string();
    entry(
        &mut p,
        &format!(
            "let d = dataset(\"synthetic\", #{{ dir: {world:?}, train: 32, val: 4, test: 4, tokenizer: m }}); d.len() + 5000"
        ),
        "5032",
    );
    p.send_line(&format!(
        "let run = train(m, d, #{{ steps: 1000000, batch: 2, progress: \"lines\", log_every: 1, save_every: 0, run_dir: {run_dir:?} }});"
    ))
    .unwrap();
    p.exp_string("step 3/1000000").unwrap();
    p.send_control('c').unwrap();
    p.exp_string(PROMPT).unwrap();
    entry(
        &mut p,
        "if run.stopped && run.steps >= 3 && run.steps < 1000000 { 7000 + twice(3) } else { 0 }",
        "7006",
    );

    // Ctrl-C at the prompt clears the line and leaves the session alive.
    p.send("let half_typed = ").unwrap();
    p.send_control('c').unwrap();
    p.exp_string("Ctrl-C clears the line").unwrap();
    p.exp_string(PROMPT).unwrap();
    entry(&mut p, "m.layers().len() * 1001 + 1", "4005");

    p.send_line(":quit").unwrap();
    p.exp_eof().unwrap();
}

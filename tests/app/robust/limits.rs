//! rhai's limits (operations, call depth, string, array and map sizes) set from the session, with
//! defaults a real script does not reach; runaway scripts stopped by the cancel flag, in the
//! engine and in the `matrepl` binary.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::mpsc::channel;
use std::time::Duration;

use matvlm::script::{self, ScriptLimits, Session};
use rhai::{Dynamic, EvalAltResult};

use crate::common::matrepl_command;

/// Evaluate `code` on a session with `limits`, in a thread with a large stack (rhai recursion
/// in a test build takes more stack than the 2 MiB of a test thread).
fn eval(limits: ScriptLimits, code: &'static str) -> Result<String, String> {
    std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(move || {
            let session = Session::default().with_limits(limits);
            // Keep the result Send: the error as its debug form, the value as a string.
            match script::engine(&session).eval::<Dynamic>(code) {
                Ok(v) => Ok(v.to_string()),
                Err(e) => Err(format!("{e:?}")),
            }
        })
        .unwrap()
        .join()
        .unwrap()
}

#[test]
fn each_limit_stops_a_runaway_and_names_itself() {
    let small = ScriptLimits {
        max_operations: 10_000,
        max_call_depth: 12,
        max_string_size: 1 << 16,
        max_array_size: 1000,
        max_map_size: 100,
    };
    for (code, expect) in [
        ("loop {}", "ErrorTooManyOperations"),
        ("fn f(n) { f(n + 1) } f(0)", "ErrorStackOverflow"),
        (
            "let s = \"ab\"; for i in 0..100 { s += s; } s.len()",
            "ErrorDataTooLarge",
        ),
        (
            "let a = []; for i in 0..5000 { a.push(i); } a.len()",
            "ErrorDataTooLarge",
        ),
        (
            "let m = #{}; for i in 0..500 { m[`k${i}`] = i; } m.len()",
            "ErrorDataTooLarge",
        ),
    ] {
        let err = eval(small, code).unwrap_err();
        assert!(err.contains(expect), "{code}: {err}");
    }
}

/// What a long script does (a deep helper recursion, a big results table, a long report, many
/// operations) stays under the defaults.
#[test]
fn the_defaults_let_long_scripts_run() {
    let code = "fn depth(n) { if n == 0 { 0 } else { 1 + depth(n - 1) } }\n\
                let rows = []; let report = \"\"; let m = #{};\n\
                for i in 0..20000 { rows.push(i); }\n\
                for i in 0..2000 { report += \"step 12345 loss 0.1234567\\n\"; m[`k${i}`] = i; }\n\
                `${depth(48)} ${rows.len()} ${report.len()} ${m.len()}`";
    let out = eval(ScriptLimits::default(), code).unwrap();
    assert_eq!(out, "48 20000 52000 2000");
    // Unlimited is 0: the same script passes with every limit off.
    let off = ScriptLimits {
        max_operations: 0,
        max_call_depth: 64,
        max_string_size: 0,
        max_array_size: 0,
        max_map_size: 0,
    };
    assert_eq!(eval(off, code).unwrap(), out);
}

/// A runaway loop stops when the cancel flag is set while it runs. No timing: the script's own
/// `started()` tells the test it is inside the loop, the test then sets the flag as the Ctrl-C
/// handler does, and the evaluation must end "interrupted". The script runs in its own thread so
/// that a lost flag fails after a bounded wait instead of hanging the test.
#[test]
fn a_runaway_loop_stops_on_the_cancel_flag() {
    let (flag_tx, flag_rx) = channel();
    let (started_tx, started_rx) = channel::<()>();
    let (done_tx, done_rx) = channel();
    let worker = std::thread::spawn(move || {
        let session = Session::default();
        flag_tx.send(session.cancel.clone()).unwrap();
        let mut engine = script::engine(&session);
        engine.register_fn("started", move || {
            let _ = started_tx.send(());
        });
        let err = engine
            .eval::<Dynamic>("let n = 0; started(); loop { n += 1; }")
            .unwrap_err();
        done_tx
            .send(matches!(*err, EvalAltResult::ErrorTerminated(..)))
            .unwrap();
    });
    let wait = Duration::from_secs(60);
    let flag = flag_rx.recv_timeout(wait).unwrap();
    started_rx
        .recv_timeout(wait)
        .expect("the loop did not start");
    flag.store(true, Ordering::SeqCst);
    let terminated = done_rx
        .recv_timeout(wait)
        .expect("the loop did not stop within a minute of the cancel flag");
    assert!(terminated, "the loop ended with another error");
    worker.join().unwrap();
}

/// The binary: `--max-operations` stops a loop with an error naming the limit; SIGINT (Ctrl-C)
/// stops a runaway script with exit status 130, sent once the script has printed that it runs.
#[cfg(unix)]
#[test]
fn matrepl_applies_limits_and_stops_a_runaway_on_sigint() {
    let out = matrepl_command()
        .args(["--max-operations", "5000", "-e", "loop {}"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.to_lowercase().contains("operations"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("runaway.rhai");
    std::fs::write(
        &script,
        "print(\"running\");\nlet n = 0;\nloop { n += 1; }\n",
    )
    .unwrap();
    let mut child = matrepl_command()
        .arg(&script)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "running");
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("interrupted"), "{err}");
}

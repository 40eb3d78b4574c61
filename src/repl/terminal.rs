//! The REPL behind a terminal: rustyline for editing, completion, hints from history,
//! multi-line entries and a persistent history file. All decisions are made by [`super::Repl`],
//! [`super::is_incomplete`] and [`super::complete::Completer`]; this file only wires them in.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use rhai::Engine;
use rustyline::completion::Completer as RlCompleter;
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::{Hinter, HistoryHinter};
use rustyline::history::FileHistory;
use rustyline::validate::{ValidationContext, ValidationResult, Validator};
use rustyline::{CompletionType, Config, Context, Editor, Helper};

use super::complete::Completer;
use super::{is_incomplete, Outcome, Repl};
use crate::{Error, Result};

const PROMPT: &str = "matvlm> ";

/// Where the history is kept unless told otherwise: `$MATREPL_HISTORY`, else
/// `~/.matrepl_history`.
pub fn default_history_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MATREPL_HISTORY") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".matrepl_history"))
}

/// rustyline's view of the REPL.
struct ReplHelper {
    completer: Completer,
    hinter: HistoryHinter,
    /// Only parses (to tell an unfinished entry); never runs anything.
    parser: Engine,
}

impl Helper for ReplHelper {}

impl RlCompleter for ReplHelper {
    type Candidate = String;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        Ok(self.completer.complete(line, pos))
    }
}

impl Hinter for ReplHelper {
    type Hint = String;

    fn hint(&self, line: &str, pos: usize, ctx: &Context<'_>) -> Option<String> {
        self.hinter.hint(line, pos, ctx)
    }
}

impl Highlighter for ReplHelper {
    fn highlight_hint<'h>(&self, hint: &'h str) -> Cow<'h, str> {
        // Dim, so that a hint does not look like typed text.
        Cow::Owned(format!("\x1b[2m{hint}\x1b[0m"))
    }
}

impl Validator for ReplHelper {
    fn validate(&self, ctx: &mut ValidationContext) -> rustyline::Result<ValidationResult> {
        Ok(if is_incomplete(&self.parser, ctx.input()) {
            ValidationResult::Incomplete
        } else {
            ValidationResult::Valid(None)
        })
    }
}

/// Run the REPL on the terminal until `:quit` or Ctrl-D. Ctrl-C at the prompt clears the line;
/// during a call it sets the session's cancel flag (see [`crate::train::ctrlc_flag`]).
pub fn run(mut repl: Repl, history: Option<&Path>) -> Result<()> {
    let config = Config::builder()
        .history_ignore_space(true)
        .auto_add_history(false)
        .completion_type(CompletionType::List)
        .build();
    let mut editor: Editor<ReplHelper, FileHistory> = Editor::with_config(config)
        .map_err(|e| Error::Other(format!("cannot start the line editor: {e}")))?;
    editor.set_helper(Some(ReplHelper {
        completer: repl.completer(),
        hinter: HistoryHinter::new(),
        parser: Engine::new_raw(),
    }));
    if let Some(h) = history {
        // A missing history file is the normal first run.
        let _ = editor.load_history(h);
    }
    println!("matvlm REPL: `:help` lists the functions, Tab completes, Ctrl-D or `:quit` leaves.");
    loop {
        // A Ctrl-C that arrived after the last entry ended (while its output was printed) was
        // meant for nothing that runs now; at the prompt the line editor reads Ctrl-C as a key.
        repl.session.cancel.store(false, Ordering::SeqCst);
        match editor.readline(PROMPT) {
            Ok(entry) => {
                if entry.trim().is_empty() {
                    continue;
                }
                let _ = editor.add_history_entry(entry.as_str());
                if let Some(h) = history {
                    if let Err(e) = editor.append_history(h) {
                        eprintln!("(history not saved to {}: {e})", h.display());
                    }
                }
                match repl.handle(&entry) {
                    Outcome::Nothing => {}
                    Outcome::Output(s) => println!("{s}"),
                    Outcome::Error(s) => eprintln!("{s}"),
                    Outcome::Quit => break,
                }
                if let Some(helper) = editor.helper_mut() {
                    helper.completer = repl.completer();
                }
            }
            Err(ReadlineError::Interrupted) => {
                println!("(Ctrl-C clears the line; Ctrl-D or :quit leaves)");
            }
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(Error::Other(format!("reading input: {e}"))),
        }
    }
    Ok(())
}

//! The REPL's logic, without a terminal: what an entry does ([`Repl::handle`]), when an entry
//! is unfinished and continues on the next line ([`is_incomplete`]), how errors are shown
//! ([`format_error`]), what completes ([`complete::Completer`]) and what `:help` says
//! ([`docs::Docs`]). [`terminal::run`] puts it behind rustyline.
//!
//! Commands: `:help [name]`, `:load FILE`, `:time EXPR`, `:vars`, `:quit`. Anything else is rhai
//! code, evaluated in one persistent scope; functions defined with `fn` stay defined.

pub mod complete;
pub mod docs;
pub mod terminal;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use rhai::{Dynamic, Engine, EvalAltResult, Position, Scope, AST};

use crate::script::{display_value, Session};
use complete::Completer;
use docs::Docs;

/// The REPL's commands, as completion offers them.
pub const COMMANDS: [&str; 5] = [":help", ":load", ":time", ":vars", ":quit"];

/// What an entry produced, for the terminal layer to print.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Nothing to show (an empty entry, a statement whose value is `()`).
    Nothing,
    /// A value or a command's output, for stdout.
    Output(String),
    /// An error, formatted with the offending line and a caret, for stderr.
    Error(String),
    /// `:quit`.
    Quit,
}

/// One REPL session: the engine, the variables, the functions defined so far.
pub struct Repl {
    pub engine: Engine,
    pub scope: Scope<'static>,
    pub session: Session,
    pub docs: Docs,
    /// Functions defined by earlier entries (statements are dropped after each entry).
    functions: AST,
}

impl Repl {
    pub fn new(session: Session) -> Self {
        let engine = crate::script::engine(&session);
        let docs = Docs::from_engine(&engine);
        Self {
            engine,
            scope: Scope::new(),
            session,
            docs,
            functions: AST::empty(),
        }
    }

    /// Completion as of now (functions, methods, the variables in scope).
    pub fn completer(&self) -> Completer {
        let mut c = Completer::new(&self.docs);
        c.set_variables(self.variables());
        c
    }

    /// The variables in scope and their type names.
    pub fn variables(&self) -> Vec<(String, String)> {
        self.scope
            .iter()
            .map(|(name, _, value)| {
                (
                    name.to_string(),
                    self.engine.map_type_name(value.type_name()).to_string(),
                )
            })
            .collect()
    }

    /// Run one complete entry (possibly several lines): a command or rhai code.
    pub fn handle(&mut self, entry: &str) -> Outcome {
        let trimmed = entry.trim();
        if trimmed.is_empty() {
            return Outcome::Nothing;
        }
        if let Some(command) = trimmed.strip_prefix(':') {
            let (name, arg) = match command.split_once(char::is_whitespace) {
                Some((n, a)) => (n, a.trim()),
                None => (command, ""),
            };
            return self.command(name, arg);
        }
        match self.eval(entry, None) {
            Ok(v) => show(&v),
            Err(e) => Outcome::Error(format_error(entry, &e)),
        }
    }

    fn command(&mut self, name: &str, arg: &str) -> Outcome {
        match name {
            "quit" | "q" | "exit" => Outcome::Quit,
            "help" | "h" => Outcome::Output(self.help(arg)),
            "vars" => Outcome::Output(self.vars()),
            "load" => {
                if arg.is_empty() {
                    return Outcome::Error(":load needs a file name".into());
                }
                let source = match std::fs::read_to_string(arg) {
                    Ok(s) => s,
                    Err(e) => return Outcome::Error(format!("cannot read {arg}: {e}")),
                };
                match self.eval(&source, Some(Path::new(arg))) {
                    Ok(v) => show(&v),
                    Err(e) => Outcome::Error(format_script_error(Path::new(arg), &e)),
                }
            }
            "time" => {
                if arg.is_empty() {
                    return Outcome::Error(":time needs an expression".into());
                }
                let start = Instant::now();
                let result = self.eval(arg, None);
                let secs = start.elapsed().as_secs_f64();
                match result {
                    Ok(v) => {
                        let value = match show(&v) {
                            Outcome::Output(s) => format!("{s}\n"),
                            _ => String::new(),
                        };
                        Outcome::Output(format!("{value}time: {secs:.3} s"))
                    }
                    Err(e) => Outcome::Error(format_error(arg, &e)),
                }
            }
            other => Outcome::Error(format!(
                "unknown command :{other} (commands: {})",
                COMMANDS.join(", ")
            )),
        }
    }

    /// Compile and run `code` in the session's scope, keeping the functions it defines.
    ///
    /// A set cancel flag stops the entry, whenever it was set from the moment the entry was
    /// handed over: it is not cleared on the way in (a Ctrl-C arriving as the entry starts would
    /// be lost, and the entry might never end). It is cleared when the entry ends, so the
    /// cancellation stops this entry and no later one; [`terminal::run`] also drops one that
    /// arrives while no entry runs, before showing the prompt.
    pub fn eval(
        &mut self,
        code: &str,
        source: Option<&Path>,
    ) -> Result<Dynamic, Box<EvalAltResult>> {
        let result = self.compile_and_run(code, source);
        self.session.cancel.store(false, Ordering::SeqCst);
        result
    }

    fn compile_and_run(
        &mut self,
        code: &str,
        source: Option<&Path>,
    ) -> Result<Dynamic, Box<EvalAltResult>> {
        let mut ast = self.engine.compile_with_scope(&self.scope, code)?;
        if let Some(p) = source {
            ast.set_source(p.display().to_string());
        }
        // Earlier functions first, so that the entry can redefine them.
        let program = self.functions.merge(&ast);
        let result = self.engine.eval_ast_with_scope(&mut self.scope, &program);
        self.functions = program.clone_functions_only();
        result
    }

    fn help(&self, name: &str) -> String {
        if name.is_empty() {
            return format!(
                "matvlm functions (`:help NAME` for one in full):\n{}\n\n\
                 commands:\n  :help [NAME]   this list, or the documentation of NAME\n  \
                 :load FILE     run a script file in this session\n  \
                 :time EXPR     evaluate and show the time taken\n  \
                 :vars          the variables in scope\n  \
                 :quit          leave (or Ctrl-D)\n\n\
                 An unfinished entry (an open block, bracket or string) continues on the next \
                 line. Ctrl-C stops a running call at its next step and keeps everything else.",
                self.docs.overview()
            );
        }
        self.docs
            .help(name)
            .unwrap_or_else(|| format!("no function named `{name}`"))
    }

    fn vars(&self) -> String {
        if self.scope.is_empty() {
            return "(no variables)".into();
        }
        self.scope
            .iter()
            .map(|(name, constant, value)| {
                let ty = self.engine.map_type_name(value.type_name());
                let mut shown = display_value(&value).replace('\n', " ");
                if shown.chars().count() > 72 {
                    shown = shown.chars().take(69).collect::<String>() + "...";
                }
                let kind = if constant { "const " } else { "" };
                format!("{kind}{name}: {ty} = {shown}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn show(v: &Dynamic) -> Outcome {
    if v.is_unit() {
        Outcome::Nothing
    } else {
        Outcome::Output(display_value(v))
    }
}

/// True when `code` is an unfinished entry that should continue on the next line: an open
/// block, bracket or back-tick string, or an expression cut after an operator. Other syntax
/// errors are complete entries (they are reported).
pub fn is_incomplete(engine: &Engine, code: &str) -> bool {
    if code.trim_start().starts_with(':') {
        return false;
    }
    let Err(err) = engine.compile(code) else {
        return false;
    };
    use rhai::{LexError, ParseErrorType as P};
    let at_end = at_or_past_end(code, err.position());
    match err.err_type() {
        P::UnexpectedEOF => true,
        // Only a back-tick string may span lines; an open "..." is a mistake to report.
        P::BadInput(LexError::UnterminatedString) => code.matches('`').count() % 2 == 1,
        P::MissingToken(..) | P::MissingSymbol(..) | P::ExprExpected(..) => at_end,
        P::BadInput(LexError::UnexpectedInput(s)) if s.is_empty() => at_end,
        _ => false,
    }
}

/// Whether rhai stopped at the end of the input: nothing but white space (or comments) follows
/// the error position.
fn at_or_past_end(code: &str, pos: Position) -> bool {
    let (Some(line), Some(col)) = (pos.line(), pos.position()) else {
        return true;
    };
    let lines: Vec<&str> = code.split('\n').collect();
    if line > lines.len() {
        return true;
    }
    let rest_of_line: String = lines[line - 1]
        .chars()
        .skip(col.saturating_sub(1))
        .collect();
    let rest = std::iter::once(rest_of_line.as_str())
        .chain(lines[line..].iter().copied())
        .collect::<Vec<_>>()
        .join("\n");
    rest.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with("//")
    })
}

/// An error as `line N: <the line>`, a caret under the column, and the message. Errors without
/// a position are the message alone.
pub fn format_error(source: &str, err: &EvalAltResult) -> String {
    let pos = err.position();
    let mut msg = err.to_string();
    if !pos.is_none() {
        if let Some(stripped) = msg.strip_suffix(&format!(" ({pos})")) {
            msg = stripped.to_string();
        }
    }
    if let EvalAltResult::ErrorTerminated(..) = err {
        msg = "interrupted".into();
    }
    let (Some(line), Some(col)) = (pos.line(), pos.position()) else {
        return msg;
    };
    let text = source.split('\n').nth(line - 1).unwrap_or("");
    let prefix = format!("line {line}: ");
    let caret = " ".repeat(prefix.len() + col.saturating_sub(1));
    format!("{prefix}{text}\n{caret}^ {msg}")
}

/// Where a script called into the function an error came from: (source, position, function).
pub type CallSite<'a> = (Option<&'a str>, Position, String);

/// An error raised inside a script function or an imported module reaches the top wrapped once
/// per call level. This unwraps it: the innermost error, the source it was raised in (the
/// function's or module's source, else `source`), and the call sites on the way down, outermost
/// first, as (source, position, function name).
pub fn unwrap_error<'a>(
    err: &'a EvalAltResult,
    source: Option<&'a str>,
) -> (Option<&'a str>, &'a EvalAltResult, Vec<CallSite<'a>>) {
    let mut calls = Vec::new();
    let (mut err, mut source) = (err, source);
    loop {
        match err {
            EvalAltResult::ErrorInFunctionCall(name, src, inner, pos) => {
                calls.push((source, *pos, name.clone()));
                if !src.is_empty() {
                    source = Some(src.as_str());
                }
                err = inner;
            }
            EvalAltResult::ErrorInModule(path, inner, pos) => {
                calls.push((source, *pos, format!("import \"{path}\"")));
                source = Some(path.as_str());
                err = inner;
            }
            _ => return (source, err, calls),
        }
    }
}

/// The file a source name of a script error stands for: the name itself when it is a file,
/// else an import path (`"lib/recipe"`) resolved as rhai resolves it, next to `script` with the
/// `.rhai` extension.
pub fn source_file(name: &str, script: &Path) -> std::path::PathBuf {
    let as_is = Path::new(name);
    if as_is.is_file() {
        return as_is.to_path_buf();
    }
    let dir = script.parent().unwrap_or(Path::new(""));
    let mut p = dir.join(name);
    if p.extension().is_none() {
        p.set_extension("rhai");
    }
    if p.is_file() {
        p
    } else {
        as_is.to_path_buf()
    }
}

/// A script error as a compiler would print it: `file:line:col: message` for where it was
/// raised (inside imported modules and functions too), the offending line with a caret, then
/// the call sites that led there. `script` is the file that was run.
pub fn format_script_error(script: &Path, err: &EvalAltResult) -> String {
    let main = script.display().to_string();
    let (source, inner, calls) = unwrap_error(err, Some(&main));
    let file = source_file(source.unwrap_or(&main), script);
    let pos = if inner.position().is_none() {
        err.position()
    } else {
        inner.position()
    };
    let text = std::fs::read_to_string(&file).unwrap_or_default();
    let place = match (pos.line(), pos.position()) {
        (Some(l), Some(c)) => format!("{}:{l}:{c}", file.display()),
        (Some(l), None) => format!("{}:{l}", file.display()),
        _ => file.display().to_string(),
    };
    let mut out = format!("{place}: {}", error_message(inner));
    if pos.line().is_some() {
        out.push('\n');
        out.push_str(&format_error_at(&text, inner, pos));
    }
    for (src, pos, name) in calls.iter().rev() {
        let f = source_file(src.unwrap_or(&main), script);
        if let (Some(l), Some(c)) = (pos.line(), pos.position()) {
            out.push_str(&format!("\n  in {name}, called at {}:{l}:{c}", f.display()));
        }
    }
    out
}

/// The message of an error without rhai's ` (line l, position c)` suffix; "interrupted" for a
/// Ctrl-C.
pub fn error_message(err: &EvalAltResult) -> String {
    if let EvalAltResult::ErrorTerminated(..) = err {
        return "interrupted".into();
    }
    let pos = err.position();
    let msg = err.to_string();
    if !pos.is_none() {
        if let Some(stripped) = msg.strip_suffix(&format!(" ({pos})")) {
            return stripped.to_string();
        }
    }
    msg
}

/// [`format_error`] at an explicit position.
fn format_error_at(source: &str, err: &EvalAltResult, pos: Position) -> String {
    let msg = error_message(err);
    let (Some(line), Some(col)) = (pos.line(), pos.position()) else {
        return msg;
    };
    let text = source.split('\n').nth(line - 1).unwrap_or("");
    let prefix = format!("line {line}: ");
    let caret = " ".repeat(prefix.len() + col.saturating_sub(1));
    format!("{prefix}{text}\n{caret}^ {msg}")
}

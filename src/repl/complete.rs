//! Tab completion of REPL input: commands, functions, methods of the value before a dot, and
//! the variables in scope. Pure: the terminal layer only hands over the line and cursor.

use std::collections::{BTreeMap, BTreeSet};

use super::docs::Docs;
use super::COMMANDS;

/// Rhai's keywords worth completing.
const KEYWORDS: [&str; 18] = [
    "let", "const", "fn", "if", "else", "for", "in", "while", "loop", "do", "until", "break",
    "continue", "return", "throw", "try", "catch", "switch",
];

/// What can be completed, as of the last entry.
#[derive(Debug, Clone, Default)]
pub struct Completer {
    functions: BTreeSet<String>,
    /// Receiver type -> method names (functions whose first parameter is of that type).
    methods: BTreeMap<String, BTreeSet<String>>,
    /// Functions that take at least one parameter: the methods offered when the receiver's
    /// type is unknown.
    any_method: BTreeSet<String>,
    /// Variables in scope and their type names.
    variables: Vec<(String, String)>,
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

impl Completer {
    pub fn new(docs: &Docs) -> Self {
        let callable = docs.callable_names();
        let mut methods: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut any_method = BTreeSet::new();
        for f in docs.functions.iter().filter(|f| callable.contains(&f.name)) {
            if let Some(r) = &f.receiver {
                methods.entry(r.clone()).or_default().insert(f.name.clone());
                any_method.insert(f.name.clone());
            }
        }
        Self {
            functions: callable,
            methods,
            any_method,
            variables: Vec::new(),
        }
    }

    /// Replace the known variables (name, type name).
    pub fn set_variables(&mut self, variables: Vec<(String, String)>) {
        self.variables = variables;
    }

    /// Completions of the word that ends at byte `pos` of `line`: the byte offset where that word
    /// starts, and the sorted candidates.
    pub fn complete(&self, line: &str, pos: usize) -> (usize, Vec<String>) {
        let pos = pos.min(line.len());
        let before = &line[..pos];
        let start = before
            .char_indices()
            .rev()
            .take_while(|(_, c)| is_ident_char(*c))
            .last()
            .map_or(pos, |(i, _)| i);
        let word = &before[start..];
        let head = &before[..start];

        // `:command` at the start of the entry.
        if head.trim_start() == ":" && before.trim_start().starts_with(':') {
            let cands = COMMANDS
                .iter()
                .map(|c| c.trim_start_matches(':'))
                .filter(|c| c.starts_with(word))
                .map(str::to_string)
                .collect();
            return (start, cands);
        }
        // `:help name`
        if head.trim_start().starts_with(":help") {
            return (start, self.with_prefix(self.functions.iter(), word));
        }
        // `x.method`: the methods of x's type when x is a variable of a known type.
        if let Some(receiver_end) = head.strip_suffix('.') {
            let receiver: String = receiver_end
                .chars()
                .rev()
                .take_while(|c| is_ident_char(*c))
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            let typed = self
                .variables
                .iter()
                .find(|(n, _)| *n == receiver)
                .and_then(|(_, t)| self.methods.get(t));
            let pool = typed.unwrap_or(&self.any_method);
            return (start, self.with_prefix(pool.iter(), word));
        }
        if word.is_empty() {
            return (start, Vec::new());
        }
        let pool = self
            .variables
            .iter()
            .map(|(n, _)| n)
            .chain(self.functions.iter())
            .map(String::as_str)
            .chain(KEYWORDS)
            .map(str::to_string)
            .collect::<BTreeSet<_>>();
        (start, self.with_prefix(pool.iter(), word))
    }

    fn with_prefix<'a>(&self, pool: impl Iterator<Item = &'a String>, word: &str) -> Vec<String> {
        let set: BTreeSet<&String> = pool.filter(|n| n.starts_with(word)).collect();
        set.into_iter().cloned().collect()
    }
}

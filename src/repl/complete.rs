//! Tab completion of REPL input: commands, functions, methods and properties of the value before
//! a dot, and the variables in scope. Pure: the terminal layer only hands over the line and
//! cursor.

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
    /// Receiver type -> what completes after `x.` for a value of that type: its methods
    /// (functions whose first parameter is of that type) as calls, `name(`, or `name()` when no
    /// overload takes more than the receiver; its properties (getters) as bare names, since
    /// `x.name` reads a property and `x.name()` calls a method and neither works as the other.
    methods: BTreeMap<String, BTreeSet<String>>,
    /// Every type's methods and properties: what is offered when the receiver's type is unknown.
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
        // (receiver, method) -> whether some overload takes arguments besides the receiver.
        let mut takes_args: BTreeMap<(&str, &str), bool> = BTreeMap::new();
        let mut properties: BTreeSet<(&str, &str)> = BTreeSet::new();
        for f in &docs.functions {
            let Some(r) = f.receiver.as_deref() else {
                continue;
            };
            if callable.contains(&f.name) {
                *takes_args.entry((r, f.name.as_str())).or_default() |= f.arity > 1;
            } else if let Some(p) = Docs::property_name(f) {
                properties.insert((r, p));
            }
        }
        let calls = takes_args.into_iter().map(|((r, name), args)| {
            let parens = if args { "(" } else { "()" };
            (r, format!("{name}{parens}"))
        });
        let props = properties.into_iter().map(|(r, p)| (r, p.to_string()));
        let mut methods: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut any_method = BTreeSet::new();
        for (r, text) in calls.chain(props) {
            methods
                .entry(r.to_string())
                .or_default()
                .insert(text.clone());
            any_method.insert(text);
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
            let mut cands = self.with_prefix(pool.iter(), word);
            // Completing a name already followed by its parenthesis adds none.
            if line[pos..].starts_with('(') {
                cands = cands
                    .into_iter()
                    .map(|c| c.trim_end_matches(['(', ')']).to_string())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
            }
            return (start, cands);
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

//! File helpers.

use super::*;

pub(super) fn check_aligned(what: &str, items: usize, predictions: usize) -> Result<()> {
    if items != predictions {
        return Err(Error::Invalid(format!(
            "{what}: {items} items but {predictions} predictions (they must be aligned)"
        )));
    }
    Ok(())
}

/// `"yes"` / `"no"` in any case and surrounding whitespace.
pub(super) fn yes_no(s: &str) -> Option<bool> {
    match s.trim().to_lowercase().as_str() {
        "yes" => Some(true),
        "no" => Some(false),
        _ => None,
    }
}

/// The first of `keys` holding a string.
pub(super) fn str_field(row: &Value, keys: &[&str]) -> Option<String> {
    keys.iter()
        .find_map(|k| row.get(*k).and_then(Value::as_str).map(str::to_owned))
}

/// The first of `keys` holding a string or a number, as a string.
pub(super) fn id_field(row: &Value, keys: &[&str]) -> Option<String> {
    keys.iter().find_map(|k| match row.get(*k)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

/// Non-empty lines of a JSON-lines file with their 1-based line numbers; a line that is not
/// JSON is an error naming the file and line.
pub(super) fn read_jsonl(path: &Path) -> Result<Vec<(usize, Value)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map(|v| (i + 1, v))
                .map_err(|e| Error::BadConfig {
                    path: path.to_path_buf(),
                    reason: format!("line {}: {e}", i + 1),
                })
        })
        .collect()
}

/// Collects bad records of one file and turns them into [`Error::BadRecords`].
pub(super) struct BadLines {
    path: PathBuf,
    lines: Vec<(usize, String)>,
}

impl BadLines {
    pub(super) fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            lines: Vec::new(),
        }
    }

    pub(super) fn push(&mut self, line: usize, why: &str) {
        self.lines.push((line, why.to_string()));
    }

    pub(super) fn finish<T>(self, value: T) -> Result<T> {
        if self.lines.is_empty() {
            return Ok(value);
        }
        let summary = self
            .lines
            .iter()
            .take(5)
            .map(|(l, why)| format!("line {l}: {why}"))
            .collect::<Vec<_>>()
            .join("; ");
        Err(Error::BadRecords {
            path: self.path,
            count: self.lines.len(),
            summary,
        })
    }
}

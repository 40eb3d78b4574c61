//! What every bench binary's `main` shares (each includes this file with `#[path]`): options
//! as `--flag value` pairs (cargo's own `--bench` skipped), numbers and comma lists read with
//! errors that name the flag, and results as JSON lines on stdout, appended to `--out` too.

use std::io::Write;
use std::path::Path;

pub struct Cli {
    /// The bench's name, for messages (its options are documented at the top of its file).
    pub bench: &'static str,
}

impl Cli {
    pub fn usage(&self, msg: &str) -> ! {
        let b = self.bench;
        eprintln!("{b}: {msg}\n(see the options at the top of benches/{b}.rs)");
        std::process::exit(2)
    }

    /// The command line as `(flag, value)` pairs; each flag in `switches` stands alone (`None`),
    /// every other one takes the next argument.
    pub fn args(&self, switches: &[&str]) -> Vec<(String, Option<String>)> {
        let mut out = Vec::new();
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            if flag == "--bench" {
                continue;
            }
            if switches.contains(&flag.as_str()) {
                out.push((flag, None));
                continue;
            }
            let value = it
                .next()
                .unwrap_or_else(|| self.usage(&format!("{flag} needs a value")));
            out.push((flag, Some(value)));
        }
        out
    }

    pub fn num<T: std::str::FromStr>(&self, flag: &str, v: &str) -> T {
        v.trim()
            .parse()
            .unwrap_or_else(|_| self.usage(&format!("{flag}: cannot read `{v}`")))
    }

    pub fn list<T: std::str::FromStr>(&self, flag: &str, v: &str) -> Vec<T> {
        v.split(',').map(|x| self.num(flag, x)).collect()
    }

    /// JSON lines to stdout and, when given, appended to the file at `out`.
    pub fn output(&self, out: Option<&Path>) -> JsonLines {
        JsonLines(out.map(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .unwrap_or_else(|e| self.usage(&format!("--out {}: {e}", p.display())))
        }))
    }
}

pub struct JsonLines(Option<std::fs::File>);

impl JsonLines {
    pub fn emit(&mut self, v: &serde_json::Value) {
        println!("{v}");
        if let Some(f) = self.0.as_mut() {
            writeln!(f, "{v}").expect("writing the --out file");
        }
    }
}

//! The paper's table: one row per model, one column per benchmark, each benchmark's headline
//! number (the one MaTVLM's and TinyLLaVA's tables report).

use serde_json::Value;

use super::Bench;

/// A benchmark's headline number from its summary, with the unit the papers use: percent for
/// fractions, MME's perception points. VQAv2 and MM-Vet have none here (scored elsewhere).
pub fn headline(bench: Bench, summary: &Value) -> Option<f64> {
    let pct = |p: &str| {
        summary
            .pointer(p)
            .and_then(Value::as_f64)
            .map(|v| 100.0 * v)
    };
    match bench {
        Bench::Pope => pct("/average/f1"),
        Bench::Mme => summary.get("perception").and_then(Value::as_f64),
        Bench::Gqa | Bench::TextVqa | Bench::Seed | Bench::Mmmu => pct("/accuracy"),
        Bench::ScienceQa => pct("/img/accuracy"),
        Bench::MmBench => pct("/circular").or_else(|| pct("/single")),
        Bench::Vqav2 | Bench::MmVet => None,
    }
}

/// The column title of a benchmark.
pub fn column(bench: Bench) -> &'static str {
    match bench {
        Bench::Pope => "POPE (F1)",
        Bench::Mme => "MME-P",
        Bench::Gqa => "GQA",
        Bench::TextVqa => "TextVQA",
        Bench::ScienceQa => "SQA-IMG",
        Bench::MmBench => "MMB",
        Bench::Seed => "SEED-I",
        Bench::Mmmu => "MMMU",
        Bench::Vqav2 => "VQAv2",
        Bench::MmVet => "MM-Vet",
    }
}

/// A markdown table: `rows` are (model, `summary.json` content); columns are the benchmarks
/// present in any row, in the order of [`Bench::ALL`]. A benchmark scored elsewhere shows
/// `submit` (VQAv2's server, MM-Vet's GPT-4 judge); one not run shows `-`.
pub fn paper_table(rows: &[(String, Value)]) -> String {
    // Keys may be aliases (`sqa`); unknown keys are not benchmarks and are left out.
    let rows: Vec<(&String, Vec<(Bench, &Value)>)> = rows
        .iter()
        .map(|(m, s)| {
            let entries = s
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| Some((Bench::parse(k).ok()?, v)))
                .collect();
            (m, entries)
        })
        .collect();
    let benches: Vec<Bench> = Bench::ALL
        .into_iter()
        .filter(|b| rows.iter().any(|(_, s)| s.iter().any(|(x, _)| x == b)))
        .collect();
    let mut out = format!(
        "| model | {} |\n|---|{}\n",
        benches
            .iter()
            .map(|b| column(*b))
            .collect::<Vec<_>>()
            .join(" | "),
        "---:|".repeat(benches.len())
    );
    for (model, summary) in &rows {
        let cells: Vec<String> = benches
            .iter()
            .map(
                |b| match summary.iter().find(|(x, _)| x == b).map(|(_, v)| *v) {
                    None => "-".into(),
                    Some(s) => match headline(*b, s) {
                        Some(v) => format!("{v:.1}"),
                        None => "submit".into(),
                    },
                },
            )
            .collect();
        out.push_str(&format!("| {model} | {} |\n", cells.join(" | ")));
    }
    out
}

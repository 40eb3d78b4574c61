//! Side-by-side comparison.

use super::*;

/// One metric across models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComparisonRow {
    pub benchmark: String,
    pub metric: String,
    /// One value per model, in the order of [`Comparison::models`]; `None` where not measured.
    pub values: Vec<Option<f64>>,
    /// Whether a larger value is better (bolds the best in the markdown table).
    pub higher_is_better: bool,
}

/// Several models side by side: rows are (benchmark, metric), columns are models.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub models: Vec<String>,
    pub rows: Vec<ComparisonRow>,
}

impl Comparison {
    pub fn new() -> Self {
        Self::default()
    }

    fn model_index(&mut self, model: &str) -> usize {
        match self.models.iter().position(|m| m == model) {
            Some(i) => i,
            None => {
                self.models.push(model.to_string());
                for r in &mut self.rows {
                    r.values.push(None);
                }
                self.models.len() - 1
            }
        }
    }

    /// Record one value (a new model or row is added as needed; an existing value is replaced).
    pub fn set(&mut self, model: &str, benchmark: &str, metric: &str, value: f64) {
        self.set_with(model, benchmark, metric, value, true);
    }

    /// [`Comparison::set`] for a metric where smaller is better (perplexity, KL, yes-ratio gap).
    pub fn set_lower_better(&mut self, model: &str, benchmark: &str, metric: &str, value: f64) {
        self.set_with(model, benchmark, metric, value, false);
    }

    fn set_with(&mut self, model: &str, benchmark: &str, metric: &str, value: f64, higher: bool) {
        let m = self.model_index(model);
        let n = self.models.len();
        let row = match self
            .rows
            .iter()
            .position(|r| r.benchmark == benchmark && r.metric == metric)
        {
            Some(i) => &mut self.rows[i],
            None => {
                self.rows.push(ComparisonRow {
                    benchmark: benchmark.to_string(),
                    metric: metric.to_string(),
                    values: vec![None; n],
                    higher_is_better: higher,
                });
                self.rows.last_mut().expect("just pushed")
            }
        };
        row.values[m] = Some(value);
    }

    /// A value, if recorded.
    pub fn get(&self, model: &str, benchmark: &str, metric: &str) -> Option<f64> {
        let m = self.models.iter().position(|x| x == model)?;
        self.rows
            .iter()
            .find(|r| r.benchmark == benchmark && r.metric == metric)?
            .values[m]
    }

    /// Add POPE's accuracy, precision, recall, F1 and yes-ratio for `model`.
    pub fn add_pope(&mut self, model: &str, benchmark: &str, s: &PopeScore) {
        self.set(model, benchmark, "accuracy", s.accuracy);
        self.set(model, benchmark, "precision", s.precision);
        self.set(model, benchmark, "recall", s.recall);
        self.set(model, benchmark, "f1", s.f1);
        // Neither high nor low is good (about 0.5 is ideal on balanced POPE): never bolded.
        self.set(model, benchmark, "yes_ratio", s.yes_ratio);
    }

    /// Add MME's perception, cognition and total scores, and each category's score.
    pub fn add_mme(&mut self, model: &str, benchmark: &str, s: &MmeScore) {
        self.set(model, benchmark, "perception", s.perception);
        self.set(model, benchmark, "cognition", s.cognition);
        self.set(model, benchmark, "total", s.total);
        for c in &s.categories {
            self.set(
                model,
                benchmark,
                &format!("{} (acc+acc+)", c.category),
                c.score,
            );
        }
    }

    /// Add multiple-choice accuracy (and circular accuracy when measured).
    pub fn add_choice(&mut self, model: &str, benchmark: &str, s: &ChoiceScore) {
        self.set(model, benchmark, "accuracy", s.overall.accuracy);
        if let Some(c) = &s.circular {
            self.set(model, benchmark, "circular accuracy", c.accuracy);
        }
    }

    /// Add VQA accuracy, exact match and normalised match.
    pub fn add_vqa(&mut self, model: &str, benchmark: &str, s: &VqaScore) {
        self.set(model, benchmark, "vqa accuracy", s.accuracy);
        self.set(model, benchmark, "exact match", s.exact_match);
        self.set(model, benchmark, "normalized match", s.normalized_match);
    }

    /// Add an [`crate::eval::EvalReport`]: accuracy overall and per question type.
    pub fn add_eval(&mut self, model: &str, benchmark: &str, r: &crate::eval::EvalReport) {
        self.set(model, benchmark, "accuracy", r.accuracy);
        for (t, score) in &r.per_type {
            self.set(model, benchmark, &format!("accuracy {t}"), score.accuracy);
        }
    }

    /// Add an [`crate::eval::AgreementReport`]: top-1 agreement, and KL (lower is better).
    pub fn add_agreement(
        &mut self,
        model: &str,
        benchmark: &str,
        r: &crate::eval::AgreementReport,
    ) {
        self.set(model, benchmark, "teacher agreement", r.agreement);
        self.set_lower_better(model, benchmark, "KL to teacher", r.kl);
    }

    /// Add a [`crate::eval::SpeedReport`]: decode tokens per second.
    pub fn add_speed(&mut self, model: &str, benchmark: &str, r: &crate::eval::SpeedReport) {
        self.set(model, benchmark, "tokens/s", r.tokens_per_s);
    }

    /// A markdown table: one row per (benchmark, metric), one column per model, the best value
    /// of each row in bold (when at least two models have one), `-` where not measured.
    pub fn to_markdown(&self) -> String {
        let mut s = String::from("| benchmark | metric |");
        for m in &self.models {
            s.push_str(&format!(" {} |", m.replace('|', "\\|")));
        }
        s.push_str("\n|---|---|");
        s.push_str(&"---:|".repeat(self.models.len()));
        s.push('\n');
        for r in &self.rows {
            let present: Vec<f64> = r.values.iter().flatten().copied().collect();
            let best =
                if present.len() >= 2 && r.metric != "yes_ratio" {
                    present.iter().copied().reduce(|a, b| {
                        if (b > a) == r.higher_is_better {
                            b
                        } else {
                            a
                        }
                    })
                } else {
                    None
                };
            s.push_str(&format!("| {} | {} |", r.benchmark, r.metric));
            for v in &r.values {
                let cell = match v {
                    None => "-".to_string(),
                    Some(x) if Some(*x) == best => format!("**{}**", format_value(*x)),
                    Some(x) => format_value(*x),
                };
                s.push_str(&format!(" {cell} |"));
            }
            s.push('\n');
        }
        s
    }

    /// As pretty JSON.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| Error::Other(format!("serialising a comparison: {e}")))
    }

    /// Write the table atomically: JSON for a `.json` path, markdown otherwise.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = if path.extension().is_some_and(|e| e == "json") {
            self.to_json()?
        } else {
            self.to_markdown()
        };
        crate::io::write_atomic(path, text.as_bytes())
    }

    /// Read a comparison saved as JSON.
    pub fn load(path: &Path) -> Result<Self> {
        crate::io::read_json(path)
    }
}

/// Four decimals for fractions, one for scores in points.
pub(super) fn format_value(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.4}")
    }
}

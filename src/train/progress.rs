//! What a run shows while it trains: a progress bar on a terminal, plain periodic lines elsewhere
//! (CI logs, notebooks, redirected output), or nothing.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, lines otherwise.
    #[default]
    Auto,
    Bar,
    Lines,
    Silent,
}

/// The numbers of one finished optimiser step, as shown to the user.
#[derive(Debug, Clone)]
pub struct StepReport<'a> {
    pub step: usize,
    pub total: usize,
    pub loss: f64,
    pub terms: &'a [(String, f64)],
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
}

impl StepReport<'_> {
    /// `loss 0.1234 | kl 0.0123 | l2 1.2 | lr 2.00e-4 | gnorm 0.531 | 1234 tok/s`
    pub fn summary(&self) -> String {
        let mut s = format!("loss {}", fmt_num(self.loss));
        for (name, v) in self.terms {
            s.push_str(&format!(" | {name} {}", fmt_num(*v)));
        }
        s.push_str(&format!(
            " | lr {:.2e} | gnorm {} | {:.0} tok/s",
            self.lr,
            fmt_num(self.grad_norm),
            self.tokens_per_s
        ));
        s
    }
}

/// Four significant digits without switching to exponents for ordinary magnitudes.
fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 || (1e-3..1e5).contains(&a) {
        format!("{v:.4}")
    } else {
        format!("{v:.3e}")
    }
}

/// The live display of one training run.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    lines: bool,
    log_every: usize,
    started: Instant,
    start_step: usize,
}

impl Progress {
    /// A display for steps `start_step + 1 ..= total`. In line mode a line is printed every
    /// `log_every` steps (and for the first and the last step).
    pub fn new(mode: ProgressMode, start_step: usize, total: usize, log_every: usize) -> Self {
        let mode = match mode {
            ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bar,
            ProgressMode::Auto => ProgressMode::Lines,
            m => m,
        };
        let bar = (mode == ProgressMode::Bar).then(|| {
            let bar =
                ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_position(start_step as u64);
            bar.reset_eta();
            bar
        });
        Self {
            bar,
            lines: mode == ProgressMode::Lines,
            log_every: log_every.max(1),
            started: Instant::now(),
            start_step,
        }
    }

    /// Show a finished step.
    pub fn step(&mut self, report: &StepReport) {
        if let Some(bar) = &self.bar {
            bar.set_position(report.step as u64);
            bar.set_message(report.summary());
        } else if self.lines {
            let first = report.step == self.start_step + 1;
            let last = report.step == report.total;
            if first || last || report.step.is_multiple_of(self.log_every) {
                let done = (report.step - self.start_step) as f64;
                let left = report.total.saturating_sub(report.step) as f64;
                let eta = self.started.elapsed().as_secs_f64() / done.max(1.0) * left;
                eprintln!(
                    "step {}/{} | {} | eta {}",
                    report.step,
                    report.total,
                    report.summary(),
                    fmt_duration(eta)
                );
            }
        }
    }

    /// A one-off message (resume, evaluation, checkpoint), printed above the bar if there is one.
    pub fn message(&self, msg: &str) {
        if let Some(bar) = &self.bar {
            bar.println(msg);
        } else if self.lines {
            eprintln!("{msg}");
        }
    }

    /// Leave the bar on screen in its final state.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }
}

fn fmt_duration(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

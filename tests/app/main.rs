//! The application side, one test binary: the rhai API (`script`, `script_viz`), the recipe
//! scripts end to end (`recipes`), the REPL without a terminal (`repl`) and on a
//! pseudo-terminal (`repl_pty`), figures (`viz`), benchmark scoring (`benchmarks`), the benchmark runner over tiny copies of the benchmarks' released layouts (`bench_score`, `bench_run`), the web chat and OpenAI-compatible server (`serve`, and in headless Chromium `serve_browser`), and bad input,
//! script limits and crashes survived (`robust`).

#[path = "../common/mod.rs"]
mod common;

mod bench_run;
mod bench_score;
mod benchmarks;
mod recipes;
mod repl;
#[cfg(unix)]
mod repl_pty;
mod robust;
mod script;
mod script_viz;
mod serve;
mod serve_browser;
mod viz;

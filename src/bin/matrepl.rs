//! `matrepl`: the matvlm REPL, script runner and one-liner evaluator.
//!
//! ```text
//! matrepl                                   # the REPL
//! matrepl scripts/inspect.rhai --model DIR  # run a script; --name value become variables
//! matrepl -e 'teacher().layers()'           # evaluate, print, exit
//! matrepl --device cuda:0 --dtype bf16 ...  # where and how models are loaded
//! matrepl --threads 1 scripts/train_0.25.rhai   # CPU threads for tensor operations
//! matrepl --gpus 4 --dtype bf16 scripts/train_0.25.rhai   # data-parallel over 4 GPUs (NCCL)
//! matrepl serve [--model DIR]... [--port 8080]   # web chat + OpenAI-compatible server
//! ```
//!
//! A failing script prints `file:line:col: message` for where the error was raised (inside an
//! imported module too), the line with a caret, and the calls that led there.
//!
//! Exit status: 0 on success, 1 when the script fails, 2 for bad command-line arguments, 130
//! when interrupted by Ctrl-C.

use std::path::PathBuf;
use std::process::ExitCode;

// Training allocates and frees many tensor-sized buffers; mimalloc keeps them warm instead of
// handing them back to the kernel (as in train_teacher).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Args, Parser, Subcommand};
use rhai::{EvalAltResult, Scope};

use matvlm::repl::{self, format_error, Repl};
use matvlm::script::{self, display_value, Session};

#[derive(Parser, Debug)]
#[command(
    name = "matrepl",
    version,
    about = "The matvlm REPL and script runner",
    after_help = "Options go before FILE; everything after FILE is the script's own \
                  `--name value` arguments (ints, floats, bools or strings), which the script \
                  sees as variables and in the map ARGS.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Evaluate CODE, print its value (unless it is ()) and exit.
    #[arg(
        short = 'e',
        long = "eval",
        value_name = "CODE",
        conflicts_with = "file"
    )]
    eval: Option<String>,

    /// Device for everything loaded: cpu, cuda or cuda:N (CUDA needs the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: String,

    /// Dtype for everything loaded: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,

    /// Data-parallel training over the first N GPUs of this host with NCCL (a build with the
    /// `nccl` feature): every training call of the script runs one rank per GPU, rank r on
    /// cuda:r, each with 1/N of every batch; models load on cuda:0.
    #[arg(long, value_name = "N")]
    gpus: Option<usize>,

    /// CPU threads for tensor operations (sets CANDLE_NUM_THREADS and RAYON_NUM_THREADS unless
    /// they are set; default: candle's, one per core). One is often fastest for the tiny models
    /// on a small shared machine, where candle's worker pool spins while it waits.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,

    /// Stop a script after N rhai operations (default: unlimited; Ctrl-C stops a loop).
    #[arg(long, value_name = "N")]
    max_operations: Option<u64>,

    /// Deepest nesting of script function calls (default: 64).
    #[arg(long, value_name = "N")]
    max_call_depth: Option<usize>,

    /// Largest string a script may build, in bytes (default: 256 MiB; 0: unlimited).
    #[arg(long, value_name = "BYTES")]
    max_string_size: Option<usize>,

    /// Most elements of one array (default: 64Mi; 0: unlimited).
    #[arg(long, value_name = "N")]
    max_array_size: Option<usize>,

    /// History file of the REPL (default: $MATREPL_HISTORY, else ~/.matrepl_history).
    #[arg(long, value_name = "FILE")]
    history: Option<PathBuf>,

    /// A .rhai script to run instead of the REPL.
    file: Option<PathBuf>,

    /// The script's arguments: --name value ...
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        requires = "file",
        value_name = "ARGS"
    )]
    args: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve a web chat (GET /) and an OpenAI-compatible API (POST /v1/chat/completions,
    /// GET /v1/models, GET /health) until Ctrl-C.
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// A checkpoint folder or hub id to serve (repeat for several; served under this name).
    /// Default: the embedded tiny teacher and its 0.25 hybrid (the distilled one in
    /// runs/train_0.25/model if there is one, else built from the teacher now).
    #[arg(long = "model", value_name = "PATH_OR_HUB_ID")]
    models: Vec<String>,
    /// Address to bind; anything but a loopback address needs --api-key.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Device for the models: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Dtype for the models: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Bearer token the API requires (default: $MATVLM_API_KEY; none: no key on loopback).
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// Answer cross-origin requests (Access-Control-Allow-Origin: *).
    #[arg(long)]
    cors: bool,
    /// Requests that may wait for the worker before new ones get 429.
    #[arg(long, value_name = "N")]
    queue: Option<usize>,
    /// Most requests generated together as one batch.
    #[arg(long, value_name = "N")]
    max_batch: Option<usize>,
    /// Most models generating at the same time (each its own batch; compare mode needs 2 to
    /// stream both answers together).
    #[arg(long, value_name = "N")]
    max_models_at_once: Option<usize>,
    /// Largest request body in bytes.
    #[arg(long, value_name = "BYTES")]
    max_body_bytes: Option<usize>,
    /// Largest image in bytes.
    #[arg(long, value_name = "BYTES")]
    max_image_bytes: Option<usize>,
    /// Most images in one conversation.
    #[arg(long, value_name = "N")]
    max_images: Option<usize>,
    /// Completion tokens of a request that names none.
    #[arg(long, value_name = "N")]
    default_max_tokens: Option<usize>,
    /// Folder whose files file:// image URLs may name (default: file URLs refused).
    #[arg(long, value_name = "DIR")]
    image_dir: Option<PathBuf>,
}

/// Why the program stops early.
enum Failure {
    /// Bad arguments or setup (exit 2).
    Usage(String),
    /// The script failed, the message already formatted (exit 1, or 130 when interrupted).
    Script { message: String, interrupted: bool },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        for var in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
            if std::env::var_os(var).is_none() {
                // Read by candle when its first parallel op runs, which is after this point.
                std::env::set_var(var, n.to_string());
            }
        }
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("matrepl: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Script {
            message,
            interrupted,
        }) => {
            eprintln!("{message}");
            ExitCode::from(if interrupted { 130 } else { 1 })
        }
    }
}

fn serve(args: ServeArgs) -> Result<(), Failure> {
    let usage = |e: matvlm::Error| Failure::Usage(e.to_string());
    let device = script::parse_device(&args.device).map_err(usage)?;
    let dtype = script::parse_dtype(&args.dtype).map_err(usage)?;
    let cancel = matvlm::train::ctrlc_flag().map_err(usage)?;
    let d = matvlm::serve::ServeOptions::default();
    let opts = matvlm::serve::ServeOptions {
        host: args.host,
        port: args.port,
        api_key: args.api_key,
        cors: args.cors,
        queue: args.queue.unwrap_or(d.queue),
        max_batch: args.max_batch.unwrap_or(d.max_batch),
        max_models_at_once: args.max_models_at_once.unwrap_or(d.max_models_at_once),
        max_body_bytes: args.max_body_bytes.unwrap_or(d.max_body_bytes),
        max_image_bytes: args.max_image_bytes.unwrap_or(d.max_image_bytes),
        max_images: args.max_images.unwrap_or(d.max_images),
        default_max_tokens: args.default_max_tokens.unwrap_or(d.default_max_tokens),
        image_dir: args.image_dir,
    };
    matvlm::serve::load_and_serve(&args.models, &device, dtype, opts, &cancel).map_err(usage)
}

fn script_failure(source: &str, err: &EvalAltResult) -> Failure {
    Failure::Script {
        message: format_error(source, err),
        interrupted: matches!(err, EvalAltResult::ErrorTerminated(..)),
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let usage = |e: matvlm::Error| Failure::Usage(e.to_string());
    if let Some(Command::Serve(args)) = cli.command {
        return serve(args);
    }
    // The one place the kernel switches are read (`MATVLM_MAMBA2_KERNELS=0`, `MATVLM_MAMBA2_TC=0`).
    matvlm::model::mamba2::fused::set_policy(matvlm::model::mamba2::fused::KernelPolicy::from_env());
    let (parallel, device) =
        matvlm::train::parallel::Parallel::launch(cli.gpus, &cli.device).map_err(usage)?;
    let device = script::parse_device(&device).map_err(usage)?;
    let dtype = script::parse_dtype(&cli.dtype).map_err(usage)?;
    // Ctrl-C sets this flag instead of killing the process: training and generation stop at
    // their next step, the script at its next operation, and the REPL returns to its prompt.
    let cancel = matvlm::train::ctrlc_flag().map_err(usage)?;
    let defaults = script::ScriptLimits::default();
    let limits = script::ScriptLimits {
        max_operations: cli.max_operations.unwrap_or(defaults.max_operations),
        max_call_depth: cli.max_call_depth.unwrap_or(defaults.max_call_depth),
        max_string_size: cli.max_string_size.unwrap_or(defaults.max_string_size),
        max_array_size: cli.max_array_size.unwrap_or(defaults.max_array_size),
        ..defaults
    };
    let session = Session::new(device, dtype)
        .with_cancel(cancel)
        .with_limits(limits)
        .with_parallel(parallel);

    if let Some(code) = &cli.eval {
        let engine = script::engine(&session);
        let mut scope = Scope::new();
        let value = engine
            .eval_with_scope::<rhai::Dynamic>(&mut scope, code)
            .map_err(|e| script_failure(code, &e))?;
        if !value.is_unit() {
            println!("{}", display_value(&value));
        }
        return Ok(());
    }

    if let Some(file) = &cli.file {
        let args = script::parse_script_args(&cli.args).map_err(usage)?;
        let engine = script::engine(&session);
        let mut scope = Scope::new();
        script::push_args(&mut scope, &args);
        return match script::run_file(&engine, &mut scope, file) {
            Ok(_) => Ok(()),
            Err(e) => Err(Failure::Script {
                message: repl::format_script_error(file, &e),
                interrupted: matches!(
                    repl::unwrap_error(&e, None).1,
                    EvalAltResult::ErrorTerminated(..)
                ),
            }),
        };
    }

    let history = cli.history.or_else(repl::terminal::default_history_path);
    repl::terminal::run(Repl::new(session), history.as_deref()).map_err(usage)
}

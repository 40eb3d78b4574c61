//! `matrepl serve`: a web chat about an image and an OpenAI-compatible chat-completions server
//! over the same models, with axum on tokio.
//!
//! * `GET /`: the page (inlined, no external assets): image, multi-turn chat with streamed
//!   answers, sampling settings, a compare mode streaming a teacher and a hybrid side by side with
//!   their speed and cache size, the attention-vs-SSM figure of the last answer.
//! * `POST /v1/chat/completions` (streamed as server-sent events or not), `GET /v1/models`,
//!   `GET /health`, `POST /v1/attention_vs_ssm` (the figure as PNG).
//!
//! This file holds the options, the models served and the server's life cycle; the HTTP side
//! (router, handlers, errors) is in `routes`, the OpenAI types in [`api`].
//!
//! Generation runs on one worker thread per device ([`worker`]) with a bounded queue: a full
//! queue answers 429, a client that goes away stops its generation, and requests that share a
//! model and sampling settings are generated together as one batch.

pub mod api;
mod routes;
pub mod worker;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use candle_core::{DType, Device, Tensor};
use tokio::sync::mpsc;

use crate::generate::GenerateOptions;
use crate::model::hybrid::HybridSpec;
use crate::model::vlm::Vlm;
use crate::{Error, Result};
use api::{ChatRequest, ModelCard};
use worker::{Event, Job, Refused, Worker};

use routes::router;
pub use routes::ApiError;

/// The page, inlined so the server needs no files besides the models.
const PAGE: &str = include_str!("page.html");

/// The environment variable read for the API key when none is given.
pub const API_KEY_ENV: &str = "MATVLM_API_KEY";

/// How to serve. Field names are the rhai `serve` options and, with dashes, the flags of
/// `matrepl serve`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeOptions {
    pub host: String,
    /// 0 picks a free port (the bound address is printed and returned).
    pub port: u16,
    /// Bearer token required on the API (`/v1/...`); required when `host` is not a loopback
    /// address. Empty: read [`API_KEY_ENV`].
    pub api_key: Option<String>,
    /// Answer cross-origin requests (`Access-Control-Allow-Origin: *`).
    pub cors: bool,
    /// Requests waiting for a worker before the server answers 429.
    pub queue: usize,
    /// Most requests generated together in one batch.
    pub max_batch: usize,
    /// Most models generating at the same time on one device (each its own batch).
    pub max_models_at_once: usize,
    /// Largest request body in bytes (413 above it).
    pub max_body_bytes: usize,
    /// Largest image in bytes, encoded (413 above it).
    pub max_image_bytes: usize,
    /// Most images in one conversation.
    pub max_images: usize,
    /// Completion tokens when a request names none.
    pub default_max_tokens: usize,
    /// Folder whose files `file://` image URLs may name; none: `file://` URLs are refused.
    pub image_dir: Option<PathBuf>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            cors: false,
            queue: 64,
            max_batch: 8,
            max_models_at_once: 2,
            max_body_bytes: 8 << 20,
            max_image_bytes: 4 << 20,
            max_images: 1,
            default_max_tokens: 128,
            image_dir: None,
        }
    }
}

/// A model the server answers as `id`.
#[derive(Clone)]
pub struct ServedModel {
    pub id: String,
    pub vlm: Arc<Vlm>,
}

impl ServedModel {
    pub fn new(id: impl Into<String>, vlm: Arc<Vlm>) -> Self {
        Self { id: id.into(), vlm }
    }
}

/// A served model with what requests need to know about it.
pub struct Served {
    pub id: String,
    pub vlm: Arc<Vlm>,
    /// Decoder positions one image takes.
    pub image_tokens: usize,
    pub context_length: usize,
    worker: usize,
}

impl Served {
    fn is_teacher(&self) -> bool {
        self.vlm.mamba_layers().is_empty()
    }
}

struct AppState {
    models: Vec<Served>,
    workers: Vec<Worker>,
    opts: ServeOptions,
    api_key: Option<String>,
    created: u64,
}

impl AppState {
    fn model(&self, id: Option<&str>) -> std::result::Result<(usize, &Served), ApiError> {
        match id {
            None | Some("") => Ok((0, &self.models[0])),
            Some(id) => self
                .models
                .iter()
                .enumerate()
                .find(|(_, m)| m.id == id)
                .ok_or_else(|| {
                    let ids: Vec<&str> = self.models.iter().map(|m| m.id.as_str()).collect();
                    ApiError::new(
                        StatusCode::NOT_FOUND,
                        "model_not_found",
                        format!("unknown model `{id}`; this server has {ids:?}"),
                    )
                }),
        }
    }
}

/// The models `matrepl serve` loads when none are named: the embedded tiny teacher, and its
/// distilled 0.25 hybrid if `runs/train_0.25/model` holds one, else the 0.25 hybrid built now
/// (initialised from attention, not distilled).
pub fn default_models(device: &Device, dtype: DType) -> Result<Vec<ServedModel>> {
    let dir = crate::teacher::default_teacher_path()?;
    let teacher = Arc::new(Vlm::load(&dir.to_string_lossy(), dtype, device)?);
    let distilled = crate::teacher::project_dir()?.join("runs/train_0.25/model");
    let hybrid = if distilled.join(crate::checkpoint::CONFIG).is_file() {
        ServedModel::new(
            "tiny-hybrid-0.25",
            Arc::new(Vlm::load(&distilled.to_string_lossy(), dtype, device)?),
        )
    } else {
        ServedModel::new(
            "tiny-hybrid-0.25-undistilled",
            Arc::new(teacher.hybrid(&HybridSpec::ratio(0.25))?),
        )
    };
    Ok(vec![ServedModel::new("tiny-teacher", teacher), hybrid])
}

/// Load models named by folder or hub id (served under that name); none: [`default_models`].
pub fn load_models(specs: &[String], device: &Device, dtype: DType) -> Result<Vec<ServedModel>> {
    if specs.is_empty() {
        return default_models(device, dtype);
    }
    specs
        .iter()
        .map(|s| {
            Ok(ServedModel::new(
                s.clone(),
                Arc::new(Vlm::load(s, dtype, device)?),
            ))
        })
        .collect()
}

/// A running server: its address, and the handle that stops it.
pub struct Server {
    pub addr: SocketAddr,
    state: Arc<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    /// Bind and serve `models` on a background thread; returns once the socket listens.
    pub fn start(models: Vec<ServedModel>, opts: ServeOptions) -> Result<Server> {
        let state = Arc::new(app_state(models, opts)?);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("serve-http")
            .enable_all()
            .build()
            .map_err(|e| Error::Other(format!("cannot start the HTTP runtime: {e}")))?;
        let bind = format!("{}:{}", state.opts.host, state.opts.port);
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(&bind))
            .map_err(|e| Error::Other(format!("cannot listen on {bind}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Other(format!("cannot listen on {bind}: {e}")))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = router(state.clone());
        let thread = std::thread::Builder::new()
            .name("serve".into())
            .spawn(move || {
                runtime.block_on(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = stopped.await;
                        })
                        .await
                })
            })
            .map_err(|e| Error::Other(format!("cannot start the server thread: {e}")))?;
        Ok(Server {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The URL of the page.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Hold every worker's queue (running batches finish): queued requests wait until
    /// [`Server::resume`].
    pub fn pause(&self) {
        self.state.workers.iter().for_each(Worker::pause);
    }

    pub fn resume(&self) {
        self.state.workers.iter().for_each(Worker::resume);
    }

    /// Each worker's counters, one worker per device (what `/health` shows).
    pub fn stats(&self) -> Vec<worker::WorkerStats> {
        self.state.workers.iter().map(Worker::stats).collect()
    }

    /// Serve until `cancel` is set (Ctrl-C), then stop.
    pub fn run_until(self, cancel: &AtomicBool) -> Result<()> {
        while !cancel.load(Ordering::SeqCst) {
            if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.stop()
    }

    /// Stop listening, end the queues, wait for running batches and the server thread.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        self.state.workers.iter().for_each(Worker::shutdown);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Err(e))) => Err(Error::Other(format!("the server failed: {e}"))),
            Some(Err(_)) => Err(Error::Other("the server thread panicked".into())),
            _ => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Serve `models` with `opts` until `cancel` is set: what `matrepl serve` and the rhai `serve`
/// call. Prints the address once listening.
pub fn serve(models: Vec<ServedModel>, opts: ServeOptions, cancel: &AtomicBool) -> Result<()> {
    let server = Server::start(models, opts)?;
    let ids: Vec<&str> = server.state.models.iter().map(|m| m.id.as_str()).collect();
    println!("serving {ids:?} on {} (Ctrl-C stops)", server.url());
    server.run_until(cancel)
}

/// Load `specs` ([`load_models`]; none: [`default_models`]) and [`serve`] them: `matrepl serve`.
pub fn load_and_serve(
    specs: &[String],
    device: &Device,
    dtype: DType,
    opts: ServeOptions,
    cancel: &AtomicBool,
) -> Result<()> {
    // A bad option is reported before minutes of loading.
    check_options(&opts)?;
    let models = load_models(specs, device, dtype)?;
    serve(models, opts, cancel)
}

fn check_options(opts: &ServeOptions) -> Result<()> {
    if api_key(opts).is_none() && !is_loopback(&opts.host) {
        return Err(Error::Invalid(format!(
            "serve: binding {} makes the server reachable from other machines; give an API key \
             (--api-key or ${API_KEY_ENV}) or bind 127.0.0.1",
            opts.host
        )));
    }
    if opts.queue == 0 {
        return Err(Error::Invalid(
            "serve: the queue must hold at least 1 request".into(),
        ));
    }
    Ok(())
}

fn api_key(opts: &ServeOptions) -> Option<String> {
    opts.api_key
        .clone()
        .filter(|k| !k.is_empty())
        .or_else(|| std::env::var(API_KEY_ENV).ok().filter(|k| !k.is_empty()))
}

fn app_state(models: Vec<ServedModel>, opts: ServeOptions) -> Result<AppState> {
    if models.is_empty() {
        return Err(Error::Invalid("serve: no models to serve".into()));
    }
    let mut seen = std::collections::HashSet::new();
    for m in &models {
        if !seen.insert(m.id.clone()) {
            return Err(Error::Invalid(format!(
                "serve: two models are named `{}`",
                m.id
            )));
        }
        m.vlm.tokenizer()?;
    }
    check_options(&opts)?;
    let api_key = api_key(&opts);
    let mut devices: BTreeMap<String, usize> = BTreeMap::new();
    let mut workers = Vec::new();
    let mut served = Vec::new();
    for m in models {
        let location = format!("{:?}", m.vlm.device.location());
        let worker = match devices.get(&location) {
            Some(&w) => w,
            None => {
                let w = workers.len();
                workers.push(
                    Worker::start(
                        &location,
                        opts.queue,
                        opts.max_batch,
                        opts.max_models_at_once,
                    )
                    .map_err(|e| {
                        Error::Other(format!("cannot start the worker for {location}: {e}"))
                    })?,
                );
                devices.insert(location, w);
                w
            }
        };
        let image_tokens = image_tokens(&m.vlm)?;
        served.push(Served {
            context_length: m.vlm.config.text_config.max_position_embeddings,
            id: m.id,
            vlm: m.vlm,
            image_tokens,
            worker,
        });
    }
    Ok(AppState {
        models: served,
        workers,
        opts,
        api_key,
        created: now(),
    })
}

/// Decoder positions one image becomes (one placeholder token in the prompt ids).
fn image_tokens(vlm: &Vlm) -> Result<usize> {
    let p = &vlm.preprocessor;
    let blank = Tensor::zeros((1, 3, p.height, p.width), vlm.dtype, &vlm.device)?;
    Ok(vlm.encode_images(&blank)?.dim(1)?)
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

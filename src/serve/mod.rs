//! `matrepl serve`: a web chat about an image and an OpenAI-compatible chat-completions server
//! over the same models, with axum on tokio.
//!
//! * `GET /`: the page (inlined, no external assets): image, multi-turn chat with streamed
//!   answers, sampling settings, a compare mode streaming a teacher and a hybrid side by side with
//!   their speed and cache size, the attention-vs-SSM figure of the last answer.
//! * `POST /v1/chat/completions` (streamed as server-sent events or not), `GET /v1/models`,
//!   `GET /health`, `POST /v1/attention_vs_ssm` (the figure as PNG).
//!
//! Generation runs on one worker thread per device ([`worker`]) with a bounded queue: a full
//! queue answers 429, a client that goes away stops its generation, and requests that share a
//! model and sampling settings are generated together as one batch.

pub mod api;
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

fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/attention_vs_ssm", post(attention_vs_ssm))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .merge(api)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.opts.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            announced_length,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), cors))
        .with_state(state)
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: String) -> Self {
        Self {
            status,
            kind,
            message,
            retry_after: None,
        }
    }
    pub(crate) fn bad(message: String) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    pub(crate) fn too_large(message: String) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            message,
        )
    }
    pub(crate) fn internal(message: String) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }
    /// The same error, said of message `i`.
    pub(crate) fn at(mut self, i: usize) -> Self {
        self.message = format!("messages[{i}]: {}", self.message);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": null,
                "code": self.status.as_u16(),
            }
        });
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid(m) | Error::Prompt(m) => ApiError::bad(m),
            other => ApiError::internal(other.to_string()),
        }
    }
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("no route {} {}", req.method(), req.uri().path()),
    )
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    let workers: Vec<_> = st.workers.iter().map(Worker::stats).collect();
    Json(serde_json::json!({
        "status": "ok",
        "models": st.models.iter().map(|m| &m.id).collect::<Vec<_>>(),
        "workers": workers,
    }))
    .into_response()
}

async fn list_models(State(st): State<Arc<AppState>>) -> Response {
    let data: Vec<ModelCard> = st
        .models
        .iter()
        .map(|m| ModelCard {
            id: m.id.clone(),
            object: "model",
            created: st.created,
            owned_by: "matvlm",
            kind: if m.is_teacher() { "teacher" } else { "hybrid" },
            layers: m
                .vlm
                .layer_kinds()
                .iter()
                .map(|k| k.name().to_string())
                .collect(),
            context_length: m.context_length,
            parameters: m.vlm.parameter_count(),
        })
        .collect();
    Json(serde_json::json!({ "object": "list", "data": data })).into_response()
}

async fn require_key(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "this server needs its API key: `Authorization: Bearer KEY`".into(),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// A body announced larger than the limit is refused before any of it is read, so that a client
/// waiting on `Expect: 100-continue` gets the 413 instead of an invitation to send it.
async fn announced_length(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match announced {
        Some(n) if n > st.opts.max_body_bytes as u64 => ApiError::too_large(format!(
            "the request body is {n} bytes, larger than this server's limit of {} bytes",
            st.opts.max_body_bytes
        ))
        .into_response(),
        _ => next.run(req).await,
    }
}

async fn cors(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if !st.opts.cors {
        return next.run(req).await;
    }
    let mut resp = if req.method() == Method::OPTIONS {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(req).await
    };
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    resp
}

/// The body as JSON of type `T`, with the limit and parse errors in OpenAI's shape.
fn parse_body<T: serde::de::DeserializeOwned>(
    body: std::result::Result<Bytes, BytesRejection>,
    limit: usize,
) -> std::result::Result<T, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(format!(
                "the request body is larger than this server's limit of {limit} bytes"
            ))
        } else {
            ApiError::bad(format!("cannot read the request body: {e}"))
        }
    })?;
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad(format!(
            "the request body is not valid JSON for this call: {e}"
        ))
    })
}

/// A request made ready for the worker: model, ids, pixels, limits.
struct Prepared {
    model_index: usize,
    ids: Vec<i64>,
    pixel_values: Option<Tensor>,
    prompt_tokens: usize,
}

fn prepare(
    st: &AppState,
    model: Option<&str>,
    messages: &[api::Message],
    answered: bool,
) -> std::result::Result<Prepared, ApiError> {
    let (index, m) = st.model(model)?;
    let conv = api::conversation(messages, &st.opts, answered)?;
    let tok = m.vlm.tokenizer()?;
    let ids = tok.encode_prompt_with_images(&conv.prompt, conv.images.len())?;
    let pixels = conv
        .images
        .iter()
        .map(|b| api::pixel_values(m, b))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let pixel_values = if pixels.is_empty() {
        None
    } else {
        Some(Tensor::cat(&pixels, 0).map_err(|e| ApiError::internal(e.to_string()))?)
    };
    let prompt_tokens = ids.len() + conv.images.len() * m.image_tokens.saturating_sub(1);
    Ok(Prepared {
        model_index: index,
        ids,
        pixel_values,
        prompt_tokens,
    })
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> std::result::Result<Response, ApiError> {
    let arrived = Instant::now();
    let req: ChatRequest = parse_body(body, st.opts.max_body_bytes)?;
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad(
            "n: this server returns one choice per request; send several requests".into(),
        ));
    }
    let state = st.clone();
    let model_name = req.model.clone();
    // Decoding images and tokenizing are CPU work: off the async threads.
    let (p, mut req) = tokio::task::spawn_blocking(move || {
        prepare(&state, model_name.as_deref(), &req.messages, false).map(|p| (p, req))
    })
    .await
    .map_err(|e| ApiError::internal(format!("request preparation failed: {e}")))??;
    let served = &st.models[p.model_index];
    let room = served.context_length.saturating_sub(p.prompt_tokens);
    if room == 0 {
        return Err(ApiError::bad(format!(
            "the conversation is {} tokens; {} holds {}",
            p.prompt_tokens, served.id, served.context_length
        )));
    }
    let asked = req
        .max_completion_tokens
        .or(req.max_tokens)
        .unwrap_or(st.opts.default_max_tokens);
    let opts = GenerateOptions {
        max_new_tokens: asked.min(room),
        temperature: req.temperature.unwrap_or(0.0).max(0.0),
        top_p: match req.top_p {
            Some(p) if p > 0.0 && p <= 1.0 => p,
            Some(p) => return Err(ApiError::bad(format!("top_p {p} is not in (0, 1]"))),
            None => 1.0,
        },
        seed: req.seed.unwrap_or(0),
        stop_at_eos: !req.ignore_eos,
    };
    let stop = req.stop.take().map(api::Stop::strings).unwrap_or_default();
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(ApiError::bad(
            "stop: at most 4 strings, none of them empty".into(),
        ));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let job = Job {
        model: served.vlm.clone(),
        model_index: p.model_index,
        ids: p.ids,
        pixel_values: p.pixel_values,
        prompt_tokens: p.prompt_tokens,
        max_new_tokens: opts.max_new_tokens,
        opts,
        stop,
        events: tx,
        arrived,
    };
    st.workers[served.worker].submit(job).map_err(|e| match e {
        Refused::Full { capacity } => ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!("the generation queue is full ({capacity} waiting); retry shortly"),
            )
        },
        Refused::ShuttingDown => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the server is shutting down".into(),
        ),
    })?;
    let id = format!("chatcmpl-{:x}", rand::random::<u64>());
    let model = served.id.clone();
    if req.stream {
        let usage = req.stream_options.is_some_and(|o| o.include_usage);
        Ok(stream_response(rx, id, model, usage))
    } else {
        collect_response(rx, id, model).await
    }
}

async fn collect_response(
    mut rx: mpsc::UnboundedReceiver<Event>,
    id: String,
    model: String,
) -> std::result::Result<Response, ApiError> {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Piece(p) => text.push_str(&p),
            Event::Error(e) => return Err(ApiError::internal(e)),
            Event::Done(f) => {
                let body = api::ChatCompletion {
                    id,
                    object: "chat.completion",
                    created: now(),
                    model,
                    choices: vec![api::Choice {
                        index: 0,
                        message: api::AssistantMessage {
                            role: "assistant",
                            content: text,
                        },
                        finish_reason: f.finish_reason,
                    }],
                    usage: api::Usage::new(f.prompt_tokens, f.completion_tokens),
                    timings: f.timings,
                };
                return Ok(Json(body).into_response());
            }
        }
    }
    Err(ApiError::internal(
        "the generation ended without an answer".into(),
    ))
}

/// Server-sent events: a first chunk with the role, one chunk per text piece, a last chunk with
/// the finish reason (and usage when asked, and timings), then `data: [DONE]`. Dropping the
/// body (the client went away) drops the receiver, which the worker notices.
fn stream_response(
    rx: mpsc::UnboundedReceiver<Event>,
    id: String,
    model: String,
    include_usage: bool,
) -> Response {
    let created = now();
    let chunk = move |delta: api::Delta,
                      finish: Option<&'static str>,
                      usage: Option<api::Usage>,
                      timings: Option<worker::Timings>| {
        let c = api::ChatChunk {
            id: id.clone(),
            object: "chat.completion.chunk",
            created,
            model: model.clone(),
            choices: vec![api::ChunkChoice {
                index: 0,
                delta,
                finish_reason: finish,
            }],
            usage,
            timings,
        };
        Bytes::from(format!(
            "data: {}\n\n",
            serde_json::to_string(&c).unwrap_or_default()
        ))
    };
    let first = chunk(
        api::Delta {
            role: Some("assistant"),
            content: Some(String::new()),
        },
        None,
        None,
        None,
    );
    enum Phase {
        Start,
        Streaming,
        Finished,
    }
    let stream = futures_util::stream::unfold(
        (rx, Phase::Start, chunk, Some(first)),
        move |(mut rx, phase, chunk, first)| async move {
            match phase {
                Phase::Start => Some((
                    Ok::<Bytes, std::convert::Infallible>(first.unwrap_or_default()),
                    (rx, Phase::Streaming, chunk, None),
                )),
                Phase::Finished => None,
                Phase::Streaming => {
                    let out = match rx.recv().await {
                        Some(Event::Piece(p)) => {
                            let b = chunk(
                                api::Delta {
                                    role: None,
                                    content: Some(p),
                                },
                                None,
                                None,
                                None,
                            );
                            return Some((Ok(b), (rx, Phase::Streaming, chunk, None)));
                        }
                        Some(Event::Done(f)) => {
                            let usage = include_usage
                                .then(|| api::Usage::new(f.prompt_tokens, f.completion_tokens));
                            let mut b = chunk(
                                api::Delta::default(),
                                Some(f.finish_reason),
                                usage,
                                Some(f.timings),
                            )
                            .to_vec();
                            b.extend_from_slice(b"data: [DONE]\n\n");
                            Bytes::from(b)
                        }
                        Some(Event::Error(e)) => {
                            let err = serde_json::json!({
                                "error": { "message": e, "type": "server_error", "code": 500 }
                            });
                            Bytes::from(format!("data: {err}\n\ndata: [DONE]\n\n"))
                        }
                        None => Bytes::from_static(b"data: [DONE]\n\n"),
                    };
                    Some((Ok(out), (rx, Phase::Finished, chunk, None)))
                }
            }
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// `POST /v1/attention_vs_ssm`: the attention-vs-SSM figure (PNG) of a conversation, usually
/// the one just answered (its last message the assistant's).
#[derive(serde::Deserialize)]
struct FigureRequest {
    /// The hybrid whose Mamba layer is shown.
    model: String,
    /// The teacher whose attention is shown (default: the first teacher served).
    teacher: Option<String>,
    messages: Vec<api::Message>,
    layer: Option<usize>,
}

async fn attention_vs_ssm(
    State(st): State<Arc<AppState>>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> std::result::Result<Response, ApiError> {
    let req: FigureRequest = parse_body(body, st.opts.max_body_bytes)?;
    let png = tokio::task::spawn_blocking(move || figure_png(&st, req))
        .await
        .map_err(|e| ApiError::internal(format!("the figure failed: {e}")))??;
    Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response())
}

fn figure_png(st: &AppState, req: FigureRequest) -> std::result::Result<Vec<u8>, ApiError> {
    let (_, hybrid) = st.model(Some(&req.model))?;
    let layer =
        match req.layer {
            Some(l) => l,
            None => *hybrid.vlm.mamba_layers().first().ok_or_else(|| {
                ApiError::bad(format!("{} has no Mamba layer to show", hybrid.id))
            })?,
        };
    let teacher =
        match &req.teacher {
            Some(t) => st.model(Some(t))?.1,
            None => st.models.iter().find(|m| m.is_teacher()).ok_or_else(|| {
                ApiError::bad("no teacher (attention-only model) is served".into())
            })?,
        };
    let p = prepare(st, Some(&teacher.id), &req.messages, true)?;
    let data = crate::viz::attention_vs_ssm(
        &teacher.vlm,
        &hybrid.vlm,
        &p.ids,
        p.pixel_values.as_ref(),
        layer,
    )?;
    Ok(crate::viz::attention_vs_ssm_figure(&data)?.png()?)
}

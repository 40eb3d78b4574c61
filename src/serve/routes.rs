//! The HTTP side of the server: the router and its middleware (API key, CORS, announced body
//! length), OpenAI-shaped errors, and the handlers, which turn requests into worker jobs and
//! worker events into responses (whole or streamed).

use super::*;

pub(super) fn router(state: Arc<AppState>) -> Router {
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
    pub(super) fn new(status: StatusCode, kind: &'static str, message: String) -> Self {
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

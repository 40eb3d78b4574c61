//! The OpenAI chat-completions protocol: request and response types, and turning a request's
//! messages into the phi template, token ids and pixels.

use std::path::PathBuf;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::worker::Timings;
use super::{ApiError, ServeOptions, Served};
use crate::tokenize::{phi_prompt, Turn, IMAGE_MARKER};

/// `POST /v1/chat/completions`. Fields we do not use are ignored (clients send many).
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<Message>,
    pub max_tokens: Option<usize>,
    /// The newer name of `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    /// Strings that end the answer (not included in it).
    pub stop: Option<Stop>,
    /// Choices per request: only 1 is served.
    pub n: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// vLLM's extension: keep generating past EOS up to the token limit.
    #[serde(default)]
    pub ignore_eos: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn strings(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text {
        text: String,
    },
    ImageUrl {
        image_url: ImageUrl,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ImageUrl {
    Object { url: String },
    Plain(String),
}

impl ImageUrl {
    fn url(&self) -> &str {
        match self {
            ImageUrl::Object { url } | ImageUrl::Plain(url) => url,
        }
    }
}

/// A conversation in the phi template, with its images' encoded bytes in order.
pub struct Conversation {
    pub prompt: String,
    pub images: Vec<Vec<u8>>,
}

/// The phi template of `messages` (system messages are dropped: the template has its own
/// system line), the last one being the user turn to answer. When `answered` is set the last
/// message may be the assistant's and the conversation ends there (for the figure of an answer).
pub fn conversation(
    messages: &[Message],
    opts: &ServeOptions,
    answered: bool,
) -> Result<Conversation, ApiError> {
    let mut turns: Vec<Turn> = Vec::new();
    let mut images = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let (text, urls) = split_content(m.content.as_ref());
        match m.role.as_str() {
            "system" | "developer" => {}
            "user" => {
                if turns.last().is_some_and(|t| t.answer.is_none()) {
                    return Err(ApiError::bad(format!(
                        "messages[{i}]: two user messages in a row (the chat template alternates \
                         user and assistant)"
                    )));
                }
                if text.contains(IMAGE_MARKER) {
                    return Err(ApiError::bad(format!(
                        "messages[{i}]: the text holds `{IMAGE_MARKER}` but the image is missing: \
                         send it as an image_url part (the server places it)"
                    )));
                }
                let mut question = text.trim().to_string();
                for url in urls {
                    images.push(image_bytes(url, opts).map_err(|e| e.at(i))?);
                    question = format!("{IMAGE_MARKER}\n{question}");
                }
                turns.push(Turn {
                    question,
                    answer: None,
                });
            }
            "assistant" => match turns.last_mut() {
                Some(t) if t.answer.is_none() => t.answer = Some(text.trim().to_string()),
                _ => {
                    return Err(ApiError::bad(format!(
                        "messages[{i}]: an assistant message must follow a user message"
                    )))
                }
            },
            other => {
                return Err(ApiError::bad(format!(
                    "messages[{i}]: unknown role `{other}` (system, user or assistant)"
                )))
            }
        }
    }
    match turns.last() {
        None => return Err(ApiError::bad("messages holds no user message".into())),
        Some(t) if t.answer.is_some() && !answered => {
            return Err(ApiError::bad(
                "the last message must be the user's (the turn to answer)".into(),
            ))
        }
        _ => {}
    }
    if images.len() > opts.max_images {
        return Err(ApiError::bad(format!(
            "{} images in the conversation; this server takes at most {}",
            images.len(),
            opts.max_images
        )));
    }
    let mut prompt = phi_prompt(&turns);
    if answered && turns.last().is_some_and(|t| t.answer.is_some()) {
        // The figure looks at the answer's tokens, not at the end-of-text marker after them.
        if let Some(p) = prompt.strip_suffix(crate::tokenize::EOS_TEXT) {
            prompt = p.to_string();
        }
    }
    Ok(Conversation { prompt, images })
}

fn split_content(content: Option<&Content>) -> (String, Vec<&str>) {
    match content {
        None => (String::new(), Vec::new()),
        Some(Content::Text(t)) => (t.clone(), Vec::new()),
        Some(Content::Parts(parts)) => {
            let mut text = Vec::new();
            let mut urls = Vec::new();
            for p in parts {
                match p {
                    Part::Text { text: t } => text.push(t.as_str()),
                    Part::ImageUrl { image_url } => urls.push(image_url.url()),
                    Part::Other => {}
                }
            }
            (text.join("\n"), urls)
        }
    }
}

/// The bytes of an image URL: a `data:` URI (base64) or a `file://` URL inside the allowed
/// folder. Nothing is fetched over the network.
fn image_bytes(url: &str, opts: &ServeOptions) -> Result<Vec<u8>, ApiError> {
    let bytes = if let Some(rest) = url.strip_prefix("data:") {
        let (meta, payload) = rest.split_once(',').ok_or_else(|| {
            ApiError::bad("image_url: a data URI needs a comma before its data".into())
        })?;
        if !meta.ends_with(";base64") {
            return Err(ApiError::bad(
                "image_url: only base64 data URIs are accepted (data:image/png;base64,...)".into(),
            ));
        }
        // Four base64 characters carry three bytes: refuse before decoding a huge payload.
        if payload.len() / 4 * 3 > opts.max_image_bytes + 3 {
            return Err(image_too_large(payload.len() / 4 * 3, opts));
        }
        base64::engine::general_purpose::STANDARD
            .decode(payload.trim())
            .map_err(|e| ApiError::bad(format!("image_url: the data URI is not base64: {e}")))?
    } else if let Some(path) = url.strip_prefix("file://") {
        read_allowed_file(path, opts)?
    } else if url.starts_with("http://") || url.starts_with("https://") {
        return Err(ApiError::bad(
            "image_url: http(s) URLs are refused (this server makes no network requests); send \
             the image inline as a data: URI"
                .into(),
        ));
    } else {
        return Err(ApiError::bad(format!(
            "image_url: `{}` is neither a data: URI nor a file:// URL",
            url.chars().take(40).collect::<String>()
        )));
    };
    if bytes.len() > opts.max_image_bytes {
        return Err(image_too_large(bytes.len(), opts));
    }
    Ok(bytes)
}

fn image_too_large(n: usize, opts: &ServeOptions) -> ApiError {
    ApiError::too_large(format!(
        "image_url: the image is {n} bytes; the limit is {} (--max-image-bytes)",
        opts.max_image_bytes
    ))
}

fn read_allowed_file(path: &str, opts: &ServeOptions) -> Result<Vec<u8>, ApiError> {
    let Some(dir) = &opts.image_dir else {
        return Err(ApiError::bad(
            "image_url: file:// URLs are off; start the server with --image-dir DIR to allow \
             the files under DIR"
                .into(),
        ));
    };
    let path = PathBuf::from(path.strip_prefix("localhost").unwrap_or(path));
    let outside = || {
        ApiError::bad(format!(
            "image_url: {} is not a file under the allowed folder {}",
            path.display(),
            dir.display()
        ))
    };
    let dir = dir.canonicalize().map_err(|_| outside())?;
    let real = path.canonicalize().map_err(|_| outside())?;
    if !real.starts_with(&dir) || !real.is_file() {
        return Err(outside());
    }
    let len = std::fs::metadata(&real).map_err(|_| outside())?.len() as usize;
    if len > opts.max_image_bytes {
        return Err(image_too_large(len, opts));
    }
    std::fs::read(&real).map_err(|e| ApiError::bad(format!("image_url: {}: {e}", path.display())))
}

/// Decode an image (the format is found from the bytes, so the decoder is the check) into the
/// model's pixel values `[1, 3, H, W]`.
pub fn pixel_values(model: &Served, bytes: &[u8]) -> Result<candle_core::Tensor, ApiError> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::bad(format!("image_url: unreadable image: {e}")))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(8192);
    limits.max_image_height = Some(8192);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| {
        ApiError::bad(format!(
            "image_url: not a PNG or JPEG image this server can decode: {e}"
        ))
    })?;
    let vlm = &model.vlm;
    vlm.preprocessor
        .preprocess(&img, &vlm.device, vlm.dtype)
        .and_then(|t| Ok(t.unsqueeze(0)?))
        .map_err(|e| ApiError::internal(e.to_string()))
}

#[derive(Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt: usize, completion: usize) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    pub usage: Usage,
    pub timings: Timings,
}

#[derive(Debug, Serialize)]
pub struct Choice {
    pub index: usize,
    pub message: AssistantMessage,
    pub finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Serialize)]
pub struct ChatChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// `GET /v1/models` entries, with what the page needs to know about each model.
#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// "teacher" (attention only) or "hybrid".
    pub kind: &'static str,
    /// "attn" or "mamba" per decoder layer.
    pub layers: Vec<String>,
    pub context_length: usize,
    pub parameters: usize,
}

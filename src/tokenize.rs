//! Prompts and token ids, exactly as TinyLLaVA Factory builds them.
//!
//! * The "phi" template: `SYSTEM USER: <image>\n{q} ASSISTANT: {a}<|endoftext|>USER: ...`, with
//!   `<image>` moved to the front of the first question.
//! * `<image>` splicing: the prompt is split on the literal `<image>`, each piece is tokenised on its
//!   own (the Phi tokenizer adds no BOS), and the pieces are joined with [`IMAGE_TOKEN`]; the model
//!   replaces that id by the projected image vectors.

use std::path::Path;

use crate::{Error, Result};

/// The placeholder id TinyLLaVA splices where the image goes (`IMAGE_TOKEN_INDEX`).
pub const IMAGE_TOKEN: i64 = -200;
/// The label value that the loss ignores (`IGNORE_INDEX`).
pub const IGNORE_INDEX: i64 = -100;
pub const IMAGE_MARKER: &str = "<image>";
pub const EOS_TEXT: &str = "<|endoftext|>";

pub const PHI_SYSTEM: &str =
    "A chat between a curious user and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the user's questions.";

/// One exchange of a conversation; `answer == None` marks the turn the model must answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub question: String,
    pub answer: Option<String>,
}

/// The phi template of TinyLLaVA Factory. Returns the prompt string; `<image>` stays a literal
/// marker there and is spliced by [`PromptTokenizer::encode_prompt`].
pub fn phi_prompt(turns: &[Turn]) -> String {
    let mut msg = String::new();
    for (i, turn) in turns.iter().enumerate() {
        if i == 0 {
            msg.push_str(PHI_SYSTEM);
            msg.push(' ');
        }
        let mut question = turn.question.clone();
        if question.contains(IMAGE_MARKER) {
            // TinyLLaVA strips the marker wherever it is and puts it in front.
            question = question.replace(IMAGE_MARKER, "").trim().to_string();
            question = format!("{IMAGE_MARKER}\n{question}").trim().to_string();
        }
        msg.push_str(&format!("USER: {question} "));
        match &turn.answer {
            Some(a) => msg.push_str(&format!("ASSISTANT: {a}{EOS_TEXT}")),
            None => msg.push_str("ASSISTANT:"),
        }
    }
    msg
}

/// A prompt for a single question about an (optional) image, ready for generation.
pub fn single_turn_prompt(question: &str, with_image: bool) -> String {
    let q = if with_image && !question.contains(IMAGE_MARKER) {
        format!("{IMAGE_MARKER}\n{question}")
    } else {
        question.to_string()
    };
    phi_prompt(&[Turn {
        question: q,
        answer: None,
    }])
}

/// A `tokenizers` tokenizer plus the few ids the VLM needs.
#[derive(Clone)]
pub struct PromptTokenizer {
    inner: tokenizers::Tokenizer,
    eos_id: u32,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptTokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

impl PromptTokenizer {
    /// Load `tokenizer.json`; the EOS is `<|endoftext|>` (Phi's bos = eos = pad).
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::NotFound(format!(
                "tokenizer file {}",
                path.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Self::new(inner)
    }

    pub fn new(inner: tokenizers::Tokenizer) -> Result<Self> {
        let eos_id = inner
            .token_to_id(EOS_TEXT)
            .ok_or_else(|| Error::Tokenizer(format!("the tokenizer has no `{EOS_TEXT}` token")))?;
        Ok(Self { inner, eos_id })
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Tokenise plain text, no special tokens added (as HF does for the Phi tokenizer).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("encoding {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// TinyLLaVA's `tokenizer_image_token`: each `<image>`-separated piece tokenised alone and
    /// joined with [`IMAGE_TOKEN`].
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<i64>> {
        let mut ids = Vec::new();
        for (i, piece) in prompt.split(IMAGE_MARKER).enumerate() {
            if i > 0 {
                ids.push(IMAGE_TOKEN);
            }
            if !piece.is_empty() {
                ids.extend(self.encode_text(piece)?.into_iter().map(|t| t as i64));
            }
        }
        Ok(ids)
    }

    /// Tokenise a prompt that is to be given `n_images` images; more or fewer markers is an error.
    pub fn encode_prompt_with_images(&self, prompt: &str, n_images: usize) -> Result<Vec<i64>> {
        let markers = prompt.matches(IMAGE_MARKER).count();
        if markers != n_images {
            return Err(Error::Prompt(format!(
                "the prompt has {markers} `{IMAGE_MARKER}` marker(s) but {n_images} image(s) were given"
            )));
        }
        self.encode_prompt(prompt)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(format!("decoding {ids:?}: {e}")))
    }
}

/// Token ids and training labels of a whole conversation, following TinyLLaVA's `make_labels`:
/// the full prompt is tokenised once; each round's instruction part (everything up to and
/// including `ASSISTANT:`) is masked with [`IGNORE_INDEX`], the answer and its EOS are kept.
pub fn encode_conversation(tok: &PromptTokenizer, turns: &[Turn]) -> Result<(Vec<i64>, Vec<i64>)> {
    let prompt = phi_prompt(turns);
    let input_ids = tok.encode_prompt(&prompt)?;
    let mut labels = input_ids.clone();
    let sep = " ASSISTANT: ";
    let eos_len = tok.encode_text(EOS_TEXT)?.len();
    let mut cur = 0usize;
    for round in prompt.split(EOS_TEXT) {
        if round.is_empty() {
            break;
        }
        let parts: Vec<&str> = round.split(sep).collect();
        if parts.len() != 2 {
            break;
        }
        let round_len = tok.encode_prompt(round)?.len() + eos_len;
        // The trailing space of the separator merges into the answer's first token when the
        // whole round is tokenised, hence the -1 (as upstream).
        let instruction_len = tok.encode_prompt(&format!("{}{sep}", parts[0]))?.len() - 1;
        let end = (cur + instruction_len).min(labels.len());
        for l in &mut labels[cur.min(end)..end] {
            *l = IGNORE_INDEX;
        }
        cur += round_len;
    }
    for l in labels.iter_mut().skip(cur) {
        *l = IGNORE_INDEX;
    }
    // Upstream masks the whole sample when the per-round lengths do not add up to the whole
    // (a tokenisation mismatch at a round boundary); doing the same keeps the data identical.
    if cur != input_ids.len() {
        labels.iter_mut().for_each(|l| *l = IGNORE_INDEX);
    }
    Ok((input_ids, labels))
}

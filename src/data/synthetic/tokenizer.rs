//! The world's byte-level BPE tokenizer (GPT-2 style, as Phi's), trained on the world's own
//! text and vocabulary sheet.

use super::*;

/// Train a byte-level BPE tokenizer (GPT-2 style, as Phi's) on `texts`.
///
/// `<|endoftext|>` is id 0 and special (Phi's bos = eos = pad); each of `whole_tokens` is added as
/// one non-special token after training (the world uses it for the phi system prompt). Any text
/// is encodable: the 256 byte symbols are always in the vocabulary. No BOS is added, as Phi's.
pub fn train_world_tokenizer<I, S>(
    texts: I,
    vocab_size: usize,
    whole_tokens: &[&str],
) -> Result<Tokenizer>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let terr =
        |e: tokenizers::Error| Error::Tokenizer(format!("training the world tokenizer: {e}"));
    // Special and whole tokens must not take part in the merges: cut them out of the texts.
    let mut cut: Vec<&str> = vec![EOS_TEXT, IMAGE_MARKER];
    cut.extend(whole_tokens.iter().copied().filter(|t| !t.is_empty()));
    let mut pieces: Vec<String> = Vec::new();
    for text in texts {
        let mut parts = vec![text.as_ref().to_string()];
        for marker in &cut {
            parts = parts
                .iter()
                .flat_map(|p| p.split(marker).map(str::to_string).collect::<Vec<_>>())
                .collect();
        }
        pieces.extend(parts.into_iter().filter(|p| !p.is_empty()));
    }

    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevel::default()))
        .with_post_processor(Some(ByteLevel::new(false, true, true)));
    let mut trainer: TrainerWrapper = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .min_frequency(1)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(EOS_TEXT, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tok.train(&mut trainer, pieces.into_iter()).map_err(terr)?;
    let extra: Vec<AddedToken> = whole_tokens
        .iter()
        .filter(|t| !t.is_empty())
        .map(|t| AddedToken::from(t.to_string(), false))
        .collect();
    tok.add_tokens(extra.iter().cloned()).map_err(terr)?;
    Ok(tok)
}

/// Every word the world's questions and answers can use, so the tokenizer covers val and test
/// even for a rare combination that the train split happens to miss.
pub(super) fn vocabulary_sheet(cfg: &WorldConfig) -> Vec<String> {
    let mut lines = vec![
        "USER: ASSISTANT: yes no".to_string(),
        "Describe the image in one sentence.".into(),
    ];
    let mut words: Vec<String> = Vec::new();
    for c in &cfg.colors {
        words.push(format!("{} {} {}", article(c.name()), c.name(), c.name()));
    }
    for s in &cfg.shapes {
        words.push(format!("{} {}", s.name(), s.plural()));
    }
    for n in 0..=cfg.max_objects {
        words.push(number_word(n));
    }
    for r in 0..cfg.grid {
        for c in 0..cfg.grid {
            words.push(position_name(r, c, cfg.grid));
        }
    }
    lines.push(format!(" {}", words.join(" ")));
    // Twice, so each pair of the sheet is seen more than once.
    lines.extend(lines.clone());
    lines
}

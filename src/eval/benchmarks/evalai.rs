//! The EvalAI answer processor, which TextVQA's scorer and the VQAv2 submission converter use
//! (LLaVA's `llava/eval/m4c_evaluator.py`, `EvalAIAnswerProcessor`, itself from MMF). It differs
//! from `vqaEval.py`'s rules ([`vqa_normalize`]) in small ways: `,` and `?` are deleted and `'s`
//! split off first, `-`, `!`, `{`, `}` are punctuation, `'` is not, and contractions are restored
//! with plain apostrophes.

use super::*;

/// Punctuation of the EvalAI processor (no `'`, `.` handled separately).
const EVALAI_PUNCT: &[char] = &[
    ';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
    '?', '!',
];

/// Upstream passes `re.UNICODE` (32) as the `count` argument of its period substitution, so at
/// most 32 periods are removed.
const EVALAI_MAX_PERIODS: usize = 32;

/// A digit, one or more commas, a digit (upstream's `COMMA_STRIP`).
fn has_digit_comma_digit(s: &str) -> bool {
    let c: Vec<char> = s.chars().collect();
    (0..c.len()).any(|i| {
        c[i].is_ascii_digit() && {
            let mut j = i + 1;
            while j < c.len() && c[j] == ',' {
                j += 1;
            }
            j > i + 1 && j < c.len() && c[j].is_ascii_digit()
        }
    })
}

/// The contraction table of the EvalAI processor: `vqaEval.py`'s table with plain apostrophes.
fn evalai_contraction(word: &str) -> Option<String> {
    let typographic = word.replace('\'', "’");
    vqa_contraction(word)
        .or_else(|| vqa_contraction(&typographic))
        .map(|c| c.replace('’', "'"))
}

/// An answer as EvalAI's processor prepares it: lower-cased, `,` `?` deleted and `'s` split off,
/// whitespace folded, punctuation deleted (next to a space, or anywhere when a digit-comma-digit
/// group occurs) or else turned into a space, periods not followed by a digit deleted, number
/// words to digits, articles dropped, contractions restored. `"Two Dogs!"` -> `"2 dogs"`.
pub fn evalai_normalize(answer: &str) -> String {
    let word = answer
        .to_lowercase()
        .replace([',', '?'], "")
        .replace("'s", " 's");
    let item = word.trim().replace(['\n', '\t'], " ");
    let item = item.trim();
    let delete_all = has_digit_comma_digit(item);
    let mut out = item.to_string();
    for &p in EVALAI_PUNCT {
        let spaced = item.contains(&format!("{p} ")) || item.contains(&format!(" {p}"));
        out = if spaced || delete_all {
            out.replace(p, "")
        } else {
            out.replace(p, " ")
        };
    }
    let chars: Vec<char> = out.chars().collect();
    let mut removed = 0;
    let mut no_periods = String::with_capacity(out.len());
    for (i, &c) in chars.iter().enumerate() {
        let next_digit = chars.get(i + 1).is_some_and(|n| n.is_ascii_digit());
        if c == '.' && !next_digit && removed < EVALAI_MAX_PERIODS {
            removed += 1;
            continue;
        }
        no_periods.push(c);
    }
    no_periods
        .to_lowercase()
        .split_whitespace()
        .map(|w| vqa_number(w).unwrap_or(w))
        .filter(|w| !VQA_ARTICLES.contains(w))
        .map(|w| evalai_contraction(w).unwrap_or_else(|| w.to_string()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// TextVQA's soft accuracy (`TextVQAAccuracyEvaluator`): both sides through
/// [`evalai_normalize`]; for the prediction, the mean over leave-one-out subsets of the
/// annotators' answers of `min(1, matches / 3)`. TextVQA has 10 answers per question; fewer are
/// scored by the same formula (one reference: 0 or 1 by exact match, as [`vqa_accuracy`] does).
pub fn textvqa_accuracy<S: AsRef<str>>(prediction: &str, references: &[S]) -> f64 {
    let pred = evalai_normalize(prediction);
    let refs: Vec<String> = references
        .iter()
        .map(|r| evalai_normalize(r.as_ref()))
        .collect();
    match refs.len() {
        0 => 0.0,
        1 => f64::from(u8::from(refs[0] == pred)),
        n => {
            let total = refs.iter().filter(|r| **r == pred).count();
            refs.iter()
                .map(|r| ((total - usize::from(*r == pred)) as f64 / 3.0).min(1.0))
                .sum::<f64>()
                / n as f64
        }
    }
}

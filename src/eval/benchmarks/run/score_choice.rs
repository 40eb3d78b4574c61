//! Multiple-choice benchmarks: ScienceQA-IMG, MMBench (circular on dev), SEED-Bench (image
//! subset), MMMU (validation, multiple choice with one image).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde_json::{json, Value};

use super::mmbench::read_mmbench_rows;
use super::questions::{id_text, read_json_value, Bad};
use super::score::{ratio, write_json, Ctx};
use crate::eval::benchmarks::extract_choice;
use crate::{Error, Result};

const SQA_OPTIONS: [&str; 5] = ["A", "B", "C", "D", "E"];

/// ScienceQA's reading of an answer (LLaVA's `eval_science_qa.py`): the whole answer is an
/// option letter; or it starts with `X. `; or `The answer is X` followed by any character occurs
/// exactly once. `None` is upstream's "FAILED" (scored wrong).
pub fn sqa_parse_answer(text: &str) -> Option<char> {
    if SQA_OPTIONS.contains(&text) {
        return text.chars().next();
    }
    let c: Vec<char> = text.chars().collect();
    if c.len() >= 3
        && SQA_OPTIONS.contains(&c[0].to_string().as_str())
        && c[1] == '.'
        && c[2] == ' '
    {
        return Some(c[0]);
    }
    const CUE: &str = "The answer is ";
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(pos) = rest.find(CUE) {
        let after: Vec<char> = rest[pos + CUE.len()..].chars().take(2).collect();
        if after.len() == 2 && after[0].is_ascii_uppercase() && after[1] != '\n' {
            found.push(after[0]);
            rest = &rest[pos + CUE.len() + 2..];
        } else {
            rest = &rest[pos + CUE.len()..];
        }
    }
    (found.len() == 1).then(|| found[0])
}

/// ScienceQA (LLaVA's `eval_science_qa.py`): the parsed letter against `problems.json`'s answer
/// index among the problem's choices; accuracy over all asked questions and over those with an
/// image (ScienceQA-IMG, the number papers report).
pub fn scienceqa(ctx: &Ctx) -> Result<Value> {
    let path = ctx.eval_dir.join("scienceqa/problems.json");
    let problems = read_json_value(&path)?;
    let (mut all, mut img, mut failed) = ((0, 0), (0, 0), 0);
    for (q, text) in ctx.questions.iter().zip(ctx.texts) {
        let Some(p) = problems.get(&q.key) else {
            return Err(Error::Invalid(format!(
                "{}: problem {} is not in {}",
                q.origin,
                q.key,
                path.display()
            )));
        };
        let choices = p
            .get("choices")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        let answer = p.get("answer").and_then(Value::as_u64);
        let parsed = sqa_parse_answer(text);
        failed += usize::from(parsed.is_none());
        let idx = parsed
            .map(|c| (c as u8 - b'A') as usize)
            .filter(|&i| i < choices);
        let ok = idx.is_some() && idx.map(|i| i as u64) == answer;
        all.0 += 1;
        all.1 += usize::from(ok);
        if q.image.is_some() {
            img.0 += 1;
            img.1 += usize::from(ok);
        }
    }
    Ok(json!({
        "n": all.0,
        "accuracy": ratio(all.1, all.0),
        "img": { "n": img.0, "accuracy": ratio(img.1, img.0) },
        "failed": failed,
    }))
}

/// Quote a TSV field when it holds a tab, newline or quote.
fn tsv_field(s: &str) -> String {
    if s.contains(['\t', '\n', '\r', '"']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// MMBench: each round's letter is read by [`extract_choice`] among the options as shown and
/// mapped back to the original letter through `option_char`; a question counts in `circular`
/// when every round is right, in `single` when its first round is. `submission.tsv` holds the
/// columns LLaVA's `convert_mmbench_for_submission.py` keeps (`hint`, `category`, `source`,
/// `image`, `comment`, `l2-category` dropped; `prediction`, the first round's answer, inserted
/// as the seventh), and `submission.xlsx` the same table for the server.
pub fn mmbench(ctx: &Ctx) -> Result<Value> {
    let mut rounds: BTreeMap<String, Vec<bool>> = BTreeMap::new();
    let mut first: BTreeMap<String, String> = BTreeMap::new();
    let mut category: BTreeMap<String, String> = BTreeMap::new();
    let mut unparsed = 0;
    let mut scored = true;
    for (q, text) in ctx.questions.iter().zip(ctx.texts) {
        let strings = |k: &str| -> Vec<String> {
            q.extra
                .get(k)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let (options, chars) = (strings("options"), strings("option_char"));
        let index = q.meta["index"].as_str().unwrap_or_default().to_string();
        if q.extra.get("round_id").and_then(Value::as_u64) == Some(0) {
            first.insert(index.clone(), text.clone());
        }
        if let Some(c) = &q.category {
            category.insert(index.clone(), c.clone());
        }
        let Some(answer) = q.meta["answer"].as_str() else {
            scored = false;
            continue;
        };
        let got = extract_choice(text, &options);
        unparsed += usize::from(got.is_none());
        let ok = got.and_then(|i| chars.get(i)).is_some_and(|c| c == answer);
        rounds.entry(index).or_default().push(ok);
    }
    let tsv = ctx.eval_dir.join(super::Bench::MmBench.question_file());
    write_mmbench_submission(&tsv, &ctx.out_dir, &first)?;
    if !scored {
        return Ok(json!({
            "n": first.len(),
            "scoring": "no `answer` column (test split): upload submission.xlsx to the MMBench server",
        }));
    }
    let n = rounds.len();
    let single = rounds.values().filter(|r| r[0]).count();
    let circular = rounds.values().filter(|r| r.iter().all(|&x| x)).count();
    let mut per: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (idx, r) in &rounds {
        let c = category
            .get(idx)
            .cloned()
            .unwrap_or_else(|| "uncategorized".into());
        let t = per.entry(c).or_default();
        t.0 += 1;
        t.1 += usize::from(r.iter().all(|&x| x));
    }
    let per: BTreeMap<String, Value> = per
        .into_iter()
        .map(|(c, (n, ok))| (c, json!({ "n": n, "accuracy": ratio(ok, n) })))
        .collect();
    Ok(json!({
        "n": n,
        "rounds": ctx.questions.len(),
        "single": ratio(single, n),
        "circular": ratio(circular, n),
        "per_category": per,
        "unparsed": unparsed,
    }))
}

/// `submission.xlsx` (what the server takes) and the same table as `submission.tsv`.
fn write_mmbench_submission(
    tsv: &Path,
    out_dir: &Path,
    first: &BTreeMap<String, String>,
) -> Result<()> {
    const DROP: [&str; 6] = [
        "hint",
        "category",
        "source",
        "image",
        "comment",
        "l2-category",
    ];
    let rows = read_mmbench_rows(tsv, &mut Bad::new(true))?;
    let mut table: Vec<Vec<String>> = Vec::new();
    for row in rows.iter().filter(|r| first.contains_key(&r.index)) {
        let mut cols: Vec<(String, String)> = row
            .columns
            .iter()
            .filter(|(k, _)| !DROP.contains(&k.as_str()))
            .cloned()
            .collect();
        let at = cols.len().min(6);
        cols.insert(at, ("prediction".into(), first[&row.index].clone()));
        if table.is_empty() {
            table.push(cols.iter().map(|(k, _)| k.clone()).collect());
        }
        table.push(cols.into_iter().map(|(_, v)| v).collect());
    }
    let text: String = table
        .iter()
        .map(|r| {
            format!(
                "{}\n",
                r.iter()
                    .map(|v| tsv_field(v))
                    .collect::<Vec<_>>()
                    .join("\t")
            )
        })
        .collect();
    crate::io::write_atomic(&out_dir.join("submission.tsv"), text.as_bytes())?;
    crate::io::write_atomic(&out_dir.join("submission.xlsx"), &super::xlsx::xlsx(&table))
}

fn seed_annotations(eval_dir: &Path) -> Result<Value> {
    read_json_value(&eval_dir.join("seed_bench/SEED-Bench.json"))
}

/// The ids of SEED-Bench's image questions (`data_type` "image" in `SEED-Bench.json`).
pub fn seed_image_questions(eval_dir: &Path) -> Result<HashSet<String>> {
    let data = seed_annotations(eval_dir)?;
    Ok(data
        .get("questions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|q| q.get("data_type").and_then(Value::as_str) == Some("image"))
        .filter_map(|q| q.get("question_id").and_then(id_text))
        .collect())
}

/// SEED-Bench, image subset (LLaVA's `convert_seed_for_submission.py`): an answer is right when
/// it equals the annotation's letter exactly; accuracy overall and per question type;
/// `answers_upload.jsonl` holds `question_id` and `prediction` for the leaderboard.
pub fn seed(ctx: &Ctx) -> Result<Value> {
    let data = seed_annotations(&ctx.eval_dir)?;
    let names: BTreeMap<String, String> = data
        .get("question_type")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(name, id)| Some((id_text(id)?, name.clone())))
        .collect();
    let truth: BTreeMap<String, (String, String)> = data
        .get("questions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|q| {
            let id = q.get("question_id").and_then(id_text)?;
            let answer = q.get("answer")?.as_str()?.to_string();
            let t = q
                .get("question_type_id")
                .and_then(id_text)
                .unwrap_or_default();
            Some((id, (answer, names.get(&t).cloned().unwrap_or(t))))
        })
        .collect();
    let mut per: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut upload = String::new();
    let mut right = 0;
    for (q, text) in ctx.questions.iter().zip(ctx.texts) {
        let Some((answer, kind)) = truth.get(&q.key) else {
            return Err(Error::Invalid(format!(
                "{}: question {} is not in SEED-Bench.json",
                q.origin, q.key
            )));
        };
        let ok = text == answer;
        right += usize::from(ok);
        let t = per.entry(kind.clone()).or_default();
        t.0 += 1;
        t.1 += usize::from(ok);
        upload.push_str(&format!(
            "{}\n",
            json!({ "question_id": q.question_id, "prediction": text })
        ));
    }
    crate::io::write_atomic(&ctx.out_dir.join("answers_upload.jsonl"), upload.as_bytes())?;
    let per: BTreeMap<String, Value> = per
        .into_iter()
        .map(|(c, (n, ok))| (c, json!({ "n": n, "accuracy": ratio(ok, n) })))
        .collect();
    let n = ctx.questions.len();
    Ok(json!({ "n": n, "accuracy": ratio(right, n), "per_type": per }))
}

/// MMMU's reading of a multiple-choice answer (`parse_multi_choice_response` of TinyLLaVA
/// Factory's `model_vqa_mmmu.py`, from MMMU's own code): punctuation stripped from both ends;
/// a bracketed letter `(A)`, else a letter standing alone, else (for answers over five words)
/// an option's text; of several candidates the one occurring last. Upstream picks a random
/// letter when nothing matches; here that is `None` (scored wrong), so runs are deterministic.
pub fn mmmu_parse_choice(
    response: &str,
    all_choices: &[String],
    index2ans: &[(String, String)],
) -> Option<String> {
    let mut r = response.to_string();
    for ch in [',', '.', '!', '?', ';', ':', '\''] {
        r = r.trim_matches(ch).to_string();
    }
    let r = format!(" {r} ");
    let lower = r.to_lowercase();
    let mut cands: Vec<(String, usize)> = all_choices
        .iter()
        .filter_map(|c| r.rfind(&format!("({c})")).map(|p| (c.clone(), p)))
        .collect();
    if cands.is_empty() {
        cands = all_choices
            .iter()
            .filter_map(|c| r.rfind(&format!(" {c} ")).map(|p| (c.clone(), p)))
            .collect();
    }
    if cands.is_empty() && r.split_whitespace().count() > 5 {
        cands = index2ans
            .iter()
            .filter_map(|(i, a)| lower.rfind(&a.to_lowercase()).map(|p| (i.clone(), p)))
            .collect();
    }
    // The first candidate with the largest position (numpy's argmax).
    let best = cands.iter().map(|c| c.1).max()?;
    cands.into_iter().find(|c| c.1 == best).map(|c| c.0)
}

/// MMMU validation (TinyLLaVA Factory's `convert_answer_to_mmmu.py`, then MMMU's
/// `main_eval_only.py`): the parsed letter against `MMMU/eval/answer_dict_val.json`'s
/// `ground_truth` (a letter or a list of letters); accuracy overall and per subject (the id's
/// middle part, `validation_<Subject>_<n>`); `mmmu_output.json` maps ids to parsed letters.
pub fn mmmu(ctx: &Ctx) -> Result<Value> {
    let path = ctx.eval_dir.join("MMMU/eval/answer_dict_val.json");
    let truth = read_json_value(&path)?;
    let mut output = serde_json::Map::new();
    let mut per: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let (mut right, mut unparsed) = (0, 0);
    for (q, text) in ctx.questions.iter().zip(ctx.texts) {
        let choices: Vec<String> = q.meta["all_choices"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let index2ans: Vec<(String, String)> = q.meta["index2ans"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        let pred = mmmu_parse_choice(text, &choices, &index2ans);
        unparsed += usize::from(pred.is_none());
        let Some(gt) = truth.get(&q.key).and_then(|t| t.get("ground_truth")) else {
            return Err(Error::Invalid(format!(
                "{}: {} has no ground_truth in {}",
                q.origin,
                q.key,
                path.display()
            )));
        };
        let ok = pred.as_deref().is_some_and(|p| match gt {
            Value::Array(a) => a.iter().any(|g| g.as_str() == Some(p)),
            g => g.as_str() == Some(p),
        });
        right += usize::from(ok);
        let parts: Vec<&str> = q.key.split('_').collect();
        let subject = if parts.len() > 2 {
            parts[1..parts.len() - 1].join("_")
        } else {
            "unknown".into()
        };
        let t = per.entry(subject).or_default();
        t.0 += 1;
        t.1 += usize::from(ok);
        output.insert(q.key.clone(), Value::from(pred.unwrap_or_default()));
    }
    write_json(
        &ctx.out_dir.join("mmmu_output.json"),
        &Value::Object(output),
    )?;
    let per: BTreeMap<String, Value> = per
        .into_iter()
        .map(|(c, (n, ok))| (c, json!({ "n": n, "accuracy": ratio(ok, n) })))
        .collect();
    let n = ctx.questions.len();
    Ok(json!({ "n": n, "accuracy": ratio(right, n), "per_subject": per, "unparsed": unparsed }))
}

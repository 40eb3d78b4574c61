//! Yes/no and open-answer benchmarks: POPE, MME, GQA, TextVQA scored here; VQAv2 and MM-Vet
//! only turned into their submission / judge files (their scoring is server-side or done by a
//! GPT-4 judge).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::questions::{id_text, read_json_value, read_text, ImageSource, Question};
use crate::eval::benchmarks::{
    evalai_normalize, read_pope, score_mme, score_pope_by_category, textvqa_accuracy, MmeItem,
    PopeItem,
};
use crate::{Error, Result};

/// What a scorer gets: the answered questions and their answers' texts, aligned.
pub struct Ctx<'a> {
    pub eval_dir: PathBuf,
    pub out_dir: PathBuf,
    pub questions: &'a [Question],
    pub texts: &'a [String],
}

pub(super) fn write_json(path: &Path, v: &Value) -> Result<()> {
    crate::io::write_json(path, v)
}

fn file_name(q: &Question) -> String {
    match &q.image {
        Some(ImageSource::File(p)) => p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        _ => String::new(),
    }
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = xs.collect();
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// POPE (LLaVA's `eval_pope.py`): labels come from `pope/coco/coco_pope_<category>.json`.
/// Upstream pairs a category's answers with that file's lines by position; here each question
/// is paired with the line about the same image asking its first line's question, which is the
/// same pairing on the released files and stays right when bad lines were skipped or `limit`
/// cut the run. Accuracy, precision, recall, F1 and yes-ratio per category, and their mean over
/// categories.
pub fn pope(ctx: &Ctx) -> Result<Value> {
    type Labels = HashMap<(String, String), bool>;
    let mut labels: HashMap<String, Labels> = HashMap::new();
    let mut items = Vec::new();
    for q in ctx.questions {
        let Some(cat) = q.category.clone() else {
            return Err(Error::Invalid(format!(
                "{}: a POPE question needs a `category` (its label file is coco_pope_<category>.json)",
                q.origin
            )));
        };
        if !labels.contains_key(&cat) {
            let path = ctx
                .eval_dir
                .join("pope/coco")
                .join(format!("coco_pope_{cat}.json"));
            if !path.is_file() {
                return Err(Error::NotFound(format!(
                    "POPE label file {} does not exist",
                    path.display()
                )));
            }
            let file = read_pope(&path)?
                .into_iter()
                .map(|l| ((l.image, l.question), l.label))
                .collect();
            labels.insert(cat.clone(), file);
        }
        let image = file_name(q);
        let asked = q.text.lines().next().unwrap_or_default().trim().to_string();
        let Some(&label) = labels[&cat].get(&(image.clone(), asked.clone())) else {
            return Err(Error::Invalid(format!(
                "{}: coco_pope_{cat}.json has no line about {image} asking {asked:?}",
                q.origin
            )));
        };
        items.push(PopeItem {
            question_id: q.key.clone(),
            image,
            question: q.text.clone(),
            label,
            category: Some(cat),
        });
    }
    let per = score_pope_by_category(&items, ctx.texts)?;
    let avg = |f: fn(&crate::eval::benchmarks::PopeScore) -> f64| mean(per.values().map(f));
    Ok(json!({
        "n": items.len(),
        "categories": per,
        "average": {
            "accuracy": avg(|s| s.accuracy),
            "precision": avg(|s| s.precision),
            "recall": avg(|s| s.recall),
            "f1": avg(|s| s.f1),
            "yes_ratio": avg(|s| s.yes_ratio),
        },
    }))
}

/// The MME ground truth of one category: `(file, question) -> answer`, from
/// `<category>/questions_answers_YN/*.txt` when the category has an `images` folder, else from
/// `<category>/*.txt` (the release's two layouts).
fn mme_truth(root: &Path, cat: &str) -> Result<HashMap<(String, String), String>> {
    let dir = root.join(cat);
    let qa = if dir.join("images").is_dir() {
        dir.join("questions_answers_YN")
    } else {
        dir.clone()
    };
    let entries = std::fs::read_dir(&qa).map_err(|e| Error::io(&qa, e))?;
    let mut out = HashMap::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "txt") {
            continue;
        }
        let file = e.file_name().to_string_lossy().into_owned();
        for (i, line) in read_text(&path)?.lines().enumerate() {
            let Some((q, a)) = line.trim().split_once('\t') else {
                return Err(Error::BadRecords {
                    path: path.clone(),
                    count: 1,
                    summary: format!("line {}: expected question<TAB>answer", i + 1),
                });
            };
            out.insert((file.clone(), q.to_string()), a.to_string());
        }
    }
    Ok(out)
}

/// MME (the release's `convert_answer_to_mme.py`, then `eval_tool/calculation.py`): the
/// question id `<category>/<image>` names the ground-truth file `<image stem>.txt`; the prompt
/// loses LLaVA's short-answer suffix and gets " Please answer yes or no." when it lacks it;
/// `results/<category>.txt` holds `file, question, answer, prediction` lines; scores per
/// category and the perception / cognition totals.
pub fn mme(ctx: &Ctx) -> Result<Value> {
    const SHORT: &str = "Answer the question using a single word or phrase.";
    const YES_NO: &str = "Please answer yes or no.";
    let root = ctx.eval_dir.join("MME/MME_Benchmark_release_version");
    let mut truth: HashMap<String, HashMap<(String, String), String>> = HashMap::new();
    let mut results: BTreeMap<String, String> = BTreeMap::new();
    let mut items = Vec::new();
    for (q, text) in ctx.questions.iter().zip(ctx.texts) {
        let id = &q.key;
        let cat = id.split('/').next().unwrap_or_default().to_string();
        let stem = id.rsplit('/').next().unwrap_or_default();
        let stem = stem.split('.').next().unwrap_or_default();
        let file = format!("{stem}.txt");
        if !truth.contains_key(&cat) {
            truth.insert(cat.clone(), mme_truth(&root, &cat)?);
        }
        let gt = &truth[&cat];
        let mut prompt = q.text.replace(SHORT, "").trim().to_string();
        if !prompt.contains(YES_NO) {
            prompt = format!("{prompt} {YES_NO}");
            if !gt.contains_key(&(file.clone(), prompt.clone())) {
                prompt = prompt.replace(&format!(" {YES_NO}"), &format!("  {YES_NO}"));
            }
        }
        let Some(answer) = gt.get(&(file.clone(), prompt.clone())) else {
            return Err(Error::Invalid(format!(
                "{}: no ground truth for {prompt:?} in {cat}/{file} under {}",
                q.origin,
                root.display()
            )));
        };
        let yes = match answer.trim().to_lowercase().as_str() {
            "yes" => true,
            "no" => false,
            other => {
                return Err(Error::Invalid(format!(
                    "MME {cat}/{file}: answer {other:?} is not yes/no"
                )))
            }
        };
        let flat = text.replace(['\t', '\n'], " ");
        results
            .entry(cat.clone())
            .or_default()
            .push_str(&format!("{file}\t{prompt}\t{answer}\t{flat}\n"));
        items.push(MmeItem {
            category: cat,
            image: file,
            question: prompt,
            answer: yes,
            prediction: Some(text.clone()),
        });
    }
    for (cat, text) in &results {
        let path = ctx.out_dir.join("results").join(format!("{cat}.txt"));
        crate::io::write_atomic(&path, text.as_bytes())?;
    }
    let score = score_mme(&items, ctx.texts)?;
    Ok(json!({
        "n": items.len(),
        "perception": score.perception,
        "cognition": score.cognition,
        "total": score.total,
        "categories": score.categories,
    }))
}

/// GQA (LLaVA's `convert_gqa_for_eval.py`, then GQA's `eval.py`): the prediction is the answer
/// with trailing periods removed, lower-cased, written to `testdev_balanced_predictions.json`;
/// accuracy is exact match with `gqa/data/testdev_balanced_questions.json`'s `answer`, also
/// split into binary and open questions by `types.structural` (`query` is open) when given.
pub fn gqa(ctx: &Ctx) -> Result<Value> {
    let path = ctx
        .eval_dir
        .join("gqa/data/testdev_balanced_questions.json");
    let truth = read_json_value(&path)?;
    let mut preds = Vec::new();
    let (mut right, mut groups) = (0usize, BTreeMap::<String, (usize, usize)>::new());
    for (q, text) in ctx.questions.iter().zip(ctx.texts) {
        let prediction = text.trim_end_matches('.').to_lowercase();
        let Some(entry) = truth.get(&q.key) else {
            return Err(Error::Invalid(format!(
                "{}: question {} is not in {}",
                q.origin,
                q.key,
                path.display()
            )));
        };
        let answer = entry.get("answer").and_then(Value::as_str).unwrap_or("");
        let ok = prediction == answer;
        right += usize::from(ok);
        if let Some(s) = entry.pointer("/types/structural").and_then(Value::as_str) {
            let g = if s == "query" { "open" } else { "binary" };
            let t = groups.entry(g.into()).or_default();
            t.0 += 1;
            t.1 += usize::from(ok);
        }
        preds.push(json!({ "questionId": q.question_id, "prediction": prediction }));
    }
    write_json(
        &ctx.out_dir.join("testdev_balanced_predictions.json"),
        &Value::from(preds),
    )?;
    let n = ctx.questions.len();
    let mut out = json!({ "n": n, "accuracy": ratio(right, n) });
    for (g, (count, ok)) in groups {
        out[g] = json!({ "n": count, "accuracy": ratio(ok, count) });
    }
    Ok(out)
}

pub(super) fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// The question part of a TextVQA prompt, lower-cased, as LLaVA's `eval_textvqa.py` finds it:
/// after `Question:` in the `OCR tokens:` form; else the line that is not the
/// `Reference OCR token:` one of three lines; else the first of two lines.
fn textvqa_question(prompt: &str) -> Option<String> {
    let lines: Vec<&str> = prompt.split('\n').collect();
    let q = if let Some(rest) = prompt.strip_prefix("OCR tokens: ") {
        let start = rest.find("Question: ")? + "Question: ".len();
        let len = rest[start..].find(" Short answer:")?;
        rest[start..start + len].to_string()
    } else if prompt.contains("Reference OCR token: ") && lines.len() == 3 {
        if prompt.starts_with("Reference OCR token:") {
            lines[1].to_string()
        } else {
            lines[0].to_string()
        }
    } else if lines.len() == 2 {
        lines[0].to_string()
    } else {
        return None;
    };
    Some(q.to_lowercase())
}

/// TextVQA (LLaVA's `eval_textvqa.py` with `m4c_evaluator.py`): each answer is matched to
/// `TextVQA_0.5.1_val.json` by image id (LLaVA's question id) and question text, and scored by
/// [`textvqa_accuracy`] against its 10 answers.
pub fn textvqa(ctx: &Ctx) -> Result<Value> {
    let path = ctx.eval_dir.join("textvqa/TextVQA_0.5.1_val.json");
    let data = read_json_value(&path)?;
    let mut truth: HashMap<(String, String), Vec<String>> = HashMap::new();
    for a in data
        .get("data")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(img), Some(q)) = (
            a.get("image_id").and_then(id_text),
            a.get("question").and_then(Value::as_str),
        ) else {
            continue;
        };
        let answers = a
            .get("answers")
            .and_then(Value::as_array)
            .map(|v| {
                v.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        truth.insert((img, q.to_lowercase()), answers);
    }
    let mut scores = Vec::new();
    for (q, text) in ctx.questions.iter().zip(ctx.texts) {
        let Some(question) = textvqa_question(&q.text) else {
            return Err(Error::Invalid(format!(
                "{}: cannot find the question in the prompt {:?}",
                q.origin, q.text
            )));
        };
        let Some(answers) = truth.get(&(q.key.clone(), question.clone())) else {
            return Err(Error::Invalid(format!(
                "{}: no annotation for image {} and question {question:?} in {}",
                q.origin,
                q.key,
                path.display()
            )));
        };
        scores.push(textvqa_accuracy(text, answers));
    }
    Ok(json!({ "n": scores.len(), "accuracy": mean(scores.into_iter()) }))
}

/// VQAv2 test-dev (LLaVA's `convert_vqav2_for_submission.py`): `answers_upload.json` lists
/// every question of `vqav2/llava_vqav2_mscoco_test2015.jsonl` (when present, else the asked
/// ones) with the answer through [`evalai_normalize`], `""` where unanswered. Scored by the
/// EvalAI server, not here.
pub fn vqav2(ctx: &Ctx) -> Result<Value> {
    let answered: HashMap<&str, &str> = ctx
        .questions
        .iter()
        .zip(ctx.texts)
        .map(|(q, t)| (q.key.as_str(), t.as_str()))
        .collect();
    let full = ctx.eval_dir.join("vqav2/llava_vqav2_mscoco_test2015.jsonl");
    let ids: Vec<Value> = if full.is_file() {
        read_text(&full)?
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .and_then(|v| v.get("question_id").cloned())
                    .ok_or_else(|| Error::BadRecords {
                        path: full.clone(),
                        count: 1,
                        summary: format!("line {}: needs question_id", i + 1),
                    })
            })
            .collect::<Result<_>>()?
    } else {
        ctx.questions
            .iter()
            .map(|q| q.question_id.clone())
            .collect()
    };
    let upload: Vec<Value> = ids
        .iter()
        .map(|id| {
            let key = id_text(id).unwrap_or_default();
            let answer = answered
                .get(key.as_str())
                .map_or(String::new(), |t| evalai_normalize(t));
            json!({ "question_id": id, "answer": answer })
        })
        .collect();
    let path = ctx.out_dir.join("answers_upload.json");
    write_json(&path, &Value::from(upload))?;
    Ok(json!({
        "n": ctx.questions.len(),
        "submission": path,
        "submitted": ids.len(),
        "scoring": "server-side: upload answers_upload.json to the VQAv2 challenge on EvalAI",
    }))
}

/// MM-Vet (LLaVA's `convert_mmvet_for_eval.py`): `results.json` maps `v1_<question_id>` to the
/// answer, the input of MM-Vet's GPT-4 grader. Judged by a model, not here.
pub fn mmvet(ctx: &Ctx) -> Result<Value> {
    let map: serde_json::Map<String, Value> = ctx
        .questions
        .iter()
        .zip(ctx.texts)
        .map(|(q, t)| (format!("v1_{}", q.key), Value::from(t.clone())))
        .collect();
    let path = ctx.out_dir.join("results.json");
    write_json(&path, &Value::Object(map))?;
    Ok(json!({
        "n": ctx.questions.len(),
        "results": path,
        "scoring": "GPT-4 judged: run MM-Vet's grader (mm-vet_evaluator) on results.json",
    }))
}

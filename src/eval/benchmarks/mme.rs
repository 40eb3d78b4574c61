//! MME.

use super::*;

/// MME's perception categories (their scores sum to the perception score, max 2000).
pub const MME_PERCEPTION: &[&str] = &[
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
];

/// MME's cognition categories (max 800).
pub const MME_COGNITION: &[&str] = &[
    "commonsense_reasoning",
    "numerical_calculation",
    "text_translation",
    "code_reasoning",
];

/// One MME question. Each image is asked two questions, one answered "yes", one "no".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmeItem {
    pub category: String,
    pub image: String,
    pub question: String,
    /// `true` for "yes".
    pub answer: bool,
    /// The model's answer when the file holds one (the official results layout does).
    #[serde(default)]
    pub prediction: Option<String>,
}

/// Read MME from the official evaluation tool's layout: a folder of `<category>.txt` files, one
/// question per line, tab-separated `image, question, answer[, prediction]`. Categories come in
/// file-name order.
pub fn read_mme_results_dir(dir: &Path) -> Result<Vec<MmeItem>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::NotFound(format!(
            "no MME <category>.txt files in {}",
            dir.display()
        )));
    }
    let mut out = Vec::new();
    for path in files {
        let category = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let mut bad = BadLines::new(&path);
        let mut items = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let cols: Vec<&str> = line.split('\t').collect();
            let answer = cols.get(2).and_then(|a| yes_no(a));
            match (cols.len(), answer) {
                (3 | 4, Some(answer)) => items.push(MmeItem {
                    category: category.clone(),
                    image: cols[0].to_string(),
                    question: cols[1].to_string(),
                    answer,
                    prediction: cols.get(3).map(|p| p.to_string()),
                }),
                _ => bad.push(
                    i + 1,
                    "expected image<TAB>question<TAB>yes|no[<TAB>prediction]",
                ),
            }
        }
        out.extend(bad.finish(items)?);
    }
    Ok(out)
}

/// Read MME from JSON lines: `category`, `image`, `question`, `answer` (yes/no), optional
/// `prediction`.
pub fn read_mme_jsonl(path: &Path) -> Result<Vec<MmeItem>> {
    let rows = read_jsonl(path)?;
    let mut bad = BadLines::new(path);
    let mut out = Vec::with_capacity(rows.len());
    for (line, row) in rows {
        let answer = str_field(&row, &["answer", "label"]).and_then(|a| yes_no(&a));
        let (Some(category), Some(image), Some(question), Some(answer)) = (
            str_field(&row, &["category"]),
            str_field(&row, &["image"]),
            str_field(&row, &["question", "text"]),
            answer,
        ) else {
            bad.push(line, "needs category, image, question and answer yes/no");
            continue;
        };
        out.push(MmeItem {
            category,
            image,
            question,
            answer,
            prediction: str_field(&row, &["prediction"]),
        });
    }
    bad.finish(out)
}

/// MME's reading of an answer: lower-cased; exactly "yes" or "no", else "yes" or "no" found in
/// the first four characters ("yes" tested first; "not sure" reads as "no", as upstream's
/// does); else neither (`None`, always wrong).
pub fn mme_parse_answer(text: &str) -> Option<bool> {
    let lower = text.trim_end_matches(['\n', '\r']).to_lowercase();
    match lower.as_str() {
        "yes" => return Some(true),
        "no" => return Some(false),
        _ => {}
    }
    let prefix: String = lower.chars().take(4).collect();
    if prefix.contains("yes") {
        Some(true)
    } else if prefix.contains("no") {
        Some(false)
    } else {
        None
    }
}

/// MME metrics of one category.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmeCategoryScore {
    pub category: String,
    pub images: usize,
    pub questions: usize,
    /// Share of questions answered right.
    pub acc: f64,
    /// Share of images whose questions are all answered right.
    pub acc_plus: f64,
    /// `100 * (acc + acc_plus)`, at most 200.
    pub score: f64,
    /// Answers read as neither yes nor no.
    pub other: usize,
}

/// The outcome of [`score_mme`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmeScore {
    pub categories: Vec<MmeCategoryScore>,
    /// Sum of the [`MME_PERCEPTION`] category scores present.
    pub perception: f64,
    /// Sum of the [`MME_COGNITION`] category scores present.
    pub cognition: f64,
    /// Sum of every category's score (categories outside both lists included).
    pub total: f64,
}

/// Score MME answers (`predictions[i]` answers `items[i]`). Questions are grouped per category,
/// then per image in order of first appearance; upstream pairs consecutive lines, which is the
/// same on MME's files, where an image's two questions are adjacent. Accuracy+ counts an image
/// when all its questions are right (both, on MME).
pub fn score_mme<S: AsRef<str>>(items: &[MmeItem], predictions: &[S]) -> Result<MmeScore> {
    check_aligned("MME", items.len(), predictions.len())?;
    /// One image's questions in a category and how many were answered right.
    struct ImageTally {
        image: String,
        questions: usize,
        right: usize,
    }
    /// A category's images in order of first appearance, and its answers that parse as neither
    /// yes nor no.
    struct CategoryTally {
        category: String,
        images: Vec<ImageTally>,
        other: usize,
    }
    let mut cats: Vec<CategoryTally> = Vec::new();
    for (item, pred) in items.iter().zip(predictions) {
        let parsed = mme_parse_answer(pred.as_ref());
        let ci = match cats.iter().position(|c| c.category == item.category) {
            Some(i) => i,
            None => {
                cats.push(CategoryTally {
                    category: item.category.clone(),
                    images: Vec::new(),
                    other: 0,
                });
                cats.len() - 1
            }
        };
        let cat = &mut cats[ci];
        cat.other += usize::from(parsed.is_none());
        let ii = match cat.images.iter().position(|im| im.image == item.image) {
            Some(i) => i,
            None => {
                cat.images.push(ImageTally {
                    image: item.image.clone(),
                    questions: 0,
                    right: 0,
                });
                cat.images.len() - 1
            }
        };
        cat.images[ii].questions += 1;
        cat.images[ii].right += usize::from(parsed == Some(item.answer));
    }
    let categories: Vec<MmeCategoryScore> = cats
        .into_iter()
        .map(
            |CategoryTally {
                 category,
                 images,
                 other,
             }| {
                let questions: usize = images.iter().map(|i| i.questions).sum();
                let right: usize = images.iter().map(|i| i.right).sum();
                let all_right = images.iter().filter(|i| i.questions == i.right).count();
                let acc = ratio(right, questions);
                let acc_plus = ratio(all_right, images.len());
                MmeCategoryScore {
                    category,
                    images: images.len(),
                    questions,
                    acc,
                    acc_plus,
                    score: 100.0 * (acc + acc_plus),
                    other,
                }
            },
        )
        .collect();
    let sum_of = |names: &[&str]| -> f64 {
        categories
            .iter()
            .filter(|c| names.contains(&c.category.as_str()))
            .map(|c| c.score)
            .sum()
    };
    Ok(MmeScore {
        perception: sum_of(MME_PERCEPTION),
        cognition: sum_of(MME_COGNITION),
        total: categories.iter().map(|c| c.score).sum(),
        categories,
    })
}

/// The predictions stored in MME items (the official results layout), in item order; an error
/// names the first item without one.
pub fn mme_stored_predictions(items: &[MmeItem]) -> Result<Vec<String>> {
    items
        .iter()
        .map(|it| {
            it.prediction.clone().ok_or_else(|| {
                Error::Invalid(format!(
                    "MME item {} / {} ({:?}) has no prediction",
                    it.category, it.image, it.question
                ))
            })
        })
        .collect()
}

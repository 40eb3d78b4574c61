//! Questions about a scene and their answers, question types dealt in exact proportions, and
//! the records of one split.

use super::*;

/// A question of type `qtype` about `scene`, and its answer. `yes` picks the answer of an
/// `Exists` question (the caller alternates it so yes and no are balanced exactly); a "no" never
/// names a shape and colour that `avoid` holds out.
pub(super) fn make_question(
    cfg: &WorldConfig,
    scene: &Scene,
    qtype: QuestionType,
    yes: bool,
    avoid: Option<&Holdout>,
    rng: &mut SplitMix64,
) -> (String, String) {
    let objs = &scene.objects;
    let pos = |o: &SceneObject| position_name(o.row, o.col, cfg.grid);
    let unique = |f: &dyn Fn(&SceneObject) -> bool| objs.iter().filter(|o| f(o)).count() == 1;
    match qtype {
        QuestionType::Color => {
            let by_shape: Vec<&SceneObject> = objs
                .iter()
                .filter(|o| unique(&|p| p.shape == o.shape))
                .collect();
            if rng.coin() && !by_shape.is_empty() {
                let o = rng.choose(&by_shape);
                (
                    format!("What color is the {}?", o.shape.name()),
                    o.color.name().into(),
                )
            } else {
                let o = rng.choose(objs);
                (
                    format!("What color is the object at the {}?", pos(o)),
                    o.color.name().into(),
                )
            }
        }
        QuestionType::Shape => {
            let by_color: Vec<&SceneObject> = objs
                .iter()
                .filter(|o| unique(&|p| p.color == o.color))
                .collect();
            if rng.coin() && !by_color.is_empty() {
                let o = rng.choose(&by_color);
                (
                    format!("What shape is the {} object?", o.color.name()),
                    o.shape.name().into(),
                )
            } else {
                let o = rng.choose(objs);
                (
                    format!("What shape is the object at the {}?", pos(o)),
                    o.shape.name().into(),
                )
            }
        }
        QuestionType::Count => match rng.below(4) {
            0 | 1 => (
                "How many objects are there?".into(),
                number_word(objs.len()),
            ),
            2 => {
                let s = *rng.choose(&cfg.shapes);
                let n = objs.iter().filter(|o| o.shape == s).count();
                (
                    format!("How many {} are there?", s.plural()),
                    number_word(n),
                )
            }
            _ => {
                let c = *rng.choose(&cfg.colors);
                let n = objs.iter().filter(|o| o.color == c).count();
                (
                    format!("How many {} objects are there?", c.name()),
                    number_word(n),
                )
            }
        },
        QuestionType::Position => {
            let o = rng.choose(objs);
            (
                format!("Where is the {} {}?", o.color.name(), o.shape.name()),
                pos(o),
            )
        }
        QuestionType::Exists => {
            let present: HashSet<(Shape, Color)> =
                objs.iter().map(|o| (o.shape, o.color)).collect();
            let (shape, color) = if yes {
                let o = rng.choose(objs);
                (o.shape, o.color)
            } else {
                absent_pair(cfg, objs, &present, avoid, rng)
            };
            let answer = if yes { "yes" } else { "no" };
            (
                format!(
                    "Is there {} {} {}?",
                    article(color.name()),
                    color.name(),
                    shape.name()
                ),
                answer.into(),
            )
        }
        QuestionType::Describe => (
            "Describe the image in one sentence.".into(),
            describe_scene(scene, cfg.grid),
        ),
    }
}

/// A colour/shape pair not in the image (nor held out by `avoid`). Two times out of three a near
/// miss (an object's shape in another colour, or its colour on another shape), so that "no"
/// needs colour and shape bound together rather than either alone.
fn absent_pair(
    cfg: &WorldConfig,
    objs: &[SceneObject],
    present: &HashSet<(Shape, Color)>,
    avoid: Option<&Holdout>,
    rng: &mut SplitMix64,
) -> (Shape, Color) {
    let allowed = |&(s, c): &(Shape, Color)| {
        !present.contains(&(s, c)) && !avoid.is_some_and(|h| h.holds_out_pair(s, c))
    };
    let mut candidates: Vec<(Shape, Color)> = Vec::new();
    if rng.below(3) < 2 {
        let o = rng.choose(objs);
        candidates.extend(cfg.colors.iter().map(|&c| (o.shape, c)));
        candidates.extend(cfg.shapes.iter().map(|&s| (s, o.color)));
        candidates.retain(allowed);
    }
    if candidates.is_empty() {
        for &s in &cfg.shapes {
            for &c in &cfg.colors {
                if allowed(&(s, c)) {
                    candidates.push((s, c));
                }
            }
        }
    }
    // Non-empty: validate() guarantees more (seen) colour/shape pairs than objects.
    *rng.choose(&candidates)
}

/// The question types of a split, in exact proportion to the mix (largest remainders), in a
/// seeded random order.
pub(super) fn deal_question_types(
    cfg: &WorldConfig,
    n: usize,
    rng: &mut SplitMix64,
) -> Vec<QuestionType> {
    let weights: Vec<f64> = QuestionType::ALL
        .iter()
        .map(|&t| cfg.question_mix.weight(t))
        .collect();
    let total: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights.iter().map(|w| w / total * n as f64).collect();
    let mut counts: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut order: Vec<usize> = (0..counts.len()).collect();
    // Largest fractional part first; ties to the earlier type.
    order.sort_by(|&a, &b| {
        let (fa, fb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
        fb.partial_cmp(&fa)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    let mut missing = n - counts.iter().sum::<usize>();
    for &i in &order {
        if missing == 0 {
            break;
        }
        if weights[i] > 0.0 {
            counts[i] += 1;
            missing -= 1;
        }
    }
    let mut types: Vec<QuestionType> = QuestionType::ALL
        .iter()
        .zip(&counts)
        .flat_map(|(&t, &c)| std::iter::repeat_n(t, c))
        .collect();
    rng.shuffle(&mut types);
    types
}

/// Make the records of one split. `first_image` numbers its images after the previous splits'.
pub(super) fn make_split(
    cfg: &WorldConfig,
    split_id: u64,
    n: usize,
    first_image: usize,
) -> Vec<(WorldRecord, Scene)> {
    let mut deal_rng = SplitMix64::new(derive_seed(cfg.seed, &[split_id, u64::MAX]));
    let types = deal_question_types(cfg, n, &mut deal_rng);
    let mut exists_seen = 0usize;
    types
        .into_iter()
        .enumerate()
        .map(|(i, qtype)| {
            let mut rng = SplitMix64::new(derive_seed(cfg.seed, &[split_id, i as u64]));
            let scene = make_scene(cfg, &mut rng);
            let yes = if qtype == QuestionType::Exists {
                exists_seen += 1;
                exists_seen % 2 == 1
            } else {
                false
            };
            let (question, answer) = make_question(cfg, &scene, qtype, yes, None, &mut rng);
            let record = world_record(
                split_id,
                i,
                first_image + i,
                qtype,
                question,
                answer,
                &scene,
                None,
            );
            (record, scene)
        })
        .collect()
}

/// Record `i` of split `split_id`, whose image is number `image`.
#[allow(clippy::too_many_arguments)]
pub(super) fn world_record(
    split_id: u64,
    i: usize,
    image: usize,
    qtype: QuestionType,
    question: String,
    answer: String,
    scene: &Scene,
    composition: Option<Composition>,
) -> WorldRecord {
    WorldRecord {
        id: format!("{}-{i:06}", SPLITS[split_id as usize]),
        image: format!("images/{image:06}.png"),
        conversations: vec![
            Message {
                from: "human".into(),
                value: format!("{IMAGE_MARKER}\n{question}"),
            },
            Message {
                from: "gpt".into(),
                value: answer,
            },
        ],
        question_type: qtype,
        scene: scene.clone(),
        composition,
    }
}

//! Held-out compositions: (shape, colour) and (shape, cell) pairs that no training scene shows,
//! so that the world's evaluation separates what a model learnt as a rule from what it saw.
//!
//! Without a hold-out the world is small enough that most test scenes repeat a training layout
//! (1,237 of the teacher world's 2,000 test scenes, 685 with the same question too: see
//! [`world_overlap`]). With one ([`WorldConfig::holdout`]):
//!
//! * train shows only scenes without a held-out composition ("seen");
//! * val and test mix seen scenes and scenes with at least one held-out composition ("unseen")
//!   in a stated proportion ([`Holdout::unseen_fraction`]), each record tagged, each group with
//!   the exact question-type mix and the same object-count distribution as train;
//! * no train record repeats a val or test record (same objects in the same cells, same question);
//! * a "no" to an `exists` question in a seen record never names a held-out shape and colour, so
//!   the phrase of an unseen object is not taught as "absent".

use super::*;

/// Whether a record's scene shows only compositions seen in training, or at least one held out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Composition {
    Seen,
    Unseen,
}

impl Composition {
    /// The name used in the records' `composition` field and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Composition::Seen => "seen",
            Composition::Unseen => "unseen",
        }
    }
}

/// A shape never drawn in this colour in training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapeColor {
    pub shape: Shape,
    pub color: Color,
}

/// A shape never drawn in this grid cell in training (`row`, `col` from 0 at the top left).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapeCell {
    pub shape: Shape,
    pub row: u32,
    pub col: u32,
}

/// The compositions a world holds out of training (see the module doc).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Holdout {
    pub shape_color: Vec<ShapeColor>,
    pub shape_cell: Vec<ShapeCell>,
    /// Share of the val and test records whose scene is unseen (rounded to whole records per split).
    pub unseen_fraction: f64,
}

/// How many scenes (and questions) a record may draw before generation gives up: far above what
/// any valid config needs (a seen three-object scene of the teacher world takes ~2.5 draws).
const MAX_DRAWS: usize = 100_000;

impl Holdout {
    /// The rule of the teacher's world, for any world: shape `i` (in `shapes` order) loses the
    /// colour `colors[len - 1 - i]` (counting from the end, wrapping) and the corner cell `i`
    /// of bottom right, bottom left, top right, top left (wrapping). So every shape loses one
    /// colour and one corner, no two shapes the same colour or corner (with up to as many shapes
    /// as colours and four shapes), and every shape, colour and cell still appears in training.
    pub fn one_colour_one_corner(
        shapes: &[Shape],
        colors: &[Color],
        grid: u32,
        unseen_fraction: f64,
    ) -> Self {
        let last = grid.saturating_sub(1);
        let corners = [(last, last), (last, 0), (0, last), (0, 0)];
        let nc = colors.len();
        Self {
            shape_color: shapes
                .iter()
                .enumerate()
                .filter(|_| nc > 0)
                .map(|(i, &shape)| ShapeColor {
                    shape,
                    color: colors[(nc - 1) - i % nc],
                })
                .collect(),
            shape_cell: shapes
                .iter()
                .enumerate()
                .map(|(i, &shape)| {
                    let (row, col) = corners[i % corners.len()];
                    ShapeCell { shape, row, col }
                })
                .collect(),
            unseen_fraction,
        }
    }

    /// Whether training never shows `shape` in `color`.
    pub fn holds_out_pair(&self, shape: Shape, color: Color) -> bool {
        self.shape_color
            .iter()
            .any(|p| p.shape == shape && p.color == color)
    }

    /// Whether training never shows `shape` in the cell (`row`, `col`).
    pub fn holds_out_cell(&self, shape: Shape, row: u32, col: u32) -> bool {
        self.shape_cell
            .iter()
            .any(|p| p.shape == shape && p.row == row && p.col == col)
    }

    /// Whether training never shows this object.
    pub fn holds_out(&self, o: &SceneObject) -> bool {
        self.holds_out_pair(o.shape, o.color) || self.holds_out_cell(o.shape, o.row, o.col)
    }

    /// Unseen when any object of the scene is held out.
    pub fn composition(&self, scene: &Scene) -> Composition {
        if scene.objects.iter().any(|o| self.holds_out(o)) {
            Composition::Unseen
        } else {
            Composition::Seen
        }
    }

    /// Reject a hold-out that names what the world does not draw, leaves a shape, colour or cell
    /// out of training, or makes some scene or question impossible to draw (the message names the
    /// composition at fault).
    pub(super) fn validate(&self, cfg: &WorldConfig) -> std::result::Result<(), String> {
        if !(0.0..=1.0).contains(&self.unseen_fraction) {
            return Err(format!(
                "holdout.unseen_fraction must be in 0..=1, got {}",
                self.unseen_fraction
            ));
        }
        for p in &self.shape_color {
            if !cfg.shapes.contains(&p.shape) || !cfg.colors.contains(&p.color) {
                return Err(format!(
                    "holdout.shape_color names {} {}, which the world does not draw",
                    p.color.name(),
                    p.shape.name()
                ));
            }
        }
        for p in &self.shape_cell {
            if !cfg.shapes.contains(&p.shape) || p.row >= cfg.grid || p.col >= cfg.grid {
                return Err(format!(
                    "holdout.shape_cell names a {} at row {} column {}, outside the world's \
                     shapes or its {} x {} grid",
                    p.shape.name(),
                    p.row,
                    p.col,
                    cfg.grid,
                    cfg.grid
                ));
            }
        }
        if has_duplicates(&self.shape_color) || has_duplicates(&self.shape_cell) {
            return Err("holdout compositions must not repeat".into());
        }
        if self.unseen_fraction > 0.0 && self.shape_color.is_empty() && self.shape_cell.is_empty() {
            return Err(
                "holdout.unseen_fraction > 0 but no composition is held out: val and test \
                 could have no unseen scene"
                    .into(),
            );
        }
        for &s in &cfg.shapes {
            if cfg.colors.iter().all(|&c| self.holds_out_pair(s, c)) {
                return Err(format!("holdout takes every colour of the {}", s.name()));
            }
        }
        for &c in &cfg.colors {
            if cfg.shapes.iter().all(|&s| self.holds_out_pair(s, c)) {
                return Err(format!("holdout takes every shape in {}", c.name()));
            }
        }
        // Each cell must still take `max_objects` distinct seen (shape, colour) pairs, so that a
        // seen scene of every size exists (and rejection sampling ends).
        for row in 0..cfg.grid {
            for col in 0..cfg.grid {
                let seen = cfg
                    .shapes
                    .iter()
                    .filter(|&&s| !self.holds_out_cell(s, row, col))
                    .flat_map(|&s| cfg.colors.iter().map(move |&c| (s, c)))
                    .filter(|&(s, c)| !self.holds_out_pair(s, c))
                    .count();
                if seen < cfg.max_objects {
                    return Err(format!(
                        "holdout leaves {seen} seen shape/colour pairs at {} (row {row} column \
                         {col}); training scenes need {}",
                        position_name(row, col, cfg.grid),
                        cfg.max_objects
                    ));
                }
            }
        }
        let seen_pairs = cfg.shapes.len() * cfg.colors.len()
            - cfg
                .shapes
                .iter()
                .flat_map(|&s| cfg.colors.iter().map(move |&c| (s, c)))
                .filter(|&(s, c)| self.holds_out_pair(s, c))
                .count();
        if cfg.question_mix.exists > 0.0 && seen_pairs <= cfg.max_objects {
            return Err(format!(
                "holdout leaves {seen_pairs} seen shape/colour pairs: a seen `exists` question \
                 needs one absent from every image of {} objects",
                cfg.max_objects
            ));
        }
        Ok(())
    }
}

/// What a scene shows, without pixel offsets or sizes: (shape, colour, row, col) in reading order.
pub type Layout = Vec<(Shape, Color, u32, u32)>;

/// The layout of a scene.
pub fn layout(scene: &Scene) -> Layout {
    scene
        .objects
        .iter()
        .map(|o| (o.shape, o.color, o.row, o.col))
        .collect()
}

/// A scene's layout and the question asked about it: two records with the same key ask the same
/// thing about the same picture (up to a pixel of jitter and size) and have the same answer.
pub type SampleKey = (Layout, String);

/// The key of a generated record.
pub fn sample_key(record: &WorldRecord) -> SampleKey {
    (layout(&record.scene), record.question().to_string())
}

/// Records of one split of a world with a hold-out. Train (`split_id` 0) is all seen and leaves
/// out any sample whose key is in `exclude` (val's and test's); val and test deal seen and
/// unseen records in [`Holdout::unseen_fraction`], shuffled together so that the first records
/// of a split mix both.
pub(super) fn make_held_out_split(
    cfg: &WorldConfig,
    holdout: &Holdout,
    split_id: u64,
    n: usize,
    first_image: usize,
    exclude: &HashSet<SampleKey>,
) -> Result<Vec<(WorldRecord, Scene)>> {
    let n_unseen = if split_id == 0 {
        0
    } else {
        (n as f64 * holdout.unseen_fraction).round() as usize
    };
    let mut tags: Vec<Composition> = std::iter::repeat_n(Composition::Seen, n - n_unseen)
        .chain(std::iter::repeat_n(Composition::Unseen, n_unseen))
        .collect();
    SplitMix64::new(derive_seed(cfg.seed, &[split_id, u64::MAX - 1])).shuffle(&mut tags);
    // Each group gets the exact question mix and its own yes/no alternation.
    let mut groups: BTreeMap<Composition, (std::vec::IntoIter<QuestionType>, usize)> =
        BTreeMap::new();
    for (g, comp) in [Composition::Seen, Composition::Unseen]
        .into_iter()
        .enumerate()
    {
        let count = tags.iter().filter(|&&t| t == comp).count();
        let mut rng = SplitMix64::new(derive_seed(cfg.seed, &[split_id, u64::MAX, g as u64]));
        let types = deal_question_types(cfg, count, &mut rng);
        groups.insert(comp, (types.into_iter(), 0));
    }
    let split = SPLITS[split_id as usize];
    let mut out = Vec::with_capacity(n);
    for (i, &comp) in tags.iter().enumerate() {
        let (types, exists_seen) = groups.get_mut(&comp).expect("both groups dealt");
        let qtype = types.next().expect("one type dealt per record");
        let yes = if qtype == QuestionType::Exists {
            *exists_seen += 1;
            *exists_seen % 2 == 1
        } else {
            false
        };
        let avoid = (comp == Composition::Seen).then_some(holdout);
        let mut rng = SplitMix64::new(derive_seed(cfg.seed, &[split_id, i as u64]));
        // The object count is drawn once, so seen and unseen scenes share train's distribution of
        // it; the rest is drawn again until the scene is of the record's kind.
        let objects = draw_object_count(cfg, &mut rng);
        let mut drawn = None;
        for _ in 0..MAX_DRAWS {
            let scene = make_scene_of(cfg, objects, &mut rng);
            if holdout.composition(&scene) != comp {
                continue;
            }
            let (question, answer) = make_question(cfg, &scene, qtype, yes, avoid, &mut rng);
            if exclude.contains(&(layout(&scene), question.clone())) {
                continue;
            }
            drawn = Some((scene, question, answer));
            break;
        }
        let (scene, question, answer) = drawn.ok_or_else(|| {
            Error::Invalid(format!(
                "world config: record {i} of {split} found no {} scene of {objects} objects with \
                 a {} question outside val and test in {MAX_DRAWS} draws: hold out less or make \
                 val and test smaller",
                comp.name(),
                qtype.name()
            ))
        })?;
        let record = world_record(
            split_id,
            i,
            first_image + i,
            qtype,
            question,
            answer,
            &scene,
            Some(comp),
        );
        out.push((record, scene));
    }
    Ok(out)
}

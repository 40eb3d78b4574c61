//! How much of a world's val and test splits training already shows: scenes whose layout (the
//! same objects in the same cells) occurs in train, and samples whose layout and question both do.
//! Computed from the records alone, without drawing images.

use super::*;

/// Records of a group, and how many of them repeat training.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlapCounts {
    pub records: usize,
    /// Records whose scene layout occurs in train.
    pub layout_in_train: usize,
    /// Records whose layout and question both occur, in one train record.
    pub sample_in_train: usize,
}

impl OverlapCounts {
    fn add(&mut self, layout: bool, sample: bool) {
        self.records += 1;
        self.layout_in_train += usize::from(layout);
        self.sample_in_train += usize::from(sample);
    }
}

/// [`OverlapCounts`] of one split, overall and by composition (a world with a hold-out) and by
/// number of objects.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitOverlap {
    pub all: OverlapCounts,
    /// `seen` / `unseen` (empty without a hold-out).
    pub by_composition: BTreeMap<String, OverlapCounts>,
    pub by_objects: BTreeMap<usize, OverlapCounts>,
}

/// [`world_overlap`]'s answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorldOverlap {
    /// Distinct layouts among the train records.
    pub train_layouts: usize,
    pub val: SplitOverlap,
    pub test: SplitOverlap,
}

impl std::fmt::Display for WorldOverlap {
    /// `test: 1237/2000 layouts in train, 685 samples | seen ... | 1 object ...` per split.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let counts = |c: &OverlapCounts| {
            format!(
                "{}/{} layouts in train, {} samples",
                c.layout_in_train, c.records, c.sample_in_train
            )
        };
        write!(f, "{} distinct train layouts", self.train_layouts)?;
        for (name, split) in [("val", &self.val), ("test", &self.test)] {
            write!(f, "\n{name}: {}", counts(&split.all))?;
            for (comp, c) in &split.by_composition {
                write!(f, " | {comp} {}", counts(c))?;
            }
            for (objects, c) in &split.by_objects {
                write!(f, " | {objects} obj {}", counts(c))?;
            }
        }
        Ok(())
    }
}

/// Count, for the world of `cfg`, the val and test records that repeat a train scene layout or a
/// whole train sample (see the module doc). Deterministic: a function of `cfg`.
pub fn world_overlap(cfg: &WorldConfig) -> Result<WorldOverlap> {
    let splits = make_world_records(cfg)?;
    let train = &splits[0];
    let layouts: HashSet<Layout> = train.iter().map(|(_, s)| layout(s)).collect();
    let samples: HashSet<SampleKey> = train.iter().map(|(r, _)| sample_key(r)).collect();
    let measure = |records: &[(WorldRecord, Scene)]| {
        let mut out = SplitOverlap::default();
        for (record, scene) in records {
            let in_layouts = layouts.contains(&layout(scene));
            let in_samples = samples.contains(&sample_key(record));
            out.all.add(in_layouts, in_samples);
            if let Some(c) = record.composition {
                out.by_composition
                    .entry(c.name().to_string())
                    .or_default()
                    .add(in_layouts, in_samples);
            }
            out.by_objects
                .entry(scene.objects.len())
                .or_default()
                .add(in_layouts, in_samples);
        }
        out
    };
    Ok(WorldOverlap {
        train_layouts: layouts.len(),
        val: measure(&splits[1]),
        test: measure(&splits[2]),
    })
}

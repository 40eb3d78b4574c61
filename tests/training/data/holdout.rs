//! The synthetic world's held-out compositions: the overlap of test with train before and after
//! (the teacher's world), what train, val and test show, the seen/unseen tags and proportions,
//! determinism, configs without the field, and the hold-outs that validation rejects.

use std::collections::HashSet;

use matvlm::data::synthetic::{
    layout, make_world_records, sample_key, Composition, Holdout, QuestionType, Shape, ShapeCell,
    ShapeColor,
};
use matvlm::teacher::{teacher_holdout, teacher_world_config};

use super::*;

/// The numbers, reproduced, and what the hold-out leaves: in today's teacher world
/// without the hold-out, 1,237 of the 2,000 test scenes repeat a train layout and 685 a whole
/// train sample; with it, no val or test sample is in train and no unseen scene's layout is.
/// `cargo test --test training teacher_world_overlap -- --nocapture` prints both reports.
#[test]
fn teacher_world_overlap_before_and_after_the_holdout() {
    let before = world_overlap(&WorldConfig {
        holdout: None,
        ..teacher_world_config()
    })
    .unwrap();
    println!("without the hold-out:\n{before}");
    assert_eq!(before.test.all.records, 2000);
    assert_eq!(before.test.all.layout_in_train, 1237);
    assert_eq!(before.test.all.sample_in_train, 685);
    assert!(before.test.by_composition.is_empty());
    // One-object layouts are few: every one-object test scene repeats a train layout.
    let one = &before.test.by_objects[&1];
    assert_eq!(one.layout_in_train, one.records);

    let after = world_overlap(&teacher_world_config()).unwrap();
    println!("with the teacher's hold-out:\n{after}");
    for split in [&after.val, &after.test] {
        assert_eq!(split.all.sample_in_train, 0, "{after}");
        let unseen = &split.by_composition["unseen"];
        assert_eq!(unseen.layout_in_train, 0, "{after}");
        assert_eq!(unseen.records * 2, split.all.records, "half of it unseen");
    }
    // What is left: seen test scenes whose layout train shows (asked another question).
    assert_eq!(after.test.by_composition["seen"].layout_in_train, 691);
}

/// A small world with the teacher's hold-out.
fn held_out_world(seed: u64) -> WorldConfig {
    WorldConfig {
        seed,
        train: 600,
        val: 60,
        test: 120,
        vocab_size: 400,
        holdout: Some(teacher_holdout(&WorldConfig::default())),
        ..WorldConfig::default()
    }
}

fn is_held_out(h: &Holdout, r: &WorldRecord) -> bool {
    r.scene.objects.iter().any(|o| h.holds_out(o))
}

/// Train shows no held-out composition, in a scene or in an `exists` question, yet every shape,
/// colour and cell; val and test are half seen, half unseen, each half with the exact question
/// mix and a mix of object counts; no val or test sample is a train sample; tags are written and
/// read back; the same config gives the same records.
#[test]
fn held_out_compositions_stay_out_of_training() {
    let cfg = held_out_world(3);
    let h = cfg.holdout.clone().unwrap();
    assert_eq!(h.shape_color.len(), 4);
    assert_eq!(h.shape_cell.len(), 4);
    let dir = scratch("holdout");
    generate_world(&cfg, dir.path()).unwrap();
    let split = |s: &str| read_world_split(&dir.path().join(format!("{s}.json"))).unwrap();
    let (train, val, test) = (split("train"), split("val"), split("test"));

    let mut shapes = HashSet::new();
    let mut colors = HashSet::new();
    let mut cells = HashSet::new();
    for r in &train {
        assert_eq!(r.composition, Some(Composition::Seen), "{}", r.id);
        assert!(!is_held_out(&h, r), "{} shows a held-out object", r.id);
        for o in &r.scene.objects {
            shapes.insert(o.shape);
            colors.insert(o.color);
            cells.insert((o.row, o.col));
        }
        if r.question_type == QuestionType::Exists {
            let q = r.question();
            for p in &h.shape_color {
                let phrase = format!("{} {}?", p.color.name(), p.shape.name());
                assert!(!q.ends_with(&phrase), "{}: {q}", r.id);
            }
        }
    }
    assert_eq!(shapes.len(), cfg.shapes.len());
    assert_eq!(colors.len(), cfg.colors.len());
    assert_eq!(cells.len(), 9);

    let train_keys: HashSet<_> = train.iter().map(sample_key).collect();
    for (name, records) in [("val", &val), ("test", &test)] {
        let mut counts: BTreeMap<(Composition, QuestionType), usize> = BTreeMap::new();
        let mut objects: BTreeMap<(Composition, usize), usize> = BTreeMap::new();
        for r in records.iter() {
            let c = r.composition.expect("every val/test record is tagged");
            assert_eq!(c == Composition::Unseen, is_held_out(&h, r), "{}", r.id);
            assert!(!train_keys.contains(&sample_key(r)), "{} is in train", r.id);
            if c == Composition::Unseen {
                assert!(!train.iter().any(|t| layout(&t.scene) == layout(&r.scene)));
            }
            *counts.entry((c, r.question_type)).or_default() += 1;
            *objects.entry((c, r.scene.objects.len())).or_default() += 1;
        }
        let n = records.len();
        for c in [Composition::Seen, Composition::Unseen] {
            let of = |t| counts.get(&(c, t)).copied().unwrap_or(0);
            let group: usize = QuestionType::ALL.iter().map(|&t| of(t)).sum();
            assert_eq!(group, n / 2, "{name}: half {}", c.name());
            // Default mix 2:2:2:2:2:1 over n / 2 records (30 or 60): exact up to one.
            let unit = (n / 2) as f64 / 11.0;
            assert!(
                (of(QuestionType::Describe) as f64 - unit).abs() < 1.0,
                "{counts:?}"
            );
            assert!(
                (of(QuestionType::Color) as f64 - 2.0 * unit).abs() < 1.0,
                "{counts:?}"
            );
            for k in 1..=3 {
                assert!(
                    objects.get(&(c, k)).copied().unwrap_or(0) > 0,
                    "{objects:?}"
                );
            }
        }
        // Seen and unseen interleave: the first ten records hold both.
        let first: HashSet<_> = records[..10].iter().map(|r| r.composition).collect();
        assert_eq!(first.len(), 2, "{name}");
    }

    let again = make_world_records(&cfg).unwrap();
    let records: Vec<&WorldRecord> = again[2].iter().map(|(r, _)| r).collect();
    assert_eq!(records, test.iter().collect::<Vec<_>>());
    let other = make_world_records(&held_out_world(4)).unwrap();
    assert_ne!(other[2][0].0, test[0]);
    let written: WorldConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("world.json")).unwrap())
            .unwrap();
    assert_eq!(written, cfg);

    // The loader reads the tag.
    let tok = PromptTokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    let (ds, _) = Dataset::load(
        &dir.path().join("test.json"),
        dir.path(),
        &tok,
        256,
        OnBadRecord::Fail,
    )
    .unwrap();
    for (rec, world) in ds.records.iter().zip(&test) {
        assert_eq!(
            rec.composition.as_deref(),
            world.composition.map(|c| c.name())
        );
    }
}

/// A world config written before hold-outs existed reads as "no hold-out", and a world without
/// one still writes neither the field nor the records' tags (its files are those of before).
#[test]
fn worlds_without_a_holdout_are_unchanged() {
    let cfg = small_world(5);
    let mut json: Value = serde_json::to_value(&cfg).unwrap();
    assert!(json.get("holdout").is_none(), "{json}");
    json.as_object_mut().unwrap().remove("question_mix");
    let back: WorldConfig = serde_json::from_value(json).unwrap();
    assert_eq!(back, cfg);
    let records = make_world_records(&cfg).unwrap();
    for (r, _) in records.iter().flatten() {
        assert_eq!(r.composition, None);
        assert!(serde_json::to_value(r)
            .unwrap()
            .get("composition")
            .is_none());
    }
    assert!(teacher_world_config().holdout.is_some());
}

/// Hold-outs that would leave a shape, colour or cell out of training, name what the world does
/// not draw, or make training scenes impossible are refused, naming the problem.
#[test]
fn impossible_holdouts_are_refused() {
    let base = held_out_world(1);
    let with = |h: Holdout| WorldConfig {
        holdout: Some(h),
        ..base.clone()
    };
    let h = base.holdout.clone().unwrap();
    let every_colour = Holdout {
        shape_color: base
            .colors
            .iter()
            .map(|&color| ShapeColor {
                shape: Shape::Circle,
                color,
            })
            .collect(),
        ..h.clone()
    };
    let outside = Holdout {
        shape_cell: vec![ShapeCell {
            shape: Shape::Square,
            row: 3,
            col: 0,
        }],
        ..h.clone()
    };
    let every_shape_here = Holdout {
        shape_cell: Shape::ALL
            .iter()
            .map(|&shape| ShapeCell {
                shape,
                row: 1,
                col: 1,
            })
            .collect(),
        ..h.clone()
    };
    let fraction = Holdout {
        unseen_fraction: 1.5,
        ..h.clone()
    };
    let nothing = Holdout {
        shape_color: vec![],
        shape_cell: vec![],
        ..h.clone()
    };
    for (holdout, needle) in [
        (every_colour, "every colour of the circle"),
        (outside, "row 3 column 0"),
        (every_shape_here, "at center"),
        (fraction, "unseen_fraction"),
        (nothing, "no composition is held out"),
    ] {
        let err = with(holdout).validate().unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
    }
    with(h).validate().unwrap();
}

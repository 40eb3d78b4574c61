//! The placement search on a reduced random teacher (4 layers) and a small generated world:
//! every score it reports is the measurement of that placement (recomputed independently), the
//! greedy pick is the best single-layer scores, refinement keeps only improvements within its
//! budget, and a second search over the same folder measures nothing again.

use matvlm::search::{measure_placement, placement_search, MeasureOptions, SearchOptions};
use matvlm::teacher::{init_tensors_with_std, vlm_from_tensors, TeacherDims};

use crate::common::{load_split, small_world};

#[test]
fn placement_search_reports_what_it_measured_and_resumes() {
    let world = tempfile::tempdir().unwrap();
    let tok = small_world(world.path(), 11, (64, 16, 4));
    let dims = TeacherDims {
        layers: 4,
        ..TeacherDims::reduced()
    };
    let config = dims.config(&tok).unwrap();
    let init = init_tensors_with_std(&config, 1, 0.2).unwrap();
    let teacher = vlm_from_tensors(
        &config,
        &tok,
        init.into_iter().collect(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let image_tokens = teacher.config.image_tokens();
    let train = load_split(world.path(), "train", &tok, image_tokens);
    let val = load_split(world.path(), "val", &tok, image_tokens);
    let measure = MeasureOptions {
        steps: 3,
        batch_size: 8,
        limit: Some(8),
        ..MeasureOptions::default()
    };
    let opts = SearchOptions {
        ratio: 0.5,
        refine: true,
        budget: 3,
        measure: measure.clone(),
    };
    let dir = tempfile::tempdir().unwrap();
    let found = placement_search(&teacher, train.clone(), &val, &opts, dir.path(), None).unwrap();

    assert_eq!(found.scores.len(), 4);
    for (i, s) in found.scores.iter().enumerate() {
        assert_eq!(s.layers, vec![i]);
        assert!(s.kl.is_finite() && s.kl > 0.0, "layer {i}: {s:?}");
        assert!(s.hidden_loss.is_finite(), "layer {i}: {s:?}");
    }
    let mut by_kl: Vec<usize> = (0..4).collect();
    by_kl.sort_by(|&a, &b| found.scores[a].kl.total_cmp(&found.scores[b].kl));
    let mut greedy = by_kl[..2].to_vec();
    greedy.sort_unstable();
    assert_eq!(found.greedy.layers, greedy);
    assert_eq!(found.layers, found.best.layers);
    assert!(found.best.kl <= found.greedy.kl);
    assert!(found.tried.len() <= opts.budget);
    // Each candidate differs from the placement it started from by one layer moved to a
    // neighbour, and a kept candidate is better than everything kept before it.
    let mut current = found.greedy.clone();
    for (s, kept) in &found.tried {
        let moved: Vec<usize> = current
            .layers
            .iter()
            .copied()
            .filter(|l| !s.layers.contains(l))
            .collect();
        let arrived: Vec<usize> = s
            .layers
            .iter()
            .copied()
            .filter(|l| !current.layers.contains(l))
            .collect();
        assert_eq!(
            (moved.len(), arrived.len()),
            (1, 1),
            "{s:?} from {current:?}"
        );
        assert_eq!(moved[0].abs_diff(arrived[0]), 1);
        assert_eq!(*kept, s.kl < current.kl);
        if *kept {
            current = s.clone();
        }
    }
    assert_eq!(current.layers, found.layers);
    // 4 single layers, the greedy pair and the refinement's candidates, each measured once.
    assert_eq!(found.measured, 4 + 1 + found.tried.len());

    // The reported score is the measurement: a fresh folder measures the same number.
    let again = tempfile::tempdir().unwrap();
    let fresh = measure_placement(
        &teacher,
        &found.layers,
        train.clone(),
        &val,
        &measure,
        again.path(),
        None,
    )
    .unwrap();
    assert_eq!(fresh, found.best);

    // Everything is in the folder: a second search reads it back.
    let second = placement_search(&teacher, train, &val, &opts, dir.path(), None).unwrap();
    assert_eq!(second.measured, 0);
    assert_eq!(second.layers, found.layers);
    assert_eq!(second.tried, found.tried);
    assert!(dir.path().join("search.json").is_file());
}

//! The resumable loader and batches.

use super::*;

fn run(loader: &mut Loader, n: usize) -> Vec<Vec<usize>> {
    (0..n).map(|_| loader.next_indices()).collect()
}

#[test]
fn loader_shuffles_per_epoch_deterministically() {
    let mut a = Loader::new(10, 3, 7).unwrap();
    let epoch0 = run(&mut a, 4);
    assert_eq!(
        epoch0.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![3, 3, 3, 1]
    );
    let mut seen: Vec<usize> = epoch0.concat();
    assert_ne!(seen, (0..10).collect::<Vec<_>>(), "shuffled");
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..10).collect::<Vec<_>>(),
        "each sample once per epoch"
    );
    let epoch1 = run(&mut a, 4);
    assert_ne!(epoch0, epoch1, "a new order each epoch");
    assert_eq!(
        a.state(),
        LoaderState {
            seed: 7,
            epoch: 1,
            position: 10
        }
    );

    let mut same = Loader::new(10, 3, 7).unwrap();
    assert_eq!(run(&mut same, 8), [epoch0.clone(), epoch1].concat());
    let mut other = Loader::new(10, 3, 8).unwrap();
    assert_ne!(run(&mut other, 4), epoch0);

    let mut in_order = Loader::new(10, 4, 7).unwrap().with_shuffle(false);
    assert_eq!(
        run(&mut in_order, 3),
        vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]
    );
    let mut full = Loader::new(10, 4, 7).unwrap().with_drop_last(true);
    assert_eq!(full.batches_per_epoch(), 2);
    assert!(run(&mut full, 9).iter().all(|b| b.len() == 4));
    assert!(Loader::new(0, 4, 1).is_err());
    assert!(Loader::new(4, 0, 1).is_err());
}

#[test]
fn loader_resumes_from_a_saved_state() {
    let mut uninterrupted = Loader::new(23, 5, 99).unwrap();
    let all = run(&mut uninterrupted, 20);
    for k in [0, 1, 4, 5, 7, 13] {
        let mut first = Loader::new(23, 5, 99).unwrap();
        run(&mut first, k);
        let saved = serde_json::to_string(&first.state()).unwrap();
        // A fresh loader (even one made with another seed) continues where the first stopped.
        let mut resumed = Loader::new(23, 5, 0).unwrap();
        resumed
            .restore(serde_json::from_str(&saved).unwrap())
            .unwrap();
        assert_eq!(
            run(&mut resumed, 20 - k),
            all[k..].to_vec(),
            "resumed after {k} batches"
        );
    }
    let mut l = Loader::new(23, 5, 99).unwrap();
    let too_far = LoaderState {
        seed: 1,
        epoch: 0,
        position: 24,
    };
    assert!(matches!(l.restore(too_far), Err(Error::Invalid(_))));
}

#[test]
fn batches_pad_mask_and_share_decoded_images() {
    let dir = scratch("batch");
    generate_world(&small_world(3), dir.path()).unwrap();
    let tok = PromptTokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    let opts = LoadOptions {
        max_len: 64,
        image_check: ImageCheck::Decode,
        ..LoadOptions::default()
    };
    let (ds, bad) =
        Dataset::load_with(&dir.path().join("train.json"), dir.path(), &tok, &opts).unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(ds.len(), 300);
    assert_eq!(
        ds.records[5]
            .question_type
            .as_deref()
            .map(|t| !t.is_empty()),
        Some(true)
    );

    let mut loader = Loader::new(ds.len(), 8, 1).unwrap();
    let indices = loader.next_indices();
    let batch = ds.batch(&indices).unwrap();
    assert_eq!(batch.len(), 8);
    let width = indices
        .iter()
        .map(|&i| ds.sample_len(i).unwrap())
        .max()
        .unwrap();
    assert_eq!(batch.seq_len(), width);
    let mask = batch.attention_mask();
    for (row, &i) in indices.iter().enumerate() {
        let s = ds.sample(i).unwrap();
        let n = s.input_ids.len();
        assert_eq!(batch.lengths[row], n);
        assert_eq!(batch.records[row], s.record);
        assert_eq!(batch.input_ids[row][..n], s.input_ids[..]);
        assert!(batch.input_ids[row][n..]
            .iter()
            .all(|&t| t == tok.eos_id() as i64));
        assert_eq!(batch.labels[row][..n], s.labels[..]);
        assert!(batch.labels[row][n..].iter().all(|&l| l == IGNORE_INDEX));
        assert_eq!(mask[row].iter().map(|&m| m as usize).sum::<usize>(), n);
        assert_eq!(s.input_ids.iter().filter(|&&t| t == IMAGE_TOKEN).count(), 1);
        let img = batch.images[row].as_ref().unwrap();
        assert_eq!(img.dimensions(), (48, 48));
        // Decoded once: the cache hands out the same pixels.
        assert!(Arc::ptr_eq(img, &ds.image(i).unwrap().unwrap()));
        let on_disk = image::open(s.image.as_ref().unwrap()).unwrap().to_rgb8();
        assert_eq!(**img, on_disk);
    }
    assert!(ds.batch(&[ds.len()]).is_err());
}

#[test]
fn length_grouping_cuts_padding_and_stays_resumable() {
    let dir = scratch("group");
    generate_world(&small_world(4), dir.path()).unwrap();
    let tok = PromptTokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    let (ds, _) = Dataset::load(
        &dir.path().join("train.json"),
        dir.path(),
        &tok,
        64,
        OnBadRecord::Fail,
    )
    .unwrap();
    let lengths = ds.lengths();
    let padded = |batches: &[Vec<usize>]| -> usize {
        batches
            .iter()
            .map(|b| b.iter().map(|&i| lengths[i]).max().unwrap() * b.len())
            .sum()
    };
    let per_epoch = ds.len().div_ceil(16);
    let plain = run(&mut Loader::new(ds.len(), 16, 9).unwrap(), per_epoch);
    let make = || {
        Loader::new(ds.len(), 16, 9)
            .unwrap()
            .with_length_grouping(lengths.clone(), 4)
            .unwrap()
    };
    let mut grouped_loader = make();
    let grouped = run(&mut grouped_loader, per_epoch);
    let mut seen = grouped.concat();
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..ds.len()).collect::<Vec<_>>(),
        "still each sample once per epoch"
    );
    assert!(
        grouped[..per_epoch - 1].iter().all(|b| b.len() == 16),
        "only the last batch is short"
    );
    let real: usize = lengths.iter().sum();
    println!(
        "padded tokens per epoch: {} shuffled, {} grouped, {real} real",
        padded(&plain),
        padded(&grouped)
    );
    assert!(padded(&grouped) < padded(&plain));

    let all = run(&mut make(), 3 * per_epoch);
    let mut first = make();
    run(&mut first, per_epoch + 5);
    let mut resumed = make();
    resumed.restore(first.state()).unwrap();
    assert_eq!(
        run(&mut resumed, 2 * per_epoch - 5),
        all[per_epoch + 5..].to_vec()
    );
    assert!(Loader::new(ds.len(), 16, 9)
        .unwrap()
        .with_length_grouping(vec![1; 3], 4)
        .is_err());
}

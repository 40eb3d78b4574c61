//! The synthetic world: determinism, sizes and balance, answers that follow from the pixels,
//! the image being needed, the tokenizer, generation on demand, answer normalisation.

use super::*;

fn files_under(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

#[test]
fn world_is_byte_identical_from_the_same_seed() {
    let (a, b, c) = (scratch("det-a"), scratch("det-b"), scratch("det-c"));
    let t = std::time::Instant::now();
    let summary = generate_world(&small_world(11), a.path()).unwrap();
    let elapsed = t.elapsed();
    generate_world(&small_world(11), b.path()).unwrap();
    generate_world(&small_world(12), c.path()).unwrap();
    let (fa, fb, fc) = (
        files_under(a.path()),
        files_under(b.path()),
        files_under(c.path()),
    );
    assert_eq!(
        fa.len(),
        300 + 60 + 90 + 5,
        "images + 3 splits + tokenizer + world.json"
    );
    assert!(fa == fb, "same seed, same bytes");
    assert_ne!(fa[Path::new("train.json")], fc[Path::new("train.json")]);
    assert_ne!(
        fa[Path::new("images/000000.png")],
        fc[Path::new("images/000000.png")]
    );
    let written: WorldConfig = serde_json::from_slice(&fa[Path::new("world.json")]).unwrap();
    assert_eq!(written, small_world(11));
    println!("{summary:?}, generated in {elapsed:?}");
}

#[test]
fn world_splits_have_the_configured_sizes_and_balanced_question_types() {
    let dir = scratch("balance");
    let cfg = WorldConfig {
        question_mix: QuestionMix {
            describe: 1.0,
            count: 3.0,
            ..QuestionMix::default()
        },
        ..small_world(5)
    };
    let summary = generate_world(&cfg, dir.path()).unwrap();
    let weights: BTreeMap<&str, f64> = [
        ("color", cfg.question_mix.color),
        ("shape", cfg.question_mix.shape),
        ("count", cfg.question_mix.count),
        ("position", cfg.question_mix.position),
        ("exists", cfg.question_mix.exists),
        ("describe", cfg.question_mix.describe),
    ]
    .into();
    let total: f64 = weights.values().sum();
    for (split, n) in [("train", cfg.train), ("val", cfg.val), ("test", cfg.test)] {
        let records = read_world_split(&dir.path().join(format!("{split}.json"))).unwrap();
        assert_eq!(records.len(), n);
        assert_eq!(summary.split_sizes[split], n);
        let raw: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(format!("{split}.json"))).unwrap(),
        )
        .unwrap();
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        let (mut yes, mut no) = (0, 0);
        for r in raw.as_array().unwrap() {
            let t = r["question_type"].as_str().unwrap().to_string();
            if t == "exists" {
                match r["conversations"][1]["value"].as_str().unwrap() {
                    "yes" => yes += 1,
                    "no" => no += 1,
                    other => panic!("yes/no answer {other:?}"),
                }
            }
            *counts.entry(t).or_default() += 1;
        }
        for (t, w) in &weights {
            let share = w / total * n as f64;
            let got = counts.get(*t).copied().unwrap_or(0) as f64;
            assert!(
                (got - share).abs() < 1.0,
                "{split}: {t} has {got}, expected {share:.2}"
            );
        }
        assert!(
            (yes as i64 - no as i64).abs() <= 1,
            "{split}: {yes} yes vs {no} no"
        );
    }
    assert!(dir
        .path()
        .join("images")
        .join(format!("{:06}.png", cfg.train + cfg.val + cfg.test - 1))
        .is_file());
}

/// Position names of a 3 x 3 grid, written out here independently of the generator.
const POSITIONS: [[&str; 3]; 3] = [
    ["top left", "top middle", "top right"],
    ["middle left", "center", "middle right"],
    ["bottom left", "bottom middle", "bottom right"],
];

#[derive(Debug, Clone)]
struct Obj {
    shape: String,
    color: String,
    pos: &'static str,
    row: u32,
    col: u32,
    x: u32,
    y: u32,
    size: u32,
}

fn objects_of(record: &Value) -> Vec<Obj> {
    record["scene"]["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let n = |k: &str| o[k].as_u64().unwrap() as u32;
            Obj {
                shape: o["shape"].as_str().unwrap().into(),
                color: o["color"].as_str().unwrap().into(),
                pos: POSITIONS[n("row") as usize][n("col") as usize],
                row: n("row"),
                col: n("col"),
                x: n("x"),
                y: n("y"),
                size: n("size"),
            }
        })
        .collect()
}

fn plural(shape: &str) -> String {
    if shape.ends_with('s') {
        format!("{shape}es")
    } else {
        format!("{shape}s")
    }
}

fn count_word(n: usize) -> &'static str {
    [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    ][n]
}

/// The answer to `question` about `objs`, worked out from the scene metadata alone.
fn derive_answer(question: &str, objs: &[Obj]) -> String {
    let one = |f: &dyn Fn(&Obj) -> bool| -> Obj {
        let found: Vec<&Obj> = objs.iter().filter(|o| f(o)).collect();
        assert_eq!(
            found.len(),
            1,
            "{question:?} must name exactly one object of {objs:?}"
        );
        found[0].clone()
    };
    let q = question
        .strip_suffix('?')
        .or_else(|| question.strip_suffix('.'))
        .unwrap();
    if let Some(p) = q.strip_prefix("What color is the object at the ") {
        return one(&|o| o.pos == p).color;
    }
    if let Some(s) = q.strip_prefix("What color is the ") {
        return one(&|o| o.shape == s).color;
    }
    if let Some(p) = q.strip_prefix("What shape is the object at the ") {
        return one(&|o| o.pos == p).shape;
    }
    if let Some(c) = q
        .strip_prefix("What shape is the ")
        .and_then(|r| r.strip_suffix(" object"))
    {
        return one(&|o| o.color == c).shape;
    }
    if q == "How many objects are there" {
        return count_word(objs.len()).into();
    }
    if let Some(what) = q
        .strip_prefix("How many ")
        .and_then(|r| r.strip_suffix(" are there"))
    {
        let n = match what.strip_suffix(" objects") {
            Some(c) => objs.iter().filter(|o| o.color == c).count(),
            None => objs.iter().filter(|o| plural(&o.shape) == what).count(),
        };
        return count_word(n).into();
    }
    if let Some(cs) = q.strip_prefix("Where is the ") {
        let (c, s) = cs.split_once(' ').unwrap();
        return one(&|o| o.color == c && o.shape == s).pos.into();
    }
    if let Some(cs) = q
        .strip_prefix("Is there a ")
        .or_else(|| q.strip_prefix("Is there an "))
    {
        let (c, s) = cs.split_once(' ').unwrap();
        let n = objs.iter().filter(|o| o.color == c && o.shape == s).count();
        return if n > 0 { "yes" } else { "no" }.into();
    }
    if q == "Describe the image in one sentence" {
        let mut sorted = objs.to_vec();
        sorted.sort_by_key(|o| (o.row, o.col));
        let parts: Vec<String> = sorted
            .iter()
            .map(|o| {
                let art = if "aeiou".contains(&o.color[..1]) {
                    "an"
                } else {
                    "a"
                };
                format!("{art} {} {} at the {}", o.color, o.shape, o.pos)
            })
            .collect();
        let body = match parts.len() {
            1 => parts[0].clone(),
            n => format!("{} and {}", parts[..n - 1].join(", "), parts[n - 1]),
        };
        return format!("{body}.");
    }
    panic!("unknown question {question:?}");
}

/// Checks that what is drawn is what the scene says: each object's box holds one colour in the
/// silhouette of its shape, everything else is background.
fn check_pixels(
    img: &RgbImage,
    objs: &[Obj],
    cell: u32,
    background: [u8; 3],
    palette: &mut HashMap<String, [u8; 3]>,
) {
    let bg = Rgb(background);
    let inside = |x: u32, y: u32| {
        objs.iter()
            .any(|o| x >= o.x && x < o.x + o.size && y >= o.y && y < o.y + o.size)
    };
    for (x, y, p) in img.enumerate_pixels() {
        if !inside(x, y) {
            assert_eq!(*p, bg, "pixel ({x},{y}) outside every object");
        }
    }
    for o in objs {
        assert!(
            o.x >= o.col * cell && o.x + o.size <= (o.col + 1) * cell,
            "{o:?} leaves its cell"
        );
        assert!(
            o.y >= o.row * cell && o.y + o.size <= (o.row + 1) * cell,
            "{o:?} leaves its cell"
        );
        let at = |dx: u32, dy: u32| *img.get_pixel(o.x + dx, o.y + dy);
        let c = at(o.size / 2, o.size / 2);
        assert_ne!(c, bg, "{o:?}: nothing drawn at its centre");
        // A colour name always means the same RGB, and two names never share one.
        let known = *palette.entry(o.color.clone()).or_insert(c.0);
        assert_eq!(known, c.0, "{} drawn in two ways", o.color);
        let row_fill = |dy: u32| (0..o.size).filter(|&dx| at(dx, dy) == c).count();
        let s = o.size as usize;
        let (top, mid, bottom) = (row_fill(0), row_fill(o.size / 2), row_fill(o.size - 1));
        let corner = at(0, 0) == c;
        match o.shape.as_str() {
            "square" => assert!(top == s && bottom == s && corner, "{o:?}"),
            "circle" => assert!(
                !corner && mid == s && top < s / 2 && bottom < s / 2,
                "{o:?}"
            ),
            "triangle" => assert!(!corner && top <= 2 && bottom >= s - 1, "{o:?}"),
            "cross" => assert!(
                !corner && mid == s && top >= 3 && top < s / 2 && bottom == top,
                "{o:?}"
            ),
            other => panic!("unknown shape {other}"),
        }
        for dy in 0..o.size {
            for dx in 0..o.size {
                let p = at(dx, dy);
                assert!(p == c || p == bg, "{o:?}: stray colour {p:?}");
            }
        }
    }
}

#[test]
fn every_answer_follows_from_what_is_drawn() {
    let dir = scratch("answers");
    let cfg = small_world(21);
    generate_world(&cfg, dir.path()).unwrap();
    let mut palette = HashMap::new();
    let mut by_type: BTreeMap<String, usize> = BTreeMap::new();
    for split in ["train", "val", "test"] {
        let raw: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(format!("{split}.json"))).unwrap(),
        )
        .unwrap();
        for r in raw.as_array().unwrap() {
            let conv = r["conversations"].as_array().unwrap();
            assert_eq!(conv.len(), 2);
            assert_eq!(conv[0]["from"], "human");
            assert_eq!(conv[1]["from"], "gpt");
            let question = conv[0]["value"]
                .as_str()
                .unwrap()
                .strip_prefix("<image>\n")
                .unwrap();
            let answer = conv[1]["value"].as_str().unwrap();
            let objs = objects_of(r);
            assert!((cfg.min_objects..=cfg.max_objects).contains(&objs.len()));
            assert_eq!(
                derive_answer(question, &objs),
                answer,
                "{} {question:?}",
                r["id"]
            );
            if r["question_type"] == "count" && question == "How many objects are there?" {
                assert_eq!(answer, count_word(objs.len()));
            }
            let img = image::open(dir.path().join(r["image"].as_str().unwrap()))
                .unwrap()
                .to_rgb8();
            assert_eq!(img.dimensions(), (cfg.image_size, cfg.image_size));
            check_pixels(&img, &objs, cfg.cell_px(), cfg.background, &mut palette);
            *by_type
                .entry(r["question_type"].as_str().unwrap().into())
                .or_default() += 1;
        }
    }
    assert_eq!(by_type.len(), 6, "{by_type:?}");
    let mut colours: Vec<[u8; 3]> = palette.values().copied().collect();
    colours.sort_unstable();
    colours.dedup();
    assert_eq!(
        colours.len(),
        palette.len(),
        "distinct colour names, distinct RGB: {palette:?}"
    );
}

#[test]
fn the_image_is_needed_to_answer() {
    // A model that ignores the image can at best answer each question with its most frequent
    // answer in training; measure that on the test split (the bar asks for <= 35%).
    let dir = scratch("blind");
    let cfg = WorldConfig {
        train: 4000,
        val: 0,
        test: 1000,
        ..WorldConfig::default()
    };
    generate_world(&cfg, dir.path()).unwrap();
    let train: Vec<WorldRecord> = read_world_split(&dir.path().join("train.json")).unwrap();
    let test: Vec<WorldRecord> = read_world_split(&dir.path().join("test.json")).unwrap();
    let mut answers: HashMap<&str, HashMap<&str, usize>> = HashMap::new();
    for r in &train {
        *answers
            .entry(r.question())
            .or_default()
            .entry(r.answer())
            .or_default() += 1;
    }
    let guess = |q: &str| -> Option<&str> {
        let counts = answers.get(q)?;
        counts
            .iter()
            .max_by_key(|(a, n)| (**n, std::cmp::Reverse(**a)))
            .map(|(a, _)| *a)
    };
    let right = test
        .iter()
        .filter(|r| guess(r.question()) == Some(r.answer()))
        .count();
    let blind = right as f64 / test.len() as f64;
    println!("blind (question-only) accuracy on test: {blind:.3}");
    assert!(
        blind <= 0.35,
        "the world can be answered without looking: {blind:.3}"
    );
    assert!(
        blind > 0.05,
        "suspiciously low, the answer priors should give something: {blind:.3}"
    );
}

#[test]
fn world_tokenizer_round_trips_and_has_phi_eos() {
    let dir = scratch("tok");
    let cfg = small_world(2);
    let summary = generate_world(&cfg, dir.path()).unwrap();
    let tok = PromptTokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    assert_eq!(Some(tok.eos_id()), tok.inner().token_to_id(EOS_TEXT));
    assert_eq!(summary.eos_id, tok.eos_id());
    assert_eq!(summary.vocab_size, tok.vocab_size());
    assert!(tok.vocab_size() <= cfg.vocab_size + 1);
    assert_eq!(tok.encode_text(EOS_TEXT).unwrap(), vec![tok.eos_id()]);
    // The system prompt, the same in every sample, is a single token.
    assert_eq!(tok.encode_text(PHI_SYSTEM).unwrap().len(), 1);

    let records = read_world_split(&dir.path().join("test.json")).unwrap();
    for r in &records {
        let text = format!(
            "{} USER: {} ASSISTANT: {}",
            PHI_SYSTEM,
            r.question(),
            r.answer()
        );
        let ids = tok.encode_text(&text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
        // Every word of the world is one token (with its leading space; a question's first word
        // follows the newline after `<image>`, so it is only ever seen without one).
        for word in r.question().split(' ').skip(1).chain(r.answer().split(' ')) {
            let word = word.trim_end_matches(['?', '.', ',']);
            assert_eq!(
                tok.encode_text(&format!(" {word}")).unwrap().len(),
                1,
                "{word:?}"
            );
        }
    }
    // Text from outside the world still encodes (byte-level), and decodes back.
    let foreign = "Caf\u{e9} \u{1F415} — 42 ZZZ\n\ttabs";
    assert_eq!(
        tok.decode(&tok.encode_text(foreign).unwrap()).unwrap(),
        foreign
    );
    // EOS is special: decoding skips it.
    let mut ids = tok.encode_text("yes").unwrap();
    ids.push(tok.eos_id());
    assert_eq!(tok.decode(&ids).unwrap(), "yes");

    // Typical length with the phi template: the ids the trainer sees (image placeholder = 1).
    println!(
        "world tokens per sample: mean {:.1}, max {}",
        summary.mean_tokens, summary.max_tokens
    );
    assert!(
        summary.mean_tokens < 30.0 && summary.max_tokens < 48,
        "{summary:?}"
    );

    // Without the one-token system prompt the BPE still makes each of its words one token.
    let plain = train_world_tokenizer(
        [format!(
            "{PHI_SYSTEM} USER: What color is the circle? ASSISTANT: red"
        )],
        cfg.vocab_size,
        &[],
    )
    .unwrap();
    let sys = plain.encode(PHI_SYSTEM, false).unwrap();
    let pre_tokens = PHI_SYSTEM.split(' ').count() + PHI_SYSTEM.matches([',', '.', '\'']).count();
    assert_eq!(sys.get_ids().len(), pre_tokens, "{:?}", sys.get_tokens());
}

#[test]
fn ensure_world_generates_only_when_needed() {
    let dir = scratch("ensure");
    let cfg = WorldConfig {
        train: 40,
        val: 10,
        test: 10,
        ..WorldConfig::default()
    };
    let world = dir.path().join("w");
    ensure_world(&world, &cfg).unwrap();
    let train = world.join("train.json");
    let original = std::fs::read(&train).unwrap();
    // A marker shows whether a second call rewrote the files.
    std::fs::write(&train, b"[]").unwrap();
    ensure_world(&world, &cfg).unwrap();
    assert_eq!(
        std::fs::read(&train).unwrap(),
        b"[]",
        "same config: left alone"
    );

    let other = WorldConfig {
        seed: 1,
        ..cfg.clone()
    };
    ensure_world(&world, &other).unwrap();
    let regenerated = std::fs::read(&train).unwrap();
    assert_ne!(regenerated, b"[]");
    assert_ne!(regenerated, original);
    let written: WorldConfig =
        serde_json::from_str(&std::fs::read_to_string(world.join("world.json")).unwrap()).unwrap();
    assert_eq!(written, other);

    // An incomplete world (interrupted generation) is made again.
    std::fs::remove_file(world.join("tokenizer.json")).unwrap();
    ensure_world(&world, &other).unwrap();
    assert!(world.join("tokenizer.json").is_file());
    assert_eq!(std::fs::read(&train).unwrap(), regenerated);

    let bad = WorldConfig { grid: 5, ..cfg };
    assert!(matches!(ensure_world(&world, &bad), Err(Error::Invalid(_))));
}

#[test]
fn answers_normalise_for_exact_match() {
    assert_eq!(normalize_answer("  Top   Left. "), "top left");
    assert_eq!(normalize_answer("Yes!"), "yes");
    assert_eq!(
        normalize_answer("A red circle at the top left, and a blue square."),
        "a red circle at the top left and a blue square"
    );
}

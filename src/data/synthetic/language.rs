//! The world's words: cell positions, number words, articles, the one-sentence scene
//! description, and answer normalisation for exact match.

use super::*;

/// Name of a grid cell: "top left", "center", "bottom middle", ... for grids up to 3 x 3,
/// "row 2 column 4" beyond.
pub fn position_name(row: u32, col: u32, grid: u32) -> String {
    let axis =
        |i: u32, names2: [&'static str; 2], names3: [&'static str; 3]| -> Option<&'static str> {
            match grid {
                2 => Some(names2[i as usize]),
                3 => Some(names3[i as usize]),
                _ => None,
            }
        };
    match grid {
        1 => "center".to_string(),
        2 | 3 => {
            let r = axis(row, ["top", "bottom"], ["top", "middle", "bottom"]).unwrap_or("");
            let c = axis(col, ["left", "right"], ["left", "middle", "right"]).unwrap_or("");
            if r == "middle" && c == "middle" {
                "center".to_string()
            } else {
                format!("{r} {c}")
            }
        }
        _ => format!("row {} column {}", row + 1, col + 1),
    }
}

/// A count as a word ("zero" .. "twelve"), digits beyond.
pub fn number_word(n: usize) -> String {
    const WORDS: [&str; 13] = [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve",
    ];
    WORDS
        .get(n)
        .map_or_else(|| n.to_string(), |w| w.to_string())
}

pub(super) fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// The description sentence of a scene: "a red circle at the top left, a blue square at the
/// center and a green cross at the bottom right."
pub fn describe_scene(scene: &Scene, grid: u32) -> String {
    let parts: Vec<String> = scene
        .objects
        .iter()
        .map(|o| {
            format!(
                "{} {} {} at the {}",
                article(o.color.name()),
                o.color.name(),
                o.shape.name(),
                position_name(o.row, o.col, grid)
            )
        })
        .collect();
    let body = match parts.len() {
        0 => "nothing".to_string(),
        1 => parts[0].clone(),
        n => format!("{} and {}", parts[..n - 1].join(", "), parts[n - 1]),
    };
    format!("{body}.")
}

/// Lower-case, punctuation dropped, whitespace collapsed: "Top left." and "top  left" compare equal.
pub fn normalize_answer(answer: &str) -> String {
    answer
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c.is_whitespace() {
                c
            } else {
                ' '
            }
        })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

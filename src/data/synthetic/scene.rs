//! Scenes: drawing a random set of objects on the grid, and rendering it to an image.

use super::*;

/// Draw a random scene: `min..=max` objects in distinct cells, no two with the same colour and
/// shape, sorted in reading order.
pub(super) fn make_scene(cfg: &WorldConfig, rng: &mut SplitMix64) -> Scene {
    let n = draw_object_count(cfg, rng);
    make_scene_of(cfg, n, rng)
}

/// How many objects a scene has: uniform in `min_objects..=max_objects`.
pub(super) fn draw_object_count(cfg: &WorldConfig, rng: &mut SplitMix64) -> usize {
    rng.range_inclusive(cfg.min_objects as i64, cfg.max_objects as i64) as usize
}

/// A random scene of `n` objects (see [`make_scene`]).
pub(super) fn make_scene_of(cfg: &WorldConfig, n: usize, rng: &mut SplitMix64) -> Scene {
    let cell = cfg.cell_px();
    let mut cells: Vec<u32> = (0..cfg.grid * cfg.grid).collect();
    rng.shuffle(&mut cells);
    let mut chosen = cells[..n].to_vec();
    chosen.sort_unstable();

    let mut used = HashSet::new();
    let mut objects = Vec::with_capacity(n);
    for c in chosen {
        let (shape, color) = loop {
            let pair = (*rng.choose(&cfg.shapes), *rng.choose(&cfg.colors));
            if used.insert(pair) {
                break pair;
            }
        };
        let size = rng.range_inclusive(cfg.min_shape_px as i64, cfg.max_shape_px as i64) as u32;
        let slack = (cell - size) / 2;
        let reach = cfg.jitter_px.min(slack) as i64;
        let (row, col) = (c / cfg.grid, c % cfg.grid);
        let x = (col * cell + slack) as i64 + rng.range_inclusive(-reach, reach);
        let y = (row * cell + slack) as i64 + rng.range_inclusive(-reach, reach);
        objects.push(SceneObject {
            shape,
            color,
            row,
            col,
            x: x as u32,
            y: y as u32,
            size,
        });
    }
    Scene { objects }
}

/// Rasterise a scene (no antialiasing: a pixel belongs to a shape when its centre does).
pub fn render_scene(cfg: &WorldConfig, scene: &Scene) -> RgbImage {
    let mut img = RgbImage::from_pixel(cfg.image_size, cfg.image_size, Rgb(cfg.background));
    for o in &scene.objects {
        let s = o.size as f32;
        for dy in 0..o.size {
            for dx in 0..o.size {
                let (u, v) = ((dx as f32 + 0.5) / s, (dy as f32 + 0.5) / s);
                let (px, py) = (o.x + dx, o.y + dy);
                if o.shape.covers(u, v) && px < cfg.image_size && py < cfg.image_size {
                    img.put_pixel(px, py, Rgb(o.color.rgb()));
                }
            }
        }
    }
    img
}

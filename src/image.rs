//! Image loading and preprocessing (resize, rescale, normalise) for the vision tower.

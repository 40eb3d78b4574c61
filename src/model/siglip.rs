//! The SigLIP vision tower.

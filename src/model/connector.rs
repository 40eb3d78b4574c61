//! The TinyLLaVA connector between the vision tower and the decoder.

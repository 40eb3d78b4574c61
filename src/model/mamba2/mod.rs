//! The Mamba-2 mixer (see issue: chunked SSD scan, recurrent decoding, gradients).

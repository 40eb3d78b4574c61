//! Parameter names and shapes of a model without its weights.
//!
//! [`ShapeRecorder`] is a VarBuilder backend that answers every request with a zero-stride view
//! of a single zero (no memory for the data) and remembers the name and shape asked for. Building
//! a model over it lists the checkpoint keys the model reads, which serves random initialisation,
//! parameter counts of full-size models on a laptop, and checks of a checkpoint's key set.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

#[derive(Default, Clone)]
pub struct ShapeRecorder {
    seen: Arc<Mutex<BTreeMap<String, Vec<usize>>>>,
}

impl SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        self.seen
            .lock()
            .expect("recorder lock")
            .insert(name.to_string(), s.dims().to_vec());
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("shape recorder cannot answer an unchecked get of {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

impl ShapeRecorder {
    /// Build something over a recording VarBuilder; returns it and the recorded name -> shape map.
    pub fn record<T>(
        dtype: DType,
        build: impl FnOnce(VarBuilder<'static>) -> crate::Result<T>,
    ) -> crate::Result<(T, BTreeMap<String, Vec<usize>>)> {
        let rec = ShapeRecorder::default();
        let vb = VarBuilder::from_backend(Box::new(rec.clone()), dtype, Device::Cpu);
        let built = build(vb)?;
        let shapes = rec.seen.lock().expect("recorder lock").clone();
        Ok((built, shapes))
    }
}

/// Number of scalars in a name -> shape map.
pub fn parameter_count(shapes: &BTreeMap<String, Vec<usize>>) -> usize {
    shapes.values().map(|s| s.iter().product::<usize>()).sum()
}

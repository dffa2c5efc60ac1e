//! Helpers shared by the integration tests.

use std::collections::BTreeMap;
use std::path::Path;

use gemma_merge::format::{FloatType, Model};

/// Every tensor of a model, by name: (dtype, shape, values widened exactly to f64).
pub type Tensors = BTreeMap<String, (FloatType, Vec<usize>, Vec<f64>)>;

/// Every tensor of a model, as (dtype, shape, f64 values).
pub fn load(path: &Path) -> Tensors {
    let m = Model::open(path).unwrap();
    m.tensors()
        .iter()
        .map(|t| {
            let ft = FloatType::from_dtype(t.dtype).unwrap();
            let mut v = vec![0f32; t.numel()];
            ft.decode(m.data(t), &mut v);
            (
                t.name.clone(),
                (ft, t.shape.clone(), v.into_iter().map(f64::from).collect()),
            )
        })
        .collect()
}

//! Tensors in their stored element type: memory-mapped from a checkpoint, or owned in memory.
//!
//! The forward pass never converts a whole model to f32: matrix products decode a row or a block of rows at
//! a time (see `ops::matmul`), so a bf16 model needs little more RAM than its file size, and an in-memory
//! model (a merge evaluated without writing it) can be built from any [`WeightSource`].

use std::collections::HashMap;
use std::sync::Arc;

use crate::format::{dtype::dtype_name, FloatType, Model, TensorInfo};

use super::ModelError;

/// One tensor: element type, shape and little-endian bytes, shared cheaply (`Clone` copies no data).
#[derive(Clone)]
pub struct Weight {
    dtype: FloatType,
    shape: Vec<usize>,
    data: Data,
}

#[derive(Clone)]
enum Data {
    /// Bytes inside a memory-mapped checkpoint; the `Arc` keeps the mapping alive.
    Mapped { model: Arc<Model>, info: TensorInfo },
    /// Bytes owned in memory (the `Vec` itself, so that building a weight from one copies nothing).
    Owned(Arc<Vec<u8>>),
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let place = match &self.data {
            Data::Mapped { .. } => "mapped",
            Data::Owned(_) => "owned",
        };
        write!(f, "Weight({}, {:?}, {place})", self.dtype, self.shape)
    }
}

impl Weight {
    /// An owned tensor from raw little-endian bytes of `dtype`.
    pub fn from_bytes(
        dtype: FloatType,
        shape: Vec<usize>,
        bytes: Vec<u8>,
    ) -> Result<Self, ModelError> {
        let expected = shape
            .iter()
            .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d));
        if expected != Some(bytes.len()) {
            return Err(ModelError::TensorData {
                shape,
                dtype: dtype.to_string(),
                len: bytes.len(),
            });
        }
        Ok(Self {
            dtype,
            shape,
            data: Data::Owned(Arc::new(bytes)),
        })
    }

    /// An owned f32 tensor.
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Result<Self, ModelError> {
        Self::from_values(FloatType::F32, shape, values)
    }

    /// An owned tensor holding `values` rounded once to `dtype` (round-to-nearest-even), exactly as a
    /// checkpoint written in that type would hold them.
    pub fn from_values(
        dtype: FloatType,
        shape: Vec<usize>,
        values: &[f32],
    ) -> Result<Self, ModelError> {
        let mut bytes = Vec::new();
        dtype.encode(values, &mut bytes);
        Self::from_bytes(dtype, shape, bytes)
    }

    /// The tensor `name` of a memory-mapped checkpoint, `Ok(None)` when it has none.
    pub fn mapped(model: &Arc<Model>, name: &str) -> Result<Option<Self>, ModelError> {
        let Some(info) = model.get(name) else {
            return Ok(None);
        };
        let dtype = FloatType::from_dtype(info.dtype).ok_or_else(|| ModelError::TensorDtype {
            origin: model.root().display().to_string(),
            name: name.to_string(),
            dtype: dtype_name(info.dtype),
        })?;
        Ok(Some(Self {
            dtype,
            shape: info.shape.clone(),
            data: Data::Mapped {
                model: model.clone(),
                info: info.clone(),
            },
        }))
    }

    pub fn dtype(&self) -> FloatType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            Data::Mapped { model, info } => model.data(info),
            Data::Owned(bytes) => bytes,
        }
    }

    /// All elements as f32 (exact). Meant for vectors and tests, not for the big matrices.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.dtype.decode(self.bytes(), &mut out);
        out
    }

    /// The index of the first NaN or infinite element, `None` when all are finite. A check of exponent
    /// bits in parallel blocks: one pass over the bytes at memory speed, done once when a model is loaded.
    pub fn first_non_finite(&self) -> Option<usize> {
        use rayon::prelude::*;
        const BLOCK: usize = 1 << 16;
        let size = self.dtype.size();
        self.bytes()
            .par_chunks(BLOCK * size)
            .enumerate()
            .find_map_first(|(block, bytes)| {
                self.dtype.first_nonfinite(bytes).map(|i| block * BLOCK + i)
            })
    }

    /// Row `i` of a matrix, decoded into `out` (which must hold one row).
    pub(crate) fn decode_row(&self, i: usize, out: &mut [f32]) {
        let width = out.len();
        let size = self.dtype.size();
        self.dtype
            .decode(&self.bytes()[i * width * size..(i + 1) * width * size], out);
    }
}

/// Where a model's tensors come from: a checkpoint on disk, or tensors computed in memory.
pub trait WeightSource {
    /// The tensor called `name` (a checkpoint key such as `model.layers.0.self_attn.q_proj.weight`), or
    /// `Ok(None)` when there is none.
    fn weight(&self, name: &str) -> Result<Option<Weight>, ModelError>;

    /// Where the tensors come from, for error messages (a path, or a description).
    fn origin(&self) -> String;

    /// The names of all tensors.
    fn names(&self) -> Vec<String>;
}

impl WeightSource for Arc<Model> {
    fn weight(&self, name: &str) -> Result<Option<Weight>, ModelError> {
        Weight::mapped(self, name)
    }

    fn origin(&self) -> String {
        self.root().display().to_string()
    }

    fn names(&self) -> Vec<String> {
        self.tensors().iter().map(|t| t.name.clone()).collect()
    }
}

impl WeightSource for HashMap<String, Weight> {
    fn weight(&self, name: &str) -> Result<Option<Weight>, ModelError> {
        Ok(self.get(name).cloned())
    }

    fn origin(&self) -> String {
        "in-memory model".to_string()
    }

    fn names(&self) -> Vec<String> {
        self.keys().cloned().collect()
    }
}

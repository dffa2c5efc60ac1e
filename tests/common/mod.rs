//! Helpers shared by the integration tests (each test binary uses some of them).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use gemma_merge::format::{FloatType, Model, ModelWriter, TensorSpec};

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

/// Writes a model folder with the given f32 tensors stored as `dtype`, and a minimal config.json.
pub fn write_model(dir: &Path, dtype: FloatType, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    std::fs::create_dir_all(dir).unwrap();
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(n, shape, _)| TensorSpec {
            name: n.to_string(),
            dtype: dtype.dtype(),
            shape: shape.clone(),
        })
        .collect();
    let mut w = ModelWriter::create(dir, specs, u64::MAX).unwrap();
    for (_, _, v) in tensors {
        let mut b = Vec::new();
        dtype.encode(v, &mut b);
        w.write(&b).unwrap();
    }
    w.finish().unwrap();
    std::fs::write(
        dir.join("config.json"),
        "{\"model_type\": \"gemma2\", \"torch_dtype\": \"float32\"}\n",
    )
    .unwrap();
}

/// The gemma-merge binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gemma-merge"))
}

/// What a run of the binary printed, and its exit code (-1 when killed by a signal).
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the binary with `args`.
pub fn gm(args: &[&str]) -> Out {
    let o = bin().args(args).output().expect("binary runs");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// A path as the `&str` argument of a command line (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

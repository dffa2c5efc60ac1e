//! Reading models: memory-mapped safetensors files, validated in full before anything trusts them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Mmap, UncheckedAdvice};
use safetensors::{Dtype, SafeTensors};

use super::error::FormatError;

/// File name of a single-file model.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of the Hugging Face shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One memory-mapped, validated `.safetensors` file.
pub struct SafetensorsFile {
    path: PathBuf,
    /// The open file, for [`Self::read_at`].
    file: std::fs::File,
    mmap: Mmap,
    /// Tensors in the order of their data in the file.
    tensors: Vec<TensorInfo>,
}

/// Where one tensor lives: its file (index into [`Model::files`]) and absolute byte range.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub file: usize,
    /// Absolute byte offset of the data in the file.
    pub start: usize,
    /// Byte length of the data.
    pub len: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl SafetensorsFile {
    /// Maps and validates `path`: header size, UTF-8 JSON, every offset and length (checked arithmetic,
    /// contiguous, `dtype size × elements`), and no bytes after the last tensor.
    pub fn open(path: &Path, file_index: usize) -> Result<Self, FormatError> {
        let file = super::files::open_regular(path).map_err(|e| FormatError::io(path, e))?;
        // SAFETY: the map is read-only. The caller must not truncate or rewrite input files while a merge
        // or evaluation runs (the same contract as every mmap-based safetensors reader); the executor
        // never opens an input for writing and refuses outputs inside an input folder.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| FormatError::io(path, e))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| FormatError::InvalidHeader {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let data_start = 8 + header_len;
        let mut tensors: Vec<TensorInfo> = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| TensorInfo {
                name,
                dtype: info.dtype,
                shape: info.shape.clone(),
                file: file_index,
                start: data_start + info.data_offsets.0,
                len: info.data_offsets.1 - info.data_offsets.0,
            })
            .collect();
        // Zero-element tensors share their offset with a neighbour: the name breaks the tie, so the order
        // (which becomes the output's) does not depend on the header's hashing.
        tensors.sort_by(|a, b| (a.start, a.len, &a.name).cmp(&(b.start, b.len, &b.name)));
        Ok(Self {
            path: path.to_path_buf(),
            file,
            mmap,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.mmap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mmap.is_empty()
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The raw bytes of a range of this file.
    pub fn bytes(&self, start: usize, len: usize) -> &[u8] {
        &self.mmap[start..start + len]
    }

    /// Copies the bytes at `start..start + buf.len()` of this file into `buf` with `pread`: for a pass
    /// that streams a file once, cheaper than touching the map (no page faults, nothing left mapped to
    /// release afterwards), and a file shortened under us is an error instead of a SIGBUS.
    pub fn read_at(&self, start: usize, buf: &mut [u8]) -> Result<(), FormatError> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileExt;
            self.file
                .read_exact_at(buf, start as u64)
                .map_err(|e| FormatError::io(&self.path, e))
        }
        #[cfg(not(unix))]
        {
            buf.copy_from_slice(self.bytes(start, buf.len()));
            Ok(())
        }
    }

    /// Tells the kernel this process no longer needs the pages of a byte range, so they leave our
    /// resident set (they stay in the page cache). Only whole pages inside the range are dropped.
    pub fn release(&self, start: usize, len: usize) {
        const PAGE: usize = 4096;
        let first = start.div_ceil(PAGE) * PAGE;
        let end = (start + len) / PAGE * PAGE;
        if end > first {
            // SAFETY: the mapping is private and read-only; MADV_DONTNEED on it only discards our page
            // table entries, and a later access faults the same file contents back in. No reference into
            // the range is held across this call by code that relies on it staying resident.
            let _ = unsafe {
                self.mmap
                    .unchecked_advise_range(UncheckedAdvice::DontNeed, first, end - first)
            };
        }
    }
}

/// A model: one `.safetensors` file, or a folder with a single file, an index and shards, or several files.
pub struct Model {
    root: PathBuf,
    files: Vec<Arc<SafetensorsFile>>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

impl Model {
    /// Opens and validates every file of the model at `path`.
    pub fn open(path: &Path) -> Result<Self, FormatError> {
        let meta = std::fs::metadata(path).map_err(|e| FormatError::io(path, e))?;
        let (file_paths, index) = if meta.is_dir() {
            discover(path)?
        } else {
            (vec![path.to_path_buf()], None)
        };
        let mut files = Vec::with_capacity(file_paths.len());
        let mut tensors = Vec::new();
        let mut by_name: HashMap<String, usize> = HashMap::new();
        for (i, p) in file_paths.iter().enumerate() {
            let f = SafetensorsFile::open(p, i)?;
            for t in f.tensors() {
                if let Some(&prev) = by_name.get(&t.name) {
                    let first = file_paths[tensors_file(&tensors, prev)].clone();
                    return Err(FormatError::DuplicateTensor {
                        name: t.name.clone(),
                        first,
                        second: p.clone(),
                    });
                }
                by_name.insert(t.name.clone(), tensors.len());
                tensors.push(t.clone());
            }
            files.push(Arc::new(f));
        }
        if let Some((index_path, weight_map)) = index {
            check_index(&index_path, &weight_map, &file_paths, &tensors, &by_name)?;
        }
        Ok(Self {
            root: path.to_path_buf(),
            files,
            tensors,
            by_name,
        })
    }

    /// The path this model was opened from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder holding the model's side files (config.json, tokenizer): the root, or a file's parent.
    pub fn folder(&self) -> &Path {
        if self.root.is_dir() {
            &self.root
        } else {
            self.root.parent().unwrap_or(Path::new("."))
        }
    }

    pub fn files(&self) -> &[Arc<SafetensorsFile>] {
        &self.files
    }

    /// Tensors in file order, then data order within each file.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw little-endian bytes of a tensor.
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        self.files[t.file].bytes(t.start, t.len)
    }

    /// Copies bytes `from..from + buf.len()` of a tensor's data into `buf` (see
    /// [`SafetensorsFile::read_at`]).
    pub fn read_data(
        &self,
        t: &TensorInfo,
        from: usize,
        buf: &mut [u8],
    ) -> Result<(), FormatError> {
        assert!(
            from + buf.len() <= t.len,
            "read past the end of tensor `{}`",
            t.name
        );
        self.files[t.file].read_at(t.start + from, buf)
    }

    /// The file a tensor is stored in.
    pub fn file_of(&self, t: &TensorInfo) -> &SafetensorsFile {
        &self.files[t.file]
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.len as u64).sum()
    }

    /// `config.json` beside the weights, if there is one.
    pub fn config(&self) -> Result<Option<serde_json::Value>, FormatError> {
        read_config(self.folder())
    }
}

fn tensors_file(tensors: &[TensorInfo], i: usize) -> usize {
    tensors[i].file
}

/// Reads `DIR/config.json` as JSON (key order kept), `None` when absent.
pub fn read_config(dir: &Path) -> Result<Option<serde_json::Value>, FormatError> {
    let path = dir.join("config.json");
    match super::files::read_text_limited(&path, super::files::SIDE_FILE_LIMIT) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| FormatError::InvalidConfig {
                path,
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(FormatError::io(path, e)),
    }
}

type WeightMap = Vec<(String, String)>;
/// A folder's weight files, and its index (path and weight map) when it has one.
type Discovered = (Vec<PathBuf>, Option<(PathBuf, WeightMap)>);

/// Finds the weight files of a model folder, and its index if it has one.
fn discover(dir: &Path) -> Result<Discovered, FormatError> {
    let index_path = dir.join(INDEX_FILE);
    // `exists`, not `is_file`: a FIFO or device under a weight file's name is refused by name when
    // opened, rather than silently passed over.
    if index_path.exists() {
        let text = super::files::read_text_limited(&index_path, super::files::SIDE_FILE_LIMIT)
            .map_err(|e| FormatError::io(&index_path, e))?;
        let bad = |reason: String| FormatError::InvalidIndex {
            path: index_path.clone(),
            reason,
        };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no \"weight_map\" object".into()))?;
        let mut weight_map = Vec::with_capacity(map.len());
        let mut shards: Vec<String> = Vec::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(format!("weight_map[{name:?}] is not a string")))?;
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(bad(format!("shard name {file:?} is not a plain file name")));
            }
            if !shards.iter().any(|s| s == file) {
                shards.push(file.to_string());
            }
            weight_map.push((name.clone(), file.to_string()));
        }
        if shards.is_empty() {
            return Err(bad("empty weight_map".into()));
        }
        shards.sort();
        let paths = shards.iter().map(|s| dir.join(s)).collect();
        return Ok((paths, Some((index_path, weight_map))));
    }
    let single = dir.join(SINGLE_FILE);
    if single.exists() {
        return Ok((vec![single], None));
    }
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| FormatError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    if paths.is_empty() {
        return Err(FormatError::NoWeights {
            path: dir.to_path_buf(),
        });
    }
    paths.sort();
    Ok((paths, None))
}

/// Every index entry must point at the shard that really holds the tensor, and every tensor must be indexed.
fn check_index(
    index_path: &Path,
    weight_map: &WeightMap,
    file_paths: &[PathBuf],
    tensors: &[TensorInfo],
    by_name: &HashMap<String, usize>,
) -> Result<(), FormatError> {
    let bad = |reason: String| FormatError::InvalidIndex {
        path: index_path.to_path_buf(),
        reason,
    };
    for (name, file) in weight_map {
        let Some(&i) = by_name.get(name) else {
            return Err(bad(format!(
                "tensor `{name}` is listed in {file} but not stored there"
            )));
        };
        let actual = &file_paths[tensors[i].file];
        if actual.file_name().and_then(|n| n.to_str()) != Some(file.as_str()) {
            return Err(bad(format!(
                "tensor `{name}` is listed in {file} but stored in {}",
                actual.display()
            )));
        }
    }
    if weight_map.len() != tensors.len() {
        let listed: std::collections::HashSet<&str> =
            weight_map.iter().map(|(n, _)| n.as_str()).collect();
        if let Some(t) = tensors.iter().find(|t| !listed.contains(t.name.as_str())) {
            return Err(bad(format!(
                "tensor `{}` is stored in {} but missing from the index",
                t.name,
                file_paths[t.file].display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::writer::{ModelWriter, TensorSpec};
    use proptest::prelude::*;

    fn write(dir: &Path, names: &[&str]) {
        let specs = names
            .iter()
            .map(|n| TensorSpec {
                name: n.to_string(),
                dtype: Dtype::F32,
                shape: vec![2],
            })
            .collect();
        let mut w = ModelWriter::create(dir, specs, u64::MAX).unwrap();
        for _ in names {
            w.write(&[0u8; 8]).unwrap();
        }
        w.finish().unwrap();
    }

    #[test]
    fn a_folder_without_weights_is_named() {
        let d = tempfile::tempdir().unwrap();
        let e = Model::open(d.path()).err().unwrap();
        assert!(matches!(e, FormatError::NoWeights { .. }), "{e}");
        assert!(e.to_string().contains("no .safetensors files"));
    }

    #[test]
    fn several_files_without_index_are_one_model_and_duplicates_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        write(&a, &["x", "y"]);
        write(&b, &["z"]);
        std::fs::rename(a.join(SINGLE_FILE), d.path().join("part-1.safetensors")).unwrap();
        std::fs::rename(b.join(SINGLE_FILE), d.path().join("part-2.safetensors")).unwrap();
        let m = Model::open(d.path()).unwrap();
        assert_eq!(
            m.tensors()
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>(),
            ["x", "y", "z"]
        );
        write(&b, &["y"]);
        std::fs::rename(b.join(SINGLE_FILE), d.path().join("part-3.safetensors")).unwrap();
        let e = Model::open(d.path()).err().unwrap();
        assert!(matches!(e, FormatError::DuplicateTensor { .. }), "{e}");
        assert!(e.to_string().contains("tensor `y` appears in both"), "{e}");
    }

    #[test]
    fn an_index_must_agree_with_its_shards() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), &["x", "y"]);
        std::fs::rename(d.path().join(SINGLE_FILE), d.path().join("s1.safetensors")).unwrap();
        let index = |map: &str| {
            std::fs::write(
                d.path().join(INDEX_FILE),
                format!("{{\"weight_map\": {{{map}}}}}"),
            )
            .unwrap()
        };
        index(r#""x": "s1.safetensors", "y": "s1.safetensors""#);
        assert_eq!(Model::open(d.path()).unwrap().tensors().len(), 2);
        index(r#""x": "s1.safetensors""#);
        let e = Model::open(d.path()).err().unwrap();
        assert!(
            e.to_string().contains("tensor `y` is stored in")
                && e.to_string().contains("missing from the index"),
            "{e}"
        );
        index(r#""x": "s1.safetensors", "y": "s1.safetensors", "w": "s1.safetensors""#);
        assert!(Model::open(d.path())
            .err()
            .unwrap()
            .to_string()
            .contains("tensor `w` is listed in s1.safetensors but not stored there"));
        index(r#""x": "../s1.safetensors""#);
        assert!(Model::open(d.path())
            .err()
            .unwrap()
            .to_string()
            .contains("is not a plain file name"));
        index(r#""x": "missing.safetensors""#);
        let e = Model::open(d.path()).err().unwrap();
        assert!(
            matches!(e, FormatError::Io { .. }) && e.to_string().contains("missing.safetensors"),
            "{e}"
        );
        std::fs::write(d.path().join(INDEX_FILE), "{").unwrap();
        assert!(matches!(
            Model::open(d.path()).err().unwrap(),
            FormatError::InvalidIndex { .. }
        ));
    }

    #[test]
    fn trailing_bytes_and_bad_offsets_are_invalid_headers() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), &["x"]);
        let p = d.path().join(SINGLE_FILE);
        let good = std::fs::read(&p).unwrap();
        let mut longer = good.clone();
        longer.push(0);
        std::fs::write(&p, &longer).unwrap();
        let e = Model::open(&p).err().unwrap();
        assert!(matches!(e, FormatError::InvalidHeader { .. }), "{e}");
        assert!(e.to_string().contains(p.to_str().unwrap()));
        // A header whose data_offsets do not match dtype × shape.
        let text = String::from_utf8_lossy(&good)
            .replace("\"data_offsets\":[0,8]", "\"data_offsets\":[0,7]");
        std::fs::write(&p, text.as_bytes()).unwrap();
        assert!(matches!(
            Model::open(&p).err().unwrap(),
            FormatError::InvalidHeader { .. }
        ));
    }

    #[test]
    fn an_invalid_config_is_named() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), &["x"]);
        std::fs::write(d.path().join("config.json"), "{nope").unwrap();
        let e = Model::open(d.path()).unwrap().config().err().unwrap();
        assert!(
            matches!(e, FormatError::InvalidConfig { .. }) && e.to_string().contains("config.json"),
            "{e}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// Whatever the bytes, opening them is an error or a model, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), header in 0u64..120) {
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("x.safetensors");
            let mut data = header.to_le_bytes().to_vec();
            data.extend_from_slice(&bytes);
            std::fs::write(&p, &data).unwrap();
            let _ = Model::open(&p);
        }
    }
}

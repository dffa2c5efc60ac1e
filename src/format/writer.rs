//! Writing models: each shard's header is computed up front from the plan, then tensor data streams in
//! after it, hashed (SHA-256) on the way to disk. A whole shard is never held in memory.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use sha2::{Digest, Sha256};

use super::dtype::dtype_name;
use super::error::FormatError;
use super::reader::{INDEX_FILE, SINGLE_FILE};

/// Name, dtype and shape of a tensor to write; its byte length follows from them.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn byte_len(&self) -> u64 {
        let bits =
            self.shape.iter().map(|&d| d as u64).product::<u64>() * self.dtype.bitsize() as u64;
        bits.div_ceil(8)
    }
}

/// A written file: its name inside the output folder, size and SHA-256 (hex).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileRecord {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// Splits tensors, in order, into shards of at most `max_bytes` of data each (a larger tensor gets a
/// shard of its own), as Hugging Face's `save_pretrained` does.
pub fn plan_shards(specs: &[TensorSpec], max_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut size = 0u64;
    for (i, s) in specs.iter().enumerate() {
        let len = s.byte_len();
        if !current.is_empty() && size + len > max_bytes {
            shards.push(std::mem::take(&mut current));
            size = 0;
        }
        current.push(i);
        size += len;
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    shards
}

/// File name of shard `k` (0-based) of `n`: `model.safetensors` alone, else `model-0000k-of-0000n.safetensors`.
pub fn shard_name(k: usize, n: usize) -> String {
    if n == 1 {
        SINGLE_FILE.to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
    }
}

/// The complete header of a safetensors file holding `specs` in order: 8-byte length, then compact JSON
/// with `{"format":"pt"}` metadata first, padded with spaces to a multiple of 8 (as the reference writer).
pub fn header_bytes(specs: &[&TensorSpec]) -> Vec<u8> {
    let mut json = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut offset = 0u64;
    for s in specs {
        let end = offset + s.byte_len();
        let shape: Vec<String> = s.shape.iter().map(|d| d.to_string()).collect();
        json.push_str(&format!(
            ",{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
            serde_json::to_string(&s.name).expect("a string serializes"),
            dtype_name(s.dtype),
            shape.join(",")
        ));
        offset = end;
    }
    json.push('}');
    while (json.len() + 8) % 8 != 0 {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    out
}

/// A file being written, hashed as bytes go by.
pub struct HashingFile {
    path: PathBuf,
    name: String,
    out: BufWriter<File>,
    hasher: Sha256,
    size: u64,
    /// Bytes handed to the kernel's writeback so far (see [`WRITEBACK_STEP`]).
    started: u64,
}

/// Small writes are gathered up to this size; larger ones (a merge's chunks) go to the file directly.
const BUFFER: usize = 64 << 10;

/// Every this many bytes written, the kernel is asked to start writing them to the disk
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait), so that the final fsync finds little
/// left to do instead of the whole file: writing to the disk overlaps computing the rest.
const WRITEBACK_STEP: u64 = 64 << 20;

impl HashingFile {
    pub fn create(dir: &Path, name: &str) -> Result<Self, FormatError> {
        let path = dir.join(name);
        let file = File::create(&path).map_err(|e| FormatError::io(&path, e))?;
        Ok(Self {
            path,
            name: name.to_string(),
            out: BufWriter::with_capacity(BUFFER, file),
            hasher: Sha256::new(),
            size: 0,
            started: 0,
        })
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<(), FormatError> {
        self.hasher.update(bytes);
        self.size += bytes.len() as u64;
        self.out
            .write_all(bytes)
            .map_err(|e| FormatError::io(&self.path, e))?;
        // What reached the file (the buffer may hold the last small writes).
        let written = self.size - self.out.buffer().len() as u64;
        if written - self.started >= WRITEBACK_STEP {
            start_writeback(self.out.get_ref(), self.started, written - self.started);
            self.started = written;
        }
        Ok(())
    }

    pub fn finish(mut self) -> Result<FileRecord, FormatError> {
        self.out
            .flush()
            .map_err(|e| FormatError::io(&self.path, e))?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| FormatError::io(&self.path, e.into_error()))?;
        file.sync_all()
            .map_err(|e| FormatError::io(&self.path, e))?;
        Ok(FileRecord {
            path: self.name,
            size: self.size,
            sha256: hex(&self.hasher.finalize()),
        })
    }
}

/// Asks the kernel to start writing bytes `offset..offset + len` of `file` to the disk, without waiting
/// (Linux; elsewhere the final fsync does it all). A failure here changes nothing: fsync reports errors.
fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: a plain syscall on an open descriptor; it reads no memory of ours.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// Writes a small file whole and returns its record.
pub fn write_small_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<FileRecord, FormatError> {
    let mut f = HashingFile::create(dir, name)?;
    f.write(bytes)?;
    f.finish()
}

/// Lowercase hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a model's tensors, in the order of its specs, into shards and (if more than one) an index.
pub struct ModelWriter {
    dir: PathBuf,
    specs: Vec<TensorSpec>,
    shards: Vec<Vec<usize>>,
    /// The shards this writer writes, in order: all of them, or one part's (see [`ModelWriter::create_part`]).
    selected: Vec<usize>,
    /// Position in `selected` of the shard being written, and position in its tensor list.
    pos: usize,
    shard: usize,
    slot: usize,
    /// Bytes still due for the current tensor.
    remaining: u64,
    file: Option<HashingFile>,
    records: Vec<FileRecord>,
}

impl ModelWriter {
    pub fn create(
        dir: &Path,
        specs: Vec<TensorSpec>,
        shard_size: u64,
    ) -> Result<Self, FormatError> {
        let n = plan_shards(&specs, shard_size).len();
        Self::create_part(dir, specs, shard_size, &(0..n).collect::<Vec<_>>())
    }

    /// A writer of only the shards `selected` (indices into [`plan_shards`]`(specs, shard_size)`, increasing):
    /// it takes the data of their tensors only, in order, and writes no index. Each shard's bytes are
    /// exactly those of the same shard written by [`ModelWriter::create`].
    pub fn create_part(
        dir: &Path,
        specs: Vec<TensorSpec>,
        shard_size: u64,
        selected: &[usize],
    ) -> Result<Self, FormatError> {
        let shards = plan_shards(&specs, shard_size);
        assert!(
            selected.windows(2).all(|w| w[0] < w[1]) && selected.iter().all(|&k| k < shards.len()),
            "selected shards must be increasing shard indices"
        );
        let mut w = Self {
            dir: dir.to_path_buf(),
            specs,
            shards,
            selected: selected.to_vec(),
            pos: 0,
            shard: selected.first().copied().unwrap_or(0),
            slot: 0,
            remaining: 0,
            file: None,
            records: Vec::new(),
        };
        if !w.selected.is_empty() {
            w.open_shard()?;
            w.skip_empty()?;
        }
        Ok(w)
    }

    /// The file names this writer produces, in order (the index last, when there is one).
    pub fn file_names(&self) -> Vec<String> {
        let n = self.shards.len();
        let mut v: Vec<String> = (0..n).map(|k| shard_name(k, n)).collect();
        if n > 1 {
            v.push(INDEX_FILE.to_string());
        }
        v
    }

    fn open_shard(&mut self) -> Result<(), FormatError> {
        let n = self.shards.len();
        let specs: Vec<&TensorSpec> = self.shards[self.shard]
            .iter()
            .map(|&i| &self.specs[i])
            .collect();
        let mut f = HashingFile::create(&self.dir, &shard_name(self.shard, n))?;
        f.write(&header_bytes(&specs))?;
        self.file = Some(f);
        self.slot = 0;
        self.remaining = specs.first().map(|s| s.byte_len()).unwrap_or(0);
        Ok(())
    }

    /// Appends data of the current tensor; a call never spans two tensors. Zero-element tensors take no
    /// data: the writer moves past them by itself.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), FormatError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let len = bytes.len() as u64;
        let Some(file) = self.file.as_mut().filter(|_| len <= self.remaining) else {
            let name = self
                .shards
                .get(self.shard)
                .and_then(|s| s.get(self.slot))
                .map(|&i| self.specs[i].name.as_str())
                .unwrap_or("(none: every tensor is written)");
            return Err(FormatError::io(
                &self.dir,
                std::io::Error::other(format!(
                    "{len} bytes given for tensor `{name}`, which has {} left",
                    self.remaining
                )),
            ));
        };
        file.write(bytes)?;
        self.remaining -= len;
        self.skip_empty()
    }

    /// Moves past finished tensors and zero-element ones (and past shards that are complete).
    fn skip_empty(&mut self) -> Result<(), FormatError> {
        while self.remaining == 0 && self.file.is_some() {
            self.advance()?;
        }
        Ok(())
    }

    /// Moves past a finished tensor (and a finished shard).
    fn advance(&mut self) -> Result<(), FormatError> {
        self.slot += 1;
        if self.slot < self.shards[self.shard].len() {
            self.remaining = self.specs[self.shards[self.shard][self.slot]].byte_len();
            return Ok(());
        }
        let f = self.file.take().expect("an open shard");
        self.records.push(f.finish()?);
        if self.pos + 1 < self.selected.len() {
            self.pos += 1;
            self.shard = self.selected[self.pos];
            self.open_shard()?;
        }
        Ok(())
    }

    /// Checks that every tensor was written, writes the index when sharded (and every shard was written
    /// here), returns the files written.
    pub fn finish(mut self) -> Result<Vec<FileRecord>, FormatError> {
        if self.file.is_some() || self.records.len() != self.selected.len() {
            return Err(FormatError::io(
                &self.dir,
                std::io::Error::other("output ended before every tensor was written"),
            ));
        }
        if self.selected.len() == self.shards.len() {
            if let Some(text) = index_text(&self.specs, &self.shards) {
                self.records
                    .push(write_small_file(&self.dir, INDEX_FILE, text.as_bytes())?);
            }
        }
        Ok(self.records)
    }
}

/// The text of `model.safetensors.index.json` for `specs` split into `shards` (see [`plan_shards`]), or
/// `None` for a single shard (which has no index).
pub fn index_text(specs: &[TensorSpec], shards: &[Vec<usize>]) -> Option<String> {
    let n = shards.len();
    if n <= 1 {
        return None;
    }
    let total: u64 = specs.iter().map(|s| s.byte_len()).sum();
    let mut map: Vec<(&str, String)> = Vec::new();
    for (k, shard) in shards.iter().enumerate() {
        for &i in shard {
            map.push((&specs[i].name, shard_name(k, n)));
        }
    }
    map.sort();
    let mut weight_map = serde_json::Map::new();
    for (name, file) in map {
        weight_map.insert(name.to_string(), serde_json::Value::String(file));
    }
    let index =
        serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    let mut text = serde_json::to_string_pretty(&index).expect("JSON serializes");
    text.push('\n');
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::reader::Model;

    fn spec(name: &str, dtype: Dtype, shape: &[usize]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn shards_respect_the_limit_and_keep_order() {
        let specs = vec![
            spec("a", Dtype::F32, &[10]),
            spec("b", Dtype::F32, &[10]),
            spec("c", Dtype::F32, &[30]),
            spec("d", Dtype::BF16, &[4]),
        ];
        assert_eq!(plan_shards(&specs, 80), vec![vec![0, 1], vec![2], vec![3]]);
        assert_eq!(plan_shards(&specs, 1000), vec![vec![0, 1, 2, 3]]);
        assert_eq!(
            plan_shards(&specs, 1),
            vec![vec![0], vec![1], vec![2], vec![3]]
        );
    }

    #[test]
    fn header_is_aligned_and_readable() {
        let a = spec("x", Dtype::BF16, &[3]);
        let h = header_bytes(&[&a]);
        assert_eq!(h.len() % 8, 0);
        let n = u64::from_le_bytes(h[..8].try_into().unwrap()) as usize;
        assert_eq!(n + 8, h.len());
        let json: serde_json::Value = serde_json::from_slice(&h[8..]).unwrap();
        assert_eq!(json["__metadata__"]["format"], "pt");
        assert_eq!(json["x"]["data_offsets"], serde_json::json!([0, 6]));
    }

    #[test]
    fn round_trip_through_the_reader_sharded() {
        let dir = tempfile::tempdir().unwrap();
        let specs = vec![
            spec("w1", Dtype::F32, &[2, 2]),
            spec("w2", Dtype::BF16, &[3]),
            spec("ids", Dtype::I64, &[2]),
        ];
        let mut w = ModelWriter::create(dir.path(), specs, 22).unwrap();
        assert_eq!(
            w.file_names(),
            vec![
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                INDEX_FILE
            ]
        );
        let w1: Vec<u8> = [1f32, 2., 3., 4.]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        w.write(&w1[..4]).unwrap();
        w.write(&w1[4..]).unwrap();
        w.write(&[1, 2, 3, 4, 5, 6]).unwrap();
        w.write(&7i64.to_le_bytes()).unwrap();
        w.write(&8i64.to_le_bytes()).unwrap();
        let records = w.finish().unwrap();
        assert_eq!(records.len(), 3);
        for r in &records {
            let bytes = std::fs::read(dir.path().join(&r.path)).unwrap();
            assert_eq!(bytes.len() as u64, r.size);
            assert_eq!(hex(&Sha256::digest(&bytes)), r.sha256);
        }
        let m = Model::open(dir.path()).unwrap();
        assert_eq!(m.data(m.get("w1").unwrap()), &w1[..]);
        assert_eq!(m.data(m.get("w2").unwrap()), &[1, 2, 3, 4, 5, 6]);
        assert_eq!(m.get("ids").unwrap().shape, vec![2]);
    }

    #[test]
    fn a_part_writes_the_same_shard_bytes_and_no_index() {
        let specs = vec![
            spec("a", Dtype::F32, &[4]),
            spec("b", Dtype::BF16, &[6]),
            spec("c", Dtype::F32, &[2]),
            spec("d", Dtype::I64, &[1]),
        ];
        let data: Vec<Vec<u8>> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                (0..s.byte_len())
                    .map(|b| (b as u8) ^ (i as u8 * 40))
                    .collect()
            })
            .collect();
        assert_eq!(plan_shards(&specs, 12).len(), 4);
        let full = tempfile::tempdir().unwrap();
        let mut w = ModelWriter::create(full.path(), specs.clone(), 12).unwrap();
        for d in &data {
            w.write(d).unwrap();
        }
        let all = w.finish().unwrap();
        assert_eq!(all.len(), 5);
        let part = tempfile::tempdir().unwrap();
        let mut w = ModelWriter::create_part(part.path(), specs.clone(), 12, &[1, 3]).unwrap();
        w.write(&data[1]).unwrap();
        w.write(&data[3]).unwrap();
        let some = w.finish().unwrap();
        assert_eq!(some, vec![all[1].clone(), all[3].clone()]);
        let mut names: Vec<String> = std::fs::read_dir(part.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec![shard_name(1, 4), shard_name(3, 4)]);
        // The index a join writes is the plain run's.
        let index = std::fs::read_to_string(full.path().join(INDEX_FILE)).unwrap();
        assert_eq!(index_text(&specs, &plan_shards(&specs, 12)), Some(index));
        assert_eq!(index_text(&specs, &plan_shards(&specs, 1000)), None);
        // A part with no shard writes nothing; one fed too little is an error.
        let empty = tempfile::tempdir().unwrap();
        let w = ModelWriter::create_part(empty.path(), specs.clone(), 12, &[]).unwrap();
        assert!(w.finish().unwrap().is_empty());
        let short = ModelWriter::create_part(empty.path(), specs, 12, &[0]).unwrap();
        assert!(short.finish().is_err());
    }

    #[test]
    fn zero_element_tensors_anywhere_are_written_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        // Empty tensors first, in the middle, last, and a shard holding only empty tensors.
        let specs = vec![
            spec("e0", Dtype::F32, &[0]),
            spec("e1", Dtype::BF16, &[0, 5]),
            spec("a", Dtype::F32, &[2]),
            spec("e2", Dtype::F32, &[3, 0]),
            spec("b", Dtype::F32, &[1]),
            spec("e3", Dtype::F16, &[0]),
        ];
        let mut w = ModelWriter::create(dir.path(), specs.clone(), 8).unwrap();
        w.write(&[1, 0, 0, 0, 2, 0, 0, 0]).unwrap();
        w.write(&[]).unwrap();
        w.write(&[3, 0, 0, 0]).unwrap();
        assert!(w.write(&[9]).is_err(), "more bytes than the model holds");
        let records = w.finish().unwrap();
        assert_eq!(records.len(), 3, "{records:?}");
        let m = Model::open(dir.path()).unwrap();
        let names: Vec<&str> = m.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["e0", "e1", "a", "e2", "b", "e3"]);
        assert_eq!(m.get("e1").unwrap().shape, vec![0, 5]);
        assert_eq!(m.data(m.get("a").unwrap()), &[1, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(m.data(m.get("b").unwrap()), &[3, 0, 0, 0]);
        // A model of empty tensors only needs no data at all.
        let d2 = tempfile::tempdir().unwrap();
        let w = ModelWriter::create(d2.path(), specs[..2].to_vec(), u64::MAX).unwrap();
        w.finish().unwrap();
        assert_eq!(Model::open(d2.path()).unwrap().tensors().len(), 2);
    }

    #[test]
    fn too_many_bytes_for_a_tensor_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut w =
            ModelWriter::create(dir.path(), vec![spec("w", Dtype::F32, &[1])], 100).unwrap();
        let e = w.write(&[0; 5]).unwrap_err().to_string();
        assert!(e.contains("tensor `w`") && e.contains("has 4 left"), "{e}");
    }

    #[test]
    fn finishing_early_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let w = ModelWriter::create(dir.path(), vec![spec("w", Dtype::F32, &[2])], 100).unwrap();
        assert!(w.finish().is_err());
    }
}

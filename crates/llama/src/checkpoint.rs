//! Tensors of HF safetensors checkpoints (one file, or shards listed in
//! `model.safetensors.index.json`), and atomic writing of safetensors and other files.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
pub use safetensors::Dtype;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{SafeTensorError, SafeTensors, View};

use crate::error::ModelError;
use crate::json::{self, Fields};

/// The single-file checkpoint in a model directory.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The shard index of a sharded checkpoint in a model directory.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The size of the little-endian header length that starts every safetensors file.
const HEADER_LENGTH_BYTES: usize = 8;

const FLOAT_DTYPES: &str = "a float dtype (F32, BF16, F16 or F64)";
const INTEGER_DTYPES: &str = "an integer dtype (I64 or I32)";

/// The tensors of a safetensors checkpoint, memory-mapped and validated on open.
///
/// Tensors are converted when read, so the whole checkpoint is never copied at once.
#[derive(Debug)]
pub struct Checkpoint {
    /// The file, or the shard index, that errors about missing tensors name.
    source: PathBuf,
    files: Vec<MappedFile>,
    /// Each tensor's file, as an index into `files`.
    locations: BTreeMap<String, usize>,
}

impl Checkpoint {
    /// Opens a checkpoint.
    ///
    /// `path` is a model directory (holding `model.safetensors.index.json` and its shards, or
    /// `model.safetensors`), a `.safetensors` file, or a `*.index.json` shard index.
    ///
    /// # Errors
    ///
    /// - [`ModelError::NotFound`] if a directory holds neither file;
    /// - [`ModelError::Io`] if a file, or a shard the index lists, cannot be opened;
    /// - [`ModelError::Safetensors`] if a file is truncated or its header is corrupt;
    /// - [`ModelError::Json`] / [`ModelError::ConfigField`] if the index is malformed;
    /// - [`ModelError::MissingTensor`] if the index places a tensor in a shard that lacks it.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        if path.is_dir() {
            let index = path.join(INDEX_FILE);
            if index.is_file() {
                return Self::open_sharded(&index);
            }
            let single = path.join(SINGLE_FILE);
            if single.is_file() {
                return Self::open_single(&single);
            }
            let hint = if path.join("pytorch_model.bin").exists()
                || path.join("pytorch_model.bin.index.json").exists()
            {
                "; it has PyTorch .bin weights, which cannot be read: re-save the model with \
                 transformers' `save_pretrained(..., safe_serialization=True)`"
            } else {
                ""
            };
            return Err(ModelError::NotFound {
                what: format!(
                    "{}: no {SINGLE_FILE} or {INDEX_FILE} in this directory{hint}",
                    path.display()
                ),
            });
        }
        let is_index = path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.ends_with(".index.json"));
        if is_index {
            Self::open_sharded(path)
        } else {
            Self::open_single(path)
        }
    }

    fn open_single(path: &Path) -> Result<Self, ModelError> {
        let file = MappedFile::open(path, "open")?;
        let locations = file
            .metadata
            .offset_keys()
            .into_iter()
            .map(|name| (name, 0))
            .collect();
        Ok(Self {
            source: path.to_path_buf(),
            files: vec![file],
            locations,
        })
    }

    fn open_sharded(index_path: &Path) -> Result<Self, ModelError> {
        let weight_map = read_weight_map(index_path)?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut files = Vec::new();
        let mut file_of_shard: HashMap<&str, usize> = HashMap::new();
        let mut locations = BTreeMap::new();
        for (name, shard) in &weight_map {
            let index = match file_of_shard.get(shard.as_str()) {
                Some(&index) => index,
                None => {
                    let file = MappedFile::open(
                        &dir.join(shard),
                        "open the shard listed in model.safetensors.index.json",
                    )?;
                    files.push(file);
                    file_of_shard.insert(shard, files.len() - 1);
                    files.len() - 1
                }
            };
            let file = &files[index];
            if file.metadata.info(name).is_none() {
                return Err(ModelError::MissingTensor {
                    path: file.path.clone(),
                    name: name.clone(),
                });
            }
            locations.insert(name.clone(), index);
        }
        Ok(Self {
            source: index_path.to_path_buf(),
            files,
            locations,
        })
    }

    /// The file, or the shard index, the checkpoint was opened from.
    pub fn path(&self) -> &Path {
        &self.source
    }

    /// Whether the checkpoint holds a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.locations.contains_key(name)
    }

    /// The names of all tensors, in lexicographic order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.locations.keys().map(String::as_str)
    }

    /// The shape of tensor `name`.
    ///
    /// # Errors
    ///
    /// [`ModelError::MissingTensor`] if there is no such tensor.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, ModelError> {
        Ok(self.tensor(name)?.1.shape.clone())
    }

    /// The stored dtype of tensor `name`.
    ///
    /// # Errors
    ///
    /// [`ModelError::MissingTensor`] if there is no such tensor.
    pub fn dtype(&self, name: &str) -> Result<Dtype, ModelError> {
        Ok(self.tensor(name)?.1.dtype)
    }

    /// Reads tensor `name` as f32, in row-major order, checking it has `expected_shape`.
    ///
    /// F32, BF16 and F16 convert exactly; F64 rounds to nearest.
    ///
    /// # Errors
    ///
    /// [`ModelError::MissingTensor`], [`ModelError::ShapeMismatch`], or [`ModelError::DType`]
    /// for a non-float tensor; each names the tensor and its file.
    pub fn read_f32(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let (file, info) = self.tensor_with_shape(name, expected_shape)?;
        let bytes = file.bytes(info);
        match info.dtype {
            Dtype::F32 => Ok(decode(bytes, f32::from_le_bytes)),
            Dtype::BF16 => Ok(decode(bytes, |b| bf16::from_le_bytes(b).to_f32())),
            Dtype::F16 => Ok(decode(bytes, |b| f16::from_le_bytes(b).to_f32())),
            // Rounding to the nearest f32 is the intent: the model computes in f32.
            Dtype::F64 => Ok(decode(bytes, |b| f64::from_le_bytes(b) as f32)),
            other => Err(file.dtype_error(name, other, FLOAT_DTYPES)),
        }
    }

    /// Reads integer tensor `name` (e.g. token ids) as i64, checking it has `expected_shape`.
    ///
    /// # Errors
    ///
    /// [`ModelError::MissingTensor`], [`ModelError::ShapeMismatch`], or [`ModelError::DType`]
    /// unless the tensor is I64 or I32; each names the tensor and its file.
    pub fn read_i64(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<i64>, ModelError> {
        let (file, info) = self.tensor_with_shape(name, expected_shape)?;
        let bytes = file.bytes(info);
        match info.dtype {
            Dtype::I64 => Ok(decode(bytes, i64::from_le_bytes)),
            Dtype::I32 => Ok(decode(bytes, |b| i64::from(i32::from_le_bytes(b)))),
            other => Err(file.dtype_error(name, other, INTEGER_DTYPES)),
        }
    }

    fn tensor(&self, name: &str) -> Result<(&MappedFile, &TensorInfo), ModelError> {
        let missing = || ModelError::MissingTensor {
            path: self.source.clone(),
            name: name.to_string(),
        };
        let file = &self.files[*self.locations.get(name).ok_or_else(missing)?];
        let info = file.metadata.info(name).ok_or_else(missing)?;
        Ok((file, info))
    }

    fn tensor_with_shape(
        &self,
        name: &str,
        expected_shape: &[usize],
    ) -> Result<(&MappedFile, &TensorInfo), ModelError> {
        let (file, info) = self.tensor(name)?;
        if info.shape != expected_shape {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                path: file.path.clone(),
                expected: expected_shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        Ok((file, info))
    }
}

/// Little-endian elements of `N` bytes each, converted by `convert`.
fn decode<T, const N: usize>(bytes: &[u8], convert: impl Fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|chunk| {
            let mut element = [0; N];
            element.copy_from_slice(chunk);
            convert(element)
        })
        .collect()
}

/// The shard files of a sharded checkpoint, from the `weight_map` of its index.
///
/// # Errors
///
/// [`ModelError::Io`] / [`ModelError::Json`] if the index cannot be read, and
/// [`ModelError::ConfigField`] if `weight_map` is missing, is not an object of strings, or
/// names a shard outside the index's directory.
pub(crate) fn read_weight_map(index_path: &Path) -> Result<BTreeMap<String, String>, ModelError> {
    let root = json::read_object(index_path)?;
    let fields = Fields::new(index_path, &root);
    let weight_map = fields.optional_object("weight_map")?.ok_or_else(|| {
        fields.error(
            "weight_map",
            "is missing; expected an object mapping tensor names to shard files",
        )
    })?;
    weight_map
        .keys()
        .map(|name| {
            let shard = weight_map.required_str(name)?;
            let inside_dir = !shard.is_empty()
                && Path::new(shard)
                    .components()
                    .all(|part| matches!(part, Component::Normal(_)));
            if !inside_dir {
                return Err(weight_map.error(
                    name,
                    format!(
                        "is \"{shard}\"; shard files must be relative paths inside the \
                         checkpoint's directory"
                    ),
                ));
            }
            Ok((name.to_string(), shard.to_string()))
        })
        .collect()
}

/// One memory-mapped safetensors file with its validated header.
#[derive(Debug)]
struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section: the header length prefix plus the header.
    data_start: usize,
    metadata: Metadata,
}

impl MappedFile {
    /// Maps `path` and validates its header; `action` describes the open in I/O errors.
    fn open(path: &Path, action: &'static str) -> Result<Self, ModelError> {
        let file = File::open(path).map_err(|e| ModelError::io(action, path, e))?;
        let mmap = map_read_only(&file).map_err(|e| ModelError::io("memory-map", path, e))?;
        // `read_metadata` checks that every tensor's byte range lies inside the file and that
        // the ranges tile the data section exactly, so `bytes` below cannot go out of bounds.
        let (header_length, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| ModelError::Safetensors {
                path: path.to_path_buf(),
                message: explain(&e, mmap.len()),
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            data_start: HEADER_LENGTH_BYTES + header_length,
            metadata,
        })
    }

    fn bytes(&self, info: &TensorInfo) -> &[u8] {
        let (start, end) = info.data_offsets;
        &self.mmap[self.data_start + start..self.data_start + end]
    }

    fn dtype_error(&self, name: &str, dtype: Dtype, expected: &'static str) -> ModelError {
        ModelError::DType {
            name: name.to_string(),
            path: self.path.clone(),
            dtype: dtype.to_string(),
            expected,
        }
    }
}

#[allow(unsafe_code)]
fn map_read_only(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the map is read-only and owned by `MappedFile`, which hands out slices borrowed
    // from itself only. Soundness needs the file not to be truncated or rewritten in place
    // while mapped: the usual contract for reading model weights by mmap (transformers and
    // candle rely on it too). This crate itself only ever replaces files by renaming a new one
    // over them, which leaves existing maps intact.
    unsafe { Mmap::map(file) }
}

/// A safetensors error, reworded for someone who does not know the format.
fn explain(error: &SafeTensorError, file_len: usize) -> String {
    match error {
        SafeTensorError::HeaderTooSmall => format!(
            "the file is {file_len} bytes, too short even for the 8-byte header length \
             (empty or truncated)"
        ),
        SafeTensorError::InvalidHeaderLength => format!(
            "the header length in the first 8 bytes points beyond the end of the {file_len}-byte \
             file (truncated, or not a safetensors file)"
        ),
        SafeTensorError::HeaderTooLarge => {
            "the header length in the first 8 bytes exceeds 100 MB (not a safetensors file?)"
                .to_string()
        }
        SafeTensorError::MetadataIncompleteBuffer => format!(
            "the tensors listed in the header do not add up to the {file_len}-byte file \
             (truncated, or trailing bytes)"
        ),
        SafeTensorError::InvalidOffset(name) => {
            format!("tensor `{name}` has data offsets that overlap or leave a gap (corrupt header)")
        }
        SafeTensorError::TensorInvalidInfo => {
            "a tensor's byte size does not match its shape and dtype (corrupt header)".to_string()
        }
        other => format!("corrupt header: {other}"),
    }
}

/// A float type tensors can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatDtype {
    /// 32-bit IEEE float.
    F32,
    /// bfloat16.
    BF16,
    /// 16-bit IEEE float.
    F16,
}

impl FloatDtype {
    /// The name transformers uses in `config.json` (`float32`, `bfloat16`, `float16`).
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::BF16 => "bfloat16",
            Self::F16 => "float16",
        }
    }

    /// The dtype of a `config.json` `dtype`/`torch_dtype` value, if it is one of these.
    pub fn from_torch_name(name: &str) -> Option<Self> {
        match name {
            "float32" => Some(Self::F32),
            "bfloat16" => Some(Self::BF16),
            "float16" => Some(Self::F16),
            _ => None,
        }
    }

    fn safetensors_dtype(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::BF16 => Dtype::BF16,
            Self::F16 => Dtype::F16,
        }
    }
}

/// One tensor to write with [`write_safetensors`], already encoded in its stored dtype.
#[derive(Debug, Clone)]
pub struct TensorToWrite {
    name: String,
    shape: Vec<usize>,
    dtype: Dtype,
    bytes: Vec<u8>,
}

impl TensorToWrite {
    /// A float tensor from f32 values in row-major order, stored as `dtype` (bf16 and f16
    /// round to nearest even, as torch's casts do).
    pub fn from_f32(
        name: impl Into<String>,
        shape: Vec<usize>,
        values: &[f32],
        dtype: FloatDtype,
    ) -> Self {
        let bytes = match dtype {
            FloatDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            FloatDtype::BF16 => values
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
            FloatDtype::F16 => values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
        };
        Self {
            name: name.into(),
            shape,
            dtype: dtype.safetensors_dtype(),
            bytes,
        }
    }

    /// An I64 tensor (e.g. token ids) from values in row-major order.
    pub fn from_i64(name: impl Into<String>, shape: Vec<usize>, values: &[i64]) -> Self {
        Self {
            name: name.into(),
            shape,
            dtype: Dtype::I64,
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// The tensor's name in the file.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the encoded bytes hold exactly as many elements as the shape says.
    fn size_matches_shape(&self) -> bool {
        let bytes_per_element = self.dtype.bitsize() / 8;
        self.shape
            .iter()
            .try_fold(bytes_per_element, |size, &dim| size.checked_mul(dim))
            == Some(self.bytes.len())
    }
}

impl View for &TensorToWrite {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }

    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes `tensors` to a safetensors file at `path`, atomically (see [`write_atomically`]).
///
/// `metadata` becomes the header's `__metadata__` (omitted when empty); PEFT writes
/// `{"format": "pt"}`. Tensors are laid out by dtype, then name, as the `safetensors` package
/// does, so the same input always gives the same bytes.
///
/// # Errors
///
/// [`ModelError::Safetensors`] if two tensors share a name or a tensor's values do not fill
/// its shape; [`ModelError::Io`] if writing fails (then `path` is left untouched).
pub fn write_safetensors(
    path: &Path,
    tensors: &[TensorToWrite],
    metadata: &BTreeMap<String, String>,
) -> Result<(), ModelError> {
    let invalid = |message: String| ModelError::Safetensors {
        path: path.to_path_buf(),
        message,
    };
    let mut seen = std::collections::HashSet::new();
    for tensor in tensors {
        if !seen.insert(tensor.name.as_str()) {
            return Err(invalid(format!(
                "cannot write tensor `{}` twice",
                tensor.name
            )));
        }
        if !tensor.size_matches_shape() {
            return Err(invalid(format!(
                "cannot write tensor `{}`: {} bytes of {} do not fill shape {:?}",
                tensor.name,
                tensor.bytes.len(),
                tensor.dtype,
                tensor.shape
            )));
        }
    }
    let header_metadata = (!metadata.is_empty()).then(|| {
        metadata
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect::<HashMap<_, _>>()
    });
    write_atomically(path, |temp| {
        let named = tensors.iter().map(|tensor| (tensor.name.as_str(), tensor));
        safetensors::serialize_to_file(named, header_metadata, temp).map_err(|e| match e {
            SafeTensorError::IoError(source) => ModelError::io("write", temp, source),
            other => invalid(other.to_string()),
        })
    })
}

/// Creates or replaces the file at `path` all at once: `write` fills a new temporary file in
/// the same directory, which is flushed to disk and renamed over `path`.
///
/// Readers see the old file or the complete new one, never a partial write; on any error
/// (or panic in `write`) the temporary file is removed and `path` is untouched.
///
/// # Errors
///
/// [`ModelError::Io`] if the temporary file cannot be created, flushed or renamed, and
/// whatever `write` returns.
pub fn write_atomically<F>(path: &Path, write: F) -> Result<(), ModelError>
where
    F: FnOnce(&Path) -> Result<(), ModelError>,
{
    let temp = TempFile::create_beside(path)?;
    write(&temp.path)?;
    File::options()
        .write(true)
        .open(&temp.path)
        .and_then(|file| file.sync_all())
        .map_err(|e| ModelError::io("flush to disk", &temp.path, e))?;
    std::fs::rename(&temp.path, path)
        .map_err(|e| ModelError::io("move the finished temporary file into place", path, e))?;
    temp.disarm();
    // Makes the rename itself durable. Best effort: some platforms and file systems cannot
    // open or sync a directory, and the data is already safely on disk.
    if let Ok(dir) = File::open(parent_dir(path)) {
        let _ = dir.sync_all();
    }
    Ok(())
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// A temporary file that is deleted when dropped, unless disarmed.
struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl TempFile {
    /// Creates an empty, uniquely named hidden file next to `target`.
    fn create_beside(target: &Path) -> Result<Self, ModelError> {
        let file_name = target.file_name().ok_or_else(|| {
            ModelError::io(
                "write",
                target,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "the path has no file name",
                ),
            )
        })?;
        let dir = parent_dir(target);
        let pid = std::process::id();
        let mut attempt = 0u32;
        loop {
            let mut name = std::ffi::OsString::from(".");
            name.push(file_name);
            name.push(format!(".{pid}.{attempt}.tmp"));
            let path = dir.join(name);
            match File::options().write(true).create_new(true).open(&path) {
                Ok(_) => return Ok(Self { path, armed: true }),
                // Another writer of the same file in this process holds this name.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 1000 => {
                    attempt += 1;
                }
                Err(e) => return Err(ModelError::io("create a temporary file", path, e)),
            }
        }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            // Nothing more can be done about a failed clean-up while already failing.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
    }

    fn open_error(path: &Path) -> (ModelError, String) {
        let error = Checkpoint::open(path).expect_err("opening must fail");
        let message = error.to_string();
        (error, message)
    }

    /// A temporary directory holding a copy of fixture folder `name`.
    fn copy_of(name: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for entry in fs::read_dir(fixtures().join(name)).unwrap() {
            let entry = entry.unwrap();
            fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
        dir
    }

    #[test]
    fn single_file_checkpoint_lists_and_reads_tensors() {
        let checkpoint = Checkpoint::open(&fixtures().join("llama-tiny")).unwrap();
        assert!(checkpoint.contains("model.embed_tokens.weight"));
        assert!(checkpoint.contains("lm_head.weight"));
        assert!(!checkpoint.contains("model.layers.3.mlp.up_proj.weight"));
        assert_eq!(checkpoint.names().count(), 3 * 9 + 3);
        assert!(checkpoint.names().is_sorted());
        assert_eq!(
            checkpoint
                .shape("model.layers.0.mlp.gate_proj.weight")
                .unwrap(),
            [176, 64]
        );
        assert_eq!(checkpoint.dtype("model.norm.weight").unwrap(), Dtype::F32);
        let norm = checkpoint.read_f32("model.norm.weight", &[64]).unwrap();
        assert_eq!(norm.len(), 64);
        // RMSNorm weights are 1 + 0.1·N(0,1).
        assert!(norm.iter().all(|w| (0.4..1.6).contains(w)), "{norm:?}");
    }

    /// Every tensor of `low_precision` must equal `full`'s rounded to its dtype.
    fn assert_exact_cast(full: &str, low_precision: &str, round: impl Fn(f32) -> f32) {
        let full = Checkpoint::open(&fixtures().join(full)).unwrap();
        let low = Checkpoint::open(&fixtures().join(low_precision)).unwrap();
        assert_eq!(
            full.names().collect::<Vec<_>>(),
            low.names().collect::<Vec<_>>()
        );
        for name in full.names() {
            let shape = full.shape(name).unwrap();
            let expected: Vec<f32> = full
                .read_f32(name, &shape)
                .unwrap()
                .into_iter()
                .map(&round)
                .collect();
            assert_eq!(low.read_f32(name, &shape).unwrap(), expected, "{name}");
        }
    }

    #[test]
    fn sharded_bf16_checkpoint_reads_as_the_exactly_upcast_f32_weights() {
        assert_exact_cast("llama-tiny", "llama-tiny-sharded-bf16", |v| {
            bf16::from_f32(v).to_f32()
        });
        let sharded = Checkpoint::open(&fixtures().join("llama-tiny-sharded-bf16")).unwrap();
        assert_eq!(sharded.files.len(), 3);
        assert_eq!(sharded.dtype("lm_head.weight").unwrap(), Dtype::BF16);
    }

    #[test]
    fn f16_checkpoint_reads_as_the_exactly_upcast_f32_weights() {
        assert_exact_cast("qwen2-tiny", "qwen2-tiny-f16", |v| {
            f16::from_f32(v).to_f32()
        });
    }

    #[test]
    fn shard_index_can_be_opened_directly() {
        let index = fixtures().join("llama-tiny-sharded-bf16").join(INDEX_FILE);
        let checkpoint = Checkpoint::open(&index).unwrap();
        assert!(checkpoint.contains("model.layers.2.self_attn.o_proj.weight"));
    }

    #[test]
    fn integer_tensors_read_as_i64() {
        let inputs = Checkpoint::open(&fixtures().join("inputs.safetensors")).unwrap();
        let ids = inputs.read_i64("input_ids", &[2, 12]).unwrap();
        assert_eq!(&ids[..4], &[282, 224, 84, 88]);
        assert_eq!(&ids[12..16], &[47, 294, 224, 273]);
    }

    #[test]
    fn wrong_shape_names_tensor_file_and_both_shapes() {
        let checkpoint = Checkpoint::open(&fixtures().join("llama-tiny")).unwrap();
        let error = checkpoint
            .read_f32("model.embed_tokens.weight", &[64, 320])
            .unwrap_err();
        assert!(matches!(error, ModelError::ShapeMismatch { .. }));
        let message = error.to_string();
        assert!(message.contains("llama-tiny/model.safetensors: tensor `model.embed_tokens.weight` has shape [320, 64], but the model config implies [64, 320]"), "{message}");
    }

    #[test]
    fn integer_tensor_read_as_float_is_a_dtype_error() {
        let inputs = Checkpoint::open(&fixtures().join("inputs.safetensors")).unwrap();
        let error = inputs.read_f32("input_ids", &[2, 12]).unwrap_err();
        assert!(matches!(error, ModelError::DType { .. }));
        let message = error.to_string();
        assert!(message.ends_with("inputs.safetensors: tensor `input_ids` has dtype I64, expected a float dtype (F32, BF16, F16 or F64)"), "{message}");

        let model = Checkpoint::open(&fixtures().join("llama-tiny")).unwrap();
        let message = model
            .read_i64("model.norm.weight", &[64])
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("has dtype F32, expected an integer dtype"),
            "{message}"
        );
    }

    #[test]
    fn missing_tensor_names_tensor_and_file() {
        let checkpoint = Checkpoint::open(&fixtures().join("qwen2-tiny")).unwrap();
        let error = checkpoint
            .read_f32("lm_head.weight", &[320, 64])
            .unwrap_err();
        assert!(matches!(error, ModelError::MissingTensor { .. }));
        let message = error.to_string();
        assert!(
            message.ends_with("qwen2-tiny/model.safetensors: tensor `lm_head.weight` not found"),
            "{message}"
        );
        let sharded = Checkpoint::open(&fixtures().join("llama-tiny-sharded-bf16")).unwrap();
        let message = sharded
            .shape("model.layers.9.mlp.up_proj.weight")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains(
                "model.safetensors.index.json: tensor `model.layers.9.mlp.up_proj.weight` not found"
            ),
            "{message}"
        );
    }

    /// Writes `bytes` as `model.safetensors` in a new directory and opens it.
    fn open_bytes(bytes: &[u8]) -> (ModelError, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SINGLE_FILE);
        fs::write(&path, bytes).unwrap();
        let (error, message) = open_error(dir.path());
        assert!(matches!(error, ModelError::Safetensors { .. }), "{error:?}");
        assert!(
            message.starts_with(&format!("{}: invalid safetensors file: ", path.display())),
            "{message}"
        );
        (error, message)
    }

    #[test]
    fn truncated_file_is_reported_not_read_past() {
        let full = fs::read(fixtures().join("llama-tiny").join(SINGLE_FILE)).unwrap();
        let (_, message) = open_bytes(&full[..full.len() / 2]);
        assert!(
            message.contains("do not add up to the 360836-byte file (truncated"),
            "{message}"
        );
        let (_, message) = open_bytes(&full[..100]);
        assert!(
            message.contains("points beyond the end of the 100-byte file"),
            "{message}"
        );
        let (_, message) = open_bytes(&full[..5]);
        assert!(
            message.contains("the file is 5 bytes, too short"),
            "{message}"
        );
        let (_, message) = open_bytes(&[]);
        assert!(message.contains("the file is 0 bytes"), "{message}");
    }

    #[test]
    fn corrupt_header_json_is_reported() {
        let header = b"{\"a\": {\"dtype\": \"F32\", \"shape\": [1], ";
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        let (_, message) = open_bytes(&bytes);
        assert!(
            message.contains("corrupt header: invalid JSON in header"),
            "{message}"
        );
    }

    #[test]
    fn header_length_beyond_the_file_is_reported() {
        let mut bytes = 1_000_000u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        let (_, message) = open_bytes(&bytes);
        assert!(
            message.contains("points beyond the end of the 10-byte file"),
            "{message}"
        );
    }

    #[test]
    fn offsets_that_disagree_with_the_shape_are_reported() {
        // Claims 4 f32s (16 bytes) but gives the tensor 8 bytes.
        let header = br#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0; 8]);
        let (_, message) = open_bytes(&bytes);
        assert!(
            message.contains("does not match its shape and dtype"),
            "{message}"
        );
    }

    #[test]
    fn missing_shard_is_named() {
        let dir = copy_of("llama-tiny-sharded-bf16");
        let shard = dir.path().join("model-00002-of-00003.safetensors");
        fs::remove_file(&shard).unwrap();
        let (error, message) = open_error(dir.path());
        assert!(matches!(error, ModelError::Io { .. }));
        assert!(
            message.starts_with(&format!(
                "{}: cannot open the shard listed in model.safetensors.index.json: ",
                shard.display()
            )),
            "{message}"
        );
    }

    #[test]
    fn index_placing_a_tensor_in_the_wrong_shard_is_reported() {
        let dir = copy_of("llama-tiny-sharded-bf16");
        let index_path = dir.path().join(INDEX_FILE);
        let mut index: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&index_path).unwrap()).unwrap();
        index["weight_map"]["lm_head.weight"] = "model-00001-of-00003.safetensors".into();
        fs::write(&index_path, index.to_string()).unwrap();
        let (error, message) = open_error(dir.path());
        assert!(matches!(error, ModelError::MissingTensor { .. }));
        assert!(
            message
                .ends_with("model-00001-of-00003.safetensors: tensor `lm_head.weight` not found"),
            "{message}"
        );
    }

    #[test]
    fn index_shards_must_stay_inside_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let index = r#"{"weight_map": {"w": "../outside.safetensors"}}"#;
        fs::write(dir.path().join(INDEX_FILE), index).unwrap();
        let (error, message) = open_error(dir.path());
        assert!(matches!(error, ModelError::ConfigField { .. }));
        assert!(
            message.contains("field `weight_map.w` is \"../outside.safetensors\""),
            "{message}"
        );

        fs::write(dir.path().join(INDEX_FILE), "{\"metadata\": {}}").unwrap();
        let (_, message) = open_error(dir.path());
        assert!(
            message.contains("field `weight_map` is missing"),
            "{message}"
        );
    }

    #[test]
    fn directory_without_weights_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let (error, message) = open_error(dir.path());
        assert!(matches!(error, ModelError::NotFound { .. }));
        assert!(
            message.contains("no model.safetensors or model.safetensors.index.json"),
            "{message}"
        );
        fs::write(dir.path().join("pytorch_model.bin"), b"").unwrap();
        let (_, message) = open_error(dir.path());
        assert!(message.contains("PyTorch .bin weights"), "{message}");
    }

    /// The names of the files in `dir`.
    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn written_tensors_read_back_in_every_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adapter_model.safetensors");
        let values = [1.0f32, -2.5, 1.0e-3, 3.140_625, 65504.0, -0.0];
        let tensors = vec![
            TensorToWrite::from_f32("a.f32", vec![2, 3], &values, FloatDtype::F32),
            TensorToWrite::from_f32("b.bf16", vec![3, 2], &values, FloatDtype::BF16),
            TensorToWrite::from_f32("c.f16", vec![6], &values, FloatDtype::F16),
            TensorToWrite::from_i64("d.ids", vec![1, 3], &[7, -1, i64::MAX]),
            TensorToWrite::from_f32("e.empty", vec![0, 4], &[], FloatDtype::F32),
        ];
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(&path, &tensors, &metadata).unwrap();
        assert_eq!(files_in(dir.path()), ["adapter_model.safetensors"]);

        let checkpoint = Checkpoint::open(&path).unwrap();
        assert_eq!(checkpoint.read_f32("a.f32", &[2, 3]).unwrap(), values);
        let bf16_values: Vec<f32> = values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        assert_eq!(checkpoint.read_f32("b.bf16", &[3, 2]).unwrap(), bf16_values);
        assert_eq!(checkpoint.dtype("b.bf16").unwrap(), Dtype::BF16);
        let f16_values: Vec<f32> = values.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        assert_eq!(checkpoint.read_f32("c.f16", &[6]).unwrap(), f16_values);
        assert_eq!(
            checkpoint.read_i64("d.ids", &[1, 3]).unwrap(),
            [7, -1, i64::MAX]
        );
        assert!(checkpoint.read_f32("e.empty", &[0, 4]).unwrap().is_empty());

        let bytes = fs::read(&path).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let written_metadata = header.metadata().clone().unwrap();
        assert_eq!(
            written_metadata.get("format").map(String::as_str),
            Some("pt")
        );
    }

    #[test]
    fn bf16_writing_rounds_like_torch() {
        // transformers made the bf16 shards with torch's round-to-nearest-even cast.
        let full = Checkpoint::open(&fixtures().join("llama-tiny")).unwrap();
        let name = "model.layers.1.mlp.down_proj.weight";
        let values = full.read_f32(name, &[64, 176]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let tensor = TensorToWrite::from_f32(name, vec![64, 176], &values, FloatDtype::BF16);
        write_safetensors(&path, &[tensor], &BTreeMap::new()).unwrap();
        let written = Checkpoint::open(&path).unwrap();
        let torch = Checkpoint::open(&fixtures().join("llama-tiny-sharded-bf16")).unwrap();
        let (torch_file, torch_info) = torch.tensor(name).unwrap();
        let (written_file, written_info) = written.tensor(name).unwrap();
        assert_eq!(
            written_file.bytes(written_info),
            torch_file.bytes(torch_info)
        );
    }

    #[test]
    fn invalid_writes_leave_the_existing_file_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        fs::write(&path, b"previous contents").unwrap();

        let twice = vec![
            TensorToWrite::from_f32("w", vec![1], &[1.0], FloatDtype::F32),
            TensorToWrite::from_f32("w", vec![1], &[2.0], FloatDtype::F32),
        ];
        let error = write_safetensors(&path, &twice, &BTreeMap::new()).unwrap_err();
        assert!(matches!(error, ModelError::Safetensors { .. }));
        assert!(
            error.to_string().contains("cannot write tensor `w` twice"),
            "{error}"
        );

        let short = vec![TensorToWrite::from_f32(
            "w",
            vec![2, 2],
            &[1.0; 3],
            FloatDtype::BF16,
        )];
        let error = write_safetensors(&path, &short, &BTreeMap::new()).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("cannot write tensor `w`: 6 bytes of BF16 do not fill shape [2, 2]"),
            "{error}"
        );

        assert_eq!(fs::read(&path).unwrap(), b"previous contents");
        assert_eq!(files_in(dir.path()), ["model.safetensors"]);
    }

    #[test]
    fn failed_atomic_write_removes_its_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adapter_config.json");
        fs::write(&path, b"old").unwrap();
        let error = write_atomically(&path, |temp| {
            fs::write(temp, b"half a fi").unwrap();
            Err(ModelError::NotFound {
                what: "simulated failure".to_string(),
            })
        })
        .unwrap_err();
        assert_eq!(error.to_string(), "simulated failure");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(files_in(dir.path()), ["adapter_config.json"]);

        write_atomically(&path, |temp| {
            fs::write(temp, b"new").map_err(|e| ModelError::io("write", temp, e))
        })
        .unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(files_in(dir.path()), ["adapter_config.json"]);
    }

    #[test]
    fn atomic_write_into_a_missing_directory_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent").join("x.json");
        let error = write_atomically(&path, |_| Ok(())).unwrap_err();
        assert!(matches!(error, ModelError::Io { .. }));
        assert!(error.to_string().contains("absent"), "{error}");
    }

    #[test]
    fn float_dtype_names_match_transformers() {
        for dtype in [FloatDtype::F32, FloatDtype::BF16, FloatDtype::F16] {
            assert_eq!(FloatDtype::from_torch_name(dtype.torch_name()), Some(dtype));
        }
        assert_eq!(FloatDtype::from_torch_name("int8"), None);
    }
}

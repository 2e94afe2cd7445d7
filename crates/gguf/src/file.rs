//! [`GgufFile`]: an open file, handing out metadata, tensor infos and tensor data.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::header::parse_header;
use crate::quant::{block_decoder, decode_blocks};
use crate::{GgufError, GgufErrorKind, MetadataArray, MetadataValue, TensorInfo};

/// The bytes of a file: memory-mapped, or owned (in-memory files and empty files, which cannot
/// be mapped).
enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Mapped(map) => map,
            Self::Owned(bytes) => bytes,
        }
    }
}

/// An open GGUF file (versions 2 and 3): its metadata and tensor infos parsed and validated,
/// its tensor data memory-mapped and decoded on request.
///
/// Everything that can be checked without decoding tensors is checked when the file is opened
/// (counts and lengths against the file size, tensor shapes, types, alignment and bounds), so
/// the accessors cannot over-read a malformed file.
///
/// ```no_run
/// use fastlora_gguf::GgufFile;
///
/// let gguf = GgufFile::open(".cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf")?;
/// assert_eq!(gguf.get_str("general.architecture")?, "llama");
/// let layers = gguf.get_u32("llama.block_count")?;
/// let q = gguf.tensor_info("blk.0.attn_q.weight").expect("present");
/// let values = gguf.dequantize_f32(q.name())?; // row-major, shape q.shape()
/// assert_eq!(values.len(), q.shape().iter().product::<usize>());
/// # let _ = layers;
/// # Ok::<(), fastlora_gguf::GgufError>(())
/// ```
pub struct GgufFile {
    path: PathBuf,
    storage: Storage,
    version: u32,
    metadata: BTreeMap<String, MetadataValue>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl fmt::Debug for GgufFile {
    // Not derived: the metadata holds whole vocabularies.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish_non_exhaustive()
    }
}

impl GgufFile {
    /// Opens, memory-maps and validates the GGUF file at `path`.
    ///
    /// # Errors
    ///
    /// [`GgufErrorKind::Io`] when the file cannot be opened or mapped, and any of the format
    /// errors of [`GgufErrorKind`] (bad magic, unsupported version, truncation, absurd counts,
    /// unknown types, bad tensor shapes, offsets or bounds, duplicates) when it is malformed.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let io = |action| move |source| GgufError::new(path, GgufErrorKind::Io { action, source });
        let file = File::open(path).map_err(io("open"))?;
        let len = file.metadata().map_err(io("read the size of"))?.len();
        // Mapping an empty file fails on some platforms; an empty file is simply truncated.
        let storage = if len == 0 {
            Storage::Owned(Vec::new())
        } else {
            Storage::Mapped(map_read_only(&file).map_err(io("memory-map"))?)
        };
        Self::parse(path.to_owned(), storage)
    }

    /// Parses and validates a GGUF file held in memory; `name` stands for the file in errors.
    ///
    /// # Errors
    ///
    /// The format errors of [`GgufFile::open`].
    pub fn from_bytes(bytes: Vec<u8>, name: impl Into<PathBuf>) -> Result<Self, GgufError> {
        Self::parse(name.into(), Storage::Owned(bytes))
    }

    fn parse(path: PathBuf, storage: Storage) -> Result<Self, GgufError> {
        let header = match parse_header(storage.bytes()) {
            Ok(header) => header,
            Err(kind) => return Err(GgufError::new(&path, kind)),
        };
        Ok(Self {
            path,
            storage,
            version: header.version,
            metadata: header.metadata,
            tensors: header.tensors,
            tensor_index: header.tensor_index,
            alignment: header.alignment,
            data_offset: header.data_offset,
        })
    }

    fn error(&self, kind: GgufErrorKind) -> GgufError {
        GgufError::new(&self.path, kind)
    }

    /// The file's path (or the name given to [`GgufFile::from_bytes`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version: 2 or 3.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The alignment of tensor data: `general.alignment`, or 32.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// The file offset where the data section (and tensor offset 0) starts: the end of the
    /// header, rounded up to the alignment.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.storage.bytes().len() as u64
    }

    /// All metadata, by key.
    pub fn metadata(&self) -> &BTreeMap<String, MetadataValue> {
        &self.metadata
    }

    /// The value of metadata key `key`, if present.
    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        self.metadata.get(key)
    }

    fn value(&self, key: &str) -> Result<&MetadataValue, GgufError> {
        self.metadata.get(key).ok_or_else(|| {
            self.error(GgufErrorKind::MissingKey {
                key: key.to_owned(),
            })
        })
    }

    fn wrong_type(&self, key: &str, expected: &'static str, value: &MetadataValue) -> GgufError {
        self.error(GgufErrorKind::WrongType {
            key: key.to_owned(),
            expected,
            actual: value.type_description(),
        })
    }

    /// An integer of any width converted losslessly by `convert`; an integer that does not fit
    /// is out of range, anything else is the wrong type.
    fn integer<T>(
        &self,
        key: &str,
        expected: &'static str,
        convert: impl FnOnce(&MetadataValue) -> Option<T>,
    ) -> Result<T, GgufError> {
        let value = self.value(key)?;
        if let Some(converted) = convert(value) {
            return Ok(converted);
        }
        match value.as_integer() {
            Some(integer) => Err(self.error(GgufErrorKind::ValueOutOfRange {
                key: key.to_owned(),
                expected,
                value: integer.to_string(),
            })),
            None => Err(self.wrong_type(key, expected, value)),
        }
    }

    /// The value of `key` as a `u32`. Any integer type is accepted if its value fits: writers
    /// disagree on widths (token ids appear as `UINT32`, `INT32` or `UINT64`).
    ///
    /// # Errors
    ///
    /// [`GgufErrorKind::MissingKey`], [`GgufErrorKind::WrongType`] for a non-integer, or
    /// [`GgufErrorKind::ValueOutOfRange`] for a negative or too large integer.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        self.integer(key, "an integer fitting u32", MetadataValue::as_u32)
    }

    /// The value of `key` as a `u64`; any integer type whose value fits is accepted.
    ///
    /// # Errors
    ///
    /// As [`GgufFile::get_u32`].
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.integer(key, "an integer fitting u64", MetadataValue::as_u64)
    }

    /// The value of `key` as an `i64`; any integer type whose value fits is accepted.
    ///
    /// # Errors
    ///
    /// As [`GgufFile::get_u32`].
    pub fn get_i64(&self, key: &str) -> Result<i64, GgufError> {
        self.integer(key, "an integer fitting i64", MetadataValue::as_i64)
    }

    /// The value of `key`, which must be a `FLOAT32`.
    ///
    /// # Errors
    ///
    /// [`GgufErrorKind::MissingKey`] or [`GgufErrorKind::WrongType`].
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        let value = self.value(key)?;
        value
            .as_f32()
            .ok_or_else(|| self.wrong_type(key, "FLOAT32", value))
    }

    /// The value of `key`, a `FLOAT64` or a `FLOAT32` (widened exactly).
    ///
    /// # Errors
    ///
    /// [`GgufErrorKind::MissingKey`] or [`GgufErrorKind::WrongType`].
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let value = self.value(key)?;
        value
            .as_f64()
            .ok_or_else(|| self.wrong_type(key, "FLOAT64 or FLOAT32", value))
    }

    /// The value of `key`, which must be a `BOOL`.
    ///
    /// # Errors
    ///
    /// [`GgufErrorKind::MissingKey`] or [`GgufErrorKind::WrongType`].
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        let value = self.value(key)?;
        value
            .as_bool()
            .ok_or_else(|| self.wrong_type(key, "BOOL", value))
    }

    /// The value of `key`, which must be a `STRING`.
    ///
    /// # Errors
    ///
    /// [`GgufErrorKind::MissingKey`] or [`GgufErrorKind::WrongType`].
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let value = self.value(key)?;
        value
            .as_str()
            .ok_or_else(|| self.wrong_type(key, "STRING", value))
    }

    /// The model architecture, `general.architecture` (e.g. `"llama"`), the prefix of the
    /// architecture's own keys (`llama.block_count`...).
    ///
    /// # Errors
    ///
    /// As [`GgufFile::get_str`].
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.get_str("general.architecture")
    }

    fn array<'a, T: ?Sized>(
        &'a self,
        key: &str,
        expected: &'static str,
        select: impl FnOnce(&'a MetadataArray) -> Option<&'a T>,
    ) -> Result<&'a T, GgufError> {
        let value = self.value(key)?;
        value
            .as_array()
            .and_then(select)
            .ok_or_else(|| self.wrong_type(key, expected, value))
    }

    /// The value of `key`, which must be an array of `STRING`s (e.g. `tokenizer.ggml.tokens`).
    ///
    /// Array getters borrow the stored vector, so they need the exact element type.
    ///
    /// # Errors
    ///
    /// [`GgufErrorKind::MissingKey`] or [`GgufErrorKind::WrongType`].
    pub fn get_str_array(&self, key: &str) -> Result<&[String], GgufError> {
        self.array(key, "ARRAY[STRING]", |array| match array {
            MetadataArray::String(values) => Some(values.as_slice()),
            _ => None,
        })
    }

    /// The value of `key`, which must be an array of `UINT32`s.
    ///
    /// # Errors
    ///
    /// [`GgufErrorKind::MissingKey`] or [`GgufErrorKind::WrongType`].
    pub fn get_u32_array(&self, key: &str) -> Result<&[u32], GgufError> {
        self.array(key, "ARRAY[UINT32]", |array| match array {
            MetadataArray::U32(values) => Some(values.as_slice()),
            _ => None,
        })
    }

    /// The value of `key`, which must be an array of `INT32`s (e.g. `tokenizer.ggml.token_type`).
    ///
    /// # Errors
    ///
    /// [`GgufErrorKind::MissingKey`] or [`GgufErrorKind::WrongType`].
    pub fn get_i32_array(&self, key: &str) -> Result<&[i32], GgufError> {
        self.array(key, "ARRAY[INT32]", |array| match array {
            MetadataArray::I32(values) => Some(values.as_slice()),
            _ => None,
        })
    }

    /// The value of `key`, which must be an array of `FLOAT32`s (e.g. `tokenizer.ggml.scores`).
    ///
    /// # Errors
    ///
    /// [`GgufErrorKind::MissingKey`] or [`GgufErrorKind::WrongType`].
    pub fn get_f32_array(&self, key: &str) -> Result<&[f32], GgufError> {
        self.array(key, "ARRAY[FLOAT32]", |array| match array {
            MetadataArray::F32(values) => Some(values.as_slice()),
            _ => None,
        })
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The info of tensor `name`, if the file has it.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    fn require_tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensor_info(name).ok_or_else(|| {
            self.error(GgufErrorKind::TensorNotFound {
                tensor: name.to_owned(),
            })
        })
    }

    /// The stored bytes of tensor `name`, exactly as in the file (quantized blocks included).
    ///
    /// # Errors
    ///
    /// [`GgufErrorKind::TensorNotFound`].
    pub fn raw_bytes(&self, name: &str) -> Result<&[u8], GgufError> {
        let info = self.require_tensor(name)?;
        self.tensor_bytes(info)
    }

    fn tensor_bytes(&self, info: &TensorInfo) -> Result<&[u8], GgufError> {
        // Bounds were validated at open; checked again rather than trusted, at no real cost.
        let out_of_bounds = || {
            self.error(GgufErrorKind::TensorOutOfBounds {
                tensor: info.name().to_owned(),
                start: self.data_offset.saturating_add(info.offset()),
                byte_len: info.byte_len(),
                file_len: self.file_len(),
            })
        };
        let start = self
            .data_offset
            .checked_add(info.offset())
            .and_then(|start| usize::try_from(start).ok())
            .ok_or_else(out_of_bounds)?;
        let len = usize::try_from(info.byte_len()).map_err(|_| out_of_bounds())?;
        let end = start.checked_add(len).ok_or_else(out_of_bounds)?;
        self.storage
            .bytes()
            .get(start..end)
            .ok_or_else(out_of_bounds)
    }

    /// Tensor `name` dequantized to f32, row-major in its PyTorch shape
    /// ([`TensorInfo::shape`]), bit-identical to ggml's `dequantize_row_*` and gguf-py's
    /// `gguf.quants.dequantize`.
    ///
    /// # Errors
    ///
    /// [`GgufErrorKind::TensorNotFound`], or [`GgufErrorKind::Unsupported`] for a type other
    /// than F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K.
    pub fn dequantize_f32(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let info = self.require_tensor(name)?;
        let decoder = block_decoder(info.ggml_type()).ok_or_else(|| {
            self.error(GgufErrorKind::Unsupported {
                tensor: info.name().to_owned(),
                ggml_type: info.ggml_type(),
            })
        })?;
        // The byte length is a whole number of blocks by construction (validated at open).
        Ok(decode_blocks(
            decoder,
            info.ggml_type(),
            self.tensor_bytes(info)?,
        ))
    }
}

#[allow(unsafe_code)]
fn map_read_only(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the map is read-only and owned by `GgufFile`, which hands out slices borrowed from
    // itself only. Soundness needs the file not to be truncated or rewritten in place while
    // mapped: the usual contract for reading model weights by mmap (llama.cpp, candle and
    // fastlora's safetensors loader rely on it too).
    unsafe { Mmap::map(file) }
}

//! Errors: every one names the file and, where there is one, the key or tensor.

use std::error::Error;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::GgmlType;

/// An error reading a GGUF file: the file, and what is wrong with it ([`GgufErrorKind`]).
///
/// Displays as `GGUF file <path>: <what>`.
#[derive(Debug)]
pub struct GgufError {
    path: PathBuf,
    kind: GgufErrorKind,
}

impl GgufError {
    pub(crate) fn new(path: &Path, kind: GgufErrorKind) -> Self {
        Self {
            path: path.to_owned(),
            kind,
        }
    }

    /// The file the error is about (for a file built with [`crate::GgufFile::from_bytes`], the
    /// name given there).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What went wrong.
    pub fn kind(&self) -> &GgufErrorKind {
        &self.kind
    }
}

impl fmt::Display for GgufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GGUF file {}: {}", self.path.display(), self.kind)
    }
}

impl Error for GgufError {
    // The kind is part of this error's message, so the chain continues with the kind's own
    // source (an I/O error) rather than repeating the kind.
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.kind.source()
    }
}

/// What is wrong with a GGUF file, or with a request made of it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufErrorKind {
    /// The file could not be opened, its size read, or it could not be memory-mapped.
    #[error("cannot {action}: {source}")]
    Io {
        /// What was being done (`"open"`, `"memory-map"`...).
        action: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The first four bytes are not `GGUF`.
    #[error("not a GGUF file: it starts with {found:02x?}, not the magic \"GGUF\"")]
    BadMagic {
        /// The first four bytes found.
        found: [u8; 4],
    },

    /// A GGUF version other than 2 or 3 (version 1 used 32-bit counts and is long obsolete).
    #[error("unsupported GGUF version {version}: only versions 2 and 3 are read{}",
        if *big_endian { " (this looks like a big-endian GGUF file; only little-endian files are read)" } else { "" })]
    UnsupportedVersion {
        /// The version read (as a little-endian u32).
        version: u32,
        /// Whether the byte-swapped version is a known one, i.e. the file is big-endian.
        big_endian: bool,
    },

    /// The file ends before a field that should be there.
    #[error(
        "file is truncated: {what} needs {needed} bytes at offset {offset}, but only {available} remain"
    )]
    Truncated {
        /// What was being read (e.g. "the value of metadata key `general.name`").
        what: String,
        /// Byte offset in the file where the field starts.
        offset: u64,
        /// Bytes the field needs.
        needed: u64,
        /// Bytes left in the file from `offset`.
        available: u64,
    },

    /// A count or length (string length, array length, tensor or key count) that the rest of
    /// the file cannot possibly hold: refused before anything is allocated for it.
    #[error("{what} is {count}, which cannot fit in the {available} bytes left at offset {offset}")]
    LengthExceedsFile {
        /// What the count is of.
        what: String,
        /// The count read.
        count: u64,
        /// Byte offset in the file where the counted items start.
        offset: u64,
        /// Bytes left in the file from `offset`.
        available: u64,
    },

    /// A metadata value (or array element) type id that GGUF does not define.
    #[error("metadata key `{key}` has unknown value type id {type_id} (GGUF defines 0..=12)")]
    UnknownMetadataType {
        /// The key whose value has the unknown type.
        key: String,
        /// The type id read.
        type_id: u32,
    },

    /// Arrays nested deeper than this reader accepts (a guard against stack exhaustion).
    #[error("metadata key `{key}` nests arrays more than {max_depth} deep")]
    NestingTooDeep {
        /// The key whose value nests too deep.
        key: String,
        /// The deepest nesting accepted.
        max_depth: usize,
    },

    /// A string (key, value or tensor name) that is not valid UTF-8.
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 {
        /// Which string.
        what: String,
    },

    /// The same metadata key twice.
    #[error("metadata key `{key}` appears more than once")]
    DuplicateKey {
        /// The repeated key.
        key: String,
    },

    /// `general.alignment` that is not a non-zero power of two fitting a u32.
    #[error("`general.alignment` must be a power of two, got {value}")]
    InvalidAlignment {
        /// The value found, as text (it may not even be an integer).
        value: String,
    },

    /// A tensor with more dimensions than ggml's limit of 4.
    #[error("tensor `{tensor}` has {n_dims} dimensions; GGUF allows at most 4")]
    TooManyDims {
        /// The tensor.
        tensor: String,
        /// Its declared number of dimensions.
        n_dims: u32,
    },

    /// A tensor type id that ggml does not define (or has retired).
    #[error("tensor `{tensor}` has unknown ggml type id {type_id}")]
    UnknownTensorType {
        /// The tensor.
        tensor: String,
        /// The type id read.
        type_id: u32,
    },

    /// A tensor whose element count or byte size does not fit in 64 bits (or a dimension above
    /// `i64::MAX`, ggml's limit).
    #[error(
        "tensor `{tensor}` with dims {dims:?} has an element count or byte size that overflows"
    )]
    ElementCountOverflow {
        /// The tensor.
        tensor: String,
        /// Its dims, in GGUF order.
        dims: Vec<u64>,
    },

    /// A block-quantized tensor whose rows (GGUF `dims[0]`) are not whole blocks.
    #[error(
        "tensor `{tensor}` of type {ggml_type} has rows of {row_len} values, not a multiple of the block size {block_size}"
    )]
    RowNotBlockMultiple {
        /// The tensor.
        tensor: String,
        /// Its type.
        ggml_type: GgmlType,
        /// Its row length (GGUF `dims[0]`, the last PyTorch dimension).
        row_len: u64,
        /// Values per block of its type.
        block_size: u64,
    },

    /// The same tensor name twice.
    #[error("tensor `{tensor}` appears more than once")]
    DuplicateTensor {
        /// The repeated name.
        tensor: String,
    },

    /// A tensor data offset that is not a multiple of the file's alignment.
    #[error(
        "tensor `{tensor}` has data offset {offset}, not a multiple of the alignment {alignment}"
    )]
    MisalignedOffset {
        /// The tensor.
        tensor: String,
        /// Its offset, relative to the start of the data section.
        offset: u64,
        /// The file's alignment.
        alignment: u64,
    },

    /// Tensor data that extends past the end of the file.
    #[error(
        "tensor `{tensor}` needs {byte_len} bytes at file offset {start}, past the end of the {file_len}-byte file"
    )]
    TensorOutOfBounds {
        /// The tensor.
        tensor: String,
        /// Absolute file offset where its data starts (saturated if it overflows).
        start: u64,
        /// Its data size in bytes.
        byte_len: u64,
        /// The file's size.
        file_len: u64,
    },

    /// A metadata key that the file does not have.
    #[error("metadata key `{key}` is missing")]
    MissingKey {
        /// The key asked for.
        key: String,
    },

    /// A metadata value of another type than the one asked for.
    #[error("metadata key `{key}` is {actual}, expected {expected}")]
    WrongType {
        /// The key.
        key: String,
        /// The type asked for.
        expected: &'static str,
        /// The value's type, in gguf-py's notation (`"ARRAY[STRING]"`).
        actual: String,
    },

    /// An integer metadata value that does not fit the integer type asked for.
    #[error("metadata key `{key}` is {value}, which does not fit {expected}")]
    ValueOutOfRange {
        /// The key.
        key: String,
        /// The type asked for.
        expected: &'static str,
        /// The value found.
        value: String,
    },

    /// A tensor name that the file does not have.
    #[error("tensor `{tensor}` not found")]
    TensorNotFound {
        /// The name asked for.
        tensor: String,
    },

    /// A tensor of a type that [`crate::dequantize`] cannot decode.
    #[error(
        "tensor `{tensor}` has type {ggml_type}, which cannot be dequantized (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)"
    )]
    Unsupported {
        /// The tensor.
        tensor: String,
        /// Its type.
        ggml_type: GgmlType,
    },
}

/// An error from [`crate::dequantize`] on raw bytes (no file involved).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DequantizeError {
    /// A type this crate does not decode.
    #[error(
        "cannot dequantize ggml type {0} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)"
    )]
    Unsupported(GgmlType),
    /// Bytes that are not a whole number of blocks.
    #[error("{len} bytes of {ggml_type} are not a whole number of {type_size}-byte blocks")]
    PartialBlock {
        /// The type.
        ggml_type: GgmlType,
        /// The byte length given.
        len: usize,
        /// Bytes per block of the type.
        type_size: u64,
    },
}

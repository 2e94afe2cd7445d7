//! [`TensorInfo`]: a tensor's name, shape, type and place in the file, validated.

use crate::header::RawTensorInfo;
use crate::{GgmlType, GgufErrorKind};

/// A tensor's description from the GGUF header, validated against the file at open time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    name: String,
    dims: Vec<u64>,
    shape: Vec<usize>,
    ggml_type: GgmlType,
    offset: u64,
    n_elements: u64,
    byte_len: u64,
}

impl TensorInfo {
    /// The tensor's name, e.g. `blk.0.attn_q.weight`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The dimensions in GGUF (ggml) order: `dims[0]` varies fastest, i.e. it is the row length.
    pub fn dims(&self) -> &[u64] {
        &self.dims
    }

    /// The row-major (PyTorch) shape: [`TensorInfo::dims`] reversed. A `[out, in]` linear weight
    /// has GGUF dims `[in, out]`.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The data type.
    pub fn ggml_type(&self) -> GgmlType {
        self.ggml_type
    }

    /// Where the data starts, relative to the start of the data section
    /// ([`crate::GgufFile::data_offset`]), as stored in the file.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The number of values (the product of the dims).
    pub fn n_elements(&self) -> u64 {
        self.n_elements
    }

    /// The size of the data in bytes.
    pub fn byte_len(&self) -> u64 {
        self.byte_len
    }
}

/// Validates a tensor info against the file: sizes, block multiples, alignment and bounds.
pub(crate) fn validate_tensor(
    raw: RawTensorInfo,
    alignment: u64,
    data_offset: u64,
    file_len: u64,
) -> Result<TensorInfo, GgufErrorKind> {
    let RawTensorInfo {
        name,
        dims,
        ggml_type,
        offset,
    } = raw;
    // ggml keeps dims and sizes in i64, so larger values are as malformed as overflows.
    let fits_i64 = |v: u64| i64::try_from(v).is_ok();
    let n_elements = dims
        .iter()
        .try_fold(1u64, |product, &dim| product.checked_mul(dim))
        .filter(|&n| fits_i64(n) && dims.iter().all(|&d| fits_i64(d)));
    let shape = dims
        .iter()
        .rev()
        .map(|&d| usize::try_from(d).ok())
        .collect::<Option<Vec<usize>>>();
    let (Some(n_elements), Some(shape)) = (n_elements, shape) else {
        return Err(GgufErrorKind::ElementCountOverflow { tensor: name, dims });
    };

    let block_size = ggml_type.block_size();
    let row_len = dims.first().copied().unwrap_or(1);
    if !row_len.is_multiple_of(block_size) {
        return Err(GgufErrorKind::RowNotBlockMultiple {
            tensor: name,
            ggml_type,
            row_len,
            block_size,
        });
    }
    // Whole rows of whole blocks, so n_elements is a multiple of block_size.
    let Some(byte_len) = (n_elements / block_size)
        .checked_mul(ggml_type.type_size())
        .filter(|&len| fits_i64(len))
    else {
        return Err(GgufErrorKind::ElementCountOverflow { tensor: name, dims });
    };

    if !offset.is_multiple_of(alignment) {
        return Err(GgufErrorKind::MisalignedOffset {
            tensor: name,
            offset,
            alignment,
        });
    }
    let start = data_offset.checked_add(offset);
    let end = start.and_then(|start| start.checked_add(byte_len));
    if end.is_none_or(|end| end > file_len) {
        return Err(GgufErrorKind::TensorOutOfBounds {
            tensor: name,
            start: start.unwrap_or(u64::MAX),
            byte_len,
            file_len,
        });
    }
    Ok(TensorInfo {
        name,
        dims,
        shape,
        ggml_type,
        offset,
        n_elements,
        byte_len,
    })
}

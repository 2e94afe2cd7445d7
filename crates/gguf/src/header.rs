//! Parsing the header (magic, version, counts, metadata, tensor infos) with every count and
//! length checked against the bytes left before anything is read or allocated.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};

use crate::cursor::{Cursor, Short};
use crate::tensor::validate_tensor;
use crate::{GgmlType, GgufErrorKind, MetadataArray, MetadataType, MetadataValue, TensorInfo};

/// The first four bytes of every GGUF file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// The alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// The metadata key that overrides [`DEFAULT_ALIGNMENT`].
pub const ALIGNMENT_KEY: &str = "general.alignment";

/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;

/// The deepest array nesting accepted. GGUF writers never nest arrays more than once; the limit
/// keeps a crafted file from exhausting the stack through recursion.
const MAX_ARRAY_NESTING: usize = 16;

/// Bytes of the smallest possible metadata entry: empty key (u64 length), type id, 1-byte value.
const MIN_KV_LEN: u64 = 8 + 4 + 1;

/// Bytes of the smallest possible tensor info: empty name, `n_dims` = 0, type id, offset.
const MIN_TENSOR_INFO_LEN: u64 = 8 + 4 + 4 + 8;

/// Everything parsed from the header.
pub(crate) struct Header {
    pub(crate) version: u32,
    pub(crate) metadata: BTreeMap<String, MetadataValue>,
    pub(crate) tensors: Vec<TensorInfo>,
    pub(crate) tensor_index: HashMap<String, usize>,
    pub(crate) alignment: u64,
    pub(crate) data_offset: u64,
}

/// A tensor info as read, before validation against the file.
pub(crate) struct RawTensorInfo {
    pub(crate) name: String,
    pub(crate) dims: Vec<u64>,
    pub(crate) ggml_type: GgmlType,
    pub(crate) offset: u64,
}

pub(crate) fn parse_header(bytes: &[u8]) -> Result<Header, GgufErrorKind> {
    let mut c = Cursor::new(bytes);
    let magic = c.take(4).map_err(|s| s.reading("the magic"))?;
    if magic != GGUF_MAGIC {
        let mut found = [0u8; 4];
        found.copy_from_slice(magic);
        return Err(GgufErrorKind::BadMagic { found });
    }
    let version = c.u32().map_err(|s| s.reading("the version"))?;
    if !matches!(version, 2 | 3) {
        return Err(GgufErrorKind::UnsupportedVersion {
            version,
            big_endian: matches!(version.swap_bytes(), 1..=3),
        });
    }
    let tensor_count = c.u64().map_err(|s| s.reading("the tensor count"))?;
    let kv_count = c.u64().map_err(|s| s.reading("the metadata key count"))?;
    check_count(&c, kv_count, MIN_KV_LEN, || "the metadata key count".into())?;
    let metadata = read_metadata(&mut c, kv_count)?;
    check_count(&c, tensor_count, MIN_TENSOR_INFO_LEN, || {
        "the tensor count".into()
    })?;
    let raw_tensors = read_tensor_infos(&mut c, tensor_count)?;

    let alignment = alignment(&metadata)?;
    let data_offset = (c.position() as u64)
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| GgufErrorKind::InvalidAlignment {
            value: alignment.to_string(),
        })?;
    let file_len = bytes.len() as u64;
    let mut tensors = Vec::with_capacity(raw_tensors.len());
    let mut tensor_index = HashMap::with_capacity(raw_tensors.len());
    for raw in raw_tensors {
        let info = validate_tensor(raw, alignment, data_offset, file_len)?;
        if tensor_index
            .insert(info.name().to_owned(), tensors.len())
            .is_some()
        {
            return Err(GgufErrorKind::DuplicateTensor {
                tensor: info.name().to_owned(),
            });
        }
        tensors.push(info);
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        tensor_index,
        alignment,
        data_offset,
    })
}

/// Refuses a count of items of at least `min_len` bytes each that the rest of the file cannot
/// hold, before anything is allocated for them.
fn check_count(
    c: &Cursor<'_>,
    count: u64,
    min_len: u64,
    what: impl FnOnce() -> String,
) -> Result<(), GgufErrorKind> {
    let available = c.remaining() as u64;
    match count.checked_mul(min_len) {
        Some(needed) if needed <= available => Ok(()),
        _ => Err(GgufErrorKind::LengthExceedsFile {
            what: what(),
            count,
            offset: c.position() as u64,
            available,
        }),
    }
}

fn read_string(c: &mut Cursor<'_>, what: impl Fn() -> String) -> Result<String, GgufErrorKind> {
    let len = c
        .u64()
        .map_err(|s| s.reading(format!("the length of {}", what())))?;
    check_count(c, len, 1, || format!("the length of {}", what()))?;
    let bytes = c.take(len).map_err(|s| s.reading(what()))?;
    String::from_utf8(bytes.to_vec()).map_err(|_| GgufErrorKind::InvalidUtf8 { what: what() })
}

fn read_metadata(
    c: &mut Cursor<'_>,
    kv_count: u64,
) -> Result<BTreeMap<String, MetadataValue>, GgufErrorKind> {
    let mut metadata = BTreeMap::new();
    for i in 0..kv_count {
        let key = read_string(c, || format!("metadata key #{i}"))?;
        let type_id = c
            .u32()
            .map_err(|s| s.reading(format!("the value type of metadata key `{key}`")))?;
        let value = read_value(c, type_id, &key)?;
        match metadata.entry(key) {
            Entry::Occupied(entry) => {
                return Err(GgufErrorKind::DuplicateKey {
                    key: entry.key().clone(),
                });
            }
            Entry::Vacant(entry) => {
                entry.insert(value);
            }
        }
    }
    Ok(metadata)
}

fn metadata_type(key: &str, type_id: u32) -> Result<MetadataType, GgufErrorKind> {
    MetadataType::from_id(type_id).ok_or_else(|| GgufErrorKind::UnknownMetadataType {
        key: key.to_owned(),
        type_id,
    })
}

fn read_value(c: &mut Cursor<'_>, type_id: u32, key: &str) -> Result<MetadataValue, GgufErrorKind> {
    let what = || format!("the value of metadata key `{key}`");
    let short = |s: Short| s.reading(what());
    Ok(match metadata_type(key, type_id)? {
        MetadataType::U8 => MetadataValue::U8(c.u8().map_err(short)?),
        MetadataType::I8 => MetadataValue::I8(c.i8().map_err(short)?),
        MetadataType::U16 => MetadataValue::U16(c.u16().map_err(short)?),
        MetadataType::I16 => MetadataValue::I16(c.i16().map_err(short)?),
        MetadataType::U32 => MetadataValue::U32(c.u32().map_err(short)?),
        MetadataType::I32 => MetadataValue::I32(c.i32().map_err(short)?),
        MetadataType::U64 => MetadataValue::U64(c.u64().map_err(short)?),
        MetadataType::I64 => MetadataValue::I64(c.i64().map_err(short)?),
        MetadataType::F32 => MetadataValue::F32(c.f32().map_err(short)?),
        MetadataType::F64 => MetadataValue::F64(c.f64().map_err(short)?),
        // ggml reads a bool as a byte and takes any non-zero value as true.
        MetadataType::Bool => MetadataValue::Bool(c.u8().map_err(short)? != 0),
        MetadataType::String => MetadataValue::String(read_string(c, what)?),
        MetadataType::Array => MetadataValue::Array(read_array(c, key, 1)?),
    })
}

/// Reads `count` fixed-size elements at once (the length was checked against the file).
fn read_fixed<T, const N: usize>(
    c: &mut Cursor<'_>,
    count: u64,
    convert: fn([u8; N]) -> T,
) -> Result<Vec<T>, Short> {
    let bytes = c.take(count.saturating_mul(N as u64))?;
    Ok(bytes
        .chunks_exact(N)
        .map(|chunk| {
            let mut element = [0u8; N];
            element.copy_from_slice(chunk);
            convert(element)
        })
        .collect())
}

/// Reads an array (element type, length, elements) at nesting `depth` (1 = top level).
fn read_array(c: &mut Cursor<'_>, key: &str, depth: usize) -> Result<MetadataArray, GgufErrorKind> {
    if depth > MAX_ARRAY_NESTING {
        return Err(GgufErrorKind::NestingTooDeep {
            key: key.to_owned(),
            max_depth: MAX_ARRAY_NESTING,
        });
    }
    let element_type_id = c
        .u32()
        .map_err(|s| s.reading(format!("the element type of array `{key}`")))?;
    let element_type = metadata_type(key, element_type_id)?;
    let len = c
        .u64()
        .map_err(|s| s.reading(format!("the length of array `{key}`")))?;
    check_count(c, len, element_type.min_encoded_len(), || {
        format!("the length of array `{key}` ({element_type} elements)")
    })?;
    let short = |s: Short| s.reading(format!("the elements of array `{key}`"));
    Ok(match element_type {
        MetadataType::U8 => {
            MetadataArray::U8(read_fixed(c, len, u8::from_le_bytes).map_err(short)?)
        }
        MetadataType::I8 => {
            MetadataArray::I8(read_fixed(c, len, i8::from_le_bytes).map_err(short)?)
        }
        MetadataType::U16 => {
            MetadataArray::U16(read_fixed(c, len, u16::from_le_bytes).map_err(short)?)
        }
        MetadataType::I16 => {
            MetadataArray::I16(read_fixed(c, len, i16::from_le_bytes).map_err(short)?)
        }
        MetadataType::U32 => {
            MetadataArray::U32(read_fixed(c, len, u32::from_le_bytes).map_err(short)?)
        }
        MetadataType::I32 => {
            MetadataArray::I32(read_fixed(c, len, i32::from_le_bytes).map_err(short)?)
        }
        MetadataType::U64 => {
            MetadataArray::U64(read_fixed(c, len, u64::from_le_bytes).map_err(short)?)
        }
        MetadataType::I64 => {
            MetadataArray::I64(read_fixed(c, len, i64::from_le_bytes).map_err(short)?)
        }
        MetadataType::F32 => {
            MetadataArray::F32(read_fixed(c, len, f32::from_le_bytes).map_err(short)?)
        }
        MetadataType::F64 => {
            MetadataArray::F64(read_fixed(c, len, f64::from_le_bytes).map_err(short)?)
        }
        MetadataType::Bool => {
            MetadataArray::Bool(read_fixed(c, len, |[b]: [u8; 1]| b != 0).map_err(short)?)
        }
        MetadataType::String => {
            // `check_count` bounded `len` by the bytes left, so this allocation is too.
            let mut strings = Vec::with_capacity(len as usize);
            for i in 0..len {
                strings.push(read_string(c, || format!("element #{i} of array `{key}`"))?);
            }
            MetadataArray::String(strings)
        }
        MetadataType::Array => {
            let mut arrays = Vec::with_capacity(len as usize);
            for _ in 0..len {
                arrays.push(read_array(c, key, depth + 1)?);
            }
            MetadataArray::Array(arrays)
        }
    })
}

fn read_tensor_infos(
    c: &mut Cursor<'_>,
    tensor_count: u64,
) -> Result<Vec<RawTensorInfo>, GgufErrorKind> {
    // `check_count` bounded the count by the bytes left.
    let mut tensors = Vec::with_capacity(tensor_count as usize);
    for i in 0..tensor_count {
        let name = read_string(c, || format!("the name of tensor #{i}"))?;
        let n_dims = c
            .u32()
            .map_err(|s| s.reading(format!("the dimension count of tensor `{name}`")))?;
        if n_dims > MAX_DIMS {
            return Err(GgufErrorKind::TooManyDims {
                tensor: name,
                n_dims,
            });
        }
        let dims = (0..n_dims)
            .map(|_| c.u64())
            .collect::<Result<Vec<u64>, Short>>()
            .map_err(|s| s.reading(format!("the dims of tensor `{name}`")))?;
        let type_id = c
            .u32()
            .map_err(|s| s.reading(format!("the type of tensor `{name}`")))?;
        let ggml_type =
            GgmlType::from_id(type_id).ok_or_else(|| GgufErrorKind::UnknownTensorType {
                tensor: name.clone(),
                type_id,
            })?;
        let offset = c
            .u64()
            .map_err(|s| s.reading(format!("the data offset of tensor `{name}`")))?;
        tensors.push(RawTensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        });
    }
    Ok(tensors)
}

fn alignment(metadata: &BTreeMap<String, MetadataValue>) -> Result<u64, GgufErrorKind> {
    let Some(value) = metadata.get(ALIGNMENT_KEY) else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    match value.as_u32() {
        Some(alignment) if alignment.is_power_of_two() => Ok(alignment.into()),
        _ => Err(GgufErrorKind::InvalidAlignment {
            value: match value.as_integer() {
                Some(integer) => integer.to_string(),
                None => format!("a {}", value.type_description()),
            },
        }),
    }
}

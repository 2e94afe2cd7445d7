//! GGUF metadata values: the typed key/value pairs of a file's header.

use std::fmt;

/// The type of a GGUF metadata value (`enum gguf_type`), with the spec's ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetadataType {
    /// `UINT8` (id 0).
    U8,
    /// `INT8` (id 1).
    I8,
    /// `UINT16` (id 2).
    U16,
    /// `INT16` (id 3).
    I16,
    /// `UINT32` (id 4).
    U32,
    /// `INT32` (id 5).
    I32,
    /// `FLOAT32` (id 6).
    F32,
    /// `BOOL` (id 7), one byte.
    Bool,
    /// `STRING` (id 8): u64 byte length + UTF-8 bytes.
    String,
    /// `ARRAY` (id 9): u32 element type + u64 length + elements.
    Array,
    /// `UINT64` (id 10).
    U64,
    /// `INT64` (id 11).
    I64,
    /// `FLOAT64` (id 12).
    F64,
}

impl MetadataType {
    /// The type with GGUF id `id`, or `None` for an id the spec does not define.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::U8,
            1 => Self::I8,
            2 => Self::U16,
            3 => Self::I16,
            4 => Self::U32,
            5 => Self::I32,
            6 => Self::F32,
            7 => Self::Bool,
            8 => Self::String,
            9 => Self::Array,
            10 => Self::U64,
            11 => Self::I64,
            12 => Self::F64,
            _ => return None,
        })
    }

    /// The GGUF id of this type.
    pub fn id(self) -> u32 {
        match self {
            Self::U8 => 0,
            Self::I8 => 1,
            Self::U16 => 2,
            Self::I16 => 3,
            Self::U32 => 4,
            Self::I32 => 5,
            Self::F32 => 6,
            Self::Bool => 7,
            Self::String => 8,
            Self::Array => 9,
            Self::U64 => 10,
            Self::I64 => 11,
            Self::F64 => 12,
        }
    }

    /// The spec's name of this type (`"UINT32"`, `"STRING"`...), as gguf-py prints it.
    pub fn name(self) -> &'static str {
        match self {
            Self::U8 => "UINT8",
            Self::I8 => "INT8",
            Self::U16 => "UINT16",
            Self::I16 => "INT16",
            Self::U32 => "UINT32",
            Self::I32 => "INT32",
            Self::F32 => "FLOAT32",
            Self::Bool => "BOOL",
            Self::String => "STRING",
            Self::Array => "ARRAY",
            Self::U64 => "UINT64",
            Self::I64 => "INT64",
            Self::F64 => "FLOAT64",
        }
    }

    /// The fewest bytes one value of this type takes in a file: bounds an element count by the
    /// bytes left before anything is allocated.
    pub(crate) fn min_encoded_len(self) -> u64 {
        match self {
            Self::U8 | Self::I8 | Self::Bool => 1,
            Self::U16 | Self::I16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 => 8,
            // the u64 length of an empty string
            Self::String => 8,
            // u32 element type + u64 length of an empty array
            Self::Array => 12,
        }
    }
}

impl fmt::Display for MetadataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataValue {
    /// `UINT8`.
    U8(u8),
    /// `INT8`.
    I8(i8),
    /// `UINT16`.
    U16(u16),
    /// `INT16`.
    I16(i16),
    /// `UINT32`.
    U32(u32),
    /// `INT32`.
    I32(i32),
    /// `UINT64`.
    U64(u64),
    /// `INT64`.
    I64(i64),
    /// `FLOAT32`.
    F32(f32),
    /// `FLOAT64`.
    F64(f64),
    /// `BOOL`.
    Bool(bool),
    /// `STRING`.
    String(String),
    /// `ARRAY`, with its element type.
    Array(MetadataArray),
}

impl MetadataValue {
    /// The GGUF type of this value (for an array, [`MetadataType::Array`]).
    pub fn metadata_type(&self) -> MetadataType {
        match self {
            Self::U8(_) => MetadataType::U8,
            Self::I8(_) => MetadataType::I8,
            Self::U16(_) => MetadataType::U16,
            Self::I16(_) => MetadataType::I16,
            Self::U32(_) => MetadataType::U32,
            Self::I32(_) => MetadataType::I32,
            Self::U64(_) => MetadataType::U64,
            Self::I64(_) => MetadataType::I64,
            Self::F32(_) => MetadataType::F32,
            Self::F64(_) => MetadataType::F64,
            Self::Bool(_) => MetadataType::Bool,
            Self::String(_) => MetadataType::String,
            Self::Array(_) => MetadataType::Array,
        }
    }

    /// The full type in gguf-py's notation: `"UINT32"`, `"ARRAY[STRING]"`, `"ARRAY[ARRAY[INT8]]"`
    /// (nested arrays are described by their first element; an empty one as `"ARRAY[ARRAY]"`).
    pub fn type_description(&self) -> String {
        match self {
            Self::Array(array) => array.type_description(),
            other => other.metadata_type().name().to_owned(),
        }
    }

    /// The value as an `i128` if it is an integer of any width (not a bool).
    pub(crate) fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            Self::U8(v) => v.into(),
            Self::I8(v) => v.into(),
            Self::U16(v) => v.into(),
            Self::I16(v) => v.into(),
            Self::U32(v) => v.into(),
            Self::I32(v) => v.into(),
            Self::U64(v) => v.into(),
            Self::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// The value as a `u32` if it is an integer of any width whose value fits: writers disagree
    /// on integer widths (token ids appear as `UINT32`, `INT32` or `UINT64`), the value is what
    /// matters.
    pub fn as_u32(&self) -> Option<u32> {
        self.as_integer().and_then(|v| u32::try_from(v).ok())
    }

    /// The value as a `u64` if it is an integer of any width whose value fits.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_integer().and_then(|v| u64::try_from(v).ok())
    }

    /// The value as an `i64` if it is an integer of any width whose value fits.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_integer().and_then(|v| i64::try_from(v).ok())
    }

    /// The value if it is a `FLOAT32` (a `FLOAT64` would lose precision, so it is not converted).
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Self::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The value if it is a `FLOAT64` or a `FLOAT32` (widened exactly).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The value if it is a `BOOL`.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The value if it is a `STRING`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(v) => Some(v),
            _ => None,
        }
    }

    /// The value if it is an `ARRAY`.
    pub fn as_array(&self) -> Option<&MetadataArray> {
        match self {
            Self::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// A metadata `ARRAY`: elements of one type, kept in typed vectors (a 49k-entry vocabulary
/// stays one `Vec<String>`, and an empty array keeps its element type).
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataArray {
    /// Elements of type `UINT8`.
    U8(Vec<u8>),
    /// Elements of type `INT8`.
    I8(Vec<i8>),
    /// Elements of type `UINT16`.
    U16(Vec<u16>),
    /// Elements of type `INT16`.
    I16(Vec<i16>),
    /// Elements of type `UINT32`.
    U32(Vec<u32>),
    /// Elements of type `INT32`.
    I32(Vec<i32>),
    /// Elements of type `UINT64`.
    U64(Vec<u64>),
    /// Elements of type `INT64`.
    I64(Vec<i64>),
    /// Elements of type `FLOAT32`.
    F32(Vec<f32>),
    /// Elements of type `FLOAT64`.
    F64(Vec<f64>),
    /// Elements of type `BOOL`.
    Bool(Vec<bool>),
    /// Elements of type `STRING`.
    String(Vec<String>),
    /// Elements of type `ARRAY`; each inner array has its own element type.
    Array(Vec<MetadataArray>),
}

impl MetadataArray {
    /// The type of the elements.
    pub fn element_type(&self) -> MetadataType {
        match self {
            Self::U8(_) => MetadataType::U8,
            Self::I8(_) => MetadataType::I8,
            Self::U16(_) => MetadataType::U16,
            Self::I16(_) => MetadataType::I16,
            Self::U32(_) => MetadataType::U32,
            Self::I32(_) => MetadataType::I32,
            Self::U64(_) => MetadataType::U64,
            Self::I64(_) => MetadataType::I64,
            Self::F32(_) => MetadataType::F32,
            Self::F64(_) => MetadataType::F64,
            Self::Bool(_) => MetadataType::Bool,
            Self::String(_) => MetadataType::String,
            Self::Array(_) => MetadataType::Array,
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::U8(v) => v.len(),
            Self::I8(v) => v.len(),
            Self::U16(v) => v.len(),
            Self::I16(v) => v.len(),
            Self::U32(v) => v.len(),
            Self::I32(v) => v.len(),
            Self::U64(v) => v.len(),
            Self::I64(v) => v.len(),
            Self::F32(v) => v.len(),
            Self::F64(v) => v.len(),
            Self::Bool(v) => v.len(),
            Self::String(v) => v.len(),
            Self::Array(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The type in gguf-py's notation, e.g. `"ARRAY[STRING]"`.
    pub fn type_description(&self) -> String {
        match self {
            Self::Array(inner) => match inner.first() {
                Some(first) => format!("ARRAY[{}]", first.type_description()),
                None => "ARRAY[ARRAY]".to_owned(),
            },
            other => format!("ARRAY[{}]", other.element_type()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_ids_round_trip() {
        for id in 0..13 {
            let t = MetadataType::from_id(id).unwrap();
            assert_eq!(t.id(), id);
        }
        assert_eq!(MetadataType::from_id(13), None);
    }

    #[test]
    fn integer_conversions_are_lossless_only() {
        assert_eq!(MetadataValue::I32(7).as_u32(), Some(7));
        assert_eq!(MetadataValue::I32(-1).as_u32(), None);
        assert_eq!(MetadataValue::U64(u64::from(u32::MAX) + 1).as_u32(), None);
        assert_eq!(MetadataValue::U64(u64::MAX).as_i64(), None);
        assert_eq!(MetadataValue::Bool(true).as_u32(), None);
        assert_eq!(MetadataValue::F64(1.0).as_f32(), None);
        assert_eq!(MetadataValue::F32(0.5).as_f64(), Some(0.5));
    }

    #[test]
    fn type_descriptions() {
        let nested = MetadataValue::Array(MetadataArray::Array(vec![MetadataArray::I8(vec![])]));
        assert_eq!(nested.type_description(), "ARRAY[ARRAY[INT8]]");
        assert_eq!(MetadataValue::U32(1).type_description(), "UINT32");
        let strings = MetadataValue::Array(MetadataArray::String(vec![]));
        assert_eq!(strings.type_description(), "ARRAY[STRING]");
    }
}

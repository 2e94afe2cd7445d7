//! A tiny GGUF writer for tests: valid files by default, with knobs to write invalid ones.

/// A metadata value to write. `Raw` writes any type id followed by arbitrary bytes, for
/// malformed values.
#[derive(Clone, Debug)]
pub(crate) enum Val {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    /// The raw byte, so that non-0/1 bools can be written.
    Bool(u8),
    Str(String),
    /// Element type id and elements (written without their own type ids).
    Arr(u32, Vec<Val>),
    Raw(u32, Vec<u8>),
}

impl Val {
    pub(crate) fn str(s: &str) -> Self {
        Self::Str(s.to_owned())
    }

    pub(crate) fn type_id(&self) -> u32 {
        match self {
            Self::U8(_) => 0,
            Self::I8(_) => 1,
            Self::U16(_) => 2,
            Self::I16(_) => 3,
            Self::U32(_) => 4,
            Self::I32(_) => 5,
            Self::F32(_) => 6,
            Self::Bool(_) => 7,
            Self::Str(_) => 8,
            Self::Arr(..) => 9,
            Self::U64(_) => 10,
            Self::I64(_) => 11,
            Self::F64(_) => 12,
            Self::Raw(id, _) => *id,
        }
    }

    /// The value without its type id.
    pub(crate) fn write_payload(&self, out: &mut Vec<u8>) {
        match self {
            Self::U8(v) => out.push(*v),
            Self::I8(v) => out.extend(v.to_le_bytes()),
            Self::U16(v) => out.extend(v.to_le_bytes()),
            Self::I16(v) => out.extend(v.to_le_bytes()),
            Self::U32(v) => out.extend(v.to_le_bytes()),
            Self::I32(v) => out.extend(v.to_le_bytes()),
            Self::U64(v) => out.extend(v.to_le_bytes()),
            Self::I64(v) => out.extend(v.to_le_bytes()),
            Self::F32(v) => out.extend(v.to_le_bytes()),
            Self::F64(v) => out.extend(v.to_le_bytes()),
            Self::Bool(v) => out.push(*v),
            Self::Str(s) => write_str(out, s),
            Self::Arr(element_type, elements) => {
                out.extend(element_type.to_le_bytes());
                out.extend((elements.len() as u64).to_le_bytes());
                for element in elements {
                    element.write_payload(out);
                }
            }
            Self::Raw(_, bytes) => out.extend(bytes),
        }
    }
}

pub(crate) fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// A tensor to write. `offset: None` places it after the previous one, aligned.
#[derive(Clone, Debug)]
pub(crate) struct TensorSpec {
    pub(crate) name: String,
    pub(crate) dims: Vec<u64>,
    pub(crate) type_id: u32,
    pub(crate) data: Vec<u8>,
    pub(crate) offset: Option<u64>,
}

impl TensorSpec {
    pub(crate) fn new(name: &str, dims: &[u64], type_id: u32, data: Vec<u8>) -> Self {
        Self {
            name: name.to_owned(),
            dims: dims.to_vec(),
            type_id,
            data,
            offset: None,
        }
    }
}

/// A whole file. `alignment` is the layout's alignment; a non-default one needs a
/// `general.alignment` entry in `kvs` too (or not, to test the mismatch).
#[derive(Clone, Debug)]
pub(crate) struct FileSpec {
    pub(crate) version: u32,
    pub(crate) kvs: Vec<(String, Val)>,
    pub(crate) tensors: Vec<TensorSpec>,
    pub(crate) alignment: u64,
    /// Overrides the written counts, for lying headers.
    pub(crate) kv_count: Option<u64>,
    pub(crate) tensor_count: Option<u64>,
}

impl Default for FileSpec {
    fn default() -> Self {
        Self {
            version: 3,
            kvs: Vec::new(),
            tensors: Vec::new(),
            alignment: 32,
            kv_count: None,
            tensor_count: None,
        }
    }
}

impl FileSpec {
    pub(crate) fn kv(mut self, key: &str, value: Val) -> Self {
        self.kvs.push((key.to_owned(), value));
        self
    }

    pub(crate) fn tensor(mut self, tensor: TensorSpec) -> Self {
        self.tensors.push(tensor);
        self
    }

    pub(crate) fn build(&self) -> Vec<u8> {
        let align = |n: u64| n.div_ceil(self.alignment) * self.alignment;
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(self.version.to_le_bytes());
        let tensor_count = self.tensor_count.unwrap_or(self.tensors.len() as u64);
        out.extend(tensor_count.to_le_bytes());
        out.extend(self.kv_count.unwrap_or(self.kvs.len() as u64).to_le_bytes());
        for (key, value) in &self.kvs {
            write_str(&mut out, key);
            out.extend(value.type_id().to_le_bytes());
            value.write_payload(&mut out);
        }
        let mut next = 0u64;
        let mut placed = Vec::new();
        for tensor in &self.tensors {
            let offset = tensor.offset.unwrap_or(next);
            // Saturating: tests place tensors at absurd offsets on purpose.
            next = align(
                offset
                    .saturating_add(tensor.data.len() as u64)
                    .min(u64::MAX / 2),
            );
            placed.push(offset);
            write_str(&mut out, &tensor.name);
            out.extend((tensor.dims.len() as u32).to_le_bytes());
            for dim in &tensor.dims {
                out.extend(dim.to_le_bytes());
            }
            out.extend(tensor.type_id.to_le_bytes());
            out.extend(offset.to_le_bytes());
        }
        if self.tensors.is_empty() {
            return out;
        }
        let data_start = align(out.len() as u64);
        for (tensor, offset) in self.tensors.iter().zip(placed) {
            // Offsets past the layout (for out-of-bounds tests) write nothing.
            let Some(start) = data_start.checked_add(offset) else {
                continue;
            };
            if start > data_start + 1_000_000 {
                continue;
            }
            let end = start as usize + tensor.data.len();
            if out.len() < end {
                out.resize(end, 0);
            }
            out[start as usize..end].copy_from_slice(&tensor.data);
        }
        out
    }
}

/// Deterministic pseudo-random bytes (xorshift), for tensor data.
pub(crate) fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 32) as u8
        })
        .collect()
}

//! A bounds-checked little-endian reader over the file's bytes.

use crate::GgufErrorKind;

/// Reads fields front to back; every read checks the bytes left first, so a truncated or lying
/// file produces a [`Short`] instead of an over-read or a panic.
pub(crate) struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

/// A read that ran past the end: where, and how much was missing. The caller says what it was
/// reading ([`Short::reading`]), so error messages are only formatted on failure.
#[derive(Debug)]
pub(crate) struct Short {
    offset: usize,
    needed: u64,
    available: usize,
}

impl Short {
    /// The error for a short read of `what`.
    pub(crate) fn reading(self, what: impl Into<String>) -> GgufErrorKind {
        GgufErrorKind::Truncated {
            what: what.into(),
            offset: self.offset as u64,
            needed: self.needed,
            available: self.available as u64,
        }
    }
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    /// Current offset from the start of the file.
    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    /// Bytes left after the current position.
    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// The next `len` bytes.
    pub(crate) fn take(&mut self, len: u64) -> Result<&'a [u8], Short> {
        let short = || Short {
            offset: self.pos,
            needed: len,
            available: self.remaining(),
        };
        let len = usize::try_from(len).map_err(|_| short())?;
        let end = self.pos.checked_add(len).ok_or_else(short)?;
        let slice = self.bytes.get(self.pos..end).ok_or_else(short)?;
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Short> {
        let slice = self.take(N as u64)?;
        // `take` returned exactly N bytes.
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, Short> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, Short> {
        self.array().map(u16::from_le_bytes)
    }

    pub(crate) fn u32(&mut self) -> Result<u32, Short> {
        self.array().map(u32::from_le_bytes)
    }

    pub(crate) fn u64(&mut self) -> Result<u64, Short> {
        self.array().map(u64::from_le_bytes)
    }

    pub(crate) fn i8(&mut self) -> Result<i8, Short> {
        self.array().map(i8::from_le_bytes)
    }

    pub(crate) fn i16(&mut self) -> Result<i16, Short> {
        self.array().map(i16::from_le_bytes)
    }

    pub(crate) fn i32(&mut self) -> Result<i32, Short> {
        self.array().map(i32::from_le_bytes)
    }

    pub(crate) fn i64(&mut self) -> Result<i64, Short> {
        self.array().map(i64::from_le_bytes)
    }

    pub(crate) fn f32(&mut self) -> Result<f32, Short> {
        self.array().map(f32::from_le_bytes)
    }

    pub(crate) fn f64(&mut self) -> Result<f64, Short> {
        self.array().map(f64::from_le_bytes)
    }
}

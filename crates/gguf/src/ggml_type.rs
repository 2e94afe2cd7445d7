//! ggml tensor types: their ids in a GGUF file and their block layouts.

use std::fmt;

/// A ggml tensor data type, as stored in a GGUF tensor info.
///
/// Every type ggml currently defines is listed, so that the size of any tensor can be computed
/// and bounds-checked at open time; [`crate::dequantize`] decodes only some of them (see
/// [`GgmlType::can_dequantize`]). Ids that ggml has retired (4, 5, 31–33, 36–38) are unknown,
/// as they are to ggml itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
#[allow(non_camel_case_types)] // ggml's own names, so that they match llama.cpp and gguf-py
pub enum GgmlType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// 32 values: f16 scale + 32 4-bit quants, value = (q − 8)·d.
    Q4_0,
    /// 32 values: f16 scale and minimum + 32 4-bit quants, value = q·d + m.
    Q4_1,
    /// 32 values: 5-bit quants, symmetric.
    Q5_0,
    /// 32 values: 5-bit quants with a minimum.
    Q5_1,
    /// 32 values: f16 scale + 32 i8 quants, value = q·d.
    Q8_0,
    /// 32 values: 8-bit quants with f32 scale and sum (an intermediate type of ggml's matmul).
    Q8_1,
    /// 256-value super-block, 2-bit quants.
    Q2_K,
    /// 256-value super-block, 3-bit quants.
    Q3_K,
    /// 256-value super-block, 4-bit quants, 6-bit scales and minimums.
    Q4_K,
    /// 256-value super-block, 5-bit quants, 6-bit scales and minimums.
    Q5_K,
    /// 256-value super-block, 6-bit quants, i8 scales.
    Q6_K,
    /// 256-value super-block, 8-bit quants (an intermediate type of ggml's matmul).
    Q8_K,
    /// i-quant, 2.06 bits per weight.
    IQ2_XXS,
    /// i-quant, 2.31 bits per weight.
    IQ2_XS,
    /// i-quant, 3.06 bits per weight.
    IQ3_XXS,
    /// i-quant, 1.56 bits per weight.
    IQ1_S,
    /// i-quant, 4.5 bits per weight, non-linear.
    IQ4_NL,
    /// i-quant, 3.44 bits per weight.
    IQ3_S,
    /// i-quant, 2.5 bits per weight.
    IQ2_S,
    /// i-quant, 4.25 bits per weight.
    IQ4_XS,
    /// 8-bit signed integer.
    I8,
    /// 16-bit signed integer.
    I16,
    /// 32-bit signed integer.
    I32,
    /// 64-bit signed integer.
    I64,
    /// 64-bit IEEE float.
    F64,
    /// i-quant, 1.75 bits per weight.
    IQ1_M,
    /// bfloat16.
    BF16,
    /// ternary, 1.69 bits per weight.
    TQ1_0,
    /// ternary, 2.06 bits per weight.
    TQ2_0,
    /// microscaling FP4 (32 values, e8m0 scale).
    MXFP4,
    /// NVIDIA FP4 (64 values).
    NVFP4,
    /// 1-bit quants (128 values).
    Q1_0,
}

/// Values per super-block of the K-quants.
pub(crate) const QK_K: u64 = 256;

impl GgmlType {
    /// Every known type, in id order.
    pub const ALL: [GgmlType; 34] = [
        Self::F32,
        Self::F16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q8_1,
        Self::Q2_K,
        Self::Q3_K,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
        Self::Q8_K,
        Self::IQ2_XXS,
        Self::IQ2_XS,
        Self::IQ3_XXS,
        Self::IQ1_S,
        Self::IQ4_NL,
        Self::IQ3_S,
        Self::IQ2_S,
        Self::IQ4_XS,
        Self::I8,
        Self::I16,
        Self::I32,
        Self::I64,
        Self::F64,
        Self::IQ1_M,
        Self::BF16,
        Self::TQ1_0,
        Self::TQ2_0,
        Self::MXFP4,
        Self::NVFP4,
        Self::Q1_0,
    ];

    /// The type with ggml id `id` (`enum ggml_type`), or `None` for an unknown or retired id.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    /// ggml's id of this type (`enum ggml_type`), as stored in a GGUF tensor info.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q8_1 => 9,
            Self::Q2_K => 10,
            Self::Q3_K => 11,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::Q8_K => 15,
            Self::IQ2_XXS => 16,
            Self::IQ2_XS => 17,
            Self::IQ3_XXS => 18,
            Self::IQ1_S => 19,
            Self::IQ4_NL => 20,
            Self::IQ3_S => 21,
            Self::IQ2_S => 22,
            Self::IQ4_XS => 23,
            Self::I8 => 24,
            Self::I16 => 25,
            Self::I32 => 26,
            Self::I64 => 27,
            Self::F64 => 28,
            Self::IQ1_M => 29,
            Self::BF16 => 30,
            Self::TQ1_0 => 34,
            Self::TQ2_0 => 35,
            Self::MXFP4 => 39,
            Self::NVFP4 => 40,
            Self::Q1_0 => 41,
        }
    }

    /// ggml's name of this type (`"Q4_K"`, `"BF16"`...), as gguf-py and llama.cpp print it.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q8_1 => "Q8_1",
            Self::Q2_K => "Q2_K",
            Self::Q3_K => "Q3_K",
            Self::Q4_K => "Q4_K",
            Self::Q5_K => "Q5_K",
            Self::Q6_K => "Q6_K",
            Self::Q8_K => "Q8_K",
            Self::IQ2_XXS => "IQ2_XXS",
            Self::IQ2_XS => "IQ2_XS",
            Self::IQ3_XXS => "IQ3_XXS",
            Self::IQ1_S => "IQ1_S",
            Self::IQ4_NL => "IQ4_NL",
            Self::IQ3_S => "IQ3_S",
            Self::IQ2_S => "IQ2_S",
            Self::IQ4_XS => "IQ4_XS",
            Self::I8 => "I8",
            Self::I16 => "I16",
            Self::I32 => "I32",
            Self::I64 => "I64",
            Self::F64 => "F64",
            Self::IQ1_M => "IQ1_M",
            Self::BF16 => "BF16",
            Self::TQ1_0 => "TQ1_0",
            Self::TQ2_0 => "TQ2_0",
            Self::MXFP4 => "MXFP4",
            Self::NVFP4 => "NVFP4",
            Self::Q1_0 => "Q1_0",
        }
    }

    /// Values per block: 1 for plain types, 32 for Q8_0/Q4_0/Q4_1..., 256 for K-quants.
    ///
    /// A tensor's rows (GGUF `dims[0]`) must be a whole number of blocks.
    pub fn block_size(self) -> u64 {
        match self {
            Self::F32
            | Self::F16
            | Self::BF16
            | Self::F64
            | Self::I8
            | Self::I16
            | Self::I32
            | Self::I64 => 1,
            Self::Q4_0
            | Self::Q4_1
            | Self::Q5_0
            | Self::Q5_1
            | Self::Q8_0
            | Self::Q8_1
            | Self::IQ4_NL
            | Self::MXFP4 => 32,
            Self::NVFP4 => 64,
            Self::Q1_0 => 128,
            Self::Q2_K
            | Self::Q3_K
            | Self::Q4_K
            | Self::Q5_K
            | Self::Q6_K
            | Self::Q8_K
            | Self::IQ2_XXS
            | Self::IQ2_XS
            | Self::IQ3_XXS
            | Self::IQ1_S
            | Self::IQ3_S
            | Self::IQ2_S
            | Self::IQ4_XS
            | Self::IQ1_M
            | Self::TQ1_0
            | Self::TQ2_0 => QK_K,
        }
    }

    /// Bytes per block (ggml's `type_size`; gguf-py's `GGML_QUANT_SIZES`).
    pub fn type_size(self) -> u64 {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::F64 | Self::I64 => 8,
            Self::I8 => 1,
            Self::I32 => 4,
            Self::Q4_0 => 2 + 16,
            Self::Q4_1 => 2 + 2 + 16,
            Self::Q5_0 => 2 + 4 + 16,
            Self::Q5_1 => 2 + 2 + 4 + 16,
            Self::Q8_0 => 2 + 32,
            Self::Q8_1 => 4 + 4 + 32,
            Self::Q2_K => 2 + 2 + QK_K / 16 + QK_K / 4,
            Self::Q3_K => 2 + QK_K / 4 + QK_K / 8 + 12,
            Self::Q4_K => 2 + 2 + QK_K / 2 + 12,
            Self::Q5_K => 2 + 2 + QK_K / 2 + QK_K / 8 + 12,
            Self::Q6_K => 2 + QK_K / 2 + QK_K / 4 + QK_K / 16,
            Self::Q8_K => 4 + QK_K + QK_K / 8,
            Self::IQ2_XXS => 2 + QK_K / 4,
            Self::IQ2_XS => 2 + QK_K / 4 + QK_K / 32,
            Self::IQ3_XXS => 2 + QK_K / 4 + QK_K / 8,
            Self::IQ1_S => 2 + QK_K / 8 + QK_K / 16,
            Self::IQ4_NL => 2 + 16,
            Self::IQ3_S => 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4,
            Self::IQ2_S => 2 + QK_K / 4 + QK_K / 16,
            Self::IQ4_XS => 2 + 2 + QK_K / 2 + QK_K / 64,
            Self::IQ1_M => QK_K / 8 + QK_K / 16 + QK_K / 32,
            Self::TQ1_0 => 2 + 4 * 13,
            Self::TQ2_0 => 2 + 64,
            Self::MXFP4 => 1 + 16,
            Self::NVFP4 => 4 + 32,
            Self::Q1_0 => 2 + 16,
        }
    }

    /// Whether [`crate::dequantize`] decodes this type: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K,
    /// Q5_K and Q6_K.
    pub fn can_dequantize(self) -> bool {
        matches!(
            self,
            Self::F32
                | Self::F16
                | Self::BF16
                | Self::Q8_0
                | Self::Q4_0
                | Self::Q4_1
                | Self::Q4_K
                | Self::Q5_K
                | Self::Q6_K
        )
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_are_unique() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()), Some(t), "{t}");
        }
        for retired in [4, 5, 31, 32, 33, 36, 37, 38, 42, u32::MAX] {
            assert_eq!(GgmlType::from_id(retired), None, "{retired}");
        }
    }

    #[test]
    fn sizes_match_ggml() {
        // From gguf-py's GGML_QUANT_SIZES (block size, type size) for the types we decode.
        let expected = [
            (GgmlType::F32, 1, 4),
            (GgmlType::F16, 1, 2),
            (GgmlType::BF16, 1, 2),
            (GgmlType::Q8_0, 32, 34),
            (GgmlType::Q4_0, 32, 18),
            (GgmlType::Q4_1, 32, 20),
            (GgmlType::Q4_K, 256, 144),
            (GgmlType::Q5_K, 256, 176),
            (GgmlType::Q6_K, 256, 210),
        ];
        for (t, block, size) in expected {
            assert_eq!((t.block_size(), t.type_size()), (block, size), "{t}");
            assert!(t.can_dequantize());
        }
    }
}

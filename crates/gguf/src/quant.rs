//! Dequantisation to f32, block by block, exactly as ggml's `dequantize_row_*`
//! (llama.cpp `ggml-quants.c`) and gguf-py's `gguf/quants.py`.
//!
//! "Exactly" includes the order of f32 operations: e.g. Q4_K computes `d1 = d·sc` first and then
//! `d1·q − m1`, as ggml does, so results are bit-identical to the references. Rust never fuses
//! `a·b − c` into an FMA on its own, which keeps that true on every target.

use half::f16;

use crate::ggml_type::QK_K;
use crate::{DequantizeError, GgmlType};

/// Dequantizes `bytes` holding whole blocks of `ggml_type` to f32 values, in storage order (for
/// a tensor, row-major in its PyTorch shape).
///
/// # Errors
///
/// [`DequantizeError::Unsupported`] for a type other than F32, F16, BF16, Q8_0, Q4_0, Q4_1,
/// Q4_K, Q5_K or Q6_K; [`DequantizeError::PartialBlock`] when `bytes` is not a whole number of
/// blocks.
pub fn dequantize(ggml_type: GgmlType, bytes: &[u8]) -> Result<Vec<f32>, DequantizeError> {
    let block_fn = block_decoder(ggml_type).ok_or(DequantizeError::Unsupported(ggml_type))?;
    if !(bytes.len() as u64).is_multiple_of(ggml_type.type_size()) {
        return Err(DequantizeError::PartialBlock {
            ggml_type,
            len: bytes.len(),
            type_size: ggml_type.type_size(),
        });
    }
    Ok(decode_blocks(block_fn, ggml_type, bytes))
}

/// A function decoding one block (`type_size` bytes) into `block_size` values.
pub(crate) type BlockDecoder = fn(&[u8], &mut [f32]);

/// Decodes the whole blocks of `bytes` with `decoder`, the decoder of `ggml_type` (a trailing
/// partial block, which callers rule out, would be ignored rather than over-read).
pub(crate) fn decode_blocks(decoder: BlockDecoder, ggml_type: GgmlType, bytes: &[u8]) -> Vec<f32> {
    // Both sizes are small constants (at most 256 and 210), so the casts cannot truncate.
    let type_size = ggml_type.type_size() as usize;
    let block_size = ggml_type.block_size() as usize;
    let mut out = vec![0.0f32; bytes.len() / type_size * block_size];
    for (block, values) in bytes
        .chunks_exact(type_size)
        .zip(out.chunks_exact_mut(block_size))
    {
        decoder(block, values);
    }
    out
}

/// The block decoder of `ggml_type`, if this crate decodes it.
pub(crate) fn block_decoder(ggml_type: GgmlType) -> Option<BlockDecoder> {
    Some(match ggml_type {
        GgmlType::F32 => decode_f32,
        GgmlType::F16 => decode_f16,
        GgmlType::BF16 => decode_bf16,
        GgmlType::Q8_0 => decode_q8_0,
        GgmlType::Q4_0 => decode_q4_0,
        GgmlType::Q4_1 => decode_q4_1,
        GgmlType::Q4_K => decode_q4_k,
        GgmlType::Q5_K => decode_q5_k,
        GgmlType::Q6_K => decode_q6_k,
        _ => return None,
    })
}

/// The little-endian f16 at `bytes[at..at + 2]`, widened (exactly) to f32.
fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

fn decode_f32(block: &[u8], out: &mut [f32]) {
    out[0] = f32::from_le_bytes([block[0], block[1], block[2], block[3]]);
}

fn decode_f16(block: &[u8], out: &mut [f32]) {
    out[0] = f16_at(block, 0);
}

fn decode_bf16(block: &[u8], out: &mut [f32]) {
    // bf16 is the top half of an f32.
    out[0] = f32::from_bits(u32::from(u16::from_le_bytes([block[0], block[1]])) << 16);
}

/// `block_q8_0`: f16 d, 32 × i8 qs; value = q·d.
fn decode_q8_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    for (y, &q) in out.iter_mut().zip(&block[2..34]) {
        *y = f32::from(q as i8) * d;
    }
}

/// `block_q4_0`: f16 d, 16 bytes of nibbles; value = (q − 8)·d. Low nibbles are values 0..16,
/// high nibbles 16..32.
fn decode_q4_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let (low, high) = out.split_at_mut(16);
    for (j, &q) in block[2..18].iter().enumerate() {
        low[j] = f32::from(i16::from(q & 0x0F) - 8) * d;
        high[j] = f32::from(i16::from(q >> 4) - 8) * d;
    }
}

/// `block_q4_1`: f16 d, f16 m, 16 bytes of nibbles; value = q·d + m, nibbles as in Q4_0.
fn decode_q4_1(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let m = f16_at(block, 2);
    let (low, high) = out.split_at_mut(16);
    for (j, &q) in block[4..20].iter().enumerate() {
        low[j] = f32::from(q & 0x0F) * d + m;
        high[j] = f32::from(q >> 4) * d + m;
    }
}

/// ggml's `get_scale_min_k4`: scale and minimum of sub-block `j` (0..8) from the 12 bytes of
/// 6-bit values packed in a Q4_K/Q5_K super-block.
fn scale_min_k4(j: usize, scales: &[u8]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// `block_q4_K` (144 bytes): f16 d, f16 dmin, 12 bytes of scales/mins, 128 bytes of nibbles.
/// Each 64 values share 32 bytes: low nibbles with sub-block scale 2i, high nibbles with 2i+1.
fn decode_q4_k(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let dmin = f16_at(block, 2);
    let scales = &block[4..16];
    let qs = &block[16..16 + QK_K as usize / 2];
    for (i, (q, y)) in qs
        .chunks_exact(32)
        .zip(out.chunks_exact_mut(64))
        .enumerate()
    {
        let (sc1, m1) = scale_min_k4(2 * i, scales);
        let (sc2, m2) = scale_min_k4(2 * i + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), dmin * f32::from(m2));
        let (low, high) = y.split_at_mut(32);
        for l in 0..32 {
            low[l] = d1 * f32::from(q[l] & 0x0F) - m1;
            high[l] = d2 * f32::from(q[l] >> 4) - m2;
        }
    }
}

/// `block_q5_K` (176 bytes): f16 d, f16 dmin, 12 bytes of scales/mins, 32 bytes of high bits,
/// 128 bytes of low nibbles; as Q4_K with a fifth bit from `qh` (bit 2i for the low nibbles of
/// group i, bit 2i+1 for the high ones).
fn decode_q5_k(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let dmin = f16_at(block, 2);
    let scales = &block[4..16];
    let qh = &block[16..48];
    let ql = &block[48..48 + QK_K as usize / 2];
    for (i, (q, y)) in ql
        .chunks_exact(32)
        .zip(out.chunks_exact_mut(64))
        .enumerate()
    {
        let (sc1, m1) = scale_min_k4(2 * i, scales);
        let (sc2, m2) = scale_min_k4(2 * i + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), dmin * f32::from(m2));
        let (bit1, bit2) = (1u8 << (2 * i), 1u8 << (2 * i + 1));
        let (low, high) = y.split_at_mut(32);
        for l in 0..32 {
            let h1 = if qh[l] & bit1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & bit2 != 0 { 16 } else { 0 };
            low[l] = d1 * f32::from((q[l] & 0x0F) + h1) - m1;
            high[l] = d2 * f32::from((q[l] >> 4) + h2) - m2;
        }
    }
}

/// `block_q6_K` (210 bytes): 128 bytes of low nibbles `ql`, 64 bytes of 2-bit highs `qh`,
/// 16 i8 scales, f16 d; value = d·scale·(q − 32), per 128-value half as in ggml.
fn decode_q6_k(block: &[u8], out: &mut [f32]) {
    let ql_all = &block[0..128];
    let qh_all = &block[128..192];
    let scales_all = &block[192..208];
    let d = f16_at(block, 208);
    for (half, y) in out.chunks_exact_mut(128).enumerate() {
        let ql = &ql_all[64 * half..64 * half + 64];
        let qh = &qh_all[32 * half..32 * half + 32];
        let sc = &scales_all[8 * half..8 * half + 8];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i8 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            // ggml: `d * sc[is] * q`, evaluated left to right.
            y[l] = d * f32::from(sc[is] as i8) * f32::from(q1);
            y[l + 32] = d * f32::from(sc[is + 2] as i8) * f32::from(q2);
            y[l + 64] = d * f32::from(sc[is + 4] as i8) * f32::from(q3);
            y[l + 96] = d * f32::from(sc[is + 6] as i8) * f32::from(q4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_bits().to_le_bytes()
    }

    #[test]
    fn q4_0_low_nibbles_first_then_high() {
        let mut block = Vec::from(f16_bytes(0.5));
        // byte j: low nibble = j, high nibble = 15 - j
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let values = dequantize(GgmlType::Q4_0, &block).unwrap();
        let expected: Vec<f32> = (0..16)
            .map(|j| (j as f32 - 8.0) * 0.5)
            .chain((0..16).map(|j| ((15 - j) as f32 - 8.0) * 0.5))
            .collect();
        assert_eq!(values, expected);
    }

    #[test]
    fn q4_1_adds_the_minimum() {
        let mut block = Vec::from(f16_bytes(2.0));
        block.extend(f16_bytes(-1.0));
        block.extend([0x21; 16]);
        let values = dequantize(GgmlType::Q4_1, &block).unwrap();
        assert_eq!(values[..16], [1.0; 16]); // 1·2 − 1
        assert_eq!(values[16..], [3.0; 16]); // 2·2 − 1
    }

    #[test]
    fn q8_0_is_signed() {
        let mut block = Vec::from(f16_bytes(0.25));
        block.extend((0..32).map(|i: i8| (i - 16) as u8));
        let values = dequantize(GgmlType::Q8_0, &block).unwrap();
        let expected: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.25).collect();
        assert_eq!(values, expected);
    }

    #[test]
    fn q6_k_uses_d_times_scale_times_q() {
        // ql = 0, qh = 0 -> q = -32; scales = 1..=16; d = 1.
        let mut block = vec![0u8; 192];
        block.extend(1..=16u8);
        block.extend(f16_bytes(1.0));
        let values = dequantize(GgmlType::Q6_K, &block).unwrap();
        for (i, v) in values.iter().enumerate() {
            // value i sits in 16-value sub-block i / 16, whose scale is i / 16 + 1
            assert_eq!(*v, -32.0 * (i / 16 + 1) as f32, "value {i}");
        }
    }

    #[test]
    fn scale_min_k4_unpacks_six_bit_fields() {
        // sub-blocks 0..4: low 6 bits of bytes 0..4 / 4..8; 4..8: nibbles of bytes 8..12 plus
        // the top 2 bits of bytes 0..4 / 4..8.
        let scales = [
            0xC1, 0x02, 0x03, 0x04, 0x45, 0x06, 0x07, 0x08, 0x9A, 0x00, 0x00, 0x00,
        ];
        assert_eq!(scale_min_k4(0, &scales), (1, 5));
        assert_eq!(scale_min_k4(4, &scales), (0x0A | (3 << 4), 0x09 | (1 << 4)));
    }

    #[test]
    fn rejects_partial_blocks_and_unsupported_types() {
        assert_eq!(
            dequantize(GgmlType::Q8_0, &[0; 33]),
            Err(DequantizeError::PartialBlock {
                ggml_type: GgmlType::Q8_0,
                len: 33,
                type_size: 34
            })
        );
        assert_eq!(
            dequantize(GgmlType::Q3_K, &[]),
            Err(DequantizeError::Unsupported(GgmlType::Q3_K))
        );
        assert_eq!(dequantize(GgmlType::Q4_K, &[]), Ok(vec![]));
    }

    #[test]
    fn every_type_claimed_decodable_has_a_decoder() {
        for t in GgmlType::ALL {
            assert_eq!(block_decoder(t).is_some(), t.can_dequantize(), "{t}");
        }
    }
}

//! Tests on GGUF files built in memory: every metadata type, the getters, tensors of every
//! decodable type, every error case, and truncation / corruption fuzzing.

mod writer;

use writer::{FileSpec, TensorSpec, Val, pseudo_random_bytes};

use crate::{
    GgmlType, GgufError, GgufErrorKind, GgufFile, MetadataArray, MetadataType, MetadataValue,
    dequantize,
};

const NAME: &str = "test.gguf";

fn open(spec: &FileSpec) -> Result<GgufFile, GgufError> {
    GgufFile::from_bytes(spec.build(), NAME)
}

fn open_err(spec: &FileSpec) -> GgufError {
    open(spec).expect_err("the file should be rejected")
}

/// Asserts the error message names the file and each of `needles`.
fn assert_message(error: &GgufError, needles: &[&str]) {
    let message = error.to_string();
    assert!(message.contains(NAME), "no file name in: {message}");
    for needle in needles {
        assert!(message.contains(needle), "`{needle}` not in: {message}");
    }
}

/// One tensor of each decodable type (whole blocks of pseudo-random bytes) plus one that is
/// valid but not decodable.
fn tensors_of_every_type() -> Vec<TensorSpec> {
    let mut tensors = Vec::new();
    for (i, t) in GgmlType::ALL
        .into_iter()
        .filter(|t| t.can_dequantize())
        .enumerate()
    {
        // 2 rows of 2 blocks each: shape [2, 2 * block_size]
        let row_len = 2 * t.block_size();
        let data = pseudo_random_bytes((4 * t.type_size()) as usize, i as u64 + 1);
        tensors.push(TensorSpec::new(
            &format!("t.{t}"),
            &[row_len, 2],
            t.id(),
            data,
        ));
    }
    let q3k = GgmlType::Q3_K;
    let data = pseudo_random_bytes(q3k.type_size() as usize, 99);
    tensors.push(TensorSpec::new("t.Q3_K", &[256], q3k.id(), data));
    tensors
}

/// A file with metadata of every type and tensors, ending in tensor data (no trailing padding)
/// so that cutting it anywhere makes it invalid.
fn rich_file() -> FileSpec {
    let mut spec = FileSpec::default()
        .kv("general.architecture", Val::str("llama"))
        .kv("u8", Val::U8(200))
        .kv("i8", Val::I8(-5))
        .kv("u16", Val::U16(60000))
        .kv("i16", Val::I16(-30000))
        .kv("u32", Val::U32(4_000_000_000))
        .kv("i32", Val::I32(-2_000_000_000))
        .kv("u64", Val::U64(u64::MAX))
        .kv("i64", Val::I64(i64::MIN))
        .kv("f32", Val::F32(1.5e-5))
        .kv("f64", Val::F64(-2.25))
        .kv("bool", Val::Bool(1))
        .kv("string", Val::str("héllo"))
        .kv(
            "tokens",
            Val::Arr(8, vec![Val::str("a"), Val::str(""), Val::str("ç")]),
        )
        .kv("scores", Val::Arr(6, vec![Val::F32(0.5), Val::F32(-1.0)]))
        .kv(
            "nested",
            Val::Arr(9, vec![Val::Arr(1, vec![Val::I8(-1)]), Val::Arr(8, vec![])]),
        );
    for tensor in tensors_of_every_type() {
        spec = spec.tensor(tensor);
    }
    // The writer pads between tensors but not after the last, whose data ends the file.
    spec
}

#[test]
fn every_metadata_type_round_trips_in_v2_and_v3() {
    let all_arrays: Vec<(u32, Vec<Val>, MetadataArray)> = vec![
        (
            0,
            vec![Val::U8(1), Val::U8(255)],
            MetadataArray::U8(vec![1, 255]),
        ),
        (1, vec![Val::I8(-128)], MetadataArray::I8(vec![-128])),
        (2, vec![Val::U16(65535)], MetadataArray::U16(vec![65535])),
        (3, vec![Val::I16(-2)], MetadataArray::I16(vec![-2])),
        (
            4,
            vec![Val::U32(7), Val::U32(8)],
            MetadataArray::U32(vec![7, 8]),
        ),
        (5, vec![Val::I32(-7)], MetadataArray::I32(vec![-7])),
        (6, vec![Val::F32(0.25)], MetadataArray::F32(vec![0.25])),
        (
            7,
            vec![Val::Bool(0), Val::Bool(1), Val::Bool(2)],
            MetadataArray::Bool(vec![false, true, true]),
        ),
        (
            8,
            vec![Val::str("x"), Val::str("")],
            MetadataArray::String(vec!["x".into(), String::new()]),
        ),
        (
            10,
            vec![Val::U64(u64::MAX)],
            MetadataArray::U64(vec![u64::MAX]),
        ),
        (
            11,
            vec![Val::I64(i64::MIN)],
            MetadataArray::I64(vec![i64::MIN]),
        ),
        (12, vec![Val::F64(1e300)], MetadataArray::F64(vec![1e300])),
        (4, vec![], MetadataArray::U32(vec![])),
        (
            9,
            vec![
                Val::Arr(8, vec![Val::str("deep")]),
                Val::Arr(9, vec![Val::Arr(0, vec![Val::U8(3)])]),
            ],
            MetadataArray::Array(vec![
                MetadataArray::String(vec!["deep".into()]),
                MetadataArray::Array(vec![MetadataArray::U8(vec![3])]),
            ]),
        ),
    ];
    let scalars = [
        (Val::U8(200), MetadataValue::U8(200)),
        (Val::I8(-5), MetadataValue::I8(-5)),
        (Val::U16(60000), MetadataValue::U16(60000)),
        (Val::I16(-30000), MetadataValue::I16(-30000)),
        (Val::U32(4_000_000_000), MetadataValue::U32(4_000_000_000)),
        (Val::I32(i32::MIN), MetadataValue::I32(i32::MIN)),
        (Val::U64(u64::MAX), MetadataValue::U64(u64::MAX)),
        (Val::I64(i64::MIN), MetadataValue::I64(i64::MIN)),
        (Val::F32(1.5e-5), MetadataValue::F32(1.5e-5)),
        (Val::F64(-2.25), MetadataValue::F64(-2.25)),
        (Val::Bool(0), MetadataValue::Bool(false)),
        (Val::Bool(1), MetadataValue::Bool(true)),
        (Val::str("héllo"), MetadataValue::String("héllo".into())),
        (Val::str(""), MetadataValue::String(String::new())),
    ];
    for version in [2, 3] {
        let mut spec = FileSpec {
            version,
            ..FileSpec::default()
        };
        let mut expected = Vec::new();
        for (i, (value, parsed)) in scalars.iter().enumerate() {
            spec = spec.kv(&format!("scalar.{i}"), value.clone());
            expected.push((format!("scalar.{i}"), parsed.clone()));
        }
        for (i, (element_type, elements, parsed)) in all_arrays.iter().enumerate() {
            spec = spec.kv(
                &format!("array.{i}"),
                Val::Arr(*element_type, elements.clone()),
            );
            expected.push((format!("array.{i}"), MetadataValue::Array(parsed.clone())));
        }
        let file = open(&spec).unwrap();
        assert_eq!(file.version(), version);
        assert_eq!(file.metadata().len(), expected.len());
        for (key, value) in &expected {
            assert_eq!(file.get(key), Some(value), "{key}");
        }
        assert!(file.tensors().is_empty());
        assert_eq!(file.alignment(), 32);
    }
}

#[test]
fn metadata_types_are_described_like_gguf_py() {
    let file = open(&rich_file()).unwrap();
    let described = |key: &str| file.get(key).unwrap().type_description();
    assert_eq!(described("u32"), "UINT32");
    assert_eq!(described("tokens"), "ARRAY[STRING]");
    assert_eq!(described("nested"), "ARRAY[ARRAY[INT8]]");
    assert_eq!(
        file.get("bool").unwrap().metadata_type(),
        MetadataType::Bool
    );
}

#[test]
fn typed_getters_convert_losslessly_and_name_key_and_types_on_error() {
    let file = open(&rich_file()).unwrap();
    assert_eq!(file.architecture().unwrap(), "llama");
    assert_eq!(file.get_u32("u8").unwrap(), 200);
    assert_eq!(file.get_u32("u32").unwrap(), 4_000_000_000);
    assert_eq!(file.get_u64("u64").unwrap(), u64::MAX);
    assert_eq!(file.get_i64("i8").unwrap(), -5);
    assert_eq!(file.get_i64("i64").unwrap(), i64::MIN);
    assert_eq!(file.get_f32("f32").unwrap(), 1.5e-5);
    assert_eq!(file.get_f64("f32").unwrap(), f64::from(1.5e-5f32));
    assert_eq!(file.get_f64("f64").unwrap(), -2.25);
    assert!(file.get_bool("bool").unwrap());
    assert_eq!(file.get_str("string").unwrap(), "héllo");
    assert_eq!(file.get_str_array("tokens").unwrap(), ["a", "", "ç"]);
    assert_eq!(file.get_f32_array("scores").unwrap(), [0.5, -1.0]);

    let err = file.get_u32("missing.key").unwrap_err();
    assert!(matches!(err.kind(), GgufErrorKind::MissingKey { key } if key == "missing.key"));
    assert_message(&err, &["missing.key", "missing"]);

    let err = file.get_u32("string").unwrap_err();
    assert!(matches!(err.kind(), GgufErrorKind::WrongType { .. }));
    assert_message(&err, &["`string`", "STRING", "u32"]);

    let err = file.get_u32("i8").unwrap_err();
    assert!(matches!(err.kind(), GgufErrorKind::ValueOutOfRange { .. }));
    assert_message(&err, &["`i8`", "-5", "u32"]);

    let err = file.get_u32("u64").unwrap_err();
    assert!(matches!(err.kind(), GgufErrorKind::ValueOutOfRange { .. }));

    let err = file.get_f32("f64").unwrap_err();
    assert_message(&err, &["`f64`", "FLOAT64", "expected FLOAT32"]);

    let err = file.get_str_array("scores").unwrap_err();
    assert_message(
        &err,
        &["`scores`", "ARRAY[FLOAT32]", "expected ARRAY[STRING]"],
    );

    let err = file.get_u32_array("u32").unwrap_err();
    assert_message(&err, &["`u32`", "is UINT32", "expected ARRAY[UINT32]"]);

    let err = file.get_i32_array("tokens").unwrap_err();
    assert_message(&err, &["ARRAY[STRING]", "expected ARRAY[INT32]"]);

    let err = file.get_bool("u8").unwrap_err();
    assert_message(&err, &["`u8`", "UINT8", "BOOL"]);
    let err = file.get_str("bool").unwrap_err();
    assert_message(&err, &["`bool`", "BOOL", "STRING"]);
}

#[test]
fn tensors_have_reversed_shapes_raw_bytes_and_dequantize_like_the_block_decoder() {
    let spec = rich_file();
    let file = open(&spec).unwrap();
    assert_eq!(file.tensors().len(), spec.tensors.len());
    for (written, info) in spec.tensors.iter().zip(file.tensors()) {
        assert_eq!(info.name(), written.name);
        assert_eq!(info.dims(), written.dims);
        let reversed: Vec<usize> = written.dims.iter().rev().map(|&d| d as usize).collect();
        assert_eq!(info.shape(), reversed);
        assert_eq!(info.ggml_type().id(), written.type_id);
        assert_eq!(info.offset() % 32, 0);
        assert_eq!(info.byte_len(), written.data.len() as u64);
        assert_eq!(info.n_elements(), written.dims.iter().product::<u64>());
        let raw = file.raw_bytes(info.name()).unwrap();
        assert_eq!(raw, written.data);
        assert_eq!(file.tensor_info(info.name()), Some(info));

        if info.ggml_type().can_dequantize() {
            let values = file.dequantize_f32(info.name()).unwrap();
            assert_eq!(values.len() as u64, info.n_elements());
            let expected = dequantize(info.ggml_type(), raw).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&values), bits(&expected), "{}", info.name());
        } else {
            let err = file.dequantize_f32(info.name()).unwrap_err();
            assert!(matches!(
                err.kind(),
                GgufErrorKind::Unsupported {
                    ggml_type: GgmlType::Q3_K,
                    ..
                }
            ));
            assert_message(&err, &["`t.Q3_K`", "Q3_K"]);
        }
    }
    assert_eq!(file.data_offset() % 32, 0);
    assert!(file.tensor_info("nope").is_none());
    for err in [
        file.raw_bytes("nope").unwrap_err(),
        file.dequantize_f32("nope").unwrap_err(),
    ] {
        assert!(matches!(err.kind(), GgufErrorKind::TensorNotFound { .. }));
        assert_message(&err, &["`nope`", "not found"]);
    }
}

#[test]
fn general_alignment_moves_the_data_section() {
    let data = pseudo_random_bytes(8, 1);
    let spec = FileSpec {
        alignment: 64,
        ..FileSpec::default()
    }
    .kv("general.alignment", Val::U32(64))
    .tensor(TensorSpec::new("a", &[2], 0, data.clone()))
    .tensor(TensorSpec::new("b", &[2], 0, data.clone()));
    let file = open(&spec).unwrap();
    assert_eq!(file.alignment(), 64);
    assert_eq!(file.data_offset() % 64, 0);
    assert_eq!(file.tensor_info("b").unwrap().offset(), 64);
    assert_eq!(file.raw_bytes("b").unwrap(), data);
    assert_eq!(file.dequantize_f32("a").unwrap().len(), 2);
}

#[test]
fn invalid_alignment_is_rejected() {
    for value in [Val::U32(0), Val::U32(48), Val::I32(-32), Val::str("32")] {
        let err = open_err(&FileSpec::default().kv("general.alignment", value.clone()));
        assert!(
            matches!(err.kind(), GgufErrorKind::InvalidAlignment { .. }),
            "{value:?}: {err}"
        );
        assert_message(&err, &["general.alignment"]);
    }
}

#[test]
fn bad_magic_and_unsupported_versions() {
    let mut bytes = FileSpec::default().build();
    bytes[..4].copy_from_slice(b"GGML");
    let err = GgufFile::from_bytes(bytes, NAME).unwrap_err();
    assert!(matches!(err.kind(), GgufErrorKind::BadMagic { found } if found == b"GGML"));
    assert_message(&err, &["not a GGUF file"]);

    for version in [0, 1, 4, 0x0300_0000] {
        let err = open_err(&FileSpec {
            version,
            ..FileSpec::default()
        });
        assert!(
            matches!(err.kind(), GgufErrorKind::UnsupportedVersion { version: v, .. } if *v == version)
        );
        assert_message(&err, &[&format!("version {version}")]);
        assert_eq!(
            err.to_string().contains("big-endian"),
            version == 0x0300_0000,
            "{err}"
        );
    }
}

#[test]
fn truncated_files_say_what_was_being_read() {
    let bytes = rich_file().build();
    let cases = [
        (0, "the magic"),
        (6, "the version"),
        (12, "the tensor count"),
        (20, "the metadata key count"),
    ];
    for (len, what) in cases {
        let err = GgufFile::from_bytes(bytes[..len].to_vec(), NAME).unwrap_err();
        assert!(
            matches!(err.kind(), GgufErrorKind::Truncated { .. }),
            "{len}: {err}"
        );
        assert_message(&err, &["truncated", what]);
    }
    // Past the counts, a cut shows first as counts the rest of the file cannot hold.
    let err = GgufFile::from_bytes(bytes[..24].to_vec(), NAME).unwrap_err();
    assert!(
        matches!(
            err.kind(),
            GgufErrorKind::LengthExceedsFile { count: 16, .. }
        ),
        "{err}"
    );
    assert_message(&err, &["the metadata key count is 16", "0 bytes left"]);
    // Cut inside a value (after its key, type and length): the key is named.
    let one_key = FileSpec::default()
        .kv("general.name", Val::str("SmolLM2"))
        .build();
    let value_start = 24 + 8 + "general.name".len() + 4 + 8;
    let err = GgufFile::from_bytes(one_key[..value_start + 3].to_vec(), NAME).unwrap_err();
    assert!(
        matches!(
            err.kind(),
            GgufErrorKind::LengthExceedsFile { count: 7, .. }
        ),
        "{err}"
    );
    assert_message(&err, &["`general.name`"]);
    let err = GgufFile::from_bytes(one_key[..value_start - 2].to_vec(), NAME).unwrap_err();
    assert!(
        matches!(err.kind(), GgufErrorKind::Truncated { .. }),
        "{err}"
    );
    assert_message(
        &err,
        &["the length of the value of metadata key `general.name`"],
    );
    // Cut inside the tensor data: the tensor is out of bounds.
    let err = GgufFile::from_bytes(bytes[..bytes.len() - 1].to_vec(), NAME).unwrap_err();
    assert!(
        matches!(err.kind(), GgufErrorKind::TensorOutOfBounds { .. }),
        "{err}"
    );
    assert_message(&err, &["`t.Q3_K`", "past the end"]);
}

#[test]
fn absurd_lengths_and_counts_are_refused_before_allocating() {
    // A string value claiming u64::MAX bytes, and one claiming one byte more than is left.
    for claimed in [u64::MAX, 5] {
        let mut payload = claimed.to_le_bytes().to_vec();
        payload.extend(b"abcd");
        let err = open_err(&FileSpec::default().kv("name", Val::Raw(8, payload)));
        assert!(
            matches!(err.kind(), GgufErrorKind::LengthExceedsFile { .. }),
            "{err}"
        );
        assert_message(&err, &["`name`", &claimed.to_string()]);
    }
    // Arrays: u64::MAX strings; 2^61 u64s (whose byte size overflows); 1000 u32s with 4 present.
    for (element_type, len) in [(8u32, u64::MAX), (10, 1 << 61), (4, 1000)] {
        let mut payload = element_type.to_le_bytes().to_vec();
        payload.extend(len.to_le_bytes());
        payload.extend([0u8; 16]);
        let err = open_err(&FileSpec::default().kv("tokens", Val::Raw(9, payload)));
        assert!(
            matches!(err.kind(), GgufErrorKind::LengthExceedsFile { .. }),
            "{err}"
        );
        assert_message(&err, &["array `tokens`", &len.to_string()]);
    }
    // A key whose length is absurd.
    let mut bytes = FileSpec::default().kv("k", Val::U8(1)).build();
    bytes[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    let err = GgufFile::from_bytes(bytes, NAME).unwrap_err();
    assert_message(&err, &["metadata key #0"]);
    // Counts.
    let err = open_err(&FileSpec {
        kv_count: Some(u64::MAX),
        ..FileSpec::default()
    });
    assert!(matches!(
        err.kind(),
        GgufErrorKind::LengthExceedsFile { .. }
    ));
    assert_message(&err, &["metadata key count"]);
    let err = open_err(&FileSpec {
        tensor_count: Some(1 << 40),
        ..FileSpec::default()
    });
    assert!(matches!(
        err.kind(),
        GgufErrorKind::LengthExceedsFile { .. }
    ));
    assert_message(&err, &["tensor count"]);
}

#[test]
fn unknown_metadata_types_are_rejected() {
    let err = open_err(&FileSpec::default().kv("weird", Val::Raw(13, vec![0; 8])));
    assert!(matches!(
        err.kind(),
        GgufErrorKind::UnknownMetadataType { type_id: 13, .. }
    ));
    assert_message(&err, &["`weird`", "13"]);
    // ... also as an array element type
    let mut payload = 200u32.to_le_bytes().to_vec();
    payload.extend(1u64.to_le_bytes());
    let err = open_err(&FileSpec::default().kv("arr", Val::Raw(9, payload)));
    assert!(matches!(
        err.kind(),
        GgufErrorKind::UnknownMetadataType { type_id: 200, .. }
    ));
    assert_message(&err, &["`arr`"]);
}

#[test]
fn deeply_nested_arrays_are_rejected_without_recursing_forever() {
    let mut value = Val::Arr(0, vec![]);
    for _ in 0..100 {
        value = Val::Arr(9, vec![value]);
    }
    let err = open_err(&FileSpec::default().kv("deep", value));
    assert!(
        matches!(err.kind(), GgufErrorKind::NestingTooDeep { .. }),
        "{err}"
    );
    assert_message(&err, &["`deep`"]);
    // 16 levels are fine.
    let mut value = Val::Arr(0, vec![Val::U8(1)]);
    for _ in 0..15 {
        value = Val::Arr(9, vec![value]);
    }
    open(&FileSpec::default().kv("deep", value)).unwrap();
}

#[test]
fn invalid_utf8_and_duplicate_keys_are_rejected() {
    let mut payload = 2u64.to_le_bytes().to_vec();
    payload.extend([0xC3, 0x28]);
    let err = open_err(&FileSpec::default().kv("bad", Val::Raw(8, payload)));
    assert!(matches!(err.kind(), GgufErrorKind::InvalidUtf8 { .. }));
    assert_message(&err, &["`bad`", "UTF-8"]);

    let err = open_err(
        &FileSpec::default()
            .kv("dup", Val::U8(1))
            .kv("dup", Val::U32(2)),
    );
    assert!(matches!(err.kind(), GgufErrorKind::DuplicateKey { key } if key == "dup"));
    assert_message(&err, &["`dup`", "more than once"]);
}

fn f32_tensor(name: &str, dims: &[u64]) -> TensorSpec {
    let n: u64 = dims.iter().product();
    TensorSpec::new(name, dims, 0, vec![0; (n * 4) as usize])
}

#[test]
fn tensor_info_errors_name_the_tensor() {
    type Case = (FileSpec, fn(&GgufErrorKind) -> bool, Vec<&'static str>);
    let cases: Vec<Case> = vec![
        (
            FileSpec::default().tensor(f32_tensor("five", &[1, 1, 1, 1, 1])),
            |k| matches!(k, GgufErrorKind::TooManyDims { n_dims: 5, .. }),
            vec!["`five`", "5 dimensions"],
        ),
        (
            FileSpec::default().tensor(TensorSpec::new("retired", &[32], 4, vec![0; 32])),
            |k| matches!(k, GgufErrorKind::UnknownTensorType { type_id: 4, .. }),
            vec!["`retired`", "type id 4"],
        ),
        (
            FileSpec::default().tensor(TensorSpec::new("huge", &[1 << 32, 1 << 32], 0, vec![])),
            |k| matches!(k, GgufErrorKind::ElementCountOverflow { .. }),
            vec!["`huge`", "overflows"],
        ),
        (
            FileSpec::default().tensor(TensorSpec::new("neg", &[u64::MAX, 0], 0, vec![])),
            |k| matches!(k, GgufErrorKind::ElementCountOverflow { .. }),
            vec!["`neg`"],
        ),
        (
            // element count fits, byte size (× 4 bytes) overflows i64
            FileSpec::default().tensor(TensorSpec::new("bytes", &[1 << 62], 0, vec![])),
            |k| matches!(k, GgufErrorKind::ElementCountOverflow { .. }),
            vec!["`bytes`"],
        ),
        (
            FileSpec::default().tensor(TensorSpec::new("rows", &[16, 2], 2, vec![0; 18])),
            |k| {
                matches!(
                    k,
                    GgufErrorKind::RowNotBlockMultiple {
                        row_len: 16,
                        block_size: 32,
                        ..
                    }
                )
            },
            vec!["`rows`", "Q4_0", "block size 32"],
        ),
        (
            FileSpec::default()
                .tensor(f32_tensor("same", &[4]))
                .tensor(f32_tensor("same", &[4])),
            |k| matches!(k, GgufErrorKind::DuplicateTensor { .. }),
            vec!["`same`", "more than once"],
        ),
        (
            FileSpec::default().tensor(TensorSpec {
                offset: Some(4),
                ..f32_tensor("skewed", &[4])
            }),
            |k| {
                matches!(
                    k,
                    GgufErrorKind::MisalignedOffset {
                        offset: 4,
                        alignment: 32,
                        ..
                    }
                )
            },
            vec!["`skewed`", "alignment 32"],
        ),
        (
            FileSpec::default().tensor(TensorSpec {
                offset: Some(1 << 40),
                ..f32_tensor("far", &[4])
            }),
            |k| matches!(k, GgufErrorKind::TensorOutOfBounds { .. }),
            vec!["`far`", "past the end"],
        ),
        (
            FileSpec::default().tensor(TensorSpec {
                offset: Some(u64::MAX - 31),
                ..f32_tensor("wrap", &[4])
            }),
            |k| matches!(k, GgufErrorKind::TensorOutOfBounds { .. }),
            vec!["`wrap`"],
        ),
    ];
    for (spec, is_expected, needles) in cases {
        let err = open_err(&spec);
        assert!(is_expected(err.kind()), "unexpected: {err}");
        assert_message(&err, &needles);
    }
}

#[test]
fn data_cut_short_is_out_of_bounds() {
    let spec = FileSpec::default().tensor(f32_tensor("w", &[8, 2]));
    let mut bytes = spec.build();
    bytes.truncate(bytes.len() - 4);
    let err = GgufFile::from_bytes(bytes, NAME).unwrap_err();
    assert!(matches!(
        err.kind(),
        GgufErrorKind::TensorOutOfBounds { byte_len: 64, .. }
    ));
}

#[test]
fn empty_tensors_and_scalars_are_fine() {
    let spec = FileSpec::default()
        .tensor(TensorSpec::new(
            "empty",
            &[0, 3],
            GgmlType::Q4_K.id(),
            vec![],
        ))
        .tensor(TensorSpec::new(
            "scalar",
            &[],
            0,
            2.5f32.to_le_bytes().to_vec(),
        ));
    let file = open(&spec).unwrap();
    assert_eq!(file.tensor_info("empty").unwrap().shape(), [3, 0]);
    assert!(file.dequantize_f32("empty").unwrap().is_empty());
    assert_eq!(
        file.tensor_info("scalar").unwrap().shape(),
        [] as [usize; 0]
    );
    assert_eq!(file.dequantize_f32("scalar").unwrap(), [2.5]);
}

#[test]
fn truncating_a_valid_file_anywhere_is_an_error_never_a_panic() {
    let bytes = rich_file().build();
    GgufFile::from_bytes(bytes.clone(), NAME).unwrap();
    for len in 0..bytes.len() {
        let result = GgufFile::from_bytes(bytes[..len].to_vec(), NAME);
        let err = result.expect_err(&format!("truncated to {len} bytes, still accepted"));
        assert!(err.to_string().contains(NAME));
    }
}

#[test]
fn corrupting_header_bytes_never_panics() {
    let bytes = rich_file().build();
    let header_len = GgufFile::from_bytes(bytes.clone(), NAME)
        .unwrap()
        .data_offset() as usize;
    // Every header byte set to a few telling values...
    for at in 0..header_len {
        for value in [0x00, 0x01, 0x7F, 0x80, 0xFF] {
            let mut corrupt = bytes.clone();
            corrupt[at] = value;
            if let Ok(file) = GgufFile::from_bytes(corrupt, NAME) {
                exercise(&file);
            }
        }
    }
    // ... and random multi-byte corruptions.
    let noise = pseudo_random_bytes(4 * 20_000, 7);
    for chunk in noise.chunks_exact(4) {
        let mut corrupt = bytes.clone();
        for pair in chunk.chunks_exact(2) {
            let at = usize::from(pair[0]) * header_len / 256;
            corrupt[at] = pair[1];
        }
        if let Ok(file) = GgufFile::from_bytes(corrupt, NAME) {
            exercise(&file);
        }
    }
}

/// Reads everything an accepted file offers; none of it may panic.
fn exercise(file: &GgufFile) {
    for key in file.metadata().keys() {
        let _ = (file.get_u32(key), file.get_f32(key), file.get_str(key));
        let _ = (file.get_str_array(key), file.get_i32_array(key));
    }
    for info in file.tensors() {
        let _ = file.raw_bytes(info.name()).unwrap();
        let _ = file.dequantize_f32(info.name());
    }
}

#[test]
fn open_reads_a_real_file_and_reports_io_errors_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, rich_file().build()).unwrap();
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.path(), path);
    assert_eq!(file.dequantize_f32("t.F32").unwrap().len(), 4);
    assert!(format!("{file:?}").contains("tensors"));

    let missing = dir.path().join("missing.gguf");
    let err = GgufFile::open(&missing).unwrap_err();
    assert!(matches!(
        err.kind(),
        GgufErrorKind::Io { action: "open", .. }
    ));
    assert!(err.to_string().contains("missing.gguf"), "{err}");
    assert!(std::error::Error::source(&err).is_some());

    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    let err = GgufFile::open(&empty).unwrap_err();
    assert!(matches!(err.kind(), GgufErrorKind::Truncated { .. }));
    assert!(err.to_string().contains("empty.gguf"));
}

#[test]
fn files_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<GgufFile>();
    assert_send_sync::<GgufError>();
}

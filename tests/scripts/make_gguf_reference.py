#!/usr/bin/env python3
"""Make the GGUF reference fixtures for fastlora-gguf (crates/gguf) with the `gguf` Python package.

Two files, written under tests/fixtures/gguf/ (or --out-dir):

  reference.json  From SmolLM2-135M-Instruct.Q4_1.gguf (fetch it first with
                  tests/scripts/fetch_smollm2_gguf.sh): every metadata key with its GGUF type
                  (values for scalars, lengths for arrays: the token arrays are huge), every tensor
                  info (name, type, shape, offset), and for a handful of tensors of every tensor type
                  in the file the first and last 512 values that `gguf.quants.dequantize` gives, plus
                  the sum and the sum of squares over the whole tensor in float64. Checked by
                  crates/gguf/tests/smollm2.rs when the file is present.
  blocks.json     Raw blocks of the types that file lacks (and of those it has), with the values
                  `gguf.quants.dequantize` gives for them; checked always by
                  crates/gguf/tests/blocks.rs. Q8_0/Q4_0/Q4_1/BF16 blocks come from
                  `gguf.quants.quantize` of seeded random data; the package cannot quantize K-quants,
                  so their blocks are seeded random bytes with sane f16 super-block scales (any bit
                  pattern of the packed scales and quants is a valid block), plus hand-picked edge
                  cases (zero, negative and subnormal scales).

Values are stored as hex of little-endian f32 bits so that the Rust tests compare bit for bit and
infinities / negative zeros survive JSON. Sums use math.fsum (correctly rounded), so the Rust side's
compensated sum agrees to ~1e-15 relative.

Usage (needs `pip install gguf numpy`):

    python3 tests/scripts/make_gguf_reference.py [--gguf .cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf]
                                                 [--out-dir tests/fixtures/gguf] [--blocks-only]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

import gguf
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from gguf.constants import GGML_QUANT_SIZES

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_GGUF = REPO_ROOT / ".cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = REPO_ROOT / "tests/fixtures/gguf"

EDGE_VALUES = 512  # values kept from each end of a reference tensor
TENSORS_PER_TYPE = 4  # "a handful": first, last and evenly spaced ones in file order
MAX_LISTED_STRING = 4096  # longer string values (none in SmolLM2) are recorded by length only


def f32_hex(values: np.ndarray) -> str:
    return np.ascontiguousarray(values, dtype="<f4").tobytes().hex()


def versions() -> dict:
    return {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
    }


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - only informative
        return None


# ---------------------------------------------------------------------------------------------
# reference.json: the real SmolLM2 file
# ---------------------------------------------------------------------------------------------


def field_type_name(field) -> str:
    """GGUF spec names: UINT32, STRING, ARRAY[STRING], ..."""
    kinds = [V(t).name for t in field.types]
    name = kinds[-1]
    for outer in reversed(kinds[:-1]):
        name = f"{outer}[{name}]"
    return name


def field_entry(field) -> dict:
    entry = {"key": field.name, "type": field_type_name(field)}
    main = V(field.types[0])
    if main == V.ARRAY:
        entry["len"] = len(field.data)
    elif main == V.STRING:
        value = field.contents()
        if len(value) <= MAX_LISTED_STRING:
            entry["value"] = value
        entry["len"] = len(value.encode("utf-8"))
    elif main in (V.FLOAT32, V.FLOAT64):
        # exact bits, as the Rust side reads them
        value = field.parts[field.data[0]]
        entry["value"] = float(value[0])
        entry["bits_hex"] = value.tobytes().hex()
    else:
        entry["value"] = field.contents()
        if isinstance(entry["value"], (np.integer, np.bool_)):
            entry["value"] = entry["value"].item()
    return entry


def pick_tensors(tensors: list) -> list:
    by_type: dict[str, list] = {}
    for t in tensors:
        by_type.setdefault(t.tensor_type.name, []).append(t)
    picked = []
    for type_name in sorted(by_type):
        group = by_type[type_name]
        indices = sorted({round(i) for i in np.linspace(0, len(group) - 1, min(TENSORS_PER_TYPE, len(group)))})
        picked.extend(group[i] for i in indices)
    return picked


def tensor_reference(t) -> dict:
    values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1).astype(np.float32)
    shape = [int(d) for d in reversed(t.shape.tolist())]  # PyTorch order: GGUF dims reversed
    assert values.size == math.prod(shape), (t.name, values.size, shape)
    as64 = values.astype(np.float64)
    return {
        "name": t.name,
        "type": t.tensor_type.name,
        "shape": shape,
        "n_elements": int(values.size),
        "first_f32_le_hex": f32_hex(values[:EDGE_VALUES]),
        "last_f32_le_hex": f32_hex(values[-EDGE_VALUES:]),
        "sum": math.fsum(as64),
        "sum_of_squares": math.fsum(as64 * as64),  # exact products: f32 squared fits in f64
    }


def make_reference(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    tensors = list(reader.tensors)
    type_counts: dict[str, int] = {}
    for t in tensors:
        type_counts[t.tensor_type.name] = type_counts.get(t.tensor_type.name, 0) + 1
    # GGUF.version / GGUF.tensor_count / GGUF.kv_count are the reader's pseudo-fields for the header
    header = {name: int(reader.fields[name].contents()) for name in ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")}
    metadata = [field_entry(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")]
    return {
        "file": path.name,
        "file_size": path.stat().st_size,
        "generator": {"script": "tests/scripts/make_gguf_reference.py", **versions()},
        "version": header["GGUF.version"],
        "tensor_count": header["GGUF.tensor_count"],
        "kv_count": header["GGUF.kv_count"],
        "alignment": int(reader.alignment),
        "data_offset": int(reader.data_offset),
        "tensor_type_counts": type_counts,
        "metadata": metadata,
        "tensors": [
            {
                "name": t.name,
                "type": t.tensor_type.name,
                "shape": [int(d) for d in reversed(t.shape.tolist())],
                "offset": int(t.data_offset - reader.data_offset),
            }
            for t in tensors
        ],
        "dequantized": [tensor_reference(t) for t in pick_tensors(tensors)],
    }


# ---------------------------------------------------------------------------------------------
# blocks.json: synthetic blocks of every supported type
# ---------------------------------------------------------------------------------------------


def f16_bytes(values) -> np.ndarray:
    return np.asarray(values, dtype="<f2").view(np.uint8).reshape(-1, 2)


def random_f16_scales(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    return rng.uniform(low, high, size=n).astype(np.float16)


def random_k_blocks(rng: np.random.Generator, qtype: T, n_random: int) -> np.ndarray:
    """Random but valid K-quant super-blocks, then edge cases on the f16 scales."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_random + 3, type_size), dtype=np.uint8)
    # f16 fields: d (and dmin) from a sane range; edge blocks: d = 0, d < 0, d subnormal
    d = random_f16_scales(rng, n_random + 3, 1e-4, 2e-2)
    d[n_random + 0] = 0.0
    d[n_random + 1] = -d[n_random + 1]
    d[n_random + 2] = np.float16(2.0**-20)  # subnormal f16 (min normal is 2**-14)
    if qtype in (T.Q4_K, T.Q5_K):
        dmin = random_f16_scales(rng, n_random + 3, 1e-4, 2e-2)
        dmin[n_random + 1] = -dmin[n_random + 1]
        blocks[:, 0:2] = f16_bytes(d)
        blocks[:, 2:4] = f16_bytes(dmin)
    elif qtype == T.Q6_K:
        # layout: ql[128] qh[64] scales[16] (int8, any value) d(f16) at the end
        blocks[:, type_size - 2 : type_size] = f16_bytes(d)
        blocks[n_random, 192:208] = np.array([-128, 127] * 8, dtype=np.int8).view(np.uint8)
    else:
        raise ValueError(qtype)
    return blocks


def quantized_blocks(rng: np.random.Generator, qtype: T, n_blocks: int) -> np.ndarray:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    data = rng.standard_normal((1, n_blocks * block_size)).astype(np.float32)
    data[0, :block_size] *= 0.01  # a block of small weights
    data[0, block_size : 2 * block_size] = 0.0  # an all-zero block: d = 0
    data[0, 2 * block_size] = 7.5  # one outlier
    raw = gguf.quants.quantize(data, qtype)
    return np.asarray(raw, dtype=np.uint8).reshape(n_blocks, type_size)


def float_blocks(qtype: T, rng: np.random.Generator) -> np.ndarray:
    specials = [0.0, -0.0, 1.0, -2.5, 65504.0, 2.0**-24, 2.0**-14, 1e-3, np.inf, -np.inf]
    values = np.concatenate([np.array(specials, dtype=np.float32), rng.standard_normal(54).astype(np.float32)])
    if qtype == T.F32:
        raw = values.astype("<f4").view(np.uint8)
    elif qtype == T.F16:
        raw = values.astype("<f2").view(np.uint8)
    elif qtype == T.BF16:
        values = np.concatenate([values, np.array([3.0e38, 1.0e-40], dtype=np.float32)])  # subnormal too
        raw = np.asarray(gguf.quants.quantize(values, T.BF16), dtype=np.uint8)
    else:
        raise ValueError(qtype)
    _, type_size = GGML_QUANT_SIZES[qtype]
    return raw.reshape(-1, type_size)


def make_blocks() -> dict:
    rng = np.random.default_rng(20240611)
    cases = []
    plan = [
        (T.F32, "float values incl. +-0, +-inf, f16 extremes", lambda: float_blocks(T.F32, rng)),
        (T.F16, "f16 values incl. +-0, +-inf, max, subnormals", lambda: float_blocks(T.F16, rng)),
        (T.BF16, "gguf.quants.quantize(BF16) incl. +-inf, subnormal", lambda: float_blocks(T.BF16, rng)),
        (T.Q8_0, "gguf.quants.quantize(Q8_0) of random normals", lambda: quantized_blocks(rng, T.Q8_0, 5)),
        (T.Q4_0, "gguf.quants.quantize(Q4_0) of random normals", lambda: quantized_blocks(rng, T.Q4_0, 5)),
        (T.Q4_1, "gguf.quants.quantize(Q4_1) of random normals", lambda: quantized_blocks(rng, T.Q4_1, 5)),
        (T.Q4_K, "random valid super-blocks + d=0, d<0, subnormal d", lambda: random_k_blocks(rng, T.Q4_K, 2)),
        (T.Q5_K, "random valid super-blocks + d=0, d<0, subnormal d", lambda: random_k_blocks(rng, T.Q5_K, 2)),
        (T.Q6_K, "random valid super-blocks + d=0, d<0, subnormal d, extreme scales", lambda: random_k_blocks(rng, T.Q6_K, 2)),
    ]
    for qtype, how, make in plan:
        blocks = make()
        raw = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1)
        values = gguf.quants.dequantize(raw, qtype).reshape(-1).astype(np.float32)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        assert raw.size % type_size == 0 and values.size == raw.size // type_size * block_size
        cases.append(
            {
                "type": qtype.name,
                "how": how,
                "block_size": block_size,
                "type_size": type_size,
                "n_blocks": raw.size // type_size,
                "raw_hex": raw.tobytes().hex(),
                "expected_f32_le_hex": f32_hex(values),
            }
        )
    return {"generator": {"script": "tests/scripts/make_gguf_reference.py", **versions()}, "cases": cases}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--blocks-only", action="store_true", help="skip reference.json (no GGUF file needed)")
    args = parser.parse_args()

    write_json(args.out_dir / "blocks.json", make_blocks())
    if args.blocks_only:
        return
    if not args.gguf.is_file():
        sys.exit(f"{args.gguf} not found: run tests/scripts/fetch_smollm2_gguf.sh first")
    write_json(args.out_dir / "reference.json", make_reference(args.gguf))


if __name__ == "__main__":
    main()

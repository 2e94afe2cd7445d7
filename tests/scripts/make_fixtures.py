#!/usr/bin/env python3
"""Generate the reference fixtures under tests/fixtures/ for fastlora's integration tests.

What it makes (all tiny, randomly initialised, seeded; see tests/fixtures/README.md, which this
script also writes):

  tokenizer/                  byte-level BPE (vocab 300) + tokenizer_config.json (ChatML template)
  inputs.safetensors / .json  int64 input_ids [2, 12]
  llama-tiny/                 LlamaForCausalLM f32, GQA, llama3 rope scaling (+ config.v4.json)
  llama-tiny-sharded-bf16/    same model stored as bf16 in 3 shards + index
  qwen2-tiny/                 Qwen2ForCausalLM f32, q/k/v biases, tied embeddings (+ config.v4.json)
  qwen2-tiny-f16/             same model stored as f16 (one file)
  llama-tiny-lora/            PEFT LoRA r=8 on all 7 projections
  llama-tiny-rslora/          PEFT rsLoRA, layers_to_transform, rank_pattern, alpha_pattern
  llama-tiny-mts/             PEFT LoRA + modules_to_save=[lm_head, embed_tokens]
  qwen2-tiny-lora/            PEFT LoRA r=8 on all 7 projections of qwen2-tiny
  */reference.safetensors     f32 reference logits / loss / grads / merged logits / hidden states

How to run (CPU only, f32; needs torch, transformers>=5, peft, tokenizers, safetensors):

    python3 tests/scripts/make_fixtures.py --out /tmp/fixtures
    rm -rf tests/fixtures && mv /tmp/fixtures tests/fixtures

The checked-in fixtures were produced on the project's device machine with

    python3 tests/scripts/make_fixtures.py --out $OUT/fixtures && tar czf $OUT/fixtures.tgz -C $OUT fixtures

and untarred into tests/ (`rm -rf tests/fixtures && tar xzf fixtures.tgz -C tests/`). Versions used for
the checked-in files (also in tests/fixtures/versions.json): python 3.12.3, torch 2.11.0+cu130 (run on
CPU), transformers 5.17.0, peft 0.21.0, tokenizers 0.23.2, safetensors 0.8.0. A run with python 3.11.7,
transformers 5.24.0, peft 0.21.2, tokenizers 0.23.3 gave byte-identical .safetensors files.

tests/scripts/check_fixtures.py (numpy + safetensors only) re-derives every reference from the
documented semantics in float64 and finite-difference-checks the gradients.

The script checks itself: it reloads every saved model/adapter and asserts that the reloaded
outputs equal the in-memory ones, that config.v4.json parses to the same rope parameters, and that
the hand-computed loss equals transformers' loss.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import safetensors
import tokenizers
import transformers
import peft
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from peft import LoraConfig, PeftModel, get_peft_model

SEQ = 12
VOCAB = 320
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TRAIN_TEXT = """\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun while the fox runs
into the forest. A small model can learn a lot from a little text, but it is better to train
on more data. Low rank adaptation adds two small matrices to each linear layer of the model.
The first matrix projects the input down to a low rank space and the second projects it back
up. Only these small matrices are trained, so the memory needed for training is much lower.
The weights of the base model stay frozen. After training, the adapter can be merged into the
base weights, and the merged model is as fast as the original one. Language models read text
as tokens. A tokenizer splits the text into pieces and maps every piece to a number. The model
then predicts the next token from the tokens that came before it. The loss is the cross entropy
between the predicted distribution and the token that really comes next. We compute gradients
of the loss with respect to the trainable parameters and take a small step against them.
Hello world! How are you today? I am fine, thank you. What is the time? It is ten past nine.
"""

SENTENCES = [
    "The quick brown fox jumps over the lazy dog and runs into the forest.",
    "Low rank adaptation trains two small matrices for each linear layer.",
]

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def log(*a):
    print(*a, flush=True)


def init_weights_(model: torch.nn.Module, seed: int) -> None:
    """std-0.1 normal init for all weights/biases, 1 + 0.1*randn for RMSNorm weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy, labels = input_ids shifted by one (2*11 positions)."""
    v = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1, :].reshape(-1, v).float(), input_ids[:, 1:].reshape(-1), reduction="mean"
    )


def forward(model, input_ids, **kw):
    return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids, **kw)


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str, atol=1e-6, rtol=1e-5):
    if not torch.allclose(a, b, atol=atol, rtol=rtol):
        raise AssertionError(f"{what}: max abs diff {(a - b).abs().max().item()}")


def dumps(obj) -> str:
    """json.dumps with indent=2, but lists of numbers kept on one line."""
    s = json.dumps(obj, indent=2, ensure_ascii=False)
    return re.sub(r"\[\s+(-?[\d.e+-]+(?:,\s+-?[\d.e+-]+)*)\s+\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", s) + "\n"


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def model_kwargs():
    return dict(dtype=torch.float32, attn_implementation="eager")


def load_llama(path) -> LlamaForCausalLM:
    m = LlamaForCausalLM.from_pretrained(str(path), **model_kwargs())
    return m.eval()


def load_qwen2(path) -> Qwen2ForCausalLM:
    m = Qwen2ForCausalLM.from_pretrained(str(path), **model_kwargs())
    return m.eval()


def base_reference(model, input_ids, with_hidden: bool) -> dict[str, torch.Tensor]:
    """logits, loss and (optionally) per-layer hidden states captured with forward hooks."""
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    if with_hidden:
        inner = model.model

        def mk(key):
            def hook(_mod, _inp, out):
                t = out[0] if isinstance(out, (tuple, list)) else out
                captured[key] = t.detach().clone()

            return hook

        hooks.append(inner.embed_tokens.register_forward_hook(mk("hidden.0")))
        for i, layer in enumerate(inner.layers):
            hooks.append(layer.register_forward_hook(mk(f"hidden.{i + 1}")))
        hooks.append(inner.norm.register_forward_hook(mk("hidden.final_norm")))
    with torch.no_grad():
        out = forward(model, input_ids)
    for h in hooks:
        h.remove()
    loss = causal_lm_loss(out.logits, input_ids)
    assert_close(loss, out.loss, "hand loss vs transformers loss")
    ref = {"logits": out.logits.detach().float().contiguous(), "loss": loss.reshape(1).detach()}
    if with_hidden:
        n = len(model.model.layers)
        assert captured["hidden.0"].shape == (input_ids.shape[0], SEQ, model.config.hidden_size)
        assert len([k for k in captured if k.startswith("hidden.")]) == n + 2
        ref.update({k: v.float().contiguous() for k, v in captured.items()})
        rot = model.model.rotary_emb
        ref["rope.inv_freq"] = rot.inv_freq.detach().float().contiguous()
        ref["rope.attention_scaling"] = torch.tensor([float(rot.attention_scaling)], dtype=torch.float32)
    return ref


def peft_param_to_saved_key(name: str) -> str | None:
    """Map a trainable PEFT parameter name to its key in adapter_model.safetensors."""
    if ".lora_A.default." in name or ".lora_B.default." in name:
        return name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
    if ".modules_to_save.default." in name:
        return name.replace(".modules_to_save.default.", ".")
    return None


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------


def make_tokenizer(out: Path) -> Path:
    tdir = out / "tokenizer"
    tdir.mkdir(parents=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TRAIN_TEXT], trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    assert tok.get_vocab_size() <= 300 <= VOCAB
    tok.save(str(tdir / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<pad>",
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 128,
        "chat_template": CHAT_TEMPLATE,
    }
    (tdir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    # Expected outputs, for testing the Rust tokenizer + chat template rendering.
    hf = AutoTokenizer.from_pretrained(str(tdir))
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello world! How are you today?"},
        {"role": "assistant", "content": "I am fine, thank you."},
    ]
    rendered = hf.apply_chat_template(messages, tokenize=False)
    rendered_gen = hf.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    samples = SENTENCES + ["Hello world!", " leading space", "ünïcödé ✓ 123", rendered]
    expected = {
        "vocab_size": tok.get_vocab_size(),
        "special_tokens": {s: tok.token_to_id(s) for s in SPECIAL_TOKENS},
        "encode_note": "ids = tokenizer.encode(text, add_special_tokens=True); no BOS/EOS is added "
        "automatically (no post-processor); special tokens in text are matched as single tokens",
        "encodings": [
            {"text": s, "ids": tok.encode(s).ids, "hf_ids": hf(s)["input_ids"]} for s in samples
        ],
        "chat": {
            "messages": messages,
            "rendered": rendered,
            "rendered_ids": tok.encode(rendered).ids,
            "messages_gen": messages[:2],
            "rendered_add_generation_prompt": rendered_gen,
        },
    }
    for e in expected["encodings"]:
        assert e["ids"] == e["hf_ids"], e
        del e["hf_ids"]
    (tdir / "tokenizer_expected.json").write_text(dumps(expected))
    return tdir


def copy_tokenizer(tdir: Path, dst: Path):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tdir / f, dst / f)


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        hidden_act="silu",
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_parameters=dict(LLAMA3_ROPE),
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=3,
        attn_implementation="eager",
    )


def qwen2_config() -> Qwen2Config:
    return Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=3,
        attn_implementation="eager",
    )


def v4_config(cfg_json: dict, rope_scaling: dict | None) -> dict:
    """Hand-convert a transformers-5 config.json (rope_parameters) to the 4.x form."""
    c = dict(cfg_json)
    rp = c.pop("rope_parameters")
    c["rope_theta"] = rp["rope_theta"]
    c["rope_scaling"] = rope_scaling
    if "dtype" in c:
        c["torch_dtype"] = c.pop("dtype")
    c["transformers_version"] = "4.57.1"
    return c


def check_v4_parses_same(cls, v5_path: Path, v4_path: Path):
    a = cls.from_pretrained(str(v5_path.parent))
    b = cls.from_dict(json.loads(v4_path.read_text()))
    ra, rb = a.rope_parameters, b.rope_parameters
    if ra != rb:
        raise AssertionError(f"v4 config parses to different rope_parameters: {ra} vs {rb}")


def save_model(model, d: Path, **kw):
    try:
        model.save_pretrained(str(d), safe_serialization=True, **kw)
    except TypeError:  # safe_serialization removed in some 5.x: safetensors is the only format
        model.save_pretrained(str(d), **kw)


# --------------------------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------------------------


def make_adapter(name, out, base_dir, loader, lora_cfg, seed, input_ids, perturb_mts=False):
    log(f"[adapter] {name}")
    adir = out / name
    base = loader(base_dir)
    model = get_peft_model(base, lora_cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if ".lora_A.default." in pname or ".lora_B.default." in pname:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif perturb_mts and ".modules_to_save.default." in pname:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.eval()
    model.save_pretrained(str(adir))
    saved = load_file(str(adir / "adapter_model.safetensors"))

    # forward + backward on the in-memory PEFT model
    model.zero_grad(set_to_none=True)
    out_ = forward(model, input_ids)
    loss = causal_lm_loss(out_.logits, input_ids)
    assert_close(loss, out_.loss, f"{name}: hand loss vs transformers loss")
    out_.loss.backward()
    grads = {}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = peft_param_to_saved_key(pname)
        if key is None:
            raise AssertionError(f"{name}: unexpected trainable parameter {pname}")
        assert key in saved, (key, sorted(saved))
        assert torch.equal(saved[key], p.detach()), key
        assert p.grad is not None, pname
        grads["grad." + key] = p.grad.detach().float().contiguous()
    missing = set(saved) - {k[len("grad."):] for k in grads}
    if missing:
        raise AssertionError(f"{name}: saved keys without grads: {sorted(missing)}")
    logits = out_.logits.detach().float().contiguous()

    # reload from disk -> same logits; merged model on a fresh copy
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(loader(base_dir), str(adir)).eval()
        assert_close(forward(reloaded, input_ids).logits, logits, f"{name}: reloaded adapter logits")
        merged = PeftModel.from_pretrained(loader(base_dir), str(adir)).eval().merge_and_unload()
        merged_logits = forward(merged, input_ids).logits.detach().float().contiguous()
        assert_close(merged_logits, logits, f"{name}: merged vs unmerged", atol=1e-4, rtol=1e-3)

    ref = {"logits": logits, "loss": loss.reshape(1).detach(), "merged_logits": merged_logits}
    ref.update(grads)
    save_file(ref, str(adir / "reference.safetensors"))
    return {
        "saved_keys": sorted(saved),
        "n_params": sum(v.numel() for v in saved.values()),
        "loss": float(loss),
        "max_abs_merged_minus_unmerged": float((merged_logits - logits).abs().max()),
    }


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    transformers.set_seed(0)
    # adapter_config.json's base_model_name_or_path becomes "llama-tiny" / "qwen2-tiny"
    os.chdir(out)

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": "cpu, float32, torch.set_num_threads(1), deterministic algorithms",
    }
    log("versions:", json.dumps(versions))
    summary: dict = {"versions": versions}

    # ---- tokenizer + inputs
    tdir = make_tokenizer(out)
    tok = Tokenizer.from_file(str(tdir / "tokenizer.json"))
    rows = []
    for s in SENTENCES:
        ids = tok.encode(s).ids
        assert len(ids) >= SEQ, (s, len(ids))
        rows.append(ids[:SEQ])
    input_ids = torch.tensor(rows, dtype=torch.int64)
    assert int(input_ids.max()) < VOCAB
    save_file({"input_ids": input_ids}, str(out / "inputs.safetensors"))
    (out / "inputs.json").write_text(
        dumps(
            {
                "sentences": SENTENCES,
                "note": "input_ids = first 12 ids of tokenizer.encode(sentence) (no BOS added, no padding)",
                "input_ids": rows,
                "tokens": [[tok.id_to_token(i) for i in r] for r in rows],
            }
        )
    )
    summary["input_ids"] = rows

    # ---- llama-tiny (f32)
    log("[model] llama-tiny")
    ldir = out / "llama-tiny"
    torch.manual_seed(1234)
    llama = LlamaForCausalLM(llama_config()).eval()
    init_weights_(llama, seed=1234)
    save_model(llama, ldir)
    copy_tokenizer(tdir, ldir)
    cfg_json = json.loads((ldir / "config.json").read_text())
    assert "rope_parameters" in cfg_json, "expected transformers-5 config.json with rope_parameters"
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    (ldir / "config.v4.json").write_text(json.dumps(v4_config(cfg_json, scaling), indent=2) + "\n")
    check_v4_parses_same(LlamaConfig, ldir / "config.json", ldir / "config.v4.json")
    llama_ref = base_reference(llama, input_ids, with_hidden=True)
    # reload check
    reloaded = load_llama(ldir)
    with torch.no_grad():
        assert_close(forward(reloaded, input_ids).logits, llama_ref["logits"], "llama reload", atol=0, rtol=0)
    save_file(llama_ref, str(ldir / "reference.safetensors"))
    inv = llama_ref["rope.inv_freq"]
    plain = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    n_changed = int((~torch.isclose(inv, plain)).sum())
    assert 0 < n_changed < inv.numel(), "llama3 scaling should change some, not all, frequencies"
    summary["llama-tiny"] = {
        "loss": float(llama_ref["loss"]),
        "logits_std": float(llama_ref["logits"].std()),
        "rope_inv_freq": inv.tolist(),
        "rope_inv_freq_unscaled": plain.tolist(),
    }

    # ---- llama-tiny-sharded-bf16
    log("[model] llama-tiny-sharded-bf16")
    sdir = out / "llama-tiny-sharded-bf16"
    bf = copy.deepcopy(llama).to(torch.bfloat16)
    for shard_size in ["150KB", "200KB", "120KB", "100KB", "250KB"]:
        save_model(bf, sdir, max_shard_size=shard_size)
        shards = sorted(p.name for p in sdir.glob("model-*.safetensors"))
        if 2 <= len(shards) <= 3:
            break
        shutil.rmtree(sdir)
    summary_shard_size = shard_size
    copy_tokenizer(tdir, sdir)
    assert (sdir / "model.safetensors.index.json").exists() and 2 <= len(shards) <= 3, shards
    bf32 = load_llama(sdir)
    assert all(p.dtype == torch.float32 for p in bf32.parameters())
    bf_ref = base_reference(bf32, input_ids, with_hidden=False)
    save_file(bf_ref, str(sdir / "reference.safetensors"))
    summary["llama-tiny-sharded-bf16"] = {
        "shards": shards,
        "max_shard_size": summary_shard_size,
        "loss": float(bf_ref["loss"]),
        "max_abs_logits_vs_f32": float((bf_ref["logits"] - llama_ref["logits"]).abs().max()),
    }

    # ---- qwen2-tiny (f32)
    log("[model] qwen2-tiny")
    qdir = out / "qwen2-tiny"
    torch.manual_seed(5678)
    qwen = Qwen2ForCausalLM(qwen2_config()).eval()
    init_weights_(qwen, seed=5678)
    assert qwen.lm_head.weight.data_ptr() == qwen.model.embed_tokens.weight.data_ptr(), "not tied"
    assert qwen.model.layers[0].self_attn.q_proj.bias is not None
    save_model(qwen, qdir)
    copy_tokenizer(tdir, qdir)
    qcfg = json.loads((qdir / "config.json").read_text())
    (qdir / "config.v4.json").write_text(json.dumps(v4_config(qcfg, None), indent=2) + "\n")
    check_v4_parses_same(Qwen2Config, qdir / "config.json", qdir / "config.v4.json")
    qwen_ref = base_reference(qwen, input_ids, with_hidden=True)
    reloaded = load_qwen2(qdir)
    with torch.no_grad():
        assert_close(forward(reloaded, input_ids).logits, qwen_ref["logits"], "qwen reload", atol=0, rtol=0)
    save_file(qwen_ref, str(qdir / "reference.safetensors"))
    qkeys = sorted(load_file(str(qdir / "model.safetensors")).keys())
    summary["qwen2-tiny"] = {
        "loss": float(qwen_ref["loss"]),
        "logits_std": float(qwen_ref["logits"].std()),
        "lm_head_in_file": "lm_head.weight" in qkeys,
    }

    # ---- qwen2-tiny-f16
    log("[model] qwen2-tiny-f16")
    fdir = out / "qwen2-tiny-f16"
    save_model(copy.deepcopy(qwen).to(torch.float16), fdir)
    copy_tokenizer(tdir, fdir)
    assert (fdir / "model.safetensors").exists()
    f32 = load_qwen2(fdir)
    f16_ref = base_reference(f32, input_ids, with_hidden=False)
    save_file(f16_ref, str(fdir / "reference.safetensors"))
    summary["qwen2-tiny-f16"] = {
        "loss": float(f16_ref["loss"]),
        "max_abs_logits_vs_f32": float((f16_ref["logits"] - qwen_ref["logits"]).abs().max()),
    }

    # ---- adapters
    summary["llama-tiny-lora"] = make_adapter(
        "llama-tiny-lora", out, "llama-tiny", load_llama,
        LoraConfig(r=8, lora_alpha=16, target_modules=list(PROJ), lora_dropout=0.0, bias="none",
                   task_type="CAUSAL_LM"),
        seed=101, input_ids=input_ids,
    )
    summary["llama-tiny-rslora"] = make_adapter(
        "llama-tiny-rslora", out, "llama-tiny", load_llama,
        LoraConfig(r=4, lora_alpha=8, use_rslora=True, layers_to_transform=[0, 2],
                   target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2},
                   alpha_pattern={"v_proj": 4}, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"),
        seed=202, input_ids=input_ids,
    )
    summary["llama-tiny-mts"] = make_adapter(
        "llama-tiny-mts", out, "llama-tiny", load_llama,
        LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                   modules_to_save=["lm_head", "embed_tokens"], lora_dropout=0.0, bias="none",
                   task_type="CAUSAL_LM"),
        seed=303, input_ids=input_ids, perturb_mts=True,
    )
    summary["qwen2-tiny-lora"] = make_adapter(
        "qwen2-tiny-lora", out, "qwen2-tiny", load_qwen2,
        LoraConfig(r=8, lora_alpha=16, target_modules=list(PROJ), lora_dropout=0.0, bias="none",
                   task_type="CAUSAL_LM"),
        seed=404, input_ids=input_ids,
    )

    # sanity on rank/alpha patterns
    rs = summary["llama-tiny-rslora"]["saved_keys"]
    assert not any(".layers.1." in k for k in rs), "layers_to_transform=[0,2] violated"
    rsd = load_file(str(out / "llama-tiny-rslora" / "adapter_model.safetensors"))
    assert rsd["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape[0] == 2
    assert rsd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 4

    (out / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    (out / "summary.json").write_text(dumps(summary))
    write_readme(out, versions, summary)
    total = dir_size(out)
    log(json.dumps(summary, indent=1)[:6000])
    log(f"total size {total} bytes")
    assert total < 4 * 1024 * 1024


def write_readme(out: Path, versions: dict, summary: dict):
    tree = []
    for p in sorted(out.rglob("*")):
        if p.is_file():
            tree.append(f"{str(p.relative_to(out)):60s} {p.stat().st_size:>8d}")
    tree.append(f"{'README.md':60s} {'(this)':>8s}")
    v = versions
    text = f"""# fastlora reference fixtures

Generated by `tests/scripts/make_fixtures.py` (do not edit by hand; regenerate instead).

* date: {v['date_utc']}
* python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']},
  tokenizers {v['tokenizers']}, safetensors {v['safetensors']}
* computed on CPU in float32 (`torch.set_num_threads(1)`, deterministic algorithms),
  `attn_implementation="eager"`, `model.eval()` (all dropouts are 0 anyway).

Regenerate (on the project's device machine, through the `run` tool, from the repo root):

    python3 tests/scripts/make_fixtures.py --out $OUT/fixtures && tar czf $OUT/fixtures.tgz -C $OUT fixtures

then here: `rm -rf tests/fixtures && tar xzf <files_at>/fixtures.tgz -C tests/`.
Anywhere with the same packages: `python3 tests/scripts/make_fixtures.py --out /tmp/fx` and move it.

## Folders

| path | what |
| --- | --- |
| `tokenizer/` | byte-level BPE trained with `tokenizers` on a short built-in English text: `tokenizer.json` (vocab {summary_vocab(out)}: 4 specials + 256 byte symbols + merges), `tokenizer_config.json` (bos = eos = `<\\|endoftext\\|>` id 0, pad = `<pad>` id 3, ChatML `chat_template`), `tokenizer_expected.json` (ids of sample strings and the rendered chat template, for testing the Rust tokenizer side). Special ids: `<\\|endoftext\\|>`=0, `<\\|im_start\\|>`=1, `<\\|im_end\\|>`=2, `<pad>`=3. No post-processor: encoding adds no BOS/EOS. Both files are copied into every model folder. |
| `inputs.safetensors` | `input_ids`: int64 `[2, 12]`, the first 12 ids of the two sentences in `inputs.json` (no BOS, no padding; attention mask is all ones). |
| `inputs.json` | the same ids, the sentences and the token strings. |
| `llama-tiny/` | random `LlamaForCausalLM`, f32 (`model.safetensors`, single file): vocab 320, hidden 64, intermediate 176, 3 layers, 4 heads, 2 kv heads (GQA), head_dim 16, rms_norm_eps 1e-5, max_position_embeddings 128, untied lm_head, no biases, rope theta 1e4 with **llama3** scaling (factor 8, low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 32: of the 8 inverse frequencies, #0 is unchanged, #1 is smoothed, #2..7 are divided by 8). Weights ~ N(0, 0.1²), RMSNorm weights 1 + 0.1·N(0,1). |
| `llama-tiny/config.json` | **transformers-5 form**, as written by `save_pretrained`: `"rope_parameters": {{"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, ...}}`, no `rope_theta`/`rope_scaling` keys; `"dtype"`. |
| `llama-tiny/config.v4.json` | the same config hand-converted to the **transformers-4 form**: top-level `"rope_theta": 10000.0` and `"rope_scaling": {{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}`, `"torch_dtype"` instead of `"dtype"`. The script asserts transformers parses both to the same rope parameters. |
| `llama-tiny-sharded-bf16/` | the same llama weights cast to **bf16**, saved with `max_shard_size="{summary['llama-tiny-sharded-bf16']['max_shard_size']}"`: `model-0000i-of-0000N.safetensors` shards + `model.safetensors.index.json` ({', '.join(summary['llama-tiny-sharded-bf16']['shards'])}). Its `reference.safetensors` is computed from these bf16 weights loaded with `dtype=float32` (exact upcast), so it differs from `llama-tiny`'s (max abs logit diff {summary['llama-tiny-sharded-bf16']['max_abs_logits_vs_f32']:.3g}). |
| `qwen2-tiny/` | random `Qwen2ForCausalLM`, f32: vocab 320, hidden 64, intermediate 128, 2 layers, 4 heads, 2 kv heads (head_dim 16), q/k/v biases (non-zero, N(0, 0.1²)), no o_proj bias, **tied** embeddings (`tie_word_embeddings: true`; `lm_head.weight` {'IS' if summary['qwen2-tiny']['lm_head_in_file'] else 'is NOT'} stored in `model.safetensors`: use `model.embed_tokens.weight`), rope theta 1e6 (`rope_type` default), rms_norm_eps 1e-6, no sliding window. `config.json` is transformers-5 form; `config.v4.json` the transformers-4 form (`rope_theta: 1000000.0`, `rope_scaling: null`). |
| `qwen2-tiny-f16/` | the same qwen2 weights cast to **f16**, one `model.safetensors`; reference computed from the f16 weights loaded as f32. |
| `llama-tiny-lora/` | PEFT adapter on `llama-tiny`: `LoraConfig(r=8, lora_alpha=16, target_modules=[q,k,v,o,gate,up,down]_proj, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")`. Scale alpha/r = 2. |
| `llama-tiny-rslora/` | `LoraConfig(r=4, lora_alpha=8, use_rslora=True, layers_to_transform=[0, 2], target_modules=["q_proj","v_proj","down_proj"], rank_pattern={{"down_proj": 2}}, alpha_pattern={{"v_proj": 4}})`. Scales alpha/sqrt(r): q_proj 8/2 = 4, v_proj 4/2 = 2, down_proj 8/sqrt(2). No adapters in layer 1. |
| `llama-tiny-mts/` | `LoraConfig(r=4, lora_alpha=4, target_modules=[q,k,v,o]_proj, modules_to_save=["lm_head", "embed_tokens"])`; the saved full copies of lm_head and embed_tokens are the base weights + 0.05·N(0,1) (so they differ from the base). |
| `qwen2-tiny-lora/` | PEFT adapter on `qwen2-tiny`: r=8, lora_alpha=16, all 7 projections (base q/k/v biases stay frozen, `bias="none"`). |

Each adapter folder is exactly what `PeftModel.save_pretrained` wrote (`adapter_config.json`,
`adapter_model.safetensors`, PEFT's `README.md`) plus `reference.safetensors`.
`adapter_config.json`'s `base_model_name_or_path` is `llama-tiny` / `qwen2-tiny` (the sibling
folder). After `get_peft_model`, every `lora_A` and `lora_B` was re-initialised to
0.1·N(0,1) (seeded), so both are non-zero and the adapter changes the logits.

## Key conventions

`adapter_model.safetensors` keys (PEFT's, adapter name `default` removed):

* `base_model.model.model.layers.{{i}}.self_attn.{{q,k,v,o}}_proj.lora_A.weight` — `[r, in_features]`
* `base_model.model.model.layers.{{i}}.self_attn.{{q,k,v,o}}_proj.lora_B.weight` — `[out_features, r]`
* `base_model.model.model.layers.{{i}}.mlp.{{gate,up,down}}_proj.lora_{{A,B}}.weight`
* modules_to_save (llama-tiny-mts): `base_model.model.lm_head.weight` `[320, 64]`,
  `base_model.model.model.embed_tokens.weight` `[320, 64]` (the trainable copies).

LoRA forward: `y = x W^T + scale * (x A^T) B^T` with `scale = alpha/r` (`alpha/sqrt(r)` for rslora),
r/alpha per module from `rank_pattern`/`alpha_pattern` when a key matches.

`reference.safetensors` keys (all float32):

| key | shape | in | meaning |
| --- | --- | --- | --- |
| `logits` | `[2, 12, 320]` | all | model(input_ids).logits (for adapters: the PEFT model, unmerged) |
| `loss` | `[1]` (not a 0-d scalar) | all | mean next-token cross entropy: labels = input_ids, logits[:, :-1] vs input_ids[:, 1:], mean over the 2·11 = 22 positions (= transformers' `ForCausalLMLoss` with `labels=input_ids`) |
| `merged_logits` | `[2, 12, 320]` | adapters | logits of `PeftModel.from_pretrained(fresh base, adapter).merge_and_unload()` |
| `grad.<adapter key>` | same as the parameter | adapters | d loss / d parameter, for every key of `adapter_model.safetensors`, same name with `grad.` prefixed, e.g. `grad.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, `grad.base_model.model.lm_head.weight` |
| `hidden.0` | `[2, 12, 64]` | llama-tiny, qwen2-tiny | output of `embed_tokens` |
| `hidden.{{i+1}}` | `[2, 12, 64]` | llama-tiny, qwen2-tiny | output of decoder layer i (residual stream, before the final norm), i = 0..L-1 |
| `hidden.final_norm` | `[2, 12, 64]` | llama-tiny, qwen2-tiny | output of the final RMSNorm (input of lm_head) |
| `rope.inv_freq` | `[8]` | llama-tiny, qwen2-tiny | transformers' (scaled) inverse frequencies, `rotary_emb.inv_freq` |
| `rope.attention_scaling` | `[1]` | llama-tiny, qwen2-tiny | multiplier on cos/sin (1.0 here) |

Note: hidden states are captured with forward hooks, not `output_hidden_states=True` (whose last
entry is the post-norm state in transformers 5, which would make `hidden.L` ambiguous).

`summary.json` holds the losses and a few numbers for eyeballing; `versions.json` the versions.

## Checking / tolerances

`python3 tests/scripts/check_fixtures.py` (needs only numpy + safetensors) recomputes every
`logits`, `loss`, `hidden.*`, `rope.inv_freq` and `merged_logits` from the weights with an
independent float64 numpy implementation of the semantics above, and spot-checks the `grad.*`
tensors by central finite differences. The f32 torch references differ from float64 by up to
~3e-6 absolute on logits of std ~0.8 (and `merged_logits` differ from `logits` by up to ~4e-6,
since merging re-associates the sums), so compare with a mixed tolerance such as
`|a - b| <= 1e-5 + 1e-4 * |b|` rather than a purely relative one (some logits are near 0).

## Files

```
{chr(10).join(tree)}
```
"""
    (out / "README.md").write_text(text)


def summary_vocab(out: Path) -> int:
    return Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json")).get_vocab_size()


if __name__ == "__main__":
    main()

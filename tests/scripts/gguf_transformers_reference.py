"""transformers' own GGUF loading of SmolLM2-135M-Instruct.Q4_1.gguf, as the reference for
fastlora's GGUF import (run on the GPU machine, on its CPU, f32; it has torch, transformers and
PEFT but no `gguf` package, so the wheel travels with the command).

Writes, under --fixtures (committed to tests/fixtures/gguf/):
1. `smollm2_tokenizer.json`: ids of a multilingual / emoji / code / chat sample under
   `AutoTokenizer.from_pretrained(dir, gguf_file=...)`, with and without special tokens, and
   their decodings; the chat template rendered for one conversation.
2. `smollm2_logits.safetensors`: `input_ids` [1, T] (the chat prompt) and transformers' f32
   logits from `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`: `logits_head`
   [1, T, 2048] (every position, the first 2048 vocabulary columns) and `logits_last`
   [1, 1, vocab] (the last position).

And, with --fastlora (a fastlora binary) and --adapter (an adapter fastlora trained on the GGUF
model), a report --out (JSON) of:
3. PEFT: `PeftModel.from_pretrained(gguf model, adapter)` logits vs `fastlora logits` with
   the same adapter;
4. `fastlora export` (GGUF → HF folder) loaded by transformers: logits vs transformers' GGUF
   loading, tokenizer ids and chat template vs the GGUF tokenizer's;
5. `fastlora merge` of the adapter loaded by transformers: logits vs PEFT's.

Usage (repo root): python3 tests/scripts/gguf_transformers_reference.py --gguf F.gguf
    --fixtures $OUT --fastlora ./fastlora --adapter DIR --work /tmp/fl --out $OUT/report.json
"""
import argparse
import json
import os
import subprocess

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

SAMPLES = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Grüße aus München — naïve café, façade, Ærøskøbing.",
    "日本語のテキストと中文文本，还有한국어 문장.",
    "Русский текст и ελληνικά γράμματα, עברית, العربية",
    "Emoji: 🤗🚀👍🏽 👨‍👩‍👧‍👦 🇫🇷 ✨",
    "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * i).collect();\n\tprintln!(\"{x:?}\");\n}\n",
    "def f(a, b=2):\n    return {'sum': a + b, \"tabs\":\t[1, 2, 3]}  # comment\n\n\n",
    "   leading spaces, trailing spaces   \r\n numbers 1234567 3.14159 1e-9",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
]
HEAD = 2048
CONVERSATION = [{"role": "user", "content": "What is the capital of France?"}]


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def compare(a, b):
    diff = (a - b).abs()
    return {
        "max_abs": diff.max().item(),
        "max_rel": (diff / b.abs().clamp_min(1e-6)).max().item(),
        "max_abs_over_max": (diff.max() / b.abs().max()).item(),
        "argmax_equal": bool((a.argmax(-1) == b.argmax(-1)).all()),
    }


def run(cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--fixtures", required=True)
    parser.add_argument("--fastlora")
    parser.add_argument("--adapter")
    parser.add_argument("--work", default="/tmp/fl")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(8)
    folder, name = os.path.split(os.path.abspath(args.gguf))

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    encodings = []
    for text in SAMPLES:
        with_special = tokenizer(text)["input_ids"]
        plain = tokenizer(text, add_special_tokens=False)["input_ids"]
        encodings.append({
            "text": text,
            "ids": plain,
            "ids_with_special_tokens": with_special,
            "decoded": tokenizer.decode(plain),
            "decoded_skip_special": tokenizer.decode(plain, skip_special_tokens=True),
        })
    prompt = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    tokenizer_ref = {
        "transformers": transformers.__version__,
        "source": name,
        "encodings": encodings,
        "chat": {"messages": CONVERSATION, "add_generation_prompt": True, "rendered": prompt},
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "len": len(tokenizer),
    }
    with open(os.path.join(args.fixtures, "smollm2_tokenizer.json"), "w") as f:
        json.dump(tokenizer_ref, f, ensure_ascii=False, indent=1)

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], dtype=torch.int64)
    base_logits = logits_of(model, ids)
    # Every position's first HEAD vocabulary columns and the last position's whole row: the
    # full [1, T, 49152] f32 tensor would be 7 MB in the repository.
    save_file(
        {
            "input_ids": ids,
            "logits_head": base_logits[:, :, :HEAD].contiguous(),
            "logits_last": base_logits[:, -1:, :].contiguous(),
        },
        os.path.join(args.fixtures, "smollm2_logits.safetensors"),
        metadata={"transformers": transformers.__version__, "source": name},
    )
    print("prompt tokens", ids.shape[1], "argmax next", tokenizer.decode(base_logits[0, -1].argmax()))
    if not args.fastlora:
        return

    from peft import PeftModel
    import peft

    os.makedirs(args.work, exist_ok=True)
    ids_file = os.path.join(args.work, "ids.safetensors")
    save_file({"input_ids": ids}, ids_file)
    report = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__}, "prompt_tokens": ids.shape[1]}

    # fastlora's own base logits, against transformers' GGUF loading.
    ours_base = os.path.join(args.work, "ours_base.safetensors")
    run([args.fastlora, "logits", "--model", args.gguf, "--input-ids", ids_file, "--out", ours_base])
    report["fastlora_vs_transformers_gguf"] = compare(load_file(ours_base)["logits"], base_logits)

    # 3. The fastlora-trained adapter in PEFT.
    ours_adapted = os.path.join(args.work, "ours_adapted.safetensors")
    run([args.fastlora, "logits", "--model", args.gguf, "--adapter", args.adapter,
         "--input-ids", ids_file, "--out", ours_adapted])
    peft_model = PeftModel.from_pretrained(model, args.adapter).eval()
    peft_logits = logits_of(peft_model, ids)
    report["peft_adapter_vs_fastlora"] = compare(load_file(ours_adapted)["logits"], peft_logits)
    report["adapter_changes_logits_by"] = (peft_logits - base_logits).abs().max().item()

    # 4. fastlora export: the HF folder in transformers.
    exported = os.path.join(args.work, "exported")
    run([args.fastlora, "export", "--model", args.gguf, "--out", exported])
    hf = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    report["export_vs_transformers_gguf"] = compare(logits_of(hf, ids), base_logits)
    hf_tokenizer = AutoTokenizer.from_pretrained(exported)
    report["export_tokenizer_equal"] = all(
        hf_tokenizer(e["text"], add_special_tokens=False)["input_ids"] == e["ids"] for e in encodings
    )
    report["export_chat_template_equal"] = (
        hf_tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == prompt
    )

    # 5. fastlora merge of the adapter, in transformers.
    merged = os.path.join(args.work, "merged")
    run([args.fastlora, "merge", "--model", args.gguf, "--adapter", args.adapter, "--out", merged])
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    report["merged_vs_peft"] = compare(logits_of(merged_model, ids), peft_logits)

    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

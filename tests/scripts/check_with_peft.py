"""Cross-checks fastlora's outputs with HF transformers + PEFT (run on the GPU machine, on CPU).

1. Each adapter in tests/fixtures/fastlora-made/ (saved by fastlora) is loaded by
   `PeftModel.from_pretrained(base, dir)`; its logits on tests/fixtures/inputs.safetensors are
   compared with the logits fastlora computed (`logits.safetensors` beside it).
2. Each merged folder under --merged (written by `fastlora merge`) is loaded by
   `AutoModelForCausalLM.from_pretrained`; its logits are compared with the reference
   `merged_logits` of the adapter it was merged from.
3. PEFT's `print_trainable_parameters` line for every fixture and fastlora-made adapter
   (loaded with is_trainable=True), for the Rust tests to compare with.

Writes a JSON report to --out. Usage (from the repo root):
    python3 tests/scripts/check_with_peft.py --merged .cache/merged --out $OUT/peft_check.json
"""
import argparse
import contextlib
import io
import json
import os

import peft
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

FIX = "tests/fixtures"


def base_model(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def trainable_line(model):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        model.print_trainable_parameters()
    return buf.getvalue().strip()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--merged", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ids = load_file(f"{FIX}/inputs.safetensors")["input_ids"]
    report = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "fastlora_made": {},
        "merged": {},
        "trainable_lines": {},
    }
    made = f"{FIX}/fastlora-made"
    for name in sorted(os.listdir(made)):
        adapter = f"{made}/{name}"
        base = json.load(open(f"{adapter}/adapter_config.json"))["base_model_name_or_path"]
        model = PeftModel.from_pretrained(base_model(f"{FIX}/{base}"), adapter, is_trainable=True).eval()
        got = logits_of(model, ids)
        want = load_file(f"{adapter}/logits.safetensors")["logits"]
        diff = (got - want).abs().max().item()
        report["fastlora_made"][name] = {
            "max_abs_diff": diff,
            "max_abs_logit": want.abs().max().item(),
            "ok": diff <= 1e-5 * want.abs().max().item(),
        }
        report["trainable_lines"][name] = trainable_line(model)
    for name in ["llama-tiny-lora", "llama-tiny-rslora", "llama-tiny-mts", "qwen2-tiny-lora"]:
        base = json.load(open(f"{FIX}/{name}/adapter_config.json"))["base_model_name_or_path"]
        model = PeftModel.from_pretrained(base_model(f"{FIX}/{base}"), f"{FIX}/{name}", is_trainable=True)
        report["trainable_lines"][name] = trainable_line(model)
    for name in sorted(os.listdir(args.merged)):
        merged = base_model(f"{args.merged}/{name}")
        got = logits_of(merged, ids)
        source = name.removeprefix("merged-")
        ref = f"{FIX}/{source}/reference.safetensors"
        if os.path.exists(ref):
            want = load_file(ref)["merged_logits"]
        else:  # a fastlora-made adapter: compare with fastlora's unmerged logits
            want = load_file(f"{made}/{source}/logits.safetensors")["logits"]
        diff = (got - want).abs().max().item()
        report["merged"][name] = {
            "max_abs_diff": diff,
            "max_abs_logit": want.abs().max().item(),
            "ok": diff <= 1e-5 * want.abs().max().item(),
        }
    text = json.dumps(report, indent=2, sort_keys=True)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()

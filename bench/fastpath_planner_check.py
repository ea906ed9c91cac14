"""The memory planner's prediction for each fast-path variant of a bench/train_throughput.py result folder, next to
what the GPU measured (max_memory_reserved): the planner's settings are the ones the variant's levers record.

    python3 bench/fastpath_planner_check.py bench/results/fastpath_h100_2026-12-06/call4 > .../planner_check.json
"""

from __future__ import annotations

import glob
import json
import sys
from dataclasses import replace

LLAMA3_8B = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                 max_position_embeddings=8192, tie_word_embeddings=False)


def main(folder: str) -> int:
    sys.path.insert(0, ".")
    from bench.train_throughput import VARIANTS
    from qlora_doctor.memory.estimate import GIB, TrainSettings, estimate
    from qlora_doctor.memory.model import count_parameters

    counts = count_parameters(LLAMA3_8B)
    rows = []
    for path in sorted(glob.glob(f"{folder}/**/*.json", recursive=True)):
        data = json.load(open(path))
        for point in data.get("points", []) if isinstance(data, dict) else []:
            variant, measured = point.get("variant"), point.get("max_memory_reserved_gib")
            if variant not in VARIANTS or VARIANTS[variant] is None or measured is None:
                continue
            perf = VARIANTS[variant]
            levers = point["levers"]
            s = TrainSettings(micro_batch=point["batch"], seq_len=point["seq"], optim=data["meta"]["optim"],
                              lora_dropout=data["meta"].get("lora_dropout", 0.05), upcast_unquantized=False,
                              liger_kernel=levers["liger_kernel"]["on"], fused_lora=levers["fused_lora"]["on"],
                              recompute="selective" if levers["recompute"]["on"] else "full",
                              selective_layers=perf.get("selective_layers", "all"),
                              checkpoint_layers=perf.get("checkpoint_layers", "all"),
                              fp8_base=levers.get("fp8_base", {}).get("on", False),
                              fp8_weight_cache=levers.get("fp8_weight_cache", {}).get("on", False),
                              offload_checkpoints=levers.get("offload_checkpoints", {}).get("on", False))
            predicted = estimate(counts, s).total_bytes / GIB
            rows.append({"file": path[len(folder) + 1:], "variant": variant, "tokens_per_s": point["tokens_per_s"],
                         "measured_reserved_gib": measured, "predicted_gib": round(predicted, 2),
                         "error_pct": round(100 * (predicted - measured) / measured, 1)})
    print(json.dumps({"card": "see each file's meta.card", "model": "Llama-3-8B shape", "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1].rstrip("/")))

#!/usr/bin/env bash
# Issue #20, the measurements still owed (run on the device tool's GPU image, from the repo root, each PART in one
# device call, back to back on one warm machine so that every row shares the card):
#   PART=ours    baseline, fast, fast_selective, fast_offload, fast_selective_offload     (~9 min)
#   PART=fp8     baseline, fast, fast_fp8_selective_offload, fast_fp8_cache_selective_offload (the FP8 target;
#                the cache keeps each weight's float8 cast: performance.fp8_weight_cache)            (~9 min)
#   PART=peer    bench/peer_unsloth.py (both checkpointing modes)                          (~6 min)
#   PART=loss    loss curves of LOSS_REF against LOSS_VAR (default fast_full_recompute, fast; LOSS_VAR may be a
#                comma list) on the 1B shape memorising fixed rows, LOSS_STEPS (200) steps: ~90 s a curve plus
#                loading; give it 260 s or more (a 200 s bound cut the fp8 curve at step 173 in session 13) (~4 min)
#   PART=table   README's one table: baseline, fast (the default), fast_fp8_cache_selective_offload, then unsloth
#                (both checkpointing modes), then unsloth's loss curve on the rows PART=loss trains on, with the
#                Trainer's settings (1B, 200 steps, cosine, clip 0.3, alpha 32); needs .whl2 whole     (~7 min)
#                Then PART=loss with LOSS_REF=baseline LOSS_VAR=fast,fast_fp8_cache_selective_offload, and here
#                `bench/loss_plot.py --curves loss/curves.json --peer table/unsloth_loss.json` draws all against plain.
#   PART=curves  200-step loss curves of plain, ours, ours fp8, and unsloth in the Trainer's order and in row order,
#                drawn together by bench/loss_plot.py (tables aside)                                           (~8 min)
# VARIANTS="a b" overrides a PART's list; VARIANT_S (150) bounds each variant's process.
# BENCH_ARGS adds train_throughput.py options (e.g. "--lora-dropout 0 --optim adamw_torch_fused": unsloth's settings).
# Wheels: .whl2 as in bench/results/fastpath_h200_2026-12-05/NOTES.md (slim bitsandbytes 0.50.2 for cuda130,
# datasets and its needs, liger-kernel 0.8.5, torchao 0.18; unsloth and its needs for PART=peer); carry [".whl2"].
# The working tree travels too (~15 MB), so with unsloth the call exceeds 64 MiB: for PART=ours/fp8/loss carry
# `.whl3` (.whl2 without unsloth, unsloth_zoo, trl, hf_transfer, sentencepiece: 18 MB) and `ln -sfn .whl3 .whl2`.
# `recompute: selective` runs on the image's torch 2.11 since fused LoRA adds out of place inside selective
# layers (trainer/selective.py). Results land in $OUT/<PART>/; commit them under bench/results/ with the card.
set -u
PART=${PART:?PART=ours|fp8|peer|loss|table|all|curves}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 .whl2/*.whl || exit 1
export PYTHONPATH=/tmp/site2:$PWD HF_HUB_OFFLINE=1
mkdir -p "$OUT/$PART"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/$PART/card.csv"
run() {  # one variant per process: each starts from an empty CUDA cache
  python3 bench/train_throughput.py --out "$OUT/$PART/$1.json" --shapes 8b --batches 8 --variants "$1" \
    --warmup 2 --steps 4 --budget-s 100 ${BENCH_ARGS:-} > "$OUT/$PART/$1.log" 2>&1 &
  local pid=$!; ( sleep "${VARIANT_S:-150}"; kill "$pid" 2>/dev/null ) & local guard=$!
  wait "$pid"; local rc=$?; kill "$guard" 2>/dev/null
  exited "$1" $rc; tail -3 "$OUT/$PART/$1.log"
}
exited() { echo "$1 exit $2" >> "$OUT/$PART/exits.txt"; }
curves() {  # loss curves of $1 against the comma list $2 over $LOSS_STEPS: tolerances $3 (relative), $4 (absolute); budget $5
  python3 bench/train_throughput.py --out "$OUT/$PART/curves.json" --shapes "" --loss-steps "$LOSS_STEPS" \
    --loss-data memorise --loss-reference "$1" --loss-variant "$2" --loss-tolerance "$3" --loss-abs-tolerance "$4" \
    --budget-s "$5" ${BENCH_ARGS:-} > "$OUT/$PART/curves.log" 2>&1
  exited loss $?; tail -3 "$OUT/$PART/curves.log"
}
peer() {  # unsloth's throughput, modes $1, budget $2
  python3 bench/peer_unsloth.py --out "$OUT/$PART/unsloth.json" --modes "$1" --budget-s "$2" > "$OUT/$PART/unsloth.log" 2>&1
  exited unsloth $?
}
peer_loss() {  # unsloth's loss curve on the rows and settings curves() trains on; budget $1; order $2 (trainer: the
  # Trainer's, as curves() takes them; sequential: each row once every 4 steps), output name $3
  local name=${3:-unsloth_loss}
  python3 bench/peer_unsloth.py --out "$OUT/$PART/$name.json" --modes unsloth --shape 1b --seq 512 --batch 4 \
    --warmup 0 --steps "$LOSS_STEPS" --lr 3e-3 --lora-alpha 32 --data memorise --order "${2:-trainer}" \
    --schedule cosine --max-grad-norm 0.3 --budget-s "$1" > "$OUT/$PART/$name.log" 2>&1
  exited "$name" $?
}
case $PART in
  ours) for v in ${VARIANTS:-baseline fast fast_selective fast_offload fast_selective_offload}; do run $v; done ;;
  fp8)  for v in ${VARIANTS:-baseline fast fast_fp8_selective_offload fast_fp8_cache_selective_offload}; do run $v; done ;;
  loss) LOSS_STEPS=${LOSS_STEPS:-200}
        curves "${LOSS_REF:-fast_full_recompute}" "${LOSS_VAR:-fast}" "${LOSS_TOL:-0.01}" "${LOSS_ABS_TOL:-0}" 480
        python3 -c "import json,sys; d=json.load(open(sys.argv[1]))['loss_curves']; print(d.get('compared'), d.get('errors'))" "$OUT/loss/curves.json" ;;
  table) LOSS_STEPS=${LOSS_STEPS:-200}
        for v in ${VARIANTS:-baseline fast fast_fp8_cache_selective_offload}; do run $v; done
        peer unsloth,plain "${PEER_S:-200}"
        peer_loss "${PEER_LOSS_S:-170}"
        python3 -c "import json,sys; p=json.load(open(sys.argv[1]))['points'][0]; l=p.get('losses') or []; print('unsloth loss', len(l), l[:2], l[-3:], p.get('error'))" "$OUT/table/unsloth_loss.json" ;;
  peer) peer unsloth,plain 360 ;;
  all)  # table and loss in one call, when only one fits the device budget (LOSS_STEPS 100 here)         (~8 min)
        LOSS_STEPS=${LOSS_STEPS:-100}
        for v in baseline fast fast_fp8_cache_selective_offload; do run $v; done
        peer "${PEER_MODES:-unsloth}" "${PEER_S:-130}"
        curves baseline fast,fast_fp8_cache_selective_offload 0.05 0.05 "${LOSS_S:-220}"
        peer_loss "${PEER_LOSS_S:-130}"
        python3 bench/loss_plot.py --curves "$OUT/all/curves.json" --peer "$OUT/all/unsloth_loss.json" \
          --out "$OUT/all/loss_all.json" ;;
  curves)  # every path's loss curve against plain over LOSS_STEPS (200): ours, fp8, unsloth in the Trainer's order
        # and unsloth on the rows in order (the two show what the order alone does)                          (~8 min)
        LOSS_STEPS=${LOSS_STEPS:-200}
        curves baseline fast,fast_fp8_cache_selective_offload 0.05 0.05 "${LOSS_S:-280}"
        peer_loss "${PEER_LOSS_S:-140}" trainer unsloth_loss
        peer_loss "${PEER_LOSS_S:-140}" sequential unsloth_loss_seq
        python3 bench/loss_plot.py --curves "$OUT/curves/curves.json" --peer "$OUT/curves/unsloth_loss.json" \
          --peer "$OUT/curves/unsloth_loss_seq.json" --out "$OUT/curves/loss_all.json" ;;
  *) echo "PART=$PART: expected ours, fp8, peer, loss, table, all or curves" >&2; exit 2 ;;
esac
python3 - "$OUT/$PART" <<'PY'
import glob, json, sys
for f in sorted(glob.glob(sys.argv[1] + "/*.json")):
    for p in json.load(open(f)).get("points", []):
        print(f.rsplit("/", 1)[-1], p.get("variant"), p.get("tokens_per_s"), p.get("mfu_4n"),
              p.get("max_memory_allocated_gib"), p.get("max_memory_reserved_gib"), p.get("error", ""))
PY
tar -czf "$OUT/$PART.tgz" -C "$OUT" "$PART" && rm -rf "${OUT:?}/$PART"  # the device tool brings back 8 files

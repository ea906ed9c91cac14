#!/usr/bin/env bash
# The GPU machine's own lock, installed there (issue #16). On the device tool's image (torch 2.11.0+cu130,
# Python 3.12) from the repo root, with the wheels the image lacks in .whl4/ (transformers 5.24.0, peft 0.21.2,
# bitsandbytes 0.50.2 slim cuda130, datasets 5.2.0 and its needs, gguf, sentencepiece): record the newest GPU
# combination in place with the [train] extra's tools present (so its closure names them), make the lock there
# from that record, pip-install the lock into the image from those wheels alone (--no-index), then run
# `check --smoke` with what the lock installed and nothing on PYTHONPATH but this checkout. Output under $OUT.
set -u
W=.whl4; L=$OUT/lock-install.log; NAME=gpu-cu130-tf5.24-peft0.21.2-bnb0.50.2
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/c2 $W/transformers-*.whl $W/peft-*.whl \
  $W/bitsandbytes-*.whl $W/datasets-*.whl $W/dill-*.whl $W/multiprocess-*.whl $W/pydantic*.whl \
  $W/annotated_types-*.whl $W/typing_inspection-*.whl $W/gguf-*.whl $W/sentencepiece-*.whl >>$L 2>&1
PYTHONPATH=/tmp/c2:$PWD timeout 150 python3 -m qlora_doctor.cli matrix run --in-place --only $NAME --results $OUT/mr >>$L 2>&1
echo "record exit $?" >>$L
cp $OUT/mr/*.json matrix-results/
PYTHONPATH=$PWD python3 -m qlora_doctor.cli lock -o $OUT/gpu-lock.txt --force >>$L 2>&1
echo "lock exit $?" >>$L
python3 -m pip install --no-index --find-links $W -r $OUT/gpu-lock.txt >>$L 2>&1
echo "lock install exit $?" >>$L
python3 -m pip freeze > $OUT/after-install-freeze.txt 2>>$L
PYTHONPATH=$PWD timeout 200 python3 -m qlora_doctor.cli check --smoke --json > $OUT/lock-check-smoke.json 2>>$L
echo "check --smoke exit $?" >>$L
PYTHONPATH=$PWD python3 -m qlora_doctor.cli check -r $OUT/gpu-lock.txt >>$L 2>&1
echo "check -r lock exit $?" >>$L

#!/usr/bin/env bash
# GPU matrix records (issue #16), run on the device tool's GPU image from the repo root with the wheels of
# ../shared/tools/gpu-wheels.sh in .whl/ (SLIM_BNB=cuda130 for bitsandbytes 0.48.2/0.49.2/0.50.2; transformers
# 5.24.0, peft 0.21.2/0.18.1, accelerate 1.12.0/1.10.1/1.0.1, datasets and pydantic). Each combination is put
# first on PYTHONPATH over the image's torch 2.11.0+cu130 and recorded in place (check, then smoke) into
# $OUT/mr; copy those records into matrix-results/.
set -u
W=.whl; L=$OUT/gpu-matrix.log
pipt() { d=$1; shift; python3 -m pip install -q --no-index --no-deps --no-compile --target "$d" "$@" >>$L 2>&1; }
pipt /tmp/base $W/datasets-*.whl $W/dill-*.whl $W/multiprocess-*.whl $W/pydantic-*.whl $W/pydantic_core-*.whl $W/annotated_types-*.whl $W/typing_inspection-*.whl
pipt /tmp/c1 $W/bitsandbytes-0.50.2-*.whl
pipt /tmp/c2 $W/transformers-5.24.0-*.whl $W/peft-0.21.2-*.whl $W/bitsandbytes-0.50.2-*.whl
pipt /tmp/c3 $W/bitsandbytes-0.49.2-*.whl
pipt /tmp/c4 $W/transformers-5.24.0-*.whl $W/peft-0.21.2-*.whl $W/bitsandbytes-0.49.2-*.whl $W/accelerate-1.12.0-*.whl
pipt /tmp/c5 $W/bitsandbytes-0.48.2-*.whl $W/accelerate-1.10.1-*.whl
pipt /tmp/c6 $W/transformers-5.24.0-*.whl $W/peft-0.18.1-*.whl $W/bitsandbytes-0.48.2-*.whl
pipt /tmp/c7 $W/transformers-5.24.0-*.whl $W/peft-0.21.2-*.whl $W/bitsandbytes-0.50.2-*.whl $W/accelerate-1.0.1-*.whl
nvidia-smi --query-gpu=name,driver_version --format=csv >>$L 2>&1
python3 -c "import torch, transformers, peft, accelerate; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__)" >>$L 2>&1
i=0
for name in gpu-cu130-tf5.17-peft0.21.0-bnb0.50.2 gpu-cu130-tf5.24-peft0.21.2-bnb0.50.2 gpu-cu130-tf5.17-peft0.21.0-bnb0.49.2 gpu-cu130-tf5.24-peft0.21.2-bnb0.49.2-acc1.12 gpu-cu130-tf5.17-peft0.21.0-bnb0.48.2-acc1.10 gpu-cu130-tf5.24-peft0.18.1-bnb0.48.2 gpu-cu130-known-bad-tf5-accelerate1.0; do
  i=$((i+1)); echo "=== $name (/tmp/c$i) $(date +%T)" >>$L
  PYTHONPATH=/tmp/c$i:/tmp/base:$PWD timeout 120 python3 -m qlora_doctor.cli matrix run --in-place --only $name --results $OUT/mr >>$L 2>&1
  echo "exit $?" >>$L
done
PYTHONPATH=/tmp/c2:/tmp/base:$PWD python3 -m qlora_doctor.cli check --smoke --json > $OUT/check-smoke-tf5.24.json 2>>$L
echo "check --smoke exit $?" >>$L

# The GPU machine's own lock (issue #16): made there from the records just taken (with their closure, so the
# image's unrelated packages stay out), installed into a venv over the image's torch from the carried wheels
# only, then `check --smoke` from that venv.
cp $OUT/mr/*.json matrix-results/ 2>>$L
PYTHONPATH=/tmp/base:$PWD python3 -m qlora_doctor.cli lock -o $OUT/gpu-lock.txt >>$L 2>&1
echo "lock exit $?" >>$L
python3 -m venv --system-site-packages /tmp/lv >>$L 2>&1
/tmp/lv/bin/python -m pip install -q --no-index --find-links $W -r $OUT/gpu-lock.txt >>$L 2>&1
echo "lock install exit $?" >>$L
/tmp/lv/bin/python -m pip freeze > $OUT/lock-venv-freeze.txt 2>>$L
PYTHONPATH=$PWD /tmp/lv/bin/python -m qlora_doctor.cli check --smoke --json > $OUT/lock-check-smoke.json 2>>$L
echo "lock check --smoke exit $?" >>$L

#!/usr/bin/env bash
# The ablation sweep and attack panel, run once on a lent GPU machine (see README, "Ablations").
# Usage there: bash bench/gpu_sweep.sh DATA_DIR OUT_DIR
set -uo pipefail
data=$1; out=$2
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1
python3 -c "import torch, datasets, pyarrow, huggingface_hub; print(torch.__version__, torch.cuda.get_device_name(), datasets.__version__, pyarrow.__version__, huggingface_hub.__version__)" || exit 1
python3 bench/efficacy.py --data "$data" --jobs 13 --threads 1 --json "$out/ablation.json" \
  --variants default,generator,generator+refine,no-gm,no-fd,fd-x3,steps-20,ud-0.3,bind,bind-x5,eps-16,gm-every-step,sur-15 2>&1 | tee "$out/ablation.log"
python3 bench/efficacy.py --data "$data" --threads 4 --json "$out/attacks.json" --variants default \
  --attacks jpeg,grayscale,bitdepth,adversarial,distill 2>&1 | tee "$out/attacks.log"

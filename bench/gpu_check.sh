#!/usr/bin/env bash
# The GPU check of issue 16, in one run (under 8 minutes on one H100/H200):
#   1. bench/train_step.py: ResNet-50 at batch 256, 224 px, the fp32 reference against
#      the engine's bf16 + channels_last (and with torch.compile when GPU_CHECK_COMPILE=1);
#   2. bench/data_loading.py --cuda: the expand stage's loader reading real JPEG shards
#      (CPU decode with auto workers, and GPU decode) against the same ResNet-50 training
#      step on synthetic tensors;
#   3. the quick start with resnet50 at 224 px, short budgets: wall time per stage.
# Every part prints its own table; the run's whole log is also written to $LOG.
#
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh
# Goals (docs/benchmarks.md): bf16+channels_last >= 1.5x fp32, >= 4,500 images/s on one
# H100 for ResNet-50 training, the real-JPEG data path >= 90% of the synthetic one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
LOG=${LOG:-${OUT:-/tmp}/gpu_check.log}
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1
exec > >(tee "$LOG") 2>&1

"$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name(0), torch.__version__)'

echo "== 1. training step: ResNet-50, batch 256, 224 px (fp32 vs engine bf16 + channels_last)"
timeout 150 "$PYTHON" bench/train_step.py --arch resnet50 --batch 256 --image-size 224 \
    --device cuda --steps 15 --rounds 3 --workers auto
if [ "${GPU_CHECK_COMPILE:-0}" = 1 ]; then
    echo "== 1b. the same with torch.compile"
    timeout 150 "$PYTHON" bench/train_step.py --arch resnet50 --batch 256 --image-size 224 \
        --device cuda --steps 15 --rounds 2 --workers auto --compile
fi

echo "== 2. data path: real JPEG shards vs synthetic tensors (ResNet-50 step)"
timeout 150 "$PYTHON" bench/data_loading.py --images 1024 --width 500 --height 375 \
    --size 224 --max-side 320 --rounds 2 --skip-train --cuda --model-batch 256

echo "== 3. quick start, resnet50 at 224 px, short budgets: seconds per stage"
timeout 200 "$PYTHON" - "$WORK" <<'EOF'
import os
import sys

from xlearner.config import load_config

work = sys.argv[1]
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
short = "{steps: 40, batch_size: 64}"
cfg = load_config(
    "configs/quickstart.yaml",
    [
        "model.backbone=resnet50", "model.image_size=224", "synth.image_size=224",
        f"synth.out={work}/data", f"store.uri={work}/store",
        f"tracking.uri=sqlite:///{work}/mlflow.db", "compare=[]",
        *(f"sources.{i}.uri={work}/data/{n}" for i, n in
          enumerate(["shapes_cls", "shapes_attr", "shapes_det", "shapes_seg"])),
        *(f"downstream.{i}.uri={work}/data/{n}" for i, n in
          enumerate(["down_cls_a", "down_cls_b"])),
        *(f"tasks.{t}={short}" for t in ("cls", "multilabel", "det", "seg")),
        f"reconcile.train={short}", f"squeeze.train={short}",
        "engine.device=cuda",
    ],
)  # fmt: skip
from flows.pipeline import run_pipeline  # noqa: E402

result = run_pipeline(cfg)
print("\n| stage | seconds |\n|---|---:|")
for label, seconds in result["stage_seconds"].items():
    print(f"| {label} | {seconds:.1f} |")
print(f"| whole flow | {result['wall_seconds']:.1f} |")
EOF
rm -rf "$WORK"
echo "gpu check done; log: $LOG"

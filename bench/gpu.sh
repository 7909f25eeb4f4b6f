#!/usr/bin/env bash
# The GPU benchmarks in one go, for a lent GPU machine (run from the repository root, ~8 minutes).
#
# That machine has torch, torchvision, transformers, torch_geometric, h5py and click, no network,
# and lacks open_clip_torch, dask and distributed. Before sending the tree there, put their wheels in
# bench/wheels/ (ignored by git):
#   pip download --no-deps -d bench/wheels open_clip_torch ftfy wcwidth timm dask distributed \
#       cloudpickle toolz partd locket fsspec zict tblib sortedcontainers msgpack psutil tornado
# and carry that folder with the command.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d bench/wheels ]; then
  pip install --quiet --no-index --find-links bench/wheels open_clip_torch dask distributed
fi
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python bench/fuse.py --scale 1 --device cuda --steps 50 --backbone-batch 64 --out bench/results/fuse-gpu.json
python bench/extract.py --full --device cuda --precision bf16 --images 2048 --batch-size 128 --workers 14 \
  --out bench/results/extract-gpu.json
python bench/score.py --repeats 5

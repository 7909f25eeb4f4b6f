#!/usr/bin/env bash
# The stage benchmarks and the attention layer on a lent GPU machine in one go (about 8-11 minutes): run from the repository root,
#   bash bench/gpu.sh
# That machine has torch, torchvision, transformers, torch_geometric, h5py and click, no network, and
# lacks open_clip_torch, dask and distributed. Prepare their wheels here first (bench/wheels/ is git-ignored,
# so carry it: run(command="bash bench/gpu.sh", carry=["bench/wheels"])):
#   pip download --no-deps -d bench/wheels open_clip_torch==3.3.0 timm==1.0.31 ftfy==6.3.1 wcwidth \
#       dask==2026.8.0 distributed==2026.8.0 cloudpickle fsspec partd locket toolz importlib_metadata zipp \
#       msgpack psutil sortedcontainers tblib tornado zict
# (open_clip also needs huggingface_hub, regex, safetensors, tqdm, torchvision, which transformers/torch bring.
# If that machine's Python differs from this one's, add --only-binary=:all: --platform manylinux2014_x86_64
# --python-version X.Y: msgpack ships per-version wheels.) Results go to $OUT when set, else bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
out="${OUT:-bench/results}"
mkdir -p "$out"
start=$SECONDS

if [ -d bench/wheels ]; then
  python -m pip install --quiet --no-index --find-links bench/wheels open_clip_torch dask distributed \
    || python -m pip install --quiet --no-index --find-links bench/wheels open_clip_torch dask \
    || echo "WARNING: installing from bench/wheels failed"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import os, sys, torch; print('nproc', os.cpu_count(), 'python', sys.version.split()[0], 'torch', torch.__version__, 'loadavg', os.getloadavg())"
have_clip=1
python -c "import open_clip, dask" 2>/dev/null || { have_clip=0; echo "WARNING: open_clip or dask missing: no backbone timings, no extraction bench"; }

run() {  # name, timeout, command...: stdout to the terminal, stderr to a log shown only on failure
  local name=$1 limit=$2; shift 2
  echo "== $name ($(( SECONDS - start )) s in)"
  timeout "$limit" "$@" 2>"$out/$name.stderr.log"
  local rc=$?
  [ $rc -eq 0 ] || { echo "!! $name exited $rc; last stderr lines:"; tail -n 15 "$out/$name.stderr.log"; }
}

# Stage two at full Flickr30k scale (~29 GiB of float16 features in GPU memory, as training places them), bf16:
# the training step against its dense-layer floor at batch 128 and at the reference's 40 (per-step overhead shows).
run fuse128 240 python bench/fuse.py --scale 1.0 --device cuda --precision bf16 --batch-size 128 --warmup 5 \
  --steps 40 --backbone-batch $(( have_clip ? 64 : 0 )) --backbone-reps 3 --out "$out/fuse-gpu-b128.json"
run fuse40 200 python bench/fuse.py --scale 1.0 --device cuda --precision bf16 --batch-size 40 --warmup 5 \
  --steps 60 --out "$out/fuse-gpu-b40.json"
# COCO-shaped train split: half of its images in GPU memory (~50 GiB; the whole 100 GiB fits an H200 only),
# and on the host (what a streamed split costs: every batch copied to the GPU). s/epoch extrapolated to 566,747 pairs.
run coco-resident 240 python bench/fuse.py --shape coco --scale 0.5 --device cuda --precision bf16 \
  --batch-size 128 --warmup 5 --steps 30 --no-floor --out "$out/fuse-gpu-coco.json"
run coco-host 240 python bench/fuse.py --shape coco --scale 0.1 --features host --device cuda --precision bf16 \
  --batch-size 128 --warmup 5 --steps 30 --no-floor --out "$out/fuse-gpu-coco-host.json"

# Stage one with the full-size architectures: 2048 JPEGs (10,240 captions), 12 decoding workers.
if [ $have_clip -eq 1 ]; then
  run extract 300 python bench/extract.py --full --device cuda --precision bf16 --images 2048 \
    --batch-size 128 --workers 12 --repeats 2 --out "$out/extract-gpu.json"
fi
# The star GATv2 layer against PyG and its matmul floor, at batch 128 (compiles Triton kernels).
run attention 300 python bench/attention.py --device cuda --cases image128 caption128 --repeats 5 \
  --pyg-max-gib 60 --out "$out/attention-gpu.json"
echo "== done in $(( SECONDS - start )) s; JSON in $out"

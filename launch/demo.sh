#!/usr/bin/env bash
# The main job on CPU, from the repository root with the project installed (`make demo`):
#   1. tokenize Python's own standard-library sources (top-level modules, ~4.7 MB) with longnet-prep,
#   2. pack them into sequences of 256+1 tokens (train / valid split),
#   3. train the `tiny` LongNet for 300 steps (configs/tiny_cpu.yaml), loss printed every 20 steps,
#      validation every 100, checkpoints under runs/demo/run/checkpoints,
#   4. export the last checkpoint to a Hugging Face-style folder (runs/demo/tiny-hf) and sample from it.
#
#   launch/demo.sh [section.field=value ...]      e.g. launch/demo.sh train.steps=600
#
# Environment: PYTHON (default: python), DEMO_DIR (default: runs/demo).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python}"
demo_dir="${DEMO_DIR:-runs/demo}"
data="$demo_dir/data"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

if command -v longnet-prep >/dev/null 2>&1; then
    prep=(longnet-prep)
    convert=(longnet-convert)
else
    prep=("$python" -m data_prep)
    convert=("$python" -m longnet_megatron.export.cli)
fi

start=$SECONDS
stdlib="$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"
mkdir -p "$data"
echo "== 1/4 tokenize the standard library at $stdlib (top-level *.py, byte-level tokenizer)"
"${prep[@]}" tokenize "$stdlib"/*.py -o "$data/stdlib" --tokenizer bytes --overwrite --quiet
echo "== 2/4 pack into sequences of L=256 (+1) tokens"
"${prep[@]}" pack "$data/stdlib" -o "$data/packed" --seq-length 256 --split 98,2,0 --overwrite --quiet

echo "== 3/4 train the tiny LongNet on CPU"
rm -rf "$demo_dir/run"   # a demo starts fresh (a real run resumes from its checkpoints)
"$python" -m longnet_megatron.train configs/tiny_cpu.yaml \
    "data.prefixes=[$data/packed]" "run.dir=$demo_dir/run" "$@"

"$python" - "$demo_dir/run/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in rows if r["kind"] == "train"]
valid = [r for r in rows if r["kind"] == "valid"]
print(f"loss: step {train[0]['step']} {train[0]['loss']:.3f} -> step {train[-1]['step']} {train[-1]['loss']:.3f}"
      + (f"; validation {valid[-1]['loss']:.3f} (perplexity {valid[-1]['ppl']:.1f})" if valid else ""))
PY
echo "checkpoints in $demo_dir/run/checkpoints: latest $(cat "$demo_dir/run/checkpoints/latest")"

echo "== 4/4 export to $demo_dir/tiny-hf and sample from it"
rm -rf "$demo_dir/tiny-hf"
"${convert[@]}" to-hf "$demo_dir/run" "$demo_dir/tiny-hf"
"${convert[@]}" sample "$demo_dir/tiny-hf" --prompt 'def ' --max-new-tokens 80 --temperature 0.8 --top-p 0.9 --seed 0
echo "demo finished in $((SECONDS - start)) s"

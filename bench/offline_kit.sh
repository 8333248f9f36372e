#!/usr/bin/env bash
# The benchmarks on a GPU machine that reaches no package index (a cluster node, a lent GPU): pack a
# kit where there is an index, carry it there beside the project, run the benchmarks with it there.
#
#   bash bench/offline_kit.sh pack [PYTHON_VERSION]   # here: .gpukit/, about 30 MB: wheels for that
#                                                     # machine's Python (default 3.12) and the tokenizer
#   bash bench/offline_kit.sh run SCRIPT [ARGS...]    # there: SCRIPT run with the kit's packages
#   e.g. bash bench/offline_kit.sh run bench/gpu_train.py --tokenizer .gpukit/tokenizer --profile --lever compile=true
#        bash bench/offline_kit.sh run bench/generation_speed.py --shape 1.7b --tokenizer .gpukit/tokenizer
#
# There, torch (its CUDA build) and what comes with it (numpy and the like) must be installed: the kit
# brings what a GPU image usually lacks, at the versions this project pins (transformers, datasets,
# accelerate, peft, gguf, trl, liger-kernel and their small helpers), not torch, which is gigabytes
# and tied to the CUDA there. Wheels for Linux x86_64; `run` installs them once, into .gpukit/site.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${KIT:-.gpukit}  # where the kit is packed and read (a path from the project's root, or absolute)
PINNED="transformers datasets accelerate peft gguf trl"  # pinned in requirements.txt or bench/requirements.txt
HELPERS="tokenizers safetensors huggingface-hub hf-xet dill multiprocess fsspec xxhash"  # at the versions .venv resolved
LIGER="liger-kernel==0.8.5"  # Triton kernels, CUDA only: not in requirements.txt
PYTHON=${PYTHON:-python3}  # there: the Python that has torch

fail() { echo "offline_kit: $*" >&2; exit 2; }

pack() {
  local python_version=${1:-3.12} specs=() name version
  [ -x .venv/bin/python ] || fail "no .venv here: run 'make install' first"
  for name in $PINNED; do
    version=$(sed -n "s/^$name==\([^ ]*\).*/\1/p" requirements.txt bench/requirements.txt | head -1)
    specs+=("$name==$version")
  done
  for name in $HELPERS; do
    version=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) \
      || fail "$name is not in .venv: run 'make install' first"
    specs+=("$name==$version")
  done
  rm -rf "$KIT.partial" && mkdir -p "$KIT.partial/wheels"  # a kit is whole or absent
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$KIT.partial/wheels" "${specs[@]}" "$LIGER"
  .venv/bin/python -c "import sys, finetune; finetune.load_tokenizer(finetune.resolve_base(finetune.SMOLLM2_ALIAS)).save_pretrained(sys.argv[1])" \
    "$KIT.partial/tokenizer" > /dev/null
  rm -rf "$KIT" && mv "$KIT.partial" "$KIT"
  echo "$KIT: $(ls "$KIT/wheels" | wc -l) wheels for Python $python_version and SmolLM2's tokenizer, $(du -sh "$KIT" | cut -f1)"
}

run() {
  [ $# -ge 1 ] || fail "run takes a script, e.g. bench/gpu_train.py"
  [ -d "$KIT/wheels" ] || fail "no $KIT/wheels here: run 'bash bench/offline_kit.sh pack' where there is a package index, and carry $KIT"
  local site
  site="$(cd "$KIT" && pwd)/site"
  if [ ! -f "$site/.installed" ]; then
    rm -rf "$site"
    # --no-compile: pip's bytecode for every module took 20 of the install's 26 s on a 2-core CPU; Python
    # compiles the modules a script imports as it first imports them
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$KIT"/wheels/*.whl
    touch "$site/.installed"
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  "$PYTHON" -c "import torch, numpy" 2>/dev/null || fail "$PYTHON has no torch or numpy: the kit brings neither (PYTHON=... names another)"
  "$PYTHON" "$@"
}

case "${1:-}" in
  pack) shift; pack "$@" ;;
  run) shift; run "$@" ;;
  *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

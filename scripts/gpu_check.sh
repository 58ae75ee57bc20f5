#!/usr/bin/env bash
# The GPU proof in one command (benchmarks/gpu_check.py says what it runs); a markdown table in OUT/gpu_check.md.
#
#   scripts/gpu_check.sh --fetch-wheels          # once, where PyPI is reachable: the packages a bare GPU image
#                                                # may lack (bitsandbytes, jsonargparse and its helpers) into .whl/
#   scripts/gpu_check.sh --out OUT               # on the CUDA machine (no network needed): ~6 minutes (estimated)
#   scripts/gpu_check.sh --dry-run --out OUT     # the same stages on CPU with tiny models (CI runs it)
#
# Wheels found in .whl/ are installed into a private folder first when their packages are missing.
# Other options pass through to benchmarks/gpu_check.py (--budget SECONDS, --stages a,b,c).
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi

# Packages the GPU image lacks, at the versions installed here (what the tests ran with).
WHEELS=(bitsandbytes jsonargparse docstring_parser typeshed_client)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    pins=()
    for name in "${WHEELS[@]}"; do
        pins+=("$name==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
    done
    # CPython 3.12 on x86-64 Linux, what the GPU image runs
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
    du -sh .whl
    exit 0
fi

missing=$("$PY" - <<'PY'
import importlib.util
print(" ".join(n for n in ("bitsandbytes", "jsonargparse", "docstring_parser", "typeshed_client")
               if importlib.util.find_spec(n) is None))
PY
)
if [[ -n "$missing" ]]; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "gpu_check: installing $missing from .whl/" >&2
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site .whl/*.whl
        export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu_check: missing $missing; run scripts/gpu_check.sh --fetch-wheels where PyPI is reachable" >&2
    fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_check.py "$@"

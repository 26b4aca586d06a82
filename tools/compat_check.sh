#!/usr/bin/env bash
# Compatibility check against the newest TensorFlow and Keras (not part of CI).
#
#   bash tools/compat_check.sh                  # a fresh venv under /tmp
#   bash tools/compat_check.sh /tmp/venv221     # an existing venv (no upgrade)
#   COMPAT_TF="tensorflow==2.21.0" COMPAT_KERAS="keras==3.15.1" \
#       bash tools/compat_check.sh              # given versions, fresh venv
#
# It installs TensorFlow and Keras (newest unless COMPAT_TF / COMPAT_KERAS say
# otherwise) and the package's other dependencies into the venv, then this
# checkout with `pip install --no-deps -e .` (so setup.py's upper pins do not
# stop a newer TensorFlow from being tried), and runs a fast subset of the
# tests: the ones that lean most on Keras' and TensorFlow's private
# internals (the _compat layer, the optimizers, the fast engine, the rule
# registry, the config). About 3-5 minutes on 2 cores. It prints the
# versions, pytest's summary and the seconds taken; the exit code is
# pytest's. Raise setup.py's TensorFlow pin only after this passes.
#
# An existing venv (first argument or $COMPAT_VENV) is used as it is: only
# this checkout is installed into it (--no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${COMPAT_VENV:-}}"
TF_SPEC="${COMPAT_TF:-tensorflow}"
KERAS_SPEC="${COMPAT_KERAS:-keras}"
# The package's other dependencies (keep in step with setup.py) and the
# test extras.
OTHER_DEPS=(
  "dp-accounting>=0.6" "gin-config>=0.5" "absl-py>=2.0"
  "tensorflow-datasets>=4.9.10" importlib_resources numpy "scipy>=1.11"
  "pytest>=8" matplotlib "hypothesis>=6.100"
)
TESTS=(
  tests/layering_test.py
  tests/config_test.py
  tests/optimizers_test.py
  tests/engines/fast_test.py
  tests/rules/registry_test.py
)

if [ -z "$VENV" ]; then
  VENV="$(mktemp -d /tmp/keras_dpscale_compat.XXXXXX)"
  echo "creating a fresh venv in $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
  "$VENV/bin/python" -m pip install --quiet --upgrade \
    "$TF_SPEC" "$KERAS_SPEC" "${OTHER_DEPS[@]}"
elif [ ! -x "$VENV/bin/python" ]; then
  echo "compat_check: $VENV is not a venv (no bin/python)" >&2
  exit 2
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --no-deps --no-build-isolation -e .
"$PY" - <<'EOF'
import sys
from importlib import metadata
versions = {p: metadata.version(p) for p in
            ("tensorflow", "keras", "tensorflow-datasets", "dp-accounting",
             "numpy")}
print(f"compat_check: python {sys.version.split()[0]}, " +
      ", ".join(f"{p} {v}" for p, v in versions.items()))
EOF
start=$(date +%s)
rc=0
TF_CPP_MIN_LOG_LEVEL=3 "$PY" -m pytest -q -p no:cacheprovider --durations=5 "${TESTS[@]}" \
  || rc=$?
echo "compat_check: pytest exit code $rc in $(( $(date +%s) - start )) s" \
  "(${TESTS[*]})"
exit "$rc"

#!/usr/bin/env bash
# Regenerate the locks with hashes (Python 3.11, every platform's wheels):
#   requirements.lock        the runtime dependencies of pyproject.toml (the image, `pip install`)
#   requirements-build.lock  pip, setuptools and wheel for the image's builder stage
#   requirements-dev.lock    the dev and embedded extras (./dev setup), on the two locks above
# Existing pins are kept; `ci/lock.sh --upgrade` (or --upgrade-package NAME) moves them.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=${CONVSYNC_LOCK_TOOLS:-/var/tmp/convsync-lock-tools}
PY=${PYTHON:-python3.11}
if [ ! -x "$TOOLS/bin/pip-compile" ]; then
  "$PY" -m venv "$TOOLS"
  "$TOOLS/bin/pip" install -q 'pip-tools>=7.4,<8'
fi
# PyPI only: no local wheel folders or extra indexes of this machine leak into the locks.
export PIP_CONFIG_FILE=/dev/null CUSTOM_COMPILE_COMMAND="ci/lock.sh"
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL
compile=("$TOOLS/bin/pip-compile" -q --generate-hashes --strip-extras --allow-unsafe
         --no-emit-index-url --no-emit-find-links "$@")
"${compile[@]}" -o requirements.lock pyproject.toml
"${compile[@]}" -o requirements-build.lock requirements-build.in
"${compile[@]}" --extra dev --extra embedded -c requirements.lock -c requirements-build.lock \
  -o requirements-dev.lock pyproject.toml

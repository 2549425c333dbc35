#!/usr/bin/env bash
# Fills .whl with the packages the GPU machine lacks (Python 3.12, no network there): the server's,
# the tests', structured output's and their dependencies that its image does not hold. Carry .whl to a
# device call and install with
#   python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform any -d .whl \
  fastapi starlette uvicorn h11 anyio sniffio click annotated-doc opentelemetry-api \
  pydantic pydantic_core annotated-types typing_extensions typing-inspection \
  pyzmq msgspec prometheus_client xgrammar apache-tvm-ffi ninja tiktoken \
  pytest pluggy iniconfig execnet pytest-xdist \
  openai distro jiter httpx httpcore httpx2 httpcore2 truststore certifi idna \
  compressed-tensors loguru psutil importlib-metadata zipp
# An earlier fill may hold an older version of a package: pip refuses two versions of one package
# together, so keep each package's newest wheel only.
python3 - <<'PY'
import collections, os
from packaging.utils import parse_wheel_filename
newest = collections.defaultdict(list)
for name in os.listdir(".whl"):
    if name.endswith(".whl"):
        project, version, *_ = parse_wheel_filename(name)
        newest[project].append((version, name))
for wheels in newest.values():
    for _, name in sorted(wheels)[:-1]:
        os.remove(os.path.join(".whl", name))
PY
ls .whl | wc -l

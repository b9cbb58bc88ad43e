#!/usr/bin/env bash
# Wheels the GPU bench machine needs on top of its own torch/torchaudio/numpy (it has no network): ds_train's
# pinned runtime minus torch, built under .whl/ (git-ignored) from PyPI only, checked to stay under 60 MiB.
# The lists cover every module ds_train, the audio tokenizer (Boson's descript-audio-codec stack) and librosa import
# that the device image lacks (its package list: the device notes, KINDS.md); scripts/gpu_check.sh installs them.
#   scripts/gpu_wheels.sh [PYTHON_VERSION]     default 3.12 (cp312 manylinux wheels for the compiled ones)
# Then on the device, from the repo root:
#   pip install --no-index --no-deps .whl/*.whl && pip install --no-deps --no-build-isolation -e .
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
PYVER="${1:-3.12}"
OUT="$ROOT/.whl"
LIMIT_MIB=60
rm -rf "$OUT"; mkdir -p "$OUT"

# Compiled wheels for the device's Python (manylinux x86_64), no dependencies pulled in.
BINARY=(tokenizers==0.20.3 safetensors==0.8.0 regex==2026.11.15 pydantic-core==2.50.4 msgpack==1.2.4
        soundfile==0.14.0 cffi==2.1.1 soxr==1.1.0 frozendict==2.5.1)
# Pure-Python wheels, exact pins where ds_train pins them.
# (the versions of the project's .venv, where the suite passes)
PURE=(transformers==4.46.3 huggingface-hub==0.36.2 peft==0.17.1 accelerate==1.1.1 boson-multimodal==0.1.1
      omegaconf==2.4.0 dacite==1.9.2 loguru==0.7.3 hjson==3.1.0 py-cpuinfo==9.0.0 einops==0.8.2 pydantic==2.14.3
      annotated-types==0.8.0 typing-inspection==0.4.5 pyloudnorm==0.2.0 librosa==0.11.0 lazy-loader==0.6
      audioread==3.1.0
      descript-audio-codec==1.0.0 descript-audiotools==0.7.2 docstring-parser==0.18.0
      vector-quantize-pytorch==1.32.0 einx==0.4.3 torch-einops-utils==0.2.0 julius==0.2.8 ffmpy==1.0.0
      flatten-dict==0.5.0 fire==0.7.1 termcolor==3.3.0 importlib-resources==7.1.0
      boto3==1.35.36 botocore==1.35.93 jmespath==1.1.0 s3transfer==0.10.4 pycparser==3.12 decorator==5.3.1
      pooch==1.9.0 platformdirs==4.14.9
      wheel==0.45.1)  # pip install -e . with an older setuptools (< 70.1) needs it

"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --implementation cp -d "$OUT" "${BINARY[@]}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$OUT" "${PURE[@]}"
# DeepSpeed ships an sdist only: build it as a pure-Python wheel (ops JIT-build on the device when used). So do
# argbind and randomname (descript-audiotools' imports).
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$OUT" deepspeed==0.19.8 argbind==0.3.9 \
  randomname==0.2.1

size_kib=$(du -sk "$OUT" | cut -f1)
ls -1 "$OUT"
echo "total: $(( size_kib / 1024 )) MiB in $(ls "$OUT" | wc -l) wheels ($OUT)"
if (( size_kib > LIMIT_MIB * 1024 )); then
  echo "gpu_wheels.sh: $(( size_kib / 1024 )) MiB is over the ${LIMIT_MIB} MiB limit" >&2
  exit 1
fi
echo "on the device: pip install --no-index --no-deps .whl/*.whl && pip install --no-deps --no-build-isolation -e ."

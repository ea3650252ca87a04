#!/usr/bin/env bash
# Idempotent setup behind `make run` and `make test`: system packages, then .venv.
# Re-running it on a set-up machine only checks (dpkg -s, a stamp file) and returns quickly.
# apt and pip say a lot: their output goes to .bootstrap.log, and only a summary (or, on a
# failure, the end of the log) to the terminal.
set -euo pipefail
cd "$(dirname "$0")/.."

LOG=.bootstrap.log
say() { echo "ksm-harness: $*"; }

# Run a step quietly; on failure show the end of the log and where the rest is.
quietly() {
  local what=$1
  shift
  echo "== $what: $*" >>"$LOG"
  if ! "$@" >>"$LOG" 2>&1; then
    say "$what failed; the last lines of $LOG:" >&2
    tail -n 20 "$LOG" >&2
    exit 1
  fi
}

# Debian packages the harness drives for real (see DESIGN.md "Facts about the machines").
# linux-image-amd64 is the guests' default kernel (6.1 on bookworm); linux-image-6.12-amd64
# is the second kernel of the kernel matrix (`ksmh kernels check`, tests/integration/
# test_kernel_matrix.py). Installing it does not change the default guest kernel. zstd unpacks
# 6.12's kernel into the vmlinux guests boot faster (harness/guests/vmlinux.py).
PACKAGES=(
  qemu-system-x86 qemu-utils busybox-static linux-image-amd64 linux-image-6.12-amd64 kmod cpio
  zstd
  libvirt-daemon-system libvirt-dev pkg-config gcc libc6-dev
  python3 python3-dev python3-venv openssh-server prometheus prometheus-pushgateway
  mmdebstrap e2fsprogs
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    say "missing system packages: ${missing[*]}" >&2
    echo "  install them with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  say "installing ${#missing[@]} system packages (${missing[*]}); log in $LOG"
  export DEBIAN_FRONTEND=noninteractive
  quietly "apt-get update" apt-get update -q
  quietly "apt-get install" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The venv's interpreter must be one every user can run: on Debian the system python3 (a
# pyenv shim under /root, say, is unreadable for other users). PYTHON overrides it.
PY=${PYTHON:-}
if [[ -z $PY ]]; then
  if [[ -x /usr/bin/python3 ]]; then PY=/usr/bin/python3; else PY=python3; fi
fi
if [[ -x .venv/bin/python ]] && ! .venv/bin/python -c 'import sys' >/dev/null 2>&1; then
  say ".venv is broken (its interpreter does not start): recreating it"
  rm -rf .venv
fi
if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv with $("$PY" --version 2>&1) ($PY)"
  quietly "venv" "$PY" -m venv .venv
fi
# Reinstall only when a dependency declaration changed since the last install.
stamp=.venv/.stamp-install
if [[ ! -f $stamp || pyproject.toml -nt $stamp || kernel-model/pyproject.toml -nt $stamp ||
      constraints.txt -nt $stamp ]]; then
  say "installing the pinned Python dependencies into .venv (a few minutes the first time); log in $LOG"
  quietly "pip upgrade" .venv/bin/python -m pip install -q --upgrade pip
  # constraints.txt pins the transitive dependencies too, so every machine gets one tree.
  quietly "pip install" .venv/bin/python -m pip install -c constraints.txt -e ./kernel-model -e '.[dev]'
  touch "$stamp"
  say "ready: $(.venv/bin/ksmh --version)"
fi

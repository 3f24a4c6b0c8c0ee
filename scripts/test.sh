#!/usr/bin/env bash
# Set up ./.venv from scratch if needed (the versions of constraints.txt), then run the whole test
# suite on the CPU, one pytest-xdist worker per core (FASTDPO_TEST_WORKERS=N for another count; 0:
# none).  Extra arguments go to pytest.  The bench extra too: the CLI tests run the suite (Liger,
# matplotlib); hf: the Hugging Face tests; report: tensorboard and wandb for tests/test_report.py;
# trl: tests/test_trl_trainer.py (fastdpo.trl).
source "$(dirname "$0")/_venv.sh" test,bench,hf,report,trl
exec "$VENV/bin/python" -m pytest -n "${FASTDPO_TEST_WORKERS:-auto}" --dist loadfile "$@"

"""Test configuration.

With no CUDA device, Triton kernels run on CPU tensors under the interpreter; triton decides
interpreted vs compiled when a kernel is decorated, so the variable must be set before
anything imports fastdpo.kernels.

The tests' tensors are small, so ``sequence_logprobs`` would take its small-input path
(plain autograd ops, ``fastdpo.scoring.logits_op.SMALL_ELEMENTS``) nearly everywhere: the tests turn it
off, so that they exercise the main path (the boxes, the custom op, the kernels), and
tests/test_small_path.py checks the small path on its own against the same contract.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (scripts/test.sh runs one worker per core) the workers share the cores:
# each takes its share of torch's threads, so two workers of two OpenMP threads each do not spin
# against each other on a 2-core machine.  Tests that need a thread count set it themselves.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


@pytest.fixture(autouse=True)
def _main_path_only(request, monkeypatch):
    if request.node.get_closest_marker("small_path") is None:
        import fastdpo.scoring.logits_op

        monkeypatch.setattr(fastdpo.scoring.logits_op, "SMALL_ELEMENTS", 0)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "small_path: keep sequence_logprobs' small-input path on")

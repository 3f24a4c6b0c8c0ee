"""Test configuration.

With no CUDA device, Triton kernels run on CPU tensors under the interpreter; triton decides
interpreted vs compiled when a kernel is decorated, so the variable must be set before
anything imports fastdpo.kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

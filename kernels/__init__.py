"""Triton kernels of fastdpo (installed as ``fastdpo.kernels``)."""

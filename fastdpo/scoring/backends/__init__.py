"""Where the elementwise work of scoring runs, one module per place.

* :mod:`.torch_fold` -- pure torch (ATen, an inductor-compiled score): any device;
* :mod:`.native` -- the C++ row fold (``cpu_fold.cpp``), built for the host at first use:
  float32 CPU rows.

The Triton kernels are :mod:`fastdpo.kernels` (the top-level ``kernels/`` folder).  May import:
:mod:`fastdpo._checks` and each other only.
"""

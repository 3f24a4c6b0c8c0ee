"""Where the elementwise work of scoring runs (the log-softmax of each logits row, its target's
log-prob, the gradient), one module per place:

* :mod:`.torch_fold` -- pure torch (ATen's softmax over cache-sized boxes, an inductor-compiled
  score): any device; and :class:`~.torch_fold.TorchFold`, the fused head's fold on float32;
* :mod:`.native` -- the C++ row fold (``cpu_fold.cpp``), built for the host at first use:
  float32 CPU rows, called by the torch fold where it serves;
* :mod:`.triton_fold` -- the Triton kernels (:mod:`fastdpo.kernels`, the top-level ``kernels/``
  folder), loaded on first use, and :class:`~.triton_fold.TritonFold`.

May import: :mod:`fastdpo.kernels` and each other only.
"""

"""Per-sequence log-probabilities from a model's hidden states or logits: the routes and the ops.

* :mod:`.router` -- which route a model takes (:class:`~.router.Scorer`), its body, its sums;
* :mod:`.dpo_head_op` -- the DPO step's head in one op: the reference's scores, the policy's
  loss and head gradients;
* :mod:`.linear_op` -- ``linear_sequence_logprobs``: scores from hidden states and head weight;
* :mod:`.logits_op` -- ``sequence_logprobs``: scores from logits;
* :mod:`.rows` -- counted rows, chunked head products, buffers: what the fused ops share;
* :mod:`.cost_model` -- who multiplies on CUDA (the fused head's two routes, the rule between them);
* :mod:`.options` -- the options every module takes on how the scores are computed;
* :mod:`.backends` -- one fold per place the elementwise work runs: torch, the C++ fold, and
  the Triton kernels (the top-level ``kernels/``, installed as :mod:`fastdpo.kernels`).

May import: :mod:`fastdpo._checks`, :mod:`fastdpo._options`, :mod:`fastdpo.kernels`, :mod:`fastdpo.losses` (the DPO head
computes the loss), :mod:`fastdpo.batching`, :mod:`fastdpo.models`; never :mod:`fastdpo.modules`
(tests/test_architecture.py holds it to that).
"""

"""``fastdpo train``: DPO on a Hugging Face causal LM, from preference records to a saved model.

* :mod:`.config` -- :class:`~.config.TrainConfig` (one field per option) and its checks;
* :mod:`.command` -- the command line: the options, the config they make, the command;
* :mod:`.run` -- the run (:class:`~.run.Run`, :func:`~.run.train`);
* :mod:`.processes` -- one process, or those torchrun starts;
* :mod:`.io` -- what a run reads and writes (models, records, checkpoints, metrics);
* :mod:`.fsdp` -- ``--fsdp``: the models built empty, sharded with FSDP2, read shard by shard;
* :mod:`.sharded_checkpoint` -- ``--fsdp``'s checkpoints (``torch.distributed.checkpoint``);
* :mod:`.export` -- ``save_pretrained`` directories from sharded states, ``fastdpo export``;
* :mod:`.report` -- ``--report-to``: the metrics rows sent to TensorBoard, W&B, Trackio.

May import anything below it: :mod:`fastdpo.modules`, :mod:`fastdpo.data`, :mod:`fastdpo.models`,
:mod:`fastdpo.losses` (tests/test_architecture.py holds it to that).
"""

from .config import TrainConfig
from .run import train

__all__ = ["TrainConfig", "train"]

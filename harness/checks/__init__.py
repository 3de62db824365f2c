"""The comparisons the harness trusts, one module per kind of evidence.

* ``tensors``: key sets, shapes, dtypes and bitwise values of exported weights; the tie;
  per-tensor digests for golden/;
* ``logits``: forward-pass parity, with tolerances justified by measured noise floors;
* ``generation``: greedy decoding of the exported checkpoint, reloaded from disk;
* ``coverage``: every Megatron parameter was written by the load (NaN sentinel);
* ``fsdp_layout``: what an fsdp_dtensor checkpoint must hold on disk, from the model config;
* ``key_contract``: the fsdp_dtensor SwiGLU/GDN handlers resolve every key to its own parameter;
* ``checkpoint_diff``: ``harness diff``, two checkpoints tensor by tensor in bounded memory.

Every check returns a ``harness.results.CheckResult``; each is shown failing on a seeded fault in
tests/. Importing this package does not import torch (``harness diff`` on HF pairs stays light).
"""

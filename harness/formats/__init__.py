"""Checkpoints on disk: HF safetensors, torch_dist and fsdp_dtensor.

* ``base``: the ``Checkpoint`` protocol and the safe-read helpers the readers share (bad input is
  reported with ``harness.errors.InputError``: one actionable line);
* ``hf``, ``dcp``, ``megatron``: readers that yield ``(key, tensor)`` one tensor at a time, so two
  checkpoints of any size compare in bounded memory;
* ``megatron_keys``: the Megatron key grammar (canonical keys, torch_dist stacking, fsdp_dtensor
  splits), both directions;
* ``fsdp_writer``: writes fsdp_dtensor-convention checkpoints on CPU (test fixtures);
* ``detect``: recognise a folder and open the right reader.
"""

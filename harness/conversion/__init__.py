"""What a case does to a model: real Megatron-Bridge / Megatron-Core calls, in order.

* ``bridge_calls``: one function per bridge step (build, sentinel fill, load, export, torch_dist);
* ``megatron_fsdp``: the Megatron-FSDP steps (build, fsdp_dtensor save, audit, strict reload);
* ``forward``: comparable logits from HF and from Megatron (all pipeline stages, TP gathered);
* ``routes``: one route per case path, composing the steps and the checks;
* ``case_executor``: runs one case inside a rank and packages its ``CaseResult``;
* ``zoo_audit``: does the zoo exercise every config mapping of the bridge (tests only).
"""

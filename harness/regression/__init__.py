"""Catching regressions: seeded faults, the self-test, golden expectations, the gate, bisect.

* ``faults``: realistic regressions injected at run time (patches of Megatron-Bridge / -Core
  functions, always restored);
* ``selftest``: does each check catch the regression it exists for;
* ``golden``: pinned expectations per case and lane (``golden/<lane>/``);
* ``gate``: a candidate Megatron tree against golden/ and a baseline, one verdict per case;
* ``root_causes``: the gate's regressions grouped by signature, one row per cause;
* ``bisect``: the first Megatron-LM commit that breaks a case.
"""

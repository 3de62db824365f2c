"""Running cases: process groups, the run folder, and the one service that runs a selection.

* ``run_service``: run a selection of cases into a new run folder (the CLI, gate, bisect, selftest
  and the pytest plugin all call it);
* ``rank_launcher``: one process group of ranks per world size, timeouts and dead ranks handled
  from outside;
* ``rank_worker``: the rank entry point (imports the stack, runs the plan's cases);
* ``run_dir``: the run folder's layout and the typed records that cross the process boundary;
* ``provenance``: what a run really tested; ``source_trees``: Megatron source checkouts.

No torch import here: ranks import it, the launcher never does.
"""

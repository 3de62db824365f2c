"""What to run: the case matrix as data.

* ``cases``: ``cases/*.yaml`` expanded to ``Case`` objects with stable IDs;
* ``layouts``: parallel layouts (TP/PP/VPP/EP/ETP/CP/DP), their canonical names and rules;
* ``zoo``: tiny, seeded HF checkpoints per model family, and the model facts (``ModelSpec``);
* ``tokenizer``: local tokenizers for them;
* ``lanes``: every rule that says a case (or one of its checks) cannot run on a lane, and why,
  what each lane does not test, and how GPU ranks are placed (``Placement``);
* ``hf_reference``: HF models built on transformers' pure-torch paths (the zoo's and the
  comparisons' reference).

No torch import at module level (the CLI lists cases with it).
"""

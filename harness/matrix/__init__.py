"""What to run: the case matrix as data.

* ``cases``: ``cases/*.yaml`` expanded to ``Case`` objects with stable IDs;
* ``layouts``: parallel layouts (TP/PP/VPP/EP/ETP/CP/DP), their canonical names and rules;
* ``family_registry``: the model families (one per text LM of the Bridge, ``families.yaml``);
* ``model_spec``: what a model is (``ModelSpec``) and the facts read off its HF config;
* ``checkpoint_builder``: tiny, seeded HF checkpoints (the zoo) and their on-disk cache;
* ``tokenizer``: local tokenizers for them;
* ``lanes``: every rule that says a case (or one of its checks) cannot run on a lane, and why,
  what each lane does not test, and how GPU ranks are placed (``Placement``);
* ``hf_reference``: HF models built on transformers' pure-torch paths (the zoo's and the
  comparisons' reference).

No torch import at module level (the CLI lists cases with it).
"""

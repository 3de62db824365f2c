"""What to run: the case matrix as data.

* ``cases``: ``cases/*.yaml`` expanded to ``Case`` objects with stable IDs;
* ``layouts``: parallel layouts (TP/PP/VPP/EP/ETP/CP/DP), their canonical names and rules;
* ``zoo``: tiny, seeded HF checkpoints per model family, and the model facts (``ModelSpec``);
* ``tokenizer``: local tokenizers for them.

No torch import at module level (the CLI lists cases with it).
"""

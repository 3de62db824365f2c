"""Loads the harness's pytest plugin from the repository root (``pytest -m gpu``, ``pytest -m cpu
-k llama/tp1/memory``), also where the package is not installed. An installed harness registers the
same module through its ``pytest11`` entry point under the same name, so it is loaded once."""

pytest_plugins = ["harness.pytest_plugin"]

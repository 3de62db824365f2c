"""The one error type for bad input (a path, a case file, a case ID, a source tree), and the one
reader of the harness's YAML data files, whose syntax errors must be that kind of one line.

``str(err)`` is one line that says what is wrong and what to do; the CLI prints it and exits 2
(``--debug`` adds the traceback). Anything else that escapes is a bug of the harness.
"""


class InputError(Exception):
    """Unusable input. ``str(err)`` is one line that says what is wrong and what to do."""


def yaml_error_line(source: str, err: Exception) -> str:
    """``file:line:column: not valid YAML: what is wrong`` (PyYAML's own message spans 5 lines)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    what = " ".join(filter(None, [getattr(err, "problem", None), getattr(err, "context", None)])) or str(err)
    return f"{where}: not valid YAML: {' '.join(what.split())}"


def load_yaml(path, source: str | None = None, error: type[InputError] = InputError):
    """A YAML data file's document; a syntax error is ``error`` with one line naming file, line and column."""
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise error(yaml_error_line(source or str(path), err)) from None

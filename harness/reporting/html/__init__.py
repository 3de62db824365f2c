"""The HTML pages people open in the morning: ``<run>/index.html`` and ``<reports>/history.html``.

One static file each: no server, no network, no script, no external asset, so it works as a CI
artifact opened from disk and renders with JavaScript off (drill-down is anchors + ``<details>``).

Data flows one way: results -> a small typed model built by pure functions tests can check ->
Jinja2 templates (``harness/reporting/templates``, autoescaped). No torch import.

- ``looks``: how an outcome shows (status, gate verdict, known failure pinned in golden/), on both pages;
- ``rendering``: what both pages share to render: file names, case anchors, values as text, templates;
- ``case_grid``: the run page's grid, one cell per case, a panel per format/kind;
- ``case_detail``: a case's drill-down (checks with their numbers, failing tensors, provenance, logs);
- ``run_page``: ``index.html``, the page of one run;
- ``history_page``: ``history.html``, case x run over the last runs, and the logit max|d| plot.
"""

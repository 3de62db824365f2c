"""What a run says: ``results.json``, ``junit.xml``, ``summary.md`` and the terminal tables
(``run_report``). No torch import."""

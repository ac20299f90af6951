"""``edgefleet tune``: search architectures and compression inside a device budget, on Optuna.

The study (every trial's settings, measurements and verdict) lives in an Optuna RDB storage: a
SQLite file by default, PostgreSQL when workers on several machines share one search. Modules:

- ``space``: the search space (architecture knobs, learning rate, epochs, sparsity, PTQ/QAT);
- ``study``: the settings a study was started with, opening the storage, counting trials;
- ``trial``: one trial (train, the real build for the target, the budget verdict) and the worker loop;
- ``results``: candidates, the Pareto front, the best bundle and its held-out accuracy, pareto.json;
- ``html``: report.html with the Pareto plot;
- ``run``: ``tune``, the Python API behind the command (local worker processes, progress).

See docs/tune.md.
"""

"""Benchmark machinery behind ``spach benchmark`` and ``benchmarks/``: timing of the training step that
``spach train`` runs (:func:`spach.train.engine.train_step`) and of inference (:mod:`.runner`). CPU run-time
settings live in :mod:`spach.runtime.cpu_tuning`."""

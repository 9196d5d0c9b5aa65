"""Benchmark machinery behind ``spach benchmark`` and ``benchmarks/``: timing of the real training step and of
inference (:mod:`.runner`) and math-preserving CPU run-time settings (:mod:`.cpu_tuning`)."""

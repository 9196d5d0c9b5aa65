"""What training, benchmarking and inference all run on, below all of them: device choice (cuda / npu / mps /
cpu), distributed setup, autocast and device synchronisation (:mod:`.device`), and the math-preserving CPU
run-time settings (:mod:`.cpu_tuning`). It imports nothing of spach but :mod:`spach.errors`."""

"""CPU inference throughput: plain fp32 eager vs fp32 + malloc thresholds vs bf16 (see cpu_train.py).

    python benchmarks/cpu_infer.py [--models a,b] [--rounds 2] [--json out.json]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--mode", "infer"] + sys.argv[1:]))

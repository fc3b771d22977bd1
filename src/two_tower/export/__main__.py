"""`python -m two_tower.export MODEL.keras PATH FORMAT OPTIONS`: `export` on JAX and torch.

Run with `KERAS_BACKEND=tensorflow` (see `two_tower.backends._export_process`).
"""

import sys

if __name__ == "__main__":
    from two_tower.backends._export_process import run_child

    run_child(sys.argv[1:])

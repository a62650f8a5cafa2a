"""Ray job entry point for `uae-ray train-encoder`.

    ray job submit --working-dir . -- python jobs/train_encoder.py --run-dir DIR --config F
"""

import sys

from uae_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train-encoder", *sys.argv[1:]]))

"""Ray job entry point for `uae-ray train-reward`.

    ray job submit --working-dir . -- python jobs/train_reward.py --run-dir DIR --config F
"""

import sys

from uae_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train-reward", *sys.argv[1:]]))

"""Ray job entry point for `uae-ray score-reward`.

    ray job submit --working-dir . -- python jobs/score_reward.py --run-dir DIR --config F
"""

import sys

from uae_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["score-reward", *sys.argv[1:]]))

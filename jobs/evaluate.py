"""Ray job entry point for `uae-ray evaluate`.

    ray job submit --working-dir . -- python jobs/evaluate.py --run-dir DIR --config F
"""

import sys

from uae_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["evaluate", *sys.argv[1:]]))

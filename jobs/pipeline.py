"""Ray job entry point for the whole pipeline.

    ray job submit --working-dir . -- python jobs/pipeline.py --config F
"""

import sys

from uae_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["run", *sys.argv[1:]]))

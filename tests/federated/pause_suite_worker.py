"""Test-only entry point: the suite's run worker, holding still after round N's checkpoint so a test can kill it.

    python tests/federated/pause_suite_worker.py N RUN_FOLDER
"""

import sys

from _pause import install_pause

from fedkernels.federated.suite import worker

install_pause(int(sys.argv[1]))
sys.exit(worker(sys.argv[2]))

import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
sys.path.insert(0, str(ROOT))

_THREADS_AT_START = os.environ.get("NUMBA_NUM_THREADS")


def pytest_collection_finish(session):
    """A test module that sets NUMBA_NUM_THREADS when it is imported makes the whole run
    single-threaded (the native pool reads it): every 2-thread test then fails or skips
    its parallel path. Say so before anything runs."""
    now = os.environ.get("NUMBA_NUM_THREADS")
    if now != _THREADS_AT_START:
        import pytest
        pytest.exit(f"a test module changed NUMBA_NUM_THREADS from {_THREADS_AT_START!r} to {now!r} while "
                    "being collected: set it in a subprocess's env instead", returncode=3)

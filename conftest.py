"""The test session's environment (read before torch and Lightning are imported), and the doctest namespace: every
public class's doctest may use ``torch`` without importing it."""

import os
from pathlib import Path

# torch.compile's caches (inductor's kernels, AOTAutograd's graphs) in the project's build folder, kept between runs:
# a second run of the suite reuses what the first compiled (the cache keys include the compiler and the torch
# install, so a changed environment compiles afresh). A cache folder set by the caller is kept. Set before Lightning
# is imported: importing it fixes the folder to torch's default
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parent / "build" / "inductor-cache"))

# under pytest-xdist (`make test` runs the suite on every core) each worker, and every process it starts, computes on
# one thread: two workers with two threads each would fight over two cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace["torch"] = torch

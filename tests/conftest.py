import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from standalone import register_pack  # noqa: E402

register_pack()
os.environ.setdefault("GLMIMAGE_NO_PROGRESS", "1")
# Tiny models: one thread is much faster than two on a busy 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ar_service(tmp_path_factory):
    """The AR service (``serving``) on a local Ray cluster, started once per test run: (url, release folder)."""
    ray = pytest.importorskip("ray")
    from ray_service import start_service
    url, release = start_service(str(tmp_path_factory.mktemp("ar_service_release")))
    yield url, release
    from ray import serve
    serve.shutdown()
    ray.shutdown()

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Deterministic CI profile: same examples every run, no per-example deadline on a busy 2-core box.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def isolated_user_state(tmp_path_factory):
    """Keep the audit log and the development signing CA out of the user's home."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SKYLOOM_AUDIT_LOG", str(tmp_path_factory.mktemp("state") / "audit.jsonl"))
        patch.setenv("SKYLOOM_CONFIG_DIR", str(tmp_path_factory.mktemp("config")))
        yield

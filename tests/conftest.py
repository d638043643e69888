import os

import pytest
import torch

torch.set_num_threads(1)  # CI has 2 cores; torchrun tests run 2 processes side by side


@pytest.fixture(autouse=True, scope="session")
def _cache(tmp_path_factory):
    """Toy data goes to a per-session cache, never to the user's ~/.cache."""
    os.environ["ATLAS_MIN_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def micro_cfg():
    from atlas_min.config import get_config
    return get_config("micro")


@pytest.fixture
def micro(micro_cfg):
    """(model, tokenizer, image_processor): a fresh random-init micro Qwen2.5-VL with functional tokens."""
    from atlas_min.model import init_model
    model, tokenizer, image_processor = init_model(micro_cfg)
    return model.eval(), tokenizer, image_processor


@pytest.fixture(scope="session")
def toy_files(micro_cfg):
    from atlas_min.toy import ensure_toy_data
    return ensure_toy_data(micro_cfg)

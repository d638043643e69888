import os

import pytest
import torch
from hypothesis import HealthCheck, settings

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


@pytest.fixture(scope="session")
def learning_sft(tmp_path_factory):
    """A micro model taught the reply format (150 SFT steps, as tutorial 08, ~15 s on 2 idle cores), from which RL
    learns: its replies close <answer> tags and are right now and then, so rewards differ within groups, advantages
    are not 0 and weights move within one step. Every end-to-end RL test starts here (test_train.assert_learned)."""
    from test_train import run
    out = tmp_path_factory.mktemp("learning") / "sft"
    run("train_sft.py", "--config", "micro", "--out", out, "max_steps=150", "sft_lr=1e-2", "batch_size=16",
        "sft_warmup=10")
    return out


# Hypothesis (tests/test_properties.py). "atlas", the default, is derandomized: each test's examples come
# from a hash of the test itself, so every run, here and in CI, checks the same examples, a failure
# reproduces exactly, and nothing passes today that fails tomorrow by luck (a flaky test is a defect here).
# A fixed seed with the example database instead would replay whatever once failed on one machine, from
# .hypothesis/examples in the working tree, so two machines would run different examples; derandomize
# implies database=None. deadline=None and the too_slow health check off: both judge wall-clock time, which
# on 2 shared cores is noise, not a property of the code. 60 examples per property: tests/test_properties.py
# takes ~20 s on 2 idle cores. HYPOTHESIS_PROFILE=explore searches afresh (new random examples, 1,000 per
# property, still no database) when hunting for bugs; a failure prints the @reproduce_failure line that pins it.
settings.register_profile("atlas", max_examples=60, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", parent=settings.get_profile("atlas"), max_examples=1000, derandomize=False,
                          database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "atlas"))

import os

import pytest
import torch
from _helpers import make_vit

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast instead of retrying the hub
torch.set_num_threads(2)


@pytest.fixture
def vit():
    return make_vit()

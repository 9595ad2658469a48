import os

import pytest
import torch

# Triton kernels run under the interpreter on machines without CUDA; this must be set
# before triton is first imported (spawned ranks inherit it)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

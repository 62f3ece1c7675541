"""Where the networks run: the one reading of --device that extract, train and predict share."""

from __future__ import annotations

import pytest
import torch

from devices import DeviceError, resolve_device


def test_a_device_this_machine_lacks_is_one_line_saying_what_to_use():
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    lacking = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: no machine has it
    with pytest.raises(DeviceError, match=f"^device '{lacking}' requested but [^\n]*; use [^\n]*--device cpu$"):
        resolve_device(lacking)
    with pytest.raises(DeviceError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")

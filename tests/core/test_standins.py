"""The host tier's import-only stand-ins for torchvision / torchaudio (tests/zdf_testkit/standins)."""

from __future__ import annotations

import os
import subprocess
import sys

from zdf_testkit.host_env import STANDINS

SCRIPT = """
import torchvision, torchaudio
from torchvision.ops import roi_align
from torchvision.transforms.functional import resize
import torchaudio.transforms as T
from zdf_standin import StandInUsed
class Sub(torchvision.models.ResNet):  # module-level subclassing must import
    pass
for use in (lambda: roi_align(1), lambda: T.Resample(), lambda: torchaudio.load("x.wav"), lambda: Sub(),
            lambda: resize.something(), lambda: torchvision.transforms.InterpolationMode.BILINEAR):
    try:
        use()
    except StandInUsed as e:
        print("raised:", str(e).split(" is ")[0])
    else:
        print("NOT RAISED")
"""


def test_any_name_imports_and_any_use_raises():
    paths = [str(STANDINS / "common"), str(STANDINS / "torchvision"), str(STANDINS / "torchaudio")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")[:-1]
    assert lines == ["raised: torchvision.ops.roi_align", "raised: torchaudio.transforms.Resample",
                     "raised: torchaudio.load", "raised: torchvision.models.ResNet",
                     "raised: torchvision.transforms.functional.resize.something",
                     "NOT RAISED"]  # reading a nested name is not using it (module-level enum lookups import)

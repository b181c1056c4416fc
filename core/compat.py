"""Compatibility of CPU torch with a torchvision wheel built for another torch (or for CUDA).

PyPI's torchvision is a CUDA build. Next to the CPU torch its C extension (``_C.so``) fails to
load, and ``import torchvision`` then dies in ``torchvision._meta_registrations``, which
registers fake (meta) kernels for ops that were never defined
(``RuntimeError: operator torchvision::nms does not exist``). open_clip and transformers
import torchvision, so they die too.

Import this module before open_clip / transformers. It checks, without importing torchvision,
whether the C extension loads; if it does, nothing changes. If it does not, it pre-registers an
empty ``torchvision._meta_registrations`` so the package imports; the Python parts
(transforms, models) work and the C ops (nms, roi_align, ...) raise torchvision's own
"Couldn't load custom C++ ops" error if anything calls them.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
import types

STATUS = "not checked"  # "clean" | "patched" | "absent" | "already imported"


def ensure_torchvision_importable() -> str:
    global STATUS
    if "torchvision" in sys.modules:
        STATUS = "already imported"
        return STATUS
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.origin:
        STATUS = "absent"
        return STATUS
    import torch

    libs = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")) + glob.glob(
        os.path.join(os.path.dirname(spec.origin), "_C*.pyd")
    )
    try:
        if not libs:
            raise OSError("no _C extension shipped")
        torch.ops.load_library(libs[0])
        STATUS = "clean"
    except (OSError, RuntimeError):
        name = "torchvision._meta_registrations"
        stub = types.ModuleType(name)
        stub.__doc__ = "omniforge: skipped, torchvision's C extension does not load with this torch"
        sys.modules[name] = stub
        STATUS = "patched"
    return STATUS


ensure_torchvision_importable()

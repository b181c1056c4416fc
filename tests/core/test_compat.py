import subprocess
import sys


def test_open_clip_and_transformers_import_after_compat():
    code = (
        "import core.compat as c; import open_clip, transformers, torchvision; "
        "m = open_clip.create_model('ViT-B-32', pretrained=None); "
        "print(c.STATUS, torchvision.extension._has_ops(), type(m).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    status, has_ops, model = out.stdout.split()
    # patched only when the C extension does not load; a clean torchvision is left alone
    assert (status, has_ops) in {("patched", "False"), ("clean", "True")}
    assert model == "CLIP"


def test_compat_is_a_no_op_once_torchvision_is_imported():
    code = "import core.compat as c, torchvision; print(c.ensure_torchvision_importable())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "already imported"

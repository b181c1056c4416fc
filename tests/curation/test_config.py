import warnings

import pytest

from core.config import ConfigError, ConfigWarning, load_config
from curation.config import CurationConfig


def test_defaults_are_valid_and_documented():
    cfg = CurationConfig()
    assert (
        cfg.split.threshold == 27.0 and cfg.split.min_clip_s == 2.0 and cfg.split.max_clip_s == 60.0
    )
    assert cfg.select.min_aspect == pytest.approx(1 / 3) and cfg.select.max_aspect == 3.0
    assert cfg.ocr.engine == "rapidocr" and cfg.motion.algorithm == "dis"
    assert cfg.recaption.backend == "none"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["recaption.backend=openai"],
            "recaption.backend 'openai' needs recaption.endpoint and recaption.model",
        ),
        (["recaption.backend=transformers"], "needs recaption.model_dir"),
        (["ocr.engine=paddleocr"], "ocr.engine 'paddleocr' needs ocr.model_dir"),
        (
            ["select.min_aspect=4"],
            "select.min_aspect (4.0) must be smaller than select.max_aspect (3.0)",
        ),
        (["profile=full", "aesthetic.enabled=false"], "profile 'full' runs every stage"),
        (["name=../x"], "name: String should match pattern"),
        (
            ["select.max_ocr_area=2"],
            "select.max_ocr_area: Input should be less than or equal to 1 (got 2)",
        ),
        (
            ["kind=gif"],
            "kind: Input should be 'auto', 'image', 'video', 'image_edit', 'video_edit' or 'conversation' (got 'gif')",
        ),
    ],
)
def test_invalid_settings_are_explained(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(CurationConfig, None, overrides)
    assert any(message in p for p in info.value.problems), info.value.problems


def test_settings_without_effect_warn():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config(
            CurationConfig,
            None,
            ["recaption.endpoint=http://127.0.0.1:8000/v1", "motion.enabled=false"],
        )
    messages = [str(w.message) for w in caught if w.category is ConfigWarning]
    assert "setting 'recaption.endpoint' has no effect: recaption.backend is 'none'" in messages
    assert any("'select.min_motion' has no effect" in m for m in messages)

"""Recaption stage: OpenAI-compatible backend against a local HTTP test double, and the
transformers backend with a tiny randomly initialised Qwen2-VL saved to and loaded from disk."""

from __future__ import annotations

import base64
import json
import multiprocessing
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pytest

from curation.captioners import CaptionCache, backoff_delay, parse_retry_after
from curation.config import RecaptionConfig
from curation.stages.base import MissingWeights, check_required
from curation.stages.recaption import (
    IMAGE_EDIT_PROMPT,
    IMAGE_PROMPT,
    VIDEO_EDIT_PROMPT,
    VIDEO_PROMPT,
    RecaptionStage,
)

# --- test double: an OpenAI-compatible chat-completions server ------------------------------

HOLD_CAP_S = 30.0  # far beyond any client timeout of these tests


class FakeOpenAI:
    """Real HTTP server on 127.0.0.1 speaking chat completions.

    ``script`` holds one action per incoming request (consumed in order; when empty, answer):
    ``("status", code, headers)`` fails with that status, ``("hold",)`` answers only once
    ``release`` is set (``close`` sets it; ``HOLD_CAP_S`` bounds the wait so a client that
    never gives up gets an answer, and fails its test, instead of hanging it).
    ``delay`` holds every answer that long, so overlapping requests can be counted.
    """

    def __init__(self):
        self.requests: list[dict] = []
        self.script: list[tuple] = []
        self.delay = 0.0
        self.in_flight = 0
        self.release = threading.Event()
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    n = len(server.requests)
                    server.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body}
                    )
                    action = server.script.pop(0) if server.script else None
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay)
                    if action and action[0] == "status":
                        self._send(action[1], {"error": {"message": "scripted"}}, action[2])
                        return
                    if action and action[0] == "hold":
                        server.release.wait(HOLD_CAP_S)
                    text = body["messages"][0]["content"][0]["text"]
                    kind = text.split(" training set")[0].split()[-1]  # text-to-video, ...
                    answer = {
                        "id": f"c{n}",
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": f" cap {n} {kind}\n"},
                                "finish_reason": "stop",
                            }
                        ],
                    }
                    self._send(200, answer, {})
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _send(self, code, payload, headers):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeOpenAI()
    yield s
    s.close()


def _frames(n: int, seed: int, w: int = 64, h: int = 48) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def _row(kind: str, i: int, **extra) -> dict:
    n = 8 if kind in ("video", "video_edit") else 1
    row = {
        "key": f"{kind}-{i}",
        "kind": kind,
        "source_uri": f"/data/{kind}/{i}",
        "status": "accepted",
        "reasons": [],
        "caption": None,
        "frames": _frames(n, i),
    }
    if kind in ("image_edit", "video_edit"):
        row["instruction"] = "make it red"
        row["target_frames"] = _frames(n, 1000 + i)
    row.update(extra)
    return row


def _stage(server, tmp_path, **cfg) -> RecaptionStage:
    kwargs = {k: cfg.pop(k) for k in ("prompts", "backoff_s", "cache_dir", "sleep") if k in cfg}
    kwargs.setdefault("backoff_s", 0.01)
    kwargs.setdefault("cache_dir", tmp_path / "cache")
    c = RecaptionConfig(backend="openai", endpoint=server.url, model="tiny-vlm", **cfg)
    stage = RecaptionStage(c, **kwargs)
    stage.setup()
    return stage


def _images(request: dict) -> list[str]:
    content = request["body"]["messages"][0]["content"]
    return [p["image_url"]["url"] for p in content if p["type"] == "image_url"]


# --- openai backend -----------------------------------------------------------------------


def test_openai_captions_prompts_and_frames(server, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    stage = _stage(server, tmp_path)
    rows = [
        _row("video", 0, caption="a dog on a beach"),
        _row("image", 1),
        _row("image_edit", 2),
        _row("video_edit", 3),
        _row("image", 4, status="error", reasons=["probe: bad"]),
    ]
    out = stage.process_batch(rows)

    assert [r["status"] for r in out] == ["accepted"] * 4 + ["error"]
    assert out[4] == rows[4]  # rows already in error pass untouched, and are not asked about
    assert len(server.requests) == 4
    by_kind = {}
    for req in server.requests:
        assert req["path"] == "/v1/chat/completions"
        assert "Authorization" not in req["headers"]  # no key in the env: local server
        body = req["body"]
        assert body["model"] == "tiny-vlm" and body["temperature"] == 0
        text = body["messages"][0]["content"][0]["text"]
        by_kind[text.split(" training set")[0].split()[-1]] = req

    assert out[0]["recaption"].startswith("cap ") and out[0]["recaption"].endswith("text-to-video")
    assert out[1]["recaption"].endswith("text-to-image")
    assert out[2]["recaption"].endswith("image-editing")
    assert out[3]["recaption"].endswith("video-editing")
    # edits: the rewrite goes to recaption, the original instruction stays
    assert out[2]["instruction"] == "make it red" and out[3]["instruction"] == "make it red"

    prompts = {k: r["body"]["messages"][0]["content"][0]["text"] for k, r in by_kind.items()}
    assert prompts["text-to-video"].startswith(VIDEO_PROMPT)
    assert prompts["text-to-image"].startswith(IMAGE_PROMPT)
    assert prompts["image-editing"].startswith(IMAGE_EDIT_PROMPT)
    assert prompts["video-editing"].startswith(VIDEO_EDIT_PROMPT)
    assert len(set(prompts.values())) == 4
    assert (
        "Existing caption (a hint; it may be incomplete or wrong): a dog on a beach"
        in (prompts["text-to-video"])
    )
    assert "Existing caption" not in prompts["text-to-image"]
    assert "Edit instruction: make it red" in prompts["image-editing"]

    # frames as JPEG data URLs: 4 of a video's 8, 1 image, source + target for edits
    counts = {k: len(_images(r)) for k, r in by_kind.items()}
    assert counts == {
        "text-to-video": 4,
        "text-to-image": 1,
        "image-editing": 2,
        "video-editing": 8,
    }
    url = _images(by_kind["text-to-image"])[0]
    assert url.startswith("data:image/jpeg;base64,")
    img = cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8), 1)
    assert img.shape == (48, 64, 3)


def test_frames_are_downscaled(server, tmp_path):
    stage = _stage(server, tmp_path)
    stage.image_max_side = 32
    out = stage.process_batch([_row("image", 0, frames=_frames(1, 0, w=200, h=100))])
    assert out[0]["recaption"]
    url = _images(server.requests[0])[0]
    img = cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8), 1)
    assert img.shape == (16, 32, 3)


def test_api_key_header_from_env(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_VLM_KEY", "sk-test-123")
    stage = _stage(server, tmp_path, api_key_env="MY_VLM_KEY")
    stage.process_batch([_row("image", 0)])
    assert server.requests[0]["headers"]["Authorization"] == "Bearer sk-test-123"


def test_concurrency_limit(server, tmp_path):
    server.delay = 0.25
    stage = _stage(server, tmp_path, concurrency=3)
    rows = [_row("image", i) for i in range(9)]
    out = stage.process_batch(rows)
    assert all(r["recaption"] for r in out)
    assert server.max_in_flight == 3  # parallel (not serial), never more than the limit


def test_retries_then_success_honours_retry_after(server, tmp_path):
    server.script = [("status", 500, {}), ("status", 429, {"Retry-After": "7"})]
    waits: list[float] = []  # the backend's sleeps, recorded instead of slept
    stage = _stage(server, tmp_path, max_retries=2, backoff_s=0.01, sleep=waits.append)
    out = stage.process_batch([_row("image", 0)])
    assert out[0]["status"] == "accepted" and out[0]["recaption"].startswith("cap 2 ")
    assert len(server.requests) == 3
    assert len(waits) == 2
    assert 0.005 <= waits[0] <= 0.01  # the 500: backoff with jitter, about backoff_s
    assert waits[1] == 7.0  # the 429: what Retry-After said, not the backoff


def test_permanent_failures_become_error_rows(server, tmp_path):
    stage = _stage(server, tmp_path, max_retries=2, concurrency=1)  # one at a time: scripted order
    server.script = [("status", 400, {})]  # a 4xx is not retried
    out = stage.process_batch([_row("image", 0)])
    assert out[0]["status"] == "error" and out[0]["recaption"] is None
    assert out[0]["reasons"] == ['recaption_failed: HTTP 400: {"error": {"message": "scripted"}}']
    assert len(server.requests) == 1

    server.script = [("status", 503, {})] * 3  # 5xx: retried max_retries times, then given up
    out = stage.process_batch([_row("image", 1), _row("image", 2)])
    failed = [r for r in out if r["status"] == "error"]
    assert len(failed) == 1 and len(server.requests) == 1 + 4  # the other row still succeeded
    assert failed[0]["reasons"][0].startswith(
        "recaption_failed: gave up after 3 attempts: HTTP 503"
    )

    # failures are not cached: a rerun asks again and succeeds
    again = stage.process_batch([failed[0] | {"status": "accepted", "reasons": []}])
    assert again[0]["status"] == "accepted" and again[0]["recaption"]


def test_connection_refused_is_retried_then_error(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = RecaptionConfig(
        backend="openai", endpoint=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1
    )
    stage = RecaptionStage(cfg, cache_dir=tmp_path / "c", backoff_s=0.01)
    out = stage.process_row(_row("image", 0))
    assert out["status"] == "error"
    assert out["reasons"][0].startswith("recaption_failed: gave up after 2 attempts: connection")


def test_timeout_honoured(server, tmp_path):
    # The server holds both requests unanswered until the test ends: only the client's own
    # socket timeout can end each attempt (without it, an answer comes after HOLD_CAP_S and the
    # row is accepted). A timed-out attempt is retried after a backoff.
    server.script = [("hold",), ("hold",)]
    waits: list[float] = []
    stage = _stage(server, tmp_path, timeout_s=0.3, max_retries=1, sleep=waits.append)
    out = stage.process_batch([_row("image", 0)])
    assert out[0]["status"] == "error" and out[0]["recaption"] is None
    assert out[0]["reasons"] == ["recaption_failed: gave up after 2 attempts: timed out after 0.3s"]
    assert len(server.requests) == 2 and len(waits) == 1


def test_cache_prevents_second_request_and_prompt_change_misses(server, tmp_path):
    rows = [_row("video", 0), _row("image", 1), _row("image_edit", 2)]
    first = _stage(server, tmp_path).process_batch(rows)
    assert len(server.requests) == 3
    files = sorted((tmp_path / "cache").glob("*/*.json"))
    assert len(files) == 3 and all(f.parent.name == f.stem[:2] and len(f.stem) == 64 for f in files)
    assert not list((tmp_path / "cache").glob("*/.tmp-*"))

    # a fresh stage (another worker, a rerun) with the same cache: nothing is asked again
    second = _stage(server, tmp_path).process_batch(rows)
    assert len(server.requests) == 3
    assert [r["recaption"] for r in second] == [r["recaption"] for r in first]

    # a changed prompt, or a changed model, misses the cache
    _stage(server, tmp_path, prompts={"image": "Say what you see."}).process_batch(rows)
    assert len(server.requests) == 4
    assert server.requests[-1]["body"]["messages"][0]["content"][0]["text"] == "Say what you see."
    c = RecaptionConfig(backend="openai", endpoint=server.url, model="other-vlm")
    RecaptionStage(c, cache_dir=tmp_path / "cache").process_batch(rows[1:2])
    assert len(server.requests) == 5
    # a changed instruction is a changed prompt too
    _stage(server, tmp_path).process_batch([rows[2] | {"instruction": "make it blue"}])
    assert len(server.requests) == 6


def _hammer(root: str, worker: int) -> None:
    cache = CaptionCache(root)
    for i in range(50):
        cache.put("ab" + "0" * 62, {"recaption": f"w{worker} i{i}", "pad": "x" * 4000})


def test_cache_safe_with_concurrent_writer_processes(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), w)) for w in range(4)]
    for p in procs:
        p.start()
    cache = CaptionCache(tmp_path)
    seen = 0
    while any(p.is_alive() for p in procs):  # readers never see a partial file
        got = cache.get("ab" + "0" * 62)
        seen += got is not None
        assert got is None or got.startswith("w")
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert cache.get("ab" + "0" * 62).endswith("i49")
    assert [f.name for f in (tmp_path / "ab").iterdir()] == ["ab" + "0" * 62 + ".json"]


def test_rows_that_cannot_be_asked(server, tmp_path):
    stage = _stage(server, tmp_path)
    out = stage.process_batch(
        [
            _row("image", 0, frames=[]),
            _row("image", 1, frames=[b"not a png"]),
            _row("image_edit", 2, instruction=None, target_frames=None),
            _row("image_edit", 3, instruction=None),  # no instruction: written from the pair
        ]
    )
    assert [r["status"] for r in out] == ["error", "error", "error", "accepted"]
    assert out[0]["reasons"] == ["recaption_failed: the row has no frames"]
    assert out[1]["reasons"][0].startswith("recaption_failed: bad frame")
    assert out[2]["reasons"] == [
        "recaption_failed: edit sample with neither an instruction nor target frames"
    ]
    text = server.requests[0]["body"]["messages"][0]["content"][0]["text"]
    assert "none was given" in text


def test_backoff_and_retry_after_parsing():
    for attempt in range(5):
        d = backoff_delay(attempt, 1.0)
        assert 2**attempt / 2 <= d <= 2**attempt
    assert backoff_delay(20, 1.0) <= 60.0
    assert backoff_delay(0, 1.0, retry_after=7) == 7
    assert parse_retry_after("3") == 3.0 and parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a past date: now
    assert parse_retry_after("soon") is None


def test_stage_is_picklable_and_off_when_none(server, tmp_path):
    import pickle

    stage = _stage(server, tmp_path)
    clone = pickle.loads(pickle.dumps(stage))
    assert clone.process_batch([_row("image", 0)])[0]["recaption"]
    with pytest.raises(ValueError, match="backend is 'none'"):
        RecaptionStage(RecaptionConfig())


# --- transformers backend -----------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_vlm_dir(tmp_path_factory):
    """A 2-layer Qwen2-VL with random weights and a byte-level tokenizer, built offline."""
    import core.compat  # noqa: F401

    # isort: split
    import torch
    from tokenizers import pre_tokenizers
    from transformers import (
        Qwen2Tokenizer,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])  # bytes only, no merges
    specials = [
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    tok.add_special_tokens({"additional_special_tokens": specials})
    ids = {s: tok.convert_tokens_to_ids(s) for s in ["<|endoftext|>", *specials]}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    cfg = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [1, 1, 2],
            },
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg)
    d = tmp_path_factory.mktemp("tiny-qwen2-vl")
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d


def test_transformers_backend_loads_and_generates(tiny_vlm_dir, tmp_path):
    cfg = RecaptionConfig(backend="transformers", model_dir=tiny_vlm_dir)
    stage = RecaptionStage(cfg, cache_dir=tmp_path / "cache", max_new_tokens=12)
    check_required([stage])  # config.json is there
    stage.setup()
    rows = [_row("image", 0, caption="a cat"), _row("video", 1), _row("image_edit", 2)]
    out = stage.process_batch(rows)
    assert [r["status"] for r in out] == ["accepted"] * 3, [r["reasons"] for r in out]
    assert all(isinstance(r["recaption"], str) and r["recaption"] for r in out)
    assert out[2]["instruction"] == "make it red"
    assert len(list((tmp_path / "cache").glob("*/*.json"))) == 3

    # a rerun reads the cache: the model is not called
    again = RecaptionStage(cfg, cache_dir=tmp_path / "cache", max_new_tokens=12)
    again.setup()
    again._engine.caption = lambda job: pytest.fail("the model was asked again")
    assert [r["recaption"] for r in again.process_batch(rows)] == [r["recaption"] for r in out]


def test_missing_model_dir_is_missing_weights(tmp_path):
    missing = tmp_path / "no-such-vlm"
    stage = RecaptionStage(RecaptionConfig(backend="transformers", model_dir=missing))
    with pytest.raises(MissingWeights) as e:
        check_required([stage])
    msg = str(e.value)
    assert (
        f"recaption: recaption VLM (a transformers model directory) not found at {missing}/config.json"
        in msg
    )
    assert "Qwen/Qwen2-VL-2B-Instruct" in msg and f"--local-dir {missing}" in msg
    openai = RecaptionConfig(backend="openai", endpoint="http://127.0.0.1:9/v1", model="m")
    check_required([RecaptionStage(openai)])  # nothing local to check

"""Captioning backends of the recaption stage (who writes the caption), and the cache of
what was written.

Backends:

- ``openai``: any OpenAI-compatible chat-completions server (vLLM, SGLang, ...). One
  ``POST {endpoint}/chat/completions`` per sample (stdlib ``urllib``), frames as base64 JPEG
  ``image_url`` data URLs, ``temperature`` 0. Up to ``concurrency`` requests of a batch run at
  once (per worker). The key in env var ``api_key_env`` is sent as a bearer token when set;
  without it no ``Authorization`` header is sent (local servers).
  Retries (``max_retries`` more attempts): connection errors, timeouts, HTTP 429 and 5xx, with
  exponential backoff and jitter (``backoff_delay``: about ``backoff_s * 2**n``), or the
  server's ``Retry-After`` when it sends one. Other 4xx and malformed answers fail at once.
  ``timeout_s`` bounds connecting and each read of a request (urllib's socket timeout).
- ``transformers``: a local VLM directory (``model_dir``) loaded with ``AutoProcessor`` and
  ``AutoModelForImageTextToText`` (``local_files_only``: nothing is downloaded); greedy
  decoding, ``max_new_tokens`` tokens at most.

Cache: every caption obtained is stored under ``cache_dir`` (default
``<OMNIFORGE_HOME or ~/.omniforge>/recaption-cache``) as ``<h[:2]>/<h>.json`` with
``h = sha256(sample key, full prompt text, model id, frame view)``, written to a temp file and
renamed, so concurrent workers are safe and a rerun never asks twice. A changed prompt, model
or frame view is a miss. Failures are not cached.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import hashlib
import http.client
import json
import os
import random
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

DEFAULT_BACKOFF_S = 1.0  # first retry waits about this long, doubling after
MAX_BACKOFF_S = 60.0
MAX_RETRY_AFTER_S = 300.0
JPEG_QUALITY = 90
CACHE_DIRNAME = "recaption-cache"


class RecaptionFailed(Exception):
    """A caption could not be obtained for one sample (becomes ``recaption_failed: ...``)."""


# --- cache ------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    home = os.environ.get("OMNIFORGE_HOME") or str(Path.home() / ".omniforge")
    return Path(home) / CACHE_DIRNAME


def cache_key(sample_key: str, prompt: str, model: str, view: str) -> str:
    """sha256 over the sample key, the full prompt text, the model id and the frame view."""
    material = json.dumps([sample_key, prompt, model, view], ensure_ascii=False)
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


class CaptionCache:
    """One small JSON file per caption: ``root/<h[:2]>/<h>.json``; atomic temp + rename."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / f"{digest}.json"

    def get(self, digest: str) -> str | None:
        try:
            data = json.loads(self.path(digest).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # absent, or unreadable: a miss (it will be rewritten)
            return None
        text = data.get("recaption") if isinstance(data, dict) else None
        return text if isinstance(text, str) and text else None

    def put(self, digest: str, record: dict[str, Any]) -> None:
        final = self.path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f, ensure_ascii=False)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


# --- requests -----------------------------------------------------------------------------


@dataclass
class Job:
    """What is asked for one sample: text and frame parts in order, and its cache digest."""

    parts: list[tuple[str, Any]]  # ("text", str) | ("image", (H, W, 3) uint8 RGB array)
    prompt: str
    digest: str
    sample_key: str


def backoff_delay(attempt: int, base_s: float, retry_after: float | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based).

    The server's Retry-After wins when present (capped at MAX_RETRY_AFTER_S); else
    exponential backoff with equal jitter: ``d/2 + uniform(0, d/2)``, ``d = base * 2**attempt``
    capped at MAX_BACKOFF_S.
    """
    if retry_after is not None:
        return min(max(retry_after, 0.0), MAX_RETRY_AFTER_S)
    d = min(base_s * (2**attempt), MAX_BACKOFF_S)
    return d / 2 + random.uniform(0, d / 2)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date; None when absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _jpeg_data_url(rgb: np.ndarray) -> str:
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    )
    if not ok:
        raise RecaptionFailed("JPEG encoding failed")
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


class OpenAIBackend:
    """Chat completions over HTTP with retries; one call per sample, thread-safe."""

    def __init__(
        self,
        endpoint: str,
        model: str,
        api_key: str | None,
        timeout_s: float,
        max_retries: int,
        backoff_s: float,
        max_new_tokens: int,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.url = endpoint.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_new_tokens = max_new_tokens
        self.sleep = sleep

    def body(self, job: Job) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        for kind, value in job.parts:
            if kind == "text":
                content.append({"type": "text", "text": value})
            else:
                content.append({"type": "image_url", "image_url": {"url": _jpeg_data_url(value)}})
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            "max_tokens": self.max_new_tokens,
        }

    def _post(self, data: bytes) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            return json.loads(resp.read())

    def caption(self, job: Job) -> str:
        data = json.dumps(self.body(job)).encode("utf-8")
        attempts = self.max_retries + 1
        last = ""
        for attempt in range(attempts):
            retry_after = None
            try:
                answer = self._post(data)
            except urllib.error.HTTPError as e:
                detail = _short(e.read() if e.fp else b"")
                last = f"HTTP {e.code}" + (f": {detail}" if detail else "")
                if e.code != 429 and not 500 <= e.code < 600:
                    raise RecaptionFailed(last) from None  # other 4xx: asking again won't help
                retry_after = parse_retry_after(e.headers.get("Retry-After") if e.headers else None)
            except TimeoutError:
                last = f"timed out after {self.timeout_s:g}s"
            except urllib.error.URLError as e:
                if isinstance(e.reason, TimeoutError):
                    last = f"timed out after {self.timeout_s:g}s"
                else:
                    last = f"connection error: {e.reason}"
            except (ConnectionError, http.client.HTTPException) as e:
                last = f"connection error: {type(e).__name__}: {e}"
            except ValueError as e:  # a 2xx that is not JSON
                raise RecaptionFailed(f"malformed response: {e}") from None
            else:
                return _answer_text(answer)
            if attempt + 1 < attempts:
                self.sleep(backoff_delay(attempt, self.backoff_s, retry_after))
        if attempts == 1:
            raise RecaptionFailed(last)
        raise RecaptionFailed(f"gave up after {attempts} attempts: {last}")


def _short(raw: bytes, n: int = 200) -> str:
    text = " ".join(raw.decode("utf-8", "replace").split())
    return text if len(text) <= n else text[:n] + "..."


def _answer_text(answer: Any) -> str:
    try:
        content = answer["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise RecaptionFailed(
            f"malformed response: {_short(json.dumps(answer).encode())}"
        ) from None
    if isinstance(content, list):  # some servers answer with content parts
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise RecaptionFailed("malformed response: message content is not text")
    return content


class TransformersBackend:
    """A local VLM directory through transformers' Auto classes; greedy generation."""

    def __init__(self, model_dir: Path, max_new_tokens: int):
        import core.compat  # noqa: F401  (before transformers: torchvision C ops)

        # isort: split
        import torch
        import transformers
        from transformers import AutoProcessor

        try:
            from transformers import AutoModelForImageTextToText as AutoVLM
        except ImportError:  # transformers < 4.46
            from transformers import AutoModelForVision2Seq as AutoVLM

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        # transformers renamed torch_dtype to dtype in 4.56
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        self.processor = AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
        self.model = AutoVLM.from_pretrained(
            str(model_dir), local_files_only=True, **{dtype_kw: self.dtype}
        )
        self.model.to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        if not getattr(self.processor, "chat_template", None):
            raise RecaptionFailed(f"{model_dir}: the processor has no chat template")

    def caption(self, job: Job) -> str:
        from PIL import Image

        content: list[dict[str, Any]] = []
        images = []
        for kind, value in job.parts:
            if kind == "text":
                content.append({"type": "text", "text": value})
            else:
                content.append({"type": "image"})
                images.append(Image.fromarray(value))
        messages = [{"role": "user", "content": content}]
        text = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        inputs = self.processor(text=[text], images=images or None, return_tensors="pt")
        inputs = inputs.to(self.device, dtype=self.dtype)  # floating tensors only are cast
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(new, skip_special_tokens=True)[0]

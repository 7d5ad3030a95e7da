"""Which ONNX graph generates faster on this device: int8 or float32, measured once.

The int8 export (block-wise weight-only, ``MatMulNBits``) is a quarter of the float32
graph's memory and usually faster, but how much faster depends on the CPU: its kernels
dequantize blocks on the fly, which pays where memory bandwidth limits decoding and
costs where the float kernels are already cheap (a small base in cache, a CPU whose
float32 GEMM is very fast). So ``backend="onnx-auto"`` does not assume: the first time
it runs on a machine it times greedy decoding on both graphs (the same prompt, the same
number of new tokens, the zero adapter, one warm-up and the best of a few repetitions)
and keeps the int8 graph unless it decodes slower than the float32 one
(:data:`INT8_MARGIN`): at equal speed it still holds a quarter of the memory. An int8
export that fails its quality gate is never chosen.

The choice is cached under ``<cache root>/device/`` in a file named by what it depends
on (CPU model and ISA class with the environment's restrictions, ONNX Runtime's version,
the execution providers, the threads, both exports' keys), so a change of any of them
measures again. It is logged in one line that says what was chosen and why.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from lorafleet.client.layout import cache_root, keyed_cache_file
from lorafleet.protocols.atomic import atomic_write_text
from lorafleet.protocols.errors import StorageError

log = logging.getLogger(__name__)

__all__ = ["INT8_MARGIN", "OnnxChoice", "choose_graph", "time_decoding"]

ConcreteBackend = Literal["onnx", "onnx-int8"]
INT8_MARGIN = 1.0
"""The int8 graph's tokens/s must be at least this times the float32 graph's.

1.0: at equal speed the int8 graph still holds a quarter of the memory."""
CHOICE_VERSION = 1
"""Bumped when the measurement changes, so old cached choices are measured again."""


@dataclass(frozen=True)
class OnnxChoice:
    """The graph ``onnx-auto`` uses on this machine, with the measurement behind it."""

    backend: ConcreteBackend
    reason: str
    tokens_per_s: Mapping[str, float]
    """Measured greedy decoding speed per backend (``onnx``, ``onnx-int8``); empty when
    the int8 export was refused and nothing needed measuring."""
    key: Mapping[str, Any]
    measured_at: str
    from_cache: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the cache file)."""
        doc = asdict(self)
        doc["tokens_per_s"] = dict(self.tokens_per_s)
        doc["key"] = dict(self.key)
        doc.pop("from_cache")
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> OnnxChoice:
        """Inverse of :meth:`to_dict`; raises KeyError/TypeError/ValueError on a bad doc."""
        backend = doc["backend"]
        if backend not in ("onnx", "onnx-int8"):
            raise ValueError(f"unknown backend {backend!r}")
        return cls(
            backend=backend,
            reason=str(doc["reason"]),
            tokens_per_s={str(k): float(v) for k, v in doc["tokens_per_s"].items()},
            key=dict(doc["key"]),
            measured_at=str(doc["measured_at"]),
            from_cache=True,
        )


def time_decoding(generate: Callable[[], Sequence[int]], *, reps: int = 3) -> float:
    """Tokens per second of ``generate`` (greedy, so every call makes the same tokens).

    One warm-up call (session start-up, first-run allocations), then the fastest of
    ``reps`` calls: other processes only ever add time.
    """
    generate()
    best = float("inf")
    count = 0
    for _ in range(max(1, reps)):
        started = time.perf_counter()
        count = len(generate())
        best = min(best, time.perf_counter() - started)
    return max(count, 1) / best if best > 0 else 0.0


def decide(
    fp32_tps: float, int8_tps: float | None, *, int8_refused: str = ""
) -> tuple[ConcreteBackend, str]:
    """The backend and a one-line reason, from the measured speeds."""
    if int8_tps is None:
        return "onnx", f"the int8 export is refused for this base ({int8_refused})"
    ratio = int8_tps / fp32_tps if fp32_tps > 0 else float("inf")
    speeds = f"int8 {int8_tps:.1f} tokens/s, float32 {fp32_tps:.1f} tokens/s"
    if ratio >= INT8_MARGIN:
        return "onnx-int8", f"the int8 graph decodes {ratio:.2f}x the float32 one ({speeds})"
    return "onnx", f"the int8 graph decodes only {ratio:.2f}x the float32 one ({speeds})"


def choice_key(
    *,
    cpu_model: str,
    isa_class: str,
    isa_restriction: str,
    ort_version: str,
    providers: Sequence[str],
    export_keys: Mapping[str, str],
) -> dict[str, Any]:
    """What a cached choice must match to be reused."""
    return {
        "version": CHOICE_VERSION,
        "cpu_model": cpu_model,
        "isa_class": isa_class,
        "isa_restriction": isa_restriction,
        "ort": ort_version,
        "providers": list(providers),
        "threads": os.environ.get("OMP_NUM_THREADS", ""),
        "cpus": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "exports": dict(sorted(export_keys.items())),
    }


def _load(path: Path, key: Mapping[str, Any]) -> OnnxChoice | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("key") != json.loads(json.dumps(key)):
            return None
        return OnnxChoice.from_dict(doc)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("cached ONNX graph choice %s unreadable (%s); measuring again", path, exc)
        return None


def choose_graph(
    key: Mapping[str, Any],
    measure: Callable[[], tuple[float, float | None, str]],
    *,
    cache_dir: Path | None = None,
    refresh: bool = False,
) -> OnnxChoice:
    """Return the graph for ``key`` on this machine: cached, else measured and cached.

    ``measure`` returns (float32 tokens/s, int8 tokens/s or None, why int8 was refused).
    An unwritable cache costs a measurement per process; it is never an error.
    """
    path = keyed_cache_file(cache_root(cache_dir) / "device", "onnx-choice-", key)
    if not refresh:
        cached = _load(path, key)
        if cached is not None:
            log.info("backend onnx-auto: %s (cached: %s)", cached.backend, cached.reason)
            return cached
    fp32, int8, refused = measure()
    backend, reason = decide(fp32, int8, int8_refused=refused)
    speeds = {"onnx": fp32} if int8 is None else {"onnx": fp32, "onnx-int8": int8}
    choice = OnnxChoice(
        backend=backend,
        reason=reason,
        tokens_per_s=speeds,
        key=dict(key),
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    try:
        atomic_write_text(path, json.dumps(choice.to_dict(), indent=1, sort_keys=True) + "\n")
    except (OSError, StorageError) as exc:
        log.warning("could not cache the ONNX graph choice in %s (%s)", path, exc)
    log.info("backend onnx-auto: %s (%s)", backend, reason)
    return choice

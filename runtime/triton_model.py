"""The Triton Python-backend model behind ``structkv deploy triton`` (decoupled mode).

Each Triton model instance loads the engine once and runs one
:class:`~structkv.runtime.scheduler.Scheduler` (the one ``structkv serve`` runs): ``execute``
only parses and submits, and returns at once; the scheduler's thread admits requests, batches
their decode steps together and streams events back through each request's response sender.
So requests that arrive together — in one ``execute`` call or in several — share decode steps,
and admission is by the KV blocks of the *compressed* prompt.

Triton tells a model that a client went away through ``request.is_cancelled()``, which has to be
polled; a watcher thread polls the requests in flight every 0.1 s (and refreshes the KV gauges
on Triton's metrics endpoint), cancels them in the scheduler (their blocks are released within
one step) and the scheduler's final event sends the final response.

This module imports ``triton_python_backend_utils`` lazily: it exists only inside Triton's
Python stub, while the parsing below is plain Python and is tested without a server.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from structkv.errors import StructKVError
from structkv.runtime.scheduler import Event, SamplingParams, Scheduler
from structkv.runtime.triton_deploy import INPUTS, OUTPUTS

_SPECS = {s.name: s for s in INPUTS}
_OUT_DTYPES = {
    "TYPE_STRING": np.object_,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP32": np.float32,
}
POLL_S = 0.1
#: (key, metric name, description): gauges from Scheduler.counts(), counters from the observer
_GAUGES = (
    ("running", "structkv_requests_running", "requests decoding"),
    ("waiting", "structkv_requests_waiting", "requests queued for KV blocks"),
    ("blocks_used", "structkv_kv_blocks_used", "KV blocks holding tokens"),
    ("blocks_free", "structkv_kv_blocks_free", "KV blocks not holding tokens"),
)
_COUNTERS = (
    ("prompt_tokens", "structkv_prompt_tokens", "prompt tokens"),
    ("saved", "structkv_prefill_tokens_saved",
     "prompt tokens dropped at the pivot (not run through the later layers)"),
    ("steps", "structkv_decode_steps", "batched decode steps"),
    ("rows", "structkv_decode_rows",
     "tokens decoded (rows / steps = requests sharing a decode step)"),
)  # fmt: skip


@dataclass
class Parsed:
    prompt: str
    params: SamplingParams
    stream: bool
    exclude_input: bool


def parse_inputs(values: dict[str, np.ndarray | None]) -> Parsed:
    """Request tensors (name -> numpy array, or None when absent) to a prompt and sampling
    parameters; every bad value raises one StructKVError naming the input."""
    text = values.get("text_input")
    if text is None or text.size != 1:
        raise StructKVError("text_input is required: one UTF-8 string (the prompt)")
    raw = text.reshape(-1)[0]
    try:
        prompt = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError:
        raise StructKVError("text_input is not valid UTF-8; send the prompt as UTF-8") from None
    if not prompt.strip():
        raise StructKVError("text_input is empty; send a non-empty prompt")

    def scalar(name: str):
        value = values.get(name)
        if value is None:
            return _SPECS[name].default
        if value.size != 1:
            raise StructKVError(f"{name} must hold exactly one value, got shape {value.shape}")
        item = value.reshape(-1)[0]
        return item.item() if isinstance(item, np.generic) else item

    stop = values.get("stop")
    stops: tuple[str, ...] = ()
    if stop is not None:
        try:
            stops = tuple(
                s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in stop.reshape(-1)
            )
        except UnicodeDecodeError:
            raise StructKVError("stop strings must be valid UTF-8") from None
    params = SamplingParams(
        max_tokens=scalar("max_tokens"),
        temperature=float(scalar("temperature")),
        top_p=float(scalar("top_p")),
        seed=scalar("seed"),
        stop=stops,
    )
    params.check()
    return Parsed(prompt, params, bool(scalar("stream")), bool(scalar("exclude_input_in_output")))


def final_outputs(event: Event, text: str) -> dict[str, object]:
    """The final response's tensors: the text plus StructKV's per-request numbers."""
    stats, usage = event.stats or {}, event.usage or {}

    def number(source: dict, key: str, default):  # a tensor has no None: an absent number
        value = source.get(key)
        return default if value is None else value

    return {
        "text_output": text,
        "finish_reason": event.finish_reason or "",
        "prompt_tokens": number(usage, "prompt_tokens", 0),
        "completion_tokens": number(usage, "completion_tokens", 0),
        "pivot_layer": number(stats, "pivot_layer", -1),  # -1: no pivot (a prompt kept whole)
        "propagated_tokens": number(stats, "propagated_tokens", 0),
        "kv_bytes": number(stats, "kv_bytes", 0),
        "kv_bytes_full": number(stats, "kv_bytes_full", 0),
        "compute_fraction": number(stats, "compute_fraction", 0.0),
        "prefill_s": number(stats, "prefill_s", 0.0),
    }


@dataclass
class _InFlight:
    """One Triton request: its sender, what to send back, and its scheduler id."""

    request: object
    sender: object
    parsed: Parsed
    parts: list[str] = field(default_factory=list)
    rid: int | None = None
    done: bool = False


class TritonPythonModel:
    """Triton's Python-backend entry points: initialize, execute, finalize."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        from structkv.runtime.backends import EngineBackend
        from structkv.runtime.engine import Engine

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        engine_dir = Path(params["engine"])
        if not engine_dir.is_absolute():  # copied into the repository: relative to the model
            engine_dir = Path(args["model_repository"]) / engine_dir
        instances = sum(g.get("count", 1) for g in config.get("instance_group", [])) or 1
        threads = int(params.get("threads", "0")) or max(
            1, len(os.sched_getaffinity(0)) // instances
        )
        if args.get("model_instance_kind") == "GPU":
            device_id = int(args.get("model_instance_device_id", 0))
            cuda = ("CUDAExecutionProvider", {"device_id": device_id})
            providers = [cuda, "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        engine = Engine.load(
            engine_dir,
            kv_cache_mb=float(params.get("kv_cache_mb", 512)),
            threads=threads,
            providers=providers,
        )
        self.name = args["model_name"]
        self.backend = EngineBackend(engine, self.name)
        self.scheduler = Scheduler(self.backend)
        self.inflight: dict[int, _InFlight] = {}
        self.lock = threading.Lock()
        self._gauges = self._metrics(args.get("model_instance_name", self.name))
        self.scheduler.observer = self  # prefilled / inter_token / finished -> counters
        self.scheduler.start()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="structkv-cancel", daemon=True)
        self._watcher.start()
        provider = engine.stages.providers[0]
        pb_utils.Logger.log_info(
            f"structkv: {self.name} serving {engine_dir} on {provider} ({threads} threads, "
            f"{self.backend.num_blocks} KV blocks)"
        )

    # -- requests ----------------------------------------------------------------------------
    def execute(self, requests):
        """Decoupled: hand every request to the scheduler; responses go through the senders."""
        for request in requests:
            self._submit(request)
        return None

    def _submit(self, request) -> None:
        pb = self.pb
        sender = request.get_response_sender()
        try:
            values = {}
            for spec in INPUTS:
                tensor = pb.get_input_tensor_by_name(request, spec.name)
                values[spec.name] = None if tensor is None else tensor.as_numpy()
            parsed = parse_inputs(values)
            from structkv.generate import encode_prompt  # the tokenisation of `structkv run`

            ids = encode_prompt(self.backend.tokenizer, parsed.prompt, chat=False).tolist()
            flight = _InFlight(request, sender, parsed)
            flight.rid = self.scheduler.submit(ids, parsed.params, lambda e: self._emit(flight, e))
        except StructKVError as e:
            self._send_error(sender, str(e))
            return
        except Exception as e:  # never leave a request without its final response
            self._send_error(sender, f"{type(e).__name__}: {e}")
            return
        with self.lock:
            if not flight.done:
                self.inflight[flight.rid] = flight

    def _emit(self, flight: _InFlight, event: Event) -> None:
        """Scheduler thread: one response per token when streaming; the final one at the end."""
        pb = self.pb
        if event.kind == "token":
            if flight.parsed.stream:
                if event.text:
                    flight.sender.send(self._response({"text_output": event.text}))
            else:
                flight.parts.append(event.text)
            return
        with self.lock:
            flight.done = True
            if flight.rid is not None:
                self.inflight.pop(flight.rid, None)
        if event.kind == "error":
            self._send_error(flight.sender, event.message or "the request failed")
            return
        if event.finish_reason == "abort" and flight.request.is_cancelled():
            error = pb.TritonError("the request was cancelled", pb.TritonError.CANCELLED)
            flight.sender.send(
                pb.InferenceResponse(error=error), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            )
            return
        if flight.parsed.stream:
            text = ""  # every delta went out already
        elif flight.parsed.exclude_input:
            text = "".join(flight.parts)
        else:
            text = flight.parsed.prompt + "".join(flight.parts)
        try:
            response = self._response(final_outputs(event, text))
        except Exception as e:  # the client gets an error, never silence (it would wait forever)
            self._send_error(flight.sender, f"the response could not be built: {e}")
            return
        flight.sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _response(self, outputs: dict[str, object]):
        pb = self.pb
        dtypes = {s.name: _OUT_DTYPES[s.dtype] for s in OUTPUTS}
        tensors = []
        for name, value in outputs.items():
            if dtypes[name] is np.object_:
                array = np.array([value.encode("utf-8")], dtype=np.object_)
            else:
                array = np.array([value], dtype=dtypes[name])
            tensors.append(pb.Tensor(name, array))
        return pb.InferenceResponse(output_tensors=tensors)

    def _send_error(self, sender, message: str) -> None:
        pb = self.pb
        sender.send(
            pb.InferenceResponse(error=pb.TritonError(message)),
            flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
        )

    # -- cancellation and metrics ----------------------------------------------------------------
    def _metrics(self, instance: str) -> dict:
        """Gauges (refreshed by the watcher) and counters (bumped by the observer hooks) on
        Triton's metrics endpoint, labelled by model and instance."""
        pb = self.pb
        self._labels = labels = {"model": self.name, "instance": instance}
        self._families = []  # a Metric must not outlive its MetricFamily: keep them both

        def metric(name: str, text: str, kind):
            family = pb.MetricFamily(name=name, description=text, kind=kind)
            self._families.append(family)
            return family

        gauges = {
            key: metric(name, text, pb.MetricFamily.GAUGE).Metric(labels=labels)
            for key, name, text in _GAUGES
        }
        self._counters = {
            key: metric(name, text, pb.MetricFamily.COUNTER).Metric(labels=labels)
            for key, name, text in _COUNTERS
        }
        self._finished_family = metric(
            "structkv_requests_finished", "requests by finish reason", pb.MetricFamily.COUNTER
        )
        self._finished: dict[str, object] = {}
        return gauges

    # the scheduler's observer hooks (its thread)
    def prefilled(self, request, seconds: float) -> None:
        n = len(request.prompt_ids)
        self._counters["prompt_tokens"].increment(n)
        saved = max(0, n - (request.stats or {}).get("propagated_tokens", n))
        self._counters["saved"].increment(saved)

    def inter_token(self, seconds: float) -> None:
        pass

    def decoded(self, batch_size: int) -> None:
        self._counters["steps"].increment(1)
        self._counters["rows"].increment(batch_size)

    def finished(self, reason: str) -> None:
        if reason not in self._finished:
            self._finished[reason] = self._finished_family.Metric(
                labels={**self._labels, "reason": reason}
            )
        self._finished[reason].increment(1)

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            with self.lock:
                flights = list(self.inflight.values())
            for flight in flights:
                try:
                    if flight.request.is_cancelled():
                        self.scheduler.cancel(flight.rid)
                except Exception:  # the request finished meanwhile
                    pass
            counts = self.scheduler.counts()
            counts["blocks_free"] = counts["blocks_total"] - counts["blocks_used"]
            for key, gauge in self._gauges.items():
                gauge.set(counts[key])

    def finalize(self) -> None:
        """Unload: requests in flight end with finish_reason "abort" and a final response."""
        self._stop.set()
        self.scheduler.stop(timeout=10)
        self._watcher.join(timeout=2)

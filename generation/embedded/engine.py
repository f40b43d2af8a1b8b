"""A continuous-batching text generator on llama.cpp's low-level API (llama-cpp-python ctypes).

One llama context holds `n_parallel` sequences ("slots"), each with its own KV cache stream
(kv_unified off, so a token's attention spans only its own sequence's cells, not every slot's).
One thread runs the decode loop: each step packs one `llama_batch` with the next token of every
generating slot plus prompt chunks of newly admitted requests, calls `llama_decode` once, and
samples each slot's next token with its own seeded sampler chain straight from the context's
logits (`llama_sampler_sample`), so no logits array is copied into Python. A finished request frees
its slot at once and a waiting request takes it on the next step. ctypes releases the GIL during
every llama.cpp call, so the HTTP server's event loop keeps running beside the decode loop.

Structured output: a request with a GBNF grammar gets its own grammar sampler (a clone of one
compiled per grammar and cached), and its slot samples in three stages over one candidate array:
truncation (top-k), the grammar over the candidates that are left, then the rest of the chain.
Checking a grammar over the whole 49k vocabulary costs 3-10 ms a token here, more than a
token's share of a decode step (~3 ms); over 40 candidates it costs ~0.04 ms. Only when no
candidate fits (the grammar forces a key or an enum value the model did not expect) does the
grammar look further, at the tokens whose first byte it allows (_FirstBytes). Slots without a
grammar sample exactly as before, so constrained and plain requests share a batch.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

log = logging.getLogger(__name__)

# llama-cpp-python's log bridge prints every llama.cpp INFO line (hundreds at load) by default.
logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)

_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


_GGML_TYPES = {"f16": 1, "q8_0": 8}  # ggml_type values


class PromptTooLongError(ValueError):
    """The prompt does not fit in one sequence's context."""


class EngineClosedError(RuntimeError):
    """The engine was shut down before the request finished."""


class GrammarError(ValueError):
    """llama.cpp could not compile a grammar, or a grammar left no token to sample."""


PENALTY_LAST_N = 256  # tokens the frequency and presence penalties look back over
GRAMMAR_CACHE_SIZE = 64  # compiled grammars kept (one per distinct schema in use)
GRAMMAR_TOP_K = 40  # candidates a greedy constrained request checks before the whole vocabulary
# llama_token_data as numpy sees it: the candidate array llama.cpp's samplers work on.
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: until end of turn or the sequence's context is full
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 40  # llama.cpp's default; also keeps sampling cheap over a 49k vocabulary
    seed: int | None = None
    stop: tuple[str, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    grammar: str | None = None  # GBNF (root rule "root") the completion must match


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class EngineConfig:
    n_parallel: int = 8
    n_threads: int = 2
    ctx_per_seq: int = 2048
    n_batch: int = 1024  # tokens per llama_decode: decode tokens first, then prompt chunks
    n_ubatch: int = 512
    flash_attn: bool = True
    kv_unified: bool = False
    cache_type: str = "q8_0"  # K/V cache type, "f16" or "q8_0" (q8_0: +3% at 600 tokens)
    adaptive_threads: bool = True  # fall back to 1 thread while another process takes a core


class ThreadChooser:
    """Picks the decode thread count (n_threads or 1) by measured seconds per token.

    ggml's threads meet at spin barriers hundreds of times per step. On an idle 2-core machine
    2 threads decode about 1.8x faster than 1, but while another process keeps one core busy
    the 2-thread steps wait for a descheduled thread at every barrier and throughput collapsed
    from ~360 to ~25 tok/s here, where 1 thread still gave ~150. So: decode with the current
    choice, every `probe_every` steps try the other one for `probe_steps` steps, and switch when
    it is clearly cheaper. A probe that loses makes the next one wait longer (up to 8x), which
    keeps the probing cost near 1% on a quiet machine; the first probe comes early.
    """

    def __init__(self, n_threads: int, probe_every: int = 128, probe_steps: int = 3) -> None:
        self.choices = (n_threads, 1) if n_threads > 1 else (n_threads,)
        self.current = n_threads
        self.probe_every = probe_every
        self.probe_steps = probe_steps
        self._cost: dict[int, float] = {}  # moving average of seconds per token
        self._backoff = dict.fromkeys(self.choices, 1)
        self._countdown = 16
        self._probing: int | None = None
        self._probe_costs: list[float] = []
        self.switches = 0

    def next_threads(self) -> int:
        if self._probing is None and len(self.choices) > 1:
            self._countdown -= 1
            if self._countdown <= 0 and self.current in self._cost:
                self._probing = next(c for c in self.choices if c != self.current)
                self._probe_costs = []
        return self._probing if self._probing is not None else self.current

    def record(self, threads: int, seconds_per_token: float) -> None:
        if threads == self._probing:
            self._probe_costs.append(seconds_per_token)
            if len(self._probe_costs) < self.probe_steps:
                return
            probe = sorted(self._probe_costs)[len(self._probe_costs) // 2]
            if probe < 0.85 * self._cost[self.current]:
                log.info("decode threads %d -> %d", self.current, threads)
                self.current, self._cost[threads] = threads, probe
                self._backoff = dict.fromkeys(self.choices, 1)
                self.switches += 1
            else:
                self._backoff[threads] = min(self._backoff[threads] * 2, 8)
            self._countdown = self.probe_every * self._backoff[threads]
            self._probing = None
        elif threads == self.current:
            old = self._cost.get(threads)
            self._cost[threads] = (
                seconds_per_token if old is None else 0.8 * old + 0.2 * seconds_per_token
            )


@dataclass
class _Request:
    tokens: list[int]
    params: SamplingParams
    future: Future[Completion]
    cancelled: threading.Event = field(default_factory=threading.Event)
    grammar: Any = None  # this request's own grammar sampler (llama_sampler_p), or None

    def release(self) -> None:
        """Free the grammar sampler of a request that never reached a slot."""
        if self.grammar is not None:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None


@dataclass
class _Constrained:
    """A constrained slot's samplers: truncation, its grammar, then the rest of the chain."""

    trunc: Any  # chain: top-k (may be empty)
    grammar: Any
    rest: Any  # chain: top-p, penalties, temperature, the draw
    truncates: bool  # False: no top-k, the grammar looks at every token each time

    def free(self) -> None:
        for sampler in (self.trunc, self.grammar, self.rest):
            llama_cpp.llama_sampler_free(sampler)


class _Grammars:
    """Compiled grammars by GBNF text, least recently used first out; requests get clones.

    Cloning copies the parsed rules, so a grammar is parsed once however many requests use it,
    and a template evicted later never frees a grammar that a request still holds.
    """

    def __init__(self, vocab: Any, size: int = GRAMMAR_CACHE_SIZE) -> None:
        self._vocab = vocab
        self._size = size
        self._templates: dict[str, Any] = {}  # insertion order = recency
        self._lock = threading.Lock()
        self.compiled = 0

    def clone(self, gbnf: str) -> Any:
        with self._lock:
            template = self._templates.pop(gbnf, None)
            if template is None:
                template = llama_cpp.llama_sampler_init_grammar(self._vocab, gbnf.encode(), b"root")
                if not template:  # NULL: llama.cpp logged the parse error
                    raise GrammarError("llama.cpp could not compile the grammar")
                self.compiled += 1
            self._templates[gbnf] = template
            while len(self._templates) > self._size:
                llama_cpp.llama_sampler_free(self._templates.pop(next(iter(self._templates))))
            return llama_cpp.llama_sampler_clone(template)

    def close(self) -> None:
        with self._lock:
            for template in self._templates.values():
                llama_cpp.llama_sampler_free(template)
            self._templates.clear()


class _Candidates:
    """The whole vocabulary as a llama_token_data_array, refilled from one row of logits.

    Engine thread only; one buffer serves every constrained slot in turn.
    """

    def __init__(self, n_vocab: int) -> None:
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._buf = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        # Any: llama-cpp-python types `data` as an array, but it is a pointer.
        self._ptr: Any = self._buf.ctypes.data_as(llama_cpp.llama_token_data_p)
        self._address = self._buf.ctypes.data
        self.array = llama_cpp.llama_token_data_array()
        self.ref = ctypes.byref(self.array)

    def fill(self, logits: np.ndarray[Any, Any], ids: np.ndarray[Any, Any] | None = None) -> Any:
        """The candidates `ids` (default: every token) with their logits; the array's ref."""
        buf = self._buf[: len(self._ids) if ids is None else len(ids)]
        buf["id"] = self._ids if ids is None else ids
        buf["logit"] = logits if ids is None else logits[ids]
        buf["p"] = 0.0
        array = self.array
        array.data, array.size, array.selected, array.sorted = self._ptr, len(buf), -1, False
        return self.ref

    def ids(self) -> np.ndarray[Any, Any]:
        return self._view()["id"]

    def _view(self) -> np.ndarray[Any, Any]:
        array = self.array
        # Samplers may point `data` elsewhere (llama.h allows it); read wherever it points.
        if ctypes.cast(array.data, ctypes.c_void_p).value == self._address:
            return self._buf[: array.size]
        return np.ctypeslib.as_array(array.data, shape=(array.size,))

    def keep_allowed(self) -> int:
        """Drop the candidates the grammar ruled out (-inf), keeping the order; how many are left.

        Needed, not only cheaper: top-k marks the array sorted, and the draw then takes the first
        entry as the largest logit, which a ruled-out -inf in front would break.
        """
        view = self._view()
        allowed = view[view["logit"] != -np.inf]  # a copy
        view[: len(allowed)] = allowed
        self.array.size = len(allowed)
        return len(allowed)

    def selected(self) -> int | None:
        """The token the chain drew, or None when it drew one the grammar had ruled out."""
        if not 0 <= self.array.selected < self.array.size:
            return None
        entry = self._view()[self.array.selected]
        return int(entry["id"]) if entry["logit"] != -np.inf else None


class _FirstBytes:
    """Token ids by the first byte of their text, to narrow a grammar's whole-vocabulary pass.

    A token fits a grammar only if its first byte does. So the grammar is first asked about one
    single-byte token per byte value (~256 candidates), then about the tokens that start with
    an allowed byte: where JSON forces a key or an enum value that is a few hundred tokens, not
    49k. Tokens the probe cannot speak for (no single-byte token for their first byte,
    end-of-generation) are always asked about.
    """

    def __init__(self, vocab: Any, n_vocab: int) -> None:
        first = np.full(n_vocab, -1, dtype=np.int32)  # -1: always ask
        probe = np.full(256, -1, dtype=np.int32)  # byte -> a token that is just that byte
        buf = ctypes.create_string_buffer(256)
        for token in range(n_vocab):
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                continue
            # special=True: the text the grammar sees (llama.cpp caches pieces that way).
            n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
            if n <= 0:  # empty (the grammar rejects it) or longer than the buffer
                first[token] = -2 if n == 0 else -1
                continue
            first[token] = byte = buf.raw[0]
            if n == 1 and probe[byte] < 0:
                probe[byte] = token
        first[np.isin(first, np.flatnonzero(probe < 0))] = -1  # bytes no probe speaks for
        order = np.argsort(first, kind="stable")
        bounds = np.searchsorted(first[order], np.arange(-1, 257))
        self._groups = [order[bounds[i] : bounds[i + 1]] for i in range(257)]  # [0]: always
        self.probes = probe[probe >= 0]
        probed = np.flatnonzero(probe >= 0).tolist()
        self._probe_byte = dict(zip(self.probes.tolist(), probed, strict=True))

    def candidates(self, allowed_probes: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """The tokens worth asking the grammar about, given the probe tokens it allowed."""
        bytes_ = [self._probe_byte[int(t)] for t in allowed_probes]
        return np.concatenate([self._groups[0], *(self._groups[b + 1] for b in bytes_)])


@dataclass
class _Slot:
    seq_id: int
    request: _Request | None = None
    sampler: Any = None  # llama_sampler_p of an unconstrained request's chain
    constrained: _Constrained | None = None  # a constrained request's samplers
    n_past: int = 0  # tokens of this sequence already in the KV cache
    pending: int = -1  # sampled token not yet decoded
    n_generated: int = 0
    out: bytearray = field(default_factory=bytearray)
    batch_index: int = -1  # index of this slot's logits in the last batch, -1 for none


class Engine:
    """Serves many concurrent generation requests from one model in one decode thread."""

    def __init__(self, model_path: Path, config: EngineConfig | None = None) -> None:
        self.config = cfg = config or EngineConfig()
        self.model_path = Path(model_path)
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        self._model = llama_cpp.llama_model_load_from_file(str(self.model_path).encode(), mparams)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load the model {self.model_path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._grammars = _Grammars(self._vocab)
        self._candidates = _Candidates(self._n_vocab)
        self._first_bytes: _FirstBytes | None = None
        cparams = llama_cpp.llama_context_default_params()
        # Without a unified cache n_ctx is split evenly across the n_seq_max streams.
        cparams.n_ctx = cfg.ctx_per_seq * cfg.n_parallel
        cparams.n_seq_max = cfg.n_parallel
        cparams.n_batch = cfg.n_batch
        cparams.n_ubatch = cfg.n_ubatch
        cparams.n_threads = cfg.n_threads
        cparams.n_threads_batch = cfg.n_threads
        cparams.kv_unified = cfg.kv_unified
        cparams.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if cfg.flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        cparams.type_k = cparams.type_v = _GGML_TYPES[cfg.cache_type]
        cparams.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise RuntimeError("llama.cpp could not create a context (out of memory?)")
        self.ctx_per_seq = int(llama_cpp.llama_n_ctx_seq(self._ctx))
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(cfg.n_batch, 0, 1)
        self._template = self._read_template()
        self._piece_buf = ctypes.create_string_buffer(256)

        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._slots = [_Slot(seq_id=i) for i in range(cfg.n_parallel)]
        self.threads = ThreadChooser(cfg.n_threads) if cfg.adaptive_threads else None
        self._threads_now = cfg.n_threads
        self._closed = threading.Event()
        self._stats_lock = threading.Lock()
        self.generated_tokens = 0  # total since start, for logs and benchmarks
        self.grammar_wide_passes = 0  # constrained tokens where no top-k candidate fitted
        self._thread = threading.Thread(target=self._run, name="llama-decode", daemon=True)
        self._thread.start()

    # -- public API (any thread) -------------------------------------------------------------

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt text for `messages` under the model's own chat template."""
        return self._template.render(
            messages=list(messages), add_generation_prompt=True, bos_token="", eos_token=""
        )

    def tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        # parse_special: the chat template's <|im_start|> markers must become control tokens.
        n_max = len(data) + 8
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, True, True)
        if n < 0:  # buffer too small (cannot happen with one token per byte, but be safe)
            buf = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, -n, True, True)
        return list(buf[:n])

    def submit_chat(
        self, messages: Sequence[dict[str, str]], params: SamplingParams
    ) -> tuple[Future[Completion], _Request]:
        return self.submit(self.tokenize(self.render_chat(messages)), params)

    def submit(
        self, tokens: list[int], params: SamplingParams
    ) -> tuple[Future[Completion], _Request]:
        """Queue a prompt; the future resolves when generation ends. Raises PromptTooLongError,
        and GrammarError for a grammar llama.cpp cannot compile."""
        if self._closed.is_set():
            raise EngineClosedError("the engine is shut down")
        if not tokens:
            raise ValueError("empty prompt")
        if len(tokens) >= self.ctx_per_seq:
            raise PromptTooLongError(
                f"the prompt has {len(tokens)} tokens; the context holds {self.ctx_per_seq} "
                "tokens per sequence (prompt and completion together)"
            )
        grammar = self._grammars.clone(params.grammar) if params.grammar else None
        request = _Request(tokens=tokens, params=params, future=Future(), grammar=grammar)
        self._queue.put(request)
        return request.future, request

    @staticmethod
    def cancel(request: _Request) -> None:
        """Stop a request (e.g. its client went away); its slot frees on the next step."""
        request.cancelled.set()

    def generate(self, messages: Sequence[dict[str, str]], params: SamplingParams) -> Completion:
        """Blocking convenience wrapper around submit_chat."""
        future, _ = self.submit_chat(messages, params)
        return future.result()

    def close(self, timeout: float = 10.0) -> None:
        """Fail what is pending, stop the decode thread, free llama.cpp's memory."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._queue.put(None)  # wake the loop if it is waiting for work
        self._thread.join(timeout)
        if self._thread.is_alive():  # a decode step is stuck: leave the memory to the OS
            log.warning("decode thread did not stop within %.0f s", timeout)
            return
        self._grammars.close()
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)
        llama_cpp.llama_model_free(self._model)

    @property
    def grammars_compiled(self) -> int:
        """Grammars parsed since start (a grammar in the cache is cloned, not parsed again)."""
        return self._grammars.compiled

    def load(self) -> dict[str, int]:
        """Busy slots and queued requests (a racy snapshot, for /health and tests)."""
        busy = sum(slot.request is not None for slot in self._slots)
        return {"slots": len(self._slots), "busy": busy, "queued": self._queue.qsize()}

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- decode loop (engine thread only) -----------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._closed.is_set():
                self._compact()
                self._admit()
                if not any(s.request for s in self._slots):
                    request = self._queue.get()  # idle: sleep until work arrives
                    if request is not None:
                        self._queue.put(request)
                    continue
                self._step()
        except BaseException as exc:  # never die silently: every caller would hang
            log.exception("decode loop crashed")
            self._fail_all(exc)
            self._closed.set()
        else:
            self._fail_all(EngineClosedError("the engine was shut down"))

    def _compact(self) -> None:
        """Keep the busy slots on sequence ids 0..m-1, with no gaps.

        With one KV stream per sequence llama.cpp puts only consecutive sequence ids into one
        ubatch, so a gap (slot 3 idle, 0-2 and 4-7 busy) costs a second pass over the weights on
        every step (measured: 60 ms instead of 40 ms per step at 15 of 16 busy). Moving the
        highest busy sequence into the hole copies its KV stream once (a few MB, once per finished
        request) instead.
        """
        slots = self._slots
        lo, hi = 0, len(slots) - 1
        while True:
            while lo < len(slots) and slots[lo].request is not None:
                lo += 1
            while hi >= 0 and slots[hi].request is None:
                hi -= 1
            if lo >= hi:
                return
            busy, free = slots[hi], slots[lo]
            if busy.n_past > 0:
                # Copied inside the next llama_decode, before anything new is written to `hi`.
                llama_cpp.llama_memory_seq_cp(self._mem, hi, lo, -1, -1)
                llama_cpp.llama_memory_seq_rm(self._mem, hi, -1, -1)
            slots[lo], slots[hi] = busy, free
            busy.seq_id, free.seq_id = lo, hi

    def _admit(self) -> None:
        for slot in self._slots:
            if slot.request is not None:
                continue
            request = self._next_request()
            if request is None:
                return
            slot.request = request
            if request.grammar is not None:
                slot.constrained = self._make_constrained(request.params, request.grammar)
                request.grammar = None  # the slot owns it now
            else:
                slot.sampler = self._make_sampler(request.params)
            slot.n_past = 0
            slot.pending = -1
            slot.n_generated = 0
            slot.out = bytearray()

    def _next_request(self) -> _Request | None:
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                return None
            if request is None:
                continue
            if request.cancelled.is_set():
                request.future.cancel()
                request.release()
                continue
            if request.future.set_running_or_notify_cancel():
                return request
            request.release()

    def _step(self) -> None:
        batch = self._batch
        n = 0
        budget = self.config.n_batch
        # Generating slots first (one token each), so a long prompt never stalls them.
        for slot in self._slots:
            slot.batch_index = -1
            if slot.request is None:
                continue
            if slot.request.cancelled.is_set():
                self._finish(slot, None)
                continue
            if slot.pending >= 0:
                self._put(batch, n, slot.pending, slot.n_past, slot.seq_id, True)
                slot.batch_index = n
                slot.n_past += 1
                n += 1
                budget -= 1
        n_decode = n
        # Then prompt chunks of slots still reading their prompt, within what is left.
        for slot in self._slots:
            if slot.request is None or slot.pending >= 0 or budget <= 0:
                continue
            prompt = slot.request.tokens
            chunk = prompt[slot.n_past : slot.n_past + budget]
            last = slot.n_past + len(chunk) == len(prompt)
            for i, token in enumerate(chunk):
                is_last = last and i == len(chunk) - 1
                self._put(batch, n, token, slot.n_past + i, slot.seq_id, is_last)
                if is_last:
                    slot.batch_index = n
                n += 1
            slot.n_past += len(chunk)
            budget -= len(chunk)
        if n == 0:
            return
        batch.n_tokens = n
        threads = self.threads.next_threads() if self.threads else self._threads_now
        if threads != self._threads_now:
            llama_cpp.llama_set_n_threads(self._ctx, threads, threads)
            self._threads_now = threads
        started = time.perf_counter()
        rc = llama_cpp.llama_decode(self._ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")
        if self.threads and n == n_decode:  # steps with prompt chunks cost differently per token
            self.threads.record(threads, (time.perf_counter() - started) / n)
        for slot in self._slots:
            if slot.request is not None and slot.batch_index >= 0:
                self._sample(slot)

    @staticmethod
    def _put(batch: Any, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits

    def _sample(self, slot: _Slot) -> None:
        request = slot.request
        assert request is not None
        if slot.constrained is None:
            token = llama_cpp.llama_sampler_sample(slot.sampler, self._ctx, slot.batch_index)
        else:
            drawn = self._sample_constrained(slot.constrained, slot.batch_index)
            if drawn is None:
                self._finish(slot, None, GrammarError("the grammar allows no next token"))
                return
            token = drawn
        slot.n_generated += 1
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._finish(slot, "stop")
            return
        start = len(slot.out)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece_buf, 256, 0, False)
        slot.out += self._piece_buf.raw[: max(n, 0)]
        if request.params.stop and self._cut_at_stop(slot, start):
            self._finish(slot, "stop")
            return
        max_tokens = request.params.max_tokens
        if (max_tokens is not None and slot.n_generated >= max_tokens) or (
            slot.n_past + 1 >= self.ctx_per_seq
        ):
            self._finish(slot, "length")
            return
        slot.pending = token

    def _sample_constrained(self, c: _Constrained, index: int) -> int | None:
        """Top-k, the grammar over what is left, the rest; the grammar over the whole vocabulary
        only when no top candidate fits. None if even that leaves nothing."""
        row = llama_cpp.llama_get_logits_ith(self._ctx, index)
        logits = np.ctypeslib.as_array(row, shape=(self._n_vocab,))
        cands = self._candidates
        cur = cands.fill(logits)
        if c.truncates:
            llama_cpp.llama_sampler_apply(c.trunc, cur)
            llama_cpp.llama_sampler_apply(c.grammar, cur)
        if not c.truncates or not cands.keep_allowed():
            self.grammar_wide_passes += 1
            cur = self._narrowed_pass(c.grammar, logits)
            if cur is None:
                return None
            llama_cpp.llama_sampler_apply(c.trunc, cur)
        llama_cpp.llama_sampler_apply(c.rest, cur)
        token = cands.selected()
        if token is None:
            return None
        # Accepting a token the grammar rejects aborts the process; this one passed it. An
        # end-of-generation token passed only because the grammar is complete: nothing to accept.
        if not llama_cpp.llama_vocab_is_eog(self._vocab, token):
            llama_cpp.llama_sampler_accept(c.grammar, token)
        llama_cpp.llama_sampler_accept(c.trunc, token)
        llama_cpp.llama_sampler_accept(c.rest, token)
        return token

    def _narrowed_pass(self, grammar: Any, logits: np.ndarray[Any, Any]) -> Any:
        """The grammar over every token whose first byte it allows (_FirstBytes); the candidate
        array's ref, or None when no token fits."""
        if self._first_bytes is None:  # built on first need: ~0.1 s over the vocabulary
            self._first_bytes = _FirstBytes(self._vocab, self._n_vocab)
        index, cands = self._first_bytes, self._candidates
        cur = cands.fill(logits, index.probes)
        llama_cpp.llama_sampler_apply(grammar, cur)
        cands.keep_allowed()
        cur = cands.fill(logits, index.candidates(cands.ids()))
        llama_cpp.llama_sampler_apply(grammar, cur)
        return cur if cands.keep_allowed() else None

    @staticmethod
    def _cut_at_stop(slot: _Slot, start: int) -> bool:
        """Truncate the output at the first stop string that the newest piece completed."""
        assert slot.request is not None
        hit = -1
        for stop in slot.request.params.stop:
            needle = stop.encode("utf-8")
            # Only matches that end inside the new piece are new; UTF-8 is self-synchronizing,
            # so a byte search never matches across a character boundary.
            pos = slot.out.find(needle, max(0, start - len(needle) + 1))
            if pos >= 0 and (hit < 0 or pos < hit):
                hit = pos
        if hit < 0:
            return False
        del slot.out[hit:]
        return True

    def _finish(self, slot: _Slot, reason: str | None, error: Exception | None = None) -> None:
        """End the slot's request: a completion with `reason`, else `error` (or cancelled)."""
        request = slot.request
        assert request is not None
        if reason is not None and not request.future.done():
            request.future.set_result(
                Completion(
                    text=slot.out.decode("utf-8", errors="replace"),
                    finish_reason=reason,
                    prompt_tokens=len(request.tokens),
                    completion_tokens=slot.n_generated,
                )
            )
        elif not request.future.done():
            request.future.set_exception(error or EngineClosedError("request cancelled"))
        with self._stats_lock:
            self.generated_tokens += slot.n_generated
        llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
        if slot.constrained is not None:
            slot.constrained.free()
        else:
            llama_cpp.llama_sampler_free(slot.sampler)
        slot.sampler = slot.constrained = None
        slot.request = None
        slot.pending = -1
        slot.batch_index = -1

    def _fail_all(self, exc: BaseException) -> None:
        for slot in self._slots:
            if slot.request is not None:
                if not slot.request.future.done():
                    slot.request.future.set_exception(exc)
                slot.request.cancelled.set()
                self._finish(slot, None)
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                return
            if request is not None:
                request.release()
                if not request.future.done():
                    request.future.set_exception(exc)

    def _make_sampler(self, params: SamplingParams) -> Any:
        trunc, rest = self._stages(params)
        return self._chain([*trunc, *rest])

    def _make_constrained(self, params: SamplingParams, grammar: Any) -> _Constrained:
        trunc, rest = self._stages(params)
        if not trunc and params.temperature <= 0:
            # Greedy: the best allowed token is among the top candidates whenever one fits,
            # and the whole-vocabulary pass finds it otherwise, so this changes no answer.
            trunc = [llama_cpp.llama_sampler_init_top_k(GRAMMAR_TOP_K)]
        return _Constrained(self._chain(trunc), grammar, self._chain(rest), truncates=bool(trunc))

    @staticmethod
    def _chain(samplers: Sequence[Any]) -> Any:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        for sampler in samplers:
            llama_cpp.llama_sampler_chain_add(chain, sampler)
        return chain

    def _stages(self, params: SamplingParams) -> tuple[list[Any], list[Any]]:
        """The samplers in llama.cpp's own order, split into truncation (top-k) and the rest
        (top-p, penalties, temperature, the draw)."""
        penalised = bool(params.frequency_penalty or params.presence_penalty)
        if params.temperature <= 0 and not penalised:
            return [], [llama_cpp.llama_sampler_init_greedy()]
        trunc = [llama_cpp.llama_sampler_init_top_k(params.top_k)] if params.top_k > 0 else []
        rest = []
        if params.top_p < 1.0 and params.temperature > 0:
            rest.append(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        if penalised:
            # After top-k (llama.cpp warns that penalties over the whole vocabulary are slow):
            # the kept candidates are penalised for their counts in the last PENALTY_LAST_N
            # tokens (llama_sampler_sample accepts each token it draws).
            n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
            rest.append(
                llama_cpp.llama_sampler_init_penalties(
                    n_vocab, PENALTY_LAST_N, 1.0, params.frequency_penalty, params.presence_penalty
                )
            )
        if params.temperature <= 0:
            rest.append(llama_cpp.llama_sampler_init_greedy())
            return trunc, rest
        rest.append(llama_cpp.llama_sampler_init_temp(params.temperature))
        # No seed given: a fresh one per request, so repeated prompts give different texts.
        seed = params.seed if params.seed is not None else time.time_ns() & 0xFFFFFFFF
        rest.append(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return trunc, rest

    def _read_template(self) -> Any:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        source = llama_cpp.llama_model_chat_template(self._model, None)
        text = source.decode("utf-8") if source else _CHATML
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(text)

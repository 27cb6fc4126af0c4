"""Dynamic batching: one worker thread owns the model; requests wait in a bounded queue.

The worker takes the oldest waiting request and up to ``max_batch - 1`` more that are waiting,
prefills them as one left-padded batch on a KV cache (``CachedBatch``, the code ``generate_greedy``
runs), and decodes them together one token per row per step; a row that finishes (stop token,
stop string, ``max_tokens``, or a client that went away) leaves the batch at once, with its cache
rows and the model's per-sequence state. Requests that arrive meanwhile join the running batch
before its next step while it has fewer than ``max_batch`` rows (continuous batching,
``CachedBatch.join``: they are prefilled on their own and their cache rows appended); models
whose cache cannot be joined (sliding-window layers) or that pool prompts token by token keep
them for the next batch.
All torch calls happen on the worker thread; the HTTP side only enqueues ``Job``s and reads their
events (``Started``, ``Delta``, ``Finished``, ``Failed``) from an asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from forgetless.evaluation.inference import CachedBatch
from forgetless.serving.decoding import (
    ReplyText,
    Sampling,
    TokenLogprobs,
    choose_tokens,
    logprobs_of,
    prompt_logprobs,
)
from forgetless.serving.protocol import ApiError
from forgetless.serving.routing import RouteReader

logger = logging.getLogger("forgetless.serving")


@dataclass(frozen=True)
class Started:
    """The prompt was prefilled: the route it took, and its log-probabilities when asked (echo)."""

    route: str
    prompt_logprobs: TokenLogprobs | None = None


@dataclass(frozen=True)
class Delta:
    """One new token: the text it makes sendable (may be empty) and its log-probabilities."""

    text: str
    logprobs: TokenLogprobs | None = None


@dataclass(frozen=True)
class Finished:
    """The reply ended: ``finish_reason`` is ``stop`` or ``length``; ``text`` is the whole reply."""

    finish_reason: str
    text: str
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The request could not be served; ``status`` is its HTTP status."""

    message: str
    status: int = 500


Event = Started | Delta | Finished | Failed


@dataclass
class Job:
    """One prompt to decode. Created on the event loop, which receives its events."""

    prompt_ids: list[int]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    #: set by the HTTP side when the client went away: the worker drops the row at its next step
    cancelled: bool = False

    def emit(self, event: Event) -> None:
        """Hand an event to the request (thread-safe; dropped when its event loop has closed)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            self.cancelled = True

    async def next_event(self) -> Event:
        return await self.events.get()


class _Row:
    """The decoding state of one job in a batch: its reply text, token count and generator."""

    def __init__(self, job: Job, decode: Callable[[Sequence[int]], str], device: torch.device) -> None:
        self.job, self.sampling = job, job.sampling
        self.reply = ReplyText(decode, job.sampling.stop)
        self.generator = job.sampling.generator(device)
        self.finished = job.cancelled or self._finish_if_empty()

    def _finish_if_empty(self) -> bool:
        if self.sampling.max_tokens > 0:
            return False
        self.job.emit(Finished("length", "", 0))
        return True

    def add(self, token: int, stop_token_ids: frozenset[int], logprobs: TokenLogprobs | None) -> bool:
        """Take the row's next token; returns whether the row goes on decoding."""
        if self.job.cancelled:
            return False
        if token in stop_token_ids:
            return self._finish("stop")
        self.job.emit(Delta(self.reply.add(token), logprobs))
        if self.reply.stopped:
            return self._finish("stop")
        if len(self.reply.token_ids) >= self.sampling.max_tokens:
            return self._finish("length")
        return True

    def _finish(self, reason: str) -> bool:
        rest = self.reply.flush()
        if rest:
            self.job.emit(Delta(rest))
        self.job.emit(Finished(reason, self.reply.text, len(self.reply.token_ids)))
        return False


class Engine:
    """The model, its tokenizer, the bounded queue and the worker that decodes batches.

    Args:
        model: causal LM (eval mode is set); only the worker thread calls it.
        tokenizer: its tokenizer (``pad_token_id`` pads the batches).
        stop_token_ids: tokens that end a reply (EOS, end of turn).
        max_batch: rows per batch at most.
        queue_size: requests that may wait at most; more are refused (``ApiError`` 503).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: object,
        stop_token_ids: set[int] | frozenset[int],
        *,
        max_batch: int = 8,
        queue_size: int = 64,
    ) -> None:
        if max_batch < 1 or queue_size < 1:
            raise ValueError(f"max_batch and queue_size must be >= 1, got {max_batch} and {queue_size}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.stop_token_ids = frozenset(stop_token_ids)
        self.max_batch = max_batch
        self.routes = RouteReader(model)
        self.running = 0  # rows of the batch being decoded
        # batches decoded, the rows they held (rows / batches: the mean batch size), tokens generated
        self.batches = self.rows = self.tokens = 0
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self._batch_jobs: list[Job] = []  # the jobs of the batch being decoded (a failure fails them all)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def waiting(self) -> int:
        """Requests in the queue, not yet in a batch."""
        return self._queue.qsize()

    def decode(self, token_ids: Sequence[int]) -> str:
        """Reply text: special tokens left out, as evaluation decodes."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        """The text of one token as ``logprobs`` reports it (special tokens included)."""
        return self.tokenizer.decode([token])

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue ``jobs`` (one request's prompts); a full queue refuses all of them with a 503."""
        if self._stopping.is_set():
            raise ApiError("the server is shutting down; retry on another server", status=503)
        for index, job in enumerate(jobs):
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                for queued in jobs[:index]:
                    queued.cancelled = True  # the worker skips them
                raise ApiError(
                    f"the server is busy: its queue of {self._queue.maxsize} waiting requests is full "
                    "(forgetless serve --queue-size); retry in a moment",
                    status=503,
                ) from None

    def start(self) -> None:
        """Start the worker thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="forgetless-serve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch being decoded, refuse what still waits, and end the worker."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._refuse_waiting()

    def _refuse_waiting(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            job.emit(Failed("the server is shutting down; retry on another server", status=503))

    def _take_batch(self) -> list[Job]:
        """The oldest waiting job (waiting for one) and up to ``max_batch - 1`` more; [] to stop."""
        while not self._stopping.is_set():
            try:
                batch = [self._queue.get(timeout=0.1)]
            except queue.Empty:
                continue
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            batch = [job for job in batch if not job.cancelled]
            if batch:
                return batch
        return []

    def _work(self) -> None:
        while batch := self._take_batch():
            self.running = len(batch)
            self.batches, self.rows = self.batches + 1, self.rows + len(batch)
            self._batch_jobs = list(batch)  # and every job that joins it (_join_waiting)
            try:
                self._decode(batch)
            except Exception as error:  # one bad batch must not end the server
                logger.exception("decoding a batch of %d failed", len(self._batch_jobs))
                for job in self._batch_jobs:
                    job.emit(Failed(f"the model failed on this batch: {type(error).__name__}: {error}"))
            finally:
                self.running, self._batch_jobs = 0, []

    def _started(self, jobs: list[Job], rows: CachedBatch) -> None:
        """Right after ``jobs`` were prefilled as ``rows``: report each one's route (and its prompt's
        log-probabilities when asked)."""
        for row, (job, route) in enumerate(zip(jobs, self.routes.read(len(jobs)))):
            scored = None
            if job.sampling.echo and job.sampling.logprobs is not None:
                scored = prompt_logprobs(
                    rows.prompt_logits[row], job.prompt_ids, job.sampling.logprobs, self.token_text
                )
            job.emit(Started(route, scored))
        rows.prompt_logits = None  # (B, T, V): free it before decoding

    def _waiting_jobs(self, room: int) -> list[Job]:
        """Up to ``room`` jobs that are waiting now, without waiting for more."""
        jobs: list[Job] = []
        while len(jobs) < room and not self._stopping.is_set():
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if not job.cancelled:
                jobs.append(job)
        return jobs

    def _join_waiting(self, rows: CachedBatch, active: list[_Row]) -> list[_Row]:
        """Continuous batching: prefill the jobs that wait (as many as the batch has room for) and
        add them to the running ``rows``; returns the new ``active`` (row order of ``rows``)."""
        if self._queue.empty() or len(active) >= self.max_batch or not rows.can_join():
            return active
        jobs = self._waiting_jobs(self.max_batch - len(active))
        if not jobs:
            return active
        echo = any(job.sampling.echo and job.sampling.logprobs is not None for job in jobs)
        try:
            rows.join(
                [job.prompt_ids for job in jobs], echo, after_prefill=lambda new: self._started(jobs, new)
            )
        except Exception as error:  # the joining jobs fail; the running rows go on (join undid itself)
            logger.exception("prefilling %d joining requests failed", len(jobs))
            for job in jobs:
                job.emit(Failed(f"the model failed on this request: {type(error).__name__}: {error}"))
            return active
        self.rows += len(jobs)
        self._batch_jobs.extend(jobs)
        joined = [_Row(job, self.decode, rows.device) for job in jobs]
        kept = list(range(len(active))) + [
            len(active) + i for i, row in enumerate(joined) if not row.finished
        ]
        rows.keep(kept)
        return active + [row for row in joined if not row.finished]

    @torch.no_grad()
    def _decode(self, jobs: list[Job]) -> None:
        """Prefill ``jobs`` as one batch, report their routes, then decode until every row ends;
        jobs that arrive meanwhile join the batch while it has room (``_join_waiting``). Only the
        running rows are kept: a batch that never ends holds no finished replies."""
        echo = any(job.sampling.echo and job.sampling.logprobs is not None for job in jobs)
        rows = CachedBatch(self.model, [job.prompt_ids for job in jobs], self.tokenizer.pad_token_id, echo)
        self._started(jobs, rows)
        states = [_Row(job, self.decode, rows.device) for job in jobs]
        active = [state for state in states if not state.finished]
        if not active:
            return
        rows.keep([index for index, state in enumerate(states) if not state.finished])
        while True:
            active = self._join_waiting(rows, active)
            self.running = len(active)
            logits = rows.logits
            samplings = [state.sampling for state in active]
            tokens = choose_tokens(logits, samplings, [state.generator for state in active])
            running, self.tokens = [], self.tokens + len(active)
            for position, state in enumerate(active):
                token, top = int(tokens[position]), samplings[position].logprobs
                scored = None
                if top is not None:
                    scored = logprobs_of(logits[position : position + 1], [token], top, self.token_text)
                if state.add(token, self.stop_token_ids, scored):
                    running.append(position)
            if not running:
                return
            rows.keep(running)
            tokens = tokens[torch.tensor(running, device=tokens.device)]
            active = [active[position] for position in running]
            rows.step(tokens)

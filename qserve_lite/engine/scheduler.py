"""Scheduler: in-flight batching. Each step is either a prefill of newly admitted sequences or one decode
token for every running sequence (never mixed; no chunked prefill), as in QServe.

- Admission (FCFS): waiting sequences are admitted while the step's tokens stay within
  `max_num_batched_tokens`, the running sequences within `max_num_seqs`, and the block manager can give
  them their pages above the watermark. A step that admits anything is a prefill step.
- Decode: every running sequence gets one token. When a sequence needs a new page and none is free,
  the newest running sequence is preempted by recompute (its pages freed, it goes back to the front of
  the waiting queue and is prefilled again, prompt + generated tokens, when there is room).
- The engine guarantees max_model_len <= max_num_batched_tokens and <= the pool, so a sequence alone
  always fits: the oldest one always progresses, nothing loops.
- Overlapped steps (engine/llm_engine.py): a running sequence may hold one pending token (sampled on the
  device, unknown on the host). Its length counts it; a sequence whose pending token is certainly its last
  (max_tokens, max_model_len) is not scheduled again. `needs_host_state` says when the next schedule would
  admit or preempt, which the engine does only with no step in flight.
- Each running sequence holds a `slot` in [0, max_num_seqs): its row of the runner's per-sequence state.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

from qserve_lite.engine.block_manager import BlockManager
from qserve_lite.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    is_prefill: bool

    @property
    def num_tokens(self) -> int:
        """Tokens that go through the model: all uncached ones (prefill) or one each (decode)."""
        if self.is_prefill:
            return sum(len(s) - s.num_cached_tokens for s in self.seqs)
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int | None = None):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len if max_model_len is not None else max_num_batched_tokens
        self.free_slots = list(range(max_num_seqs - 1, -1, -1))  # pop() hands out the lowest first
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # ordered by seq_id: oldest first, newest last
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        """The next step's batch, or None when nothing is left."""
        admitted = self._admit()
        if admitted:
            return ScheduledBatch(admitted, is_prefill=True)
        if not self.running:
            assert not self.waiting, "a waiting sequence cannot be admitted into an empty cache"
            return None
        return ScheduledBatch(self._grow_running(), is_prefill=False)

    def _admit(self) -> list[Sequence]:
        bm, admitted, tokens = self.block_manager, [], 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = len(seq) - seq.num_cached_tokens
            if tokens + n > self.max_num_batched_tokens:
                break
            # an empty cache takes anything that fits at all: the watermark must not starve a long sequence
            if not bm.can_allocate(seq, use_watermark=bool(self.running)):
                break
            bm.allocate(seq)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.slot = self.free_slots.pop()
            bisect.insort(self.running, seq, key=lambda s: s.seq_id)
            admitted.append(seq)
            tokens += n
        return admitted

    def _grow_running(self) -> list[Sequence]:
        """Give every running sequence the slot for its next token, preempting the newest when out of
        pages. Returns the sequences that decode this step (oldest first)."""
        bm, scheduled = self.block_manager, []
        queue = deque(self.running)
        while queue:
            seq = queue.popleft()
            if seq.ends_after_pending(self.max_model_len):
                continue  # finishes when its pending token arrives: no more steps
            while not bm.can_append(seq):
                self.preempt(queue.pop() if queue else seq)
                if seq.status is not SequenceStatus.RUNNING:
                    break
            else:
                bm.append(seq)
                scheduled.append(seq)
        return scheduled

    def needs_host_state(self) -> bool:
        """The next schedule() would admit a waiting sequence or preempt a running one: both need every
        token of the running sequences on the host (no step in flight)."""
        bm = self.block_manager
        if self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            fits = len(seq) - seq.num_cached_tokens <= self.max_num_batched_tokens
            if fits and bm.can_allocate(seq, use_watermark=bool(self.running)):
                return True
        growing = [s for s in self.running if not s.ends_after_pending(self.max_model_len)]
        return sum(bm.pages_missing(s) for s in growing) > bm.num_free

    def _release_slot(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
            seq.slot = None

    def preempt(self, seq: Sequence) -> None:
        """Recompute preemption: free seq's pages and queue it first for a fresh prefill."""
        assert seq.num_pending == 0, "preempting a sequence with a token in flight"
        self.running.remove(seq)
        self._release_slot(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End seq (a running or waiting one) and give its pages back."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self._release_slot(seq)
        self.block_manager.free(seq)
        seq.num_pending = 0  # a token still in flight for it is discarded
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

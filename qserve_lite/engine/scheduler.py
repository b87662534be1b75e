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
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
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
            while not bm.can_append(seq):
                self.preempt(queue.pop() if queue else seq)
                if seq.status is not SequenceStatus.RUNNING:
                    break
            else:
                bm.append(seq)
                scheduled.append(seq)
        return scheduled

    def preempt(self, seq: Sequence) -> None:
        """Recompute preemption: free seq's pages and queue it first for a fresh prefill."""
        self.running.remove(seq)
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
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

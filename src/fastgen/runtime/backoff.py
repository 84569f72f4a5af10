"""Out-of-memory back-off of one queue's batch limit: down by bisection, back up by probing.

Running out of device memory says that one size did not fit *then*; it may be transient (another
process held memory for a while) and it says nothing about the sizes between the last one that fit
and it. So the limit never just halves for good:

- down: to the largest size that fit since (a size that failed is retried in halves by
  :func:`fastgen.runtime.execution.isolate`, so one usually fits in the same run), else to half the
  size that failed;
- up: once ``probe_after`` batches as large as any that fit have fit again, to the midpoint between
  the limit and the smallest size that failed (then towards the configured limit, once that size has fit): a
  bisection that ends at the largest size that fits, not at a power-of-two fraction of it;
- at the boundary (the size that failed is one above the limit) the failed size itself is
  retried after ``probe_after`` such batches, then after twice as many each time it fails again,
  so a real limit costs a failed batch only rarely and a transient one is forgotten.

Pure Python; the worker keeps one per queue while its limit is below the configured one.
"""

from __future__ import annotations

#: The most a boundary probe's wait grows to, in multiples of ``probe_after``.
MAX_PATIENCE = 64


class MemoryBackoff:
    """The batch limit of one queue after running out of memory at ``ceiling`` (its configured limit)."""

    def __init__(self, ceiling: int, probe_after: int) -> None:
        self.ceiling = int(ceiling)
        self.limit = self.ceiling
        self.good = 0
        """The largest size that fit since the last failure at or below it (0: none)."""
        self.bad: int | None = None
        """The smallest size that ran out of memory (None: none, or something as large fit since)."""
        self.streak = 0
        """Batches as large as the largest that fit, since the limit last changed."""
        self.probe_after = int(probe_after)
        self.patience = self.probe_after
        self.probing: int | None = None
        """The size a probe raised the limit to, until a batch of it fits or fails."""
        self.boundary = False  # whether that probe retries the failed size itself

    def observe(self, size: int, fit: bool) -> None:
        """A call of ``size`` (requests, or UNet rows) fit in memory, or ran out of it."""
        if fit:
            if self.probing is not None and size > self.good:  # larger than anything before the probe
                self.probing = None
                self.patience = self.probe_after
            self.good = max(self.good, size)
            if self.bad is not None and size >= self.bad:
                self.bad = None  # what failed fits now: the pressure was transient
            # A batch as large as any that fit counts (not only one at the limit: requests of several
            # rows may never add up to it exactly); smaller ones say nothing about larger sizes.
            if size >= self.good:
                self.streak += 1
            return
        if self.good >= size:
            self.good = 0  # what fit before does not now: the device holds less than it did
        self.bad = size if self.bad is None else min(self.bad, size)
        if self.probing is not None and size >= self.probing:
            if self.boundary:
                self.patience = min(self.patience * 2, self.probe_after * MAX_PATIENCE)
            self.probing = None
        self.limit = max(1, min(self.limit, self.good if self.good else size // 2))
        self.streak = 0

    def maybe_probe(self) -> bool:
        """Raise the limit if enough full batches fit at it; returns whether it changed."""
        if self.streak < self.patience or self.limit >= self.ceiling:
            return False
        top = self.bad if self.bad is not None else self.ceiling + 1
        base = max(self.limit, self.good)
        new = (base + top) // 2
        self.boundary = new <= self.limit
        if self.boundary:  # one below the size that failed: retry that size, which may fit by now
            new = self.limit + 1
        self.limit = min(new, self.ceiling)
        self.probing = self.limit
        self.streak = 0
        return True

    @property
    def recovered(self) -> bool:
        """Back at the configured limit with no failure outstanding: the back-off can be dropped."""
        return self.limit >= self.ceiling and self.probing is None


__all__ = ["MAX_PATIENCE", "MemoryBackoff"]

"""Progress for long library work: a rich bar on stderr when asked for, log lines always."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

logger = logging.getLogger(__name__)


class Steps:
    """A fixed number of named steps; ``advance(label)`` starts the next one."""

    def __init__(self, description: str, total: int, bar=None, task=None) -> None:
        self.description = description
        self.total = total
        self._bar = bar
        self._task = task
        self._done = 0

    def advance(self, label: str) -> None:
        logger.info("%s: %s", self.description, label)
        if self._bar is not None:
            if self._done:
                self._bar.advance(self._task)
            self._bar.update(self._task, description=f"{self.description}: {label}")
        self._done += 1


@contextlib.contextmanager
def steps(description: str, total: int, enabled: bool = False) -> Iterator[Steps]:
    """Context manager yielding :class:`Steps`; with ``enabled`` a rich progress bar is shown."""
    if not enabled:
        yield Steps(description, total)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)
        s = Steps(description, total, bar, task)
        try:
            yield s
        except BaseException:
            # A failed step leaves no bar behind: the CLI's contract is one `error: ...` line on
            # stderr, and a half-filled bar above it is noise (off a terminal rich prints the bar
            # once, when it stops, unless it is transient).
            bar.live.transient = True
            raise
        bar.update(task, completed=total, description=f"{description}: done")

"""Crash- and hang-proof execution of a list of items (tests, benchmark tasks) by worker processes.

A worker is any command that works through the ids it is given, in order, and appends JSON lines to a
progress file: ``{"event": "start", "id": ...}`` before an item and ``{"event": "end", "id": ...,
"status": ..., ...}`` after it. The supervisor watches that file. An item running past its timeout gets
its worker killed (the whole process group) and is recorded as ``timeout``; a worker that dies mid-item
(a segfault, a CUDA abort, an OOM kill) leaves that item recorded as ``crashed`` with the exit code and
the tail of its stderr. Either way a new worker is started for the items still to do, so one bad kernel
never stops the others being measured. At the phase deadline every worker is stopped and what is left is
recorded as ``not run`` with the reason. No torch import here: the CI tests drive it with toy workers.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

POLL_S = 0.2


@dataclass
class Group:
    """Items one worker process runs in order; ``command(ids, progress_path)`` -> (argv, extra env)."""
    name: str
    items: list  # of (id, timeout_s)
    command: Callable[[list, Path], tuple]
    launches: int = 0
    done: dict = field(default_factory=dict)


def read_progress(path: Path, offset: int = 0) -> tuple:
    """(events, new offset) of the complete JSON lines appended to ``path`` since ``offset``."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1  # a half-written last line waits for the next poll
    events = []
    for line in data[:end].splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue  # a torn line from a killed worker
    return events, offset + end


def emit(path, event: dict) -> None:
    """Append one progress event (workers call this; flushed so the supervisor sees it at once)."""
    with open(path, "a") as fh:
        fh.write(json.dumps(event, default=str) + "\n")
        fh.flush()


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace")
    except OSError:
        return ""


class _Run:
    def __init__(self, group: Group, workdir: Path, env: dict):
        group.launches += 1
        ids = [i for i, _ in group.items if i not in group.done]
        self.group = group
        self.timeouts = dict(group.items)
        stem = f"{_safe(group.name)}.{group.launches}"
        self.progress = workdir / f"{stem}.jsonl"
        self.stderr = workdir / f"{stem}.stderr"
        argv, extra = group.command(ids, self.progress)
        self.ids = ids
        self.current: Optional[str] = None
        self.started_at = 0.0
        self.any_started = False
        self.offset = 0
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(argv, stdout=err, stderr=subprocess.STDOUT, env={**env, **(extra or {})},
                                         start_new_session=True)

    def poll(self) -> None:
        events, self.offset = read_progress(self.progress, self.offset)
        for ev in events:
            if ev.get("event") == "start":
                self.current, self.started_at, self.any_started = ev["id"], time.monotonic(), True
            elif ev.get("event") == "end":
                rec = {k: v for k, v in ev.items() if k != "event"}
                self.group.done[ev["id"]] = rec
                if ev["id"] == self.current:
                    self.current = None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def run_groups(groups: Sequence[Group], *, workdir, deadline: float, parallel: int = 1,
               env: Optional[dict] = None, log: Callable[[str], None] = print) -> dict:
    """Run every group's items; return {id: record}. ``deadline`` is a ``time.monotonic()`` value.

    Each record has ``status`` (from the worker: ``ok``/``passed``/``failed``/``skipped``/``error``...,
    or from here: ``timeout``, ``crashed``, ``not run``) and, for the last three, ``reason``."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if env is None else env)
    pending = [g for g in groups if g.items]
    running: list = []
    while pending or running:
        while pending and len(running) < parallel and time.monotonic() < deadline:
            running.append(_Run(pending.pop(0), workdir, env))
        if not running:
            break
        time.sleep(POLL_S)
        for run in list(running):
            run.poll()
            g = run.group
            now = time.monotonic()
            if now >= deadline:
                _kill(run.proc)
                run.poll()
                if run.current is not None and run.current not in g.done:
                    g.done[run.current] = {"id": run.current, "status": "timeout",
                                           "reason": "phase budget ran out while it ran"}
                running.remove(run)
                continue
            if run.current is not None and now - run.started_at > run.timeouts.get(run.current, 60):
                _kill(run.proc)
                run.poll()
                if run.current not in g.done:
                    lim = run.timeouts.get(run.current, 60)
                    g.done[run.current] = {"id": run.current, "status": "timeout",
                                           "reason": f"still running after {lim:g} s; worker killed",
                                           "log_tail": _tail(run.stderr)}
                    log(f"  timeout: {run.current} (> {lim:g} s)")
                running.remove(run)
                _requeue(g, pending)
                continue
            rc = run.proc.poll()
            if rc is None:
                continue
            run.poll()  # events written just before exit
            running.remove(run)
            if run.current is not None and run.current not in g.done:
                g.done[run.current] = {"id": run.current, "status": "crashed",
                                       "reason": f"worker exited with code {rc} during this item",
                                       "log_tail": _tail(run.stderr)}
                log(f"  crashed: {run.current} (exit code {rc})")
                _requeue(g, pending)
            elif not run.any_started and any(i not in g.done for i in run.ids):
                # the worker died before its first item (import error, bad argument): do not loop
                for i in run.ids:
                    g.done.setdefault(i, {"id": i, "status": "error",
                                          "reason": f"worker exited with code {rc} before starting",
                                          "log_tail": _tail(run.stderr)})
            else:
                for i in run.ids:  # a worker that skipped ids without a word: say so
                    g.done.setdefault(i, {"id": i, "status": "error", "reason": f"worker exited ({rc}) without it",
                                          "log_tail": _tail(run.stderr)})
    out = {}
    for g in groups:
        for i, _ in g.items:
            out[i] = g.done.get(i) or {"id": i, "status": "not run", "reason": "phase budget ran out before it started"}
            out[i].setdefault("id", i)
    return out


def _requeue(g: Group, pending: list) -> None:
    if any(i not in g.done for i, _ in g.items):
        pending.insert(0, g)  # the rest of this group goes next, in a fresh process

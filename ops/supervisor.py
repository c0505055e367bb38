"""Supervising the tiers as child processes: start, restart on crash, stop cleanly.

Each tier is a Python module run as ``python -m <module>`` with the stack's environment. A
tier that exits unexpectedly is restarted with exponential back-off (capped); a tier that
keeps dying is reported in the log line that restarts it; a start that fails outright (fork
failing with EAGAIN or ENOMEM) is just another failed start, retried with the same back-off.
Stopping sends SIGTERM to every child, waits for a bounded grace period, then SIGKILLs what is
left; :meth:`Supervisor.run` does that on every exit, including cancellation and errors.
"""

from __future__ import annotations

import asyncio
import importlib.util
import signal
import sys
from collections.abc import Mapping, Sequence

import msgspec

from eventstore.runtime import NICE_ENV


class Tier(msgspec.Struct, frozen=True):
    """A tier process: its name, module, how many copies, and what it serves."""

    name: str
    module: str
    args: tuple[str, ...] = ()
    copies: int = 1
    url: str = ""
    nice: int = 0
    """Scheduling niceness (``BACKBONE_NICE``): background tiers yield the CPU to the ones
    clients wait on."""

    def available(self) -> bool:
        """Whether the tier is runnable in this checkout (has a ``__main__``)."""
        try:
            return importlib.util.find_spec(f"{self.module}.__main__") is not None
        except ModuleNotFoundError:
            return False


class Supervisor:
    """Runs tiers until :meth:`stop`; restarts any that exit on their own."""

    def __init__(
        self,
        tiers: Sequence[Tier],
        env: Mapping[str, str],
        *,
        grace: float = 10.0,
        max_backoff: float = 30.0,
    ) -> None:
        self._tiers = tiers
        self._env = dict(env)
        self._grace = grace
        self._max_backoff = max_backoff
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._stopping = asyncio.Event()
        self.restarts: dict[str, int] = {}

    async def _spawn(self, tier: Tier, index: int) -> asyncio.subprocess.Process:
        env = {**self._env, "BACKBONE_WORKER_INDEX": str(index)}
        if tier.nice:
            env[NICE_ENV] = str(tier.nice)
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", tier.module, *tier.args, env=env
        )

    async def _keep(self, tier: Tier, index: int) -> None:
        name = f"{tier.name}-{index}"
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                proc = await self._spawn(tier, index)
            except OSError as exc:
                outcome = f"could not start ({exc})"
            else:
                self._procs[name] = proc
                outcome = f"exited with {await proc.wait()}"
            if self._stopping.is_set():
                return
            self.restarts[name] = self.restarts.get(name, 0) + 1
            print(
                f"up: {name} {outcome}; restart {self.restarts[name]} in {backoff:.1f}s",
                file=sys.stderr,
                flush=True,
            )
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=backoff)
            except TimeoutError:
                backoff = min(backoff * 2, self._max_backoff)

    async def run(self) -> None:
        """Start every tier and keep them running until :meth:`stop` is called."""
        try:
            async with asyncio.TaskGroup() as group:
                for tier in self._tiers:
                    for index in range(tier.copies):
                        group.create_task(self._keep(tier, index))
                await self._stopping.wait()
                await self._terminate()  # inside the group: the tasks wait for their children
        finally:
            # Also when cancelled or when a task failed: no child outlives its supervisor.
            self._stopping.set()
            await self._terminate()

    async def _terminate(self) -> None:
        running = [p for p in self._procs.values() if p.returncode is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(self._grace):
                await asyncio.gather(*(p.wait() for p in running))
        except TimeoutError:
            for proc in running:
                if proc.returncode is None:
                    proc.kill()
            await asyncio.gather(*(p.wait() for p in running))

    def stop(self) -> None:
        self._stopping.set()

"""An LLM-free orchestrator: the demo, a load generator and a reference implementation.

:func:`simulate` runs one request the way the original platform did: a root
agent plans, spawns sub-agents in parallel and sequential batches (up to three
levels deep), every agent streams text deltas with their ``budget_update``,
the budget pauses at the warning for a decision, the root synthesises, and
every agent ends with ``agent_completed`` or ``agent_cancelled``. Text and
token costs come from a seeded plan (:mod:`relay.tools.simplan`); the agents
run on the orchestrator SDK (:mod:`relay.tools.simrun`), which honours
cancels and budget decisions.

>>> async with relay.connect(relay.load_config()) as rc:
...     result = await simulate(rc, SimOptions(agents=6, depth=3))
...     print(result.summary())

``relay simulate`` (:func:`run_simulate_cli`) is a thin adapter over it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from relay.config import MIN_REQUEST_BUDGET, GlobalConfig
from relay.orchestrator.budget import PauseOutcome
from relay.orchestrator.client import PublishError, normalize_request_id
from relay.orchestrator.connect import RelayConnection, connect
from relay.orchestrator.request import Outcome, Request
from relay.tools.simplan import MAX_DEPTH, build_plan, seed_for
from relay.tools.simrun import run_agent


@dataclass(frozen=True, slots=True)
class SimOptions:
    """What to simulate. Every field defaults to the CLI's default."""

    request_id: str | None = None
    """Request to run; a random one when None."""
    agents: int = 4
    """Sub-agents below the root, in total."""
    depth: int = 2
    """Deepest sub-agent level (1 to 3)."""
    budget: int | None = None
    """Token budget of the request; ``budget.default_request_budget`` when None."""
    delta_interval: float = 0.05
    """Seconds each agent waits before each text delta."""
    deltas: int = 20
    """Text deltas per agent."""
    tokens_per_delta: int | None = None
    """Mean token cost of a delta. None sizes it so a full run uses about 90% of
    the budget: the run crosses the 80% warning and pauses, and if continued
    completes."""
    seed: int | None = None
    """Seed of the plan; derived from the request id when None."""
    decision_timeout: float | None = None
    """Seconds a budget pause waits; ``budget.decision_timeout_seconds`` when None."""

    def __post_init__(self) -> None:
        if self.agents < 0:
            raise ValueError("agents: must be >= 0")
        if not 1 <= self.depth <= MAX_DEPTH:
            raise ValueError(f"depth: must be between 1 and {MAX_DEPTH}")
        if self.budget is not None and self.budget < MIN_REQUEST_BUDGET:
            raise ValueError(f"budget: must be >= {MIN_REQUEST_BUDGET}")
        if self.deltas < 1:
            raise ValueError("deltas: must be >= 1")
        if self.delta_interval < 0:
            raise ValueError("delta_interval: must be >= 0")
        if self.tokens_per_delta is not None and self.tokens_per_delta < 1:
            raise ValueError("tokens_per_delta: must be >= 1")
        if self.decision_timeout is not None and self.decision_timeout <= 0:
            raise ValueError("decision_timeout: must be > 0")


@dataclass(frozen=True, slots=True)
class SimulationResult:
    """What one simulated request did."""

    request_id: str
    outcome: Outcome
    events_published: int
    agents_spawned: int
    agents_completed: int
    agents_cancelled: int
    tokens_used: int
    budget_total: int
    decision: PauseOutcome | None
    duration_s: float

    def summary(self) -> str:
        """One line for humans and logs."""
        decision = ""
        if self.decision is not None:
            decision = f", {self.decision.decision} decided by {self.decision.decided_by}"
        return (
            f"request {self.request_id}: {self.outcome}, "
            f"{self.events_published} events published, {self.agents_spawned} agents "
            f"({self.agents_completed} completed, {self.agents_cancelled} cancelled), "
            f"[tokens: {self.tokens_used:,} / {self.budget_total:,}]{decision}, "
            f"{self.duration_s:.1f}s"
        )


async def simulate(
    rc: RelayConnection,
    options: SimOptions,
    *,
    started: Callable[[Request], None] | None = None,
) -> SimulationResult:
    """Run one simulated request to its end and report what happened.

    The connection's ``[budget]`` settings supply the default budget, the
    warning threshold and the pause timeout and its default. ``started`` is
    called with the request once it runs (the CLI uses it to cancel the run
    on a signal). Raises :class:`relay.PublishError` when Redis stays
    unreachable past the client's retry bound.
    """
    rid = normalize_request_id(options.request_id or uuid.uuid4())
    began = time.monotonic()
    async with rc.request(rid, budget=options.budget) as req:
        req.decision_timeout = options.decision_timeout
        if started is not None:
            started(req)
        total_deltas = (options.agents + 1) * options.deltas
        plan = build_plan(
            rid,
            agents=options.agents,
            max_depth=options.depth,
            deltas=options.deltas,
            tokens_per_delta=options.tokens_per_delta
            or max(1, req.budget.total * 9 // 10 // total_deltas),
            seed=options.seed if options.seed is not None else seed_for(rid),
        )
        await run_agent(
            req, plan, None, index=0, total=1,
            delta_interval=options.delta_interval, max_depth=options.depth,
        )  # fmt: skip
    agents = req.agents.values()
    return SimulationResult(
        request_id=rid,
        outcome=req.outcome,
        events_published=req.events_published,
        agents_spawned=len(agents),
        agents_completed=sum(1 for a in agents if a.outcome == "completed"),
        agents_cancelled=sum(1 for a in agents if a.outcome == "cancelled"),
        tokens_used=await req.budget.used(),
        budget_total=req.budget.total,
        decision=req.decision,
        duration_s=time.monotonic() - began,
    )


# ---------------------------------------------------------------- CLI adapter


def _at_least(minimum: float, kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum:g}")
        return value

    return parse


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``relay simulate`` options (defaults from :class:`SimOptions` and the config)."""
    add = parser.add_argument
    add("--request-id", help="request id to run (default: a random one, printed at start)")
    add("--agents", type=_at_least(0, int), default=4, help="sub-agents in total (default 4)")
    add("--depth", type=int, choices=range(1, MAX_DEPTH + 1), default=2,
        help="deepest sub-agent level (default 2)")  # fmt: skip
    add("--budget", type=_at_least(MIN_REQUEST_BUDGET, int),
        help="token budget (default: budget.default_request_budget)")  # fmt: skip
    add("--delta-interval", type=_at_least(0, float), default=0.05,
        help="seconds before each text delta (default 0.05)")  # fmt: skip
    add("--deltas", type=_at_least(1, int), default=20, help="text deltas per agent (default 20)")
    add("--tokens-per-delta", type=_at_least(1, int),
        help="mean tokens per delta (default: about 90%% of the budget over the run)")  # fmt: skip
    add("--seed", type=int, help="seed of the plan (default: derived from the request id)")
    add("--decision-timeout", type=_at_least(0.01, float),
        help="seconds a budget pause waits (default: budget.decision_timeout_seconds)")  # fmt: skip
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument("--repeat", type=_at_least(1, int), default=1, metavar="N",
                      help="run N requests back to back")  # fmt: skip
    runs.add_argument("--forever", action="store_true", help="run requests until interrupted")
    add("--gap", type=_at_least(0, float), default=1.0,
        help="seconds between repeated requests (default 1)")  # fmt: skip
    add("--quiet", action="store_true", help="print only the summary line of each request")


def run_simulate_cli(args: argparse.Namespace, config: GlobalConfig) -> int:
    """``relay simulate``: run the requested simulations; 0 unless Redis fails."""
    repeated = args.forever or args.repeat > 1
    if args.request_id is not None and repeated:
        print("relay: --request-id runs one request; drop --repeat/--forever", file=sys.stderr)
        return 2
    try:
        options = SimOptions(
            request_id=normalize_request_id(args.request_id) if args.request_id else None,
            agents=args.agents,
            depth=args.depth,
            budget=args.budget,
            delta_interval=args.delta_interval,
            deltas=args.deltas,
            tokens_per_delta=args.tokens_per_delta,
            seed=args.seed,
            decision_timeout=args.decision_timeout,
        )
    except ValueError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_run_cli(options, config, None if args.forever else args.repeat, args))
    except PublishError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    return 0


async def _run_cli(
    options: SimOptions, config: GlobalConfig, runs: int | None, args: argparse.Namespace
) -> None:
    stopping = asyncio.Event()
    main = asyncio.current_task()
    current: Request | None = None

    def on_signal() -> None:
        # First signal: end the current request the way a cancel would (each
        # agent announces itself), then exit. Second signal: stop at once.
        if stopping.is_set() and main is not None:
            main.cancel()
        stopping.set()
        if current is not None:
            # Local only: Redis may be what is failing.
            current.cancel_local("orchestrator shutting down")

    def on_start(req: Request) -> None:
        nonlocal current
        current = req
        if stopping.is_set():
            req.cancel_local("orchestrator shutting down")

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        async with connect(config) as rc:
            done = 0
            while not stopping.is_set() and (runs is None or done < runs):
                if done:
                    await _sleep_unless(stopping, args.gap)
                    if stopping.is_set():
                        break
                run_options = replace(options, request_id=options.request_id or str(uuid.uuid4()))
                if not args.quiet:
                    print(f"request {run_options.request_id}", flush=True)
                try:
                    result = await simulate(rc, run_options, started=on_start)
                finally:
                    current = None
                print(result.summary(), flush=True)
                done += 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _sleep_unless(event: asyncio.Event, seconds: float) -> None:
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        pass

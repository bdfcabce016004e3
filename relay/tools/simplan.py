"""The shape of a simulated request: an agent tree, its text and its token costs.

Everything that varies between simulated runs is drawn here, up front, from
one ``random.Random`` seeded by the caller. The orchestrator in
:mod:`relay.tools.simulate` then only *executes* a plan, so a seed fully determines
what a run publishes (only timing, and therefore the interleaving of agents
running in parallel, is left to the scheduler).

Agent ids are UUIDv5 names of the request id and the agent's position in the
tree. They are therefore unique per request (a cancel tombstone for an agent of
one run can never hit an agent of another run), and stable when an
orchestrator restarts the *same* request: it re-registers the same ids and so
honours cancels written while it was down.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field

MAX_DEPTH = 3
"""Deepest sub-agent level a simulation may plan (the root is depth 0)."""

_TOPICS = (
    "event delivery guarantees in distributed systems",
    "vector database trade-offs for retrieval",
    "cost of running agents on spot capacity",
    "WebSocket fan-out at ten thousand clients",
    "token budgeting strategies for multi-agent research",
    "failure modes of LLM tool calling",
)
_VERBS = ("Research", "Analyze", "Compare", "Summarize", "Verify", "Collect")
_ASPECTS = (
    "prior work",
    "cost model",
    "failure modes",
    "benchmarks",
    "open questions",
    "security implications",
    "operational experience",
    "alternatives",
)
_WORDS = (
    "the", "results", "suggest", "that", "latency", "depends", "on", "batching",
    "while", "throughput", "scales", "with", "partitions", "however", "several",
    "sources", "disagree", "about", "retries", "and", "ordering", "under", "load",
    "a", "careful", "reading", "shows", "trade-offs", "between", "cost", "accuracy",
)  # fmt: skip
_FACTS = (
    "User prefers answers with sources.",
    "Benchmarks older than 2022 are unreliable for this topic.",
    "The team runs Redis 7 in production.",
    "Budget questions go to the platform owner.",
)


@dataclass(slots=True)
class Batch:
    """Sub-agents spawned together: run side by side (parallel) or one after another."""

    parallel: bool
    agents: list[AgentPlan]


@dataclass(slots=True)
class AgentPlan:
    """Everything one simulated agent will do, decided before the run starts."""

    agent_id: str
    parent_id: str | None
    depth: int
    task: str
    texts: list[str]
    tokens: list[int]
    """Token cost of each text delta (same length as ``texts``)."""
    batches: list[Batch] = field(default_factory=list)
    memory_fact: str | None = None
    memory_at: int = 0
    """Index of the delta before which ``memory_fact`` is published."""
    hits_depth_limit: bool = False
    """At the deepest level: tries to spawn once more and is refused."""

    @property
    def is_root(self) -> bool:
        return self.parent_id is None

    @property
    def split(self) -> int:
        """Deltas streamed before the sub-agents run (planning); the rest come after."""
        return len(self.texts) // 2 if self.batches else len(self.texts)

    def walk(self) -> list[AgentPlan]:
        """This agent and every descendant, parents before children."""
        found = [self]
        for batch in self.batches:
            for child in batch.agents:
                found.extend(child.walk())
        return found


def agent_id_for(request_id: str, path: str) -> str:
    """The id of the agent at ``path`` ("0", "0.1", ...) of ``request_id``'s tree."""
    return str(uuid.uuid5(uuid.UUID(request_id), path))


def seed_for(request_id: str) -> int:
    """The seed used when none is given: derived from the request id, so reproducible."""
    return uuid.UUID(request_id).int % 2**32


def build_plan(
    request_id: str,
    *,
    agents: int,
    max_depth: int,
    deltas: int,
    tokens_per_delta: int,
    seed: int,
) -> AgentPlan:
    """Plan a root agent with ``agents`` sub-agents at most ``max_depth`` levels deep."""
    if not 1 <= max_depth <= MAX_DEPTH:
        raise ValueError(f"max_depth: must be between 1 and {MAX_DEPTH}")
    rng = random.Random(seed)
    topic = rng.choice(_TOPICS)
    root = _agent(rng, request_id, "0", None, 0, f"Answer: {topic}", deltas, tokens_per_delta)
    nodes = [root]
    children: dict[str, list[AgentPlan]] = {root.agent_id: []}
    paths = {root.agent_id: "0"}
    for _ in range(agents):
        # Prefer shallow parents so the tree is bushy near the root, as
        # planners tend to be, yet still reaches the deeper levels.
        candidates = [n for n in nodes if n.depth < max_depth]
        weights = [4.0 if n.is_root else 1.0 / n.depth for n in candidates]
        parent = rng.choices(candidates, weights=weights)[0]
        path = f"{paths[parent.agent_id]}.{len(children[parent.agent_id])}"
        task = f"{rng.choice(_VERBS)} {rng.choice(_ASPECTS)}"
        child = _agent(
            rng, request_id, path, parent.agent_id, parent.depth + 1, task, deltas,
            tokens_per_delta,
        )  # fmt: skip
        nodes.append(child)
        children[parent.agent_id].append(child)
        children[child.agent_id] = []
        paths[child.agent_id] = path
    for node in nodes:
        node.batches = _batches(rng, children[node.agent_id])
        # Only an agent at the deepest level can run into the depth limit.
        node.hits_depth_limit = node.depth == max_depth and rng.random() < 0.3
    return root


def _agent(
    rng: random.Random,
    request_id: str,
    path: str,
    parent_id: str | None,
    depth: int,
    task: str,
    deltas: int,
    tokens_per_delta: int,
) -> AgentPlan:
    plan = AgentPlan(
        agent_id=agent_id_for(request_id, path),
        parent_id=parent_id,
        depth=depth,
        task=task,
        texts=[_phrase(rng) for _ in range(deltas)],
        # One draw per delta whatever the size, so the token size never
        # changes the rest of the plan drawn from the same seed.
        tokens=[max(1, round(tokens_per_delta * (0.75 + rng.random() / 2))) for _ in range(deltas)],
    )
    if rng.random() < 0.3:
        plan.memory_fact = rng.choice(_FACTS)
        plan.memory_at = rng.randrange(deltas)
    return plan


def _phrase(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 5))) + " "


def _batches(rng: random.Random, kids: list[AgentPlan]) -> list[Batch]:
    batches: list[Batch] = []
    rest = list(kids)
    while rest:
        size = min(len(rest), rng.randint(1, 3))
        # A single agent is trivially "sequential"; larger batches usually fan out.
        batches.append(Batch(parallel=size > 1 and rng.random() < 0.75, agents=rest[:size]))
        rest = rest[size:]
    return batches

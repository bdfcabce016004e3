"""One WebSocket client: a reader for commands and a writer draining its send queue.

The reader parses each frame into a command and answers it (errors become
``error`` frames; the connection stays open). The writer drains the
connection's :class:`~relay.gateway.sendqueue.SendQueue` and sends each
request's events strictly in ``seq`` order: a seq at or below the last one
sent is a duplicate and skipped, a seq beyond the next one is a gap and
filled from the history stream first (a resume, a lag or a hub reconnect all
end up here). History that no longer covers the gap yields
``resync_required`` instead of a silent hole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import RedisError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from relay.aio import Signal, stop_task
from relay.config import GlobalConfig
from relay.gateway.auth import (
    CLOSE_TOKEN_EXPIRED,
    Authenticator,
    AuthError,
    Principal,
    anonymous_principal,
)
from relay.gateway.envelope import Envelope
from relay.gateway.hub import HubUnavailable, TenantHub
from relay.gateway.limits import CLOSE_POLICY_VIOLATION, Limits, flush, subject_key
from relay.gateway.metrics import Metrics
from relay.gateway.sendqueue import CLOSE_TRY_AGAIN_LATER, Begin, Reset, SendQueue, SendTurns
from relay.gateway.store import RequestStore
from relay.gateway.writer import OrderedWriter, dumps
from relay.logs import LogOnce
from relay.wire.commands import (
    Command,
    CommandError,
    Ping,
    Refresh,
    Subscribe,
    SubscribeWorkflow,
    Unsubscribe,
    UnsubscribeWorkflow,
    error_frame,
    parse_command,
)

log = logging.getLogger(__name__)
log_once = LogOnce(log)
"""Unexpected failures are logged once per cause: a client looping on one must not flood."""

CLOSE_INTERNAL_ERROR = 1011
UNAVAILABLE = "Redis is unavailable; try again shortly"
"""What clients are told; the cause (with addresses) goes to the gateway's log only."""


class CommandHandler(Protocol):
    """Authorizes and executes the commands that change durable state (cancel, budget answers)."""

    async def __call__(self, command: Command, principal: Principal) -> dict[str, Any]: ...


@dataclass(slots=True)
class _Sub:
    pending: deque[Envelope] | None
    """Events arriving while the subscription starts; bounded, oldest dropped
    (the writer sees the hole before the first kept one and refills it).
    None once started: an empty bounded deque kept per subscription for its
    whole life cost about 380 bytes each."""

    @property
    def hold(self) -> bool:
        """Whether events are held back (the subscription is starting)."""
        return self.pending is not None


class Connection:
    """Serves one client from accept to close."""

    writer_class: type[OrderedWriter] = OrderedWriter
    """How queued frames reach the client (SSE frames them differently)."""

    def __init__(
        self,
        websocket: WebSocket,
        hub: TenantHub,
        config: GlobalConfig,
        metrics: Metrics,
        handler: CommandHandler,
        turns: SendTurns | None = None,
        *,
        principal: Principal | None = None,
        auth: Authenticator | None = None,
        subprotocol: str | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.ws = websocket
        self.process_limits = limits or Limits.of(config)  # limits: per process and subject
        self.limits = self.process_limits.for_connection()  # limits: per connection
        self.hub = hub
        """The routing of the principal's tenant: no other tenant's events reach it."""
        self.principal = principal or anonymous_principal(config)
        self._auth = auth
        self._subprotocol = subprotocol
        self._refreshed = Signal()
        self._close_with: tuple[int, str] | None = None
        self.store: RequestStore = hub.store
        self.config = config
        self.metrics = metrics
        self.handler = handler
        gw = config.gateway
        self._queue = SendQueue(
            gw.send_queue_max,
            gw.send_queue_max_bytes,
            gw.overflow_policy,
            metrics,
            max_lagged=gw.firehose_track_requests,
            turns=turns,
        )
        self._subs: dict[str, _Sub] = {}
        self._firehose = False
        self._fixed = False
        """Subscribed at connect (query parameters): never falls back to every event."""
        self._runs: set[str] = set()
        self._writer = self.writer_class(
            websocket,
            self._queue,
            self.store,
            config,
            metrics,
            wants=self._wants,
            subscribed=self._subs.__contains__,
            runs=self._runs,
            replay_budget=self.limits.spend_replay,  # limits: replay volume
        )

    # ---------------------------------------------------------------- lifecycle

    @property
    def subject(self) -> str | None:
        """The token's ``sub`` (None while auth is off): what per-subject limits count."""
        return self.principal.sub

    async def run(self) -> None:
        """Accept, serve until the client leaves, then release everything."""
        # limits: connections per process and per subject (over a cap: 1013)
        limit_key = subject_key(self.subject, self.ws.client)
        if (refusal := self.process_limits.admit(limit_key)) is not None:
            await self.ws.accept(subprotocol=self._subprotocol)
            await self._close(CLOSE_TRY_AGAIN_LATER, refusal)
            return
        try:
            await self.ws.accept(subprotocol=self._subprotocol)
        except BaseException:
            self.process_limits.release(limit_key)  # limits: the peer left during the handshake
            raise
        self.metrics.connections.inc()
        self.metrics.connections_total.inc()
        writer = asyncio.create_task(self._writer.run(), name="relay-conn-writer")
        overflow = self._queue.overflowed()
        starter = asyncio.create_task(self._serve(), name="relay-conn-reader")
        tasks: list[asyncio.Future[None]] = [writer, overflow, starter]
        if self._auth is not None and self._auth.enabled:
            # Without auth no token expires or is refreshed: no task to wait
            # forever (a task, an Event and a future per idle connection).
            tasks.append(asyncio.create_task(self._expire(), name="relay-conn-expiry"))
        failure: BaseException | None = None
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = None if task.cancelled() else task.exception()
                if exc is not None and not isinstance(exc, WebSocketDisconnect):
                    failure = exc
        finally:
            # A token that expired, a limit hit: nothing more reaches the
            # client, not even sent by the hub in the pass before the writer
            # sees its cancellation.
            self._writer.stop()
            try:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    await stop_task(task)
            finally:
                # Release even when we are cancelled ourselves while stopping;
                # the hub's interest goes first: an overflowed connection may
                # wait a while for its close frame, and takes no events meanwhile.
                await self._release()
                if self._queue.close_code is not None:
                    await self._close_overflowed(self._queue.close_code)
                elif self._close_with is not None:
                    await self._close(*self._close_with)
                elif failure is not None:
                    self._internal_error("connection", failure)
                    # Never a silent TCP drop: the client learns why, and reconnects.
                    await self._close(CLOSE_INTERNAL_ERROR, "internal error")
                self._queue.close()
                self.metrics.connections.dec()
                self.process_limits.release(limit_key)  # limits

    async def _expire(self) -> None:
        """Close with 4001 when the token expires, unless a ``refresh`` replaced it first."""
        leeway = self.config.auth.leeway_seconds
        while (exp := self.principal.exp) is not None:
            left = exp + leeway - time.time()
            if left <= 0:
                self._close_with = (CLOSE_TOKEN_EXPIRED, "token expired")
                return
            self._refreshed.clear()
            with contextlib.suppress(TimeoutError):
                # Woken early by a refresh, which may have moved exp either way.
                await asyncio.wait_for(self._refreshed.wait(), left)
        await asyncio.Event().wait()  # a token without exp (auth off) never expires

    async def _serve(self) -> None:
        if await self._start_from_query():
            await self._read_loop()

    def _internal_error(self, where: str, exc: BaseException) -> None:
        self.metrics.internal_errors.labels(where=where).inc()
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        place = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"
        log_once(
            f"{where}:{type(exc).__name__}:{place}",
            "unexpected %s in %s (logged once per cause)",
            type(exc).__name__,
            where,
            exc=exc,
        )

    async def _close_overflowed(self, code: int) -> None:
        # A client that reads nothing keeps the transport paused and every
        # send waiting; wait for it at most ping_timeout (a peer that reads
        # nothing for that long is gone), then let the server drop the socket.
        try:
            async with asyncio.timeout(self.config.gateway.ping_timeout):
                await self._close(code, self._queue.close_reason)
        except TimeoutError:
            log.info("client did not read its close frame within ping_timeout; dropping it")

    async def _release(self) -> None:
        # A disconnect never cancels anything: it only drops local interest.
        for rid in list(self._subs):
            await self.hub.unwatch(rid, self)
        self._subs.clear()
        await self.hub.unwatch_all(self)

    async def _start_from_query(self) -> bool:
        """``?request_id=R&after_seq=N`` subscribes at connect (no first frame needed).

        A subscription asked for at connect that cannot start (Redis away) is
        retried for ``gateway.connect_subscribe_timeout``; then the socket is
        closed with 1013 so the client reconnects and resumes. It never falls
        back to another stream: a client that asked for R and got the
        tenant-wide stream instead lost R's events after its ``after_seq``
        without being told. Returns False when the connection was closed.
        """
        params = self.ws.query_params
        rids = params.getlist("request_id")
        stream = params.get("stream")
        if not self.principal.can("view"):
            # A cancel- or decide-only token receives no events at all.
            self._fixed = True
        if stream == "none" or rids:
            # Nothing until subscribed, and nothing after the last unsubscribe.
            self._fixed = True
        elif stream not in (None, "all"):
            self._reply(error_frame("invalid_field", "query parameter 'stream': 'all' or 'none'"))
        if not rids:
            if not self._fixed:
                await self._go_firehose()
            return True
        for rid in rids:
            raw: dict[str, Any] = {"type": "subscribe", "request_id": rid}
            if (after := params.get("after_seq")) is not None:
                raw["after_seq"] = after
            if (epoch := params.get("epoch")) is not None:
                raw["epoch"] = epoch
            if params.get("snapshot") in ("1", "true"):
                raw["snapshot"] = True
            try:
                command = parse_command(dumps(raw))
            except CommandError as exc:
                self._reply(exc.frame())
                continue
            assert isinstance(command, Subscribe)
            if not await self._subscribe_with_retry(command):
                await self._close(CLOSE_TRY_AGAIN_LATER, "subscription unavailable; reconnect")
                return False
        return True

    async def _subscribe_with_retry(self, command: Subscribe) -> bool:
        deadline = time.monotonic() + self.config.gateway.connect_subscribe_timeout
        delay = 0.05
        while True:
            try:
                await self._subscribe(command)
                return True
            except (CommandError, RedisError) as exc:
                if isinstance(exc, CommandError) and exc.code != "unavailable":
                    self._reply(exc.frame())
                    return True  # the client's mistake: answered, connection kept
                log.info("subscription at connect failed, retrying: %s", exc)
            if time.monotonic() + delay > deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _go_firehose(self) -> None:
        # The hub keeps this interest even when it cannot make it live now
        # (Redis down): it subscribes again and backfills once it reconnects.
        # Before, the flag was set only on success, so a client that connected
        # during an outage was registered with the hub but dropped every event
        # it was offered, for as long as it stayed connected.
        if not self.principal.can("view"):
            return
        self._firehose = True
        try:
            await self.hub.watch_all(self)
        except HubUnavailable as exc:
            self._reply(error_frame("unavailable", str(exc)))

    # ---------------------------------------------------------------- reading

    async def _read_loop(self) -> None:
        limit = self.config.gateway.max_message_bytes
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            if (refused := self.limits.frame(message)) is not None:  # limits: command rate
                if refused.frame is None:
                    await flush(self._queue)
                    await self._close(CLOSE_POLICY_VIOLATION, "rate limit ignored")
                    return
                self._reply(refused.frame)
                continue
            text = message.get("text")
            if text is None:
                data = message.get("bytes") or b""
                if len(data) > limit:
                    self._reply(error_frame("frame_too_large", f"frame exceeds {limit} bytes"))
                    continue
                try:
                    text = data.decode()
                except UnicodeDecodeError:
                    self._reply(error_frame("invalid_json", "binary frame is not UTF-8"))
                    continue
            if len(text) > limit:
                self._reply(error_frame("frame_too_large", f"frame exceeds {limit} bytes"))
                continue
            try:
                await self._handle_text(text)
            except (RedisError, CommandError, WebSocketDisconnect):
                raise
            except Exception as exc:
                # A defect must cost the client one answer, not its connection.
                self._internal_error("command", exc)
                self._reply(
                    error_frame("internal_error", "the gateway could not process this frame")
                )

    async def _handle_text(self, text: str) -> None:
        try:
            command = parse_command(text)
        except CommandError as exc:
            self.metrics.commands.labels(type="invalid", outcome=exc.code).inc()
            self._reply(exc.frame())
            return
        try:
            try:
                reply = await self._execute(command)
            except RedisError as exc:
                # Redis trouble is the gateway's problem, not the client's:
                # answer it and keep the connection.
                log.warning("%s failed: %s", command.type, exc)
                raise CommandError("unavailable", UNAVAILABLE) from None
        except CommandError as exc:
            exc.command_id = command.command_id
            self.metrics.commands.labels(type=command.type, outcome=exc.code).inc()
            self._reply(exc.frame())
            return
        self.metrics.commands.labels(type=command.type, outcome="ok").inc()
        if reply is not None:
            if command.command_id is not None:
                reply["command_id"] = command.command_id
            self._reply(reply)

    async def _execute(self, command: Command) -> dict[str, Any] | None:
        if isinstance(command, Ping):
            return {"type": "pong"}
        if isinstance(command, Refresh):
            return await self._refresh(command.token)
        if isinstance(command, Subscribe):
            await self._subscribe(command)
            return None
        if isinstance(command, Unsubscribe):
            return await self._unsubscribe(str(command.request_id))
        if isinstance(command, SubscribeWorkflow):
            self.principal.require("view")
            full = len(self._runs) >= self.config.gateway.max_subscriptions
            if full and str(command.run_id) not in self._runs:
                raise CommandError("too_many_subscriptions", "too many workflow runs")
            self._runs.add(str(command.run_id))
            return {"type": "workflow_subscribed", "run_id": str(command.run_id)}
        if isinstance(command, UnsubscribeWorkflow):
            self._runs.discard(str(command.run_id))
            # The original sent no reply; one comes only when asked for by id.
            if command.command_id is None:
                return None
            return {"type": "workflow_unsubscribed", "run_id": str(command.run_id)}
        if command.type == "cancel_agent":  # limits: cancels per subject
            self.process_limits.check_cancel(subject_key(self.subject, self.ws.client))
        return await self.handler(command, self.principal)

    async def _refresh(self, token: str) -> dict[str, Any]:
        if self._auth is None or not self._auth.enabled:
            return {"type": "refreshed", "exp": None}
        try:
            new = await self._auth.verify(token)
        except AuthError as exc:
            raise CommandError("invalid_token", str(exc)) from None
        old = self.principal
        if (new.sub, new.tenant) != (old.sub, old.tenant):
            raise CommandError("forbidden", "a refresh token must have the same sub and tenant")
        self.principal = new
        self._refreshed.set()
        # The new token may cover less: drop what it no longer allows.
        for rid in list(self._subs):
            if not (new.can("view") and new.may_touch(rid)):
                await self._unsubscribe(rid)
        if self._firehose and not new.can("view"):
            self._firehose = False
            await self.hub.unwatch_all(self)
        assert new.exp is not None
        return {"type": "refreshed", "exp": int(new.exp)}

    async def _subscribe(self, cmd: Subscribe) -> None:
        rid = str(cmd.request_id)
        self.principal.require("view", rid)
        if cmd.after_seq is not None and not cmd.snapshot:  # limits: replay volume
            self.limits.check_replay()
        limit = self.config.gateway.max_subscriptions
        if rid not in self._subs and len(self._subs) >= limit:
            raise CommandError(
                "too_many_subscriptions", f"a connection may subscribe to {limit} requests"
            )
        if rid not in self._subs:
            self._subs[rid] = sub = _Sub(self._hold_buffer())
            try:
                await self.hub.watch(rid, self)
            except (HubUnavailable, RedisError) as exc:
                log.info("subscribe %s failed: %s", rid, exc)
                await self._drop_subscription(rid)
                raise CommandError("unavailable", UNAVAILABLE) from None
        else:
            sub = self._subs[rid]
            if sub.pending is None:
                sub.pending = self._hold_buffer()
        if self._firehose:
            self._firehose = False
            await self.hub.unwatch_all(self)
        try:
            await self._start_subscription(rid, cmd)
        except RedisError:
            await self._drop_subscription(rid)
            raise
        finally:
            # Held events that overflowed the buffer were the oldest; the
            # writer sees the gap before the first kept one and refills it.
            # (A second subscribe started meanwhile may have released it already.)
            pending, sub.pending = list(sub.pending or ()), None
            if rid in self._subs:
                for env in pending:
                    self._queue.push_event(env)

    def _hold_buffer(self) -> deque[Envelope]:
        return deque(maxlen=self.config.gateway.send_queue_max)

    async def _drop_subscription(self, rid: str) -> None:
        self._subs.pop(rid, None)
        await self.hub.unwatch(rid, self)
        if not self._subs and not self._firehose and not self._fixed:
            # Back to where the client was before it asked (every event).
            await self._go_firehose()

    async def _start_subscription(self, rid: str, cmd: Subscribe) -> None:
        pos = await self.store.position(rid)
        reply: dict[str, Any] = {
            "type": "subscribed",
            "request_id": rid,
            "epoch": pos.epoch,
            "seq": pos.seq,
        }
        if cmd.command_id is not None:
            reply["command_id"] = cmd.command_id
        frames = [dumps(reply)]
        start = pos.seq
        if cmd.snapshot:
            snap = await self.store.snapshot(rid)
            start = snap["seq"]
            frames.append(dumps(snap))
        pending = await self.store.pending_decision(rid)
        if pending is not None:
            frames.append(dumps({"type": "budget_pending", "request_id": rid, **pending}))
        last, replay_until = start, None
        if cmd.after_seq is None or cmd.snapshot:
            pass
        elif cmd.epoch is not None and pos.epoch is not None and cmd.epoch != pos.epoch:
            frames.append(
                dumps(self._writer.resync(rid, pos.epoch, "epoch_changed", last_seq=pos.seq))
            )
        elif cmd.after_seq > pos.seq:
            frames.append(
                dumps(self._writer.resync(rid, pos.epoch, "ahead_of_stream", last_seq=pos.seq))
            )
        else:
            last, replay_until = cmd.after_seq, pos.seq
        self._queue.push_control(Begin(rid, pos.epoch, last, frames, replay_until))

    async def _unsubscribe(self, rid: str) -> dict[str, Any]:
        if self._subs.pop(rid, None) is not None:
            await self.hub.unwatch(rid, self)
            self._writer.forget(rid)
        if not self._subs and not self._firehose and not self._fixed:
            # No subscription left: back to every event, like the original.
            await self._go_firehose()
        return {"type": "unsubscribed", "request_id": rid}

    # ---------------------------------------------------------------- hub side

    def _wants(self, rid: str) -> bool:
        if not self.principal.may_touch(rid):
            return False
        return rid in self._subs if self._subs else self._firehose

    def offer(self, envelope: Envelope) -> None:
        """Called by the hub for every event this connection may want."""
        scope = self.principal.requests  # Principal.may_touch, inlined: once per delivery
        if scope is not None and envelope.request_id not in scope:
            return  # a token scoped to requests sees only those on the tenant-wide stream
        if self._subs:
            sub = self._subs.get(envelope.request_id)
            if sub is None:
                return
            held = sub.pending
            if held is not None:
                if len(held) == held.maxlen:
                    self.metrics.queue_drops.inc()
                held.append(envelope)
                return
        elif not self._firehose:
            return
        if not self._writer.offer_direct(envelope):
            self._queue.push_event(envelope)

    def stream_reset(self, request_id: str, epoch: str | None, reason: str) -> None:
        """Called by the hub when a request's stream cannot be continued."""
        if not self.principal.may_touch(request_id):
            return
        if (self._subs and request_id in self._subs) or (self._firehose and not self._subs):
            self._queue.push_control(Reset(request_id, epoch, reason))

    def _reply(self, frame: dict[str, Any]) -> None:
        self._queue.push_control(dumps(frame))

    async def _close(self, code: int, reason: str) -> None:
        if self.ws.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                await self.ws.close(code, reason)

"""The public API: what ``relay`` exports, documented, typed and free of import side effects."""

from __future__ import annotations

import inspect
import subprocess
import sys

from starlette.applications import Starlette

import relay
from relay import create_app
from relay.config import AuthConfig, GlobalConfig


def test_every_public_name_is_exported_and_documented_with_an_example() -> None:
    missing = [name for name in relay.__all__ if not hasattr(relay, name)]
    assert not missing, missing
    undocumented = []
    for name in relay.__all__:
        obj = getattr(relay, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # type aliases (AgentEvent, Decision) are documented where defined
        if ">>>" not in (obj.__doc__ or ""):
            undocumented.append(name)
    assert not undocumented, f"no docstring with an example: {undocumented}"


def test_the_sdk_event_models_answer_budget_and_settings_are_exported() -> None:
    for name in ("connect", "RelayConnection", "Request", "Agent", "AgentRef", "LeaseHook",
                 "AgentCancelledError", "AgentSpawned", "AgentTextDelta", "BudgetDecision",
                 "answer_budget", "GlobalConfig", "RedisConfig", "SdkConfig", "load_config",
                 "RelayClient", "CancelRegistry", "RequestBudget"):  # fmt: skip
        assert name in relay.__all__, name


def test_create_app_is_typed_and_builds_the_gateway() -> None:
    # mypy --strict checks this line: create_app is seen with its real signature.
    app: Starlette = create_app(GlobalConfig(auth=AuthConfig(mode="none")))
    assert isinstance(app, Starlette)


def test_importing_relay_has_no_side_effects() -> None:
    code = (
        "import sys, logging, relay\n"
        "heavy = ('relay.gateway', 'starlette', 'uvicorn', 'prometheus_client')\n"
        "loaded = [m for m in heavy if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "assert not logging.getLogger().handlers\n"
        "import threading; assert threading.active_count() == 1\n"
        "relay.create_app\n"
        "assert 'relay.gateway' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

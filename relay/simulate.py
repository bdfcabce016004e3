"""Placeholder replaced by the simulate implementation."""
from __future__ import annotations
import argparse
from typing import Any

def add_simulate_arguments(p: argparse.ArgumentParser) -> None:
    pass

def run_simulate_cli(args: Any, config: Any) -> int:
    raise NotImplementedError

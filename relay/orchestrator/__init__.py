"""The orchestrator side: publishing, cancellation, budgets and the liveness lease."""

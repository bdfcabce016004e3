"""The orchestrator side: publishing, cancellation and budgets."""

"""The tools: command line, demo, simulator and terminal console."""

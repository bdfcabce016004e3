"""The wire and Redis layout both sides share: events, commands, schema, keys, Lua scripts."""

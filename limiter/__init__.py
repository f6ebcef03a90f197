"""Inline enforcement: per-tenant token bucket and daily quota in one atomic Redis Lua call."""

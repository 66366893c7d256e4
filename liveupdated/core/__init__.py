"""The pure orchestrator core: phases, sessions, ownership, dependencies, limits.

Nothing here performs I/O or imports the D-Bus library; callers feed it plain values.
"""

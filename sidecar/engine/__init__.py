"""The delivery engine: intake, dedup decisions, dispatch to app streams, acks and commits.

The record path. Its modules are compiled with mypyc (setup.py), so they keep to strictly typed
Python. It owns every record's state from fetch to commit, on the event loop only. It must not
import ``api``, ``publish`` or ``process``: those call into it, never the other way.
"""

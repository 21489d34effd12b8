"""The dedup stores: the protocol and its state machine (absent, claimed, done) as pure rules,
and three implementations (memory, SQLite, Redis in its shapes), with a timing wrapper.

A store knows keys, owners, leases and results, never records, partitions or gRPC: it must not
import the engine, ``kafka``, ``publish``, ``api`` or ``process``.
"""

"""The serving runtime: what several services need, below them and above the engine.

Live state and its lock (``live``), the state shared with reader processes (``shared_state``),
snapshots and published models with their durable writes (``snapshots``, ``models``,
``remote_models``, ``durable``, ``store_location``), the hot swap (``hot_swap``), health and
metrics (``health``, ``metrics``), settings loading (``settings``) and hardware facts
(``sysinfo``). It imports ``core``, ``stream`` and ``rpc``; never a service or an app
(``tests/unit/test_import_layers.py``).
"""

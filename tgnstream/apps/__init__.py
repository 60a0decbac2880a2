"""The composition roots: one per process kind, wiring the services, and the command line.

``serve`` (the serving process: ingest + gRPC, with ``reader_pool`` and ``serve_config``),
``trainer`` (the continual trainer's process), ``demo``, ``broker`` (the embedded Kafka),
``replay`` (a dataset into a topic), ``cli`` and ``query_cli`` (``tgnstream ...``), ``testing``
(helpers for tests and benchmarks that start these processes). Nothing below imports them.
"""

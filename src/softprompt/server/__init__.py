"""``softprompt serve``: an OpenAI-compatible HTTP server over the engine, with a playground.

``app.py`` holds the HTTP routes, ``protocol.py`` the request and response bodies,
``adapters.py`` the adapters folder kept in step with the engine, ``metrics.py`` the Prometheus
metrics and ``playground.html`` the page at ``/``.
"""

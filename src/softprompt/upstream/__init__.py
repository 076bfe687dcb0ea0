"""Serving soft prompts on vLLM servers: ``softprompt serve --upstream URL``.

``pool`` chooses and checks the servers, ``wire`` speaks their completions API, and
``engine.UpstreamEngine`` gives the HTTP server the same surface as softprompt's own engine.
"""

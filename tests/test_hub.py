"""The Hub probe goes where the user's proxy and endpoint settings say."""

from __future__ import annotations

import socketserver
import threading

import pytest

from softprompt import hub


class _Proxy(socketserver.StreamRequestHandler):
    """Records the first request line and answers like a forward proxy would."""

    seen: list[str] = []

    def handle(self) -> None:
        line = self.rfile.readline().decode("latin-1").strip()
        type(self).seen.append(line)
        while self.rfile.readline().strip():
            pass
        if line.startswith("CONNECT"):
            self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            return  # closes the tunnel: the TLS handshake then fails, after a real answer
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


@pytest.fixture()
def proxy():
    _Proxy.seen = []
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Proxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Proxy.seen
    server.shutdown()
    server.server_close()


@pytest.fixture()
def online(monkeypatch):
    for name in (*hub.OFFLINE_VARS, "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_probe_goes_through_the_proxy(online, proxy, scheme):
    url, seen = proxy
    # hub.invalid cannot resolve: only a probe that asks the proxy can reach it.
    online.setenv("HF_ENDPOINT", f"{scheme}://hub.invalid")
    online.setenv("HTTP_PROXY", url)
    online.setenv("HTTPS_PROXY", url)
    assert hub.go_offline_if_unreachable(timeout=5) is True
    assert seen and "hub.invalid" in seen[0]
    assert seen[0].startswith("CONNECT" if scheme == "https" else "HEAD")
    assert not hub.is_offline()


def test_endpoint_is_respected(online, proxy):
    url, seen = proxy
    online.delenv("HTTP_PROXY", raising=False)
    online.delenv("HTTPS_PROXY", raising=False)
    online.setenv("HF_ENDPOINT", url)  # a local server standing in for a Hub mirror
    assert hub.hub_reachable(timeout=5) is True
    assert seen and seen[0].startswith("HEAD / ")


def test_unreachable_endpoint_goes_offline(online, monkeypatch):
    online.delenv("HTTP_PROXY", raising=False)
    online.delenv("HTTPS_PROXY", raising=False)
    online.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nobody listens on the discard port
    monkeypatch.delitem(__import__("sys").modules, "huggingface_hub", raising=False)
    assert hub.go_offline_if_unreachable(timeout=5) is False
    assert hub.is_offline()

"""A deterministic OpenAI-compatible teacher on 127.0.0.1 for transform/distill tests: it
replays fixed answers chosen by a marker found in the prompt and records every request.
The real Serve teacher is covered by the tests that use `local_teacher`."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from typing_extensions import Self


class ReplayTeacher:
    """`answer(prompt_text) -> str | None`; None makes the server answer HTTP 500."""

    def __init__(self, answer: Callable[[str], str | None]):
        self.answer = answer
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [
                    {"id": "replay", "object": "model", "created": 0, "owned_by": "test"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = "\n".join(m["content"] for m in body["messages"])
                with outer.lock:
                    outer.requests.append(body)
                text = outer.answer(prompt)
                if text is None:
                    self._send(500, {"error": {"message": "replay: planned failure"}})
                    return
                self._send(200, {
                    "id": "x", "object": "chat.completion", "created": 0, "model": "replay",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": len(prompt.split()),
                              "completion_tokens": len(text.split()),
                              "total_tokens": len(prompt.split()) + len(text.split())}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def chat_requests(self) -> list[dict]:
        return [r for r in self.requests if "messages" in r]

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

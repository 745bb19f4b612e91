"""Loopback HTTP servers for the weights-by-name tests: a Hugging Face Hub
(its `resolve` endpoint, enough for `huggingface_hub.hf_hub_download`) and
a plain file server (download.pytorch.org's role for `torch.hub`)."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import threading


class _Handler(http.server.BaseHTTPRequestHandler):
  files: dict[str, bytes] = {}
  # Bytes actually sent per path (a truncated reply sends fewer than its
  # Content-Length says).
  truncate: dict[str, int] = {}
  # Paths answered with `(HTTP status, the Hub's X-Error-Code or None)`.
  refuse: dict[str, tuple[int, str | None]] = {}
  commit = 'c0ffee' + '0' * 34

  def log_message(self, *args):
    del args

  def _reply(self, body: bool):
    path = self.path.split('?')[0]
    refusal = self.refuse.get(path)
    if refusal is not None:
      status, error_code = refusal
      self.send_response(status)
      if error_code:
        self.send_header('X-Error-Code', error_code)
        self.send_header('X-Error-Message', f'{error_code} (loopback)')
      self.send_header('Content-Length', '0')
      self.end_headers()
      return
    data = self.files.get(path)
    if data is None:
      self.send_response(404)
      self.send_header('X-Error-Code', 'EntryNotFound')
      self.send_header('Content-Length', '0')
      self.end_headers()
      return
    digest = hashlib.sha256(data).hexdigest()
    self.send_response(200)
    # What the Hub sends for a large (LFS) file; a plain server ignores them.
    self.send_header('X-Repo-Commit', self.commit)
    self.send_header('ETag', f'"{digest}"')
    self.send_header('X-Linked-Etag', f'"{digest}"')
    self.send_header('X-Linked-Size', str(len(data)))
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    if body:
      self.wfile.write(data[: self.truncate.get(self.path, len(data))])

  def do_HEAD(self):  # noqa: N802 - http.server's name
    self._reply(body=False)

  def do_GET(self):  # noqa: N802
    self._reply(body=True)


@contextlib.contextmanager
def serve(
  files: dict[str, bytes],
  truncate: dict[str, int] | None = None,
  refuse: dict[str, tuple[int, str | None]] | None = None,
):
  """Serves `{path: bytes}` on 127.0.0.1; yields the base URL. `truncate`:
  bytes sent of a path; `refuse`: `{path: (status, X-Error-Code)}`, e.g.
  `(401, 'GatedRepo')` as the Hub answers for a gated repository."""
  handler = type(
    'Handler',
    (_Handler,),
    {'files': files, 'truncate': truncate or {}, 'refuse': refuse or {}},
  )
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f'http://127.0.0.1:{server.server_address[1]}'
  finally:
    server.shutdown()
    server.server_close()


def hub_path(repo: str, filename: str, revision: str = 'main') -> str:
  """The Hub's download path of a file (`/{repo}/resolve/{rev}/{file}`)."""
  return f'/{repo}/resolve/{revision}/{filename}'

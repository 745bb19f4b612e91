"""Published weights by name: `hf-hub:...` and `torchvision:...` sources.

Wherever a PyTorch weights file is accepted (`model.init_from`,
`scripts.convert_torch --input`, `--checkpoint` of predict and evaluate for
whole models), a name works too:

- `hf-hub:REPO[@REVISION]`: `model.safetensors` of a Hugging Face Hub repo,
  fetched by `huggingface_hub` into its cache (`HF_HOME`, `HF_HUB_OFFLINE`
  and revisions work as for any Hub client). Reading safetensors needs no
  PyTorch, so an ImageNet backbone loads on a TPU VM without it.
- `torchvision:NAME`: a torchvision weights URL, cached in torch.hub's cache
  (`TORCH_HOME`) under torchvision's own file name.
- any `http(s)://` URL of a `.pth`, `.pt`, `.safetensors` or `.npz` file,
  cached in torch.hub's folder under a key of the whole URL
  (`url_cache_path`); `URL#sha256=HEX` states the digest it must have.

A hash is checked when the source states one: the Hub's content hash (its
ETag, the blob's name in the cache), the hash prefix in a torchvision file
name, or a digest the user gives (`#sha256=`, `scripts.convert_torch
--sha256`). A download that fails its check is not kept; a cached file that
fails it is removed. A file with no stated hash is used as downloaded, and
every file's SHA-256 is recorded (`Fetched.record`: checkpoint metadata
`init_from` / `source`). `SOURCES` is the table of known names (README,
"Published weights"); `check_arch` refuses a name that does not fit the run
before anything is fetched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import logging
import os
import re
import socket
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping

import numpy as np
import tqdm

from deeplab_jax.data import normalization
from deeplab_jax.errors import UserError

HUB = 'hf-hub:'
TORCHVISION = 'torchvision:'
_TORCHVISION_URL = 'https://download.pytorch.org/models/'
# torch.hub's `HASH_REGEX`: torchvision's file names carry a prefix of
# their SHA-256 (`resnet50-0676ba61.pth`); other URLs' names carry none.
_TORCHVISION_HASH = re.compile(r'-([a-f0-9]*)\.')
_INIT_FROM = '--config.model.init_from'
# timm's pretrained configs (`timm.models.get_pretrained_cfg(name)`) give
# each tag's licence and input statistics; torchvision's weights enums
# (`torchvision.models.*_Weights`) give the URLs and the classes.
_TIMM = "timm's pretrained config for {}"
_TV = 'torchvision.models{}'


@dataclasses.dataclass(frozen=True)
class Source:
  """One published set of weights.

  Attributes:
    name: what users write, e.g. `hf-hub:timm/densenet161.tv_in1k`.
    location: the Hub repo id or the URL.
    licence: as its publisher states it.
    initialises: `'backbone'` (ImageNet; the head starts fresh) or `'model'`
      (a whole segmentation model with its classifier).
    archs: the architectures it loads into.
    normalization: `(mean, std)` in 0-255 units of the inputs it was
      trained on.
    num_classes: classes of a whole model's classifier.
    dataset: the data set whose class table a whole model's classes are.
    reference: where the entry's facts are read from.
  """

  name: str
  location: str
  licence: str
  initialises: str
  archs: tuple[str, ...]
  normalization: tuple[tuple[float, ...], tuple[float, ...]]
  num_classes: int | None = None
  dataset: str | None = None
  reference: str = ''


@dataclasses.dataclass(frozen=True)
class Fetched:
  """A weights file on this machine: where it came from and its hash."""

  name: str
  path: str
  sha256: str
  source: Source | None = None

  def record(self) -> dict[str, str]:
    """The checkpoint metadata entry (`init_from`)."""
    return {'name': self.name, 'file': self.path, 'sha256': self.sha256}


def _timm(tag: str, archs, licence: str, norm=normalization.IMAGENET):
  return Source(
    name=f'{HUB}timm/{tag}',
    location=f'timm/{tag}',
    licence=licence,
    initialises='backbone',
    archs=tuple(archs),
    normalization=norm,
    reference=_TIMM.format(tag),
  )


def _torchvision(
  name: str,
  file: str,
  archs,
  initialises='backbone',
  classes=None,
  dataset=None,
  ref='',
):
  return Source(
    name=TORCHVISION + name,
    location=_TORCHVISION_URL + file,
    licence='BSD-3-Clause (torchvision)',
    initialises=initialises,
    archs=tuple(archs),
    normalization=normalization.IMAGENET,
    num_classes=classes,
    dataset=dataset,
    reference=_TV.format(ref),
  )


_VOC = 'COCO subset with the 20 Pascal VOC classes + background'
SOURCES: dict[str, Source] = {
  s.name: s
  for s in (
    *(
      _timm(f'densenet{d}.tv_in1k', [f'denseaspp{d}'], 'apache-2.0')
      for d in (121, 161, 169, 201)
    ),
    *(
      _timm(f'resnet{d}.tv_in1k', archs, 'bsd-3-clause')
      for d, archs in (
        (50, ['deeplabv3_resnet50', 'deeplabv3plus_resnet50']),
        (101, ['deeplabv3_resnet101', 'deeplabv3plus_resnet101']),
        (152, ['deeplabv3_resnet152']),
      )
    ),
    *(
      _timm(
        f'xception{d}.tf_in1k',
        [f'deeplabv3plus_xception{d}'],
        'apache-2.0',
        normalization.INCEPTION,
      )
      for d in (65, 71)
    ),
    _torchvision(
      'mobilenet_v3_large',
      'mobilenet_v3_large-8738ca79.pth',
      ['deeplabv3_mobilenet_v3_large', 'lraspp_mobilenet_v3_large'],
      ref='.MobileNet_V3_Large_Weights.IMAGENET1K_V1',
    ),
    *(
      _torchvision(
        arch,
        file,
        [arch],
        initialises='model',
        classes=21,
        dataset='voc_aug',
        ref=f'.segmentation.{weights}.COCO_WITH_VOC_LABELS_V1 ({_VOC})',
      )
      for arch, file, weights in (
        (
          'deeplabv3_resnet50',
          'deeplabv3_resnet50_coco-cd0a2569.pth',
          'DeepLabV3_ResNet50_Weights',
        ),
        (
          'deeplabv3_resnet101',
          'deeplabv3_resnet101_coco-586e9e4e.pth',
          'DeepLabV3_ResNet101_Weights',
        ),
        (
          'deeplabv3_mobilenet_v3_large',
          'deeplabv3_mobilenet_v3_large-fc3c493d.pth',
          'DeepLabV3_MobileNet_V3_Large_Weights',
        ),
        (
          'lraspp_mobilenet_v3_large',
          'lraspp_mobilenet_v3_large-d234d4ea.pth',
          'LRASPP_MobileNet_V3_Large_Weights',
        ),
      )
    ),
  )
}


def is_name(spec: str) -> bool:
  """Whether `spec` names published weights (rather than a local path)."""
  return spec.startswith((HUB, TORCHVISION, 'http://', 'https://'))


def is_weights_file(spec: str) -> bool:
  """A name, or a local PyTorch / NumPy / safetensors weights file (not a
  deeplab-jax checkpoint directory)."""
  return is_name(spec) or spec.endswith(('.pth', '.pt', '.npz', '.safetensors'))


def _known() -> str:
  return ', '.join(SOURCES)


def source(spec: str) -> Source | None:
  """The table entry for `spec` (a revision suffix is ignored)."""
  return SOURCES.get(spec.partition('@')[0])


def fetch(
  spec: str, *, sha256: str | None = None, flag: str = _INIT_FROM
) -> Fetched:
  """The local file of `spec` (a name, URL or path), fetched into the
  ecosystem's cache and checked against the hash its source states.

  Args:
    spec: a published name (`SOURCES`), an `hf-hub:` repo, an `http(s)://`
      URL (optionally ending in `#sha256=HEX`), or a local file.
    sha256: a SHA-256 the file must have (the user's own statement, e.g.
      `scripts.convert_torch --sha256`), checked besides the source's own.
    flag: the caller's flag for a local path, named in the advice of an
      error (e.g. `--input`).

  Raises:
    UserError: one line: unknown or invalid name (the known names listed),
      offline with nothing cached (what to fetch, how, and that a local
      path works), a gated or private repository, a failed hash check (the
      file is not kept), a URL that names no file, or a missing file.
  """
  if sha256 is not None:
    sha256 = _digest(sha256, '--sha256')
  if spec.startswith(HUB):
    fetched = _fetch_hub(spec, flag)
  elif spec.startswith(TORCHVISION):
    entry = SOURCES.get(spec)
    if entry is None:
      raise UserError(f'unknown weights name {spec!r}; known: {_known()}')
    fetched = _fetch_url(spec, entry.location, entry, flag, sha256)
  elif spec.startswith(('http://', 'https://')):
    fetched = _fetch_url(spec, spec, None, flag, sha256)
  elif os.path.isdir(spec):
    raise UserError(
      f'{spec} is a directory, not a weights file: pass a .pth, .pt, '
      '.safetensors or .npz file or a published name'
      + (
        ' (a deeplab-jax checkpoint directory is read as it is, without '
        'conversion)'
        if flag == _INIT_FROM
        else ''
      )
    )
  elif not os.path.isfile(spec):
    raise UserError(
      f'{spec} does not exist (a weights file, a checkpoint directory, or a '
      f'published name: {_known()})'
    )
  else:
    fetched = Fetched(spec, spec, sha256_of(spec))
  if sha256 and fetched.sha256 != sha256:
    raise UserError(
      f'{spec}: {fetched.path} has sha256 {fetched.sha256[:12]}..., not the '
      f'stated {sha256[:12]}...; check the digest or the file'
    )
  return fetched


def check_arch(spec: str, arch: str, flag: str = _INIT_FROM) -> None:
  """Refuses a published name that does not load into `arch`, before
  anything is fetched: one line naming both and the names that fit.

  Raises:
    UserError: `spec` is a known name whose architectures exclude `arch`.
  """
  entry = source(spec)
  if entry is None or arch in entry.archs:
    return
  fits = [s.name for s in SOURCES.values() if arch in s.archs]
  random = f'{flag}= for random weights'
  advice = (
    f'use {" or ".join(f"{flag}={n}" for n in fits)}, or {random}'
    if fits
    else f'no published weights load into {arch}: pass {random}'
  )
  raise UserError(
    f'{flag}={spec} holds {" / ".join(entry.archs)} weights, which do not '
    f'load into {arch}; {advice}'
  )


def read(
  spec: str, *, sha256: str | None = None, flag: str = _INIT_FROM
) -> tuple[Mapping[str, np.ndarray], Fetched]:
  """The state dict of `spec` (see `fetch`) and where it came from."""
  fetched = fetch(spec, sha256=sha256, flag=flag)
  return read_file(fetched.path), fetched


def read_file(path: str) -> Mapping[str, np.ndarray]:
  """A state dict from `.safetensors` (no PyTorch needed), `.npz`, or a
  PyTorch pickle (`.pth`/`.pt`, needs PyTorch)."""
  if path.endswith('.safetensors'):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
      return load_file(path)
    except (SafetensorError, OSError) as e:
      raise UserError(
        f'cannot read {path} as safetensors ({e}); is the file complete? '
        'Delete it and download it again'
      ) from e
  from deeplab_jax.convert import torch as torch_convert

  return torch_convert.read_state_dict(path)


def sha256_of(path: str) -> str:
  """The SHA-256 of a file, read in blocks."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      h.update(block)
  return h.hexdigest()


def _digest(text: str, what: str) -> str:
  """A stated SHA-256: 64 hex digits (as `sha256sum` prints them)."""
  digest = text.strip().lower()
  if not re.fullmatch(r'[0-9a-f]{64}', digest):
    raise UserError(
      f'{what} {text!r} is not a SHA-256 (64 hex digits, as sha256sum '
      'prints it)'
    )
  return digest


def _hub_reachable() -> bool:
  """Whether the Hub's endpoint accepts a connection, asked once with a short
  timeout, so that an offline host gets its one line at once rather than
  after huggingface_hub's retries. Behind a proxy the client decides."""
  from huggingface_hub import constants

  if constants.HF_HUB_OFFLINE:
    return False
  if any(
    os.environ.get(k)
    for k in ('HTTPS_PROXY', 'https_proxy', 'HTTP_PROXY', 'http_proxy')
  ):
    return True
  url = urllib.parse.urlparse(constants.ENDPOINT)
  port = url.port or (443 if url.scheme == 'https' else 80)
  try:
    socket.create_connection((url.hostname, port), timeout=5).close()
  except OSError:
    return False
  return True


def _fetch_hub(spec: str, flag: str) -> Fetched:
  repo, _, revision = spec.removeprefix(HUB).partition('@')
  import huggingface_hub
  from huggingface_hub import constants

  where = f'the Hugging Face cache ({constants.HF_HUB_CACHE})'
  online = _hub_reachable()
  try:
    # The client's own retry warnings would precede the one line.
    with _quiet('huggingface_hub'):
      path = huggingface_hub.hf_hub_download(
        repo,
        'model.safetensors',
        revision=revision or None,
        local_files_only=not online,
      )
  except (ValueError, OSError) as e:  # the client's errors are these
    raise _hub_error(e, spec, flag) from e
  digest = sha256_of(path)
  blob = os.path.realpath(path)
  expected = os.path.basename(blob)
  # The cache names a large file's blob by its SHA-256 (the Hub's ETag).
  if re.fullmatch(r'[0-9a-f]{64}', expected) and digest != expected:
    for stale in {path, blob}:
      if os.path.lexists(stale):
        os.remove(stale)
    raise UserError(
      f'{spec}: the cached model.safetensors fails its hash check (sha256 '
      f'{digest[:12]}..., expected {expected[:12]}...): removed it from '
      f'{where}; run again to download it again'
    )
  return Fetched(spec, path, digest, source(spec))


def _hub_error(e: Exception, spec: str, flag: str) -> UserError:
  """The one line for a failed `hf_hub_download` of `spec`."""
  from huggingface_hub import constants, errors

  repo, _, revision = spec.removeprefix(HUB).partition('@')
  at = f'{repo}@{revision}' if revision else repo
  login = (
    'log in with `hf auth login` (or set HF_TOKEN) as a user who has access'
  )
  local = f'pass the file as a local path ({flag}=/path/to/model.safetensors)'
  status = _http_status(e)
  if isinstance(e, errors.HFValidationError):
    return UserError(
      f'{spec}: {repo!r} is not a Hub repo id (OWNER/NAME, e.g. '
      f'timm/densenet161.tv_in1k); known names: {_known()}'
    )
  if isinstance(e, errors.GatedRepoError):
    return UserError(
      f'{spec}: {at} is a gated repository: accept its terms on '
      f'{constants.ENDPOINT}/{repo} and {login}'
    )
  if isinstance(e, errors.RepositoryNotFoundError):
    return UserError(
      f'{spec}: the Hub has no repository {at}, or it is private (then '
      f'{login}); known names: {_known()}'
    )
  if status in (401, 403):
    return UserError(
      f'{spec}: the Hub refused access to {at} (HTTP {status}): it is '
      f'private or gated; {login}'
    )
  if isinstance(e, errors.LocalEntryNotFoundError):
    why = (
      'HF_HUB_OFFLINE is set'
      if constants.HF_HUB_OFFLINE
      else f'the Hub ({constants.ENDPOINT}) cannot be reached'
    )
    return UserError(
      f'{spec}: model.safetensors of {repo} is not in the Hugging Face '
      f'cache ({constants.HF_HUB_CACHE}) and {why}; fetch it where there is '
      f'network with `hf download {repo} model.safetensors` (same HF_HOME), '
      f'or {local}'
    )
  if isinstance(e, (errors.RevisionNotFoundError, errors.EntryNotFoundError)):
    return UserError(
      f'{spec}: the Hub has no model.safetensors for {at} '
      f'({type(e).__name__}); known names: {_known()}'
    )
  return UserError(
    f'{spec}: download failed ({type(e).__name__}: '
    f'{" ".join(str(e).split())[:160]}); try again, or {local}'
  )


def _http_status(error: BaseException | None) -> int | None:
  """The HTTP status of the reply behind `error` or its causes."""
  while error is not None:
    status = getattr(getattr(error, 'response', None), 'status_code', None)
    if status is not None:
      return status
    error = error.__cause__ or error.__context__
  return None


@contextlib.contextmanager
def _quiet(logger: str):
  """`logger`'s records below ERROR are dropped while the block runs."""
  log = logging.getLogger(logger)
  level = log.level
  log.setLevel(logging.ERROR)
  try:
    yield
  finally:
    log.setLevel(level)


def url_cache_dir() -> str:
  """torch.hub's cache of downloaded weights (`TORCH_HOME/hub/checkpoints`),
  located by torch.hub's own rule, so that no PyTorch is needed to use it."""
  home = os.environ.get('TORCH_HOME') or os.path.join(
    os.environ.get('XDG_CACHE_HOME') or os.path.join('~', '.cache'), 'torch'
  )
  return os.path.join(os.path.expanduser(home), 'hub', 'checkpoints')


def url_cache_path(url: str, *, torchvision: bool = False) -> str:
  """Where the file of `url` (no fragment) is cached.

  torchvision's files (`torchvision`, or a URL in download.pytorch.org's
  models folder) keep torch.hub's own entry (`checkpoints/FILE`, shared
  with torchvision): in that one folder the file name is the whole URL.
  Any other URL gets a folder keyed by the SHA-256 of the whole URL, so two
  URLs that end in the same file name never share an entry.
  """
  filename = os.path.basename(urllib.parse.urlparse(url).path)
  if torchvision or _is_torchvision_file(url):
    return os.path.join(url_cache_dir(), filename)
  key = hashlib.sha256(url.encode()).hexdigest()[:16]
  return os.path.join(url_cache_dir(), f'url-{key}', filename)


def _is_torchvision_file(url: str) -> bool:
  rest = url.removeprefix(_TORCHVISION_URL)
  return rest != url and '/' not in rest and '?' not in rest


def _stated_hash(url, fragment, sha256, torchvision):
  """`(hex, what stated it)`: the user's digest (`#sha256=` or `sha256`), or
  the prefix a torchvision file name carries; `(None, '')` if none."""
  if fragment:
    key, _, value = fragment.partition('=')
    if key != 'sha256':
      raise UserError(
        f'{url}#{fragment}: the only fragment understood is #sha256=HEX'
      )
    stated = _digest(value, '#sha256=')
    if sha256 and sha256 != stated:
      raise UserError(f'{url}: #sha256= and --sha256 differ')
    return stated, '#sha256='
  if sha256:
    return sha256, '--sha256'
  if torchvision:
    match = _TORCHVISION_HASH.search(os.path.basename(url))
    if match:
      return match.group(1), "the hash prefix in torchvision's file name"
  return None, ''


def _fetch_url(
  name: str, spec: str, entry: Source | None, flag: str, sha256: str | None
) -> Fetched:
  """A URL through torch.hub's cache (see `url_cache_path`): downloaded into
  a temporary file, checked against its stated hash, then moved into place,
  so a failed or truncated download leaves nothing behind."""
  url, _, fragment = spec.partition('#')
  if not os.path.basename(urllib.parse.urlparse(url).path):
    raise UserError(
      f'{url} names no file (its path ends in "/"); give the URL of the '
      'weights file itself'
    )
  torchvision = _is_torchvision_file(url) or (
    entry is not None and entry.name.startswith(TORCHVISION)
  )
  expected, stated_by = _stated_hash(url, fragment, sha256, torchvision)
  path = url_cache_path(url, torchvision=torchvision)
  if not os.path.isfile(path):
    _download(name, url, path, expected, stated_by, flag)
  digest = sha256_of(path)
  if expected and not digest.startswith(expected):
    os.remove(path)
    raise UserError(
      f'{name}: the cached {path} fails its hash check (sha256 '
      f'{digest[:12]}..., expected {expected[:12]}... from {stated_by}): '
      'removed it; run again to download it again'
    )
  return Fetched(name, path, digest, entry)


def _download(name, url, path, expected, stated_by, flag) -> None:
  directory = os.path.dirname(path)
  what = url if name == url.partition('#')[0] else f'{name}: {url}'
  advice = (
    f'fetch it where there is network (curl -L -o {path} {url}), or pass '
    f'a local path ({flag}=/path/to/{os.path.basename(path)})'
  )
  os.makedirs(directory, exist_ok=True)
  partial = tempfile.NamedTemporaryFile(
    dir=directory, prefix='.partial-', delete=False
  )
  try:
    with partial, _open_url(url, what, advice) as reply:
      size = int(reply.headers.get('Content-Length') or 0) or None
      h = hashlib.sha256()
      got = 0
      with tqdm.tqdm(
        total=size,
        unit='B',
        unit_scale=True,
        desc=os.path.basename(path),
        disable=not sys.stderr.isatty(),
      ) as bar:
        while block := reply.read(1 << 20):
          partial.write(block)
          h.update(block)
          got += len(block)
          bar.update(len(block))
    if size is not None and got != size:
      raise UserError(
        f'cannot download {what}: the connection closed after {got} of '
        f'{size} bytes; nothing was kept in {directory}. Try again, or '
        f'{advice}'
      )
    digest = h.hexdigest()
    if expected and not digest.startswith(expected):
      raise UserError(
        f'{what} fails its hash check (sha256 {digest[:12]}..., expected '
        f'{expected[:12]}... from {stated_by}); nothing was kept in '
        f'{directory}. Try again, or fetch the file by hand and pass its path'
      )
    os.replace(partial.name, path)
  finally:
    if os.path.exists(partial.name):
      os.remove(partial.name)
      with contextlib.suppress(OSError):
        os.rmdir(directory)  # a URL's own folder, if it is empty


@contextlib.contextmanager
def _open_url(url: str, what: str, advice: str):
  try:
    reply = urllib.request.urlopen(
      urllib.request.Request(url, headers={'User-Agent': 'deeplab-jax'}),
      timeout=60,
    )
  except urllib.error.HTTPError as e:
    why = {
      401: 'it needs a login: download it with your credentials and pass '
      'its path',
      403: 'access is denied (private, or it needs a login): download it '
      'with your credentials and pass its path',
      404: 'there is no such file: check the URL',
    }.get(e.code, f'{e.reason}: try again later, or {advice}')
    raise UserError(
      f'cannot download {what}: the server answered HTTP {e.code}; {why}'
    ) from e
  except (OSError, http.client.HTTPException) as e:
    raise UserError(
      f'cannot download {what} ({type(e).__name__}: '
      f'{" ".join(str(e).split())[:160]}); {advice}'
    ) from e
  with reply:
    try:
      yield reply
    except (OSError, http.client.HTTPException) as e:
      raise UserError(
        f'cannot download {what}: the transfer failed ({type(e).__name__}: '
        f'{" ".join(str(e).split())[:120]}); {advice}'
      ) from e


def load_model(spec: str):
  """`(model, metadata)` of a published whole segmentation model (e.g.
  `torchvision:deeplabv3_resnet101`), converted in memory, as
  `checkpointing.load_model` returns a checkpoint's: what `--checkpoint`
  of predict and evaluate accept besides a checkpoint directory.

  Raises:
    UserError: `spec` is not a whole model with a known architecture (a
      backbone-only source has no classifier to predict with).
  """
  from deeplab_jax import checkpointing
  from deeplab_jax.convert import torch as torch_convert
  from deeplab_jax.data import datasets

  entry = source(spec)
  if entry is None or entry.initialises != 'model':
    whole = [s.name for s in SOURCES.values() if s.initialises == 'model']
    raise UserError(
      f'{spec} is not a published segmentation model; --checkpoint takes a '
      f'checkpoint directory or one of {", ".join(whole)}'
    )
  state_dict, fetched = read(spec, flag='--checkpoint')
  model = torch_convert.load(entry.archs[0], state_dict)
  names = datasets.label_spec(entry.dataset).class_names
  mean, std = entry.normalization
  meta = checkpointing.model_metadata(
    model,
    class_names=names,
    mean=mean,
    std=std,
    extra={'dataset': entry.dataset, 'init_from': fetched.record()},
  )
  return model, meta

"""Published weights by name: `hf-hub:...` and `torchvision:...` sources.

Wherever a PyTorch weights file is accepted (`model.init_from`,
`scripts.convert_torch --input`, `--checkpoint` of predict and evaluate for
whole models), a name works too:

- `hf-hub:REPO[@REVISION]`: `model.safetensors` of a Hugging Face Hub repo,
  fetched by `huggingface_hub` into its cache (`HF_HOME`, `HF_HUB_OFFLINE`
  and revisions work as for any Hub client). Reading safetensors needs no
  PyTorch, so an ImageNet backbone loads on a TPU VM without it.
- `torchvision:NAME`: a torchvision weights URL, fetched by `torch.hub` into
  its cache (`TORCH_HOME`) and checked against the hash prefix in the file
  name. These files are PyTorch pickles: reading them needs PyTorch.
- any `http(s)://` URL of a `.pth`, fetched the torch.hub way.

Every fetched file is checked before use: the Hub's content hash (the
blob's name) or torch.hub's hash prefix. A file that fails is removed from
the cache and refused, so a truncated or corrupt download is never loaded.
`SOURCES` is the table of known names (README, "Published weights").
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import urllib.parse
from collections.abc import Mapping

import numpy as np

from deeplab_jax.data import normalization
from deeplab_jax.errors import UserError

HUB = 'hf-hub:'
TORCHVISION = 'torchvision:'
_TORCHVISION_URL = 'https://download.pytorch.org/models/'
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


def fetch(spec: str) -> Fetched:
  """The local file of `spec` (a name, URL or path), fetched into the
  ecosystem's cache and checked.

  Raises:
    UserError: one line: unknown name (the known names listed), offline with
      nothing cached (what to fetch, how, and that a local path works), a
      failed hash check (the file is removed), or a missing file.
  """
  if spec.startswith(HUB):
    return _fetch_hub(spec)
  if spec.startswith(TORCHVISION):
    entry = SOURCES.get(spec)
    if entry is None:
      raise UserError(f'unknown weights name {spec!r}; known: {_known()}')
    return _fetch_url(spec, entry.location, entry)
  if spec.startswith(('http://', 'https://')):
    return _fetch_url(spec, spec, None)
  if not os.path.isfile(spec):
    raise UserError(
      f'{spec} does not exist (a weights file, a checkpoint directory, or a '
      f'published name: {_known()})'
    )
  return Fetched(spec, spec, sha256_of(spec))


def read(spec: str) -> tuple[Mapping[str, np.ndarray], Fetched]:
  """The state dict of `spec` (see `fetch`) and where it came from."""
  fetched = fetch(spec)
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


def _fetch_hub(spec: str) -> Fetched:
  repo, _, revision = spec.removeprefix(HUB).partition('@')
  import huggingface_hub
  from huggingface_hub import constants, errors

  where = f'the Hugging Face cache ({constants.HF_HUB_CACHE})'
  try:
    path = huggingface_hub.hf_hub_download(
      repo, 'model.safetensors', revision=revision or None
    )
  except errors.LocalEntryNotFoundError as e:
    why = (
      'HF_HUB_OFFLINE is set'
      if constants.HF_HUB_OFFLINE
      else 'the Hub cannot be reached'
    )
    raise UserError(
      f'{spec}: model.safetensors of {repo} is not in {where} and {why}; '
      f'fetch it where there is network with `hf download {repo} '
      'model.safetensors` (same HF_HOME), or pass the file as a local path '
      '(model.init_from=/path/to/model.safetensors)'
    ) from e
  except (
    errors.RepositoryNotFoundError,
    errors.RevisionNotFoundError,
    errors.EntryNotFoundError,
  ) as e:
    raise UserError(
      f'{spec}: the Hub has no model.safetensors for {repo}'
      f'{"@" + revision if revision else ""} ({type(e).__name__}); known '
      f'names: {_known()}'
    ) from e
  except (OSError, errors.HfHubHTTPError) as e:
    raise UserError(
      f'{spec}: download failed ({type(e).__name__}: '
      f'{" ".join(str(e).split())[:160]}); try again, or pass a local path'
    ) from e
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


def _fetch_url(name: str, url: str, entry: Source | None) -> Fetched:
  try:
    import torch.hub
  except ImportError as e:
    raise UserError(
      f'{name} is a PyTorch file: downloading and reading it needs PyTorch '
      '(pip install torch), or convert it once where PyTorch is installed '
      f'(python -m scripts.convert_torch --input {name} ...) and pass the '
      'converted checkpoint'
    ) from e
  directory = os.path.join(torch.hub.get_dir(), 'checkpoints')
  filename = os.path.basename(urllib.parse.urlparse(url).path)
  path = os.path.join(directory, filename)
  match = torch.hub.HASH_REGEX.search(filename)
  prefix = match.group(1) if match else None
  if not os.path.isfile(path):
    os.makedirs(directory, exist_ok=True)
    try:
      # torch.hub's own download: a temporary file, checked against the
      # hash prefix, then moved into place (nothing is left on failure).
      torch.hub.download_url_to_file(url, path, hash_prefix=prefix)
    except RuntimeError as e:
      what = url if name == url else f'{name}: the download from {url}'
      raise UserError(
        f'{what} fails its hash check ({e}); '
        f'nothing was kept in {directory}. Try again, or fetch the file by '
        'hand and pass its path'
      ) from e
    except Exception as e:  # noqa: BLE001 - URLError, IncompleteRead, ...
      what = url if name == url else f'{name}: {url}'
      raise UserError(
        f'cannot download {what} ({type(e).__name__}: '
        f'{" ".join(str(e).split())[:160]}); fetch it where there is network '
        f'into {directory}/ (curl -L -o {path} {url}), or pass a local path'
      ) from e
  digest = sha256_of(path)
  if prefix and not digest.startswith(prefix):
    os.remove(path)
    raise UserError(
      f'{name}: the cached {path} fails its hash check (sha256 '
      f'{digest[:12]}..., expected {prefix}...): removed it; run again to '
      'download it again'
    )
  return Fetched(name, path, digest, entry)


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
  state_dict, fetched = read(spec)
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

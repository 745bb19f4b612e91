"""One rule for every fetched weights file, through the user's door
(`scripts.convert_torch --input`, `model.init_from`, `scripts.train`) on
loopback servers: URLs cached by the whole URL, a hash checked only where a
source states one, safetensors without PyTorch, and every bad name, URL or
offline miss answered in one line."""

import hashlib
import io
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.torch
import torch
from timm.models.densenet import DenseNet

from configs import cityscapes_denseaspp
from deeplab_jax import checkpointing, initialization
from deeplab_jax.convert import sources
from deeplab_jax.errors import UserError
from tests import weights_servers
from tests.run_helpers import finish_all, one_error_line, run_python
from tests.torch_refs import randomize_batchnorm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_densenet(seed):
  """timm's DenseNet at `denseaspp_tiny`'s widths, weights from `seed`."""
  torch.manual_seed(seed)
  model = DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_classes=10)
  randomize_batchnorm(model, seed)
  return model.eval()


def _pth(model) -> bytes:
  buffer = io.BytesIO()
  torch.save(model.state_dict(), buffer)
  return buffer.getvalue()


def _conv0(model) -> np.ndarray:
  """The first convolution's kernel in PyTorch's OIHW layout."""
  return model.state_dict()['features.conv0.weight'].numpy()


def _loaded_conv0(directory) -> np.ndarray:
  model, _ = checkpointing.load_model(str(directory))
  return np.transpose(
    np.asarray(model.backbone.conv0.kernel[...]), (3, 2, 0, 1)
  )


def _convert(url, out, env, *extra):
  return subprocess.Popen(
    [
      sys.executable,
      '-m',
      'scripts.convert_torch',
      f'--input={url}',
      '--arch=denseaspp_tiny',
      '--num_classes=5',
      f'--output={out}',
      *extra,
    ],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=dict(os.environ, **env),
  )


def _files(directory):
  return sorted(
    os.path.relpath(os.path.join(d, f), directory)
    for d, _, names in os.walk(directory)
    for f in names
  )


def test_urls_keyed_by_whole_url_and_hash_only_where_stated(
  tmp_path, monkeypatch
):
  """`resnet-50.pth` and `unet-2023-01.pth` carry no hash (only torchvision's
  file names do): both load. Two URLs ending in `model.pth` give two
  entries and two different, correct loads (through `model.init_from`)."""
  a, b = _tiny_densenet(0), _tiny_densenet(1)
  data_a, data_b = _pth(a), _pth(b)
  digest_a = hashlib.sha256(data_a).hexdigest()
  digest_b = hashlib.sha256(data_b).hexdigest()
  # Read as torch.hub's hash prefix, these names would refuse these files.
  assert not digest_a.startswith('50') and not digest_b.startswith('01')
  files = {
    '/m/resnet-50.pth': data_a,
    '/m/unet-2023-01.pth': data_b,
    '/v1/model.pth': data_a,
    '/v2/model.pth': data_b,
  }
  torch_home = tmp_path / 'torch'
  env = {'TORCH_HOME': str(torch_home)}
  with weights_servers.serve(files) as url:
    runs = finish_all(
      [
        _convert(f'{url}/m/resnet-50.pth', tmp_path / 'r50', env),
        _convert(f'{url}/m/unet-2023-01.pth', tmp_path / 'unet', env),
      ]
    )
    for code, _, err in runs:
      assert code == 0, err
    monkeypatch.setenv('TORCH_HOME', str(torch_home))
    loaded = {}
    for version in ('v1', 'v2'):
      config = cityscapes_denseaspp.get_config('smoke')
      with config.unlocked():
        config.model.init_from = f'{url}/{version}/model.pth'
        config.model.options.transition4 = False
      loaded[version] = initialization.create_model(config, num_classes=5)
  for out, ref, digest in (('r50', a, digest_a), ('unet', b, digest_b)):
    np.testing.assert_array_equal(_loaded_conv0(tmp_path / out), _conv0(ref))
    meta = checkpointing.read_metadata(str(tmp_path / out))
    assert meta['source']['sha256'] == digest
  for version, ref, digest in (('v1', a, digest_a), ('v2', b, digest_b)):
    model = loaded[version]
    got = np.transpose(model.backbone.conv0.kernel[...], (3, 2, 0, 1))
    np.testing.assert_array_equal(got, _conv0(ref))
    assert initialization.init_record(model)['sha256'] == digest
  cache = torch_home / 'hub' / 'checkpoints'
  cached = _files(cache)
  assert len(cached) == 4, cached
  assert len({os.path.dirname(f) for f in cached}) == 4
  assert sorted(os.path.basename(f) for f in cached) == sorted(
    ['model.pth', 'model.pth', 'resnet-50.pth', 'unet-2023-01.pth']
  )


@pytest.mark.slow
def test_stated_sha256_checked_and_a_mismatch_keeps_nothing(
  tmp_path, monkeypatch
):
  data = _pth(_tiny_densenet(0))
  digest = hashlib.sha256(data).hexdigest()
  wrong = hashlib.sha256(b'other bytes').hexdigest()
  torch_home = tmp_path / 'torch'
  env = {'TORCH_HOME': str(torch_home)}
  with weights_servers.serve({'/w/dense.pth': data}) as url:
    file = f'{url}/w/dense.pth'
    runs = finish_all(
      [
        _convert(f'{file}#sha256={wrong}', tmp_path / 'bad', env),
        _convert(file, tmp_path / 'bad2', env, f'--sha256={wrong}'),
      ]
    )
    for code, _, err in runs:
      line = one_error_line(code, err)
      assert 'fails its hash check' in line and 'nothing was kept' in line
      assert wrong[:12] in line and digest[:12] in line
    assert _files(torch_home) == []
    assert not (tmp_path / 'bad').exists()
    [(code, _, err)] = finish_all(
      [_convert(f'{file}#sha256={digest}', tmp_path / 'good', env)]
    )
  assert code == 0, err
  meta = checkpointing.read_metadata(str(tmp_path / 'good'))
  assert meta['source']['sha256'] == digest
  # The cached file is checked against the stated digest on every use.
  [cached] = _files(torch_home)
  path = torch_home / cached
  path.write_bytes(data[:-1] + b'x')
  monkeypatch.setenv('TORCH_HOME', str(torch_home))
  with pytest.raises(UserError, match='fails its hash check.*removed it'):
    sources.fetch(f'{file}#sha256={digest}')
  assert not path.exists()


def test_torchvision_name_checked_against_its_file_name(tmp_path, monkeypatch):
  """A torchvision name's file must match the hash prefix in its name,
  wherever it is served from; nothing is kept when it does not."""
  name = 'torchvision:mobilenet_v3_large'
  entry = sources.SOURCES[name]
  file = os.path.basename(entry.location)  # mobilenet_v3_large-8738ca79.pth
  data = _pth(_tiny_densenet(0))
  assert not hashlib.sha256(data).hexdigest().startswith('8738ca79')
  monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
  with weights_servers.serve({f'/{file}': data}) as url:
    moved = type(entry)(**{**entry.__dict__, 'location': f'{url}/{file}'})
    monkeypatch.setitem(sources.SOURCES, name, moved)
    with pytest.raises(UserError) as e:
      sources.fetch(name)
  message = str(e.value)
  assert '\n' not in message
  assert 'fails its hash check' in message and '8738ca79' in message
  assert "torchvision's file name" in message
  assert _files(tmp_path / 'torch') == []


def test_safetensors_url_loads_without_pytorch(tmp_path):
  """`scripts.convert_torch --input URL.safetensors` in a process where
  `import torch` fails: converted, equal to the source's weights."""
  ref = _tiny_densenet(2)
  weights = tmp_path / 'w.safetensors'
  safetensors.torch.save_file(ref.state_dict(), str(weights))
  data = weights.read_bytes()
  hidden = tmp_path / 'no_torch'
  hidden.mkdir()
  (hidden / 'torch.py').write_text(
    'raise ImportError("PyTorch is hidden by the test")\n'
  )
  env = {
    'TORCH_HOME': str(tmp_path / 'torch'),
    'PYTHONPATH': os.pathsep.join([str(hidden), REPO]),
  }
  probe = subprocess.run(
    [sys.executable, '-c', 'import torch'],
    capture_output=True,
    text=True,
    env=dict(os.environ, **env),
  )
  assert 'PyTorch is hidden by the test' in probe.stderr
  with weights_servers.serve({'/x/w.safetensors': data}) as url:
    [(code, _, err)] = finish_all(
      [_convert(f'{url}/x/w.safetensors', tmp_path / 'out', env)]
    )
  assert code == 0, err
  np.testing.assert_array_equal(_loaded_conv0(tmp_path / 'out'), _conv0(ref))
  meta = checkpointing.read_metadata(str(tmp_path / 'out'))
  assert meta['source']['sha256'] == hashlib.sha256(data).hexdigest()


def test_bad_names_and_urls_are_one_line(tmp_path):
  """Through `scripts.convert_torch`: an invalid Hub id, a gated repository
  (the Hub's 401 and 403), a private one, a directory that is not a
  weights file, and a URL that names no file."""
  refuse = {
    weights_servers.hub_path('org/gated', 'model.safetensors'): (
      401,
      'GatedRepo',
    ),
    weights_servers.hub_path('org/gated_terms', 'model.safetensors'): (
      403,
      'GatedRepo',
    ),
    weights_servers.hub_path('org/private', 'model.safetensors'): (
      401,
      'RepoNotFound',
    ),
    '/secret/w.pth': (403, None),
  }
  folder = tmp_path / 'not_a_checkpoint'
  folder.mkdir()
  (folder / 'notes.txt').write_text('hello')
  with weights_servers.serve({}, refuse=refuse) as url:
    env = {'HF_ENDPOINT': url, 'HF_HOME': str(tmp_path / 'hf')}
    cases = {
      'hf-hub:../x': "'../x' is not a Hub repo id",
      'hf-hub:org/gated': 'org/gated is a gated repository',
      'hf-hub:org/gated_terms': 'org/gated_terms is a gated repository',
      'hf-hub:org/private': 'no repository org/private, or it is private',
      str(folder): 'is a directory, not a weights file',
      f'{url}/models/': 'names no file',
      f'{url}/secret/w.pth': 'HTTP 403',
    }
    runs = finish_all(
      [
        _convert(spec, tmp_path / f'out{i}', env)
        for i, spec in enumerate(cases)
      ]
    )
  for (spec, part), (code, _, err) in zip(cases.items(), runs, strict=True):
    line = one_error_line(code, err)
    assert part in line, (spec, line)
    assert 'Traceback' not in err
  for gated in ('gated', 'gated_terms', 'private'):
    line = one_error_line(*runs[list(cases).index(f'hf-hub:org/{gated}')][::2])
    assert 'hf auth login' in line and 'HF_TOKEN' in line
  assert not any((tmp_path / f'out{i}').exists() for i in range(len(cases)))


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_offline_miss_is_one_quick_line_without_hf_hub_offline(
  tmp_path, data_dir, monkeypatch
):
  """No network, an empty cache, HF_HUB_OFFLINE unset: `scripts.train` and
  `scripts.convert_torch` each say the miss once, within 15 s, without the
  client's retry warnings, naming their own flag for a local path."""
  name = 'hf-hub:timm/densenet161.tv_in1k'
  monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
  env = {
    'HF_HOME': str(tmp_path / 'empty_hf'),
    'HF_ENDPOINT': f'http://127.0.0.1:{_closed_port()}',
  }
  workdir = tmp_path / 'run'
  commands = {
    '--config.model.init_from': [
      'scripts.train',
      '--config=configs/cityscapes_denseaspp.py:smoke',
      f'--workdir={workdir}',
      f'--config.data.data_dir={data_dir}',
      '--config.model.arch=denseaspp161',
      f'--config.model.init_from={name}',
    ],
    '--input': [
      'scripts.convert_torch',
      f'--input={name}',
      f'--output={tmp_path / "out"}',
    ],
  }
  for flag, args in commands.items():
    # The same command with HF_HUB_OFFLINE=1 (the cache alone, no network)
    # is the baseline: the miss costs no more than it, give or take load;
    # the client's own retries would add 23 s.
    start = time.monotonic()
    r = run_python(['-m', *args], HF_HUB_OFFLINE='1', **env)
    baseline = time.monotonic() - start
    one_error_line(r.returncode, r.stderr)
    start = time.monotonic()
    r = run_python(['-m', *args], **env)
    took = time.monotonic() - start
    line = one_error_line(r.returncode, r.stderr)
    assert took < max(15, baseline + 8), (flag, took, baseline)
    assert 'Retry' not in r.stderr
    for part in (
      name,
      'not in the Hugging Face cache',
      'cannot be reached',
      'hf download timm/densenet161.tv_in1k model.safetensors',
      f'({flag}=/path/to/model.safetensors)',
    ):
      assert part in line, line
  assert not workdir.exists()
  assert not (tmp_path / 'out').exists()


def test_name_of_another_arch_refused_before_fetching(tmp_path):
  """The main recipe with a DenseNet-121 model keeps DenseNet-161's name:
  refused in one line naming both and the name that fits, offline with
  an empty cache (nothing was fetched), nothing written."""
  workdir = tmp_path / 'run'
  r = subprocess.run(
    [
      sys.executable,
      '-m',
      'scripts.train',
      '--config',
      'configs/cityscapes_denseaspp.py:smoke',
      f'--workdir={workdir}',
      '--config.model.arch=denseaspp121',
      '--config.model.init_from=hf-hub:timm/densenet161.tv_in1k',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(
      os.environ, HF_HOME=str(tmp_path / 'empty_hf'), HF_HUB_OFFLINE='1'
    ),
  )
  line = one_error_line(r.returncode, r.stderr)
  assert line == (
    'error: --config.model.init_from=hf-hub:timm/densenet161.tv_in1k holds '
    'denseaspp161 weights, which do not load into denseaspp121; use '
    '--config.model.init_from=hf-hub:timm/densenet121.tv_in1k, or '
    '--config.model.init_from= for random weights'
  )
  assert not workdir.exists()
  # An architecture no published name fits: random weights are the way.
  with pytest.raises(UserError, match='no published weights load into'):
    sources.check_arch('hf-hub:timm/resnet50.tv_in1k', 'denseaspp_tiny')

"""Shared behaviour of the entry scripts: quiet library logs, one-line errors.

Entry points wrap their absl `main` with `entry_point`: `UserError`s exit 1
with `error: <message>` instead of a traceback (set `DEEPLAB_TRACEBACK=1` to
see it), and Orbax's log records are hidden unless `--verbosity` is given.

Why Orbax's records: its per-save INFO lines are chatter, and when an async
checkpoint write fails (a full disk) every one of its background threads
logs the same failure with a traceback, while the main thread raises it as
a `CheckpointWriteError` that is printed as the one line. For the same
reason asyncio's records are hidden (only Orbax runs event loops here), and
`RuntimeError('Event loop is closed')` raised in other threads is not
reported: TensorStore's callbacks raise it for the writes still in flight
after Orbax closed the failed write's event loop. TFDS's warning that a
data set's folder has no `dataset_info.json` is hidden too: it precedes the
one-line "not prepared" error, which names the fix.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import os
import re
import shutil
import sys
import threading
from collections.abc import Callable

from absl import app, flags, logging

from deeplab_jax.errors import UserError


def entry_point(main: Callable[..., object]) -> Callable[..., object]:
  """Wraps an absl `main` (see module docstring)."""

  def wrapped(*args, **kwargs):
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)
      logging.get_absl_handler().addFilter(_worth_showing)
    if not hasattr(sys.unraisablehook, 'wrapped'):  # once per process
      sys.unraisablehook = _without_closed_loop_reports(sys.unraisablehook)
    try:
      return main(*args, **kwargs)
    except Exception as e:
      _peer_lost_exits(e)
      if not isinstance(e, UserError):
        raise
      _fail(str(e))
    except KeyboardInterrupt:
      if os.environ.get('DEEPLAB_TRACEBACK'):
        raise
      print('interrupted', file=sys.stderr)
      sys.exit(130)

  return wrapped


def run(main: Callable[..., object]) -> None:
  """`absl.app.run(main)`, except that flag and config-file errors are one
  line (`error: ...`, exit 1) and `--help` prints the usage and exits 0."""
  app.run(main, flags_parser=_parse_flags)


_HELP = ('--help', '-help', '-h', '-?', '--helpshort', '--helpfull')


def _parse_flags(argv: list[str]) -> list[str]:
  if any(arg in _HELP for arg in argv[1:]):
    app.usage(shorthelp='--helpfull' not in argv, writeto_stdout=True)
    sys.exit(0)
  try:
    argv = _with_recipes_resolved(argv)
  except UserError as e:
    _fail(str(e))
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - absl and config files raise many
    if os.environ.get('DEEPLAB_TRACEBACK'):
      raise
    _fail(f'{_flag_error_text(e, argv)} (see --help)')
  for name, value in flags.FLAGS.flag_values_dict().items():
    # ml_collections defers the error of a config file that failed to load
    # until the config is used; report it now.
    error = getattr(type(value), '_ReportError', None) and vars(value).get(
      '_error'
    )
    if error:
      missing = re.search(r"No such file or directory: '([^']*)'", str(error))
      _fail(
        f'--{name}: config file {missing.group(1)} does not exist'
        if missing
        else f'--{name}: {_config_error_text(str(error))}'
      )
  return rest


def _with_recipes_resolved(argv: list[str]) -> list[str]:
  """`argv` with `--config`'s file resolved by `resolve_recipe`."""
  if 'config' not in flags.FLAGS:
    return argv
  argv = list(argv)
  for i, arg in enumerate(argv):
    if arg.startswith(('--config=', '-config=')):
      flag, _, value = arg.partition('=')
      argv[i] = f'{flag}={resolve_recipe(value)}'
    elif arg in ('--config', '-config') and i + 1 < len(argv):
      argv[i + 1] = resolve_recipe(argv[i + 1])
  return argv


def resolve_recipe(value: str) -> str:
  """`PATH[:variant]` as given when PATH exists; else, for a recipe path such
  as `configs/NAME.py`, the installed recipe of that name, so a recipe runs
  from any directory.

  Raises:
    UserError: no such file and no such recipe: the recipes are listed,
      the nearest name first.
  """
  path, colon, variant = value.partition(':')
  if not path or os.path.exists(os.path.expanduser(path)):
    return value
  recipes = recipes_dir()
  name = os.path.basename(path)
  parent = os.path.basename(os.path.dirname(os.path.normpath(path)))
  if recipes and parent in ('configs', '') and name in recipe_files():
    return os.path.join(recipes, name) + colon + variant
  known = recipe_files()
  nearest = sorted(
    known,
    key=lambda k: -difflib.SequenceMatcher(None, name, k).ratio(),
  )
  hint = f'; did you mean configs/{nearest[0]}?' if nearest else ''
  listed = ', '.join(f'configs/{k}' for k in nearest)
  raise UserError(
    f'--config: {path} does not exist{hint} The recipes: {listed}'
    if nearest
    else f'--config: {path} does not exist'
  )


def recipes_dir() -> str | None:
  """The folder of the installed recipes (the `configs` package)."""
  spec = importlib.util.find_spec('configs')
  locations = spec and spec.submodule_search_locations
  return list(locations)[0] if locations else None


def recipe_files() -> list[str]:
  """The recipes' file names (`cityscapes_denseaspp.py`, ...)."""
  where = recipes_dir()
  if where is None:
    return []
  return sorted(
    f for f in os.listdir(where) if f.endswith('.py') and not f.startswith('_')
  )


def _config_error_text(text: str) -> str:
  """A config file's error in one line: the exception's own message where
  ml_collections wraps a traceback (e.g. an unknown `:variant`)."""
  if 'Traceback (most recent call last)' in text:
    last = text.strip().splitlines()[-1]
    return re.sub(r'^[\w.]+(Error|Exception): ', '', last)
  return ' '.join(text.split())


def _flag_error_text(e: BaseException, argv: list[str] = ()) -> str:
  """A flag error in one line. absl's own message names the flag; for an
  unknown config key ml_collections' 'Did you mean' hint is deeper in the
  chain of exceptions, or there is only a KeyError naming the key."""
  chain, errors = [], []
  while e is not None:
    chain.append(str(e))
    errors.append(e)
    e = e.__cause__ or e.__context__
  for text in chain:
    hint = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
    if hint:
      return f'no config key {hint.group(2)!r}; did you mean {hint.group(1)!r}?'
  for error in errors:
    if type(error) is KeyError and error.args:
      key = f'.{error.args[0]}='
      flag = next((a.split('=')[0] for a in argv if key in a), None)
      if flag:
        options = '.options.' in flag
        return f'{flag}: the recipe has no such key' + (
          ' (a model option the recipe does not set goes in a config file '
          'of your own)'
          if options
          else ''
        )
  head = chain[0].split(': Error whilst parsing config file')[0]
  if head != chain[0]:
    return f'{head}: {_config_error_text(chain[0])}'
  return ' '.join(chain[0].split())


def _peer_lost_exits(error: BaseException) -> None:
  """A failure caused by a lost peer process: its one line, exit 1 now."""
  if 'jax' not in sys.modules:
    return
  from deeplab_jax import multihost

  if isinstance(error, multihost.PeerLostError) or multihost.is_peer_failure(
    error
  ):
    if os.environ.get('DEEPLAB_TRACEBACK'):
      return
    multihost.exit_peer_lost(str(error).splitlines()[0] if str(error) else '')


def _fail(message: str) -> None:
  if os.environ.get('DEEPLAB_TRACEBACK') and sys.exc_info()[0] is not None:
    raise
  print(f'error: {message}', file=sys.stderr)
  sys.exit(1)


class ModelLoadFlags:
  """`--raw_weights` and `--allow_unverified` for the scripts that load a
  checkpoint (evaluate, predict, export); create once at module level."""

  def __init__(self):
    self._raw = flags.DEFINE_bool(
      'raw_weights',
      False,
      'For a run that kept a weight EMA: load the raw trained parameters '
      'instead of the EMA ones its evaluation used (the default).',
    )
    self._unverified = flags.DEFINE_bool(
      'allow_unverified',
      False,
      'Load a checkpoint step that has no digests (written before they '
      'existed) instead of refusing it.',
    )

  def load(self, directory: str):
    """`checkpointing.load_model(directory)` as the flags ask, or a
    published whole model by name (`sources.load_model`)."""
    from deeplab_jax import checkpointing
    from deeplab_jax.convert import sources

    if sources.is_name(directory):
      return sources.load_model(directory)

    return checkpointing.load_model(
      directory,
      raw_weights=self._raw.value,
      allow_unverified=self._unverified.value,
    )

  def training_config(self, directory: str):
    """The config of the training run that wrote `directory`
    (`checkpointing.training_config`); None for a published name."""
    from deeplab_jax import checkpointing
    from deeplab_jax.convert import sources

    if sources.is_name(directory):
      return None
    return checkpointing.training_config(directory)


@contextlib.contextmanager
def output_dir(path: str, *, force: bool, flag: str = '--output'):
  """The one output-directory rule of the scripts: `path` must be empty or
  absent unless `force`; it is created, and if the command fails, what it
  added is removed again (a new directory entirely), so a retry is not
  refused. Yields the absolute path."""
  out = os.path.abspath(os.path.expanduser(path))
  existed = os.path.isdir(out)
  before = set(os.listdir(out)) if existed else set()
  if before and not force:
    raise UserError(f'{flag} {out} is not empty; pass --force to write there')
  os.makedirs(out, exist_ok=True)
  try:
    yield out
  except BaseException:
    if not existed:
      shutil.rmtree(out, ignore_errors=True)
    elif os.path.isdir(out):
      for name in set(os.listdir(out)) - before:
        target = os.path.join(out, name)
        if os.path.isdir(target):
          shutil.rmtree(target, ignore_errors=True)
        else:
          os.remove(target)
    raise


_ORBAX_DIR = os.sep + 'orbax' + os.sep


def _worth_showing(record) -> bool:
  if 'tensorflow_datasets' in record.pathname and (
    'has no dataset_info.json' in record.getMessage()
  ):
    return False  # an unprepared data set: the one-line error says the fix
  return _ORBAX_DIR not in record.pathname and record.name != 'asyncio'


def _without_closed_loop_reports(hook):
  """`hook`, except for 'Event loop is closed' raised outside the main thread
  (TensorStore reports those as unraisable; see module docstring)."""

  def unraisablehook(unraisable):
    value = unraisable.exc_value
    if (
      threading.current_thread() is not threading.main_thread()
      and isinstance(value, RuntimeError)
      and str(value) == 'Event loop is closed'
    ):
      return
    hook(unraisable)

  unraisablehook.wrapped = hook
  return unraisablehook


def parse_hw(value: str | None, flag: str) -> tuple[int, int] | None:
  """`'512x1024'` -> `(512, 1024)` (None stays None); a `UserError` naming
  `--flag` otherwise."""
  if value is None:
    return None
  try:
    h, w = (int(v) for v in value.lower().split('x'))
  except ValueError:
    raise UserError(
      f'--{flag} must be HxW such as 512x1024, got {value!r}'
    ) from None
  return h, w


def parse_options(items: list[str], flag: str) -> dict[str, object]:
  """`['k=v', ...]` -> `{k: json.loads(v) or the string v}`."""
  options = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep:
      raise UserError(f'--{flag} {item!r} must be KEY=VALUE')
    try:
      options[key] = json.loads(value)
    except json.JSONDecodeError:
      options[key] = value
  return options


def use_compilation_cache() -> str | None:
  """Turns on JAX's persistent compilation cache, so that a resumed or
  repeated run loads its compiled programs instead of compiling them again.

  The folder is `$DEEPLAB_JAX_CACHE_DIR`, else `$JAX_COMPILATION_CACHE_DIR`,
  else `$XDG_CACHE_HOME/deeplab_jax/jax` (`~/.cache/...`);
  `DEEPLAB_JAX_CACHE_DIR=off` turns it off. Returns the folder (None: off).
  Call before the first compilation.
  """
  import jax

  where = os.environ.get('DEEPLAB_JAX_CACHE_DIR') or os.environ.get(
    'JAX_COMPILATION_CACHE_DIR'
  )
  if where is None:
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache'
    )
    where = os.path.join(base, 'deeplab_jax', 'jax')
  if where.lower() in ('off', '0', 'none', ''):
    jax.config.update('jax_enable_compilation_cache', False)
    return None
  jax.config.update('jax_compilation_cache_dir', where)
  return where

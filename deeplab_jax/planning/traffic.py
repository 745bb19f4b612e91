"""Where a compiled program's memory traffic comes from, op by op.

XLA's `cost_analysis()` gives one total of bytes accessed per program. To
say which part of a model moves them, `traffic(hlo_text)` reads the
optimised HLO text of a compiled program (`compiled.as_text()`) and, for
each instruction of its entry computation, counts the bytes of its
operands and results, as XLA's cost model does for a fusion: what it reads
and what it writes. Each instruction is attributed to

- a kind: `convolution` (a fusion around a convolution or dot), `reduce`
  (a fusion ending in a reduction: BatchNorm statistics, the loss),
  `elementwise` (the other fusions), `copy` (copies, transposes, slices,
  pads and concatenations outside fusions),
  `collective`, `other`;
- a direction: `backward` when JAX's metadata marks it a transpose (the
  gradient), `forward` otherwise, `unmarked` when XLA dropped the
  metadata;
- a source: the innermost frame of the program's own Python code
  (`deeplab_jax/...`) in the instruction's stack trace, e.g.
  `models/layers.py:BatchNorm.__call__`.

Bytes are split by where the buffer lives: HBM (no memory-space
annotation) or on-chip memory (`S(n)` in the layout, e.g. TPU VMEM).
Each instruction's FLOPs are those of its convolutions and dots (2 x
multiply-adds, from their shapes; a convolution's taps on the padding or
on the holes of a dilated input multiply zeros and are not counted).
Each array is counted logically (its dimensions multiplied) and as laid
out (its layout's tiles padding the minor dimensions), as XLA's cost
analysis counts it. A loop body (`while`, e.g. a `lax.scan`) counts once
per iteration when its condition gives the trip count; XLA's cost
analysis counts it once.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re
from typing import Any

import numpy as np

_DTYPE_BYTES = {
  'pred': 1,
  's4': 0.5,
  'u4': 0.5,
  's8': 1,
  'u8': 1,
  'f8e4m3fn': 1,
  'f8e5m2': 1,
  'bf16': 2,
  'f16': 2,
  's16': 2,
  'u16': 2,
  'f32': 4,
  's32': 4,
  'u32': 4,
  'f64': 8,
  's64': 8,
  'u64': 8,
  'c64': 8,
}
# Memory spaces off the chip: the default (HBM) and XLA's host memory
# space (host offloading). Others are XLA's alternate memories (on TPU,
# on-chip memories placed by memory-space assignment).
_OFF_CHIP_SPACES = (0, 5)
_ARRAY = re.compile(r'([a-z]\w*)\[([\d,]*)\](\{[^}]*\})?')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$')
_ALLOCATE = 'custom_call_target="AllocateBuffer"'
_CONCAT_BITCAST = 'custom_call_target="ConcatBitcast"'
_FREE = {
  'parameter',
  'constant',
  'get-tuple-element',
  'tuple',
  'bitcast',
  'copy-done',
  'all-reduce-done',
  'all-gather-done',
  'collective-permute-done',
  'after-all',
  'partition-id',
  'replica-id',
}
# Instructions that only move or rearrange data.
_MOVES = {
  'copy',
  'copy-start',
  'transpose',
  'slice',
  'slice-start',
  'dynamic-slice',
  'dynamic-update-slice',
  'pad',
  'concatenate',
}
COLLECTIVES = (
  'all-reduce',
  'all-gather',
  'reduce-scatter',
  'collective-permute',
  'all-to-all',
)


@dataclasses.dataclass
class Op:
  """One instruction of the entry computation and the bytes it moves."""

  name: str
  opcode: str
  kind: str
  direction: str
  source: str
  hbm_bytes: float  # logical, over all its repeats
  on_chip_bytes: float
  repeats: int = 1  # times it runs per step (inside a loop: the trip count)
  flops: float = 0.0  # of its convolutions and dots, over all its repeats
  padded_hbm_bytes: float = 0.0  # as laid out (tiles), over all its repeats
  padded_on_chip_bytes: float = 0.0
  # Inside a loop whose trip count the HLO does not give: counted once.
  unknown_trips: bool = False
  # What XLA's cost analysis counts besides, once (`xla_counted_bytes`).
  xla_extra_bytes: float = 0.0


def _tiles(layout: str) -> list[tuple[int, ...]]:
  """The tiles of a TPU layout, outermost first: `{2,3,1,0:T(8,128)(2,1)}`
  -> [(8, 128), (2, 1)]."""
  tiling = re.search(r'T((?:\([\d,]+\))+)', layout or '')
  if not tiling:
    return []
  return [
    tuple(int(d) for d in t.split(','))
    for t in re.findall(r'\(([\d,]+)\)', tiling.group(1))
  ]


def _padded_elements(dims: list[int], layout: str) -> int:
  """Elements an array occupies as laid out: its dimensions in the layout's
  minor-to-major order, each tile rounding the most minor ones up to its
  own shape (`T(8,128)` pads the minor dimension to 128 and the next to a
  multiple of 8), and each further tile applied to the tiles before."""
  order = re.match(r'\{([\d,]*)', layout or '')
  minor_to_major = (
    [int(d) for d in order.group(1).split(',') if d] if order else []
  )
  if sorted(minor_to_major) != list(range(len(dims))):
    minor_to_major = list(range(len(dims)))[::-1]
  shape = [dims[i] for i in reversed(minor_to_major)]  # major to minor
  for tile in _tiles(layout):
    k = len(tile)
    shape = [1] * max(0, k - len(shape)) + shape
    shape = (
      shape[:-k]
      + [-(-d // t) for d, t in zip(shape[-k:], tile, strict=True)]
      + list(tile)
    )
  return math.prod(shape)


def array_bytes(shape: str, *, padded: bool = False) -> tuple[float, float]:
  """(HBM bytes, on-chip bytes) of an HLO shape, e.g.
  `(f32[8,64]{1,0:T(8,128)S(1)}, bf16[8]{0})`: arrays whose layout names a
  memory space `S(n)` (n > 0, but for host memory) are on chip. `padded`:
  as the layout stores them (`_padded_elements`; an `E(bits)` element size
  replaces the type's), else the logical bytes."""
  hbm = on_chip = 0.0
  for dtype, dims, layout in _ARRAY.findall(shape):
    if dtype not in _DTYPE_BYTES:
      continue
    sizes = [int(d) for d in dims.split(',') if d]
    size = _DTYPE_BYTES[dtype]
    if padded:
      n = _padded_elements(sizes, layout)
      bits = re.search(r'E\((\d+)\)', layout or '')
      size = int(bits.group(1)) / 8 if bits else size
    else:
      n = math.prod(sizes)
    space = re.search(r'S\((\d+)\)', layout or '')
    if space and int(space.group(1)) not in _OFF_CHIP_SPACES:
      on_chip += n * size
    else:
      hbm += n * size
  return hbm, on_chip


def _split_shape(rest: str) -> tuple[str, str]:
  """`SHAPE opcode(...)...` -> (SHAPE, the rest); a tuple shape is one
  balanced parenthesis group."""
  if not rest.startswith('('):
    shape, _, tail = rest.partition(' ')
    return shape, tail
  depth = 0
  for i, ch in enumerate(rest):
    depth += (ch == '(') - (ch == ')')
    if depth == 0:
      return rest[: i + 1], rest[i + 1 :].lstrip()
  return rest, ''


def _operands(tail: str) -> tuple[str, list[str], str]:
  """`opcode(%a, %b), attrs` -> (opcode, operand names, attrs)."""
  opcode, _, rest = tail.partition('(')
  depth, end = 1, len(rest)
  for i, ch in enumerate(rest):
    depth += (ch == '(') - (ch == ')')
    if depth == 0:
      end = i
      break
  return (
    opcode.strip(),
    re.findall(r'%([\w.\-]+)', rest[:end]),
    rest[end + 1 :],
  )


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
  """Computation name -> its instruction lines, and the entry's name."""
  bodies: dict[str, list[str]] = {}
  entry, current = '', None
  for line in hlo_text.splitlines():
    head = re.match(r'^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$', line)
    if head and not line.startswith(' '):
      current = head.group(2)
      bodies[current] = []
      if head.group(1):
        entry = current
    elif line.startswith('}'):
      current = None
    elif current is not None:
      bodies[current].append(line)
  return bodies, entry


def _stack_sources(hlo_text: str, root: str) -> dict[int, str]:
  """Stack frame id -> `path:function` of its innermost frame under
  `root` (the project's package directory), from the HLO module's
  FileNames / FunctionNames / FileLocations / StackFrames tables."""
  tables: dict[str, dict[int, str]] = {}
  section = None
  for line in hlo_text.splitlines():
    if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      section = line
      tables[section] = {}
      continue
    m = re.match(r'^(\d+) (.*)$', line)
    if section and m:
      tables[section][int(m.group(1))] = m.group(2)
    elif section and line.strip():
      section = None
  files = {k: v.strip('"') for k, v in tables.get('FileNames', {}).items()}
  functions = {
    k: v.strip('"') for k, v in tables.get('FunctionNames', {}).items()
  }
  locations = {}
  for k, v in tables.get('FileLocations', {}).items():
    f = re.search(r'file_name_id=(\d+)', v)
    fn = re.search(r'function_name_id=(\d+)', v)
    if f and fn:
      locations[k] = (
        files.get(int(f.group(1)), ''),
        functions.get(int(fn.group(1)), ''),
      )
  frames = {}
  for k, v in tables.get('StackFrames', {}).items():
    loc = re.search(r'file_location_id=(\d+)', v)
    parent = re.search(r'parent_frame_id=(\d+)', v)
    frames[k] = (
      int(loc.group(1)) if loc else 0,
      int(parent.group(1)) if parent else 0,
    )

  def source(frame: int) -> str:
    seen = set()
    while frame in frames and frame not in seen:
      seen.add(frame)
      loc, parent = frames[frame]
      path, function = locations.get(loc, ('', ''))
      marker = f'/{root}/'
      if marker in path:
        return f'{path.split(marker, 1)[1]}:{function}'
      if parent == frame:
        break
      frame = parent
    return '(outside the model code)'

  return {k: source(k) for k in frames}


def _kind(opcode: str, body: list[str]) -> str:
  if any(opcode.startswith(c) for c in COLLECTIVES):
    return 'collective'
  if opcode in _MOVES:
    return 'copy'
  ops = ' '.join(body) if opcode == 'fusion' else f' {opcode}('
  if re.search(r'\s(convolution|dot)\(', ops):
    return 'convolution'
  if opcode == 'fusion':
    root_name = _root(body)
    root = next((x for x in body if f'%{root_name} ' in x), '')
    if re.search(r'\s(reduce|reduce-window)\(', ops) and (
      ' reduce(' in root or ' tuple(' in root
    ):
      return 'reduce'
    return 'elementwise'
  if opcode in ('reduce', 'reduce-window', 'select-and-scatter'):
    return 'reduce'
  return 'other'


def _scaled(shape: str, part: float, padded: bool) -> tuple[float, float]:
  """`part` bytes read from where the array `shape` lives."""
  hbm, chip = array_bytes(shape, padded=padded)
  whole = hbm + chip
  return (hbm * part / whole, chip * part / whole) if whole else (0.0, 0.0)


def _parameters(body: list[str]) -> dict[str, int]:
  """A computation's parameters: name -> index."""
  found = re.findall(r'%([\w.\-]+) = \S+ parameter\((\d+)\)', '\n'.join(body))
  return {name: int(index) for name, index in found}


def _root(body: list[str]) -> str | None:
  """The name of a computation's result instruction."""
  for line in body:
    m = re.match(r'^\s*ROOT\s+%([\w.\-]+)', line)
    if m:
      return m.group(1)
  return None


def _users(parsed) -> dict[str, list[tuple[str, int]]]:
  """Instruction name -> (user's name, operand index) of each use."""
  users = collections.defaultdict(list)
  for name, _, _, operands, _ in parsed:
    for i, o in enumerate(operands):
      users[o].append((name, i))
  return users


def _through_bitcasts(name: str, by_name: dict) -> str:
  while name in by_name and by_name[name][2] == 'bitcast':
    name = by_name[name][3][0]
  return name


def _fused_reads(
  body: list[str], padded: bool, bodies: dict[str, list[str]]
) -> dict[int, float]:
  """Fusion parameter index -> bytes it reads, for the parameters that are
  only sliced in the fused computation (the slices are read, not the
  whole operand) or only updated in place, as the buffer of a
  `dynamic-update-slice` (nothing read) or `scatter` (the updated
  elements read, to combine: the updates' size), also through a nested
  fusion. A parameter that is also read otherwise is read whole."""
  parsed = _parse(body)
  users = _users(parsed)
  by_name = {p[0]: p for p in parsed}
  out = {}
  for name, index in _parameters(body).items():
    uses, todo = [], [name]
    while todo:  # through bitcasts, which move nothing
      for user, i in users.get(todo.pop(), []):
        if by_name[user][2] == 'bitcast':
          todo.append(user)
        else:
          uses.append((by_name[user], i))
    if not uses:
      continue
    read = 0.0
    for (_, shape, opcode, operands, attrs), i in uses:
      nested = re.search(r'calls=%([\w.\-]+)', attrs)
      nested_reads = (
        _fused_reads(bodies.get(nested.group(1), []), padded, bodies)
        if opcode == 'fusion' and nested
        else {}
      )
      if i in nested_reads:
        read += nested_reads[i]
      elif opcode in ('slice', 'dynamic-slice') and i == 0:
        read += sum(array_bytes(shape, padded=padded))
      elif opcode == 'dynamic-update-slice' and i == 0:
        pass  # the buffer updated in place: not read
      elif opcode == 'scatter' and i == 0 and operands[-1] in by_name:
        read += sum(array_bytes(by_name[operands[-1]][1], padded=padded))
      else:
        break  # read whole
    else:
      out[index] = read
  return out


def _in_place_updates(
  body: list[str], padded: bool
) -> tuple[dict[int, float], set[int]]:
  """For a fused computation whose result (or tuple element) is a
  `dynamic-update-slice` or `scatter` of a parameter, done in place:
  result element index -> bytes of the update written, and the indices of
  the parameters so updated."""
  by_name = {p[0]: p for p in _parse(body)}
  params = _parameters(body)
  root = by_name.get(_root(body) or '')
  if root is None:
    return {}, set()
  elements = root[3] if root[2] == 'tuple' else [root[0]]
  written, updated = {}, set()
  for i, element in enumerate(elements):
    e = by_name.get(_through_bitcasts(element, by_name))
    if e is None or e[2] not in ('dynamic-update-slice', 'scatter'):
      continue
    if len(e[3]) < 2:
      continue
    buffer = _through_bitcasts(e[3][0], by_name)
    update = e[3][1] if e[2] == 'dynamic-update-slice' else e[3][-1]
    fresh = buffer in by_name and _ALLOCATE in by_name[buffer][4]
    if buffer in params or fresh:
      if buffer in params:
        updated.add(params[buffer])
      written[i] = (
        sum(array_bytes(by_name[update][1], padded=padded))
        if update in by_name
        else 0.0
      )
  return written, updated


# Asynchronous collectives whose `-start` shape is a tuple of their
# operands, their results and (permutes) context words: the results'
# element. An `all-reduce-start`'s shape is its results alone.
_START_RESULT = {'all-gather-start': 1, 'collective-permute-start': 1}


def _reads_and_writes(
  opcode: str,
  shape: str,
  operands: list[str],
  shapes: dict[str, str],
  body: list[str],
  bodies: dict[str, list[str]],
  padded: bool = False,
) -> tuple[float, float]:
  """(HBM, on-chip) bytes an instruction reads and writes: its operands
  (or the parts of them it reads) and its result (or, updated in place,
  the part it writes); `padded`: as laid out (`array_bytes`)."""
  size = lambda shape: array_bytes(shape, padded=padded)
  elements = tuple_elements(shape)
  if opcode == 'copy-start':  # (destination, source, context)
    elements = elements[:1]
  elif opcode == 'slice-start':  # ((source), slice, context)
    elements = elements[1:2]
  elif opcode in _START_RESULT and len(elements) > _START_RESULT[opcode]:
    elements = elements[_START_RESULT[opcode] : _START_RESULT[opcode] + 1]
  written, reads = {}, {}
  if opcode == 'fusion':
    written, _ = _in_place_updates(body, padded)
    reads = _fused_reads(body, padded, bodies)
  elif opcode in ('dynamic-update-slice', 'scatter') and len(operands) >= 2:
    # In place: the update written; a scatter also reads what it combines.
    # (dynamic-update-slice(buffer, update, indices...); scatter(buffer,
    # indices, updates).)
    updates = operands[1] if opcode == 'dynamic-update-slice' else operands[-1]
    update = sum(size(shapes.get(updates, '')))
    written = {0: update}
    reads = {0: update if opcode == 'scatter' else 0.0}
  elif opcode in ('slice', 'dynamic-slice', 'slice-start') and operands:
    reads = {0: sum(size(elements[0]))}  # reads what it writes
  hbm = chip = 0.0
  for i, element in enumerate(elements):
    h, c = (
      _scaled(element, written[i], padded) if i in written else size(element)
    )
    hbm, chip = hbm + h, chip + c
  for i, o in enumerate(operands):
    operand = shapes.get(o, '')
    h, c = _scaled(operand, reads[i], padded) if i in reads else size(operand)
    hbm, chip = hbm + h, chip + c
  return hbm, chip


def _dims(shape: str) -> list[int]:
  m = _ARRAY.search(shape)
  return [int(d) for d in m.group(2).split(',') if d] if m else []


def _window(attrs: str, rank: int) -> dict[str, list[int]]:
  """A convolution's `window={...}` per spatial dimension: `size`,
  `stride`, `lo` (the padding before the input), `lhs_dilate`,
  `rhs_dilate`."""
  text = re.search(r'window=\{([^}]*)\}', attrs)
  fields = dict(f.split('=', 1) for f in text.group(1).split()) if text else {}
  ints = lambda key, default: (
    [int(v) for v in fields[key].split('x')]
    if key in fields
    else [default] * rank
  )
  pads = (
    [p.split('_') for p in fields['pad'].split('x')]
    if 'pad' in fields
    else [['0', '0']] * rank
  )
  return {
    'size': ints('size', 1),
    'stride': ints('stride', 1),
    'lo': [int(lo) for lo, _ in pads],
    'lhs_dilate': ints('lhs_dilate', 1),
    'rhs_dilate': ints('rhs_dilate', 1),
  }


@functools.lru_cache(maxsize=4096)
def _live_taps(
  size_in: int, size_out: int, k: int, stride: int, lo: int, ld: int, rd: int
) -> int:
  """(output position, tap) pairs of one spatial dimension whose tap reads
  an input element: not the padding, not a hole of the input's dilation."""
  o = np.arange(size_out)[:, None]
  j = np.arange(k)[None, :]
  p = o * stride + j * rd - lo
  live = (p >= 0) & (p <= (size_in - 1) * ld) & (p % ld == 0)
  return int(live.sum())


def _matmul_flops(
  opcode: str, shape: str, operands: list[str], attrs: str, shapes: dict
) -> float:
  """2 x the multiply-adds of a convolution or dot, from its shapes: for a
  convolution, each output element's taps that read an input element (a
  tap on the padding or on a hole of the input's dilation multiplies a
  zero and is not counted) x input features per group; for a dot, output
  elements x contracted size."""
  out_dims = _dims(shape)
  lhs = _dims(shapes.get(operands[0], '')) if operands else []
  if opcode == 'convolution':
    labels = re.search(r'dim_labels=(\w+)_\w+->(\w+)', attrs)
    groups = re.search(r'feature_group_count=(\d+)', attrs)
    if not labels or 'f' not in labels.group(1) or not lhs:
      return 0.0
    lhs_labels, out_labels = labels.group(1), labels.group(2)
    spatial = sorted(c for c in lhs_labels if c.isdigit())
    window = _window(attrs, len(spatial))
    pairs = 1
    for d, c in enumerate(spatial):
      pairs *= _live_taps(
        lhs[lhs_labels.index(c)],
        out_dims[out_labels.index(c)],
        window['size'][d],
        window['stride'][d],
        window['lo'][d],
        window['lhs_dilate'][d],
        window['rhs_dilate'][d],
      )
    others = math.prod(
      n for n, c in zip(out_dims, out_labels, strict=False) if not c.isdigit()
    )
    features = lhs[lhs_labels.index('f')]
    return (
      2.0 * others * pairs * features / (int(groups.group(1)) if groups else 1)
    )
  out = math.prod(out_dims)
  contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', attrs)
  size = math.prod(
    lhs[int(i)]
    for i in (contracting.group(1).split(',') if contracting else [])
    if i
  )
  return 2.0 * out * size


def _flops(
  opcode: str,
  shape: str,
  operands: list[str],
  attrs: str,
  shapes: dict[str, str],
  bodies: dict[str, list[str]],
) -> float:
  """Convolution and dot FLOPs of an instruction, inside its fusion too."""
  if opcode in ('convolution', 'dot'):
    return _matmul_flops(opcode, shape, operands, attrs, shapes)
  called = (
    re.search(r'calls=%([\w.\-]+)', attrs) if opcode == 'fusion' else None
  )
  if not called:
    return 0.0
  parsed = _parse(bodies.get(called.group(1), []))
  inner = {p[0]: p[1] for p in parsed}
  return sum(
    _flops(o, sh, ops, a, inner, bodies) for _, sh, o, ops, a in parsed
  )


def _direction(op_name: str | None) -> str:
  if op_name is None:
    return 'unmarked'
  return 'backward' if 'transpose(' in op_name else 'forward'


def _parse(lines: list[str]) -> list[tuple[str, str, str, list[str], str]]:
  """(name, shape, opcode, operand names, attributes) of each instruction."""
  parsed = []
  for line in lines:
    m = _INSTRUCTION.match(line)
    if m:
      name, rest = m.groups()
      shape, tail = _split_shape(rest)
      parsed.append((name, shape, *_operands(tail)))
  return parsed


def trip_count(attrs: str, bodies: dict[str, list[str]]) -> int | None:
  """Iterations of a `while` (its attributes): XLA's `known_trip_count`
  when it records one, else from a condition `counter < N` (a scan: the
  counter starts at 0, the compare maybe wrapped in a fusion); None if
  neither says."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
  if known:
    return int(known.group(1))
  cond = re.search(r'condition=%([\w.\-]+)', attrs)
  condition = bodies.get(cond.group(1), []) if cond else []
  constants = {
    name: int(value)
    for name, value in re.findall(
      r'%([\w.\-]+) = \S+ constant\((-?\d+)\)', '\n'.join(condition)
    )
  }
  root = {p[0]: p for p in _parse(condition)}.get(_root(condition) or '')
  if root is None:
    return None
  _, _, opcode, operands, root_attrs = root
  compare = root_attrs
  if opcode == 'fusion':
    called = re.search(r'calls=%([\w.\-]+)', root_attrs)
    inner = bodies.get(called.group(1), []) if called else []
    inner_root = {p[0]: p for p in _parse(inner)}.get(_root(inner) or '')
    if inner_root is None or inner_root[2] != 'compare':
      return None
    compare = inner_root[4]
  elif opcode != 'compare':
    return None
  if 'direction=LT' not in compare:
    return None
  bound = [constants[o] for o in operands if o in constants]
  return bound[0] if len(bound) == 1 else None


def _called(opcode: str, attrs: str) -> list[str]:
  """The computations a `call`, `conditional` or async computation runs
  (a fusion's own computation is read as one instruction instead)."""
  if opcode == 'conditional':
    branches = re.search(r'branch_computations=\{([^}]*)\}', attrs)
    if branches:
      return re.findall(r'%([\w.\-]+)', branches.group(1))
    return re.findall(r'(?:true|false)_computation=%([\w.\-]+)', attrs)
  if opcode in ('call', 'async-start'):
    return re.findall(r'(?:to_apply|calls)=%([\w.\-]+)', attrs)
  return []


def traffic(hlo_text: str, *, root: str = 'deeplab_jax') -> list[Op]:
  """The instructions of an optimised HLO program's entry computation with
  the bytes each reads and writes (see the module docstring). A `while`
  loop of a known trip count (a scan) counts its body's instructions that
  many times (`Op.repeats`); one whose count the HLO does not give counts
  them once, marked `unknown_trips`; its own loop state is not traffic.
  The computations a `call`, `conditional` (every branch: an upper
  bound) or async computation runs are read like the entry's."""
  bodies, entry = _computations(hlo_text)
  sources = _stack_sources(hlo_text, root)
  ops: list[Op] = []

  def visit(computation: str, repeats: int, unknown: bool) -> None:
    parsed = _parse(bodies.get(computation, []))
    shapes = {p[0]: p[1] for p in parsed}
    for name, shape, opcode, operands, attrs in parsed:
      if opcode == 'while':
        body = re.search(r'body=%([\w.\-]+)', attrs)
        n = trip_count(attrs, bodies)
        if body:
          visit(body.group(1), repeats * (n or 1), unknown or n is None)
        continue
      if called := _called(opcode, attrs):
        for computation in called:
          visit(computation, repeats, unknown)
        continue
      if opcode in _FREE or opcode.endswith('-done'):
        continue
      if _ALLOCATE in attrs or _CONCAT_BITCAST in attrs:
        # An allocation; or the slices of `slice-start`s, placed side by
        # side, read as one array: nothing moved.
        continue
      fused = re.search(r'calls=%([\w.\-]+)', attrs)
      body = bodies.get(fused.group(1), []) if fused else []
      hbm, chip = _reads_and_writes(
        opcode, shape, operands, shapes, body, bodies
      )
      padded = _reads_and_writes(
        opcode, shape, operands, shapes, body, bodies, padded=True
      )
      flops = _flops(opcode, shape, operands, attrs, shapes, bodies)
      extra = _xla_async_extra(opcode, shape)
      op_name = re.search(r'op_name="([^"]*)"', attrs)
      frame = re.search(r'stack_frame_id=(\d+)', attrs)
      ops.append(
        Op(
          name=name,
          opcode=opcode,
          kind=_kind(opcode, body),
          direction=_direction(op_name.group(1) if op_name else None),
          source=sources.get(int(frame.group(1)), '(outside the model code)')
          if frame
          else '(no stack trace)',
          hbm_bytes=repeats * hbm,
          on_chip_bytes=repeats * chip,
          repeats=repeats,
          flops=repeats * flops,
          padded_hbm_bytes=repeats * padded[0],
          padded_on_chip_bytes=repeats * padded[1],
          unknown_trips=unknown,
          xla_extra_bytes=extra,
        )
      )

  visit(entry, 1, False)
  return ops


# XLA counts each context word of an asynchronous start's tuple (`u32[]`)
# at 4 KiB, and 512 bytes more per pair (measured on the fixtures of
# tests/traffic_fixtures_test.py; not documented by XLA).
_XLA_CONTEXT_WORD_BYTES = 4096
_XLA_ASYNC_PAIR_BYTES = 512


def _xla_async_extra(opcode: str, shape: str) -> float:
  """What XLA's cost analysis counts for an asynchronous copy, slice,
  gather or permute beyond the bytes it moves (its operand, or the part
  it reads, and its result written), with 512 bytes per pair: for a
  `slice-start`, the slice once more (the `ConcatBitcast` that joins the
  slices counts nothing); otherwise the start's whole tuple result again
  (the result and the operand it echoes) and 4 KiB per context word."""
  if opcode == 'slice-start':  # ((source), slice, context)
    slice_ = tuple_elements(shape)[1:2]
    moved = sum(array_bytes(slice_[0], padded=True)) if slice_ else 0.0
    return moved + _XLA_ASYNC_PAIR_BYTES
  if opcode != 'copy-start' and opcode not in _START_RESULT:
    return 0.0
  words = arrays = 0.0
  for element in tuple_elements(shape):
    if re.fullmatch(r'u32\[\]\{[^}]*\}', element):
      words += 1
    else:
      arrays += sum(array_bytes(element, padded=True))
  return arrays + words * _XLA_CONTEXT_WORD_BYTES + _XLA_ASYNC_PAIR_BYTES


def xla_counted_bytes(ops: list[Op]) -> float:
  """The analyzer's bytes counted as XLA's cost analysis counts them: every
  instruction once (a loop's body once, not per iteration), padded, every
  memory level, and each asynchronous pair's echoed tuple and done result
  (`_xla_async_extra`). Where the analyzer and XLA count the same
  instructions this equals XLA's `bytes accessed`
  (tests/traffic_fixtures_test.py)."""
  return sum(
    (o.padded_hbm_bytes + o.padded_on_chip_bytes) / o.repeats
    + o.xla_extra_bytes
    for o in ops
  )


def instruction_roofline_s(
  ops: list[Op], peak_flops: float, hbm_bytes_per_s: float
) -> float:
  """The step's time if each instruction ran at the slower of its own
  FLOPs at `peak_flops` and its HBM bytes as laid out at
  `hbm_bytes_per_s`, one after another: a step whose memory-bound and
  compute-bound work are different instructions cannot overlap them
  here, as a whole-step max(FLOPs, bytes) would."""
  return sum(
    max(o.flops / peak_flops, o.padded_hbm_bytes / hbm_bytes_per_s) for o in ops
  )


_SUMMED = (
  'hbm_bytes',
  'on_chip_bytes',
  'padded_hbm_bytes',
  'padded_on_chip_bytes',
  'flops',
)


def summarise(ops: list[Op], by: tuple[str, ...]) -> list[dict]:
  """Ops grouped by the fields `by` (e.g. `('kind', 'direction')`): how
  many run per step, their HBM and on-chip bytes (logical and as laid
  out) and FLOPs, most padded HBM bytes first."""
  groups: dict[tuple, dict] = collections.defaultdict(
    lambda: dict.fromkeys(('count', *_SUMMED), 0)
  )
  for op in ops:
    g = groups[tuple(getattr(op, f) for f in by)]
    g['count'] += op.repeats
    for key in _SUMMED:
      g[key] += getattr(op, key)
  rows = [dict(zip(by, key, strict=True), **v) for key, v in groups.items()]
  return sorted(
    rows, key=lambda r: (-r['padded_hbm_bytes'], -r['on_chip_bytes'])
  )


def tuple_elements(shape: str) -> list[str]:
  """The top-level elements of a tuple shape (`(a, (b, c), d)` -> `a`,
  `(b, c)`, `d`); a non-tuple shape is its own one element."""
  if not shape.startswith('('):
    return [shape]
  out, depth, start = [], 0, 1
  for i, ch in enumerate(shape):
    depth += (ch in '([{') - (ch in ')]}')
    if ch == ',' and depth == 1:
      out.append(shape[start:i].strip())
      start = i + 1
  out.append(shape[start:-1].strip())
  return [e for e in out if e]


# Asynchronous collectives whose `-start` shape is a tuple of their
# operands, their results and (permutes) context: the results' element.
_RESULT_ELEMENT = {'all-gather': 1, 'collective-permute': 1}


def collective_shapes(hlo_text: str, kind: str) -> list[str]:
  """The result shapes (HLO text, e.g. `f32[2,8,8,256]{3,2,1,0}`, or a
  tuple of several results) of every `kind` collective in optimised HLO;
  an asynchronous pair counts once, by its results alone."""
  text = re.sub(r'/\*.*?\*/', '', hlo_text)  # tuple index comments
  pattern = re.compile(rf'=\s*(\(?[^=]*?\)?)\s+{kind}(-start)?\(')
  out = []
  for shape, started in pattern.findall(text):
    if started and kind in _RESULT_ELEMENT:
      shape = tuple_elements(shape)[_RESULT_ELEMENT[kind]]
    out.append(shape)
  return out


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """`{kind: {'count', 'bytes'}}` of the collectives in optimised HLO: the
  bytes of their results (`collective_shapes`)."""
  out = {}
  for kind in COLLECTIVES:
    shapes = collective_shapes(hlo_text, kind)
    if shapes:
      out[kind] = {
        'count': len(shapes),
        'bytes': int(sum(sum(array_bytes(s)) for s in shapes)),
      }
  return out


def convolutions(hlo_text: str) -> int:
  """How many convolution instructions an optimised HLO program holds."""
  return len(re.findall(r'\sconvolution\(', hlo_text))


def traffic_breakdown(
  hlo_text: str,
  top: int = 12,
  *,
  peak_flops: float | None = None,
  hbm_bytes_per_s: float | None = None,
) -> dict[str, Any]:
  """Where a compiled step's bytes go (`traffic`): totals (logical and as
  laid out), bytes by kind and direction, and the `top` sources of the
  model code. `looped`: instructions inside loops (scans), which XLA's
  cost analysis counts once and this breakdown once per iteration;
  `unknown_trips`: those in loops of a trip count the HLO does not give
  (counted once). Given a chip's rates, `instruction_roofline_ms` too."""
  ops = traffic(hlo_text)
  out = {
    'looped': sum(o.repeats > 1 or o.unknown_trips for o in ops),
    'unknown_trips': sum(o.unknown_trips for o in ops),
    'flops': sum(o.flops for o in ops),
    **{key: sum(getattr(o, key) for o in ops) for key in _SUMMED[:4]},
    'xla_counted_bytes': xla_counted_bytes(ops),
    'by_kind': summarise(ops, ('kind', 'direction')),
    'by_source': summarise(ops, ('source',))[:top],
  }
  if peak_flops and hbm_bytes_per_s:
    out['instruction_roofline_ms'] = 1e3 * instruction_roofline_s(
      ops, peak_flops, hbm_bytes_per_s
    )
  return out

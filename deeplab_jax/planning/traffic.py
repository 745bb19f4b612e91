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
multiply-adds, from their shapes), the model FLOPs of MFU. Shapes are
counted unpadded, as in XLA's cost analysis. A loop body
(`while`, e.g. a `lax.scan`) counts once per iteration when its condition
gives the trip count; XLA's cost analysis counts it once.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any

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
  hbm_bytes: float  # over all its repeats
  on_chip_bytes: float
  repeats: int = 1  # times it runs per step (inside a loop: the trip count)
  flops: float = 0.0  # of its convolutions and dots, over all its repeats


def array_bytes(shape: str) -> tuple[float, float]:
  """(HBM bytes, on-chip bytes) of an HLO shape, e.g.
  `(f32[8,64]{1,0:T(8,128)S(1)}, bf16[8]{0})`: arrays whose layout names a
  memory space `S(n)` (n > 0, but for host memory) are on chip."""
  hbm = on_chip = 0.0
  for dtype, dims, layout in _ARRAY.findall(shape):
    if dtype not in _DTYPE_BYTES:
      continue
    n = 1
    for d in filter(None, dims.split(',')):
      n *= int(d)
    space = re.search(r'S\((\d+)\)', layout or '')
    if space and int(space.group(1)) not in _OFF_CHIP_SPACES:
      on_chip += n * _DTYPE_BYTES[dtype]
    else:
      hbm += n * _DTYPE_BYTES[dtype]
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


def _tuple_elements(shape: str) -> list[str]:
  """The top-level elements of a tuple shape `(a, (b, c), d)`."""
  if not shape.startswith('('):
    return [shape]
  elements, depth, start = [], 0, 1
  for i, ch in enumerate(shape):
    depth += (ch == '(') - (ch == ')')
    if (ch == ',' and depth == 1) or (ch == ')' and depth == 0):
      elements.append(shape[start:i].strip())
      start = i + 1
  return [e for e in elements if e]


def _scaled(shape: str, part: float) -> tuple[float, float]:
  """`part` bytes read from where the array `shape` lives."""
  hbm, chip = array_bytes(shape)
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


def _sliced_reads(body: list[str]) -> dict[int, float]:
  """Fusion parameter index -> bytes it reads, for the parameters that
  are only sliced in the fused computation (the fusion reads the slices,
  not the whole operand)."""
  parsed = _parse(body)
  params = _parameters(body)
  users = collections.defaultdict(list)
  for _, shape, opcode, operands, _ in parsed:
    for o in operands:
      users[o].append((opcode, shape))
  out = {}
  for name, index in params.items():
    uses = users.get(name, [])
    if uses and all(op in ('slice', 'dynamic-slice') for op, _ in uses):
      out[index] = sum(sum(array_bytes(shape)) for _, shape in uses)
  return out


def _in_place_updates(body: list[str]) -> tuple[dict[int, float], set[int]]:
  """For a fused computation whose result (or tuple element) is a
  `dynamic-update-slice` of a parameter, done in place: result element
  index -> bytes of the update written, and the indices of the parameters
  so updated (not read)."""
  by_name = {p[0]: p for p in _parse(body)}
  params = _parameters(body)
  root = by_name.get(_root(body) or '')
  if root is None:
    return {}, set()
  elements = root[3] if root[2] == 'tuple' else [root[0]]
  written, updated = {}, set()
  for i, element in enumerate(elements):
    e = by_name.get(element)
    if e is None or e[2] != 'dynamic-update-slice' or len(e[3]) < 2:
      continue
    buffer = e[3][0]
    while buffer in by_name and by_name[buffer][2] == 'bitcast':
      buffer = by_name[buffer][3][0]
    if buffer in params:
      updated.add(params[buffer])
      written[i] = (
        sum(array_bytes(by_name[e[3][1]][1])) if e[3][1] in by_name else 0.0
      )
  return written, updated


def _reads_and_writes(
  opcode: str,
  shape: str,
  operands: list[str],
  shapes: dict[str, str],
  body: list[str],
) -> tuple[float, float]:
  """(HBM, on-chip) bytes an instruction reads and writes: its operands
  (or the slices of them it reads) and its result (or, updated in place,
  the part it writes)."""
  elements = _tuple_elements(shape)
  if opcode == 'copy-start':  # (destination, source, context)
    elements = elements[:1]
  elif opcode.endswith('-start') and len(elements) >= 2:
    # ((operands), result, context): the operands are echoed, not written.
    elements = elements[1:2]
  written, updated = {}, set()
  if opcode == 'fusion':
    written, updated = _in_place_updates(body)
  elif opcode == 'dynamic-update-slice' and len(operands) >= 2:
    written, updated = {0: sum(array_bytes(shapes.get(operands[1], '')))}, {0}
  hbm = chip = 0.0
  for i, element in enumerate(elements):
    h, c = (
      _scaled(element, written[i]) if i in written else array_bytes(element)
    )
    hbm, chip = hbm + h, chip + c
  sliced = _sliced_reads(body) if opcode == 'fusion' else {}
  if opcode in ('slice', 'dynamic-slice', 'slice-start') and operands:
    sliced = {0: hbm + chip}  # reads what it writes
  for i, o in enumerate(operands):
    if i in updated:
      continue
    operand = shapes.get(o, '')
    h, c = _scaled(operand, sliced[i]) if i in sliced else array_bytes(operand)
    hbm, chip = hbm + h, chip + c
  return hbm, chip


def _dims(shape: str) -> list[int]:
  m = _ARRAY.search(shape)
  return [int(d) for d in m.group(2).split(',') if d] if m else []


def _matmul_flops(
  opcode: str, shape: str, operands: list[str], attrs: str, shapes: dict
) -> float:
  """2 x the multiply-adds of a convolution or dot, from its shapes:
  output elements x window x input features per group (convolution),
  output elements x contracted size (dot)."""
  out = math.prod(_dims(shape))
  lhs = _dims(shapes.get(operands[0], '')) if operands else []
  if opcode == 'convolution':
    labels = re.search(r'dim_labels=(\w+)_', attrs)
    window = re.search(r'window=\{size=([\dx]+)', attrs)
    groups = re.search(r'feature_group_count=(\d+)', attrs)
    if not labels or 'f' not in labels.group(1) or not lhs:
      return 0.0
    features = lhs[labels.group(1).index('f')]
    taps = (
      math.prod(int(k) for k in window.group(1).split('x')) if window else 1
    )
    return 2.0 * out * taps * features / (int(groups.group(1)) if groups else 1)
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


def traffic(hlo_text: str, *, root: str = 'deeplab_jax') -> list[Op]:
  """The instructions of an optimised HLO program's entry computation with
  the bytes each reads and writes (see the module docstring). A `while`
  loop of a known trip count (a scan) counts its body's instructions that
  many times (`Op.repeats`); its own loop state is not traffic."""
  bodies, entry = _computations(hlo_text)
  sources = _stack_sources(hlo_text, root)
  ops: list[Op] = []

  def visit(computation: str, repeats: int) -> None:
    parsed = _parse(bodies.get(computation, []))
    shapes = {p[0]: p[1] for p in parsed}
    for name, shape, opcode, operands, attrs in parsed:
      if opcode == 'while':
        body = re.search(r'body=%([\w.\-]+)', attrs)
        n = trip_count(attrs, bodies)
        if body:
          visit(body.group(1), repeats * (n or 1))
        continue
      if opcode in _FREE or opcode.endswith('-done'):
        continue
      if 'custom_call_target="AllocateBuffer"' in attrs:
        continue  # an allocation, nothing moved
      called = re.search(r'calls=%([\w.\-]+)', attrs)
      body = bodies.get(called.group(1), []) if called else []
      hbm, chip = _reads_and_writes(opcode, shape, operands, shapes, body)
      flops = _flops(opcode, shape, operands, attrs, shapes, bodies)
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
        )
      )

  visit(entry, 1)
  return ops


def summarise(ops: list[Op], by: tuple[str, ...]) -> list[dict]:
  """Ops grouped by the fields `by` (e.g. `('kind', 'direction')`): how
  many run per step, their HBM and on-chip bytes and FLOPs, most HBM
  bytes first."""
  groups: dict[tuple, dict] = collections.defaultdict(
    lambda: {'count': 0, 'hbm_bytes': 0.0, 'on_chip_bytes': 0.0, 'flops': 0.0}
  )
  for op in ops:
    g = groups[tuple(getattr(op, f) for f in by)]
    g['count'] += op.repeats
    g['hbm_bytes'] += op.hbm_bytes
    g['on_chip_bytes'] += op.on_chip_bytes
    g['flops'] += op.flops
  rows = [dict(zip(by, key, strict=True), **v) for key, v in groups.items()]
  return sorted(rows, key=lambda r: (-r['hbm_bytes'], -r['on_chip_bytes']))


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


def traffic_breakdown(hlo_text: str, top: int = 12) -> dict[str, Any]:
  """Where a compiled step's bytes go (`traffic`): totals, bytes by
  kind and direction, and the `top` sources of the model code.
  `looped`: instructions inside loops (scans), which XLA's cost analysis
  counts once and this breakdown once per iteration."""
  ops = traffic(hlo_text)
  return {
    'looped': sum(o.repeats > 1 for o in ops),
    'hbm_bytes': sum(o.hbm_bytes for o in ops),
    'on_chip_bytes': sum(o.on_chip_bytes for o in ops),
    'flops': sum(o.flops for o in ops),
    'by_kind': summarise(ops, ('kind', 'direction')),
    'by_source': summarise(ops, ('source',))[:top],
  }

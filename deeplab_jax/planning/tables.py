"""Plan rows as Markdown tables: memory, fit, rooflines and collectives per
row, and a row's traffic breakdown by kind and by model source."""

from __future__ import annotations

from typing import Any


def _padding(r: dict[str, Any]) -> str:
  """The share of a row's HBM bytes that is tile padding."""
  padded = r['padded_hbm_bytes']
  return f'{100 * (1 - r["hbm_bytes"] / padded):.0f} %' if padded else '-'


def traffic_table(row: dict[str, Any]) -> str:
  """A row's traffic breakdown as Markdown: kinds, then model sources (GB
  read and written per chip per step: HBM as laid out and its logical
  part, the padding's share, on-chip, GFLOP)."""
  t = row.get('traffic')
  if not t:
    return ''
  gb = lambda b: f'{b / 1e9:.2f}'
  lines = [
    f'{row["arch"]} on {row["topology"]}, batch {row["batch"]}: '
    f'{gb(t["padded_hbm_bytes"])} GB HBM as laid out ({gb(t["hbm_bytes"])} '
    f'GB logical, {_padding(t)} padding) + {gb(t["padded_on_chip_bytes"])} '
    'GB on chip, read and written by the instructions of one step, '
    f'{t["flops"] / 1e9:.1f} GFLOP in convolutions and dots (per chip)',
    '',
    '| kind | direction | instructions | HBM GB | logical GB | padding | '
    'on-chip GB | GFLOP |',
    '|---|---|---|---|---|---|---|---|',
  ]
  lines += [
    f'| {r["kind"]} | {r["direction"]} | {r["count"]} | '
    f'{gb(r["padded_hbm_bytes"])} | {gb(r["hbm_bytes"])} | {_padding(r)} | '
    f'{gb(r["padded_on_chip_bytes"])} | {r["flops"] / 1e9:.1f} |'
    for r in t['by_kind']
  ]
  lines += [
    '',
    '| source | instructions | HBM GB | logical GB | padding | on-chip GB '
    '| GFLOP |',
    '|---|---|---|---|---|---|---|',
  ]
  lines += [
    f'| {r["source"]} | {r["count"]} | {gb(r["padded_hbm_bytes"])} | '
    f'{gb(r["hbm_bytes"])} | {_padding(r)} | '
    f'{gb(r["padded_on_chip_bytes"])} | {r["flops"] / 1e9:.1f} |'
    for r in t['by_source']
  ]
  return '\n'.join(lines)


def _largest(row) -> str:
  """The largest batch that fits: `N`, `>= N` where the search's compiles
  ran out before the next size up was shown not to fit, `none` where one
  image per data-axis slot does not fit, `-` where not searched."""
  if 'largest_batch' not in row:
    return '-'
  batch, settled = row['largest_batch'], row.get('largest_batch_settled')
  if batch is None:
    return 'none' if settled else '-'
  return f'{batch}' if settled else f'>= {batch}'


def table(rows: list[dict[str, Any]]) -> str:
  """The rows as a Markdown table (memory in GiB per chip)."""
  gib = lambda b: f'{b / 2**30:.2f}' if b is not None else '-'
  head = (
    '| arch | topology | batch | args | temp | out | total | HBM | fits '
    '(margin) | eval total | largest batch | GFLOP/chip | GB moved/chip | '
    'roofline ms | MFU ceiling | HBM GB/chip as laid out (logical) | HBM '
    'roofline ms | HBM MFU ceiling | per-instruction roofline ms | '
    'collectives | compile s (train) |'
  )
  lines = [head, '|' + '---|' * 21]
  looped = False
  for r in rows:
    if 'refused' in r:  # the compiler refused it: what it needs, no costs
      lines.append(
        f'| {r["arch"]} | {r["topology"]} | {r["batch"]} | - | - | - | '
        f'> {gib(r["need_bytes"])} | {gib(r["hbm_bytes"])} | NO (the TPU '
        f'compiler refused it) | - | {_largest(r)} | - | - '
        '| - | - | - | - | - | - | - | - |'
      )
      continue
    coll = ', '.join(
      f'{k} {v["count"]} ({v["bytes"] / 2**20:.1f} MiB)'
      for k, v in r['collectives'].items()
    )
    fits = f'{"yes" if r["fits"] else "NO"} ({gib(r["margin_bytes"])})'
    t = r['traffic']
    mark = '*' if t.get('looped') else ''
    looped = looped or bool(mark)
    lines.append(
      f'| {r["arch"]} | {r["topology"]} | {r["batch"]} | '
      f'{gib(r["argument_bytes"])} | {gib(r["temp_bytes"])} | '
      f'{gib(r["output_bytes"])} | {gib(r["total_bytes"])} | '
      f'{gib(r["hbm_bytes"])} | {fits} | {gib(r["eval_total_bytes"])} | '
      f'{_largest(r)} | {r["flops"] / 1e9:.1f}{mark} | '
      f'{r["bytes_accessed"] / 1e9:.2f}{mark} | {r["step_ms"]:.2f}{mark} | '
      f'{100 * r["mfu"]:.1f}%{mark} | {t["padded_hbm_bytes"] / 1e9:.2f} '
      f'({t["hbm_bytes"] / 1e9:.2f}) | {r["hbm_step_ms"]:.2f} | '
      f'{100 * r["hbm_mfu"]:.1f}% | {t["instruction_roofline_ms"]:.2f} | '
      f'{coll or "none"} | {r["compile_s"]} ({r["train_compile_s"]}) |'
    )
  if looped:
    lines += [
      '',
      "* XLA's cost analysis counts each loop's body once (the program "
      'scans); the HBM columns count every iteration.',
    ]
  return '\n'.join(lines)

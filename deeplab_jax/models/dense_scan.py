"""DenseNet's dense blocks as chunked scans with a written-out backward pass,
on any platform. The same numbers as `DenseNet._dense_block` up to float
rounding. On XLA:CPU (the default there) faster and about 3x quicker to
compile than unrolled layers, whose every fusion differs
(docs/benchmarks.md); elsewhere `model.scan_blocks` turns it on. Only a
CPU program puts each layer's maps behind XLA:CPU's fusion barrier.

The backward pass is a `jax.custom_vjp`, so forward-mode differentiation
(`jax.jvp`, `jax.jacfwd`) through a scanned DenseNet is not available;
`nnx.view(model, scan_dense_layers=False)` unrolls the layers for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deeplab_jax.models import layers
from deeplab_jax.models.xla_cpu.fusion import fusion_barrier

# Dense layers per `jax.lax.scan`: longer chunks compile less and pad more
# (docs/benchmarks.md, DenseASPP-161).
SCAN_CHUNK = 6


def _resize_inputs(state: nnx.State, width: int) -> nnx.State:
  """A `DenseLayer`'s state with its input-channel axis (`norm1`'s vectors,
  `conv1`'s kernel) cut or padded to `width`; padding is 0, and 1 for the
  running variance."""

  def resize(path, a):
    module, name = path[0].key, path[1].key
    if module != 'norm1' and (module, name) != ('conv1', 'kernel'):
      return a
    axis = a.ndim - 2 if module == 'conv1' else 0
    have = a.shape[axis]
    if have >= width:
      return jax.lax.slice_in_dim(a, 0, width, axis=axis)
    pads = [(0, 0)] * a.ndim
    pads[axis] = (0, width - have)
    return jnp.pad(a, pads, constant_values=1.0 if name == 'var' else 0.0)

  return jax.tree_util.tree_map_with_path(resize, state)


def scanned_dense_block(
  block: Sequence[nnx.Module], x: jax.Array, growth: int, *, cpu: bool
):
  """`DenseNet._dense_block` (the block's maps concatenated, and their batch
  statistics) as one scan per `SCAN_CHUNK` layers (`_scan_chunk`).

  The maps are written into one buffer of the block's output width. The
  layers of a chunk read its widest input, their weights zero-padded to it
  (`_resize_inputs`), so the chunk's layers have one shape and XLA
  compiles one body for them. A padded channel has BatchNorm scale and
  bias 0, so it normalises to exactly 0 whatever the buffer holds there,
  and the result is the unpadded layer's. `cpu`: a program for XLA:CPU,
  whose layers' maps go behind its fusion barrier (`RematBlocks.block`)."""
  c0 = x.shape[-1]
  pad = len(block) * growth
  buf = jnp.pad(x, ((0, 0),) * 3 + ((0, pad),))
  mean, var = (jnp.pad(s, (0, pad)) for s in layers.batch_stats(x))
  for start in range(0, len(block), SCAN_CHUNK):
    chunk = block[start : start + SCAN_CHUNK]
    first = c0 + start * growth  # the chunk's first layer's input width
    widest = first + (len(chunk) - 1) * growth
    graphdef = nnx.split(chunk[0], nnx.Param, nnx.BatchStat)[0]

    def stacked(kind, widest=widest, chunk=chunk):
      parts = [nnx.to_pure_dict(nnx.state(layer, kind)) for layer in chunk]
      parts = [_resize_inputs(part, widest) for part in parts]
      return jax.tree.map(lambda *a: jnp.stack(a), *parts)

    buf, mean, var, running = _scan_chunk(
      graphdef,
      stacked(nnx.Param),
      stacked(nnx.BatchStat),
      buf,
      mean,
      var,
      offsets=first + growth * np.arange(len(chunk)),
      widest=widest,
      growth=growth,
      cpu=cpu,
    )
    for j, layer in enumerate(chunk):  # running statistics, in training
      own = jax.tree.map(lambda a, j=j: a[j], running)
      nnx.update(layer, _resize_inputs(own, first + j * growth))
  return buf, (mean, var)


def _bottleneck(graphdef, params, stats, x, mean, var):
  """`DenseLayer.bottleneck` of a layer given as arrays: `(y, its updated
  running statistics)`."""
  layer = nnx.merge(graphdef, params, stats)
  y = layer.bottleneck(x, (mean, var))
  return y, nnx.to_pure_dict(nnx.state(layer, nnx.BatchStat))


def _expand(graphdef, params, stats, y, cpu):
  """`DenseLayer.expand` of a layer given as arrays: `(maps, statistics)`;
  on XLA:CPU behind the fusion barrier, as `RematBlocks.block` puts every
  layer there."""
  layer = nnx.merge(graphdef, params, stats)
  new = layer.expand(y)
  if cpu:
    new = fusion_barrier(new)
  return new, nnx.to_pure_dict(nnx.state(layer, nnx.BatchStat))


def _scan_chunk(
  graphdef, params, stats, buf, mean, var, *, offsets, widest, growth, cpu
):
  """Dense layers (`params` and running `stats` stacked, inputs padded to
  `widest` channels) over a block's buffer `buf` and its channels' batch
  `mean` / `var`: layer `j` reads the first `widest` channels and writes
  its `growth` maps and their statistics at `offsets[j]`. Returns the updated
  `(buf, mean, var, stacked running statistics)`.

  The backward pass is written out (`jax.custom_vjp`). Autodiff of a scan
  stacks every layer's input (`widest` channels) and ReLU mask for the
  backward pass; XLA:CPU zero-fills, writes and reads back each stack,
  which made the step slower than the unrolled layers. Here a layer's input
  is read back from the output buffer instead: maps are never overwritten,
  and channels past a layer's own input (written later) have scale 0.
  Only each layer's bottleneck output is kept; the backward pass
  recomputes the elementwise BN-ReLUs, and XLA removes the forward matmuls
  the recomputation does not use.
  """
  offsets = np.asarray(offsets, np.int32)

  def forward(params, stats, buf, mean, var):
    def body(carry, xs):
      buf, mean, var = carry
      p, s, offset = xs
      y, s = _bottleneck(
        graphdef, p, s, buf[..., :widest], mean[:widest], var[:widest]
      )
      new, s = _expand(graphdef, p, s, y, cpu)
      new_mean, new_var = layers.batch_stats(new)
      buf = jax.lax.dynamic_update_slice_in_dim(buf, new, offset, axis=3)
      mean = jax.lax.dynamic_update_slice_in_dim(mean, new_mean, offset, 0)
      var = jax.lax.dynamic_update_slice_in_dim(var, new_var, offset, 0)
      return (buf, mean, var), (y, s)

    (buf, mean, var), (ys, running) = jax.lax.scan(
      body, (buf, mean, var), (params, stats, offsets)
    )
    return (buf, mean, var, running), ys

  @jax.custom_vjp
  def run(params, stats, buf, mean, var):
    return forward(params, stats, buf, mean, var)[0]

  def run_fwd(params, stats, buf, mean, var):
    out, ys = forward(params, stats, buf, mean, var)
    return out, (params, stats, *out[:3], ys)

  def run_bwd(residuals, cotangents):
    params, stats, buf, mean, var, ys = residuals
    ct_buf, ct_mean, ct_var, _ = cotangents

    def body(carry, xs):
      ct_buf, ct_mean, ct_var = carry
      p, s, y, offset = xs
      new = jax.lax.dynamic_slice_in_dim(buf, offset, growth, axis=3)
      # The maps' cotangent: where they were written, and through their
      # batch statistics; that slot held zeros before, so its cotangent
      # goes no further.
      ct_new = jax.lax.dynamic_slice_in_dim(ct_buf, offset, growth, axis=3)
      ct_stats = tuple(
        jax.lax.dynamic_slice_in_dim(c, offset, growth, 0)
        for c in (ct_mean, ct_var)
      )
      ct_buf, ct_mean, ct_var = (
        jax.lax.dynamic_update_slice_in_dim(c, jnp.zeros_like(z), offset, a)
        for c, z, a in (
          (ct_buf, ct_new, 3),
          (ct_mean, ct_stats[0], 0),
          (ct_var, ct_stats[1], 0),
        )
      )
      ct_new = ct_new + jax.vjp(layers.batch_stats, new)[1](ct_stats)[0]
      _, expand_vjp = jax.vjp(
        lambda p, y: _expand(graphdef, p, s, y, cpu)[0], p, y
      )
      ct_p_expand, ct_y = expand_vjp(ct_new)
      _, bottleneck_vjp = jax.vjp(
        lambda p, x, m, v: _bottleneck(graphdef, p, s, x, m, v)[0],
        p,
        buf[..., :widest],
        mean[:widest],
        var[:widest],
      )
      ct_p, ct_x, ct_m, ct_v = bottleneck_vjp(ct_y)
      ct_buf = ct_buf.at[..., :widest].add(ct_x)
      ct_mean = ct_mean.at[:widest].add(ct_m)
      ct_var = ct_var.at[:widest].add(ct_v)
      return (ct_buf, ct_mean, ct_var), jax.tree.map(jnp.add, ct_p, ct_p_expand)

    (ct_buf, ct_mean, ct_var), ct_params = jax.lax.scan(
      body,
      (ct_buf, ct_mean, ct_var),
      (params, stats, ys, offsets),
      reverse=True,
    )
    ct_stats = jax.tree.map(jnp.zeros_like, stats)  # not differentiated
    return ct_params, ct_stats, ct_buf, ct_mean, ct_var

  run.defvjp(run_fwd, run_bwd)
  return run(params, stats, buf, mean, var)

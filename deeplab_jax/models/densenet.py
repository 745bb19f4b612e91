"""Dilated DenseNet-121/161/169/201 (Huang et al. 2017) for DenseASPP.

Following the DenseASPP paper (Yang et al., CVPR 2018) and its official
PyTorch model, output stride 8 keeps the stem (conv s2 + max-pool s2) and
transition 1's pooling, drops the pooling of transitions 2 and 3, and dilates
dense block 3 by 2 and block 4 by 4. Output stride 16 keeps transition 2's
pooling and dilates block 4 by 2 only (block 3 undilated).

The official model also has a transition 4 (BN-ReLU-1x1 conv halving the
channels, no pooling) after block 4, before `norm5`; torchvision's DenseNet
has none. `transition4=True` reproduces the official layout.

Attribute names follow torchvision (`conv0`, `denseblock1[0].norm1`,
`transition1.conv`, `norm5`) so converting its weights is a key rename.
The output is `norm5`'s, before any ReLU, as torchvision's `features`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deeplab_jax.models import layers

VARIANTS = {
  # depth: (growth rate, stem width, dense block sizes)
  121: (32, 64, (6, 12, 24, 16)),
  161: (48, 96, (6, 12, 36, 24)),
  169: (32, 64, (6, 12, 32, 32)),
  201: (32, 64, (6, 12, 48, 32)),
}

# Dense layers per `jax.lax.scan` (`DenseNet._scanned_dense_block`): longer
# chunks compile less and pad more (docs/benchmarks.md, DenseASPP-161).
SCAN_CHUNK = 6


@dataclasses.dataclass(frozen=True, kw_only=True)
class DenseNetConfig:
  """Hyper-parameters of a dilated DenseNet."""

  growth_rate: int = 48
  init_features: int = 96
  blocks: tuple[int, ...] = VARIANTS[161][2]
  bn_size: int = 4
  output_stride: int = 8
  transition4: bool = True

  def plan(self) -> tuple[tuple[bool, ...], tuple[int, ...]]:
    """Whether transitions 1-3 pool, and the dilation of blocks 1-4."""
    if self.output_stride == 8:
      return (True, False, False), (1, 1, 2, 4)
    if self.output_stride == 16:
      return (True, True, False), (1, 1, 1, 2)
    raise ValueError(
      f'DenseNet output_stride must be 8 or 16, got {self.output_stride}'
    )


class DenseLayer(nnx.Module):
  """BN-ReLU-1x1 conv (bn_size * growth) - BN-ReLU-3x3 conv (growth)."""

  def __init__(
    self,
    in_channels: int,
    growth_rate: int,
    bn_size: int,
    dilation: int,
    *,
    rngs: nnx.Rngs,
  ):
    mid = bn_size * growth_rate
    self.norm1 = layers.BatchNorm(in_channels)
    self.conv1 = layers.Conv2d(in_channels, mid, 1, rngs=rngs)
    self.norm2 = layers.BatchNorm(mid)
    self.conv2 = layers.Conv2d(
      mid, growth_rate, 3, dilation=dilation, rngs=rngs
    )

  def __call__(
    self,
    features: Sequence[jax.Array],
    stats: Sequence[tuple[jax.Array, jax.Array]],
  ) -> jax.Array:
    """The new features from the block's feature maps so far (to be read
    concatenated) and their `layers.batch_stats`."""
    return self.expand(self.bottleneck(_concat(features), _concat_stats(stats)))

  def bottleneck(
    self, x: jax.Array, stats: tuple[jax.Array, jax.Array]
  ) -> jax.Array:
    """BN-ReLU-1x1 conv of the concatenated maps `x` (batch `stats`)."""
    return self.conv1(jax.nn.relu(self.norm1(x, stats)))

  def expand(self, y: jax.Array) -> jax.Array:
    """BN-ReLU-3x3 conv of the bottleneck: the layer's new maps."""
    return self.conv2(jax.nn.relu(self.norm2(y)))


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


def _concat(arrays: Sequence[jax.Array]) -> jax.Array:
  return arrays[0] if len(arrays) == 1 else jnp.concatenate(arrays, axis=-1)


def _concat_stats(stats: Sequence[tuple[jax.Array, jax.Array]]):
  """The `(mean, var)` of the concatenation, from its parts'."""
  means, variances = zip(*stats, strict=True)
  return _concat(means), _concat(variances)


class Transition(nnx.Module):
  """BN-ReLU-1x1 conv, then 2x2 average pooling when `pool`."""

  def __init__(
    self, in_channels: int, out_channels: int, pool: bool, *, rngs: nnx.Rngs
  ):
    self.norm = layers.BatchNorm(in_channels)
    self.conv = layers.Conv2d(in_channels, out_channels, 1, rngs=rngs)
    self.pool = pool

  def __call__(
    self, x: jax.Array, stats: tuple[jax.Array, jax.Array] | None = None
  ) -> jax.Array:
    """`stats`: `x`'s `layers.batch_stats`, where the caller has them."""
    y = self.conv(jax.nn.relu(self.norm(x, stats)))
    return layers.avg_pool(y, 2, 2) if self.pool else y


class DenseNet(layers.RematBlocks, nnx.Module):
  """Dilated DenseNet; returns `{'layer1': stride-4 features, 'out': norm5}`.

  Each dense block runs as scans over chunks of its layers
  (`_scanned_dense_block`): faster and about 3x quicker to compile than the
  unrolled layers (docs/benchmarks.md), the same numbers up to float
  rounding. `nnx.view(model, scan_dense_layers=False)` unrolls them, and so
  does `remat_blocks` (which rematerialises each layer).
  """

  scan_dense_layers: bool = True

  def set_view(
    self,
    remat_blocks: bool | None = None,
    scan_blocks: bool | None = None,
    scan_dense_layers: bool | None = None,
  ):
    """Used by `nnx.view`: as `RematBlocks`, and `scan_dense_layers`."""
    super().set_view(remat_blocks=remat_blocks, scan_blocks=scan_blocks)
    if scan_dense_layers is not None:
      self.scan_dense_layers = scan_dense_layers

  def __init__(self, config: DenseNetConfig, *, rngs: nnx.Rngs):
    self.config = config
    pools, dilations = config.plan()
    c = config.init_features
    self.conv0 = layers.Conv2d(3, c, 7, stride=2, padding=3, rngs=rngs)
    self.norm0 = layers.BatchNorm(c)
    blocks, transitions = [], []
    for i, n in enumerate(config.blocks):
      dense = []
      for _ in range(n):
        dense.append(
          DenseLayer(
            c, config.growth_rate, config.bn_size, dilations[i], rngs=rngs
          )
        )
        c += config.growth_rate
      blocks.append(nnx.List(dense))
      if i < 3 or config.transition4:
        transitions.append(Transition(c, c // 2, i < 3 and pools[i], rngs=rngs))
        c //= 2
      else:
        transitions.append(None)
    self.denseblock1, self.denseblock2 = blocks[0], blocks[1]
    self.denseblock3, self.denseblock4 = blocks[2], blocks[3]
    self.transition1, self.transition2 = transitions[0], transitions[1]
    self.transition3, self.transition4 = transitions[2], transitions[3]
    self.norm5 = layers.BatchNorm(c)
    self.out_channels = c
    self.low_level_channels = config.init_features + (
      config.blocks[0] * config.growth_rate
    )

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    x = jax.nn.relu(self.norm0(self.conv0(x)))
    x = layers.max_pool(x, 3, 2, 1)
    feats = {}
    for i in range(1, 5):
      block = list(getattr(self, f'denseblock{i}'))
      if self.scan_dense_layers and not self.remat_blocks:
        x, block_stats = self._scanned_dense_block(block, x)
      else:
        x, block_stats = self._dense_block(block, x)
      if i == 1:
        feats['layer1'] = x
      transition = getattr(self, f'transition{i}')
      if transition is not None:
        x = transition(x, block_stats)
    feats['out'] = self.norm5(x, block_stats if transition is None else None)
    return feats

  def _dense_block(self, block: Sequence[DenseLayer], x: jax.Array):
    """The block's output (all its maps concatenated) and its channels'
    batch statistics."""
    # Every layer normalises the concatenation of all maps so far, whose
    # channels' batch statistics never change: each map's are computed once
    # and shared (the same numbers; torchvision recomputes them per layer).
    # Unused, and removed by XLA, when BatchNorm runs on its running
    # averages.
    features = [x]
    stats = [layers.batch_stats(x)]
    for layer in block:
      # `block` ends with the fusion barrier: a map's gradient sums a slice
      # of every later layer's, which XLA:CPU then adds up once.
      features.append(self.block(layer, features, stats))
      stats.append(layers.batch_stats(features[-1]))
    return _concat(features), _concat_stats(stats)

  def _scanned_dense_block(self, block: Sequence[DenseLayer], x: jax.Array):
    """`_dense_block` as one scan per `SCAN_CHUNK` layers (`_scan_chunk`).

    The maps are written into one buffer of the block's output width. The
    layers of a chunk read its widest input, their weights zero-padded to it
    (`_resize_inputs`), so the chunk's layers have one shape and XLA
    compiles one body for them. A padded channel has BatchNorm scale and
    bias 0, so it normalises to exactly 0 whatever the buffer holds there,
    and the result is the unpadded layer's."""
    growth = self.config.growth_rate
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


def _expand(graphdef, params, stats, y):
  """`DenseLayer.expand` (behind the fusion barrier, as `RematBlocks.block`
  puts every layer) of a layer given as arrays: `(maps, statistics)`."""
  layer = nnx.merge(graphdef, params, stats)
  new = layers.fusion_barrier(layer.expand(y))
  return new, nnx.to_pure_dict(nnx.state(layer, nnx.BatchStat))


def _scan_chunk(
  graphdef, params, stats, buf, mean, var, *, offsets, widest, growth
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
      new, s = _expand(graphdef, p, s, y)
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
      _, expand_vjp = jax.vjp(lambda p, y: _expand(graphdef, p, s, y)[0], p, y)
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

"""ImageNet checkpoint import: PyTorch state_dict -> backbone variables -> .npz.

The Flax backbones name their submodules after the PyTorch module paths with
every numeric index glued to its parent by '_', so the mapping is mechanical
in both directions:

  stage2.0.fuse_layers.1.0.0.0.weight  <->  params/stage2_0/fuse_layers_1_0_0_0/kernel
  layer1.0.downsample.1.running_var    <->  batch_stats/layer1_0/downsample_1/var

Conv weights go OIHW -> HWIO, Linear weights (out, in) -> (in, out); BatchNorm
and LayerNorm weight/bias/running_mean/running_var become scale/bias/mean/var;
the ViTs' cls_token and pos_embed keep their names. Classification heads and
num_batches_tracked are dropped; anything else that does not match the
backbone is an error.

ViTs: timm state dicts convert the same way (the trunk; the simple feature
pyramid is not in any checkpoint and stays as initialised, see NEW_LAYERS).
The position embedding's grid sets the backbone's `img_size` (384 for
`*_384` checkpoints). Original Google ViT .npz checkpoints (vit_jax / AugReg:
'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel', ...)
are first renamed to timm's keys by `vit_npz_to_timm`, as timm's
`vision_transformer._load_weights` does.

MTPSL / MTAN SegNet checkpoints (trunk and task heads) convert to the whole
`segnet` framework with `convert_segnet_state_dict`; `pred_task<k>` become
the k-th task's `<task>_head` / `<task>_pred`, and `logsigma` is skipped.

InvPT's decoder and heads (prismformore/Multi-Task-Transformer TransformerNet,
framework 'invpt') convert with `convert_invpt_decoder_state_dict`, module by
module (`_invpt_modules`); its 'backbone.' keys are timm's ViT.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cmtdp_jax.models.backbones import get_backbone, vit

# Classification heads of the official HRNet models (and timm's) and torchvision.
HEAD_PREFIXES = {
    'hrnet_w18_small_v2': ('incre_modules.', 'downsamp_modules.', 'final_layer.', 'classifier.'),
    'hrnet_w48': ('incre_modules.', 'downsamp_modules.', 'final_layer.', 'classifier.'),
    'resnet50': ('fc.',),
    'resnet101': ('fc.',),
    'vit_s16': ('head.',),
    'vit_b16': ('head.',),
    'vit_l16': ('head.',),
}
ARCHS = tuple(HEAD_PREFIXES)
# Top-level submodules of a backbone that no ImageNet checkpoint has: left out
# of the conversion, and left as initialised by `load_pretrained`.
NEW_LAYERS = {'vit_s16': ('pyramid',), 'vit_b16': ('pyramid',), 'vit_l16': ('pyramid',)}
# Parameters stored under their own name (no 'weight'/'bias' leaf).
_NAMED_PARAMS = ('cls_token', 'pos_embed')

# PyTorch parameter name -> (Flax collection, leaf name); 'weight' of a conv is
# told apart from a BatchNorm's by its rank.
_LEAVES = {
    'bias': ('params', 'bias'),
    'running_mean': ('batch_stats', 'mean'),
    'running_var': ('batch_stats', 'var'),
}
_TORCH_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
               'var': 'running_var', **{name: name for name in _NAMED_PARAMS}}
NPZ_ARCH_KEY = '__arch__'
NPZ_OPTIONS_KEY = '__options__'


class CheckpointMismatchError(ValueError):
  """Weights do not fit the backbone; the message lists every bad key."""


def torch_to_flax_path(key: str, ndim: int) -> tuple[str, ...] | None:
  """'layer1.0.conv1.weight' (rank 4) -> ('params', 'layer1_0', 'conv1', 'kernel').

  Rank-4 (conv) and rank-2 (Linear) weights are kernels, other weights scales.

  None for a parameter kind no backbone has.
  """
  *modules, leaf = key.split('.')
  names = []
  for part in modules:
    if part.isdigit() and names:
      names[-1] += f'_{part}'
    else:
      names.append(part)
  if leaf == 'weight':
    collection, leaf = ('params', 'kernel') if ndim in (2, 4) else ('params', 'scale')
  elif leaf in _NAMED_PARAMS:
    collection = 'params'
  elif leaf in _LEAVES:
    collection, leaf = _LEAVES[leaf]
  else:
    return None
  return (collection, *names, leaf)


def flax_to_torch_key(path: tuple[str, ...]) -> str:
  """Inverse of `torch_to_flax_path`, used to name keys in error messages."""
  _, *modules, leaf = path
  return '.'.join([re.sub(r'_(\d+)', r'.\1', m) for m in modules] + [_TORCH_LEAF[leaf]])


@functools.cache
def expected_shapes(arch: str, **kwargs) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat {(collection, *path): shape} of backbone `arch(**kwargs)` without its NEW_LAYERS."""
  module = get_backbone(arch, **kwargs)
  variables = jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  new_layers = NEW_LAYERS.get(arch, ())
  return {path: tuple(leaf.shape)
          for path, leaf in traverse_util.flatten_dict(variables).items()
          if path[1] not in new_layers}


def checkpoint_options(arch: str, state_dict: Mapping[str, Any]) -> dict[str, int]:
  """Backbone kwargs a checkpoint implies: a ViT's img_size from its position embedding grid.

  {} when there is nothing to infer (then a wrong pos_embed is reported mis-shaped).
  """
  pos_embed = state_dict.get('pos_embed')
  if arch not in NEW_LAYERS or pos_embed is None or np.ndim(pos_embed) != 3:
    return {}
  grid = math.isqrt(np.shape(pos_embed)[1] - 1)
  if grid * grid != np.shape(pos_embed)[1] - 1:
    return {}
  return {'img_size': grid * get_backbone(arch).patch_size}


def _mismatch_report(what: str, missing, unexpected, misshaped) -> str:
  lines = [f'{what}: {len(missing)} missing, {len(unexpected)} unexpected, '
           f'{len(misshaped)} mis-shaped key(s)']
  lines += [f'  missing: {k}' for k in missing]
  lines += [f'  unexpected: {k}' for k in unexpected]
  lines += [f'  mis-shaped: {k}' for k in misshaped]
  return '\n'.join(lines)


def convert_torch_state_dict(arch: str, state_dict: Mapping[str, Any],
                             **backbone_kwargs) -> dict[str, Any]:
  """Official HRNet / torchvision ResNet / timm ViT state_dict (numpy arrays) -> variables.

  Returns {'params': ..., 'batch_stats': ...} for `get_backbone(arch, **backbone_kwargs)`
  (float32 numpy leaves; ViTs have no 'batch_stats', and their pyramid is left out);
  `backbone_kwargs` default to `checkpoint_options`. Raises CheckpointMismatchError
  naming every missing, unexpected or mis-shaped key, in PyTorch names.
  """
  if arch not in ARCHS:
    raise ValueError(f"no ImageNet weight conversion for '{arch}'; valid: {', '.join(ARCHS)}")
  expected = expected_shapes(arch, **{**checkpoint_options(arch, state_dict), **backbone_kwargs})
  flat, unexpected, misshaped = {}, [], []
  for key, value in state_dict.items():
    if key.endswith('num_batches_tracked') or key.startswith(HEAD_PREFIXES[arch]):
      continue
    value = np.asarray(value, np.float32)
    path = torch_to_flax_path(key, value.ndim)
    if path not in expected:
      unexpected.append(key)
      continue
    if path[-1] == 'kernel':
      value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    if value.shape != expected[path]:
      want = expected[path]
      if path[-1] == 'kernel':
        want = (want[3], want[2], want[0], want[1]) if len(want) == 4 else want[::-1]
      misshaped.append(f'{key} {np.shape(state_dict[key])}, backbone wants {want}')
    flat[path] = value
  missing = [flax_to_torch_key(p) for p in expected if p not in flat]
  if missing or unexpected or misshaped:
    wrong = len(missing) + len(misshaped) > len(expected) // 2
    hint = ' (a checkpoint of another arch?)' if wrong else ''
    raise CheckpointMismatchError(_mismatch_report(
        f'state_dict does not match {arch}{hint}', missing, unexpected, misshaped))
  return traverse_util.unflatten_dict(flat)


def save_npz(path: str, variables: Mapping[str, Any], arch: str,
             options: Mapping[str, Any] | None = None) -> str:
  """Writes variables as flat 'params/conv1/kernel' entries plus the arch (and, for a whole
  model, the options it must be built with, as JSON).

  Returns the path written, which numpy ends with '.npz'.
  """
  path = path if path.endswith('.npz') else f'{path}.npz'
  flat = {'/'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(variables).items()}
  extra = {NPZ_OPTIONS_KEY: np.array(json.dumps(options))} if options is not None else {}
  np.savez(path, **flat, **{NPZ_ARCH_KEY: np.array(arch)}, **extra)
  return path


def _load_npz(variables: Mapping[str, Any], path: str, arch: str | None, what: str,
              position_grid: tuple[int, int] | None = None):
  """`variables` with every leaf replaced from the .npz at `path`."""
  with np.load(path) as data:
    stored = {k: data[k] for k in data.files if k != NPZ_OPTIONS_KEY}
  model_pos_embed = variables.get('params', {}).get('pos_embed')
  if (position_grid and model_pos_embed is not None and 'params/pos_embed' in stored
      and stored['params/pos_embed'].shape != tuple(model_pos_embed.shape)):
    stored['params/pos_embed'] = vit.resize_position_embedding(stored['params/pos_embed'],
                                                               *position_grid)
  stored_arch = str(stored.pop(NPZ_ARCH_KEY, ''))
  if arch is not None and stored_arch and stored_arch != arch:
    raise CheckpointMismatchError(f'{path} holds {stored_arch} weights, not {arch}')
  flat = {'/'.join(k): v for k, v in traverse_util.flatten_dict(variables).items()}
  new_layers = NEW_LAYERS.get(stored_arch or arch, ())
  for key in [k for k in flat if k.split('/')[1] in new_layers]:
    stored[key] = flat[key]
  missing = [k for k in flat if k not in stored]
  unexpected = [k for k in stored if k not in flat]
  misshaped = [f'{k} {stored[k].shape}, model wants {tuple(flat[k].shape)}'
               for k in flat if k in stored and stored[k].shape != tuple(flat[k].shape)]
  if missing or unexpected or misshaped:
    raise CheckpointMismatchError(_mismatch_report(
        f'{path} does not fit {what}', missing, unexpected, misshaped))
  return traverse_util.unflatten_dict(
      {tuple(k.split('/')): jnp.asarray(stored[k], flat[k].dtype) for k in flat})


def npz_options(path: str) -> dict[str, Any]:
  """The options a whole model's .npz was saved with ({} for a backbone's)."""
  with np.load(path) as data:
    return json.loads(str(data[NPZ_OPTIONS_KEY])) if NPZ_OPTIONS_KEY in data.files else {}


def load_pretrained(variables: Mapping[str, Any], path: str, arch: str | None = None,
                    position_grid: tuple[int, int] | None = None) -> dict[str, Any]:
  """Returns backbone `variables` with every leaf replaced from the .npz at `path`.

  `variables` is the backbone's own sub-tree, e.g.
  {'params': v['params']['backbone'], 'batch_stats': v['batch_stats']['backbone']}.
  Leaves keep their dtype; the arch's NEW_LAYERS (a ViT's pyramid) keep their
  values. With `arch`, the file must have been converted for it. A ViT's
  position embedding for another grid is resized once to `position_grid` (the
  backbone's, from its img_size), as InvPT loads ImageNet weights
  (`vit.resize_position_embedding`); without it, it is mis-shaped. Raises
  CheckpointMismatchError naming every missing, unexpected or mis-shaped key.
  """
  return _load_npz(variables, path, arch, 'the backbone', position_grid)


def model_arch(framework: str, backbone: str) -> str:
  """The arch a whole model's .npz is stored under."""
  return f'{framework}/{backbone}'


def load_model_weights(variables: Mapping[str, Any], path: str, framework: str, backbone: str,
                       tasks: Sequence[str], img_size=None) -> dict[str, Any]:
  """Returns a whole model's {'params', 'batch_stats'} replaced from the .npz at `path`
  (`convert_weights --framework`). The file must hold `framework` on `backbone` for `tasks`
  in the same order (InvPT's per-task modules are numbered in it), and a ViT's position
  grid for the same `img_size` (448x576 and 576x448 have the same number of positions)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config.model.weights: no such file: {path}')
  options = npz_options(path)
  stored_size = options.get('backbone_kwargs', {}).get('img_size')
  as_pair = lambda size: tuple(size) if isinstance(size, (list, tuple)) else (size, size)
  if img_size is not None and stored_size is not None and as_pair(stored_size) != as_pair(
      img_size):
    raise CheckpointMismatchError(
        f'{path} holds a position embedding for img_size {as_pair(stored_size)}, the model '
        f'is built for {as_pair(img_size)}: set config.model.backbone_kwargs.img_size')
  stored = [t for t, _ in options.get('task_channels', ())]
  if stored and stored != list(tasks):
    raise CheckpointMismatchError(
        f'{path} holds the tasks in the order {stored}, the config trains {list(tasks)}: '
        f'set config.tasks to {tuple(stored)} (the order is part of the weights)')
  return _load_npz(variables, path, model_arch(framework, backbone), 'the model')


# Original ViT .npz (vit_jax / AugReg) name -> timm name, per block and outside
# blocks; kernels are HWIO / (in, out) there, so they are transposed to timm's.
_NPZ_BLOCK_KEYS = {
    'LayerNorm_0/scale': 'norm1.weight',
    'LayerNorm_0/bias': 'norm1.bias',
    'LayerNorm_2/scale': 'norm2.weight',
    'LayerNorm_2/bias': 'norm2.bias',
    'MlpBlock_3/Dense_0/kernel': 'mlp.fc1.weight',
    'MlpBlock_3/Dense_0/bias': 'mlp.fc1.bias',
    'MlpBlock_3/Dense_1/kernel': 'mlp.fc2.weight',
    'MlpBlock_3/Dense_1/bias': 'mlp.fc2.bias',
    'MultiHeadDotProductAttention_1/out/kernel': 'attn.proj.weight',
    'MultiHeadDotProductAttention_1/out/bias': 'attn.proj.bias',
}
_NPZ_KEYS = {
    'embedding/kernel': 'patch_embed.proj.weight',
    'embedding/bias': 'patch_embed.proj.bias',
    'cls': 'cls_token',
    'Transformer/posembed_input/pos_embedding': 'pos_embed',
    'Transformer/encoder_norm/scale': 'norm.weight',
    'Transformer/encoder_norm/bias': 'norm.bias',
}
_NPZ_HEADS = ('head/', 'pre_logits/')
_NPZ_BLOCK = re.compile(r'Transformer/encoderblock_(\d+)/(.+)')
_NPZ_QKV = re.compile(r'MultiHeadDotProductAttention_1/(query|key|value)/(kernel|bias)')


def vit_npz_to_timm(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Original Google ViT .npz arrays -> a timm ViT state_dict (numpy), as timm's `_load_weights`.

  query/key/value (dim, heads, head_dim) are fused into timm's qkv Linear,
  'out' (heads, head_dim, dim) becomes attn.proj; 'opt/target/' prefixes are
  removed and the classification head dropped. Keys it does not know, and
  query/key/value pieces whose siblings are missing, are passed through
  unchanged, so that `convert_torch_state_dict` names them (and the missing qkv).
  """
  state, qkv = {}, {}
  for key, value in arrays.items():
    name = key.removeprefix('opt/target/')
    if name.startswith(_NPZ_HEADS):
      continue
    value = np.asarray(value)
    if name in _NPZ_KEYS:
      if value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)
      state[_NPZ_KEYS[name]] = value
      continue
    block = _NPZ_BLOCK.fullmatch(name)
    part = _NPZ_QKV.fullmatch(block.group(2)) if block else None
    if part:
      qkv.setdefault((block.group(1), part.group(2)), {})[part.group(1)] = (key, value)
    elif block and block.group(2) in _NPZ_BLOCK_KEYS:
      if value.ndim == 3:  # out/kernel: (heads, head_dim, dim) -> (heads * head_dim, dim)
        value = value.reshape(-1, value.shape[-1])
      state[f'blocks.{block.group(1)}.{_NPZ_BLOCK_KEYS[block.group(2)]}'] = (
          value.T if value.ndim == 2 else value)
    else:
      state[key] = value
  for (index, leaf), parts in qkv.items():
    if len(parts) < 3:
      state.update(parts.values())
      continue
    # kernel (dim, heads, head_dim) -> (heads * head_dim, dim); bias -> (heads * head_dim,)
    fused = [parts[n][1].reshape(parts[n][1].shape[0], -1).T if leaf == 'kernel'
             else parts[n][1].reshape(-1) for n in ('query', 'key', 'value')]
    state[f'blocks.{index}.attn.qkv.{"weight" if leaf == "kernel" else "bias"}'] = (
        np.concatenate(fused))
  return state


# MTPSL / MTAN split SegNet (VICO-UoE/MTPSL model/segnet_mtl.py). Its state_dict
# also holds `logsigma`, the three log-variances of uncertainty loss weighting
# (Kendall et al., 2018), which is not ported: the key is expected and skipped.
SEGNET_SKIPPED_KEYS = ('logsigma',)
SEGNET_WIDTHS = (64, 128, 256, 512, 512)
_SEGNET_HEAD = re.compile(r'pred_task(\d+)\.([01])\.(weight|bias)')


@functools.cache
def _segnet_shapes(task_channels: tuple[tuple[str, int], ...],
                   widths: tuple[int, ...]) -> dict[tuple[str, ...], tuple[int, ...]]:
  from cmtdp_jax.models.frameworks import SegNetHeads  # pylint: disable=import-outside-toplevel
  model = SegNetHeads(backbone=get_backbone('segnet', widths=widths), task_channels=task_channels)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(variables).items()}


def _segnet_path(key: str, ndim: int, tasks: tuple[str, ...]) -> tuple[str, ...] | None:
  """'conv_block_enc.2.1.0.weight' -> ('params', 'backbone', 'conv_block_enc_2_1_0', 'kernel');
  'pred_task2.0.bias' -> ('params', '<second task>_head', 'bias'). None if it names nothing."""
  head = _SEGNET_HEAD.fullmatch(key)
  if head:
    index, layer, leaf = int(head.group(1)) - 1, head.group(2), head.group(3)
    if not 0 <= index < len(tasks):
      return None
    return ('params', f"{tasks[index]}_{'head' if layer == '0' else 'pred'}",
            'kernel' if leaf == 'weight' else 'bias')
  path = torch_to_flax_path(key, ndim)
  return None if path is None else (path[0], 'backbone', *path[1:])


def _segnet_key(path: tuple[str, ...], tasks: tuple[str, ...]) -> str:
  """Inverse of `_segnet_path`, to name missing keys."""
  if path[1] == 'backbone':
    return flax_to_torch_key((path[0], *path[2:]))
  task, _, layer = path[1].rpartition('_')
  return f"pred_task{tasks.index(task) + 1}.{0 if layer == 'head' else 1}.{_TORCH_LEAF[path[2]]}"


def convert_segnet_state_dict(state_dict: Mapping[str, Any],
                              task_channels: Sequence[tuple[str, int]],
                              widths: Sequence[int] = SEGNET_WIDTHS) -> dict[str, Any]:
  """MTPSL/MTAN SegNet state_dict (numpy arrays; a MTPSL checkpoint's 'state_dict') ->
  variables of the `segnet` framework.

  `task_channels` = ((task, output channels), ...) in the checkpoint's order:
  pred_task1 is the first task's head, pred_task2 the second's, ... (MTPSL's
  NYUv2 model: (('semseg', 13), ('depth', 1), ('normals', 3))). Returns
  {'params': ..., 'batch_stats': ...} for `SegNetHeads(segnet(widths=widths),
  task_channels)`, i.e. `models.get_model` with framework and backbone 'segnet'.
  num_batches_tracked and `logsigma` (uncertainty weighting, not ported) are
  skipped. Raises CheckpointMismatchError naming every missing, unexpected or
  mis-shaped key, in PyTorch names.
  """
  task_channels = tuple((str(t), int(c)) for t, c in task_channels)
  tasks = tuple(t for t, _ in task_channels)
  expected = _segnet_shapes(task_channels, tuple(widths))
  flat, unexpected, misshaped = {}, [], []
  for key, value in state_dict.items():
    if key.endswith('num_batches_tracked') or key in SEGNET_SKIPPED_KEYS:
      continue
    value = np.asarray(value, np.float32)
    path = _segnet_path(key, value.ndim, tasks)
    if path not in expected:
      unexpected.append(key)
      continue
    if path[-1] == 'kernel':
      value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    if value.shape != expected[path]:
      want = expected[path]
      if path[-1] == 'kernel' and len(want) == 4:
        want = (want[3], want[2], want[0], want[1])
      misshaped.append(f'{key} {np.shape(state_dict[key])}, model wants {want}')
    flat[path] = value
  missing = [_segnet_key(p, tasks) for p in expected if p not in flat]
  if missing or unexpected or misshaped:
    raise CheckpointMismatchError(_mismatch_report(
        f'state_dict does not match segnet with tasks {task_channels} and widths '
        f'{tuple(widths)}', missing, unexpected, misshaped))
  return traverse_util.unflatten_dict(flat)


# InvPT (prismformore/Multi-Task-Transformer): its TransformerNet's decoder and heads ->
# the `invpt` framework's variables outside 'backbone'. Keys InvPT builds but never uses
# in its forward are skipped: the third backbone skip conv, the last stage's extra
# LayerNorm, the first stage's channel reduction and attention-fusion conv.
INVPT_UNUSED_PREFIXES = ('multi_task_decoder.scale_embed.2.', 'multi_task_decoder.invpt.norm_mt.',
                         'multi_task_decoder.invpt.redu_chan.0.',
                         'multi_task_decoder.invpt.invpt_stages.0.blocks.0.attn.fuse_attn.')
_INVPT_LEAVES = {
    'conv': {'weight': 'kernel', 'bias': 'bias'}, 'dense': {'weight': 'kernel', 'bias': 'bias'},
    'ln': {'weight': 'scale', 'bias': 'bias'},
    'bn': {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean', 'running_var': 'var'},
}
_INVPT_LEAVES['convT'] = _INVPT_LEAVES['fuse'] = _INVPT_LEAVES['conv']


def _invpt_modules(tasks: Sequence[str], num_stages: int = 3) -> list[tuple[str, tuple, str]]:
  """(InvPT module path, our module path, kind) of every module with weights."""
  d, inv = 'multi_task_decoder.', 'multi_task_decoder.invpt.'
  modules = [(d + 'scale_embed.0', ('scale_embed_0',), 'convT'),
             (d + 'scale_embed.1', ('scale_embed_1',), 'conv')]
  for t in tasks:
    for j in (0, 1):
      ours = f'preliminary_decoder_{t}_{j}'
      modules += [(f'{d}preliminary_decoder.{t}.{j}.conv', (ours, 'conv'), 'conv'),
                  (f'{d}preliminary_decoder.{t}.{j}.bn1', (ours, 'bn1'), 'bn')]
    modules += [(f'{d}intermediate_head.{t}', (f'intermediate_head_{t}',), 'conv'),
                (f'{inv}mix_proj.{t}.0', (f'mix_proj_{t}',), 'conv'),
                (f'{inv}mt_proj.{t}.0', (f'mt_proj_{t}_0',), 'conv'),
                (f'{inv}mt_proj.{t}.1', (f'mt_proj_{t}_1',), 'bn'),
                (f'heads.{t}.linear_pred', (f'heads_{t}_linear_pred',), 'conv')]
  for s in range(num_stages):
    stage, block, ours = f'{inv}invpt_stages.{s}.', f'{inv}invpt_stages.{s}.blocks.0.', f'stage{s}_block'
    modules += [(f'{inv}norm_mts.{s}', (f'norm_mts_{s}',), 'ln')]
    modules += [(block + name, (ours, name), 'ln') for name in ('norm1', 'norm2')]
    modules += [(f'{block}mlp.{name}', (ours, 'mlp', name), 'dense') for name in ('fc1', 'fc2')]
    modules += [(f'{block}attn.{name}', (ours, 'attn', name), 'dense')
                for name in ('proj_q', 'proj_k', 'proj_v', 'proj')]
    if s > 0:
      modules += [(f'{block}attn.fuse_attn', (ours, 'attn', 'fuse_attn'), 'fuse')]
    for i in range(len(tasks)):
      modules += [(f'{block}attn.conv_proj_q.{i}.conv', (ours, 'attn', f'conv_proj_q_{i}_conv'),
                   'conv'),
                  (f'{block}attn.conv_proj_q.{i}.bn', (ours, 'attn', f'conv_proj_q_{i}_bn'), 'bn')]
      if s > 0:
        embed = f'stage{s}_patch_embed_{i}'
        modules += [(f'{stage}patch_embed.{i}.proj.{k}', (embed, f'proj_{k}'),
                     'conv' if k in (1, 4) else 'bn') for k in (1, 2, 4, 5)]
        modules += [(f'{inv}redu_chan.{s}.{i}', (f'redu_chan_{s}_{i}',), 'conv')]
  return modules


def _invpt_value(kind: str, leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf != 'weight':
    return value
  if kind == 'conv':  # OIHW -> HWIO (depthwise: (C, 1, 3, 3) -> (3, 3, 1, C))
    return value.transpose(2, 3, 1, 0)
  if kind == 'convT':  # ConvTranspose2d (in, out, kh, kw) -> flipped HWIO of the dilated conv
    return value.transpose(2, 3, 0, 1)[::-1, ::-1]
  if kind == 'fuse':  # 1x1 Conv2d over the heads -> Dense
    return value[:, :, 0, 0].T
  return value.T if kind == 'dense' else value


@functools.cache
def _invpt_shapes(task_channels: tuple[tuple[str, int], ...], dim: int, head_channels,
                  prediction_channels) -> dict[tuple[str, ...], tuple[int, ...]]:
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from cmtdp_jax.models.invpt import InvPT  # pylint: disable=import-outside-toplevel

  class Taps(nn.Module):  # stands in for the ViT: four stride-16 maps of `dim` channels
    @nn.compact
    def __call__(self, images, train=False):
      return [jnp.zeros((images.shape[0], images.shape[1] // 16, images.shape[2] // 16, dim))] * 4

  model = InvPT(Taps(), task_channels, head_channels, prediction_channels)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(variables).items()}


def invpt_unused_keys(state_dict: Mapping[str, Any]) -> list[str]:
  """The keys of modules InvPT builds but its forward never reads (INVPT_UNUSED_PREFIXES)."""
  return [k for k in state_dict if k.startswith(INVPT_UNUSED_PREFIXES)
          and not k.endswith('num_batches_tracked')]


# Modules InvPT keeps one of per task (ModuleDicts, in p.TASKS.NAMES order): the order their
# keys come in is the task order, which the attention's per-task modules are numbered in.
_INVPT_TASK_DICTS = ('heads.', 'multi_task_decoder.preliminary_decoder.',
                     'multi_task_decoder.intermediate_head.', 'multi_task_decoder.invpt.mix_proj.',
                     'multi_task_decoder.invpt.mt_proj.')


def invpt_task_order(state_dict: Mapping[str, Any]) -> tuple[str, ...]:
  """InvPT's task order, read from the order of a state_dict's keys (torch.save keeps it).

  Raises CheckpointMismatchError when it cannot be read: no task modules, per-task modules
  that list the tasks in different orders, or keys in alphabetical order (a state_dict
  re-saved sorted; InvPT's orders, [semseg, depth, normals, edge] and [semseg,
  human_parts, sal, normals, edge], are not alphabetical).
  """
  orders = {}
  for prefix in _INVPT_TASK_DICTS:
    tasks = [k[len(prefix):].split('.', 1)[0] for k in state_dict if k.startswith(prefix)]
    orders[prefix] = tuple(dict.fromkeys(tasks))
  if not orders['heads.']:
    raise CheckpointMismatchError('no InvPT task heads (heads.<task>.linear_pred.*) in it')
  if len(set(orders.values())) > 1:
    raise CheckpointMismatchError(
        'its per-task modules list the tasks in different orders '
        f'({"; ".join(f"{p[:-1]}: {list(o)}" for p, o in orders.items())}), so the task order '
        'cannot be read from it')
  order = orders['heads.']
  if len(order) > 1 and sorted(state_dict) == list(state_dict):
    raise CheckpointMismatchError(
        'its keys are sorted alphabetically, so the task order cannot be read from it')
  return order


# Tasks InvPT predicts as a 2-class softmax (its NUM_OUTPUT['sal'] = 2) where ours, as
# ATRC, predict one logit: softmax(z)[1] = sigmoid(z1 - z0), so the two are folded exactly.
INVPT_TWO_CLASS_TASKS = ('sal',)


def _required(state_dict: Mapping[str, Any], key: str):
  """state_dict[key], or a CheckpointMismatchError naming the missing key."""
  if key not in state_dict:
    raise CheckpointMismatchError(f'missing {key}')
  return state_dict[key]


def fold_invpt_two_class_head(state_dict: Mapping[str, Any], task: str) -> dict[str, Any]:
  """`state_dict` with `task`'s 2-class heads made one-logit heads of the same function.

  The final and intermediate heads (1x1 convs) become z1 - z0. The intermediate prediction
  also feeds `mix_proj` (a 1x1 conv over [feature f, p0, p1], with p_k = w_k f + b_k):
  M_f f + M0 p0 + M1 p1 = (M_f + (M0 + M1) w0) f + M1 (p1 - p0) + (M0 + M1) b0, so
  mix_proj's feature weights and bias absorb p0 and its one prediction channel takes M1.
  Computed in float64.
  """
  state = dict(state_dict)
  f64 = lambda key: np.asarray(_required(state_dict, key), np.float64)
  for head in (f'heads.{task}.linear_pred', f'multi_task_decoder.intermediate_head.{task}'):
    weight, bias = f64(f'{head}.weight'), f64(f'{head}.bias')
    state[f'{head}.weight'] = (weight[1:] - weight[:1]).astype(np.float32)
    state[f'{head}.bias'] = (bias[1:] - bias[:1]).astype(np.float32)
  w0 = f64(f'multi_task_decoder.intermediate_head.{task}.weight')[0, :, 0, 0]
  b0 = f64(f'multi_task_decoder.intermediate_head.{task}.bias')[0]
  mix = f'multi_task_decoder.invpt.mix_proj.{task}.0'
  weight, bias = f64(f'{mix}.weight')[:, :, 0, 0], f64(f'{mix}.bias')
  m_f, m0, m1 = weight[:, :-2], weight[:, -2], weight[:, -1]
  folded = np.concatenate([m_f + np.outer(m0 + m1, w0), m1[:, None]], axis=1)
  state[f'{mix}.weight'] = folded[:, :, None, None].astype(np.float32)
  state[f'{mix}.bias'] = (bias + (m0 + m1) * b0).astype(np.float32)
  return state


def convert_invpt_state_dict(state_dict: Mapping[str, Any], arch: str,
                             tasks: Sequence[str] | None = None,
                             **backbone_kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
  """A whole InvPT TransformerNet state_dict (as in its released checkpoints, without
  DataParallel's 'module.') -> the `invpt` framework's variables on ViT `arch`.

  `tasks`: InvPT's task order, when `invpt_task_order` cannot read it from the keys.
  `backbone_kwargs`: the ViT's options where they differ from `arch`'s (the position grid,
  `img_size`, is read from a square grid; a non-square one, as NYUD's 448x576, must be
  given). `INVPT_TWO_CLASS_TASKS` with 2 outputs are folded to one logit
  (`fold_invpt_two_class_head`). Returns (variables, options): {'params', 'batch_stats'}
  of the whole model, and what a model must be built with to take them: 'task_channels'
  ((task, channels), ...) in the file's order, 'head_channels' (InvPT's embed_dim),
  'prediction_channels' (PRED_OUT_NUM_CONSTANT) and 'backbone_kwargs'. Raises
  CheckpointMismatchError naming every missing, unexpected or mis-shaped key;
  `invpt_unused_keys` are skipped.
  """
  if tasks:
    order = tuple(tasks)
    found = {k.split('.')[1] for k in state_dict if k.startswith('heads.')}
    if sorted(order) != sorted(found):
      raise CheckpointMismatchError(f'the tasks {list(order)} are not the checkpoint\'s '
                                    f'{sorted(found)}')
  else:
    order = invpt_task_order(state_dict)
  shape = lambda key: np.shape(_required(state_dict, key))
  for task in INVPT_TWO_CLASS_TASKS:
    if task in order and shape(f'heads.{task}.linear_pred.weight')[0] == 2:
      state_dict = fold_invpt_two_class_head(state_dict, task)
  channels = tuple((t, int(shape(f'heads.{t}.linear_pred.weight')[0])) for t in order)
  first = order[0]
  embed = int(shape(f'multi_task_decoder.intermediate_head.{first}.weight')[1])
  width = int(shape(f'multi_task_decoder.invpt.mix_proj.{first}.0.weight')[0])
  backbone_state = {k[len('backbone.'):]: v for k, v in state_dict.items()
                    if k.startswith('backbone.')}
  backbone_kwargs = {**checkpoint_options(arch, backbone_state), **backbone_kwargs}
  pos_embed = backbone_state.get('pos_embed')
  if 'img_size' not in backbone_kwargs and pos_embed is not None:
    raise CheckpointMismatchError(
        f'its position embedding has {np.shape(pos_embed)[1] - 1} positions, not a square '
        "grid, so the ViT's img_size must be given (InvPT's training size, 448x576 for NYUD)")
  backbone = convert_torch_state_dict(arch, backbone_state, pyramid='none', **backbone_kwargs)
  dim = int(np.shape(pos_embed)[-1])  # there: the backbone's conversion checked every key
  decoder = convert_invpt_decoder_state_dict(state_dict, channels, dim, embed, width - embed)
  variables = {'params': {'backbone': backbone['params'], **decoder['params']},
               'batch_stats': decoder['batch_stats']}
  options = {'task_channels': channels, 'head_channels': embed,
             'prediction_channels': width - embed, 'backbone_kwargs': backbone_kwargs}
  return variables, options


def convert_invpt_decoder_state_dict(state_dict: Mapping[str, Any],
                                     task_channels: Sequence[tuple[str, int]], dim: int,
                                     head_channels: int | None = None,
                                     prediction_channels: int | None = None) -> dict[str, Any]:
  """InvPT TransformerNet state_dict (numpy arrays) -> the `invpt` framework's variables
  except the backbone's.

  `task_channels` = ((task, output channels), ...) in InvPT's task order (p.TASKS.NAMES:
  the attention's per-task modules are numbered in it); `dim` is the ViT's width,
  `head_channels` / `prediction_channels` InvPT's embed_dim / PRED_OUT_NUM_CONSTANT (None:
  the framework's defaults, dim / 2 and dim / 16). Returns {'params': ...,
  'batch_stats': ...} to merge with the backbone's. 'backbone.*' keys (the ViT, timm's
  layout), num_batches_tracked and INVPT_UNUSED_PREFIXES are skipped. Raises
  CheckpointMismatchError naming every missing, unexpected or mis-shaped key on one line.
  """
  task_channels = tuple((str(t), int(c)) for t, c in task_channels)
  expected = _invpt_shapes(task_channels, int(dim), head_channels, prediction_channels)
  routes = {}
  for torch_path, ours, kind in _invpt_modules([t for t, _ in task_channels]):
    for leaf, flax_leaf in _INVPT_LEAVES[kind].items():
      collection = 'batch_stats' if flax_leaf in ('mean', 'var') else 'params'
      path = (collection, *ours, flax_leaf)
      if path in expected:
        routes[f'{torch_path}.{leaf}'] = (path, kind, leaf)
  flat, unexpected, misshaped = {}, [], []
  for key, value in state_dict.items():
    if (key.startswith('backbone.') or key.endswith('num_batches_tracked')
        or key.startswith(INVPT_UNUSED_PREFIXES)):
      continue
    if key not in routes:
      unexpected.append(key)
      continue
    path, kind, leaf = routes[key]
    value = _invpt_value(kind, leaf, np.asarray(value, np.float32))
    if value.shape != expected[path]:
      misshaped.append(f'{key} {tuple(np.shape(state_dict[key]))}')
    flat[path] = value
  missing = [k for k, (path, _, _) in routes.items() if path not in flat]
  missing += ['/'.join(p) for p in expected if p[1] != 'backbone' and p not in
              {route[0] for route in routes.values()}]
  if missing or unexpected or misshaped:
    raise CheckpointMismatchError(
        f'state_dict does not match invpt with tasks {task_channels} and dim {dim}: '
        f'missing {missing}; unexpected {unexpected}; mis-shaped {misshaped}')
  return traverse_util.unflatten_dict(flat)

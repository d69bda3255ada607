"""The ViT multi-task setup: TaskPrompter's configs and optimizer options, backbone
options that belong to one backbone, and the smoke command on a tiny ViT end to end.

(The `vit_mt` framework's structure is tested with the others in test_frameworks.py.)
"""

import functools
import importlib
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cmtdp_jax import config_lib, models, steps
from tests.test_cli import ROOT

VIT_CONFIGS = {'nyud_vitb_mt': ('nyud', 'vit_b16', (448, 576)),
               'nyud_vitl_mt': ('nyud', 'vit_l16', (448, 576)),
               'pascal_vitb_mt': ('pascal_context', 'vit_b16', (512, 512)),
               'pascal_vitl_mt': ('pascal_context', 'vit_l16', (512, 512))}


@pytest.mark.parametrize('name', sorted(VIT_CONFIGS))
def test_vit_configs_have_taskprompter_schedule(name):
  dataset, backbone, crop_size = VIT_CONFIGS[name]
  module = importlib.import_module(f'configs.{name}')
  assert f'--config configs/{name}.py' in module.__doc__
  config, regularized = module.get_config(), module.get_config('contrastive')
  assert (config.data.name, config.model.backbone, config.model.framework) == (
      dataset, backbone, 'vit_mt')
  assert tuple(config.data.crop_size) == crop_size
  assert (config.num_steps, config.batch_size) == (40_000, 8)
  assert dict(config.optim) == {'name': 'adam', 'lr': 2e-5, 'momentum': 0.9,
                                'weight_decay': 1e-6, 'schedule': 'poly', 'poly_power': 0.9,
                                'step_size': 0, 'step_gamma': 0.5, 'warmup_steps': 0,
                                'grad_clip': 10.0, 'zero_gradient_params': 'update'}
  assert dict(config.model.backbone_kwargs) == {'img_size': 384}
  assert config.model.backbone_kwargs_for == backbone
  assert not config.contrastive.enable and regularized.contrastive.enable
  config_lib.validate(config, 8)


def test_existing_configs_keep_their_optimizer():
  from configs import nyud_hrnet18_baseline  # pylint: disable=import-outside-toplevel
  optim = nyud_hrnet18_baseline.get_config().optim
  assert (optim.name, optim.lr, optim.weight_decay, optim.grad_clip) == ('sgd', 0.01, 5e-4, 0.0)


def optimizer(**fields):
  return ml_collections.ConfigDict({
      'name': 'adam', 'lr': 0.1, 'momentum': 0.9, 'weight_decay': 0.5, 'poly_power': 0.9,
      'warmup_steps': 0, 'grad_clip': 0.0, **fields})


def first_update(optim_config, grads, params):
  tx = steps.make_optimizer(optim_config, total_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  return np.asarray(updates)


def test_adam_adds_weight_decay_to_the_gradient_as_torch():
  """torch.optim.Adam's first step: g' = g + wd * p, update -lr * g' / (|g'| + eps)."""
  params, grads = jnp.array([1.0, -2.0, 0.5]), jnp.array([0.3, 0.4, -0.1])
  coupled = np.asarray(grads + 0.5 * params)
  np.testing.assert_allclose(first_update(optimizer(), grads, params),
                             -0.1 * coupled / (np.abs(coupled) + 1e-8), rtol=1e-4)


def test_grad_clip_scales_the_global_norm_before_the_decay():
  params, grads = jnp.zeros(2), jnp.array([30.0, 40.0])  # norm 50
  sgd = functools.partial(optimizer, name='sgd', momentum=0.0)
  np.testing.assert_allclose(first_update(sgd(grad_clip=10.0), grads, params), [-0.6, -0.8],
                             rtol=1e-6)
  np.testing.assert_allclose(first_update(sgd(), grads, params), [-3.0, -4.0], rtol=1e-6)
  small = jnp.array([3.0, 4.0])  # norm 5 < 10: untouched
  np.testing.assert_allclose(first_update(sgd(grad_clip=10.0), small, params), [-0.3, -0.4],
                             rtol=1e-6)


def test_bad_optimizer_fields_are_one_line_errors():
  with pytest.raises(ValueError, match="config.optim.name='lamb' is not one of sgd, adam, adamw"):
    steps.make_optimizer(optimizer(name='lamb'), 10)
  from tests.conftest import tiny_config  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=r'config.optim.grad_clip=-1.0 must be >= 0'):
    config_lib.validate(tiny_config(**{'optim.grad_clip': -1.0}), 8)
  with pytest.raises(ValueError, match="config.model.backbone_kwargs_for='vit'"):
    config_lib.validate(tiny_config(**{'model.backbone_kwargs_for': 'vit'}), 8)


def model_config(backbone, kwargs_for):
  return ml_collections.ConfigDict(dict(
      framework='vit_mt', backbone=backbone, backbone_kwargs={'width': 8, 'blocks': 1},
      backbone_kwargs_for=kwargs_for, head_channels=None, dtype='float32'))


def test_backbone_kwargs_apply_only_to_their_backbone():
  image = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  param_count = lambda model: sum(x.size for x in jax.tree.leaves(jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.key(0), image)['params']))
  vit = models.get_model(model_config('vit_s16', 'compact'), ('depth', 'edge'), {})
  assert vit.backbone.dim == 384 and vit.backbone.depth == 12  # vit_s16 as timm's, whole
  assert param_count(vit) > 22_000_000
  compact = models.get_model(model_config('compact', 'compact'), ('depth', 'edge'), {})
  assert compact.backbone.width == 8
  with pytest.raises(ValueError, match="backbone 'vit_s16' does not take the options"):
    models.get_model(model_config('vit_s16', ''), ('depth', 'edge'), {})


TINY_VIT = '''
from configs import synthetic

def get_config():
  config = synthetic.get_config('smoke')
  config.model.backbone_kwargs = {'dim': 32, 'depth': 2, 'num_heads': 2,
                                  'pyramid_channels': 16}
  config.model.backbone_kwargs_for = 'vit_s16'
  return config
'''


def test_smoke_command_on_a_tiny_vit_trains_resumes_and_evaluates(tmp_path, data_dir):
  """README's ViT smoke command with a 2-block ViT of width 32 instead of ViT-S, two
  tasks, a resume from step 2 and its evaluation at the end (--mode=eval is test_cli's)."""
  config_file = tmp_path / 'tiny_vit.py'
  config_file.write_text(TINY_VIT)
  workdir = tmp_path / 'run'

  def main(*flags):
    cmd = [sys.executable, '-m', 'cmtdp_jax.main', f'--config={config_file}',
           f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
           '--config.model.backbone=vit_s16', '--config.model.framework=vit_mt',
           '--config.contrastive.enable=True', "--config.tasks=('semseg','depth')",
           '--config.data.num_train=16',
           '--config.data.num_eval=8', '--config.checkpoint_every=2', '--config.log_every=1',
           *flags]
    env = dict(os.environ, JAX_NUM_CPU_DEVICES='2', TF_CPP_MIN_LOG_LEVEL='2',
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')])))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f'{proc.stdout}\n{proc.stderr[-4000:]}'
    return proc

  first = main('--config.num_steps=4')
  assert 'Training vit_mt' in first.stderr and 'step 4/4' in first.stdout
  assert 'contrastive' in first.stdout  # the regularizer's loss is logged
  # Resuming from step 2 runs the same train step (same num_steps, so the same learning
  # rate schedule), which the suite's XLA cache has compiled already.
  shutil.rmtree(workdir / 'checkpoints' / '4')
  os.remove(workdir / 'eval' / 'step_4.json')
  resumed = main('--config.num_steps=4')  # resumes, trains, then evaluates
  assert 'Resumed' in resumed.stderr and 'step 3/4' in resumed.stdout
  assert 'step 1/4' not in resumed.stdout
  assert 'Evaluation at step 4:' in resumed.stdout
  with open(workdir / 'eval' / 'step_4.json') as f:
    assert np.isfinite(json.load(f)['semseg/mIoU'])

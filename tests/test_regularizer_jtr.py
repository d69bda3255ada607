"""JTR's joint-task regularizer (`regularizers/jtr.py`) against the official code.

Parity runs without torch through tests/golden/jtr.npz: torch's float64 values of
`tests/golden/torch_jtr.py` (a transcription of KentoNishi/JTR-CVPR-2024's
regularizer and training loop) on fixed inputs, weights and Gumbel noise, two
labelled sets per image (regenerate with tests/golden/make_jtr_golden.py). The test
that runs the transcription itself skips without torch.

Tolerances. An array is compared by max |ours - golden| / max |golden|; an array
that is zero up to float64 noise in the golden (< 1e-6 of its group's largest:
view 2's prediction gradients, the gradients of the conv biases that a per-image
BN makes irrelevant) by max |ours| / its group's largest. Per-image parts are
compared through our batch-mean diagnostics.
  * float64 (the module run on float64 inputs and weights; the parity check of
    values and gradients): measured 7.0e-8 at worst (values; gradients 5.7e-8,
    per-image parts 1.1e-7), i.e. the golden's own rounding to float32.
    TOLERANCE = 1e-5, the issue's, is over 90x that, and far below what a real
    mistake gives (tried: Phi applied once instead of twice, the mask's count as
    the normaliser, no detach of labelled tasks, a soft Gumbel sample on view 1,
    an unshifted normals target: 3.4e-3 to 8).
  * float32 (the module as trained): the float32 noise floor of this computation
    is high. With BN over one image (as few as 8 pixels in the deepest stages) and
    26 conv-BN-ReLU layers, torch's own float32 run is 2.4e-7 (loss) to 3.7e-6 (a
    view distance) off the float64 values, its gradients 3e-5 (predictions) and
    2.5e-4 (parameters) off; and in every seed tried (8) some ReLU inputs lie
    within 3 float32 errors of 0 (the golden's 'relu' margin is 1.7), so a few
    gradient elements switch on or off: our float32 gradients measured up to
    3.1e-5 (predictions) and 1.3e-2 (parameters) off, which is float32 noise, not
    a bug, so gradients are checked in float64 only. Our float32 values measured 1.5e-6 at worst;
    FLOAT32_TOLERANCE = 2e-5 is 13x that and 5x torch's own worst.
"""

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmtdp_jax import tasks as tasks_lib
from cmtdp_jax.regularizers import jtr
from cmtdp_jax.regularizers.views import View

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), 'golden')
sys.path.insert(0, GOLDEN_DIR)
import make_jtr_golden  # noqa: E402  pylint: disable=wrong-import-position

TASKS = make_jtr_golden.TASKS
CASES = tuple(make_jtr_golden.CASES)
VALUES = ('loss', 'dist', 'recon', 'dist_view1', 'dist_view2')
TOLERANCE = 1e-5
FLOAT32_TOLERANCE = 2e-5
ZERO = 1e-6  # below this fraction of its group's largest, a golden array is zero


def module(**kwargs):
  return jtr.JTR(tasks=TASKS, input_channels=make_jtr_golden.CHANNELS,
                 widths=make_jtr_golden.WIDTHS, **kwargs)


@pytest.fixture(scope='module')
def golden():
  return make_jtr_golden.load()


def inputs_of(golden, dtype):
  """(params, predictions of views 1 and 2, labels of views 1 and 2, noise) in `dtype`."""
  cast = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)
  params = cast(make_jtr_golden.flax_params(golden, 'w.'))
  preds = [cast({t: golden[f'view{v}.{t}'] for t in TASKS}) for v in (1, 2)]
  labels = [{t: jnp.asarray(golden[f'label{v}.{t}']) if t == 'semseg'
             else jnp.asarray(golden[f'label{v}.{t}'], dtype) for t in TASKS} for v in (1, 2)]
  return params, preds, labels, {'semseg': jnp.asarray(golden['noise.semseg'], dtype)}


def labelled_of(golden, case):
  return {t: jnp.asarray(golden[f'{case}.labelled'][:, i]) for i, t in enumerate(TASKS)}


TRACES = []


@functools.partial(jax.jit, static_argnums=(0, 1))
def evaluate(jtr_module, grads, params, preds1, preds2, labels1, labels2, labelled, noise):
  """Loss and diagnostics; with `grads`, also the gradients the tests compare: of the
  loss, of the view-1 distance w.r.t. the params and of the view-2 terms w.r.t. the
  predictions, in one compiled function."""
  TRACES.append((preds1[TASKS[0]].dtype, grads))

  def run(params, preds1, preds2):
    views = (View(preds1, {}, labels1), View(preds1, {}, labels1), View(preds2, {}, labels2))
    return jtr_module.apply({'params': params}, views, labelled, None, gumbel_noise=noise)

  def term(name):
    return lambda *args: run(*args)[1][name]

  if not grads:
    return run(params, preds1, preds2)
  (loss, diagnostics), loss_grads = jax.value_and_grad(run, argnums=(0, 1, 2), has_aux=True)(
      params, preds1, preds2)
  view1_params = jax.grad(term('dist_view1'))(params, preds1, preds2)
  view2_preds = jax.grad(lambda *a: term('dist_view2')(*a) + term('recon')(*a),
                         argnums=(1, 2))(params, preds1, preds2)
  return loss, diagnostics, loss_grads, view1_params, view2_preds


def per_image_values(golden, case, batch_means, params, preds, labels, noise):
  """Each image's L_dist, L_recon and view distances: image 0's are our diagnostics
  (batch means) of a batch of image 0 twice (same shapes, so no new compile); image 1's
  follow from the two-image batch means."""
  twice = lambda tree: jax.tree.map(lambda a: a[np.array([0, 0])], tree)
  _, first = evaluate(module(), True, params, twice(preds[0]), twice(preds[1]),
                      twice(labels[0]), twice(labels[1]), twice(labelled_of(golden, case)),
                      {'semseg': noise['semseg'][:, np.array([0, 0])]})[:2]
  return {k: np.array([float(first[k]), 2 * float(batch_means[k]) - float(first[k])])
          for k in first}


@pytest.fixture(scope='module')
def results(golden):
  """dtype -> case -> on the golden inputs: in float64 our loss, diagnostics and
  gradients; in float32 (the module as trained) the loss and diagnostics."""
  out = {}
  for dtype in ('float64', 'float32'):
    with jax.enable_x64(dtype == 'float64'):
      params, preds, labels, noise = inputs_of(golden, dtype)
      out[dtype] = {case: jax.tree.map(np.asarray, evaluate(
          module(), dtype == 'float64', params, preds[0], preds[1], labels[0], labels[1],
          labelled_of(golden, case), noise)) for case in CASES}
  return out


def relative_errors(got: dict, want: dict) -> dict:
  """key -> max |got - want| / max |want|, or / the group's largest where want is ~0."""
  scale = max(np.abs(w).max() for w in want.values())
  errors = {}
  for key, w in want.items():
    own = np.abs(w).max()
    errors[key] = float(np.abs(np.asarray(got[key], np.float64) - w).max()
                        / (own if own > ZERO * scale else scale))
  return errors


def flat(tree, prefix=''):
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in flat(sub, f'{prefix}{key}/').items()}
  return {prefix.rstrip('/'): np.asarray(tree, np.float64)}


def golden_values(golden, case):
  """Golden loss and per-image parts; ours are per-batch means of the same parts."""
  return {k: golden[f'{case}.{k}'].astype(np.float64) for k in VALUES}


def golden_grads(golden, case):
  preds = {f'view{v}/{t}': golden[f'{case}.grad.view{v}.{t}'].astype(np.float64)
           for v in (1, 2) for t in TASKS}
  return preds, flat(make_jtr_golden.flax_params(golden, f'{case}.grad.w.'))


def our_values(result):
  loss, diagnostics = result[:2]
  return {'loss': loss, **diagnostics}


def our_grads(result):
  _, preds1, preds2 = result[2]
  preds = {f'view{v}/{t}': np.asarray(p[t], np.float64)
           for v, p in ((1, preds1), (2, preds2)) for t in TASKS}
  return preds, flat(result[2][0])


def check_values(golden, result, case, tolerance):
  """The loss, and the per-image parts through their batch means (our diagnostics)."""
  want = golden_values(golden, case)
  got = our_values(result)
  errors = {'loss': abs(float(got['loss']) - want['loss']) / abs(want['loss'])}
  for k in VALUES[1:]:
    errors[k] = abs(float(got[k]) - want[k].mean()) / abs(want[k].mean())
  assert max(errors.values()) <= tolerance, errors
  return errors


def test_values_match_golden_float64(golden, results):
  """Loss, L_dist, L_recon and the two view distances, per case, in float64."""
  for case in CASES:
    check_values(golden, results['float64'][case], case, TOLERANCE)


def test_per_image_parts_match_golden(golden, results):
  """Each image's L_dist, L_recon and view distances (the golden's per-image values)."""
  with jax.enable_x64(True):
    params, preds, labels, noise = inputs_of(golden, 'float64')
    for case in CASES:
      got = per_image_values(golden, case, results['float64'][case][1], params, preds,
                             labels, noise)
      want = golden_values(golden, case)
      for k in VALUES[1:]:
        np.testing.assert_allclose(got[k], want[k], rtol=TOLERANCE, err_msg=f'{case} {k}')


def test_gradients_match_golden_float64(golden, results):
  """d loss / d predictions of views 1 and 2 and d loss / d JTR params, per case."""
  for case in CASES:
    result = results['float64'][case]
    for got, want in zip(our_grads(result), golden_grads(golden, case)):
      assert set(got) == set(want)
      errors = relative_errors(got, want)
      assert max(errors.values()) <= TOLERANCE, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


def test_labelled_predictions_get_no_gradient(golden, results):
  """A labelled task's prediction is detached on that image (view 1), and view 2's
  predictions get no gradient at all; an unlabelled one's gets some."""
  for case in CASES:
    preds, _ = our_grads(results['float64'][case])
    kept = golden[f'{case}.labelled']
    for i, task in enumerate(TASKS):
      assert not np.any(preds[f'view2/{task}'])
      for b in range(kept.shape[0]):
        grad = preds[f'view1/{task}'][b]
        assert (not np.any(grad)) if kept[b, i] else np.any(grad), (case, task, b)


def test_frozen_copy_and_detached_view_2(results):
  """The view-1 term gives the JTR params no gradient (the reference's deep copy); the
  view-2 terms give the predictions none (their maps are detached) but do train the
  network."""
  for case in CASES:
    result = results['float64'][case]
    view1_params, view2_preds = result[3], result[4]
    assert not any(np.any(g) for g in jax.tree.leaves(view1_params))
    assert not any(np.any(g) for g in jax.tree.leaves(view2_preds))
    assert any(np.any(g) for g in jax.tree.leaves(result[2][0]))


def test_float32_matches_golden(golden, results):
  """The module as trained (float32): loss and parts within FLOAT32_TOLERANCE."""
  for case in CASES:
    check_values(golden, results['float32'][case], case, FLOAT32_TOLERANCE)


def test_jit_compiles_once(golden, results):
  """Both cases (different labelled sets) ran through one trace per dtype; the random
  path (noise drawn from rng) compiles once for different keys and labelled sets too."""
  del golden, results
  assert len(TRACES) == len(set(TRACES)) == 2, TRACES  # float64 with grads, float32
  rng = np.random.default_rng(1)
  shape = (2, 8, 8)
  preds = [{'semseg': jnp.asarray(rng.normal(0, 2, shape + (3,)), jnp.float32),
            'depth': jnp.asarray(rng.normal(2.4, 1.5, shape + (1,)), jnp.float32)}
           for _ in range(2)]
  labels = [{'semseg': jnp.asarray(rng.integers(0, 3, shape), jnp.int32),
             'depth': jnp.asarray(rng.uniform(0.5, 6, shape), jnp.float32)} for _ in range(2)]
  views = (View(preds[0], {}, labels[0]), View(preds[0], {}, labels[0]),
           View(preds[1], {}, labels[1]))
  small = jtr.JTR(tasks=('semseg', 'depth'), input_channels=(3, 1), widths=(2,))
  traces = []

  @jax.jit
  def run(rng, labelled):
    traces.append(1)
    params = small.init(jax.random.key(0), views, None, rng)['params']
    return small.apply({'params': params}, views, labelled, rng)

  losses = [run(jax.random.key(seed), {'semseg': jnp.array(s), 'depth': jnp.array(d)})[0]
            for seed, s, d in ((0, [True, False], [False, True]), (1, [False, False], [True, True]),
                               (2, [True, False], [False, True]))]
  assert len(traces) == 1
  assert all(np.isfinite(float(x)) for x in losses)
  assert float(losses[0]) != float(losses[2])  # the same but for the Gumbel noise


def test_binary_categorical_task_is_two_classes():
  """A binary task (sal: one logit x, labels 0/1/255) is the 2-class task [0, x]: same
  loss, and its gradient is that of the second class; init works with labelled=None.
  (A one-stage network: any number of 2x2 pools works.)"""
  batch, size, widths = 2, 8, (2,)
  rng = np.random.default_rng(0)
  logit = jnp.asarray(rng.normal(0, 2, (2, batch, size, size, 1)), jnp.float32)
  labels = jnp.asarray(np.where(rng.random((2, batch, size, size)) < 0.2, 255,
                                rng.integers(0, 2, (2, batch, size, size))), jnp.int32)
  depth = jnp.asarray(rng.normal(2.4, 1.5, (2, batch, size, size, 1)), jnp.float32)
  depth_labels = jnp.asarray(rng.uniform(0.5, 6, (2, batch, size, size)), jnp.float32)
  noise = jnp.asarray(rng.gumbel(size=(5, batch, size, size, 2)), jnp.float32)
  labelled = jnp.array([True, False])
  assert tasks_lib.get_task('sal').channels == 1

  def build(task):
    return jtr.JTR(tasks=(task, 'depth'), input_channels=(2, 1), widths=widths)

  def views(task, raw):
    return tuple(View({task: raw[v], 'depth': depth[v]}, {},
                      {task: labels[v], 'depth': depth_labels[v]}) for v in (0, 0, 1))

  @jax.jit
  def both(logit):
    params = build('sal').init(jax.random.key(0), views('sal', logit), None,
                               jax.random.key(1))['params']

    def loss(task, raw):
      return build(task).apply({'params': params}, views(task, raw),
                               {task: labelled, 'depth': ~labelled}, None,
                               gumbel_noise={task: noise})[0]
    two_class = jnp.concatenate([jnp.zeros_like(logit), logit], axis=-1)
    return (jax.value_and_grad(functools.partial(loss, 'sal'))(logit),
            jax.value_and_grad(functools.partial(loss, 'semseg'))(two_class))

  (binary, grad_binary), (semseg, grad_semseg) = both(logit)
  np.testing.assert_allclose(float(binary), float(semseg), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad_binary[..., 0]), np.asarray(grad_semseg[..., 1]),
                             rtol=1e-5, atol=1e-9)
  # View 1: sal is labelled (detached) on image 0 only; view 2: never a gradient.
  assert not np.any(np.asarray(grad_binary[0, 0])) and np.any(np.asarray(grad_binary[0, 1]))
  assert not np.any(np.asarray(grad_binary[1]))


def test_pytorch_reference_live(golden):
  """The transcription reproduces the golden (case 'a', float64), so jtr.npz is what
  torch_jtr.py computes."""
  torch = pytest.importorskip('torch', reason='running the PyTorch reference needs torch')
  import torch_jtr  # pylint: disable=import-outside-toplevel
  inputs = {k: golden[k] for k in golden if k.startswith(('view', 'label', 'noise'))}
  state = {k[2:]: golden[k] for k in golden if k.startswith('w.')}
  model = torch_jtr.SegNetJTR(make_jtr_golden.CHANNELS, make_jtr_golden.WIDTHS)
  full = {k: v.numpy() for k, v in model.state_dict().items()}
  full.update(state)
  values, _ = make_jtr_golden.run(inputs, full, make_jtr_golden.CASES['a'], torch.float64)
  for key, value in values.items():
    want = golden[f'a.{key}'].astype(np.float64)
    scale = max(np.abs(want).max(), 1e-30)
    assert np.abs(value - want).max() / scale <= 1e-6 or np.abs(value - want).max() < 1e-12, key
  assert json.loads(str(golden['margins']))['pools'] >= make_jtr_golden.MARGIN

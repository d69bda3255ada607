"""MTPSL's cross-task consistency regularizer (`regularizers.mtpsl`).

Parity against PyTorch runs without torch through tests/golden/mtpsl.npz, written
by tests/golden/make_mtpsl_golden.py from `torch_mtpsl`, a transcription of
MTPSL's model/mapfns.py: the loss, its gradient with respect to the raw
predictions (through the straight-through Gumbel sample, the depth maximum, the
normals' normalisation) and with respect to every mapping-network parameter, on
fixed inputs, weights (random FiLM tables and BN affines) and Gumbel draws. The
test that reruns the PyTorch reference skips when torch is missing.

Errors are relative to each array's largest entry (max |ours - golden| /
max |golden|): many gradient entries are ~0 (pixels near no maximum, labelled
tasks' predictions), where an entrywise relative error means nothing. The golden
values are float64 computations stored as float32 (gradients).

  * float64 (jax x64), the parity requirement: within TOLERANCE = 1e-5. Measured:
    loss 0 to 1.4e-15, gradients (predictions and parameters) 2e-8 to 5.3e-8: the
    float32 rounding of the stored golden gradients.
  * float32, the training precision: the computation's own float32 noise is large
    here (13 conv-BN-FiLM-ReLU layers, BN over few positions, cosines of 8-channel
    vectors): torch's float32 run is 4.1e-5 ('full') and 6.4e-5 ('partial') off on
    the prediction gradients, 4.5e-5 on the parameters', 2.5e-7 to 7.1e-7 on the loss
    (make_mtpsl_golden.py prints these; 1e-5 to 6e-5 on other seeds); ours (XLA CPU,
    'full') 4.9e-5 on both gradients, 4e-7 on the loss. Checked on 'full' at
    FLOAT32_TOLERANCE 3e-4 (gradients) and 1e-5 (loss). A Gumbel argmax, max-pool or
    ReLU that flips is 2e-2 to 1e-1, a wrong pair order or layout far more.
"""

import functools
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmtdp_jax.regularizers import layers, mtpsl
from cmtdp_jax.regularizers.views import View

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), 'golden')
sys.path.insert(0, GOLDEN_DIR)
import make_mtpsl_golden as golden_lib  # noqa: E402  pylint: disable=wrong-import-position

TOLERANCE = 1e-5
FLOAT32_TOLERANCE = 3e-4
FLOAT32_LOSS_TOLERANCE = 1e-5
SETTINGS = [('nyu', 'partial'), ('nyu', 'full')]


@pytest.fixture(scope='module')
def golden():
  return golden_lib.load()


def case_setup(golden, case, setting, dtype):
  """(module, params, predictions, bottleneck, labels, labelled, noise) of a golden case."""
  names, channels, widths, _, settings = golden_lib.CASES[case]
  inputs = golden_lib.case_inputs(case, int(golden[f'{case}.input_seed']))
  np.testing.assert_allclose(golden_lib.input_sums(inputs), golden[f'{case}.input_sums'],
                             rtol=1e-6, err_msg='NumPy draws other inputs than when the '
                             'golden file was written: rerun make_mtpsl_golden.py')
  state = golden_lib.random_state_dict(golden_lib.stored_key_shapes(golden, case),
                                       int(golden[f'{case}.weight_seed']))
  params = jax.tree.map(lambda v: jnp.asarray(v, dtype), golden_lib.flax_params(state))
  predictions = {t: jnp.asarray(inputs[f'pred.{t}'], dtype) for t in names}
  labels = {t: jnp.asarray(inputs[f'label.{t}'], jnp.int32 if inputs[f'label.{t}'].dtype ==
                           np.int32 else dtype) for t in names}
  noise = {t: jnp.asarray(inputs[f'noise.{t}'], dtype) for t in names if f'noise.{t}' in inputs}
  labelled = settings[setting]
  if labelled is not None:
    labelled = {t: jnp.asarray(np.array(labelled, bool)[:, i]) for i, t in enumerate(names)}
  module = mtpsl.MTPSL(tasks=names, input_channels=channels, widths=widths,
                       reg_weight=golden_lib.REG_WEIGHT)
  return (module, params, predictions, jnp.asarray(inputs['bottleneck'], dtype), labels,
          labelled, noise)


def loss_and_grads(golden, case, setting, dtype):
  """Our loss, diagnostics and gradients (params, predictions, bottleneck), as numpy."""
  module, params, predictions, bottleneck, labels, labelled, noise = case_setup(
      golden, case, setting, dtype)

  def loss_fn(p, preds, feat):
    view = View(preds, {}, labels, feat)
    return module.apply({'params': p}, (None, view), labelled, None, gumbel_noise=noise)

  (loss, diagnostics), grads = jax.jit(
      jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True))(params, predictions,
                                                                    bottleneck)
  return jax.device_get((loss, diagnostics, grads))


@pytest.fixture(scope='module')
def x64_results(golden):
  with jax.enable_x64(True):
    return {(case, setting): loss_and_grads(golden, case, setting, jnp.float64)
            for case, setting in SETTINGS}


def errors(golden, case, setting, result):
  """Relative errors of (loss, {task: d/d prediction}, {param path: d/d param})."""
  loss, _, (param_grads, pred_grads, _) = result
  prefix = f'{case}.{setting}'
  want_loss = float(golden[f'{prefix}.loss'])
  pred_errors = {t: golden_lib.relative_error(pred_grads[t], golden[f'{prefix}.grad.{t}'])
                 for t in golden_lib.CASES[case][0]}
  keys = golden_lib.stored_key_shapes(golden, case)
  want = golden_lib.flax_params({k: golden[f'{prefix}.pgrad.{k}'] for k in keys})
  got = dict(jax.tree_util.tree_flatten_with_path(param_grads)[0])
  param_errors = {}
  for path, value in jax.tree_util.tree_flatten_with_path(want)[0]:
    diff = np.max(np.abs(np.asarray(got[path], np.float64) - value))
    scale = np.max(np.abs(value))
    siblings = _subtree(want, path[:-1])
    if path[-1].key == 'bias' and 'kernel' in siblings:
      # A conv bias (every conv here is followed by a BN): its exact gradient is 0 (BN
      # removes any constant shift), computed as rounding noise; compared at the scale
      # of its conv's kernel gradient.
      scale = max(scale, np.max(np.abs(siblings['kernel'])))
    param_errors[jax.tree_util.keystr(path)] = float(diff / scale)
  return abs(float(loss) - want_loss) / abs(want_loss), pred_errors, param_errors


def _subtree(tree, path):
  for entry in path:
    tree = tree[entry.key]
  return tree


def _paths(tree):
  return {tuple(k.key for k in path): np.shape(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize('case,setting', SETTINGS)
def test_float64_parity(golden, x64_results, case, setting):
  """Loss, d/d predictions and d/d every parameter equal torch's to 1e-5 (float64)."""
  loss_error, pred_errors, param_errors = errors(golden, case, setting,
                                                 x64_results[case, setting])
  assert loss_error < TOLERANCE
  assert max(pred_errors.values()) < TOLERANCE, pred_errors
  assert max(param_errors.values()) < TOLERANCE, max(param_errors.items(), key=lambda kv: kv[1])
  # Every parameter of MTPSL's layout was compared.
  assert len(param_errors) == len(golden_lib.stored_key_shapes(golden, case))


def test_float32_parity(golden):
  """The training precision: float32 within its measured noise (module docstring)."""
  loss_error, pred_errors, param_errors = errors(
      golden, 'nyu', 'full', loss_and_grads(golden, 'nyu', 'full', jnp.float32))
  assert loss_error < FLOAT32_LOSS_TOLERANCE
  assert max(pred_errors.values()) < FLOAT32_TOLERANCE, pred_errors
  assert max(param_errors.values()) < FLOAT32_TOLERANCE, max(param_errors.items(),
                                                             key=lambda kv: kv[1])


def test_stop_gradients_and_pairs(x64_results):
  """The bottleneck gets no gradient; a task labelled on an image is only ever a target
  there, so its prediction gets none on that image (its labels are the map); pairs counted."""
  for (case, setting), (_, diagnostics, (_, pred_grads, feat_grad)) in x64_results.items():
    assert not np.any(feat_grad), case
    names, _, _, (batch, _, _), settings = golden_lib.CASES[case]
    labelled = settings[setting]
    kept = np.ones((batch, len(names)), bool) if labelled is None else np.array(labelled, bool)
    for i, task in enumerate(names):
      for b in range(batch):
        source = labelled is None or not kept[b, i]
        assert np.any(pred_grads[task][b]) == source, (case, setting, task, b)
    want_pairs = (len(names) * (len(names) - 1) if labelled is None else
                  np.mean(np.sum(~kept, 1) * np.sum(kept, 1)))
    assert diagnostics['pairs'] == pytest.approx(want_pairs)
    assert set(diagnostics) == {'pairs', 'consistency', 'regularization'}
    assert all(v.dtype == np.float32 and v.shape == () for v in diagnostics.values())


def test_partial_batches_run_only_the_pair_slots(golden):
  """With `labelled` given, each image sends floor(T^2/4) pairs through the mapping network
  (its active ones among them; the parity tests above check that nothing else changes),
  not all T(T-1); MTPSL's 'full' setting sends all of them."""
  names, _, _, (batch, _, _), _ = golden_lib.CASES['nyu']
  num_tasks = len(names)
  assert [mtpsl.pair_slots(t, True) for t in range(2, 7)] == [1, 2, 4, 6, 9]
  assert max(l * (num_tasks - l) for l in range(num_tasks + 1)) == mtpsl.pair_slots(num_tasks,
                                                                                    True)
  for setting, pairs in (('partial', 4), ('full', num_tasks * (num_tasks - 1))):
    module, params, predictions, bottleneck, labels, labelled, noise = case_setup(
        golden, 'nyu', setting, jnp.float32)
    _, state = jax.eval_shape(functools.partial(
        module.apply, capture_intermediates=lambda m, _: m.name == 'encoder_block_0'),
        {'params': params}, (None, View(predictions, {}, labels, bottleneck)), labelled, None,
        gumbel_noise=noise)
    (first,) = state['intermediates']['encoder_block_0']['__call__']
    assert first.shape[0] == batch * 2 * pairs, setting


def test_one_label_batches_run_the_fewer_slots_with_the_same_loss(golden):
  """`max_labels=1` (one-label training) runs T-1 slots per image, and maps one Gumbel draw
  of each categorical prediction rather than T-1, with the loss and the gradients of the
  floor(T^2/4) slots and all draws (x64: the same terms, summed over other zeros); an
  image with more labels than that makes the loss NaN (its gradient stays finite: the train
  step rejects the step by its loss) rather than drop its pairs or reuse a draw, also when
  its pairs would fit the slots."""
  names, _, _, (batch, _, _), _ = golden_lib.CASES['nyu']
  num_tasks = len(names)
  assert [mtpsl.pair_slots(6, True, most) for most in (1, 2, 3, 6, None)] == [5, 8, 9, 9, 9]
  assert mtpsl.pair_slots(6, False, 1) == 30
  one_label = {t: jnp.asarray([t == 'depth', t == 'edge']) for t in names}
  with jax.enable_x64(True):
    module, params, predictions, bottleneck, labels, two_labels, noise = case_setup(
        golden, 'nyu', 'partial', jnp.float64)
    fewer = module.clone(max_labels=1)

    def loss_fn(mod, labelled, p, preds):
      view = View(preds, {}, labels, bottleneck)
      return mod.apply({'params': p}, (None, view), labelled, None, gumbel_noise=noise)[0]

    grad = jax.jit(jax.value_and_grad(loss_fn, argnums=(2, 3)), static_argnums=0)
    # max_labels 2 (a derived label): image 1 keeps 2, so 2 draws of semseg and 4 slots.
    for bounded, labelled in ((fewer, one_label), (module.clone(max_labels=2), two_labels)):
      want = grad(module, labelled, params, predictions)
      got = grad(bounded, labelled, params, predictions)
      np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
      # Gradients to 1e-12 of the largest entry: float64 sums of ~10^3 terms in another
      # order are ~1e-13 apart, and the conv biases' exact gradient, 0, is 1e-16 noise.
      scale = max(np.max(np.abs(g)) for g in jax.tree.leaves(want[1]))
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * scale),
                   got[1], want[1])
      assert np.isfinite(want[0]) and want[0] > 0
    # Image 1 keeps 2 (4 pairs, 3 slots); image 0 keeps 3 (3 pairs fit 3 slots, but semseg
    # would need 3 draws).
    three_labels = {t: jnp.asarray([t != 'semseg', t == 'normals']) for t in names}
    for labelled in (two_labels, three_labels):
      over_loss, over_grads = grad(fewer, labelled, params, predictions)
      assert np.isnan(over_loss)
      assert all(np.isfinite(g).all() for g in jax.tree.leaves(over_grads))
    inputs = {}
    for mod in (module, fewer):
      _, state = jax.eval_shape(functools.partial(
          mod.apply, capture_intermediates=lambda m, _: m.name in (
              'encoder_block_0', 'pred_encoder_source_0_0')),
          {'params': params}, (None, View(predictions, {}, labels, bottleneck)), one_label,
          None, gumbel_noise=noise)
      inputs[mod.max_labels] = {name: [x.shape[0] for x in calls['__call__']]
                                for name, calls in state['intermediates'].items()}
  assert mtpsl.input_kind(names[0]) == mtpsl.CATEGORICAL
  # The encoder's inputs; semseg's input conv: its predictions' draws, then its labels.
  assert inputs[1] == {'encoder_block_0': [batch * 2 * (num_tasks - 1)],
                       'pred_encoder_source_0_0': [batch, batch]}
  assert inputs[None] == {'encoder_block_0': [batch * 2 * mtpsl.pair_slots(num_tasks, True)],
                          'pred_encoder_source_0_0': [batch * (num_tasks - 1), batch]}
  assert [mtpsl.source_draws(6, True, most) for most in (1, 2, 6, None)] == [1, 2, 5, 5]
  assert mtpsl.source_draws(6, False, 1) == 5
  with pytest.raises(ValueError, match='max_labels must be >= 1'):
    mtpsl.MTPSL(tasks=names, input_channels=module.input_channels, max_labels=0)


def test_pair_index_is_the_flatten_trick():
  """MTPSL: A = zeros(T, T); A[s, t] = 1; A.flatten()[:-1].view(T-1, T+1)[:, 1:].flatten()."""
  for num_tasks in range(2, 7):
    order = []
    for s, t in mtpsl.ordered_pairs(num_tasks):
      a = np.zeros((num_tasks, num_tasks))
      a[s, t] = 1.0
      code = a.flatten()[:-1].reshape(num_tasks - 1, num_tasks + 1)[:, 1:].flatten()
      assert code.shape == (mtpsl.num_pairs(num_tasks),) and code.sum() == 1
      order.append(int(np.argmax(code)))
      assert mtpsl.pair_index(s, t, num_tasks) == order[-1]
    assert order == list(range(mtpsl.num_pairs(num_tasks)))
  assert [mtpsl.pair_index(s, t, 3) for s, t in [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]] \
      == list(range(6))
  with pytest.raises(ValueError):
    mtpsl.pair_index(1, 1, 3)


def test_param_layout_and_film_params(golden):
  """Our init has exactly the converted MTPSL layout; film_params picks its gamma/beta tables."""
  for case in golden_lib.CASES:
    module, params, predictions, bottleneck, labels, _, noise = case_setup(
        golden, case, 'partial', jnp.float32)
    view = View(predictions, {}, labels, bottleneck)
    variables = jax.eval_shape(module.init, jax.random.key(0), (None, view), None,
                               jax.random.key(1))
    assert set(variables) == {'params'}  # no batch_stats: BN is per image, in train mode
    assert _paths(variables['params']) == _paths(params)
    paths = list(_paths(variables['params']))
    film = [p for p in paths if mtpsl.film_params(p)]
    conv_tasks = {p[0] for p in paths if p[0].startswith(('encoder_block', 'conv_block_enc'))}
    assert len(film) == 2 * len(conv_tasks) and {p[-1] for p in film} == {'gamma', 'beta'}
    num_tasks = len(golden_lib.CASES[case][0])
    assert all(_paths(variables['params'])[p][0] == mtpsl.num_pairs(num_tasks) for p in film)
  leaves = jax.tree_util.tree_flatten_with_path(variables['params'])[0]
  assert sum(mtpsl.film_params(path) for path, _ in leaves) == len(film)  # JAX key entries too
  assert not mtpsl.film_params(('encoder_block_0', 'bn', 'bias'))


def test_jit_compiles_once_with_drawn_noise():
  """Edge (binary) with drawn Gumbel noise: one trace for other masks, noise and values."""
  names, channels, widths = ('edge', 'depth', 'normals'), (2, 1, 3), (2, 4, 4)
  module = mtpsl.MTPSL(tasks=names, input_channels=channels, widths=widths)
  rng = np.random.default_rng(0)
  batch, height, width = 3, 16, 8

  def view(seed):
    r = np.random.default_rng(seed)
    preds = {'edge': r.standard_normal((batch, height, width, 1)),
             'depth': r.uniform(0.5, 3.0, (batch, height, width, 1)),
             'normals': r.standard_normal((batch, height, width, 3))}
    labels = {'edge': r.integers(0, 2, (batch, height, width)).astype(np.int32),
              'depth': r.uniform(0.0, 3.0, (batch, height, width)),
              'normals': r.standard_normal((batch, height, width, 3))}
    feat = np.abs(r.standard_normal((batch, 2, 1, 4)))
    return View(*(jax.tree.map(lambda x: jnp.asarray(x, x.dtype if x.dtype == np.int32
                                                     else jnp.float32), d)
                  for d in (preds, {}, labels, feat)))

  params = jax.jit(module.init)(jax.random.key(0), (None, view(0)), None,
                                jax.random.key(1))['params']
  traces = []

  @jax.jit
  def step(p, v, labelled, key):
    traces.append(None)
    return module.apply({'params': p}, (None, v), labelled, key)

  for seed in range(3):
    kept = rng.random((batch, len(names))) < 0.5
    labelled = {t: jnp.asarray(kept[:, i]) for i, t in enumerate(names)}
    loss, diagnostics = step(params, view(seed), labelled, jax.random.key(seed))
    pairs = np.mean(np.sum(~kept, 1) * np.sum(kept, 1))
    assert np.isfinite(loss) and float(diagnostics['pairs']) == pytest.approx(pairs)
    assert (float(loss) > 0) == (pairs > 0)
  # Different keys draw different Gumbel samples of the binary task (unlabelled on image 0).
  labelled = {'edge': jnp.array([False, True, True]), 'depth': jnp.array([True, False, True]),
              'normals': jnp.array([True, True, False])}
  losses = [float(step(params, view(0), labelled, jax.random.key(k))[0]) for k in (0, 1)]
  assert losses[0] != losses[1]
  assert len(traces) == 1


def test_gumbel_hard_is_straight_through():
  logits = jnp.array([[0.3, 1.2, -0.5], [2.0, 0.1, 0.0]])
  noise = jnp.array([[0.1, -0.2, 0.4], [-1.5, 0.2, 0.9]])
  sample = mtpsl.gumbel_hard(logits, noise)
  # Forward: one-hot up to the rounding of hard - soft + soft (as torch's).
  np.testing.assert_allclose(sample, [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], atol=1e-6)
  weights = jnp.array([[1.0, -2.0, 0.5], [0.3, 0.7, -1.0]])
  soft = lambda x: jnp.sum(jax.nn.softmax(x + noise, axis=-1) * weights)  # noqa: E731
  np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(mtpsl.gumbel_hard(x, noise) * weights))(
      logits), jax.grad(soft)(logits), rtol=1e-6)


def test_conv3x3_is_nn_conv_with_its_kernel_gradient_summed_in_another_order():
  """MTPSL's convs (`layers.Conv3x3`): nn.Conv's parameters, value and input gradient exactly;
  on CPU the kernel gradient is nine matmuls (the lowered gradient has two convolutions, not
  three), the same sum as XLA's in another order. float64, so the orders differ by rounding
  only: sums of 3 * 6 * 8 = 144 terms of size ~1 round at ~1e-14, far inside 1e-10; a wrong
  tap or a transposed kernel is off by O(1)."""
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 6, 8, 4)))
    ours = layers.Conv3x3(5, kernel_init=mtpsl.CONV_INIT)
    reference = nn.Conv(5, (3, 3), padding=((1, 1), (1, 1)), kernel_init=mtpsl.CONV_INIT)
    params = reference.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(
        jnp.shape, params)
    params = jax.tree.map(lambda v: v + 0.1, params)  # a nonzero bias
    np.testing.assert_array_equal(ours.apply(params, x), reference.apply(params, x))

    def grads(module):
      loss = lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))  # noqa: E731
      step = jax.jit(jax.grad(loss, argnums=(0, 1)))
      return step(params, x), step.lower(params, x).as_text().count('stablehlo.convolution')

    (ours_params, ours_input), ours_convs = grads(ours)
    (want_params, want_input), want_convs = grads(reference)
    assert (ours_convs, want_convs) == (2, 3)
    np.testing.assert_array_equal(ours_input, want_input)
    np.testing.assert_array_equal(ours_params['params']['bias'], want_params['params']['bias'])
    np.testing.assert_allclose(ours_params['params']['kernel'], want_params['params']['kernel'],
                               rtol=1e-10, atol=1e-10)


def test_cosine_similarity_is_torchs():
  """torch 2.x: each vector divided by max(norm, eps) first; a zero vector gives 0 and a
  finite gradient (torch 2.13: 1e12 * the other unit vector)."""
  a = jnp.array([[3.0, 4.0], [1e-7, 0.0], [0.0, 0.0]])
  b = jnp.array([[4.0, 3.0], [1e-7, 1e-7], [0.6, 0.8]])
  np.testing.assert_allclose(mtpsl.cosine_similarity(a, b), [0.96, 2 ** -0.5, 0.0], rtol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(mtpsl.cosine_similarity(x, b)))(a)
  np.testing.assert_allclose(grad[2], [0.6e12, 0.8e12], rtol=1e-6)


def test_bad_shapes_are_refused(golden):
  module, params, predictions, bottleneck, labels, labelled, _ = case_setup(
      golden, 'nyu', 'partial', jnp.float32)
  small = mtpsl.MTPSL(tasks=module.tasks, input_channels=module.input_channels, widths=(4, 8))
  with pytest.raises(ValueError, match='the bottleneck is'):
    jax.eval_shape(small.init, jax.random.key(0), (None, View(predictions, {}, labels, bottleneck)),
                   labelled, jax.random.key(1))
  with pytest.raises(ValueError, match='bottleneck'):
    jax.eval_shape(module.init, jax.random.key(0), (None, View(predictions, {}, labels)),
                   labelled, jax.random.key(1))
  with pytest.raises(ValueError, match='input channels'):
    mtpsl.MTPSL(tasks=('edge', 'depth'), input_channels=(1, 1))


def test_against_live_pytorch(golden):
  """Reruns the PyTorch transcription: the golden file is what it computes today, its
  Gumbel sample is torch's F.gumbel_softmax given the same draws, and torch's
  F.cosine_similarity is the formula `mtpsl.cosine_similarity` follows."""
  torch = pytest.importorskip('torch', reason='rerunning the PyTorch reference needs torch '
                              '(mtpsl.npz stands in for it)')
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  assert golden_lib.check_gumbel_transcription() == 0.0
  for case, (_, _, _, _, settings) in golden_lib.CASES.items():
    state = golden_lib.random_state_dict(golden_lib.stored_key_shapes(golden, case),
                                         int(golden[f'{case}.weight_seed']))
    inputs = golden_lib.case_inputs(case, int(golden[f'{case}.input_seed']))
    for setting, labelled in settings.items():
      loss, grads, pgrads = golden_lib.run(case, state, inputs, labelled, torch.float64)
      prefix = f'{case}.{setting}'
      assert loss == pytest.approx(float(golden[f'{prefix}.loss']), rel=1e-12)
      for task, grad in grads.items():  # stored as float32
        assert golden_lib.relative_error(golden[f'{prefix}.grad.{task}'], grad) < 1e-7
      for key, grad in pgrads.items():
        if not golden_lib.conv_bias_before_norm(key):
          assert golden_lib.relative_error(golden[f'{prefix}.pgrad.{key}'], grad) < 1e-7
  x = torch.tensor([[3.0, 4.0], [1e-7, 0.0], [0.0, 0.0]], dtype=torch.float64,
                   requires_grad=True)
  y = torch.tensor([[4.0, 3.0], [1e-7, 1e-7], [0.6, 0.8]], dtype=torch.float64)
  F.cosine_similarity(x, y, dim=1, eps=1e-12).sum().backward()
  with jax.enable_x64(True):
    ours = jax.value_and_grad(lambda a: jnp.sum(mtpsl.cosine_similarity(a, jnp.asarray(
        y.numpy()))))(jnp.asarray(x.detach().numpy()))
  want = F.cosine_similarity(x, y, dim=1, eps=1e-12).sum().detach()
  np.testing.assert_allclose(float(ours[0]), float(want), rtol=1e-12)
  np.testing.assert_allclose(np.asarray(ours[1]), x.grad.numpy(), rtol=1e-9)

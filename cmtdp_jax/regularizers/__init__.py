"""Cross-task regularizers by name: ours, MTPSL's and JTR's, behind one call.

`config.regularizer.name` picks one ('' = none; `config.contrastive.enable=True`
still means 'cmtdp'); `config.regularizer.weight` is its weight in the total
loss (None = the method's published one); its options live under
`config.regularizer.<name>` (ours under `config.contrastive`, as before).

  cmtdp  ours (Yang, Ye, Xu, AAAI 2023; `contrastive.Cmtdp`): a triplet loss on
         each target's projected decoder features, pairs from a source's labels.
  mtpsl  MTPSL (Li, Liu, Bilen, CVPR 2022; `regularizers.mtpsl`): a pair-
         conditioned mapping network aligns an unlabelled task's prediction with
         a labelled task's label, on an extra augmented view.
  jtr    JTR (Nishi et al., CVPR 2024; `regularizers.jtr`): an encoder-decoder
         over all tasks' maps, whose latent space aligns predictions with labels,
         on two extra augmented views.

Every regularizer is a Flax module called as `module.apply({'params': p}, views,
labelled, rng) -> (loss, diagnostics)` (`views.View`), declares how many
extra augmented views of each image it needs (`extra_views`, which the data
pipeline then yields) and where its parameters live (`params[param_key]`, never
under 'model'). Inference builds none of them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn

from cmtdp_jax import contrastive
from cmtdp_jax import label_mapping
from cmtdp_jax import tasks as tasks_lib
from cmtdp_jax.regularizers import jtr
from cmtdp_jax.regularizers import mtpsl
from cmtdp_jax.regularizers.views import View

__all__ = ['View', 'Choice', 'choose', 'NAMES', 'SEGNET_WIDTHS', 'input_channels']

SEGNET_WIDTHS = (64, 128, 256, 512, 512)  # MTAN's SegNet: MTPSL's and JTR's networks


@dataclasses.dataclass(frozen=True)
class Choice:
  """The run's regularizer: its module, weight in the total loss, and the optimizer
  of any parameters that have their own (MTPSL's FiLM tables)."""
  module: nn.Module
  weight: float
  own_optimizer: tuple[Callable[[tuple], bool], float] | None = None  # (is_own(path), lr)

  @property
  def param_key(self) -> str:
    return self.module.param_key

  @property
  def extra_views(self) -> int:
    return self.module.extra_views


def input_channels(task_names, num_classes) -> tuple[int, ...]:
  """Channels each task's maps have in MTPSL's and JTR's networks: a categorical task's
  classes (a binary one as 2), 1 for depth, 3 for normals."""
  return tuple(max(tasks_lib.get_task(t).num_outputs(num_classes), 2)
               if tasks_lib.get_task(t).label_kind == tasks_lib.CATEGORICAL
               else tasks_lib.get_task(t).num_outputs(num_classes) for t in task_names)


def network_widths(option, bottleneck_channels: int, bottleneck_stride: int) -> tuple[int, ...]:
  """The mapping / joint network's stage widths. 'segnet': MTAN's (the published
  networks, for SegNet hosts); 'scaled': SegNet's ratios (1/8, 1/4, 1/2, 1, 1) ending at
  the host's bottleneck width, one 2x2 pool per halving down to its stride."""
  if option == 'segnet':
    return SEGNET_WIDTHS
  if option == 'scaled':
    pools = int(round(math.log2(bottleneck_stride)))
    return tuple(max(bottleneck_channels // 2 ** max(pools - 2 - i, 0), 1) for i in range(pools))
  raise ValueError(f"config.regularizer widths: '{option}' is not 'segnet' or 'scaled'")


def _cmtdp(config, task_names, num_classes, bottleneck):
  del num_classes, bottleneck
  module = contrastive.Cmtdp(targets=task_names, sources=task_names,
                             config=contrastive.ContrastiveConfig.from_dict(config.contrastive))
  return module, float(config.contrastive.weight), None


def _mtpsl(config, task_names, num_classes, bottleneck):
  options = config.regularizer.mtpsl
  widths = network_widths(options.widths, *bottleneck)
  if widths[-1] != bottleneck[0]:
    raise ValueError(f'config.regularizer.mtpsl.widths {widths} must end at the bottleneck '
                     f"width {bottleneck[0]} (MTPSL's mapping meets the model's bottleneck)")
  module = mtpsl.MTPSL(tasks=tuple(task_names),
                       input_channels=input_channels(task_names, num_classes), widths=widths,
                       reg_weight=float(options.reg_weight),
                       max_labels=label_mapping.most_labels(config.data))
  return module, 2.0, (mtpsl.film_params, float(options.film_lr))


def _jtr(config, task_names, num_classes, bottleneck):
  options = config.regularizer.jtr
  module = jtr.JTR(tasks=tuple(task_names), input_channels=input_channels(task_names, num_classes),
                   widths=network_widths(options.widths, *bottleneck),
                   dist_weight=float(options.dist_weight),
                   recon_weight=float(options.recon_weight))
  return module, 1.0, None


# name -> (module class, its builder: (config, tasks, num_classes, (bottleneck channels,
# stride)) -> (module, published weight, own optimizer)).
REGULARIZERS = {'cmtdp': (contrastive.Cmtdp, _cmtdp), 'mtpsl': (mtpsl.MTPSL, _mtpsl),
                'jtr': (jtr.JTR, _jtr)}
NAMES = tuple(REGULARIZERS)


def chosen_name(config) -> str:
  """The regularizer `config` asks for ('' = none)."""
  name = config.regularizer.name
  if name and name not in REGULARIZERS:
    raise ValueError(f"config.regularizer.name: unknown '{name}' (valid: '', "
                     f"{', '.join(REGULARIZERS)})")
  if config.contrastive.enable and name not in ('', 'cmtdp'):
    raise ValueError(f"config.contrastive.enable=True means config.regularizer.name=cmtdp, "
                     f"not '{name}': set only one")
  return name or ('cmtdp' if config.contrastive.enable else '')


def extra_views(config) -> int:
  """How many extra augmented views of each image the run's regularizer needs."""
  name = chosen_name(config)
  return REGULARIZERS[name][0].extra_views if name else 0


def choose(config, task_names, num_classes, bottleneck: tuple[int, int] | None) -> Choice | None:
  """The regularizer of `config` for `task_names`, or None. `bottleneck`: the model's
  (channels, stride) of its coarsest shared map, or None when it exposes none."""
  name = chosen_name(config)
  if not name:
    return None
  if name != 'cmtdp' and bottleneck is None:
    raise ValueError(f"config.regularizer.name={name} needs the model's bottleneck, which "
                     f"framework '{config.model.framework}' does not expose")
  if name != 'cmtdp' and len(task_names) < 2:
    raise ValueError(f'config.regularizer.name={name} needs at least two tasks')
  module, weight, own = REGULARIZERS[name][1](config, tuple(task_names), num_classes,
                                              bottleneck)
  if config.regularizer.weight is not None:
    weight = float(config.regularizer.weight)
  return Choice(module, weight, own)


def regularizer_config() -> Any:
  """`config.regularizer`'s defaults (config_lib.base_config)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  return ml_collections.ConfigDict({
      'name': '',
      'weight': ml_collections.FieldReference(None, field_type=float),
      'mtpsl': {'reg_weight': 0.5, 'film_lr': 1e-3, 'widths': 'scaled'},
      'jtr': {'dist_weight': 4.0, 'recon_weight': 2.0, 'widths': 'scaled'},
  })

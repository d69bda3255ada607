"""The ATRC training protocol (SPEC section 3) for the real datasets.

Every `configs/nyud_*.py` and `configs/pascal_*.py` is one call of
`protocol_config`, so the protocol lives here once. The variant (the text
after ':' in `--config file.py:variant`) is a comma-separated list of:

  contrastive           adds the cross-task contrastive regularizer
  single_task=<task>    the single-task model of <task> (the reference of delta_m)

e.g. `--config configs/nyud_hrnet18_baseline.py:single_task=depth`.

The ViT configs (`configs/*_vit*_mt.py`) use TaskPrompter's schedule instead
of ATRC's (`recipe='taskprompter'`, `TASKPROMPTER`): the peers' protocol for
plain ViTs. Everything else (tasks, augmentation, loss weights, edge
options, evaluation) is the dataset's ATRC protocol. The InvPT configs
(`configs/*_invpt_vitl.py`) use InvPT's recipe (`recipe='invpt'`, `INVPT`).

The partial-label benchmark (`configs/nyuv2_segnet.py`,
`configs/cityscapes_segnet.py`) is MTPSL's protocol instead
(`partial_label_config`, `PARTIAL_LABEL_BENCHMARK`); its variants name the
label setting (full, onelabel or randomlabels), a regularizer (`contrastive` =
ours, `mtpsl`, `jtr`) and `balanced` (DiffusionMTL's loss normalisation).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from cmtdp_jax import config_lib
from cmtdp_jax import data as data_lib


@dataclasses.dataclass(frozen=True)
class Protocol:
  """What differs between the datasets in the ATRC protocol."""
  crop_size: tuple[int, int]
  # Eval pads a batch centred to its largest image, at least this size: ATRC's
  # PadImage to its crop size (src/data/pl_data.py), so NYUD (all 480x640 or all
  # 425x560) is not padded and PASCAL (at most 500x500) is padded to 512x512.
  eval_crop_size: tuple[int, int]
  lr: float
  edge_pos_weight: float
  edge_max_dist: float
  # The split whose images the boundary scores use ('' = the whole eval split), and
  # the boundaries they are scored against (pipeline.EDGE_GROUND_TRUTHS).
  edge_subset: str = ''
  edge_ground_truth: str = 'label'


PROTOCOLS = {
    'nyud': Protocol(crop_size=(425, 560), eval_crop_size=(425, 560), lr=0.01,
                     edge_pos_weight=0.8, edge_max_dist=0.011),
    'pascal_context': Protocol(crop_size=(512, 512), eval_crop_size=(512, 512), lr=0.005,
                               edge_pos_weight=0.95, edge_max_dist=0.0075,
                               edge_subset='test_new', edge_ground_truth='seism'),
}


# TaskPrompter's schedule for ViT-B/L (Ye and Xu, ICLR 2023), from
# prismformore/Multi-Task-Transformer TaskPrompter/configs/nyud/nyud_vitLp16_taskprompter.yml,
# pascal/pascal_vit{B,L}p16_taskprompter.yml (trBatch 2 per GPU on 4 GPUs, max_iter 40000,
# adam lr 2e-5 weight_decay 1e-6, poly, grad_clip_param max_norm 10) and utils/config.py
# (TRAIN.SCALE: NYUD 448x576, PASCAL 512x512). Its backbones are timm's
# vit_{base,large}_patch16_384, hence the 384 position-embedding grid. Not taken over:
# its NYUD edge_w 0.95 and loss weights (the ATRC protocol's stay, as for every config).
TASKPROMPTER = {
    'optim': {'name': 'adam', 'lr': 2e-5, 'weight_decay': 1e-6, 'grad_clip': 10.0,
              'poly_power': 0.9, 'warmup_steps': 0},
    'crop_size': {'nyud': (448, 576), 'pascal_context': (512, 512)},
    'img_size': 384,
}
# InvPT's recipe (Ye and Xu, ECCV 2022), prismformore/Multi-Task-Transformer at 870c6be:
# InvPT/configs/{nyud,pascal}/*_vitLp16.yml (adam lr 2e-5 weight_decay 1e-6, poly per
# iteration, max_iter 40000, valBatch 6; trBatch 2 per GPU, a global batch of 6;
# edge_w 0.95, also for NYUD, where ATRC's is 0.8), utils/config.py (TRAIN.SCALE = TEST.SCALE:
# NYUD 448x576, PASCAL 512x512; the test images are padded to it, PadImage), and
# utils/common_config.py (timm's vit_large_patch16_384 with img_size = TRAIN.SCALE, its
# position grid resized once at load, drop_path_rate 0.15; no gradient clipping). The tasks'
# augmentation and loss weights are ATRC's, as InvPT's own (its yml loss_weights).
INVPT = {
    'optim': {'name': 'adam', 'lr': 2e-5, 'weight_decay': 1e-6, 'grad_clip': 0.0,
              'poly_power': 0.9, 'warmup_steps': 0},
    'crop_size': {'nyud': (448, 576), 'pascal_context': (512, 512)},
    'batch_size': 6,
    'drop_path_rate': 0.15,
    'edge_pos_weight': 0.95,
}
RECIPES = ('atrc', 'taskprompter', 'invpt')


def protocol_config(dataset: str, backbone: str, framework: str, variant: str = '',
                    recipe: str = 'atrc') -> ml_collections.ConfigDict:
  """Base config with `dataset`'s ATRC protocol, `backbone`, `framework` and `variant`;
  with `recipe='taskprompter'` TaskPrompter's optimizer, schedule and crop size (ViTs),
  with `recipe='invpt'` InvPT's (`INVPT`)."""
  if dataset not in PROTOCOLS:
    raise ValueError(f"no protocol for dataset '{dataset}' (valid: {', '.join(PROTOCOLS)})")
  if recipe not in RECIPES:
    raise ValueError(f"no recipe '{recipe}' (valid: {', '.join(RECIPES)})")
  protocol = PROTOCOLS[dataset]
  config = config_lib.base_config()
  config.tasks = data_lib.get_dataset_spec(dataset).tasks

  config.data.name = dataset
  config.data.crop_size = protocol.crop_size
  config.data.eval_crop_size = protocol.eval_crop_size
  config.data.augment.min_scale = 0.5
  config.data.augment.max_scale = 2.0
  config.data.augment.cat_max_ratio = 0.75
  config.data.augment.flip = True
  config.data.augment.photometric = True
  config.data.augment.parts_need_person = 'human_parts' in config.tasks

  config.model.framework = framework
  config.model.backbone = backbone
  config.model.backbone_kwargs = ml_collections.ConfigDict()

  config.optim.name = 'sgd'
  config.optim.lr = protocol.lr
  config.optim.momentum = 0.9
  config.optim.weight_decay = 5e-4
  config.optim.poly_power = 0.9
  config.optim.warmup_steps = 0
  config.batch_size = 8
  config.eval_batch_size = 8
  config.num_steps = 40_000
  config.eval.metric_options.edge.max_dist = protocol.edge_max_dist
  config.eval.subset_split = protocol.edge_subset
  config.eval.subset_tasks = ('edge',)
  config.eval.edge_ground_truth = protocol.edge_ground_truth
  if recipe == 'taskprompter':
    config.data.crop_size = TASKPROMPTER['crop_size'][dataset]
    config.optim.update(TASKPROMPTER['optim'])
    config.model.backbone_kwargs = ml_collections.ConfigDict(
        {'img_size': TASKPROMPTER['img_size']})
    config.model.backbone_kwargs_for = backbone
  edge_pos_weight = protocol.edge_pos_weight
  if recipe == 'invpt':
    size = INVPT['crop_size'][dataset]
    config.data.crop_size = config.data.eval_crop_size = size
    config.optim.update(INVPT['optim'])
    config.batch_size = config.eval_batch_size = INVPT['batch_size']
    config.model.backbone_kwargs = ml_collections.ConfigDict(
        {'img_size': size, 'drop_path_rate': INVPT['drop_path_rate']})
    config.model.backbone_kwargs_for = backbone
    edge_pos_weight = INVPT['edge_pos_weight']

  _apply_variant(config, variant)
  # Only the trained tasks' options (config_lib.validate would ignore the others with a note).
  config.loss_options = ml_collections.ConfigDict(
      {'edge': {'pos_weight': edge_pos_weight}} if 'edge' in config.tasks else {})
  return config


def _apply_variant(config, variant):
  valid = f"contrastive, single_task=<{'|'.join(config.tasks)}>"
  for token in filter(None, (t.strip() for t in variant.split(','))):
    key, _, value = token.partition('=')
    if token == 'contrastive':
      config.contrastive.enable = True
    elif key == 'single_task' and value in config.tasks:
      config.model.framework = 'single_task'
      config.tasks = (value,)
    else:
      raise ValueError(f"unknown config variant '{token}' (valid: {valid})")


@dataclasses.dataclass(frozen=True)
class PartialLabelBenchmark:
  """MTPSL's training of MTAN's split SegNet on one dataset (nyu_mtl_xtc.py,
  cityscapes_mtl_xtc.py, dataset/nyuv2ssl.py, dataset/cityscapesssl.py)."""
  crop_size: tuple[int, int]  # the images' size: the scale-crop resizes back to it
  batch_size: int
  flip: bool
  settings: tuple[str, ...]  # label settings with published files and references
  reference_prefix: str  # evaluation.report.DELTA_M_REFERENCES name before '_<setting>'
  epochs: int = 200
  decay_epochs: int = 100  # StepLR(step_size=100, gamma=0.5), stepped every epoch
  lr: float = 1e-4  # Adam, no weight decay


PARTIAL_LABEL_BENCHMARK = {
    'nyuv2_mtan': PartialLabelBenchmark((288, 384), 2, False,
                                        ('full', 'onelabel', 'randomlabels'), 'mtpsl_nyuv2'),
    'cityscapes_mtan': PartialLabelBenchmark((128, 256), 8, True, ('full', 'onelabel'),
                                             'mtpsl_cityscapes'),
}


def partial_label_config(dataset: str, variant: str = '') -> ml_collections.ConfigDict:
  """MTPSL's protocol on `dataset` with MTAN's split SegNet; `variant` (comma-separated):
  the label setting (default full; onelabel / randomlabels read MTPSL's file of that
  name from the working directory unless config.data.label_mapping says where it is),
  a regularizer ('contrastive' = ours, 'mtpsl', 'jtr'), and 'balanced' (DiffusionMTL's
  per-image loss balance)."""
  benchmark = PARTIAL_LABEL_BENCHMARK[dataset]
  spec = data_lib.get_dataset_spec(dataset)
  config = config_lib.base_config()
  config.tasks = spec.tasks
  config.data.name = dataset
  config.data.crop_size = benchmark.crop_size
  config.data.image_normalization = 'unit_range'
  config.data.augment.name = 'mtan_scale_crop'
  config.data.augment.scales = (1.0, 1.2, 1.5)
  config.data.augment.flip = benchmark.flip
  config.data.augment.photometric = False
  config.model.framework = 'segnet'
  config.model.backbone = 'segnet'
  # MTAN's 'standard' widths, named so that --config.model.backbone_kwargs.widths can shrink them.
  config.model.backbone_kwargs = ml_collections.ConfigDict({'widths': (64, 128, 256, 512, 512)})
  config.model.backbone_kwargs_for = 'segnet'
  config.loss_weights = ml_collections.ConfigDict({t: 1.0 for t in spec.tasks})
  config.loss_options = ml_collections.ConfigDict(
      {'normals': {'loss': 'cosine'}} if 'normals' in spec.tasks else {})
  config.loss_normalization = 'per_image'
  steps_per_epoch = spec.train_images // benchmark.batch_size  # drop_last, as our pipeline
  config.optim.name = 'adam'
  config.optim.lr = benchmark.lr
  config.optim.weight_decay = 0.0
  config.optim.schedule = 'step'
  config.optim.step_size = benchmark.decay_epochs * steps_per_epoch
  config.optim.step_gamma = 0.5
  config.batch_size = benchmark.batch_size
  config.eval_batch_size = 8
  config.num_steps = benchmark.epochs * steps_per_epoch
  config.eval_every = steps_per_epoch  # every epoch, as they do (their selection needs it)
  config.checkpoint_every = steps_per_epoch
  # MTPSL's and JTR's networks at their published (SegNet) widths.
  config.regularizer.mtpsl.widths = 'segnet'
  config.regularizer.jtr.widths = 'segnet'

  setting = 'full'
  for token in filter(None, (t.strip() for t in variant.split(','))):
    if token in benchmark.settings:
      setting = token
    elif token == 'contrastive':
      config.contrastive.enable = True
    elif token in ('mtpsl', 'jtr'):
      config.regularizer.name = token
    elif token == 'balanced':
      config.loss_normalization = 'per_image_balanced'
    else:
      raise ValueError(f"unknown config variant '{token}' (valid: "
                       f"{', '.join(benchmark.settings)}, contrastive, mtpsl, jtr, balanced)")
  if setting != 'full':
    config.data.label_mapping = f'{setting}.pth'
  config.eval.delta_m_reference = f'{benchmark.reference_prefix}_{setting}'
  return config

"""Config validation: one-line errors that name the field."""

import pytest

from cmtdp_jax import config_lib


@pytest.mark.parametrize('field,value,message', [
    ('data.prefetch', -1, 'config.data.prefetch=-1 must be >= 0'),
    ('data.device_prefetch', -2, 'config.data.device_prefetch=-2 must be >= 0'),
    ('num_steps', 0, 'config.num_steps=0 must be positive'),
    ('batch_size', 6, 'config.batch_size=6 is not a positive multiple of the 4'),
])
def test_bad_values_name_the_field(field, value, message):
  config = config_lib.base_config()
  section, _, name = field.rpartition('.')
  (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config, 4)


def test_base_config_is_valid():
  config_lib.validate(config_lib.base_config(), 4)


def test_repeated_task_is_one_line_error():
  config = config_lib.base_config()
  config.tasks = ('semseg', 'edge', 'edge')
  with pytest.raises(ValueError, match=r"config.tasks .* names edge more than once"):
    config_lib.validate(config, 4)


def test_defaults_for_untrained_tasks_are_ignored_with_a_note(caplog):
  """The base config's loss_options.edge must not stop a task list without edge."""
  config = config_lib.base_config()
  config.tasks = ('semseg', 'depth')
  config.loss_weights.normals = 2.0
  # The absl logger's own level: parsing the CLI's flags in-process (test_cli) sets it to WARNING.
  with caplog.at_level('INFO', logger='absl'):
    config_lib.validate(config, 4)
  notes = [r.getMessage() for r in caplog.records]
  assert any("config.loss_options.edge is ignored: 'edge' is not in config.tasks" in n
             for n in notes), notes
  assert any('config.loss_weights.normals is ignored' in n for n in notes), notes


def test_loss_options_of_an_unknown_task_are_an_error():
  config = config_lib.base_config()
  config.loss_options.edeg = {'pos_weight': 0.5}
  with pytest.raises(ValueError, match='config.loss_options.edeg names an unknown task'):
    config_lib.validate(config, 4)


@pytest.mark.parametrize('path,suggestion', [
    ('model.widht', 'did you mean config.model.backbone_kwargs.width?'),
    ('num_step', 'did you mean config.num_steps?'),
    ('data.crop_sise', 'did you mean config.data.crop_size?'),
    ('foo', '--mode=print_config lists the fields'),
])
def test_unknown_override_names_the_field_and_the_closest_one(path, suggestion):
  message = config_lib.unknown_field(config_lib.base_config(), path)
  assert message.startswith(f"--config.{path}: config has no field '{path}'")
  assert message.endswith(suggestion)


def test_known_override_is_no_error():
  config = config_lib.base_config()
  for path in ('model.backbone_kwargs.width', 'tasks', 'data.augment.flip'):
    assert config_lib.unknown_field(config, path) is None


def test_edge_metric_options_are_settable_and_checked_before_training():
  """Every edge option is a field (the CLI can set it); a bad one stops validate."""
  config = config_lib.base_config()
  for field in ('protocol', 'matcher', 'ap', 'workers', 'max_dist'):
    assert config_lib.unknown_field(config, f'eval.metric_options.edge.{field}') is None
  config.eval.metric_options.edge.protocol = 'invpt'
  config_lib.validate(config, 8)
  config.eval.metric_options.edge.protocol = 'matlab'
  with pytest.raises(ValueError, match=r"^config.eval.metric_options.edge: .*protocol.*'matlab'"):
    config_lib.validate(config, 8)
  config.eval.metric_options.edge.protocol = 'seism'
  config.eval.metric_options.edge.wokers = 2
  with pytest.raises(ValueError, match=r"^config.eval.metric_options.edge: .*wokers"):
    config_lib.validate(config, 8)

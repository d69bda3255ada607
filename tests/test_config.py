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

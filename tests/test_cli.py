"""The command line end to end: train, resume exactly, evaluate, clear errors."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cmtdp_jax import checkpointing
from cmtdp_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_command(workdir, *flags, data_dir='', devices=2):
  """The CLI on the smoke config with a tiny dataset, and its environment."""
  cmd = [sys.executable, '-m', 'cmtdp_jax.main', '--config=configs/synthetic.py:smoke',
         f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
         '--config.data.num_train=32', '--config.data.num_eval=16',
         '--config.data.image_size=(32,32)', '--config.data.crop_size=(32,32)', *flags]
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), TF_CPP_MIN_LOG_LEVEL='2')
  return cmd, env


def run_main(workdir, *flags, data_dir='', devices=2, check=True):
  cmd, env = main_command(workdir, *flags, data_dir=data_dir, devices=devices)
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  if check and proc.returncode != 0:
    raise AssertionError(f'{" ".join(cmd)} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}')
  return proc


def start_main(workdir, *flags, data_dir='', devices=2, log_path=None):
  """Starts the CLI in the background; stdout is piped, stderr goes to a file."""
  cmd, env = main_command(workdir, *flags, data_dir=data_dir, devices=devices)
  stderr = open(log_path or os.devnull, 'w')  # a pipe could fill up and block the run
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr,
                          text=True)


def wait_for_line(proc, text):
  """Reads the child's stdout until a line containing `text`; returns the lines."""
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if text in line:
      return lines
  raise AssertionError(f'run ended (rc {proc.wait()}) before printing {text!r}: {lines}')


def checkpoint_state(workdir, step):
  """The (params, batch_stats) of a checkpoint, restored onto one device whatever wrote
  them."""
  checkpointer = ocp.StandardCheckpointer()
  path = os.path.join(workdir, 'checkpoints', str(step), 'default')
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        checkpointer.metadata(path).item_metadata)
  state = jax.device_get(checkpointer.restore(path, target))
  return state['params'], state['batch_stats']


@pytest.fixture(scope='module')
def runs(tmp_path_factory, data_dir):
  """One uninterrupted 12-step run, the reference of the resume tests."""
  whole = str(tmp_path_factory.mktemp('whole'))
  first = run_main(whole, '--config.num_steps=12', '--config.checkpoint_every=6',
                   data_dir=data_dir)
  return {'whole': whole, 'first': first, 'data_dir': data_dir}


def test_train_writes_eval_json_table_and_checkpoints(runs):
  with open(os.path.join(runs['whole'], 'eval', 'step_12.json')) as f:
    results = json.load(f)
  for key in ('semseg/mIoU', 'depth/rmse', 'normals/mean', 'edge/odsF', 'sal/maxF',
              'human_parts/mIoU'):
    assert key in results and np.isfinite(results[key]), key
    assert results[key.split('/')[0] + '/images'] == 16  # the whole eval set
  assert 'step 12/12' in runs['first'].stdout
  # The first step has its line at once (not log_every=10 steps later), evaluation its
  # progress; captured without a TTY, so plain lines.
  out = runs['first'].stdout
  assert re.search(r'^step 1/12 \| .*semseg .* \| first step [\d.]+s \(compile [\d.]+s\)$',
                   out, re.MULTILINE), out
  assert out.index('step 1/12') < out.index('step 10/12')
  # ... and its exact metrics go to TensorBoard as a logged step (the study tool reads them).
  from cmtdp_jax.studies.tool import numerics  # pylint: disable=import-outside-toplevel
  first = numerics.first_step_losses(runs['whole'])
  total = np.array(int(first['loss/total'], 16), np.uint32).view(np.float32)
  assert f'total {total:.4f} |' in out.split('step 1/12')[1].splitlines()[0]
  assert re.search(r'^evaluation: 16/16 images \(100%\) \| [\d.]+ images/s \| done in', out,
                   re.MULTILINE), out
  assert '\r' not in out and '\x1b' not in out
  # One compilation for the whole run: pipeline batches never change shape or sharding.
  assert 'Train step compilations in this run: 1' in runs['first'].stderr
  assert 'the train step compiled' not in runs['first'].stderr
  table = runs['first'].stdout.split('Evaluation at step 12:')[1].splitlines()
  assert any(line.split()[:2] == ['semseg', 'mIoU'] for line in table if line.strip())
  assert sorted(os.listdir(os.path.join(runs['whole'], 'checkpoints'))) == ['12', '6']
  assert os.path.exists(os.path.join(runs['whole'], 'config.json'))


def assert_same_params(workdir_a, workdir_b, step):
  """Bitwise: a resume on the same machine and device count runs the same executable on
  the same data (across device counts, processes or CPUs see `same_training`)."""
  a, b = (sorted(flatten_params(checkpoint_state(w, step)[0]).items())
          for w in (workdir_a, workdir_b))
  assert [k for k, _ in a] == [k for k, _ in b]
  for (key, x), (_, y) in zip(a, b):
    np.testing.assert_array_equal(x, y, err_msg=key)


def test_sigterm_saves_exits_cleanly_and_resumes_bitwise(runs, tmp_path):
  workdir = str(tmp_path / 'term')
  flags = ('--config.num_steps=12', '--config.checkpoint_every=6', '--config.log_every=1')
  proc = start_main(workdir, *flags, data_dir=runs['data_dir'])
  wait_for_line(proc, 'step 3/12')
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 0
  saved = [int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit()]
  assert saved and max(saved) < 12, saved
  resumed = run_main(workdir, *flags, data_dir=runs['data_dir'])
  assert f'step {max(saved) + 1}/12' in resumed.stdout
  assert_same_params(runs['whole'], workdir, 12)


def test_sigkill_resumes_from_last_checkpoint(runs, tmp_path):
  workdir = str(tmp_path / 'kill')
  flags = ('--config.num_steps=12', '--config.checkpoint_every=3', '--config.log_every=1')
  proc = start_main(workdir, *flags, data_dir=runs['data_dir'])
  wait_for_line(proc, 'step 8/12')
  proc.kill()
  proc.wait()
  resumed = run_main(workdir, *flags, data_dir=runs['data_dir'])
  assert 'Resumed' in resumed.stderr and 'step 1/12' not in resumed.stdout
  assert_same_params(runs['whole'], workdir, 12)


def summary_tags(workdir):
  """Every TensorBoard tag written in `workdir`."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tensorflow.core.util import event_pb2  # pylint: disable=import-outside-toplevel
  tags = set()
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents*')):
    for record in tf.data.TFRecordDataset(path):
      tags.update(v.tag for v in event_pb2.Event.FromString(record.numpy()).summary.value)
  return tags


def test_eval_mode_restores_and_matches(runs):
  """--mode=eval, with an image grid: it has no trainer's writer, so it makes its own."""
  assert not any(tag.startswith('eval_vis/') for tag in summary_tags(runs['whole']))
  proc = run_main(runs['whole'], '--mode=eval', '--config.num_steps=12',
                  '--config.eval.num_visualize=1', data_dir=runs['data_dir'])
  assert 'Evaluation at step 12:' in proc.stdout
  with open(os.path.join(runs['whole'], 'eval', 'step_12.json')) as f:
    results = json.load(f)
  assert np.isfinite(results['depth/rmse'])
  assert 'eval_vis/00000' in summary_tags(runs['whole'])


@pytest.mark.parametrize('flags,message', [
    (['--config.tasks=("semseg","flow")'], "unknown task 'flow'"),
    (['--config.model.backbone=vgg'], "unknown backbone 'vgg'"),
    (['--config.batch_size=3'], 'config.batch_size=3'),
    (['--config.mesh.shape=(3,)'], 'config.mesh.shape'),
])
def test_bad_config_gives_one_line_error(tmp_path, flags, message):
  proc = run_main(str(tmp_path), *flags, check=False)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert message in last and last.startswith('error:'), proc.stderr[-2000:]


@pytest.fixture
def parse_cli(monkeypatch):
  """Parses a CLI command line in this process (ml_collections reads the overrides from
  sys.argv); yields the parser and resets the flags afterwards."""
  from cmtdp_jax import main  # pylint: disable=import-outside-toplevel

  def parse(argv):
    monkeypatch.setattr(sys, 'argv', argv)
    return config_lib.parse_flags(argv)
  yield parse
  main.FLAGS.unparse_flags()


@pytest.mark.parametrize('override,message', [
    ('--config.model.widht=16', "error: --config.model.widht: config has no field "
                                "'model.widht'; did you mean config.model.backbone_kwargs.width?"),
    ('--config.foo=1', "error: --config.foo: config has no field 'foo'; python -m "
                       'cmtdp_jax.main --config FILE --mode=print_config lists the fields'),
])
def test_unknown_config_field_is_one_line_naming_it(parse_cli, capsys, override, message):
  with pytest.raises(SystemExit) as exit_info:
    parse_cli(['main', '--config', 'configs/synthetic.py:smoke', override])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == message + '\n'


@pytest.mark.parametrize('text,variant,message', [
    (None, '', 'no such file'),
    ('def get_config(:\n  pass\n', '', 'line 1: invalid syntax'),
    ('import os\n\ndef get_config():\n  return os.nothing\n', '',
     "get_config() raised AttributeError: module 'os' has no attribute 'nothing' (line 4)"),
    ('raise ImportError("no module x")\n', '', 'ImportError: no module x (line 1)'),
    ('X = 1\n', '', 'the file defines no get_config()'),
    ('def get_config():\n  return {"a": 1}\n', '', 'get_config() returned dict'),
    ('from cmtdp_jax import config_lib\n\ndef get_config():\n'
     '  return config_lib.base_config()\n', 'smoke',
     'get_config() raised TypeError'),
])
def test_config_file_error_is_one_line_naming_the_file(parse_cli, capsys, tmp_path, text,
                                                       variant, message):
  """A config file that is missing, does not parse or raises: one line, exit status 2
  (was a traceback of 44-58 lines)."""
  path = tmp_path / 'my_config.py'
  if text is not None:
    path.write_text(text)
  argument = f'{path}:{variant}' if variant else str(path)
  with pytest.raises(SystemExit) as exit_info:
    parse_cli(['main', f'--config={argument}', '--workdir', str(tmp_path / 'run')])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith(f'error: --config {argument}: '), err
  assert message in err, err



@pytest.mark.parametrize('module', ['cmtdp_jax.benchmarks.benchmark', 'cmtdp_jax.studies.tool'])
def test_tools_report_config_file_errors_in_one_line(tmp_path, module):
  """The other commands that take --config parse it the same way."""
  proc = subprocess.run([sys.executable, '-m', module, f'--config={tmp_path}/none.py',
                         f'--workdir={tmp_path}'], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'), timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f'error: --config {tmp_path}/none.py: no such file'), proc.stderr[-2000:]

def test_print_config_shows_overrides_and_needs_no_workdir(parse_cli, capsys):
  from cmtdp_jax import main  # pylint: disable=import-outside-toplevel
  main.main(parse_cli(['main', '--config=configs/synthetic.py:smoke', '--mode=print_config',
                       '--config.num_steps=7']))
  printed = capsys.readouterr().out
  assert 'num_steps: 7\n' in printed and 'backbone_kwargs:' in printed
  # --help shows the module docstring: where the fields are documented, how to print them.
  assert '--mode=print_config' in main.__doc__ and 'configs/' in main.__doc__


def test_unwritable_workdir_gives_one_line_error(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  proc = run_main(str(blocker / 'run'), check=False)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: --workdir') and 'not writable' in last


def test_commands_freeze_the_heap_only_after_their_own_exit_handlers():
  """`config_lib.run` leaves the objects alive at exit to the OS (gc.freeze), but only
  after every exit handler the command registers (Orbax's, jax.distributed's) has run."""
  program = textwrap.dedent("""
      import atexit, gc
      from cmtdp_jax import config_lib
      atexit.register(lambda: print('before run:', gc.get_freeze_count() > 0))
      def main(argv):
        atexit.register(lambda: print('in main:', gc.get_freeze_count() > 0))
      config_lib.run(main)
  """)
  proc = subprocess.run([sys.executable, '-c', program], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, check=True)
  assert proc.stdout.splitlines() == ['in main: False', 'before run: True'], proc.stdout


def flatten_params(tree, prefix=''):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(flatten_params(v, f'{prefix}/{k}'))
    return out
  return {prefix: np.asarray(tree)}


def test_relative_workdir_saves_checkpoints(tmp_path, monkeypatch):
  """Orbax rejects relative paths; the README's quick start passes one."""
  monkeypatch.chdir(tmp_path)
  checkpointer = checkpointing.Checkpointer('run', every_steps=1, keep=1, async_save=False)
  checkpointer.maybe_save(1, {'x': np.arange(3)})
  checkpointer.close()
  assert os.path.isabs(checkpointer.directory)
  assert os.listdir(tmp_path / 'run' / 'checkpoints') == ['1']

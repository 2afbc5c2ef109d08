import subprocess
import sys
import textwrap

import pytest
from composer.algorithms import EMA
from composer.callbacks import LRMonitor, SpeedMonitor

from composer_maect import registry
from composer_maect.callbacks import ReconstructionImages


def test_builds_composer_objects_by_name():
    built = registry.build('callbacks', {'speed_monitor': {'window_size': 5}, 'lr_monitor': None})
    assert isinstance(built[0], SpeedMonitor)
    assert isinstance(built[1], LRMonitor)
    assert isinstance(registry.build('algorithms', {'ema': {'half_life': '10ba'}})[0], EMA)
    assert isinstance(registry.build('callbacks', {'reconstruction_images': {}})[0], ReconstructionImages)


@pytest.mark.parametrize('name', ['console', 'file', 'tensorboard', 'wandb', 'mlflow'])
def test_composer_loggers_registered(name):
    assert name in registry.loggers.get_all()


def test_unknown_name_suggests_closest():
    with pytest.raises(
        ValueError, match=r"Unknown callback 'speed_monitr' in `callbacks`\. Did you mean 'speed_monitor'"
    ):
        registry.build('callbacks', {'speed_monitr': {}})


def test_bad_arguments_name_the_entry():
    with pytest.raises(ValueError, match=r'Invalid arguments for `callbacks.lr_monitor`'):
        registry.build('callbacks', {'lr_monitor': {'interval': 3}})


def test_wrong_kind_rejected():
    registry.callbacks.register('not_a_callback', func=dict)
    with pytest.raises(ValueError, match='which is not a Composer Callback'):
        registry.build('callbacks', {'not_a_callback': {}})


def test_entry_point_extends_registry(tmp_path):
    package = tmp_path / 'maect_plugin'
    package.mkdir()
    (package / '__init__.py').write_text(
        textwrap.dedent(
            """
            from composer.core import Callback

            class Marker(Callback):
                def __init__(self, tag='x'):
                    self.tag = tag
            """
        )
    )
    dist_info = tmp_path / 'maect_plugin-0.1.dist-info'
    dist_info.mkdir()
    (dist_info / 'METADATA').write_text('Metadata-Version: 2.1\nName: maect-plugin\nVersion: 0.1\n')
    (dist_info / 'entry_points.txt').write_text('[composer_maect_callbacks]\nmarker = maect_plugin:Marker\n')
    script = (
        'from composer_maect import registry\n'
        "(marker,) = registry.build('callbacks', {'marker': {'tag': 'found'}})\n"
        'print(type(marker).__name__, marker.tag)\n'
    )
    result = subprocess.run(
        [sys.executable, '-c', script],
        env={'PYTHONPATH': str(tmp_path), 'PATH': '/usr/bin:/bin'},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'Marker found'

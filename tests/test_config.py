from pathlib import Path

import pytest

from composer_maect.config import ConfigError, TrainConfig, load_config, load_run

YAMLS = sorted((Path(__file__).parents[1] / 'yamls').glob('*.yaml'))
MNIST_YAML = Path(__file__).parents[1] / 'yamls' / 'mae_pretrain_mnist.yaml'


@pytest.mark.parametrize('path', YAMLS, ids=[p.name for p in YAMLS])
def test_every_yaml_validates(path):
    plan = load_run(str(path))
    assert plan.phases
    assert all(isinstance(config, TrainConfig) for config in plan.phases)


def test_variables_and_overrides_resolve():
    config = load_config(str(MNIST_YAML), ['variables.data_root=/tmp/digits', 'optimizer.base_lr=2e-3'])
    assert config.train_loader.local == '/tmp/digits'
    assert config.prepare_data.out == '/tmp/digits'
    assert config.optimizer.base_lr == 2e-3
    assert config.train_loader.transform.mean == [0.1307, 0.1307, 0.1307]


def test_integer_accepted_for_float():
    config = load_config(str(MNIST_YAML), ['optimizer.weight_decay=0'])
    assert config.optimizer.weight_decay == 0.0
    assert isinstance(config.optimizer.weight_decay, float)


def test_misspelled_key_suggests_closest():
    with pytest.raises(ConfigError) as info:
        load_config(str(MNIST_YAML), ['optimizer.base_lrr=1e-3'])
    message = str(info.value)
    assert "'optimizer.base_lrr': unknown key" in message
    assert "Did you mean 'optimizer.base_lr'?" in message


def test_misspelled_top_level_key():
    with pytest.raises(ConfigError, match=r"'max_duraton': unknown key\. Did you mean 'max_duration'\?"):
        load_config(str(MNIST_YAML), ['max_duraton=3ep'])


def test_wrong_type_names_key_value_and_type():
    with pytest.raises(ConfigError) as info:
        load_config(str(MNIST_YAML), ['optimizer.base_lr=fast'])
    assert "'optimizer.base_lr': invalid value 'fast' (str); expected float." in str(info.value)


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match=r"'train_loader.views': invalid value True \(bool\); expected int"):
        load_config(str(MNIST_YAML), ['train_loader.views=true'])


def test_invalid_choice_lists_choices():
    with pytest.raises(ConfigError) as info:
        load_config(str(MNIST_YAML), ['optimizer.lr_scaling=image'])
    assert "'optimizer.lr_scaling': invalid value 'image' (str); expected one of" in str(info.value)
    assert "Did you mean 'images'?" in str(info.value)


def test_decoder_choice():
    assert load_config(str(MNIST_YAML), []).train_loader.decoder == 'auto'
    assert load_config(str(MNIST_YAML), ['train_loader.decoder=pil']).train_loader.decoder == 'pil'
    with pytest.raises(ConfigError, match=r"'train_loader.decoder': invalid value 'turbo' \(str\); expected one of"):
        load_config(str(MNIST_YAML), ['train_loader.decoder=turbo'])


def test_all_errors_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config(str(MNIST_YAML), ['seed=x', 'model.mask_ratio=high', 'model.encoder.nam=vit'])
    lines = str(info.value).splitlines()[1:]
    assert len(lines) == 3
    assert any("'seed'" in line for line in lines)
    assert any("'model.mask_ratio'" in line for line in lines)
    assert any("'model.encoder.nam'" in line for line in lines)


def test_missing_required_key(tmp_path):
    path = tmp_path / 'partial.yaml'
    path.write_text(MNIST_YAML.read_text().replace('global_train_batch_size: 256\n', ''))
    with pytest.raises(ConfigError, match=r"'global_train_batch_size': missing required key \(int\)"):
        load_config(str(path))


def test_malformed_override():
    with pytest.raises(ConfigError, match='write each as key=value'):
        load_config(str(MNIST_YAML), ['max_duration'])


def test_invalid_yaml(tmp_path):
    path = tmp_path / 'broken.yaml'
    path.write_text('model: {encoder: {name: vit, folder: ./a/{b}/c}}\n')
    with pytest.raises(ConfigError, match='is not valid YAML'):
        load_config(str(path))


def test_transform_options_drop_unset():
    config = load_config(str(MNIST_YAML))
    options = config.train_loader.transform.options()
    assert options == {
        'img_size': 28,
        'mean': (0.1307, 0.1307, 0.1307),
        'std': (0.3081, 0.3081, 0.3081),
        'scale': (0.5, 1.0),
        'hflip': False,
    }

"""Seeds as an axis: ``parent_seeds`` picks the recipe parents' seeds, shares the cache with
``n_parents``, and bad values are clear errors."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tfuse.data.images import load_images
from tfuse.errors import TfuseError
from tfuse.parents import obtain_parents, parent_seeds
from tfuse.tasks.image_classification import ImageClassificationTask

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def config(tmp_path: Path, *overrides: str):
    with initialize_config_dir(CONFIGS, version_base=None):
        return compose("config", overrides=[
            "+experiment=vit_digits_tiny", "train.epochs=1", "device=cpu", f"cache_dir={tmp_path / 'parents'}", *overrides,
        ])


def test_parent_seeds_train_those_seeds_and_share_the_cache_with_n_parents(tmp_path):
    task = ImageClassificationTask(load_images("digits"))
    chosen = obtain_parents(config(tmp_path, "parent_seeds=[3,1]"), task, "cpu")
    assert [p.seed for p in chosen] == [3, 1] and all(p.trained_seconds > 0 for p in chosen)
    assert [Path(p.source).name.rsplit("-", 1)[1] for p in chosen] == ["seed3", "seed1"]
    counted = obtain_parents(config(tmp_path, "n_parents=4"), task, "cpu")
    assert [p.seed for p in counted] == [0, 1, 2, 3]
    by_seed = {p.seed: p for p in counted}
    assert by_seed[3].source == chosen[0].source and by_seed[3].trained_seconds == 0  # taken from the cache
    assert by_seed[0].trained_seconds > 0


def test_parent_seeds_default_and_bad_values(tmp_path):
    assert parent_seeds(config(tmp_path, "n_parents=3")) == [0, 1, 2]
    for bad in ("parent_seeds=[]", "parent_seeds=[a,b]", "parent_seeds=7"):
        with pytest.raises(TfuseError, match="parent_seeds="):
            parent_seeds(config(tmp_path, bad))
    with pytest.raises(TfuseError, match="parent_models has 2 entries but parent_seeds has 3"):
        obtain_parents(config(tmp_path, "parent_seeds=[0,1,2]", "parent_models=[{},{}]"), None, "cpu")

import pytest

from napari_e2enet.config import DataConfig, SparsityConfig, TrainConfig
from napari_e2enet.data import phantom_dataset


@pytest.fixture(scope="session")
def tiny_phantoms():
    """Three 32x32x16 phantom cases (CT, AMOS labels) in memory."""
    return phantom_dataset(3, seed=5, shape=(32, 32, 16), spacing=(3.0, 3.0, 6.0))


@pytest.fixture
def tiny_train_config():
    return TrainConfig(
        model="e2enet_small",
        model_overrides={"widths": (4, 8, 8), "pools": ((2, 2, 2),) * 2},
        sparsity=SparsityConfig(sparsity=0.8, update_every=2),
        data=DataConfig(source="memory", patch=(16, 16, 16), batch=2, num_validation=1),
        iterations=8,
        iterations_per_epoch=4,
        seed=7,
        device="cpu",
    )

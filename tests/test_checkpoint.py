"""Specifications of vasomim_jax.checkpoint on a dummy train state: state + grain iterator round trip, keep-last-K,
truncated step folders skipped, restore across process counts, host-side params export."""

import json
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from configs import common
from vasomim_jax import checkpoint, input_pipeline, sharding


def _state(seed):
    rng = np.random.default_rng(seed)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=4), jnp.float32)}}
    return {"step": jnp.asarray(seed, jnp.int32), "params": params, "opt_state": optax.adamw(1e-3).init(params)}


def _iterator():
    return iter(grain.MapDataset.range(1000).shuffle(seed=1).batch(4).to_iter_dataset())


def _setup(tmp_path, every=1, keep=2):
    cfg = common.pretrain_config()
    cfg.checkpoint.every_steps, cfg.checkpoint.max_to_keep = every, keep
    (tmp_path / "config.json").write_text(cfg.to_json_best_effort())
    mesh = sharding.make_mesh(cfg)
    shardings = sharding.named_shardings(_state(0), cfg.sharding, mesh)
    return cfg, checkpoint.make_manager(tmp_path, cfg.checkpoint), shardings


def _save_steps(manager, steps):
    it = _iterator()
    for s in steps:
        next(it)
        checkpoint.save(manager, s, _state(s), it)
    manager.wait_until_finished()
    return it


def test_state_and_iterator_round_trip_and_only_the_last_k_are_kept(tmp_path):
    _, manager, shardings = _setup(tmp_path, keep=2)
    saved_it = _save_steps(manager, [1, 2, 3])
    assert manager.all_steps() == [2, 3]
    it = _iterator()
    state, step = checkpoint.restore_latest(manager, checkpoint.abstract_like(_state(0), shardings), it)
    assert step == 3
    jax.tree.map(np.testing.assert_array_equal, state, _state(3))
    assert state["params"]["dense"]["kernel"].sharding == shardings["params"]["dense"]["kernel"]
    np.testing.assert_array_equal(next(it), next(saved_it))  # the iterator continues where it was saved
    manager.close()


def test_a_truncated_step_folder_is_skipped_for_the_previous_one(tmp_path):
    _, manager, shardings = _setup(tmp_path, keep=3)
    _save_steps(manager, [1, 2])
    state_dir = tmp_path / "checkpoints" / "2" / "state"
    for f in state_dir.rglob("*"):  # a save killed half-way: the array data never landed
        if f.is_file() and "ocdbt" in str(f.relative_to(state_dir)):
            f.unlink()
    state, step = checkpoint.restore_latest(manager, checkpoint.abstract_like(_state(0), shardings), _iterator())
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, state, _state(1))
    assert not (tmp_path / "checkpoints" / "2").exists()
    assert any(p.name.startswith("2.incomplete-") for p in (tmp_path / "checkpoints").iterdir())
    assert manager.all_steps() == [1]
    manager.close()


def test_no_checkpoint_restores_nothing(tmp_path):
    _, manager, shardings = _setup(tmp_path)
    assert checkpoint.restore_latest(manager, checkpoint.abstract_like(_state(0), shardings), _iterator()) is None
    manager.close()


def test_load_params_returns_host_numpy_and_the_config(tmp_path):
    cfg, manager, _ = _setup(tmp_path, keep=3)
    _save_steps(manager, [4, 7])
    manager.close()
    config, params, step = checkpoint.load_params(tmp_path)
    assert step == 7 and isinstance(config, ConfigDict) and config.batch_size == cfg.batch_size
    assert isinstance(params["dense"]["kernel"], np.ndarray)
    np.testing.assert_array_equal(params["dense"]["kernel"], np.asarray(_state(7)["params"]["dense"]["kernel"]))
    _, params4, _ = checkpoint.load_params(tmp_path, step=4)
    np.testing.assert_array_equal(params4["dense"]["bias"], np.asarray(_state(4)["params"]["dense"]["bias"]))
    with pytest.raises(ValueError, match="step=5"):
        checkpoint.load_params(tmp_path, step=5)


def test_load_params_errors_name_the_missing_piece(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpoint.load_params(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        checkpoint.load_params(tmp_path)


def test_manager_options_are_validated():
    cfg = common.pretrain_config().checkpoint
    cfg.max_to_keep = 0
    with pytest.raises(ValueError, match="config.checkpoint.max_to_keep"):
        checkpoint.make_manager("/tmp/unused", cfg)
    shutil.rmtree("/tmp/unused", ignore_errors=True)


def _pipeline_iterator():
    rng = np.random.default_rng(0)
    source = [{"image": rng.integers(0, 256, (12, 12), dtype=np.uint8), "vessel_map": np.zeros((12, 12), np.uint8)}
              for _ in range(10)]
    return iter(input_pipeline.make_dataset(source, global_batch=4, process_index=0, process_count=1, seed=0,
                                            input_cfg=common.pretrain_config().input, size=8))


def test_a_checkpoint_from_another_process_count_restores_and_repositions_the_iterator(tmp_path, caplog):
    _, manager, shardings = _setup(tmp_path, keep=3)
    it = _pipeline_iterator()
    for _ in range(3):
        next(it)
    checkpoint.save(manager, 3, _state(3), it)
    manager.wait_until_finished()
    data_iter = tmp_path / "checkpoints" / "3" / "data_iter"
    for f in data_iter.glob("process_*"):
        f.unlink()
    for p in range(2):  # as written by a 2-process run: no state file for process 0 of 1
        (data_iter / f"process_{p}-of-2.json").write_text(json.dumps({"next_global_batch": 3}))
    resumed = _pipeline_iterator()
    next(resumed)  # wherever it stood, the step repositions it
    with caplog.at_level("INFO", logger=checkpoint.__name__):
        state, step = checkpoint.restore_latest(manager, checkpoint.abstract_like(_state(0), shardings), resumed)
    assert step == 3
    jax.tree.map(np.testing.assert_array_equal, state, _state(3))
    assert "data iterator: checkpoint written by 2 processes, now 1; repositioned from step 3" in caplog.text
    np.testing.assert_array_equal(next(resumed)["index"], next(it)["index"])  # global batch 3: [12, 16)
    assert (tmp_path / "checkpoints" / "3").is_dir()
    manager.close()

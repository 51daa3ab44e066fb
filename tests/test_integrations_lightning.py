"""RankMeCallback (rankme_fast.integrations.lightning), issue 13: a Trainer(accelerator="cpu") fit of a tiny
model logs, per epoch and stage, the value recomputed here from the very embeddings its steps returned
(float64 SVD + the DESIGN §2 formula in NumPy); also across a checkpoint resume and in a 2-process DDP fit.
"""
from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchmetrics")
_PL = [name for name in ("lightning.pytorch", "pytorch_lightning") if importlib.util.find_spec(name.split(".")[0])]
if not _PL:
    pytest.skip("neither lightning nor pytorch_lightning is installed", allow_module_level=True)

from rankme_fast.integrations.lightning import RankMeCallback  # noqa: E402
from tests.conftest import np_collapse_auc, np_rankme, ref_sv  # noqa: E402
from tests.lt_models import loaders, make_module, make_recorder  # noqa: E402

TOL = 1e-9


def rel(a, b) -> float:
    return abs(float(a) - float(b)) / abs(float(b))


@pytest.fixture(params=_PL)
def pl(request):
    return importlib.import_module(request.param)


def trainer_for(pl, callbacks, **kw):
    opts = dict(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=2)
    opts.update(kw)
    return pl.Trainer(callbacks=callbacks, **opts)


def quiet():
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def test_train_and_validation_stages_log_recomputed_values(pl):
    quiet()
    torch.manual_seed(0)
    model = make_module(pl)()
    rec = make_recorder(pl)()
    cbs = [RankMeCallback(stage="train", name="rk_train"),
           RankMeCallback(stage="validation", metrics=("rankme", "collapse_auc")), rec]
    train, val = loaders()
    trainer_for(pl, cbs).fit(model, train, val)
    assert sorted(rec.per_epoch) == [0, 1]
    for epoch, logged in rec.per_epoch.items():
        zt = torch.cat(model.seen["train"][epoch])
        zv = torch.cat(model.seen["validation"][epoch])  # the sanity check's batches are not in here
        assert zt.shape[0] == 200 and zv.shape[0] == 200
        assert rel(logged["rk_train"], np_rankme(ref_sv(zt))) < TOL
        assert rel(logged["rankme/rankme"], np_rankme(ref_sv(zv))) < TOL
        assert rel(logged["rankme/collapse_auc"], np_collapse_auc(ref_sv(zv, center=True))) < TOL
    assert rec.per_epoch[0]["rk_train"] != rec.per_epoch[1]["rk_train"]  # the model trained in between


def test_every_n_epochs_and_callable_target(pl):
    quiet()
    torch.manual_seed(1)
    model = make_module(pl)()
    rec = make_recorder(pl)()
    calls = []

    def target(pl_module, outputs, batch):
        calls.append(pl_module.current_epoch)
        return outputs["embedding"] * 2.0  # RankMe is scale-invariant; the callable is really used

    cb = RankMeCallback(stage="train", target=target, every_n_epochs=2, name="rk")
    train, val = loaders()
    trainer_for(pl, [cb, rec], max_epochs=4).fit(model, train, val)
    assert set(calls) == {1, 3}  # epochs e with (e + 1) % 2 == 0
    assert "rk" not in rec.per_epoch[0]  # nothing logged before the first active epoch
    for epoch in (1, 3):
        assert rel(rec.per_epoch[epoch]["rk"], np_rankme(ref_sv(torch.cat(model.seen["train"][epoch])))) < TOL


def test_resume_from_checkpoint(pl, tmp_path):
    quiet()
    torch.manual_seed(2)
    model = make_module(pl)()
    train, val = loaders()
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer_for(pl, [RankMeCallback(stage="train"), ckpt_cb], max_epochs=1,
                enable_checkpointing=True).fit(model, train, val)
    ckpt = tmp_path / "last.ckpt"
    assert ckpt.exists()
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    key = RankMeCallback(stage="train").state_key
    assert key in saved and saved[key]["version"] == 1  # the callback's state is in the checkpoint

    resumed = make_module(pl)()
    rec = make_recorder(pl)()
    trainer_for(pl, [RankMeCallback(stage="train"), rec, pl.callbacks.ModelCheckpoint(dirpath=tmp_path)],
                max_epochs=2, enable_checkpointing=True).fit(resumed, train, val, ckpt_path=str(ckpt))
    assert sorted(rec.per_epoch) == [1]
    z = torch.cat(resumed.seen["train"][1])
    assert z.shape[0] == 200
    assert rel(rec.per_epoch[1]["rankme"], np_rankme(ref_sv(z))) < TOL


def test_mid_epoch_state_round_trip(pl):
    """A mid-epoch checkpoint holds the rows seen so far; a new callback loaded from it continues."""
    z = torch.randn(300, 10, dtype=torch.float64) @ torch.randn(10, 10, dtype=torch.float64)
    cb = RankMeCallback(metrics=("rankme", "collapse_auc"))
    cb.metric.update(z[:130])
    state = cb.state_dict()
    assert state["metric"]["scatter"].device.type == "cpu"
    cb2 = RankMeCallback(metrics=("rankme", "collapse_auc"))
    cb2.load_state_dict(state)
    cb2.metric.update(z[130:])
    out = cb2.metric.compute()
    assert rel(out["rankme"], np_rankme(ref_sv(z))) < TOL
    assert rel(out["collapse_auc"], np_collapse_auc(ref_sv(z, center=True))) < TOL
    with pytest.raises(ValueError, match="metrics"):
        RankMeCallback(metrics=("rankme",)).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        cb2.load_state_dict({"metric": {}})


def test_state_keys_differ_per_stage_and_name():
    keys = {RankMeCallback(stage="train").state_key, RankMeCallback(stage="validation").state_key,
            RankMeCallback(name="other").state_key}
    assert len(keys) == 3


def test_missing_target_names_the_keys(pl):
    quiet()
    model = make_module(pl)()
    train, val = loaders(n=64)
    with pytest.raises(KeyError, match="no 'emb'.*'embedding', 'loss'"):
        trainer_for(pl, [RankMeCallback(stage="train", target="emb")], max_epochs=1).fit(model, train, val)


def test_collapsed_epoch_logs_nan_with_warning(pl):
    quiet()

    class Zero(make_module(pl)):
        def _step(self, batch, stage):
            out = super()._step(batch, stage)
            out["embedding"] = out["embedding"] * 0.0  # total collapse: RankMe is undefined
            return out

    rec = make_recorder(pl)()
    train, val = loaders(n=64)
    with pytest.warns(RuntimeWarning, match="logs NaN.*all-zero"):
        trainer_for(pl, [RankMeCallback(stage="train"), rec], max_epochs=1).fit(Zero(), train, val)
    assert math.isnan(rec.per_epoch[0]["rankme"])


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"stage": "test"}, ValueError, "stage"), ({"every_n_epochs": 0}, ValueError, "every_n_epochs"),
    ({"name": ""}, ValueError, "name"), ({"target": 3}, TypeError, "target"),
    ({"metrics": ("nope",)}, ValueError, "nope"), ({"max_rows": -1}, ValueError, "max_rows"),
])
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        RankMeCallback(**kwargs)


def test_is_a_callback_of_each_installed_package():
    for name in _PL:
        assert isinstance(RankMeCallback(), importlib.import_module(name).Callback)


def test_missing_extra_is_named():
    code = ("import sys\nsys.modules['lightning'] = None\nsys.modules['pytorch_lightning'] = None\n"
            "try:\n    import rankme_fast.integrations.lightning\nexcept ImportError as e:\n    print('IMPORTERROR', e)\n")
    from tests.test_integrations_torchmetrics import _child_env

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_child_env())
    assert out.returncode == 0, out.stderr
    assert 'pip install "rankme_fast[lightning]"' in out.stdout


@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="the DDP fit uses lightning.pytorch")
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_lightning_ddp_two_processes(tmp_path):
    """strategy="ddp", 2 CPU processes (gloo): the logged value is RankMe of *both* ranks' embeddings."""
    from tests.test_integrations_torchmetrics import _child_env

    worker = Path(__file__).resolve().parent / "lt_ddp_worker.py"
    env = _child_env()
    proc = subprocess.run([sys.executable, str(worker), json.dumps({"n": 160, "epochs": 2}), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for epoch in (0, 1):
        zt = torch.cat([z for r in ranks for z in r["seen"]["train"][epoch]])
        zv = torch.cat([z for r in ranks for z in r["seen"]["validation"][epoch]])
        assert zt.shape[0] == 160 and zv.shape[0] == 160  # each rank saw half (DistributedSampler)
        for r in ranks:  # every rank logs the global value
            assert rel(r["logged"][epoch]["rk_train"], np_rankme(ref_sv(zt))) < TOL
            assert rel(r["logged"][epoch]["rankme/rankme"], np_rankme(ref_sv(zv))) < TOL
            assert rel(r["logged"][epoch]["rankme/collapse_auc"], np_collapse_auc(ref_sv(zv, center=True))) < TOL


def test_verbose_logs_convergence_and_warns(pl, caplog):
    """verbose=True (issue 16): one line per logged epoch with RankMe on the nested seeded subsets (rows whose
    hash is below 1/8, 1/4, 1/2) and all N rows, each equal to the float64 reference on those rows, and a
    UserWarning when the last doubling moves RankMe by more than 1 %."""
    import logging

    from rankme_fast._rows import _unit_hash

    quiet()
    torch.manual_seed(2)
    model = make_module(pl)()
    cb = RankMeCallback(stage="validation", metrics=("collapse_auc",), verbose=True, seed=4, name="v")
    train, val = loaders()
    with caplog.at_level(logging.INFO, logger="rankme_fast"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_for(pl, [cb], max_epochs=1).fit(model, train, val)
    lines = [r.getMessage() for r in caplog.records if "RankMe convergence" in r.getMessage()]
    assert len(lines) == 1, lines
    z = torch.cat(model.seen["validation"][0])
    u = torch.from_numpy(_unit_hash(np.arange(z.shape[0], dtype=np.uint64), 4 * 1_000_003))
    vals = []
    for lab, frac in (("N/8", 0.125), ("N/4", 0.25), ("N/2", 0.5), ("N", 1.0)):
        part = z if frac == 1.0 else z[u < frac]
        want = np_rankme(ref_sv(part))
        vals.append(want)
        got = float(lines[0].split(f"{lab}={part.shape[0]}: ")[1].split(",")[0])
        assert rel(got, want) < 1e-3  # the line prints 4 significant digits
    moved = abs(vals[-1] - vals[-2]) / vals[-1]
    warned = [w for w in caught if "probably too small" in str(w.message)]
    assert bool(warned) == (moved > 0.01)

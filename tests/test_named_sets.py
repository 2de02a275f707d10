"""Named evaluation sets end to end: `val/acc` is the mean over the named sets (so `ModelCheckpoint`/`EarlyStopping`
monitor it as in the examples), `trainer.test` returns and prints each set's figures under its own loader only, and
`lightning-meta predict` saves what a user needs to score the predictions (episode indices and query labels)."""

import json
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from lightning_meta import MAML, EpisodicDataModule, ProtoNet
from lightning_meta.cli import run
from lightning_meta.data import Sinusoid, TensorClassDataset
from lightning_meta.models import MLP

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
FIGURES = ("acc", "acc_ci95", "loss", "diverged")


def _toy(seed, classes=10, prefix="c"):
    g = torch.Generator().manual_seed(seed)
    return TensorClassDataset(torch.randn(classes * 8, 6, generator=g), torch.arange(classes).repeat_interleave(8),
                              class_names=[f"{prefix}{i}" for i in range(classes)])


def _trainer(**kwargs):
    return L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def _mean_of_sets(logged, stage, names, value="acc"):
    """What `<stage>/<value>` must be: the mean over the sets, its interval that of a mean of independent means."""
    per_set = {f: [float(logged[f"{stage}/{n}/{f.replace('acc', value)}"]) for n in names]
               for f in ("acc", "acc_ci95", "loss", "diverged")}
    return {f"{stage}/{value}": sum(per_set["acc"]) / len(names),
            f"{stage}/{value}_ci95": math.sqrt(sum(c * c for c in per_set["acc_ci95"])) / len(names),
            f"{stage}/loss": sum(per_set["loss"]) / len(names), f"{stage}/diverged": sum(per_set["diverged"])}


def test_checkpointing_and_early_stopping_monitor_the_mean_over_named_validation_sets(tmp_path):
    torch.manual_seed(0)
    model = ProtoNet(MLP(6, hidden=(16,), out_features=8))
    data = EpisodicDataModule(train=_toy(0, prefix="t"), val={"a": _toy(1, prefix="a"), "b": _toy(2, 6, prefix="b")},
                              n_way=3, n_shot=2, n_query=3, meta_batch_size=2, train_episodes=4, val_episodes=6)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max")
    stopping = EarlyStopping(monitor="val/acc", mode="max", patience=5)
    trainer = _trainer(max_epochs=2, callbacks=[checkpoint, stopping])
    trainer.fit(model, data)  # before: MisconfigurationException (no `val/acc` logged) after the first epoch
    logged = trainer.callback_metrics
    for key, value in _mean_of_sets(logged, "val", ["a", "b"]).items():
        assert float(logged[key]) == pytest.approx(value, abs=1e-6), key
    assert Path(checkpoint.best_model_path).is_file()  # both callbacks saw the same figure: the best mean
    assert float(stopping.best_score) == pytest.approx(float(checkpoint.best_model_score))


def test_each_named_test_set_is_returned_and_printed_under_its_own_loader_only(capsys):
    torch.manual_seed(0)
    model = ProtoNet(MLP(6, hidden=(16,), out_features=8))
    sets = {"near": _toy(1, prefix="n"), "far": _toy(2, 6, prefix="f")}
    data = EpisodicDataModule(test=sets, n_way=3, n_shot=2, n_query=3, meta_batch_size=2, test_episodes=6)
    trainer = _trainer()
    results = trainer.test(model, data, verbose=True)
    means = _mean_of_sets(trainer.logged_metrics, "test", list(sets))
    assert len(results) == 2
    for result, name in zip(results, ["near", "far"]):
        assert set(result) == {f"test/{name}/{f}" for f in FIGURES} | set(means)  # its own set, and the means
        for key, value in means.items():  # the means, logged once, are in every loader's dict (Lightning's rule)
            assert result[key] == pytest.approx(value, abs=1e-6)
        assert result[f"test/{name}/acc"] == pytest.approx(float(trainer.logged_metrics[f"test/{name}/acc"]))
    printed = capsys.readouterr().out.splitlines()  # Lightning's table (plain or rich): a column per loader
    header = next(line for line in printed if "DataLoader 1" in line)
    centres = [header.index(f"DataLoader {i}") + len("DataLoader 0") / 2 for i in range(2)]

    def columns(metric):  # the loader columns in which the metric's row shows a figure
        row = next(line for line in printed if re.search(rf"(^|\W){re.escape(metric)}\s", line))
        figures = re.finditer(r"\d+\.\d+(e-?\d+)?", row[row.index(metric) + len(metric):])
        offset = row.index(metric) + len(metric)
        return [min((0, 1), key=lambda i: abs(centres[i] - offset - (m.start() + m.end()) / 2)) for m in figures]

    for name, column in (("near", 0), ("far", 1)):  # before: both sets' figures in both columns
        assert columns(f"test/{name}/acc") == [column] and columns(f"test/{name}/loss") == [column]
    assert columns("test/acc") == [0, 1]


def test_regression_named_sets_log_the_mean_squared_error_over_the_sets():
    torch.manual_seed(0)
    model = MAML(MLP(1, hidden=(8,), out_features=1), inner_lr=0.01, inner_steps=1)
    data = EpisodicDataModule(test={"a": Sinusoid(), "b": Sinusoid(amplitude=(4.0, 5.0))}, n_way=1,
                              n_shot=5, n_query=5,
                              meta_batch_size=2, test_episodes=4)
    trainer = _trainer()
    results = trainer.test(model, data, verbose=False)
    logged = trainer.logged_metrics
    for key, value in _mean_of_sets(logged, "test", ["a", "b"], value="mse").items():
        assert float(logged[key]) == pytest.approx(value, rel=1e-5), key
    assert "test/a/mse" in results[0] and "test/a/mse" not in results[1] and "test/mse" in results[1]


def test_lightning_meta_predict_saves_what_scores_each_named_set_as_test_does(tmp_path, recwarn):
    sets = {"near": {"class_path": "lightning_meta.data.SyntheticGlyphs",
                     "init_args": {"split": "test", "num_classes": 10, "samples_per_class": 20}},
            "far": {"class_path": "lightning_meta.data.SyntheticGlyphs",
                    "init_args": {"split": "test", "num_classes": 6, "samples_per_class": 20, "seed": 1}}}
    cli = run(["predict", f"--config={CONFIGS / 'protonet_glyphs'}.yaml",
               f"--trainer.logger.init_args.save_dir={tmp_path}", f"--data.test={json.dumps(sets)}",
               "--data.test_episodes=5", "--data.n_query=3", "--trainer.enable_progress_bar=false",
               "--model.init_args.backbone=torch.nn.Flatten"])  # prototypes of pixels: logits far from ties
    assert not [w for w in recwarn if "Couldn't infer the batch indices" in str(w.message)]  # they are known
    written = torch.load(cli.prediction_writer.path, weights_only=True)
    assert set(written) == {"predictions", "batch_indices", "query_y"}
    results = cli.trainer.test(cli.model, cli.datamodule, verbose=False)
    for name in sets:
        logits, labels, indices = (written[k][name] for k in ("predictions", "query_y", "batch_indices"))
        # each meta-batch's episode indices (before: [[]]): the 5 test episodes in meta-batches of 2
        assert indices == [[0, 1], [2, 3], [4]]
        assert [x.shape[:2] for x in logits] == [y.shape for y in labels] == [(2, 15), (2, 15), (1, 15)]
        logits, labels = torch.cat(logits), torch.cat(labels)  # [E, M, N], [E, M]
        top2 = logits.topk(2, dim=-1).values
        assert (top2[..., 0] - top2[..., 1]).min() > 1e-3  # no near-tie: the argmax is the same on any float path
        per_episode = (logits.argmax(-1) == labels).float().mean(1)  # [E]
        assert float(per_episode.mean()) == pytest.approx(float(cli.trainer.logged_metrics[f"test/{name}/acc"]),
                                                          abs=1e-6)
    assert results[0]["test/near/acc"] == pytest.approx(float(cli.trainer.logged_metrics["test/near/acc"]))

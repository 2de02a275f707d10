"""Meta-Dataset as users run it (issue #30, item 5): `MetaDatasetDataModule` over one folder of converted records, the
two recipes (examples/configs/recipes/metadataset_{protonet,protomaml}.yaml) run end to end through `lightning-meta`
on all 10 sources fabricated in the real format (the reference's spec files, every class shrunk to 4 JPEGs of 8 px),
each test source logged as `test/<source>/acc` with its interval and `test/acc` their mean; training episodes uniform
over the 8 training sources; the same run in a plain `lightning.Trainer`; a missing source named at construction."""

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from mdtrees import ALL_SOURCES, SPECS, fabricate

from lightning_meta import MetaDatasetDataModule, ProtoNet, RaggedEpisode, VariableEpisodes
from lightning_meta.cli import run
from lightning_meta.data import prune_cache
from lightning_meta.data.datasets.metadataset import solid_jpeg, write_source
from lightning_meta.data.streams import episode_rng
from lightning_meta.models import ResNet12

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "configs" / "recipes"
TRAIN = ALL_SOURCES[:8]  # the reference's "all sources" training selection
needs_specs = pytest.mark.skipif(not (SPECS / "ilsvrc_2012_dataset_spec.json").is_file(),
                                 reason=f"the reference's spec files not found in {SPECS} (the project's shared/ folder)")
FEWER_STEPS = {"metadataset_protomaml": ["--model.init_args.inner_steps=1", "--model.init_args.eval_inner_steps=1"]}
SMALL = {"image_size": 16, "store": "encoded", "train_episodes": 2, "val_episodes": 2, "test_episodes": 2}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """All 10 sources in the real format, 4 images a class (about 1.5 s), and one cache folder for the module."""
    if not (SPECS / "ilsvrc_2012_dataset_spec.json").is_file():
        pytest.skip(f"the reference's spec files not found in {SPECS}")
    root = tmp_path_factory.mktemp("metadataset") / "records"
    for name in ALL_SOURCES:
        fabricate(root, name, per_class=4, size=8)
    return root, tmp_path_factory.mktemp("metadataset-cache")


def check_test_figures(metrics, sources=ALL_SOURCES):
    """Every test source's accuracy and interval, and `test/acc` (`test/acc_ci95`) their mean (the interval of a mean
    of independent means)."""
    acc = {s: float(metrics[f"test/{s}/acc"]) for s in sources}
    ci = {s: float(metrics[f"test/{s}/acc_ci95"]) for s in sources}
    assert all(0.0 <= a <= 1.0 for a in acc.values()) and all(c >= 0.0 for c in ci.values())
    assert float(metrics["test/acc"]) == pytest.approx(sum(acc.values()) / len(sources), abs=1e-6)
    assert float(metrics["test/acc_ci95"]) == pytest.approx(math.sqrt(sum(c * c for c in ci.values())) / len(sources),
                                                            abs=1e-6)


@needs_specs
@pytest.mark.parametrize("recipe", ["metadataset_protonet", "metadataset_protomaml"])
def test_each_metadataset_recipe_fits_validates_and_tests_every_source_through_the_cli(recipe, records, tmp_path):
    root, cache = records
    common = [f"--config={RECIPES / recipe}.yaml", f"--data.records={root}",  # what a user gives
              # what keeps it to seconds here: tiny images and backbone, few episodes, CPU, no workers
              f"--data.cache={cache}", "--data.image_size=16", "--data.store=encoded", "--data.num_workers=0",
              "--data.train_episodes=2", "--data.val_episodes=2", "--data.test_episodes=2",
              "--model.init_args.backbone.init_args.channels=[8,8,8,8]", "--trainer.accelerator=cpu",
              f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", *FEWER_STEPS.get(recipe, [])]
    fit = run(["fit", *common, "--trainer.max_steps=2"])
    dm = fit.datamodule
    assert isinstance(dm, MetaDatasetDataModule) and fit.trainer.global_step == 2
    # the recipe's protocol, untouched by the overrides: 8 training sources, ImageNet validation, 10 test sources,
    # Meta-Dataset's variable episodes with the reference's constants
    assert (list(dm.train), list(dm.val), list(dm.test)) == (list(TRAIN), ["ilsvrc_2012"], list(ALL_SOURCES))
    assert dm.variable_episodes == VariableEpisodes() and (dm.n_way, dm.n_shot, dm.n_query) == (None, None, None)
    fitted = fit.trainer.logged_metrics  # validation at the end of the (2-episode) epoch: ImageNet's val classes
    assert float(fitted["val/acc"]) == float(fitted["val/ilsvrc_2012/acc"])
    assert dm.sources("val")["val/ilsvrc_2012"].split == "val"
    ckpt = Path(fit.trainer.checkpoint_callback.last_model_path)
    saved = torch.load(ckpt, weights_only=True)  # plain data only
    assert saved["datamodule_hyper_parameters"]["records"] == str(root)
    validated = run(["validate", *common, f"--ckpt_path={ckpt}"]).trainer.logged_metrics
    assert float(validated["val/acc"]) == float(fitted["val/acc"])  # the same weights on the same fixed episodes
    assert float(validated["val/loss"]) == pytest.approx(float(fitted["val/loss"]), abs=1e-5)
    tested = run(["test", *common, f"--ckpt_path={ckpt}"])
    check_test_figures(tested.trainer.logged_metrics)
    assert all(f"test/{s}/loss" in tested.trainer.logged_metrics for s in ALL_SOURCES)
    built = {k: v._dataset is not None for k, v in tested.datamodule.sources("train").items()}
    assert not any(built.values()), built  # `test` never indexed or decoded a training split


@needs_specs
def test_training_episodes_are_uniform_over_the_8_training_sources(records):
    root, cache = records
    dm = MetaDatasetDataModule(root, cache=cache, **{**SMALL, "train_episodes": 16})
    dm.setup("fit")
    sampler = dm.samplers["train"]
    assert sampler.names == list(TRAIN)
    # 800 episodes, each source p = 1/8: count ~ Binomial(800, 1/8), mean 100, sd sqrt(800 * 1/8 * 7/8) = 9.35. Each
    # count within 4 sd (p = 6e-5 per source, < 5e-4 for any of 8 under a uniform draw; the draw is seeded, so this
    # is deterministic): a source left out or drawn at double (or half) the rate is far outside
    counts = np.bincount(sampler.sources("train", 0, range(800)), minlength=8)
    sd = math.sqrt(800 * (1 / 8) * (7 / 8))
    assert counts.sum() == 800 and np.all(np.abs(counts - 100) <= 4 * sd), dict(zip(TRAIN, counts.tolist()))
    # and the training loader's batches are those sources' episodes: batch i is source s's own draw from episode i's
    # generator (its first number chose s), so an episode never mixes sources
    which = sampler.sources("train", 0, range(16))
    for i, batch in enumerate(dm.train_dataloader()):
        assert isinstance(batch, RaggedEpisode) and batch.num_tasks == 1
        rng = episode_rng(dm.seed, "train", 0, i)
        rng.integers(len(TRAIN))  # the source draw
        own = sampler.samplers[which[i]].draw([rng])
        torch.testing.assert_close(batch.support_x, own.support_x, rtol=0, atol=0)
        torch.testing.assert_close(batch.query_y, own.query_y, rtol=0, atol=0)
    assert len(set(which.tolist())) >= 6  # 16 episodes already span most sources


@needs_specs
def test_the_protonet_run_in_a_plain_trainer_logs_every_test_source_and_their_mean(records, tmp_path):
    root, cache = records
    L.seed_everything(0)
    dm = MetaDatasetDataModule(root, cache=cache, **SMALL)
    learner = ProtoNet(ResNet12(channels=(8, 8, 8, 8)), lr=1e-3)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(learner, dm)
    assert trainer.global_step == 2
    assert float(trainer.logged_metrics["val/acc"]) == float(trainer.logged_metrics["val/ilsvrc_2012/acc"])
    results = trainer.test(learner, dm, verbose=False)
    assert len(results) == len(ALL_SOURCES)  # a loader (a dict of figures) per test source, in order
    for source, figures in zip(ALL_SOURCES, results):
        assert {f"test/{source}/acc", f"test/{source}/acc_ci95", "test/acc"} <= set(figures)
    check_test_figures(trainer.logged_metrics)


def tiny_source(root: Path, name: str, splits=(3, 0, 6)):
    """A flat source of 6 / 0 / 6 (train / val / test) classes, 4 images each."""
    total = sum(splits)
    spec = {"__class__": "DatasetSpecification", "name": name, "path": str(root / name),
            "classes_per_split": dict(zip(("TRAIN", "VALID", "TEST"), splits)), "file_pattern": "{}.tfrecords",
            "images_per_class": {str(c): 4 for c in range(total)}, "class_names": {str(c): f"c{c}" for c in range(total)}}
    write_source(root / name, spec, lambda c, i: solid_jpeg(c, i, 8))


def test_a_missing_source_folder_is_named_with_the_argument_at_construction(tmp_path):
    root, cache = tmp_path / "records", tmp_path / "cache"
    tiny_source(root, "dtd")
    tiny_source(root, "traffic_sign", splits=(0, 0, 6))
    with pytest.raises(ValueError, match=r"no converted source 'ilsvrc_2012' \(no .*ilsvrc_2012/dataset_spec.json; "
                                         r"named in `train_sources`, `val_sources`, `test_sources`\).*--data.records.*"
                                         r"sources found in .*: dtd, traffic_sign"):
        MetaDatasetDataModule(root, cache=cache)
    with pytest.raises(ValueError, match=r"no converted source 'mnist' .*named in `test_sources`\)\. .*remove it from "
                                         r"`test_sources`"):
        MetaDatasetDataModule(root, ["dtd"], [], ["dtd", "mnist"], cache=cache)
    with pytest.raises(ValueError, match=r"source 'traffic_sign' has no train classes .*remove it from `train_sources`"):
        MetaDatasetDataModule(root, ["dtd", "traffic_sign"], [], ["dtd"], cache=cache)
    with pytest.raises(ValueError, match=r"`records` .*nowhere is not a folder.*--data.records"):
        MetaDatasetDataModule(tmp_path / "nowhere", cache=cache)
    with pytest.raises(TypeError, match=r"expected `test_sources` to be a list of source names"):
        MetaDatasetDataModule(root, ["dtd"], [], "dtd", cache=cache)
    with pytest.raises(ValueError, match=r"`train_sources` names 'dtd' more than once"):
        MetaDatasetDataModule(root, ["dtd", "dtd"], [], ["dtd"], cache=cache)
    assert not cache.exists()  # before any work: nothing indexed or decoded
    # through the command line, the same sentence first (not inside jsonargparse's message about Union types)
    with pytest.raises(ValueError, match=r"^MetaDatasetDataModule: .* no converted source 'ilsvrc_2012'") as raised:
        run(["fit", f"--config={RECIPES / 'metadataset_protonet'}.yaml", f"--data.records={root}",
             f"--data.cache={cache}", f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert "Union" not in str(raised.value)


def test_constructing_reads_only_the_specs_and_each_stage_builds_only_its_own_splits(tmp_path):
    root, cache = tmp_path / "records", tmp_path / "cache"
    tiny_source(root, "dtd", splits=(6, 6, 6))
    tiny_source(root, "traffic_sign", splits=(0, 0, 6))
    dm = MetaDatasetDataModule(root, ["dtd"], ["dtd"], ["dtd", "traffic_sign"], image_size=8, store="decoded",
                               cache=cache, variable_episodes={"min_way": 3, "max_way": 5}, test_episodes=4)
    str(dm), repr(dm)  # printing builds nothing (Lightning's __str__ would build every loader)
    assert not cache.exists()
    assert len(dm.test["traffic_sign"]) == 24 and dm.test["dtd"].class_names == [f"c{c}" for c in range(12, 18)]
    dm.setup("test")
    decoded = sorted(p.name.split("-")[2] for p in cache.glob("*.lmcache"))
    assert decoded == ["test", "test"]  # dtd's and traffic_sign's test splits; not dtd's training or validation split
    batch = next(iter(dm.test_dataloader()["traffic_sign"]))
    assert isinstance(batch, RaggedEpisode) and 3 <= batch.ways[0] <= 5 and batch.support_x.shape[1:] == (3, 8, 8)
    # the data module's splits name their files: pruning with them kept removes only what they do not use
    kept = [dm.test["dtd"], dm.test["traffic_sign"]]
    assert {f.path for d in kept for f in (d.cache_file, d.index_file)} == set(cache.iterdir())
    assert prune_cache(kept, cache) == []

"""Meta-Dataset records under DDP, run on tests/ddp_run.py's forked ranks for test_metadataset.py:

    write(TREE)                      # once, before the ranks start: a flat source of 100 classes, 16 px JPEGs
    run(TREE, CACHE, OUT_DIR)        # on each rank

Both ranks open the same source with the same cache folder at the same time, in both stores, then train ProtoNet for
two steps on variable episodes drawn from the encoded store. Each rank writes OUT_DIR/rank{R}.pt: which of its
index and decoded cache it built (one rank builds each file, the other waits for it and maps it) and when its
constructions started and ended, their paths, whether its two stores
gave the same pixels for every item, and the training meta-batches it drew.
"""

import os
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from mdtrees import flat_spec  # noqa: E402

from lightning_meta import EpisodicDataModule, ProtoNet, VariableEpisodes  # noqa: E402
from lightning_meta.data import MetaDatasetRecords  # noqa: E402
from lightning_meta.data.datasets.metadataset import solid_jpeg, write_source  # noqa: E402
from lightning_meta.models import Conv4  # noqa: E402

RULES = VariableEpisodes(min_way=3, max_way=5, max_query=2, max_support=10, max_support_per_class=3)


def write(tree: Path) -> None:
    write_source(tree, flat_spec("ddp", [10 + c % 3 for c in range(100)]), lambda c, i: solid_jpeg(c, i, 16))


class Recorder(L.Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batches.append((batch.support_x.clone(), batch.support_sizes, batch.ways))


def run(tree: Path, cache: Path, out: Path) -> None:
    kw = dict(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False)
    rank = int(os.environ["RANK"])
    (out / f"ready{rank}").touch()  # both ranks construct at the same moment: one builds, the other must wait
    while not all((out / f"ready{r}").exists() for r in range(2)):
        time.sleep(0.001)
    times = [time.time()]
    encoded = MetaDatasetRecords(tree, "train", image_size=16, store="encoded", cache=cache)
    times.append(time.time())
    decoded = MetaDatasetRecords(tree, "train", image_size=16, store="decoded", cache=cache)
    times.append(time.time())
    everything = torch.arange(len(encoded))
    same_pixels = torch.equal(encoded.gather(everything), decoded.gather(everything))
    L.seed_everything(0, verbose=False)
    rec = Recorder()
    trainer = L.Trainer(callbacks=[rec], max_steps=2, limit_val_batches=0, **kw)
    data = EpisodicDataModule(train=encoded, n_way=None, n_shot=None, n_query=None, variable_episodes=RULES,
                              meta_batch_size=1, train_episodes=8, seed=5)
    trainer.fit(ProtoNet(Conv4(in_channels=3, hidden=8), lr=3e-3), data)
    torch.save({"built": {"encoded_index": encoded.index_file.built, "decoded_index": decoded.index_file.built,
                          "decoded_cache": decoded.cache_file.built},
                "paths": {"index": str(encoded.index_file.path), "decoded_index": str(decoded.index_file.path),
                          "cache": str(decoded.cache_file.path)},
                "times": {"index": times[:2], "cache": times[1:]}, "same_pixels": same_pixels,
                "batches": rec.batches}, out / f"rank{trainer.global_rank}.pt")

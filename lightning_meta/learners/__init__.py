from lightning_meta.data.checks import check_episode
from lightning_meta.learners.anil import ANIL
from lightning_meta.learners.attention import AttentionLearner
from lightning_meta.learners.base import MetaLearner, TaskPredictor
from lightning_meta.learners.maml import MAML
from lightning_meta.learners.metasgd import MetaSGD
from lightning_meta.learners.pretrain import Pretrainer
from lightning_meta.learners.protonet import ProtoNet

__all__ = ["ANIL", "AttentionLearner", "MAML", "MetaLearner", "MetaSGD", "Pretrainer", "ProtoNet", "TaskPredictor",
           "check_episode"]

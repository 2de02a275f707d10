"""Meta-SGD (Li et al. 2017): MAML with a learned inner rate for every parameter element."""

from __future__ import annotations

from lightning_meta.learners.maml import MAML


class MetaSGD(MAML):
    """Meta-SGD (Li et al. 2017): learns a step size for every parameter element, initialised to ``inner_lr``.

    Example:
        >>> from lightning_meta.models import MLP
        >>> m = MetaSGD(MLP(1, (4,), 1), inner_lr=0.1)
        >>> sorted(m.inner_lrs.keys()), m.inner_lrs["features__1__weight"].shape
        (['features__1__bias', 'features__1__weight', 'head__bias', 'head__weight'], torch.Size([4, 1]))
    """

    meta_sgd = True

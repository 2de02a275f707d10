"""The hand-written inner-loop gradient for linear/activation chains against autograd: values, second-order
meta-gradients, float16 loss scaling, shared (unadapted) layers, and the cases it must hand back to autograd."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightning_meta.functional import batched_chain, batched_chain_grads, per_task_loss, scaled_grad

ACTIVATIONS = [nn.ReLU(), nn.ReLU(inplace=True), nn.LeakyReLU(0.2), nn.LeakyReLU(0.2, inplace=True), nn.Tanh(),
               nn.Sigmoid(), nn.Identity()]


def chain(act, flatten=False):
    torch.manual_seed(0)
    layers = [nn.Flatten()] if flatten else []
    return nn.Sequential(*layers, nn.Linear(6, 8), act, nn.Linear(8, 8), act, nn.Linear(8, 3))


def task_data(b=4, n=7, regression=False, shape=(6,)):
    torch.manual_seed(1)
    x = torch.randn(b, n, *shape)
    y = torch.randn(b, n) if regression else torch.randint(0, 3, (b, n))
    return x, y


def stacked(net, names=None):
    return {n: p.expand(4, *p.shape) for n, p in net.named_parameters() if names is None or n in names}


def reference(net, params, x, y, scale=1.0, create_graph=True):
    forward = batched_chain(net)
    return scaled_grad(lambda p: per_task_loss(forward(p, x), y), params, scale, create_graph=create_graph,
                       engine="autograd")


@pytest.mark.parametrize("act", ACTIVATIONS, ids=repr)
@pytest.mark.parametrize("regression", [False, True])
def test_chain_gradients_and_their_second_order_derivatives_equal_autograd(act, regression):
    net = chain(act)
    if regression:
        net[-1] = nn.Linear(8, 1)
    x, y = task_data(regression=regression)
    params = stacked(net)
    grads, losses = batched_chain_grads(net)(params, x, y, 1.0, True)
    want, want_losses = reference(net, params, x, y)
    torch.testing.assert_close(losses, want_losses)
    for k in params:
        torch.testing.assert_close(grads[k], want[k], atol=1e-6, rtol=1e-5)
    # second order: a loss of the adapted weights differentiated back to the shared initialization
    shared = list(net.parameters())
    probe = [torch.randn_like(g) for g in grads.values()]
    ours = torch.autograd.grad(sum((g * r).sum() for g, r in zip(grads.values(), probe)), shared)
    theirs = torch.autograd.grad(sum((want[k] * r).sum() for k, r in zip(params, probe)), shared)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_first_order_gradients_carry_no_graph():
    net = chain(nn.ReLU())
    x, y = task_data()
    grads, _ = batched_chain_grads(net)(stacked(net), x, y, 1.0, False)
    assert not any(g.requires_grad for g in grads.values())


def test_shared_layers_flatten_and_loss_scale():
    # only the last layer adapted (as ANIL's head), 4-d inputs flattened, float16 loss scale 1024: same as autograd
    net = chain(nn.Tanh(), flatten=True)
    x, y = task_data(shape=(2, 3))
    params = stacked(net, {"5.weight", "5.bias"})
    grads, _ = batched_chain_grads(net)(params, x, y, 1024.0, True)
    want, _ = reference(net, params, x, y, scale=1024.0)
    assert set(grads) == {"5.weight", "5.bias"} and all(g.dtype == torch.float32 for g in grads.values())
    for k in params:
        torch.testing.assert_close(grads[k], want[k], atol=1e-6, rtol=1e-5)


def test_chains_it_cannot_differentiate_by_hand_go_back_to_autograd():
    assert batched_chain_grads(nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))) is None
    assert batched_chain_grads(nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 3))) is None


@pytest.mark.parametrize("bias", [True, False])
def test_inputs_with_several_feature_dimensions_meet_each_task_s_own_weights(bias):
    # a sequence [B, n, L, F] through linear layers, B == n: a broadcasting matmul would pair task t with example t
    # (vmap vs loop 8e-2 apart before, and `batch1 must be a 3D tensor` with a bias); the reference runs each task
    # alone through the module itself
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16, bias=bias), nn.Tanh(), nn.Flatten(), nn.Linear(5 * 16, 4, bias=bias))
    b = n = 4
    x, y = torch.randn(b, n, 5, 3), torch.randint(0, 4, (b, n))
    params = {k: (p.detach() + 0.3 * torch.randn(b, *p.shape)).requires_grad_() for k, p in net.named_parameters()}
    own = [{k: v[t] for k, v in params.items()} for t in range(b)]
    want = torch.stack([functional_call(net, own[t], (x[t],)) for t in range(b)])
    torch.testing.assert_close(batched_chain(net)(params, x), want, atol=1e-6, rtol=1e-5)
    grads, losses = batched_chain_grads(net)(params, x, y, 1.0, True)
    for t in range(b):
        loss = nn.functional.cross_entropy(functional_call(net, own[t], (x[t],)), y[t])
        torch.testing.assert_close(losses[t], loss.detach(), atol=1e-6, rtol=1e-5)
        for k, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            torch.testing.assert_close(grads[k][t], g[t], atol=1e-6, rtol=1e-5)


def test_an_in_place_activation_after_one_whose_output_is_kept_gives_autograd_s_gradient():
    # Tanh keeps its output for its backward; LeakyReLU(inplace=True) would overwrite it (4.3e-3 off before)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LeakyReLU(0.2, inplace=True), nn.Linear(8, 3)).double()
    x, y = torch.randn(4, 7, 6, dtype=torch.float64), torch.randint(0, 3, (4, 7))
    params = stacked(net)
    grads, _ = batched_chain_grads(net)(params, x, y, 1.0, True)
    plain = nn.Sequential(net[0], nn.Tanh(), nn.LeakyReLU(0.2), net[3])  # the same weights, out of place
    want, _ = reference(plain, params, x, y)
    for k in params:
        torch.testing.assert_close(grads[k], want[k], atol=1e-12, rtol=1e-10)


def test_modules_that_do_not_run_their_plain_forward_are_not_batched():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    assert batched_chain(nn.Sequential(Scaled(6, 3))) is None
    hooked = nn.Linear(6, 3)
    hooked.register_forward_hook(lambda m, i, o: o * 0)
    assert batched_chain(nn.Sequential(hooked)) is None
    parametrized = nn.utils.parametrizations.weight_norm(nn.Linear(6, 3))
    assert batched_chain(nn.Sequential(parametrized)) is None
    assert batched_chain(nn.Sequential(nn.Linear(6, 3), nn.ReLU())) is not None

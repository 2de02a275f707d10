"""Real 2-process DDP on CPU (gloo): every case comes from tests/ddp_run.py's one launch (conftest `ddp_runs`), each
case's two ranks and the one process they must equal forked after one import."""

import pytest
import torch

CASES = (("ddp", 2), ("single", 1))


@pytest.fixture(scope="module")
def runs(ddp_runs):
    return {name: [torch.load(ddp_runs / name / f"rank{r}.pt") for r in range(devices)] for name, devices in CASES}


def test_ranks_draw_distinct_episodes_and_together_the_single_process_meta_batch(runs):
    r0, r1 = runs["ddp"]
    (single,) = runs["single"]
    assert len(r0["batches"]) == len(single["batches"]) == 3
    for step in range(3):
        union = torch.cat([r0["batches"][step], r1["batches"][step]])
        assert torch.equal(union, single["batches"][step])
        assert not any(torch.equal(a, b) for a in r0["batches"][step] for b in r1["batches"][step])


def test_ddp_maml_meta_gradient_equals_the_single_process_meta_gradient(runs):
    r0, r1 = runs["ddp"]
    (single,) = runs["single"]
    for a, b, c in zip(r0["grads"], r1["grads"], single["grads"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # all-reduced: identical on both ranks
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    for a, c in zip(r0["final"], single["final"]):  # and three optimizer steps later
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_ddp_maml_on_the_task_loop_streamed_task_by_task_equals_the_single_process_run(runs):
    r0, r1 = runs["ddp"]
    (single,) = runs["single"]
    assert len(r0["streamed_grads"]) == len(single["streamed_grads"]) == 6
    for a, b, c in zip(r0["streamed_grads"], r1["streamed_grads"], single["streamed_grads"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    for a, c in zip(r0["streamed_final"], single["streamed_final"]):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_ddp_protonet_training_equals_the_single_process_run(runs):
    r0, r1 = runs["ddp"]
    (single,) = runs["single"]
    for a, b, c in zip(r0["protonet"], r1["protonet"], single["protonet"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_ddp_attention_learner_gradient_equals_the_single_process_gradient(runs):
    # gradients, not weights after Adam: parameters with a zero true gradient (e.g. a marker whose shift a LayerNorm
    # removes) carry float noise that Adam's normalisation turns into lr-sized, order-dependent updates
    r0, r1 = runs["ddp"]
    (single,) = runs["single"]
    assert len(r0["attention_grads"]) == len(single["attention_grads"]) > 10
    for a, b, c in zip(r0["attention_grads"], r1["attention_grads"], single["attention_grads"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-5)


def test_ddp_episode_accuracy_equals_the_single_process_result(runs):
    r0, r1 = runs["ddp"]
    (single,) = runs["single"]
    # two processes compute with other thread counts than one, so their logits may differ by rounding: the accuracies
    # compare exactly only because no query is near a tie (measured: every top-2 gap over 0.7, logits up to 41)
    assert min(r0["val_margin"], r1["val_margin"], single["val_margin"]) > 0.1
    for key in ("val/acc", "val/acc_ci95", "val/loss"):
        assert r0["metrics"][key] == pytest.approx(single["metrics"][key], abs=1e-6)
        assert r1["metrics"][key] == pytest.approx(single["metrics"][key], abs=1e-6)


SKIP_MODES = ("skip", "accumulate", "accumulate_scaler")


@pytest.fixture(scope="module")
def skip_runs(ddp_runs):
    """ddp_skip.py's modes that train to the end, on 2 processes and on one; "raise" and "few_eval" on 2."""
    load = lambda mode, devices: [torch.load(ddp_runs / f"skip{devices}" / mode / f"rank{r}.pt")  # noqa: E731
                                  for r in range(devices)]
    return {2: {mode: load(mode, 2) for mode in (*SKIP_MODES, "raise", "few_eval")},
            1: {mode: load(mode, 1) for mode in SKIP_MODES}}


def test_a_nan_on_one_rank_makes_every_rank_skip_the_meta_batch_as_one_process_does(skip_runs):
    # only rank 1 sees a NaN meta-loss at step 1; both ranks must skip it together (a rank that returned without a
    # backward would leave the other waiting in the gradient all-reduce), and the run must equal one process that
    # skips the same step
    r0, r1 = skip_runs[2]["skip"]
    (single,) = skip_runs[1]["skip"]
    assert r0["global_step"] == r1["global_step"] == single["global_step"] == 4
    for a, b, c in zip(r0["weights"], r1["weights"], single["weights"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["accumulate", "accumulate_scaler"])
def test_a_skipped_meta_batch_under_gradient_accumulation_is_the_one_process_skip(skip_runs, mode):
    # batch 2 opens an accumulation window of 2 and batch 5 closes one, NaN on the last rank only. One process adds
    # nothing for a skipped batch and keeps the window's other gradients (in float32 it steps on them; under a
    # gradient scaler Lightning skips a step whose last batch was skipped, and the scaler's update). Before, DDP
    # dropped every gradient of the window (or made them NaN and halved the scale) instead
    r0, r1 = skip_runs[2][mode]
    (single,) = skip_runs[1][mode]
    assert r0["global_step"] == r1["global_step"] == single["global_step"] == 3
    tol = 1e-5 if mode == "accumulate" else 1e-4  # float16 autocast rounds meta-batches of 2 and 4 differently
    for a, b, c in zip(r0["weights"], r1["weights"], single["weights"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(a, c, atol=tol, rtol=tol)
    if mode == "accumulate_scaler":
        assert r0["scaler"] == r1["scaler"] == single["scaler"]
        assert single["scaler"]["scale"] == 2.0**10  # no overflow here: a skipped step does not halve it


def test_a_nan_on_one_rank_stops_every_rank_in_raise_mode(skip_runs):
    r0, r1 = skip_runs[2]["raise"]
    assert "is finite here but not on another process at global step 1" in r0["error"]
    assert "is nan at global step 1" in r1["error"]


def test_evaluation_with_fewer_meta_batches_than_processes_is_refused_at_setup_on_every_rank(skip_runs):
    r0, r1 = skip_runs[2]["few_eval"]
    for r in (r0, r1):
        assert "`val_episodes`=1 in meta-batches of 1 (`eval_meta_batch_size`) gives 1 val meta-batch(es) for 2 " \
               "processes" in r["error"] and "raise `val_episodes` to at least 2" in r["error"]

"""DynamicAdjointScaler: saving and resuming (state_dict), argument validation, ``scale_value``
before the first backward, the bounded history, recovery of the learned target, and two threads
sharing one scaler (each backward pass has its own per-pass state)."""

from __future__ import annotations

import io
import threading

import pytest
import torch

from mpnode.core import NonFiniteGradientError, odeint
from mpnode.scaler import DynamicAdjointScaler, ScaleEvent


def _mlp():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    return net, tuple(net.parameters())


class _NeedsHeadroom(torch.autograd.Function):
    """Identity forward; backward computes ``(g * gain) / gain`` in ``g``'s dtype.

    Exact for a power-of-two ``gain`` unless ``g * gain`` overflows float16: a stand-in for a
    network whose VJP needs ``gain`` of headroom below float16's max.
    """

    @staticmethod
    def forward(ctx, z, gain):
        ctx.gain = gain
        return z.view_as(z)

    @staticmethod
    def backward(ctx, g):
        return (g * ctx.gain) / ctx.gain, None


def _grads(net, params, y0, t, scaler, gain: float = 1.0, weight: float = 1.0, amp: bool = True,
           on_backward_call=None):
    """Parameter gradients of ``weight * sum(y(T)^2)`` for ``y' = net(y)`` (float16 autocast if ``amp``).

    ``gain`` > 1 makes an outlier pass whose float16 VJP needs that much headroom (see
    ``_NeedsHeadroom``); ``on_backward_call`` is called on every field evaluation made during backward.
    """
    in_backward = False

    def field(t, y):
        if in_backward and on_backward_call is not None:
            on_backward_call()
        z = net(y)
        return z if gain == 1.0 else _NeedsHeadroom.apply(z, gain)

    with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
        out = odeint(field, y0, t, method="rk4", adjoint_params=params, scaler=scaler)
        loss = weight * (out[-1].float() ** 2).sum()
    in_backward = True
    return torch.autograd.grad(loss, params)


def _rel(got, ref) -> float:
    return max(float((a - b).norm() / b.norm()) for a, b in zip(got, ref))


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# -- argument validation ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["growth_interval", "block_size", "max_retries", "history_size", "recovery_interval"])
@pytest.mark.parametrize("bad", [1.5, 2.0, True, "3", None])
def test_integer_arguments_must_be_ints(name, bad):
    with pytest.raises(TypeError, match=rf"{name} must be an int.*{name}="):
        DynamicAdjointScaler(**{name: bad})


@pytest.mark.parametrize(
    "name, bad",
    [("growth_interval", 0), ("block_size", 0), ("max_retries", -1), ("history_size", -1), ("recovery_interval", 0)],
)
def test_integer_arguments_out_of_range(name, bad):
    with pytest.raises(ValueError, match=rf"{name} must be an int >= "):
        DynamicAdjointScaler(**{name: bad})


def test_numpy_style_integers_are_accepted():
    scaler = DynamicAdjointScaler(growth_interval=torch.tensor(8).item(), block_size=8)
    assert scaler.growth_interval == 8 and type(scaler.growth_interval) is int


@pytest.mark.parametrize("bad", ["256", True, None, torch.tensor(256.0), [256.0]])
def test_target_must_be_a_number(bad):
    with pytest.raises(TypeError, match="target must be a float power of two"):
        DynamicAdjointScaler(target=bad)


@pytest.mark.parametrize("bad", [1000.0, 0.0, -256.0, float("nan"), float("inf"), 2.0**16, 2.0**-30])
def test_target_must_be_a_power_of_two_in_range(bad):
    with pytest.raises(ValueError, match="target must be a power of two"):
        DynamicAdjointScaler(target=bad)


def test_integer_target_is_accepted_as_float():
    scaler = DynamicAdjointScaler(target=1024)
    assert scaler.target == scaler.initial_target == 1024.0 and type(scaler.target) is float


# -- scale_value --------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["float16"])
def test_scale_value_before_and_after_the_first_backward(precision):
    scaler = DynamicAdjointScaler()
    assert scaler.scale_value is None  # no pass has chosen a scale yet (used to raise AttributeError)
    net, params = _mlp()
    _grads(net, params, torch.randn(8, 4), torch.linspace(0, 1, 9), scaler)
    # the scale at the last step of the pass: the one set by the pass's last scale event
    assert scaler.scale_value == scaler.history[-1].scale
    assert scaler.scale_value > 1 and float(torch.tensor(scaler.scale_value).log2()).is_integer()


# -- bounded history -----------------------------------------------------------------------------


def _run_passes(scaler, passes: int = 12):
    """At least one event (init) per pass."""
    net, params = _mlp()
    y0 = torch.randn(8, 4)
    t = torch.linspace(0, 1, 9)
    for i in range(passes):
        _grads(net, params, y0 * (1 + i), t, scaler)


@pytest.mark.parametrize("precision", ["float16"])
def test_history_keeps_the_latest_events_and_counts_the_dropped(precision):
    unbounded = DynamicAdjointScaler(history_size=10**6)
    bounded = DynamicAdjointScaler(history_size=5)
    _run_passes(unbounded)
    _run_passes(bounded)
    everything = list(unbounded.history)
    assert len(everything) >= 12  # the bound matters
    assert list(bounded.history) == everything[-5:]
    assert bounded.history_dropped == len(everything) - 5 and unbounded.history_dropped == 0
    assert bounded.counters == unbounded.counters  # counters count every event


@pytest.mark.parametrize("precision", ["float16"])
def test_history_size_zero_keeps_no_events(precision):
    scaler = DynamicAdjointScaler(history_size=0)
    _run_passes(scaler, passes=2)
    assert len(scaler.history) == 0 and scaler.history_dropped > 0 and scaler.counters["backward"] == 2


def test_default_history_is_bounded():
    scaler = DynamicAdjointScaler()
    events = [ScaleEvent("init", i, 0, 1.0) for i in range(1005)]
    scaler._record(events[:600])
    scaler._record(events[600:])
    assert scaler.history_size == 1000 and scaler.history == events[5:] and scaler.history_dropped == 5


# -- recovery of the learned target ----------------------------------------------------------------


def _long_run(recovery_interval: int, passes: int = 400, outlier_every: int = 10):
    """A run where every ``outlier_every``-th pass overflows; returns the learned target after
    each pass, the backoffs, and the relative error of a clean pass's gradients at the end.

    An outlier needs 2^10 x more headroom than the *current* target leaves (whatever the target),
    so it costs a backoff: without recovery each one halves the target for good.
    """
    net, params = _mlp()
    y0, t = torch.randn(2, 4), torch.linspace(0, 1, 3)
    scaler = DynamicAdjointScaler(recovery_interval=recovery_interval)
    targets = []
    for i in range(passes):
        gain = 2.0**10 * scaler.initial_target / scaler.target if i % outlier_every == 0 else 1.0
        _grads(net, params, y0, t, scaler, gain=gain)
        targets.append(scaler.target)
    error = _rel(_grads(net, params, y0, t, scaler), _grads(net, params, y0, t, None, amp=False))
    return targets, scaler.counters["backoffs"], error


@pytest.mark.parametrize("precision", ["float16"])
def test_occasional_overflows_do_not_ratchet_the_target_down(precision):
    initial = DynamicAdjointScaler().initial_target
    # recovery effectively off (the old behaviour): 40 outliers ratchet the target down to float16's
    # smallest subnormal, where every VJP underflows and the gradient comes back as zeros
    targets, _, error = _long_run(recovery_interval=10**9)
    assert targets[-1] == 2.0**-24 and error > 0.9, (targets[-1], error)
    targets, backoffs, error = _long_run(recovery_interval=5)
    assert backoffs >= 40 and error < 1e-2, (backoffs, error)
    assert min(targets) >= initial / 8 and max(targets) <= initial
    # just before each outlier the target has climbed back to within a factor 2 of the initial one
    assert all(targets[i - 1] >= initial / 2 for i in range(10, 400, 10)), targets


@pytest.mark.parametrize("precision", ["float16"])
def test_recovery_rule_counts_clean_passes_and_stops_at_the_initial_target(precision):
    net, params = _mlp()
    y0, t = torch.randn(2, 4), torch.linspace(0, 1, 3)
    scaler = DynamicAdjointScaler(target=2.0**8, recovery_interval=3)
    _grads(net, params, y0, t, scaler, gain=2.0**12)  # one outlier
    lowered = scaler.target
    assert lowered < 2.0**8 and scaler.clean_passes == 0
    seen = []
    for _ in range(3 * 8):
        _grads(net, params, y0, t, scaler)
        seen.append((scaler.target, scaler.clean_passes))
    # doubles exactly every third clean pass, and stops at the initial target
    assert seen[1] == (lowered, 2) and seen[2] == (2 * lowered, 0)
    assert seen[-1] == (2.0**8, 0) and max(target for target, _ in seen) == 2.0**8
    assert scaler.counters["recoveries"] == round(torch.tensor(2.0**8 / lowered).log2().item())


@pytest.mark.parametrize("precision", ["float16"])
def test_a_failed_pass_leaves_target_and_clean_passes_alone(precision):
    net, params = _mlp()
    y0, t = torch.randn(2, 4), torch.linspace(0, 1, 3)
    scaler = DynamicAdjointScaler(recovery_interval=5, max_retries=2)
    _grads(net, params, y0, t, scaler, gain=2.0**10)  # one backoff
    _grads(net, params, y0, t, scaler)
    before = (scaler.target, scaler.clean_passes)
    assert before == (2.0**7, 1)
    everything = scaler.state_dict()
    with pytest.raises(NonFiniteGradientError, match="after 2 halvings"):
        _grads(net, params, y0, t, scaler, gain=2.0**30)  # backoffs, then gives up
    assert (scaler.target, scaler.clean_passes) == before
    with pytest.raises(NonFiniteGradientError, match="already inf/NaN"):
        _grads(net, params, y0, t, scaler, weight=float("nan"))
    assert (scaler.target, scaler.clean_passes) == before
    # all of a pass's effects or none: counters, history and host syncs are untouched too
    assert scaler.state_dict() == everything


# -- state_dict / load_state_dict ---------------------------------------------------------------


def _trained_scaler() -> DynamicAdjointScaler:
    """A scaler with non-default settings and every kind of learned state (backoffs, events)."""
    net, params = _mlp()
    scaler = DynamicAdjointScaler(target=2.0**14, growth_interval=4, block_size=4, history_size=50,
                                  recovery_interval=7)
    for i in range(3):
        _grads(net, params, torch.randn(8, 4) * (1 + i), torch.linspace(0, 2, 17), scaler, gain=2.0 ** (4 - i))
    return scaler


@pytest.mark.parametrize("precision", ["float16"])
def test_state_dict_survives_weights_only_load_and_resumes_exactly(precision):
    original = _trained_scaler()
    assert original.counters["backoffs"] >= 1 and original.target < original.initial_target
    state = original.state_dict()
    resumed = DynamicAdjointScaler()  # default settings: the state's settings overwrite them
    resumed.load_state_dict(_roundtrip(state))
    assert resumed.state_dict() == state
    assert (resumed.initial_target, resumed.growth_interval, resumed.block_size, resumed.history_size) == (
        2.0**14, 4, 4, 50)
    assert resumed.history == original.history and resumed.history_size == 50
    assert resumed.scale_value == original.scale_value is not None
    # training continues identically from either scaler
    net, params = _mlp()
    y0, t = torch.randn(8, 4), torch.linspace(0, 2, 17)
    a = _grads(net, params, y0, t, original)
    b = _grads(net, params, y0, t, resumed)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert resumed.state_dict() == original.state_dict()


def test_state_dict_of_a_fresh_scaler_roundtrips():
    state = DynamicAdjointScaler(max_retries=3).state_dict()
    restored = DynamicAdjointScaler()
    restored.load_state_dict(_roundtrip(state))
    assert restored.state_dict() == state and restored.scale_value is None and restored.max_retries == 3


def _corrupt(path, value):
    """A fresh scaler's state with ``state[path[0]][path[1]]... = value`` (``...`` deletes the key)."""
    state = DynamicAdjointScaler().state_dict()
    state["history"] = [{"kind": "init", "backward": 0, "step": 3, "scale": 4.0}]
    node = state
    for key in path[:-1]:
        node = node[key]
    if value is ...:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return state


@pytest.mark.parametrize(
    "path, value, error, message",
    [
        (("counters",), ..., ValueError, r"state does not match .*missing \['counters'\]"),
        (("extra",), 1, ValueError, r"unexpected \['extra'\]"),
        (("settings", "growth_interval"), 1.5, TypeError, r"state\['settings'\]: growth_interval must be an int"),
        (("settings", "target"), 1000.0, ValueError, r"target must be a power of two"),
        (("counters", "grows"), -1, ValueError, r"state\['counters'\]: grows must be an int >= 0"),
        (("counters", "scale"), 0, ValueError, r"unexpected \['scale'\]"),
        (("learned_target",), 2.0**9, ValueError, r"learned_target must be a power of two in \[2\^-24, 2\^8\]"),
        (("clean_passes",), 100, ValueError, r"clean_passes.* must be below recovery_interval"),
        (("history",), "events", TypeError, r"state\['history'\] must be a list"),
        (("history", 0, "kind"), "explode", ValueError, r"state\['history'\]\[0\]\['kind'\] must be one of"),
        (("history", 0, "scale"), "4", TypeError, r"\['scale'\] must be a float"),
        (("last_scale",), -2.0, ValueError, r"last_scale.* must be None or a positive finite float"),
        (("version",), 2, ValueError, r"reads version 1"),
    ],
)
def test_load_state_dict_names_what_is_wrong_and_changes_nothing(path, value, error, message):
    scaler = DynamicAdjointScaler(growth_interval=5)
    before = scaler.state_dict()
    with pytest.raises(error, match=message):
        scaler.load_state_dict(_corrupt(path, value))
    assert scaler.state_dict() == before


def test_load_state_dict_refuses_a_non_dict():
    with pytest.raises(TypeError, match="state must be a dict"):
        DynamicAdjointScaler().load_state_dict([("target", 256.0)])


def test_load_state_dict_refuses_more_history_than_history_size():
    state = DynamicAdjointScaler(history_size=1).state_dict()
    state["history"] = [{"kind": "init", "backward": 0, "step": 1, "scale": 2.0}] * 2
    with pytest.raises(ValueError, match="2 events, more than history_size = 1"):
        DynamicAdjointScaler().load_state_dict(state)


def test_state_dict_holds_only_plain_types():
    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return x is None or type(x) in (int, float, str)

    scaler = DynamicAdjointScaler()
    scaler._record([ScaleEvent("init", 0, 3, 8.0)])
    assert plain(scaler.state_dict())


# -- two threads, one scaler --------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["float16"])
def test_two_threads_share_one_scaler(precision):
    """A 32-step and a 4-step backward run at the same time on one scaler.

    The long pass pauses at its first field evaluation in backward until the short pass has begun
    its backward, so the short pass's ``begin`` always lands inside the long pass (deterministic
    interleaving). Before per-pass scaling objects the short pass replaced the per-pass state the
    long pass was using (IndexError: index 31 out of bounds for size 4). Each pass must give its
    float32 gradients, and the scaler must have learned from both.
    """
    net, params = _mlp()
    y0 = torch.randn(4, 4)
    grids = {"long": torch.linspace(0, 1, 33), "short": torch.linspace(0, 1, 5)}
    reference = {k: _grads(net, params, y0, t, None, amp=False) for k, t in grids.items()}
    shared = DynamicAdjointScaler()
    long_in_backward, short_in_backward = threading.Event(), threading.Event()
    results, errors = {}, {}

    def pause_for_short():
        long_in_backward.set()
        if not short_in_backward.wait(timeout=20):
            raise TimeoutError("the short pass never reached its backward")

    def run(name, before, on_backward_call):
        try:
            before()
            results[name] = _grads(net, params, y0, grids[name], shared, on_backward_call=on_backward_call)
        except Exception as exc:  # reported by the main thread
            errors[name] = exc

    def wait_for_long():
        if not long_in_backward.wait(timeout=20):
            raise TimeoutError("the long pass never reached its backward")

    threads = [
        threading.Thread(target=run, args=("long", lambda: None, pause_for_short), daemon=True),
        threading.Thread(target=run, args=("short", wait_for_long, short_in_backward.set), daemon=True),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    assert not errors, errors
    for name in grids:
        assert _rel(results[name], reference[name]) < 1e-2, name
    assert shared.counters["backward"] == 2 and {e.backward for e in shared.history} == {0, 1}

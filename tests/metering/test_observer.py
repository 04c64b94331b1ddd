"""MeteredCall is what forwarding's CallObserver Protocol describes: every member, with the same kind."""

from __future__ import annotations

import inspect

from proxy.forwarding.observer import CallObserver
from proxy.metering.call import MeteredCall


def _members(cls: type) -> dict[str, object]:
    return {name: value for name, value in vars(cls).items() if not name.startswith("_")}


def test_metered_call_has_every_member_of_the_observer_protocol() -> None:
    members = _members(CallObserver)
    assert {"check_caller", "admit", "on_chunk", "finish", "recorded", "stream_edits"} <= set(members)
    for name, spec in members.items():
        assert hasattr(MeteredCall, name) or name in MeteredCall.__init__.__code__.co_names, name
        impl = getattr(MeteredCall, name, None)
        if inspect.isfunction(spec) and impl is not None:
            assert inspect.isfunction(impl), name
            assert inspect.iscoroutinefunction(impl) == inspect.iscoroutinefunction(spec), name
            assert list(inspect.signature(impl).parameters) == list(inspect.signature(spec).parameters), name

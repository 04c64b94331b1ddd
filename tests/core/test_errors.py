"""One error hierarchy: every exception meterproxy defines derives from MeterproxyError."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import proxy
from proxy.core.errors import MeterproxyError, ParameterError


def test_every_exception_class_derives_from_meterproxy_error() -> None:
    found, stray = 0, []
    for info in pkgutil.walk_packages(proxy.__path__, "proxy."):
        if info.name == "proxy.__main__":
            continue
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == info.name and issubclass(cls, BaseException):
                found += 1
                if not issubclass(cls, MeterproxyError):
                    stray.append(f"{info.name}.{name}")
    assert found >= 15 and stray == []


def test_the_invalid_parameter_error_is_one_class_under_one_name() -> None:
    """No module gives ParameterError a second name (FieldError and ReportError were two)."""
    for info in pkgutil.walk_packages(proxy.__path__, "proxy."):
        if info.name == "proxy.__main__":
            continue  # runs the CLI when imported
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if value is ParameterError:
                assert name == "ParameterError", f"{info.name}.{name} is another name of ParameterError"
    error = ParameterError("since must be a time", "since")
    assert isinstance(error, ValueError) and error.param == "since" and str(error) == "since must be a time"

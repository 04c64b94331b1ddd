"""One error hierarchy: every exception meterproxy defines derives from MeterproxyError."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import proxy
from proxy.control.limits import FieldError
from proxy.core.errors import MeterproxyError, ParameterError
from proxy.reports.queries import ReportError


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


def test_the_invalid_parameter_error_is_one_class() -> None:
    assert FieldError is ParameterError and ReportError is ParameterError
    error = ParameterError("since must be a time", "since")
    assert isinstance(error, ValueError) and error.param == "since" and str(error) == "since must be a time"

"""Schemathesis fuzzing of a live control service, shared by the service's own tests and the
tests against a real job. At the tests' root so both folders can import it.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import pytest


def fuzz_service(url: str, token: str, *, max_examples: int, response_schema: bool = True,
                 budget_s: float = 180.0,
                 adjust: Optional[Callable[[object], None]] = None) -> dict[str, set[int]]:
    """Positive and negative cases for every operation of the served schema, each sent with
    the token (checked: no 5xx, status codes and content types as documented, negative data
    rejected, and with `response_schema` the bodies as documented) and again with a wrong
    token (must be 401). `adjust(case)` may edit a case before it is sent. Returns the status
    codes seen per operation."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance,
                                                   negative_data_rejection,
                                                   response_schema_conformance,
                                                   status_code_conformance)

    auth = {"Authorization": f"Bearer {token}"}
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              negative_data_rejection] + ([response_schema_conformance] if response_schema
                                          else [])
    seen: dict[str, set[int]] = {}
    deadline = time.monotonic() + budget_s
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=auth)
    for operation in [result.ok() for result in schema.get_all_operations()]:
        takes_input = bool(operation.body) or any(True for _ in operation.iter_parameters())
        modes = [schemathesis.GenerationMode.POSITIVE]
        if takes_input:  # nothing to get wrong in a request without input
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:

            @settings(max_examples=max_examples, deadline=None, database=None,
                      derandomize=True, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case):
                if adjust is not None:
                    adjust(case)
                response = case.call(base_url=url, headers=auth, timeout=120)
                case.validate_response(response, checks=checks)
                seen.setdefault(operation.label, set()).add(response.status_code)
                if operation.path != "/healthz":
                    anon = case.call(base_url=url, headers={"Authorization": "Bearer no"},
                                     timeout=30)
                    assert anon.status_code == 401, (case, anon.text)
                    case.validate_response(anon, checks=checks)  # the 401 is documented

            fuzz()
            assert time.monotonic() < deadline, "fuzzing ran past its time budget"
    return seen

"""The relay tests again, against gateway/_crelay.c built with ASan and UBSan (a memory error or
undefined behaviour in the C relay fails the suite even where the tests' own checks pass).

The child run (tests/support/sanitized_relay.py) is the C relay's unit and thread tests
(test_offload.py) and the randomized stress test on the C relay, at a reduced size: the
sanitizers slow the relay a little and the interpreter not at all, and the point is many
hand-offs, not many bytes. The stress seed of the parent's environment is passed on, to replay one.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.support import sanitized_relay

pytestmark = pytest.mark.serial  # timing-sensitive: ./dev.sh test runs it after the parallel rest

STRESS_STREAMS = "160"


def test_the_relay_tests_pass_under_address_and_undefined_behavior_sanitizers() -> None:
    started = time.monotonic()
    module = sanitized_relay.build()
    env = {"HPCGATE_STRESS_STREAMS": STRESS_STREAMS}
    seed = os.environ.get("HPCGATE_STRESS_SEED")
    if seed:
        env["HPCGATE_STRESS_SEED"] = seed
    run = sanitized_relay.run_pytest(
        module, ["-q", "-s", "tests/gateway/test_offload.py", "tests/gateway/test_relay_stress.py", "-k",
                 "not event-loop"], env)
    took = time.monotonic() - started
    print(f"sanitized build {module}; child run {took:.1f} s")
    report = sanitized_relay.report_in(run.stdout)
    assert report is None, f"sanitizer report from the relay tests:\n{report}"
    used = f"{sanitized_relay.MARKER} {module}" in run.stdout
    assert used, f"the sanitized build was not used:\n{run.stdout[-12_000:]}"
    assert run.returncode == 0, f"the relay tests failed under the sanitized build:\n{run.stdout[-12_000:]}"

"""A small actor for tests of the actor pool and what drives it (autoscaling, the service).

It lives in its own module at the tests' root so that Ray workers can import it by name.
"""

from __future__ import annotations

import os
import time

import ray

from actors.dispatch import NeedsPrepare


class Echo:
    """Returns its input after `delay` seconds; can be told to fail or to need preparing."""

    def __init__(self, delay: float = 0.05):
        self.delay = delay
        self.prepared = False
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed

    def prepare(self):
        self.prepared = True

    def work(self, x, need_prepared: bool = False):
        if need_prepared and not self.prepared:
            raise NeedsPrepare()
        time.sleep(self.delay)
        if x == "boom":
            raise ValueError("bad item boom")
        return (x, os.getpid())

    def pid(self):
        return os.getpid()

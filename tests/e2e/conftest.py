import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from cluster import Cluster  # noqa: E402
from receiver import Hanging, Receiver  # noqa: E402


@pytest.fixture(scope="session")
def cluster():
    """One preloaded cluster shared by the tests that leave it running."""
    c = Cluster.create()
    try:
        c.start()
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION pg_postback")
        yield c
    finally:
        if os.environ.get("KEEP_CLUSTER"):
            print(f"\nkept cluster in {c.datadir} on port {c.port}")
        else:
            c.destroy()


@pytest.fixture
def make_cluster():
    """Factory for clusters a test may stop, kill or reconfigure; all are torn down."""
    made = []

    def make(settings=None):
        c = Cluster.create(settings=settings)
        made.append(c)
        c.start()
        return c

    yield make
    for c in made:
        c.destroy()


@pytest.fixture
def receiver():
    """A loopback HTTP receiver that records what it gets and answers as scripted."""
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def hanging():
    """A loopback receiver that accepts connections and never answers."""
    h = Hanging().start()
    yield h
    h.stop()

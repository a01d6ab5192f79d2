"""Several endpoints (a cluster's nodes): a request one cannot answer moves to
the next with the same idempotency key; and a real three-node cluster losing
its leader under a client that counts every call once."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import httpx
import pytest

import quotad
from conftest import free_port, quotad_bin

FAST = {"backoff": 0.01, "max_backoff": 0.05}


def test_a_dead_endpoint_is_skipped(daemon, subject):
    dead = f"http://127.0.0.1:{free_port()}"
    with quotad.Client([dead, daemon.url], **FAST) as c:
        assert c.retries == 8, "several URLs retry long enough for a failover"
        assert c.consume(subject).allowed
        assert c.consume(subject).allowed
        assert c.subject(subject).counter("requests-per-day").used == 2


def test_503_moves_to_the_next_endpoint_with_the_same_key(proxy_factory, subject):
    down = proxy_factory(["503"])
    up = proxy_factory(["pass"])
    with quotad.Client([down.url, up.url], **FAST) as c:
        d = c.consume(subject, amounts={"tokens": 5})
    assert d.allowed
    keys = [b["idempotency_key"] for b in down.bodies() + up.bodies()]
    assert len(keys) == 2 and len(set(keys)) == 1, keys


def test_the_async_client_moves_on_too(proxy_factory, subject):
    down = proxy_factory(["drop"])
    up = proxy_factory(["pass"])

    async def go() -> quotad.Decision:
        async with quotad.AsyncClient([down.url, up.url], **FAST) as c:
            return await c.consume(subject)

    assert asyncio.run(go()).allowed
    assert len(up.bodies()) == 1


def test_an_empty_list_of_urls_is_refused():
    with pytest.raises(ValueError, match="empty list"):
        quotad.Client([])


CLUSTER_NODE = """
[server]
listen = ["127.0.0.1:{api}"]
[storage]
data_dir = "{data}"
[policy]
source = "api"
[log]
level = "warn"
[cluster]
node_id = {id}
raft_listen = "127.0.0.1:{raft}"
secret_file = "{secret}"
peers = [{peers}]
heartbeat = "50ms"
election_timeout = "500ms"
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "calls"
  algorithm = "lifetime"
  max = 1000
"""


class Cluster:
    """Three quotad nodes on 127.0.0.1."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="quotad-py-cluster-"))
        (self.dir / "secret").write_text("python-cluster-secret-0123456789")
        ports = [(free_port(), free_port()) for _ in range(3)]
        peers = ", ".join(
            f'{{ id = {i + 1}, raft = "127.0.0.1:{raft}", api = "http://127.0.0.1:{api}" }}'
            for i, (api, raft) in enumerate(ports)
        )
        self.urls = [f"http://127.0.0.1:{api}" for api, _ in ports]
        self.configs: List[Path] = []
        for i, (api, raft) in enumerate(ports):
            config = self.dir / f"node{i + 1}.toml"
            config.write_text(
                CLUSTER_NODE.format(
                    api=api,
                    raft=raft,
                    id=i + 1,
                    data=self.dir / f"node{i + 1}",
                    secret=self.dir / "secret",
                    peers=peers,
                )
            )
            self.configs.append(config)
        self.procs: List[Optional[subprocess.Popen]] = [self._start(i) for i in range(3)]

    def _start(self, i: int) -> subprocess.Popen:
        log = open(self.dir / f"node{i + 1}.log", "ab")
        p = subprocess.Popen(
            [str(quotad_bin()), "serve", "--config", str(self.configs[i])],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        return p

    def leader(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, url in enumerate(self.urls):
                if self.procs[i] is None:
                    continue
                try:
                    if httpx.get(url + "/v1/cluster", timeout=1.0).json().get("serving"):
                        return i
                except (httpx.HTTPError, ValueError):
                    pass
            time.sleep(0.05)
        raise AssertionError("no leader within 30 s")

    def kill(self, i: int) -> None:
        p, self.procs[i] = self.procs[i], None
        if p is not None:
            p.kill()
            p.wait(timeout=10)

    def close(self) -> None:
        for i in range(3):
            self.kill(i)
        shutil.rmtree(self.dir, ignore_errors=True)


def test_a_cluster_losing_its_leader_counts_every_call_once(subject):
    cluster = Cluster()
    try:
        cluster.leader()
        with quotad.Client(cluster.urls, backoff=0.05, max_backoff=1.0, retries=20) as c:
            for _ in range(10):
                assert c.consume(subject).allowed
            cluster.kill(cluster.leader())
            # The client gives each call a key and keeps it across the retries
            # that carry it through the election.
            for _ in range(10):
                assert c.consume(subject).allowed
            assert c.subject(subject).counter("calls").used == 20
    finally:
        cluster.close()

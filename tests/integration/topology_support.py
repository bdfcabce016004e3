"""Real Redis topologies for the integration tier: a three-master Cluster, and a
master with a replica watched by three Sentinels. Every process runs on a free
port in its own directory and is stopped by the fixture that started it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from relay.wire.keys import SLOTS, key_slot
from tests.support import REDIS_SERVER, RedisServer, free_port, wait_for


def cli(port: int, *args: str) -> str:
    """One redis-cli command against ``port`` (text reply)."""
    out = subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, timeout=15, check=True
    )
    return out.stdout.decode()


class RedisClusterProcs:
    """Three cluster-enabled redis-servers (AOF on, so one can restart keeping its data)."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.nodes = [
            RedisServer(workdir / f"node{i}", appendonly=True, extra_args=self._args())
            for i in range(masters)
        ]

    @staticmethod
    def _args() -> list[str]:
        return [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            # A bus port of its own (the default, port + 10000, may be taken or > 65535).
            "--cluster-port", str(free_port()),
            # A restart of a few seconds must not mark the node failed.
            "--cluster-node-timeout", "15000",
            "--appendfsync", "everysec",
        ]  # fmt: skip

    @property
    def url(self) -> str:
        """Any node: relay finds the others."""
        return self.nodes[0].url.removesuffix("/0")

    def start(self) -> RedisClusterProcs:
        try:
            return self._start()
        except BaseException:
            self.stop()  # what did start, so no server outlives a failed fixture
            raise

    def _start(self) -> RedisClusterProcs:
        for node in self.nodes:
            node.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create",
             *(f"127.0.0.1:{n.port}" for n in self.nodes), "--cluster-yes"],
            capture_output=True, timeout=60, check=True,
        )  # fmt: skip
        wait_for(self.healthy, 30, what="cluster state ok on every node")
        return self

    def healthy(self) -> bool:
        """Every node says ok and they agree on who owns which slot: clients that
        start earlier meet MOVED replies while the nodes converge."""
        if not all("cluster_state:ok" in cli(n.port, "CLUSTER", "INFO") for n in self.nodes):
            return False
        check = subprocess.run(
            ["redis-cli", "--cluster", "check", f"127.0.0.1:{self.nodes[0].port}"],
            capture_output=True, timeout=15, check=False,
        )  # fmt: skip
        return b"All nodes agree about slots configuration" in check.stdout

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def node_id(self, node: RedisServer) -> str:
        return cli(node.port, "CLUSTER", "MYID").strip()

    def slot_ports(self) -> list[int]:
        """The port of the node serving each slot, as the first node sees it."""
        by_id = {self.node_id(n): n.port for n in self.nodes}
        ports = [0] * SLOTS
        for line in cli(self.nodes[0].port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            for part in fields[8:]:
                lo, _, hi = part.partition("-")
                if lo.isdigit():
                    for slot in range(int(lo), int(hi or lo) + 1):
                        ports[slot] = by_id[fields[0]]
        return ports

    def owner(self, key: str) -> RedisServer:
        """The node serving ``key``'s slot now."""
        port = self.slot_ports()[key_slot(key)]
        return next(n for n in self.nodes if n.port == port)

    def move_slot(self, slot: int, source: RedisServer, target: RedisServer) -> None:
        """Migrate ``slot`` and its keys from ``source`` to ``target``, as resharding does."""
        src, dst = self.node_id(source), self.node_id(target)
        cli(target.port, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", src)
        cli(source.port, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", dst)
        while keys := cli(source.port, "CLUSTER", "GETKEYSINSLOT", str(slot), "100").split():
            cli(source.port, "MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000",
                "KEYS", *keys)  # fmt: skip
        for node in (target, source, *[n for n in self.nodes if n not in (source, target)]):
            cli(node.port, "CLUSTER", "SETSLOT", str(slot), "NODE", dst)
        wait_for(
            lambda: all(self.owner_of_slot(slot, n) == dst for n in self.nodes),
            15,
            what=f"every node agrees slot {slot} moved",
        )

    def owner_of_slot(self, slot: int, asked: RedisServer) -> str:
        """The id of the node that ``asked`` believes owns ``slot``."""
        for line in cli(asked.port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            for part in fields[8:]:
                lo, _, hi = part.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    return fields[0]
        return ""


class SentinelGroup:
    """A master, one replica and three Sentinels watching them as ``mymaster``."""

    MASTER = "mymaster"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.master = RedisServer(workdir / "master", appendonly=True)
        self.replica = RedisServer(
            workdir / "replica",
            appendonly=True,
            extra_args=["--replicaof", "127.0.0.1", str(self.master.port)],
        )
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self._logs: list[Any] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.MASTER}"

    def start(self) -> SentinelGroup:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> SentinelGroup:
        self.master.start()
        self.replica.start()
        wait_for(
            lambda: "master_link_status:up" in cli(self.replica.port, "INFO", "replication"),
            15,
            what="replica in sync",
        )
        for i, port in enumerate(self.sentinel_ports):
            folder = self.workdir / f"sentinel{i}"
            folder.mkdir(parents=True, exist_ok=True)
            conf = folder / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                f"sentinel monitor {self.MASTER} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER} 2000\n"
                f"sentinel failover-timeout {self.MASTER} 10000\n"
            )
            log = open(folder / "sentinel.log", "ab")  # noqa: SIM115 - closed in stop()
            self._logs.append(log)
            self.sentinels.append(
                subprocess.Popen(
                    [REDIS_SERVER, str(conf), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
                )
            )
        for port in self.sentinel_ports:
            wait_for(
                lambda p=port: "slaves=1" in cli(p, "INFO", "sentinel"),
                20,
                what=f"sentinel {port} sees the replica",
            )
        return self

    def master_port(self) -> int:
        """The master's port as the first Sentinel reports it."""
        reply = cli(self.sentinel_ports[0], "SENTINEL", "get-master-addr-by-name", self.MASTER)
        return int(reply.split()[1])

    def failover(self) -> None:
        """``SENTINEL FAILOVER``: promote the replica now; returns once it is the master."""
        old = self.master_port()
        cli(self.sentinel_ports[0], "SENTINEL", "FAILOVER", self.MASTER)
        wait_for(lambda: self.master_port() != old, 30, what="a new master")
        new = self.replica if self.replica.port != old else self.master
        wait_for(
            lambda: "role:master" in cli(new.port, "INFO", "replication"),
            15,
            what="the new master to take writes",
        )

    def stop(self) -> None:
        for proc in self.sentinels:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for log in self._logs:
            log.close()
        self.replica.stop()
        self.master.stop()
